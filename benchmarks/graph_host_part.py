"""The host's part of a decode step replayed as a CUDA graph, and where its time goes.

llama3-8b int4 weights (random, generated on the GPU), every block in HBM but the embedding, the KV cache in HBM,
batch B x T, steps replayed as CUDA graphs. Each decode step is timed to a device sync (as bench times it); its
host part is the time from the last step's sync until the host has issued the step and its sampling (the GPU
idles meanwhile: it replays only once the host launches it). A second generation of the same prompt profiles the
host's work over steady steps (cProfile, functions by own time), so that the profiler's cost stays out of the
timed one. Meant to be run on two versions of tiermem, alternating, in one device call:

    python3 benchmarks/graph_host_part.py --kv-quant none --out host_part.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch

import tiermem
from tiermem.api import load_from_reader
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore

WARM_STEPS = 4  # the prompt, the span's first static step (run, then captured) and two replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kv-quant", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    hf = preset(args.model)
    store = SyntheticStore(hf, QuantScheme.from_name("int4", 128), torch.bfloat16, "cuda")
    kv_quant = None if args.kv_quant == "none" else args.kv_quant
    ids = torch.randint(3, hf["vocab_size"], (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    issued: list[float] = []
    stamps: list[float] = []
    profiler = cProfile.Profile()

    def timed(k: int) -> None:
        issued.append(time.perf_counter())
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def profiled(k: int) -> None:
        if k == WARM_STEPS + 1:
            profiler.enable()
        torch.cuda.synchronize()
        if k == args.steps:
            profiler.disable()

    with load_from_reader(store, "cuda", None, None, dtype=torch.bfloat16, max_batch_size=args.batch,
                          max_seq_len=args.prompt_len + args.steps, kv_quant=kv_quant, plan=None,
                          cuda_graphs=True) as model:
        assert model.info()["cuda_graphs"]
        model.generate(ids, args.steps, eos_token_id=[], on_step=timed)
        model.generate(ids, args.steps, eos_token_id=[], on_step=profiled)  # the profiler's cost stays out of timed
    host = [i - s for s, i in zip(stamps[WARM_STEPS - 1:-1], issued[WARM_STEPS:], strict=True)]
    steps = [b - a for a, b in zip(stamps[WARM_STEPS - 1:-1], stamps[WARM_STEPS:], strict=True)]
    stats = pstats.Stats(profiler)
    profiled_steps = args.steps - WARM_STEPS - 1
    top = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:25]  # by own time
    result = {
        "command": "python3 benchmarks/graph_host_part.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "tiermem": tiermem.__file__,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch, "prompt_len": args.prompt_len, "kv_quant": args.kv_quant,
        "host_part_median_s": statistics.median(host), "host_part_s": host,
        "step_median_s": statistics.median(steps), "steps_s": steps,
        "profiled_steps": profiled_steps, "profiled": "a second generation, after the timed one",
        "profile_top_own_time_us_per_step": [
            {"function": f"{path.rsplit('/', 2)[-1] if '/' in path else path}:{line}:{name}",
             "calls_per_step": calls / profiled_steps, "own_us_per_step": own / profiled_steps * 1e6,
             "cumulative_us_per_step": cumulative / profiled_steps * 1e6}
            for (path, line, name), (_, calls, own, cumulative, _) in top],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.kv_quant} KV: host part {result['host_part_median_s'] * 1e3:.3f} ms, "
          f"step {result['step_median_s'] * 1e3:.3f} ms ({tiermem.__file__})")
    for row in result["profile_top_own_time_us_per_step"][:12]:
        print(f"  {row['own_us_per_step']:8.1f} us {row['calls_per_step']:6.1f}x  {row['function']}")


if __name__ == "__main__":
    main()
