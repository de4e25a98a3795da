"""`tiermem bench`: decode speed against the roofline of the link the streamed bytes cross.

Measures, in one run: the link ceilings (pinned host -> HBM, HBM copy), then for each batch size
the prefill and decode step times of the model, then (after the timed runs, which they could perturb) the
disk's read ceilings where blocks or the KV cache are on disk, and reports tok/s and achieved / roofline, where
roofline step time = max(bytes streamed per step / pinned H2D bandwidth, (weight bytes + the KV cache's bytes where
it is in HBM) / HBM bandwidth, disk bytes / the disk's read rate); on the GPU the streamed bytes are those the decode
steps copied (a sparse layer's unchosen experts stay in host RAM), and a MoE run also gets the roofline of the bytes
its tokens' chosen experts hold (tiermem.moe_traffic).
Results go to JSON; a PNG plot of tok/s against batch size with the roofline is drawn when asked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from tiermem.ceilings import backend_disk_read, best_disk_read, drop_page_cache
from tiermem.config import parse_size
from tiermem.errors import ConfigError
from tiermem.placement import kv_cache_bytes
from tiermem.storage.page_cache import cached_fraction, evict

PAGE_CACHED_WARN = 0.05  # more of the disk tier's blocks in the page cache after a run: it did not read the disk
ROOFLINE_BEATEN = 1.05  # a step this much faster than its roofline: a ceiling measured low, or bytes not moved


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", help="a block store; or use --synthetic")
    p.add_argument("--synthetic", metavar="SHAPE", help="random weights of a named shape (e.g. opt-30b, llama-13b)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none", help="for --synthetic")
    p.add_argument("--write-store", metavar="DIR", default=None,
                   help="with --synthetic: write the random model to a store on disk (once) and bench that store")
    p.add_argument("--group-size", type=int, default=64, help="for --synthetic quantization")
    p.add_argument("--whole-experts", action="store_true",
                   help="copy streamed sparse layers whole, every expert, to compare with copying the chosen ones")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default=None, help="compute dtype")
    p.add_argument("--batch", default="1", help="comma-separated effective batch sizes, e.g. 1,8,32")
    p.add_argument("--micro-batches", default=None,
                   help="micro-batches per batch (one value or one per batch; default: the plan's)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpu-memory", default=None, help="hard GPU budget, e.g. 6GiB")
    p.add_argument("--cpu-memory", default=None, help="hard host budget")
    p.add_argument("--resident-weights", default=None, help="cap on HBM-resident weight bytes (0 = stream all)")
    p.add_argument("--lookahead", type=int, default=None, help="streamed blocks in flight (default: the plan's)")
    p.add_argument("--kv-placement", choices=["gpu", "cpu", "disk"], default=None,
                   help="fix where the KV cache lives (default: the plan's; disk needs --offload-dir)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="a directory the KV cache may live in (a file per generation): the plan may put it there")
    p.add_argument("--kv-quant", choices=["int8", "int4", "auto"], default=None,
                   help="store the KV cache quantized; auto: the planner chooses (tiermem.load's kv_quant)")
    p.add_argument("--cpu-attention", action="store_true", default=None,
                   help="KV cache in host RAM and attention computed there (FlexGen's cpu_cache_compute)")
    add_cuda_graphs_flags(p, "require decode steps as CUDA graph replays (every block in HBM, KV on the GPU); "
                             "default: where the placement allows and the plan predicts them no slower",
                          "decode steps as they are, never as CUDA graph replays")
    p.add_argument("--io-threads", type=int, default=4, help="reader threads of the disk tier")
    p.add_argument("--read-backend", choices=["auto", "posix", "kvikio"], default="auto",
                   help="how blocks on the disk tier are read (auto: the faster by a cached probe)")
    p.add_argument("--plan", default="auto", metavar="auto|greedy|FILE",
                   help="auto: the planner's placement (default); greedy: HBM in execution order as far as it "
                   "fits; FILE: a placement written by `tiermem plan --json FILE`")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--plot", default=None, help="draw tok/s vs batch (PNG) here")


def add_cuda_graphs_flags(p: argparse.ArgumentParser, on_help: str, off_help: str) -> None:
    """--cuda-graphs / --no-cuda-graphs into args.cuda_graphs: True, False, or "auto" (load's cuda_graphs) without
    either."""
    graphs = p.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_const", const=True, default="auto",
                        help=on_help)
    graphs.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, help=off_help)


def run_bench_cli(args: argparse.Namespace) -> dict:
    if (args.store is None) == (args.synthetic is None):
        raise ConfigError("give either a STORE or --synthetic SHAPE")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot draws with matplotlib, which is not installed: pip install 'tiermem[plot]', "
                          "or leave out --plot")
    if args.prompt_len < 1 or args.gen_len < 2:
        raise ConfigError(f"bench needs --prompt-len >= 1 and --gen-len >= 2 (a prefill and at least one timed "
                          f"decode step), got {args.prompt_len} and {args.gen_len}")
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            _check_writable(option, Path(path))
    result = run_bench(args)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return result


def _check_writable(option: str, path: Path) -> None:
    """ConfigError now, rather than after the whole run, where `path` cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create its directory ({exc.strerror})") from exc
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {path} cannot be written: choose a writable file path")


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes positive integers separated by commas (e.g. 1,8,32), got {text!r}")
    return values


def _batches(args: argparse.Namespace) -> list[tuple[int, int]]:
    batches = _positive_ints(args.batch, "--batch")
    if args.micro_batches is None:
        return [(b, None) for b in batches]
    micro = _positive_ints(args.micro_batches, "--micro-batches")
    if len(micro) == 1:
        micro = micro * len(batches)
    if len(micro) != len(batches):
        raise ConfigError("--micro-batches takes one value or one per --batch value")
    return list(zip(batches, micro, strict=True))


def _open_model(args: argparse.Namespace, max_batch: int, max_micro: int | None, planned: dict | None):
    from tiermem.api import load_from_reader
    from tiermem.storage.format import StoreReader

    reader = StoreReader(args.store) if args.store else _synthetic_source(args)
    return load_from_reader(
        reader, args.device, parse_size(args.gpu_memory), parse_size(args.cpu_memory),
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_batch_size=max_batch, max_seq_len=args.prompt_len + args.gen_len, micro_batches=max_micro,
        lookahead=args.lookahead, io_threads=args.io_threads, resident_weights=parse_size(args.resident_weights),
        read_backend=args.read_backend, progress=True, plan=_plan(args, planned),
        kv_placement="cpu" if args.cpu_attention else args.kv_placement, kv_quant=_kv_quant(args, planned),
        cpu_attention=args.cpu_attention, offload_dir=args.offload_dir, cuda_graphs=_cuda_graphs(args, planned))


def _plan_file(args: argparse.Namespace) -> dict | None:
    """The JSON of --plan FILE, read once (planner.read_plan_file); None for --plan auto or greedy."""
    from tiermem.planner import read_plan_file

    return None if args.plan in ("auto", "greedy") else read_plan_file(args.plan)


def _plan(args: argparse.Namespace, planned: dict | None):
    """--plan as load() takes it: "auto", None (greedy) or the Plan of its file's JSON `planned`."""
    from tiermem.planner import Plan

    if planned is None:
        return None if args.plan == "greedy" else "auto"
    return Plan.from_dict(planned["plan"])


def _kv_quant(args: argparse.Namespace, planned: dict | None) -> str | None:
    """--kv-quant, or where it is left out and --plan is a file of `tiermem plan --json` (its JSON `planned`), the
    KV precision that plan was made for (a plan made for an int4 cache does not fit the budgets with a bf16 one)."""
    made_for = planned.get("kv_quant") if planned is not None else None
    if args.kv_quant is not None and made_for is not None and args.kv_quant != made_for:
        raise ConfigError(f"--kv-quant {args.kv_quant}, but the plan in {args.plan} was made for an {made_for} KV "
                          "cache: leave --kv-quant out to follow it")
    return args.kv_quant or made_for


def _cuda_graphs(args: argparse.Namespace, planned: dict | None) -> bool | str:
    """--cuda-graphs / --no-cuda-graphs, or where both are left out and --plan is a file of `tiermem plan --json`
    (its JSON `planned`), whether that plan was made for graph replays (its predicted step is for the one kind of
    step); else "auto"."""
    if args.cuda_graphs != "auto" or planned is None:
        return args.cuda_graphs
    made_for = planned.get("cuda_graphs")  # None: not considered where it was made
    return "auto" if made_for is None else made_for


def _synthetic_source(args: argparse.Namespace):
    """A SyntheticStore in memory, or (with --write-store) a StoreReader over one written to disk once."""
    from tiermem.engine.config import model_config_from_hf
    from tiermem.kernels.quant import QuantScheme
    from tiermem.presets import preset
    from tiermem.storage.format import StoreReader
    from tiermem.synthetic import SyntheticStore, write_synthetic_store

    config = preset(args.synthetic)
    quant = QuantScheme.from_name(None if args.quant == "none" else args.quant, args.group_size)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float16 if config.get("torch_dtype") == "float16" else torch.bfloat16)
    gen_device = args.device if torch.cuda.is_available() else "cpu"
    if args.write_store is None:
        return SyntheticStore(config, quant, dtype, device=gen_device)
    if not (Path(args.write_store) / "manifest.json").is_file():
        write_synthetic_store(config, args.write_store, quant, dtype, device=gen_device)
    reader = StoreReader(args.write_store)  # a store written by an earlier run is reused if it is this one
    if model_config_from_hf(reader.model_config) != model_config_from_hf(config) or reader.quant != quant:
        held = "dense" if reader.quant is None else reader.quant.name
        raise ConfigError(f"--write-store {args.write_store} holds another model ({held}, not --synthetic "
                          f"{args.synthetic} --quant {args.quant}); remove it or choose another directory")
    return reader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_steal_ticks() -> tuple[int, int] | None:
    """(steal, busy) clock ticks of all CPUs so far, from /proc/stat (None where there is none): steal is the time a
    virtual machine's CPUs were ready to run but its host ran something else; busy is every tick but idle and I/O
    wait, steal included (over busy ticks, one stalled thread among many idle CPUs still shows)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    fields += [0] * (8 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return steal, user + nice + system + irq + softirq + steal


def gpu_sm_clock_mhz(device: torch.device) -> int | None:
    """The GPU's SM clock over its last sample period (up to 1 s, through NVML: torch.cuda.clock_rate), None
    without CUDA or NVML: a GPU that lowered its clock stretches kernels that otherwise hide behind the host."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # no NVML bindings (pynvml) here: the figure is only informative
        return None


