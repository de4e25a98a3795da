"""Where a streamed decode step spends its time: raw copies from the arena, then a profiled step.

    python3 benchmarks/diag_streaming.py --synthetic llama-7b --gpu-memory 6GiB --out DIR
Writes DIR/trace.json (chrome trace of one decode step) and prints profiler tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tiermem.api import load_from_reader
from tiermem.config import parse_size
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic", default="llama-7b")
    p.add_argument("--quant", default=None)
    p.add_argument("--gpu-memory", default="6GiB")
    p.add_argument("--resident-weights", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=".")
    args = p.parse_args()
    store = SyntheticStore(preset(args.synthetic), QuantScheme.from_name(args.quant), torch.bfloat16, "cuda")
    m = load_from_reader(store, "cuda", parse_size(args.gpu_memory), None, dtype=torch.bfloat16,
                         max_batch_size=args.batch, max_seq_len=64, micro_batches=1, lookahead=2, io_threads=4,
                         resident_weights=parse_size(args.resident_weights), progress=False)
    weights = m.source.weights
    streamed = [n for n in weights.host_blocks if n not in weights.host_only]
    dst = torch.empty(max(weights.host_blocks[n].numel() for n in streamed), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    report = {"placement": m.info()}
    for label, stream in (("default stream", torch.cuda.current_stream()), ("side stream", side)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for n in streamed:
                src = weights.host_blocks[n]
                dst[:src.numel()].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        nbytes = sum(weights.host_blocks[n].numel() for n in streamed)
        report[f"raw copy GB/s ({label})"] = nbytes / dt / 1e9
    ids = torch.randint(3, 30000, (args.batch, 16))
    m.generate(ids, 4, eos_token_id=[])
    times = []

    def on_step(_k):
        torch.cuda.synchronize()
        times.append(time.perf_counter())

    m.generate(ids, 6, eos_token_id=[], on_step=on_step)
    report["step_s"] = [b - a for a, b in zip(times, times[1:], strict=False)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m.generate(ids, 3, eos_token_id=[])
        torch.cuda.synchronize()
    out = Path(args.out)
    prof.export_chrome_trace(str(out / "trace.json"))
    print(json.dumps(report, indent=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    m.close()


if __name__ == "__main__":
    main()
