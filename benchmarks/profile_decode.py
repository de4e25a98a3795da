"""Where a decode step with resident weights spends its time: host (Python, launches) or GPU kernels.

    python3 benchmarks/profile_decode.py --synthetic llama3-8b --quant int4 --kv-quant int4 --batch 16 \
        --prompt-len 2048 --out DIR [--profiler python] [--cuda-graphs]

Runs the prompt and a few decode steps, then profiles `--steps` decode steps.
- `--profiler torch` (default; CPU and CUDA activities): writes DIR/profile_decode.json with wall seconds per
  step, summed GPU kernel time per step, launches per step, the ops with the most host time and the kernels
  with the most GPU time; prints the two tables.
- `--profiler python` (cProfile, and CUDA only: what one kernel launch costs by each way of issuing it): writes
  DIR/host_cprofile.txt (the top Python functions by own and by cumulative time) and DIR/launch_overhead.json
  (host microseconds per launch of a small kernel: tiermem's rms_norm wrapper, its _launch, CuPy given the
  stream, and a torch op for scale).
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
from synthetic_model import add_model_arguments, command, synthetic_store
from torch.profiler import ProfilerActivity, profile

from tiermem.api import load_from_reader

WARM_STEPS = 3
LAUNCHES = 5000


def profiled_steps(model, args: argparse.Namespace, start, stop) -> list[float]:
    """Wall seconds of `args.steps` decode steps after the prompt and WARM_STEPS more, start() / stop() around
    them (each step ends in a device sync)."""
    cuda = model.device.type == "cuda"
    total = WARM_STEPS + args.steps
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len))
    stamps: list[float] = []

    def on_step(k: int) -> None:  # after the k-th new token, k = 1 (the prompt's) .. total
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if k == WARM_STEPS:
            start()
        if k == total:
            stop()

    model.generate(ids, total, eos_token_id=[], on_step=on_step)
    return [b - a for a, b in zip(stamps[WARM_STEPS - 1:total - 1], stamps[WARM_STEPS:total], strict=True)]


def torch_profile(model, args: argparse.Namespace) -> None:
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if model.device.type == "cuda"
                                                       else [])])
    steps = profiled_steps(model, args, prof.start, prof.stop)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.self_device_time_total for e in kernels) / 1e6 / args.steps
    launches = sum(e.count for e in kernels) / args.steps
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:25]
    top_kernels = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    result = {
        "command": command(), "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None,
        "step_s": steps, "gpu_kernel_s_per_step": gpu_s, "kernel_launches_per_step": launches,
        "gpu_busy_fraction": gpu_s / (sum(steps) / len(steps)),
        "host_ops": [{"name": e.key, "count_per_step": e.count / args.steps,
                      "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps} for e in host],
        "kernels": [{"name": e.key[:120], "count_per_step": e.count / args.steps,
                     "gpu_ms_per_step": e.self_device_time_total / 1e3 / args.steps} for e in top_kernels],
    }
    (args.out / "profile_decode.json").write_text(json.dumps(result, indent=1))
    print(f"step {1e3 * sum(steps) / len(steps):.1f} ms, GPU kernels {1e3 * gpu_s:.1f} ms "
          f"({result['gpu_busy_fraction']:.0%}), {launches:.0f} launches per step")
    for row in result["host_ops"]:
        print(f"  host {row['self_cpu_ms_per_step']:8.2f} ms  x{row['count_per_step']:6.0f}  {row['name']}")
    for row in result["kernels"]:
        print(f"  gpu  {row['gpu_ms_per_step']:8.2f} ms  x{row['count_per_step']:6.0f}  {row['name']}")


def python_profile(model, args: argparse.Namespace) -> None:
    prof = cProfile.Profile()
    steps = profiled_steps(model, args, prof.enable, prof.disable)
    text = io.StringIO()
    text.write(f"{command()}\ndecode step under cProfile: {1e3 * sum(steps) / len(steps):.1f} ms\n")
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    (args.out / "host_cprofile.txt").write_text(text.getvalue())
    print(text.getvalue()[:6000])
    if model.device.type == "cuda":
        overhead = {"command": command(), "gpu": torch.cuda.get_device_name(), **launch_overhead_us()}
        (args.out / "launch_overhead.json").write_text(json.dumps(overhead, indent=1))
        print(json.dumps(overhead, indent=1))


def launch_overhead_us() -> dict[str, float]:
    """Host microseconds per launch of a small rms_norm kernel, issued several ways (no sync in between)."""
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

    kernel = "rms_norm_bf16_wbf16_vec8"
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    fn = cupy_ops._function(0, "elementwise.cu", kernel)
    args = (cupy_ops._ptr(x), cupy_ops._ptr(w), cupy_ops._ptr(out), cupy_ops._i32(1024), np.float32(1e-5))
    return {
        "tiermem_rms_norm_us": timed(lambda: cupy_ops.rms_norm_cuda(x.view(1, 1024), w, 1e-5, out=out.view(1, 1024))),
        "tiermem_launch_us": timed(lambda: cupy_ops._launch(x.device, "elementwise.cu", kernel, 1, 128, args)),
        "cupy_launch_stream_arg_us": timed(lambda: fn((1,), (128,), args, stream=stream)),
        "torch_add_us": timed(lambda: torch.add(x, x, out=out)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, prompt_len=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profiler", choices=["torch", "python"], default="torch")
    p.add_argument("--cuda-graphs", action="store_true", help="decode steps as CUDA graph replays (the kernels of a "
                   "replay are profiled one by one; its host part is the replay's launch)")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    model = load_from_reader(synthetic_store(args, args.device), args.device, None, None, dtype=torch.bfloat16,
                             max_batch_size=args.batch, max_seq_len=args.prompt_len + WARM_STEPS + args.steps,
                             kv_quant=args.kv_quant, plan=None if cuda else "auto", cuda_graphs=args.cuda_graphs)
    args.out.mkdir(parents=True, exist_ok=True)
    with model:
        (torch_profile if args.profiler == "torch" else python_profile)(model, args)


if __name__ == "__main__":
    main()
