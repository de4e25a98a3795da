"""Where a decode step with resident weights spends its time: host (Python, launches) or GPU kernels.

    python3 benchmarks/profile_decode.py --synthetic llama3-8b --quant int4 --kv-quant int4 --batch 16 \
        --prompt-len 2048 --out DIR

Runs the prompt and a few decode steps, then profiles `--steps` decode steps (torch.profiler, CPU and CUDA).
Writes DIR/profile_decode.json: wall seconds per step, summed GPU kernel time per step, launches per step, and
the ops with the most host time and the kernels with the most GPU time; prints the two tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tiermem.api import load_from_reader
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="llama3-8b")
    p.add_argument("--quant", default="int4")
    p.add_argument("--kv-quant", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    store = SyntheticStore(preset(args.synthetic), QuantScheme.from_name(args.quant, 128), torch.bfloat16, args.device)
    warm, total = 3, 3 + args.steps
    model = load_from_reader(store, args.device, None, None, dtype=torch.bfloat16, max_batch_size=args.batch,
                             max_seq_len=args.prompt_len + total, kv_quant=args.kv_quant, plan=None if cuda else "auto")
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len))
    stamps: list[float] = []
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])

    def on_step(k: int) -> None:  # after the k-th new token, k = 1 (the prompt's) .. total
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if k == warm:
            prof.start()
        if k == total:
            prof.stop()

    model.generate(ids, total, eos_token_id=[], on_step=on_step)
    model.close()
    steps = [b - a for a, b in zip(stamps[warm - 1:total - 1], stamps[warm:total], strict=True)]
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.self_device_time_total for e in kernels) / 1e6 / args.steps
    launches = sum(e.count for e in kernels) / args.steps
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:25]
    top_kernels = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    result = {
        "command": "python3 benchmarks/profile_decode.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "gpu": torch.cuda.get_device_name() if cuda else None, "step_s": steps, "gpu_kernel_s_per_step": gpu_s,
        "kernel_launches_per_step": launches, "gpu_busy_fraction": gpu_s / (sum(steps) / len(steps)),
        "host_ops": [{"name": e.key, "count_per_step": e.count / args.steps,
                      "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps} for e in host],
        "kernels": [{"name": e.key[:120], "count_per_step": e.count / args.steps,
                     "gpu_ms_per_step": e.self_device_time_total / 1e3 / args.steps} for e in top_kernels],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.json").write_text(json.dumps(result, indent=1))
    print(f"step {1e3 * sum(steps) / len(steps):.1f} ms, GPU kernels {1e3 * gpu_s:.1f} ms "
          f"({result['gpu_busy_fraction']:.0%}), {launches:.0f} launches per step")
    for row in result["host_ops"]:
        print(f"  host {row['self_cpu_ms_per_step']:8.2f} ms  x{row['count_per_step']:6.0f}  {row['name']}")
    for row in result["kernels"]:
        print(f"  gpu  {row['gpu_ms_per_step']:8.2f} ms  x{row['count_per_step']:6.0f}  {row['name']}")


if __name__ == "__main__":
    main()
