"""Quantized linear with a few rows: the fused GEMV (one launch, 8-row or 16-row chunks) against dequantize + matmul.

    python3 benchmarks/bench_linear_rows.py --out linear_rows.json
Times both paths (CUDA events, median, rotating several weights so that L2 does not help) for
row counts around kernels.ops.GEMV_SPLIT_ROWS, on int4 g64 weights of common layer shapes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from tiermem.ceilings import median_seconds
from tiermem.kernels import cupy_ops, ops
from tiermem.kernels.quant import QuantScheme, quantize
from tiermem.kernels.reference import linear as dense_linear

SHAPES = [(13824, 5120), (28672, 8192), (8192, 28672)]
ROWS = [8, 16, 24, 32, 48, 64]


def chunked(x: torch.Tensor, w) -> torch.Tensor:
    return cupy_ops.quant_linear(x, w)  # every chunk in one launch (a chunk per blockIdx.y, 16 rows beyond 8)


def dequant_matmul(x: torch.Tensor, w) -> torch.Tensor:
    return dense_linear(x, ops.dequantize(w, torch.float16))


def rotating(fn, x: torch.Tensor, weights: list):
    """fn(x, w) over the weights in turn, so that consecutive calls miss L2."""
    turn = iter(range(10**9))
    return lambda: fn(x, weights[next(turn) % len(weights)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    scheme = QuantScheme(4, 64)
    results = []
    for out_f, in_f in SHAPES:
        weights = [quantize(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02, scheme)
                   for _ in range(4)]
        for rows in ROWS:
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
            results.append({"out": out_f, "in": in_f, "rows": rows,
                            "gemv_chunks_ms": 1e3 * median_seconds(rotating(chunked, x, weights), 30),
                            "dequant_matmul_ms": 1e3 * median_seconds(rotating(dequant_matmul, x, weights), 30)})
    report = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
              "gpu": torch.cuda.get_device_name(), "split_rows_in_use": ops.GEMV_SPLIT_ROWS, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for r in results:
        print(f"{r['out']:>6}x{r['in']:<6} rows {r['rows']:>3}: gemv chunks {r['gemv_chunks_ms']:.3f} ms, "
              f"dequant+matmul {r['dequant_matmul_ms']:.3f} ms")


if __name__ == "__main__":
    main()
