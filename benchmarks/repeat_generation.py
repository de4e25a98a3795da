"""Prefill and decode of the same generation run several times on one loaded model (KV cache in HBM, in host RAM
or on disk).

    python3 benchmarks/repeat_generation.py --synthetic llama3-8b --quant int4 --kv-placement cpu --batch 16 \
        --prompt-len 2048 --repeats 3 --out DIR

With the KV cache in host RAM, the first generation registers its pinned memory with CUDA (1.3-1.7 s for 4.3 GB on
the GPU machine); later ones take it back from the model's pool. In HBM, decode steps are CUDA graph replays where
load's cuda_graphs="auto" makes them so, and later generations replay the first one's graph (Model.generate keeps
it) instead of running and capturing their span's first step. Writes DIR/repeat_generation.json with every
generation's timings (tiermem.bench.time_generation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from synthetic_model import add_model_arguments, command, synthetic_store

from tiermem.api import load_from_reader
from tiermem.bench import time_generation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, prompt_len=2048)
    p.add_argument("--kv-placement", choices=["gpu", "cpu", "disk"], default="cpu")
    p.add_argument("--offload-dir", default=None, help="where a disk KV cache keeps its file")
    p.add_argument("--gen-len", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    with load_from_reader(synthetic_store(args, "cuda"), "cuda", None, None, dtype=torch.bfloat16,
                          max_batch_size=args.batch, max_seq_len=args.prompt_len + args.gen_len,
                          kv_quant=args.kv_quant, plan=None, kv_placement=args.kv_placement,
                          offload_dir=args.offload_dir, cuda_graphs="auto") as model:
        runs = [time_generation(model, args.batch, 1, args.prompt_len, args.gen_len,
                                drop_cache_after_prompt=args.kv_placement == "disk") for _ in range(args.repeats)]
        graphs = model.info()["cuda_graphs"]
    result = {"command": command(), "gpu": torch.cuda.get_device_name(), "cuda_graphs": graphs, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repeat_generation.json").write_text(json.dumps(result, indent=1))
    for k, run in enumerate(runs, 1):
        print(f"generation {k}: prefill {run['prefill_s']:.3f} s, decode step {run['decode_step_s']:.4f} s (median "
              f"{run['decode_step_median_s']:.4f}){', CUDA graphs' if graphs else ''}")


if __name__ == "__main__":
    main()