def time_generation(model, batch: int, micro_batches: int | None, prompt_len: int, gen_len: int,
                    drop_cache_after_prompt: bool = False) -> dict:
    """Prefill + gen_len - 1 decode steps, each timed to a device sync; returns per-step seconds, and for each decode
    step the seconds until the host had issued it (before the sync: a step whose issue takes as long as the step is
    host-bound), the share of the machine's busy CPU time stolen by the VM's host while the decode steps ran, the
    GPU's SM clock right after them, and on the GPU the weight bytes each decode step copied host -> HBM (fewer than
    its streamed blocks hold where tiermem.gpu_tier leaves unchosen experts in host RAM).
    drop_cache_after_prompt: write back and drop the page cache after the prompt (inside its time), so that decode
    steps read a KV cache on disk from the disk, not from the pages the prompt just wrote."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    stamps: list[float] = []
    issued: list[float] = []
    weights = getattr(model.source, "weights", None)
    copied: list[int] = []  # GpuWeights.h2d_bytes after each step
    steal: list[tuple[int, int] | None] = []
    dropped: list[bool] = []

    def on_step(k: int) -> None:
        issued.append(time.perf_counter())
        _sync(model.device)
        if hasattr(weights, "h2d_bytes"):
            copied.append(weights.h2d_bytes)
        if k == 1 and drop_cache_after_prompt:
            dropped.append(drop_page_cache())
        stamps.append(time.perf_counter())
        if k == 1:
            steal.append(cpu_steal_ticks())

    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    _sync(model.device)
    start = time.perf_counter()
    model.generate(ids, gen_len, eos_token_id=[], micro_batches=micro_batches, on_step=on_step)
    end_ticks = cpu_steal_ticks()
    clock = gpu_sm_clock_mhz(model.device)
    steps = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    decode = steps[1:]
    decode_issue = [i - a for a, i in zip(stamps[:-1], issued[1:], strict=True)]
    stolen = None
    if steal and steal[0] is not None and end_ticks is not None and end_ticks[1] > steal[0][1]:
        stolen = (end_ticks[0] - steal[0][0]) / (end_ticks[1] - steal[0][1])
    return {
        "batch": batch, "micro_batches": micro_batches or model.micro_batches,
        "prefill_micro_batches": micro_batches or model.prefill_micro_batches, "prompt_len": prompt_len,
        "gen_len": gen_len,
        "prefill_s": steps[0], "decode_step_s": statistics.mean(decode),
        "decode_step_median_s": statistics.median(decode), "decode_steps_s": decode,
        "decode_host_issue_s": decode_issue, "decode_cpu_steal_of_busy": stolen, "gpu_sm_clock_mhz_after": clock,
        "decode_tok_per_s": batch / statistics.mean(decode),
        "total_s": stamps[-1] - start, "tok_per_s_incl_prefill": batch * gen_len / (stamps[-1] - start),
        **({"h2d_weight_bytes_per_step": statistics.mean(b - a for a, b in zip(copied, copied[1:], strict=False))}
           if len(copied) > 1 else {}),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None,
        **({"page_cache_dropped_after_prompt": dropped[0]} if dropped else {}),
    }


def run_bench(args: argparse.Namespace) -> dict:
    from tiermem.ceilings import measure_ceilings

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench runs on --device cuda by default, and CUDA is not available here: pass --device cpu")
    plan = _batches(args)
    planned = _plan_file(args)
    _plan(args, planned)  # a bad plan file fails here, before the ceilings and the model
    ceilings = measure_ceilings(str(device)) if device.type == "cuda" else {}
    load_start = time.perf_counter()
    model = _open_model(args, max(b for b, _ in plan), max((m for _, m in plan if m), default=None), planned)
    load_s = time.perf_counter() - load_start
    if args.whole_experts and hasattr(getattr(model.source, "weights", None), "experts_on_demand"):
        model.source.weights.experts_on_demand = False
    info = model.info()
    kv_per_token = kv_cache_bytes(model.config, 1, 1, model.dtype, model.kv_quant)  # all layers, K and V
    runs = []
    try:
        time_generation(model, 1, 1, min(args.prompt_len, 8), min(args.gen_len, 3))  # warm-up: kernels, allocator
        for batch, micro in plan:
            # each run cold: writing the store, the warm-up or a buffered reader may have left disk blocks cached
            evict(disk_tier_files(model))
            runs.append(time_generation(model, batch, micro, args.prompt_len, args.gen_len,
                                        drop_cache_after_prompt=model.kv_placement == "disk"))
            runs[-1].update(disk_tier_page_cache(model))
        workloads = {run["batch"]: same_run_workload(model, run["batch"], args.prompt_len, args.gen_len)
                     for run in runs}  # before the disk's ceilings, which slow the disk KV tier's reads after them
        ceilings.update(after_run_ceilings(model, info))
        for run in runs:
            batch = run["batch"]
            offloaded = model._offloads_kv() and not model.cpu_attention  # attention on the GPU reads KV over PCIe
            kv_read = kv_per_token * batch * (args.prompt_len + args.gen_len / 2) if offloaded else 0
            kv_disk = kv_read + kv_per_token * batch if model.kv_placement == "disk" else 0  # + new slots written
            in_hbm = model.kv_placement == "gpu"
            kv_hbm = kv_per_token * batch * (args.prompt_len + args.gen_len / 2) if in_hbm else 0
            moved = dict(info, streamed_bytes_per_step=run.get("h2d_weight_bytes_per_step",
                                                               info.get("streamed_bytes_per_step", 0)))
            run.update(roofline(moved, ceilings, run["decode_step_s"], kv_read, kv_disk, kv_hbm))
            run.update(chosen_experts_roofline(model, info, ceilings, run, kv_read, kv_disk, kv_hbm))
            if run["peak_gpu_bytes"] is not None and info.get("gpu_budget_bytes"):
                run["within_gpu_budget"] = run["peak_gpu_bytes"] <= info["gpu_budget_bytes"]
            run.update(same_run_prediction(model, ceilings, workloads[batch], batch))
    finally:
        model.close()
    quant = model.reader.quant  # the store's (for a store, --quant only applies to --synthetic)
    return {
        "command": "tiermem bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "machine": {"gpu": ceilings.get("gpu_name"), "host": platform.node(), "torch": torch.__version__,
                    "cuda": torch.version.cuda},
        "ceilings": ceilings, "model": args.synthetic or args.store, "quant": quant.name if quant else "none",
        "placement": info, "load_s": load_s, "gpu_memory": args.gpu_memory, "runs": runs,
        "experts": "whole" if args.whole_experts else "on demand",
        "plan": planned if planned is not None else args.plan,
    }


def disk_tier_page_cache(model) -> dict:
    """{"disk_blocks_page_cached_fraction": share of the disk tier's block files in the page cache right after a
    run} where blocks stream from disk and the kernel can tell (storage.page_cache.cached_bytes); {} otherwise.
    bench evicts those files before each run and the disk tier reads with O_DIRECT, so this stays near 0; a
    buffered reader would leave every block cached, and the run's disk rate would be the RAM's (session 11:
    kvikio's buffered reads, 8.5 GB/s "from" a 2 GB/s disk)."""
    files = disk_tier_files(model)
    fraction = cached_fraction(files) if files else None
    return {} if fraction is None else {"disk_blocks_page_cached_fraction": fraction}


def disk_tier_files(model) -> list[Path]:
    """The store files of the blocks `model` reads from disk every step (none where nothing streams from disk)."""
    names = getattr(getattr(model.source, "weights", None), "disk_names", ())
    return [model.reader.block_file(n) for n in sorted(names)]


def after_run_ceilings(model, info: dict) -> dict:
    """The disk's read rates, when blocks or the KV cache are on disk, measured after the timed runs: reading 3 GB of
    the store just before them slowed the disk KV tier's reads from 1.5-1.7 to 1.0-1.5 GB/s
    (benchmarks/results/disk_kv_timeline_int4_*_call9/10_h200.json). Attention on the host and the disk KV tier
    need no rate here: same_run_workload times them, before these reads."""
    from tiermem.ceilings import measure_disk_read

    if info.get("disk_blocks") or (info.get("disk_kv_file_bytes") and getattr(model.reader, "path", None)):
        return measure_disk_read(list(model.reader.path.glob("*.safetensors")))
    return {}


def same_run_workload(model, batch: int, prompt_len: int, gen_len: int):
    """The cost model's Workload of this run at `batch`, its host time, CPU attention and disk KV tier timed now
    (host_probe.timed_workload), after the timed runs; its kernels' time where they could set the followed plan's
    step (the plan's figures say so: they have a kernel term, or none was made where no GPU was, or a breakdown
    within cost_model.kernels_may_bound; a replayed step always)."""
    from tiermem.cost_model import kernels_may_bound
    from tiermem.host_probe import timed_workload

    plan = getattr(model.source, "followed_plan", None)
    figures = plan.breakdown if plan is not None else {}
    kernels = plan is not None and (not figures or bool(figures.get("kernels"))
                                    or kernels_may_bound(figures, model.cuda_graphs))
    return timed_workload(model.reader, model.config, batch, prompt_len, gen_len, model.dtype, model.kv_quant,
                          kv=model.kv_placement, cpu_attention=model.cpu_attention, device=str(model.device),
                          offload_dir=model.offload_dir, cuda_graphs=model.cuda_graphs, kernels=kernels)


def same_run_prediction(model, ceilings: dict, workload, batch: int) -> dict:
    """The cost model's step time for the followed plan at this batch, from the link rates measured in this run
    and its same_run_workload (the plan itself was predicted at load from the cached probe); {} for the greedy
    placement or the CPU."""
    from dataclasses import replace

    from tiermem.planner import Hardware, predict

    plan = getattr(model.source, "followed_plan", None)
    if plan is None or not ceilings:
        return {}
    # the rate of the reader the disk tier used; NaN when nothing was on disk (no disk ceilings measured)
    disk = backend_disk_read(ceilings, model.source.describe()["read_backend"])
    hardware = Hardware.from_ceilings(ceilings, **({} if math.isnan(disk) else {"disk_read_Bps": disk}))
    attention = dict(workload.cpu_attention_s)
    split = plan.micro_batches if batch % plan.micro_batches == 0 else 1
    at_batch = replace(plan, micro_batches=split, prefill_micro_batches=None)
    predicted = predict(at_batch, workload, hardware)
    return {"predicted_step_s_same_run_rates": predicted.predicted_step_s,
            "predicted_breakdown_same_run_s": dict(predicted.breakdown),
            "plan_breakdown_s": dict(plan.breakdown),
            "plan_hardware": probed_hardware(getattr(model.reader, "path", None)),
            **({"cpu_attention_step_s_same_run": attention} if attention else {}),
            **({"disk_kv_step_s_same_run": workload.disk_kv_s} if workload.disk_kv_s else {})}


def probed_hardware(store_dir) -> dict | None:
    """The cached probe figures the planner used at load (tiermem.probe.cache_path; the disk's rate of
    store_dir), None when there are none."""
    from dataclasses import asdict

    from tiermem.probe import cache_path, read_cache_for_store

    path = cache_path(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if path is None or not path.is_file():
        return None
    hw, measured_at = read_cache_for_store(path, store_dir)
    return {**asdict(hw), "measured_at": measured_at}


def roofline(info: dict, ceilings: dict, step_s: float, kv_read_bytes: float = 0, kv_disk_bytes: float = 0,
             kv_hbm_bytes: float = 0) -> dict:
    """Roofline step time of the placement and the achieved fraction of it.

    kv_read_bytes: KV bytes a decode step reads over PCIe (KV in host memory or on disk, attention on the GPU);
    kv_disk_bytes: KV bytes it reads from and writes to disk (KV on disk; counted where a disk rate was measured);
    kv_hbm_bytes: KV bytes it reads from HBM where the cache lives there (every filled slot, every step).
    """
    if not ceilings:
        return {}
    streamed = info.get("streamed_bytes_per_step", 0)
    weights = streamed + info.get("gpu_weight_bytes", 0)
    links = {"pcie": (streamed + kv_read_bytes) / ceilings["h2d_pinned_Bps"],
             "hbm": (weights + kv_hbm_bytes) / ceilings["hbm_Bps"]}
    disk = info.get("disk_bytes_per_step", 0) + kv_disk_bytes
    if disk and not math.isnan(best_disk_read(ceilings)):
        links["disk"] = disk / best_disk_read(ceilings)
    link = max(links, key=links.__getitem__)
    return {"roofline_step_s": links[link], "roofline_link": link, "link_seconds": links,
            "fraction_of_roofline": links[link] / step_s, "streamed_bytes_per_step": streamed,
            "kv_read_bytes_per_step": kv_read_bytes, "kv_disk_bytes_per_step": kv_disk_bytes,
            "kv_hbm_bytes_per_step": kv_hbm_bytes}


def chosen_experts_roofline(model, info: dict, ceilings: dict, run: dict, kv_read_bytes: float = 0,
                            kv_disk_bytes: float = 0, kv_hbm_bytes: float = 0) -> dict:
    """MoE models on the GPU: the roofline of the bytes the step would move if only the experts its tokens choose
    were read (tiermem.moe_traffic), and the achieved fraction of it; {} for other models."""
    from tiermem.moe_traffic import chosen_fraction, unchosen_expert_bytes

    moe, weights = model.config.moe, getattr(model.source, "weights", None)
    if moe is None or not ceilings or not hasattr(weights, "resident"):
        return {}
    names = model.reader.block_names
    saved = unchosen_expert_bytes({b: model.reader.tensor_specs(b) for b in names}, model.reader.quant, moe,
                                  run["batch"])
    streamed = [b for b in names if b not in weights.resident and b not in weights.host_only]
    fewer = dict(info, streamed_bytes_per_step=info["streamed_bytes_per_step"] - sum(saved[b] for b in streamed),
                 gpu_weight_bytes=info["gpu_weight_bytes"] - sum(saved[b] for b in weights.resident),
                 disk_bytes_per_step=info.get("disk_bytes_per_step", 0) - sum(saved[b] for b in weights.disk_names))
    limit = roofline(fewer, ceilings, run["decode_step_s"], kv_read_bytes, kv_disk_bytes, kv_hbm_bytes)
    return {"chosen_experts_roofline_step_s": limit["roofline_step_s"],
            "chosen_experts_roofline_link": limit["roofline_link"],
            "fraction_of_chosen_experts_roofline": limit["fraction_of_roofline"],
            "experts_chosen_per_sparse_layer": chosen_fraction(moe, run["batch"]) * moe.num_experts}


def format_table(result: dict) -> str:
    lines = [f"{result['model']} ({result['quant']}) on {result['machine']['gpu'] or 'cpu'}"]
    c = result["ceilings"]
    if c:
        lines.append(f"ceilings: pinned H2D {c['h2d_pinned_Bps'] / 1e9:.1f} GB/s, HBM {c['hbm_Bps'] / 1e9:.0f} GB/s")
    placement = result.get("placement", {})
    if placement.get("predicted_step_s"):
        lines.append(f"placement: planner's, predicted {placement['predicted_step_s']:.4f} s per step at the largest "
                     f"batch; KV on {placement.get('kv_placement')}, lookahead {placement.get('lookahead')}"
                     + (", steps as CUDA graph replays" if placement.get("cuda_graphs") else ""))
    lines.append(f"{'batch':>6} {'micro':>5} {'prefill s':>10} {'step s':>9} {'median s':>9} {'issued s':>9} "
                 f"{'tok/s':>9} "
                 f"{'roofline s':>11} {'fraction':>8} {'peak GPU':>10} {'predicted s':>11}")
    for r in result["runs"]:
        peak = f"{r['peak_gpu_bytes'] / 2**30:.2f} GiB" if r.get("peak_gpu_bytes") is not None else "-"
        issued = statistics.median(r["decode_host_issue_s"]) if r.get("decode_host_issue_s") else float("nan")
        median = r.get("decode_step_median_s", float("nan"))
        lines.append(f"{r['batch']:>6} {r['micro_batches']:>5} {r['prefill_s']:>10.3f} {r['decode_step_s']:>9.4f} "
                     f"{median:>9.4f} {issued:>9.4f} {r['decode_tok_per_s']:>9.2f} "
                     f"{r.get('roofline_step_s', float('nan')):>11.4f} "
                     f"{r.get('fraction_of_roofline', float('nan')):>8.3f} {peak:>10} "
                     f"{r.get('predicted_step_s_same_run_rates', float('nan')):>11.4f}")
    cached = [r["batch"] for r in result["runs"] if r.get("disk_blocks_page_cached_fraction", 0) > PAGE_CACHED_WARN]
    if cached:
        lines.append(f"WARNING: at batch {cached}, more than {PAGE_CACHED_WARN:.0%} of the disk tier's blocks were in "
                     "the page cache after the run: its steps read (some) blocks from RAM, not from the disk")
    beat = [r["batch"] for r in result["runs"] if r.get("fraction_of_roofline", 0) > ROOFLINE_BEATEN]
    if beat:
        lines.append(f"NOTE: at batch {beat} the step beat its roofline by more than {ROOFLINE_BEATEN - 1:.0%}: the "
                     "link ran faster during the run than when its ceiling was measured (this disk drifts), or some "
                     "bytes did not cross it (a cache)")
    for r in result["runs"]:
        if "chosen_experts_roofline_step_s" in r:
            lines.append(f"MoE, batch {r['batch']}: its tokens choose about {r['experts_chosen_per_sparse_layer']:.1f} "
                         "experts per sparse layer; reading only those would take "
                         f"{r['chosen_experts_roofline_step_s']:.4f} s ({r['chosen_experts_roofline_link']}), and the "
                         f"step reached {r['fraction_of_chosen_experts_roofline']:.3f} of that")
    over = [r["batch"] for r in result["runs"] if r.get("within_gpu_budget") is False]
    if over:
        budget = placement["gpu_budget_bytes"] / 2**30
        lines.append(f"WARNING: peak GPU memory went over gpu_memory ({budget:.2f} GiB) at batch {over}: the "
                     "workspace estimate missed an allocation; this run breaks the budget")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """tok/s against batch size, with the roofline's tok/s (batch / roofline step time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    batches = [r["batch"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["decode_tok_per_s"] for r in runs], "o-", label="tiermem")
    if all("roofline_step_s" in r for r in runs):
        ax.plot(batches, [r["batch"] / r["roofline_step_s"] for r in runs], "k--", label="roofline")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("effective batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"{result['model']} ({result['quant']}) on {result['machine']['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
