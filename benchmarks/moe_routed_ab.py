"""Decode steps of a mixture of experts resident in HBM with and without the routed GEMV (engine.moe.routed_experts),
on one loaded model: for each batch, eager steps and CUDA graph replays, routed, not routed, then routed again (the
second routed run shows the drift of the machine between the two).

    python3 benchmarks/moe_routed_ab.py --synthetic mixtral-8x7b --batch 1,2,3 --prompt-len 512 --gen-len 32 --out DIR
    python3 benchmarks/moe_routed_ab.py ... --gpu-memory 24GiB --cpu-memory 100GiB   # the plan's placement, eager

With --gpu-memory the model is placed by the planner within the budgets (layers streamed from host RAM copy the
chosen experts on demand, and are never routed) and only eager steps run.

Not routed (engine.moe.ROUTED_EXPERTS off), a decode step of fewer picks than experts takes engine.moe.chosen_experts
in eager steps (a host sync per sparse layer) and all_experts in a capture (every expert), and all_experts runs expert
by expert (five launches each) instead of in two launches of the routed GEMV. Each run is
tiermem.bench.time_generation with the roofline of the bytes a step must read if only the chosen experts are read
(bench.chosen_experts_roofline). Writes DIR/moe_routed_ab.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from synthetic_model import command, quant_scheme

from tiermem.api import load_from_reader
from tiermem.bench import chosen_experts_roofline, time_generation
from tiermem.ceilings import measure_ceilings
from tiermem.config import parse_size
from tiermem.engine import moe
from tiermem.placement import kv_cache_bytes
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="mixtral-8x7b", help="a named MoE shape (tiermem/presets.py)")
    p.add_argument("--quant", default="int4", help="weights: int4 or int8 (the routed GEMV's)")
    p.add_argument("--batch", default="1,2,3", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-memory", default=None, help="a GPU budget: the plan's placement, eager steps only")
    p.add_argument("--cpu-memory", default=None, help="the host budget with --gpu-memory")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    budgets = dict(gpu_memory=parse_size(args.gpu_memory), cpu_memory=parse_size(args.cpu_memory), plan="auto",
                   kv_placement=None, cuda_graphs=False) if args.gpu_memory else \
        dict(gpu_memory=None, cpu_memory=None, plan=None, kv_placement="gpu", cuda_graphs=True)
    batches = [int(b) for b in args.batch.split(",")]
    ceilings = measure_ceilings("cuda")
    store = SyntheticStore(preset(args.synthetic), quant_scheme(args), torch.bfloat16, "cuda")
    runs = []
    gpu, cpu = budgets.pop("gpu_memory"), budgets.pop("cpu_memory")
    with load_from_reader(store, "cuda", gpu, cpu, dtype=torch.bfloat16, max_batch_size=max(batches),
                          max_seq_len=args.prompt_len + args.gen_len, kv_quant=None, offload_dir=None,
                          **budgets) as model:
        info = model.info()
        kv_per_token = kv_cache_bytes(model.config, 1, 1, model.dtype, model.kv_quant)
        time_generation(model, 1, 1, 8, 3)  # warm-up: kernels, allocator
        for graphs in (False, True) if model.cuda_graphs else (False,):
            model.cuda_graphs = graphs
            for batch in batches:
                for routed in (True, False, True):
                    moe.ROUTED_EXPERTS = routed
                    model._graphs = None  # a graph kept from the run before replays its own choice of path
                    run = time_generation(model, batch, 1, args.prompt_len, args.gen_len)
                    kv = kv_per_token * batch * (args.prompt_len + args.gen_len / 2)  # read by a step's attention
                    over_pcie = model._offloads_kv() and not model.cpu_attention
                    run.update(chosen_experts_roofline(model, info, ceilings, run, kv_read_bytes=kv if over_pcie else 0,
                                                       kv_hbm_bytes=kv if model.kv_placement == "gpu" else 0))
                    if run["peak_gpu_bytes"] is not None and info.get("gpu_budget_bytes"):
                        run["within_gpu_budget"] = run["peak_gpu_bytes"] <= info["gpu_budget_bytes"]
                    runs.append({"cuda_graphs": graphs, "routed": routed, **run})
                    print(f"batch {batch}, {'graphs' if graphs else 'eager'}, {'routed' if routed else 'not routed'}: "
                          f"decode step median {run['decode_step_median_s'] * 1e3:.2f} ms, "
                          f"{run.get('fraction_of_chosen_experts_roofline', float('nan')):.3f} of the chosen "
                          f"experts' roofline ({run.get('chosen_experts_roofline_step_s', float('nan')) * 1e3:.2f} ms)")
        moe.ROUTED_EXPERTS = True
    result = {"command": command(), "gpu": torch.cuda.get_device_name(), "host": platform.node(),
              "torch": torch.__version__,
              "ceilings": ceilings, "model": args.synthetic, "quant": args.quant, "placement": info, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_routed_ab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
