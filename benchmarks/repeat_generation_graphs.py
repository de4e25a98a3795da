"""Consecutive generations of one batch with decode steps replayed as CUDA graphs: what each call's steps cost.

llama3-8b int4 weights (random, generated on the GPU), every block in HBM but the embedding, the KV cache in HBM,
`--calls` generations of batch B x T, each of `--gen-len` tokens, every step timed to a device sync (as bench times
it). A call whose graph must be captured runs the span's first step as it is and captures it; one that replays
the last call's graph does not. Meant to be run on two versions of tiermem, alternating, in one device call:

    python3 benchmarks/repeat_generation_graphs.py --out repeat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tiermem
from tiermem.api import load_from_reader
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore


def timed_call(model, ids: torch.Tensor, gen_len: int) -> dict:
    """One generation of gen_len tokens after ids [B, T], each step timed to a device sync."""
    stamps: list[float] = []

    def on_step(k: int) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, gen_len, eos_token_id=[], on_step=on_step)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]  # decode steps 2..gen_len
    return {"prefill_s": stamps[0] - start, "decode_steps_s": steps, "decode_step_mean_s": statistics.mean(steps),
            "decode_step_median_s": statistics.median(steps), "decode_s": stamps[-1] - stamps[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    hf = preset(args.model)
    store = SyntheticStore(hf, QuantScheme.from_name("int4", 128), torch.bfloat16, "cuda")
    with load_from_reader(store, "cuda", None, None, dtype=torch.bfloat16, max_batch_size=args.batch,
                          max_seq_len=args.prompt_len + args.gen_len, plan=None, cuda_graphs=True) as model:
        assert model.info()["cuda_graphs"]
        calls = [timed_call(model, torch.randint(3, hf["vocab_size"], (args.batch, args.prompt_len),
                                                 generator=torch.Generator().manual_seed(call)), args.gen_len)
                 for call in range(args.calls)]
    result = {
        "command": "python3 benchmarks/repeat_generation_graphs.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "tiermem": tiermem.__file__, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "calls": calls,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, c in enumerate(calls, 1):
        print(f"call {k}: decode {c['decode_s'] * 1e3:.1f} ms, step mean {c['decode_step_mean_s'] * 1e3:.2f} / "
              f"median {c['decode_step_median_s'] * 1e3:.2f} ms ({tiermem.__file__})")


if __name__ == "__main__":
    main()
