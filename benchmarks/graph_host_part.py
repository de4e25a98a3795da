"""The host's part of a decode step replayed as a CUDA graph, and where its time goes.

A random-weight model (--synthetic, int4 weights by default, generated on the GPU), every block in HBM but the
embedding, the KV cache in HBM, batch B x T, steps replayed as CUDA graphs. One generation is timed
(tiermem.bench.time_generation: each step to a device sync); a step's host part is the time from the last step's
sync until the host has issued the step and its sampling (the GPU idles meanwhile: it replays only once the host
launches it). A second generation profiles the host's work over steady steps (cProfile, functions by own time),
so that the profiler's cost stays out of the timed one. Meant to be run on two versions of tiermem, alternating,
in one device call:

    python3 benchmarks/graph_host_part.py --kv-quant int4 --out host_part.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics

import torch
from synthetic_model import add_model_arguments, command, synthetic_store

import tiermem
from tiermem.api import load_from_reader
from tiermem.bench import time_generation

WARM_STEPS = 3  # decode steps left out: the span's first static step (run, then captured) and two replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, prompt_len=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    profiler = cProfile.Profile()

    def profiled(k: int) -> None:
        if k == WARM_STEPS + 2:  # the prompt's token and WARM_STEPS decode steps are out
            profiler.enable()
        torch.cuda.synchronize()
        if k == args.steps:
            profiler.disable()

    with load_from_reader(synthetic_store(args, "cuda"), "cuda", None, None, dtype=torch.bfloat16,
                          max_batch_size=args.batch, max_seq_len=args.prompt_len + args.steps,
                          kv_quant=args.kv_quant, plan=None, cuda_graphs=True) as model:
        assert model.info()["cuda_graphs"]
        run = time_generation(model, args.batch, 1, args.prompt_len, args.steps)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len))
        model.generate(ids, args.steps, eos_token_id=[], on_step=profiled)  # the profiler's cost stays out of `run`
    host, steps = run["decode_host_issue_s"][WARM_STEPS:], run["decode_steps_s"][WARM_STEPS:]
    profiled_steps = args.steps - WARM_STEPS - 2
    top = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: item[1][2], reverse=True)[:25]  # own time
    result = {
        "command": command(), "tiermem": tiermem.__file__, "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "batch": args.batch, "prompt_len": args.prompt_len,
        "kv_quant": args.kv_quant or "none",
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
    print(f"{result['kv_quant']} KV: host part {result['host_part_median_s'] * 1e3:.3f} ms, "
          f"step {result['step_median_s'] * 1e3:.3f} ms ({tiermem.__file__})")
    for row in result["profile_top_own_time_us_per_step"][:12]:
        print(f"  {row['own_us_per_step']:8.1f} us {row['calls_per_step']:6.1f}x  {row['function']}")


if __name__ == "__main__":
    main()
