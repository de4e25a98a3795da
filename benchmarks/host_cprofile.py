"""Where the host time of a resident decode step goes, by Python function (cProfile), and what one CuPy
kernel launch costs by each way of issuing it.

    python3 benchmarks/host_cprofile.py --synthetic llama3-8b --quant int4 --kv-quant int4 --batch 16 --out DIR

Writes DIR/host_cprofile.txt (the profile's top functions by own and by cumulative time) and
DIR/launch_overhead.json (microseconds per launch of an empty-ish kernel: tiermem's _launch, CuPy with an
explicit stream, and a torch op for scale).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import numpy as np
import torch

from tiermem.api import load_from_reader
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore

LAUNCHES = 5000


def launch_overhead() -> dict[str, float]:
    """Host microseconds per launch of a tiny elementwise kernel, issued several ways (no sync in between)."""
    import cupy

    from tiermem.kernels import cupy_ops

    x = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)

    def timed(call) -> float:
        for _ in range(100):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(LAUNCHES):
            call()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        return 1e6 * host / LAUNCHES

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    fn = cupy_ops._function(0, "elementwise.cu", "rms_norm_bf16_wbf16_vec8")
    args = (cupy_ops._ptr(x), cupy_ops._ptr(w), cupy_ops._ptr(out), cupy_ops._i32(1024), np.float32(1e-5))
    return {
        "tiermem_rms_norm_us": timed(lambda: cupy_ops.rms_norm_cuda(x.view(1, 1024), w, 1e-5, out=out.view(1, 1024))),
        "cupy_launch_ctx_us": timed(lambda: cupy_ops._launch(x.device, "elementwise.cu", "rms_norm_bf16_wbf16_vec8",
                                                             1, 128, args)),
        "cupy_launch_stream_arg_us": timed(lambda: fn((1,), (128,), args, stream=stream)),
        "torch_add_us": timed(lambda: torch.add(x, x, out=out)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="llama3-8b")
    p.add_argument("--quant", default="int4")
    p.add_argument("--kv-quant", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    store = SyntheticStore(preset(args.synthetic), QuantScheme.from_name(args.quant, 128), torch.bfloat16, "cuda")
    warm, total = 3, 3 + args.steps
    model = load_from_reader(store, "cuda", None, None, dtype=torch.bfloat16, max_batch_size=args.batch,
                             max_seq_len=args.prompt_len + total, kv_quant=args.kv_quant, plan=None)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len))
    prof = cProfile.Profile()
    stamps: list[float] = []

    def on_step(k: int) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if k == warm:
            prof.enable()
        if k == total:
            prof.disable()

    model.generate(ids, total, eos_token_id=[], on_step=on_step)
    model.close()
    step_ms = 1e3 * (stamps[total - 1] - stamps[warm - 1]) / args.steps
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    text.write(f"decode step under cProfile: {step_ms:.1f} ms\n")
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_cprofile.txt").write_text(text.getvalue())
    overhead = launch_overhead()
    (args.out / "launch_overhead.json").write_text(json.dumps(overhead, indent=1))
    print(text.getvalue()[:6000])
    print(json.dumps(overhead, indent=1))


if __name__ == "__main__":
    main()
