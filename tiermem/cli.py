"""The `tiermem` command line: demo, pack, generate, info, bench, plan, checkpoint verify."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tiermem.errors import TiermemError


def _cmd_demo(args: argparse.Namespace) -> None:
    from tiermem.demo import run_demo

    run_demo(cache_dir=args.cache_dir, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
             quant=None if args.quant == "none" else args.quant, device=args.device)


def _cmd_pack(args: argparse.Namespace) -> None:
    from tiermem.api import pack

    pack(args.src, args.dst, quant=None if args.quant == "none" else args.quant,
         group_size=args.group_size, overwrite=args.overwrite)
    print(f"packed {args.src} -> {args.dst}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from tiermem.api import load
    from tiermem.errors import ConfigError

    if not args.temperature >= 0:  # NaN too
        raise ConfigError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise TiermemError("no prompt given: pass --prompt TEXT (repeatable) or pipe lines on stdin")
    with load(args.store, device=args.device, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
              max_batch_size=len(prompts), max_seq_len=args.max_seq_len) as m:
        start = time.perf_counter()
        texts, new_tokens = m.generate_text(
            prompts, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            progress=not args.quiet)
        elapsed = time.perf_counter() - start
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"{prompt}{text}")
    print(f"[{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tok/s]", file=sys.stderr)


def _cmd_info(args: argparse.Namespace) -> None:
    from tiermem.api import store_info

    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:>18}: {value}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from tiermem.bench import run_bench_cli

    run_bench_cli(args)


def _cmd_plan(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from tiermem.config import parse_size
    from tiermem.engine.config import model_config_from_hf
    from tiermem.errors import ConfigError, NotResidentError
    from tiermem.host_probe import timed_workload, with_kernel_time
    from tiermem.kernels.kv_quant import auto_kv_schemes, kv_scheme
    from tiermem.placement import graphable, plan_timing_kernels, with_graph_replays
    from tiermem.planner import Hardware, choose_kv_quant, cpu_attention_choice, each_that_fits, plan
    from tiermem.probe import cached_hardware, read_cache

    if (args.store is None) == (args.synthetic is None):
        raise ConfigError("give either a STORE or --synthetic SHAPE")
    if args.kv == "disk" and args.offload_dir is None:
        raise ConfigError("--kv disk keeps the KV cache in a file: pass --offload-dir DIR")
    if args.hardware and args.refresh_probe:
        raise ConfigError("--refresh-probe measures this machine; --hardware reads figures from a file: pass one")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    reader = _plan_reader(args, dtype)
    cfg = model_config_from_hf(reader.model_config)
    gpu_memory, cpu_memory = parse_size(args.gpu_memory), parse_size(args.cpu_memory)
    disk_kv = args.offload_dir is not None

    if args.hardware:
        hardware, source = read_cache(args.hardware)[0], args.hardware
    else:
        hardware = cached_hardware(store_dir=args.store, refresh=args.refresh_probe)
        source = "measured now" if args.refresh_probe else "this machine's probe (--refresh-probe measures again)"

    def plan_with(kv_quant, graphs: bool = False):
        """(plan, hardware, where the rates came from, workload) with the KV cache stored in kv_quant, for decode
        steps as CUDA graph replays if `graphs` (the KV cache on the GPU, whole-batch steps); BudgetError where
        nothing fits the budgets (or the offload dir)."""
        cpu_attention = False if graphs else cpu_attention_choice(None, kv_quant is not None)
        kv, micro_batches = ("gpu", 1) if graphs else (args.kv, args.micro_batches)
        workload = timed_workload(reader, cfg, args.batch, args.prompt_len, args.gen_len, dtype, kv_quant, kv=kv,
                                  cpu_attention=cpu_attention, offload_dir=None if graphs else args.offload_dir,
                                  budgets=(gpu_memory, cpu_memory), cuda_graphs=graphs, kernels=False)

        def planned(w, hw: Hardware):
            return plan(w, hw, gpu_memory, cpu_memory, kv=kv, cpu_cache_compute=cpu_attention,
                        micro_batches=micro_batches, lookahead=args.lookahead, disk_kv=disk_kv and not graphs)

        def time_kernels(w):  # as load does: where the kernels could set the step
            return with_kernel_time(w, reader, dtype, kv_quant, "cuda", (gpu_memory, cpu_memory))

        if disk_kv and not graphs:
            from tiermem.scratch_file import check_offload_dir

            check_offload_dir(args.offload_dir, workload.kv_reserved_bytes)
        store_dir = None if args.hardware else args.store  # with --hardware the file's figures, no store measured
        chosen, used, workload = plan_timing_kernels(planned, workload, hardware, store_dir, time_kernels, graphs)
        note = "; the disk's on the store measured again: the plan reads from it every step"
        return chosen, used, source + (note if used is not hardware else ""), workload

    schemes = auto_kv_schemes(cfg.head_dim) if args.kv_quant == "auto" else (kv_scheme(args.kv_quant, cfg.head_dim),)

    def best(graphs: bool):
        """(scheme, plan_with's answer, every scheme's answer) of the KV precision --kv-quant leaves to choose."""
        options = each_that_fits(schemes, lambda scheme: plan_with(scheme, graphs))
        pick = choose_kv_quant([o and o[0] for o in options]) if len(schemes) > 1 else 0
        if options[pick] is None:
            plan_with(schemes[0], graphs)  # nothing fits: its BudgetError says why
        return schemes[pick], options[pick], options

    if args.cuda_graphs is True:
        _check_plan_graph_options(args)
    answers = {}

    def plan_for(graphs: bool):
        answers[graphs] = best(graphs)
        return answers[graphs]

    # graph replays are considered only where CUDA is here to time them; the JSON records None where they were not
    mode = args.cuda_graphs if args.cuda_graphs != "auto" or torch.cuda.is_available() else False
    (kv_quant, (chosen, hardware, source, workload), options), graphs = with_graph_replays(
        plan_for, mode, lambda answer: answer[1][0], lambda answer: schemes.index(answer[0]))
    if graphs and not graphable(chosen):
        raise NotResidentError(f"--cuda-graphs needs every block and the KV cache in HBM; this plan streams "
                               f"{len(chosen.host_blocks) + len(chosen.disk_blocks)} blocks within gpu_memory "
                               f"{args.gpu_memory}: raise it, or leave --cuda-graphs out")
    if not graphs and mode != args.cuda_graphs:
        graphs = None
    _print_plan(args, chosen, hardware, source, workload)
    if graphs:
        print("decode steps as CUDA graph replays (load's cuda_graphs='auto' makes the same choice; "
              "--no-cuda-graphs plans without them)")
    if args.kv_quant == "auto":
        steps = ", ".join(f"{_kv_name(sc)} {'does not fit' if o is None else f'{o[0].predicted_step_s:.4f} s'}"
                          for sc, o in zip(schemes, options, strict=True))
        print(f"KV cache stored as {_kv_name(kv_quant)}, chosen by --kv-quant auto (per step: {steps})")
    if args.alternatives and False not in answers:
        print("no alternatives with --cuda-graphs: they place blocks or the KV cache where graph replays cannot run")
    elif args.alternatives:
        from tiermem.planner import alternatives

        eager_kv, (_, eager_hardware, _, eager_workload), _ = answers[False]
        print("the best plan with one choice fixed, decode steps issued from Python (predicted s per step, tok/s):")
        for name, alt in alternatives(eager_workload, eager_hardware, gpu_memory, cpu_memory,
                                      cpu_cache_compute=cpu_attention_choice(None, eager_kv is not None),
                                      disk_kv=disk_kv):
            figures = "does not fit" if alt is None else f"{alt.predicted_step_s:.4f} s, {alt.predicted_tok_per_s:.2f}"
            print(f"  {name:<32} {figures}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": json.loads(hardware.to_json()), "plan": {
            k: v for k, v in vars(chosen).items()}, "batch": args.batch, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "kv_quant": None if kv_quant is None else kv_quant.name,
            "cuda_graphs": graphs}, indent=1))


def _check_plan_graph_options(args: argparse.Namespace) -> None:
    """ConfigError for `tiermem plan --cuda-graphs` with choices graph replays cannot make."""
    from tiermem.errors import ConfigError
    from tiermem.placement import graph_options_allowed

    if not graph_options_allowed(args.kv, None, args.micro_batches):
        raise ConfigError("--cuda-graphs plans whole-batch decode steps over a KV cache on the GPU: leave --kv "
                          f"({args.kv!r}) and --micro-batches ({args.micro_batches!r}) out, or --cuda-graphs")


def _plan_reader(args: argparse.Namespace, dtype):
    """What `tiermem plan` plans for: the block sizes of --synthetic SHAPE (nothing generated), or of STORE."""
    import torch

    if args.synthetic:
        from tiermem.kernels.quant import QuantScheme
        from tiermem.presets import preset
        from tiermem.synthetic import SyntheticStore

        config = preset(args.synthetic)
        quant = QuantScheme.from_name(None if args.quant == "none" else args.quant, args.group_size)
        store_dtype = dtype or (torch.float16 if config.get("torch_dtype") == "float16" else torch.bfloat16)
        return SyntheticStore(config, quant, store_dtype)
    from tiermem.storage.format import StoreReader

    return StoreReader(args.store)


def _print_plan(args: argparse.Namespace, chosen, hardware, source: str, workload) -> None:
    """The plan, the rates and timings it was made from, and its predicted decode step."""
    from tiermem.cost_model import DEFAULT_LAYER_OVERHEAD_S

    print(f"{args.synthetic or args.store}: batch {args.batch}, prompt {args.prompt_len}, gen {args.gen_len}"
          f"{f' on {hardware.name}' if hardware.name else ''}")
    print(f"rates ({source}): disk {hardware.disk_read_Bps / 1e9:.2f} GB/s, PCIe {hardware.h2d_Bps / 1e9:.1f} GB/s, "
          f"HBM {hardware.hbm_Bps / 1e9:.0f} GB/s, matmul {hardware.matmul_flops / 1e12:.0f} TFLOP/s, host copy "
          f"{hardware.cpu_memcpy_Bps / 1e9:.1f} GB/s")
    if workload.disk_kv_s:
        print(f"disk KV cache I/O, timed in {args.offload_dir}: {workload.disk_kv_s:.4f} s per decode step")
    print("\n".join(chosen.describe()))
    if workload.moe is not None and chosen.host_blocks:
        share = workload.host_stream_share(chosen.micro_batches)
        how = ("only the experts its tokens choose" if share < 1 else
               "every expert (its picks cover them, or the step is split)")
        moe = workload.moe
        print(f"experts: {moe.top_k} of {moe.num_experts} per token; a decode step copies {how} of the sparse layers "
              f"in pinned host memory: {share:.0%} of their bytes with even routing")
    if workload.moe is not None and chosen.gpu_blocks:
        _print_expert_reads(workload, -(-args.batch // chosen.micro_batches))
    if not workload.host_step_s:
        print(f"host time not measured (no CUDA here): {DEFAULT_LAYER_OVERHEAD_S * 1e6:.0f} us per layer and "
              "micro-batch assumed; a decode step issued from Python took 15-40 ms for 32 resident layers on an "
              "H200 machine, so a host-bound prediction made here is optimistic")
    print(f"predicted: {chosen.predicted_step_s:.4f} s per decode step, {chosen.predicted_tok_per_s:.2f} tok/s")


def _print_expert_reads(workload, rows: int) -> None:
    """Which experts of the layers in HBM a decode micro-batch of `rows` rows reads (Workload.read_share)."""
    from tiermem.engine.moe import picks_fewer_than_experts

    moe, share = workload.moe, workload.read_share(rows)
    if workload.dense_per_stored and picks_fewer_than_experts(moe, rows):
        how = f"one expert per pick ({rows * moe.top_k} of {moe.num_experts}, the routed GEMV)"
    else:
        how = "only the experts its tokens choose" if share < 1 else "every expert"
    print(f"experts in HBM: a decode step reads {how} of the sparse layers there: {share:.0%} of their bytes with "
          "even routing")


def _kv_name(scheme) -> str:
    """A KV scheme as the CLI prints it: "int4 (group 128)", or "the compute dtype" for None."""
    return "the compute dtype" if scheme is None else f"{scheme.name} (group {scheme.group_size})"


def _cmd_checkpoint_verify(args: argparse.Namespace) -> None:
    from tiermem.checkpoint import format_report, verify

    report = verify(args.path)
    print(format_report(report))
    if not report.ok:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build a tiny random-weight Llama, pack it as int4 and generate")
    p.add_argument("--cache-dir", default=None, help="where the demo model lives (default ~/.cache/tiermem)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--quant", choices=["int4", "int8", "none"], default="int4")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pack", help="convert an HF checkpoint directory into a block store")
    p.add_argument("src", help="HF checkpoint dir (config.json + *.safetensors)")
    p.add_argument("dst", help="block store directory to create")
    p.add_argument("--quant", choices=["int4", "int8", "none"], default="none")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("generate", help="generate text from a packed store")
    p.add_argument("store")
    p.add_argument("--prompt", action="append", help="prompt (repeat for a batch); default: stdin lines")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu-memory", default=None, help="hard GPU memory budget, e.g. 24GiB")
    p.add_argument("--cpu-memory", default=None, help="hard host memory budget, e.g. 64GiB")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + new tokens to reserve KV cache for (default: the model's limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("info", help="show a store's config, sizes per block and quantization")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="measure link ceilings and decode speed against the roofline")
    from tiermem.bench import add_bench_arguments, add_cuda_graphs_flags

    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("plan", help="choose the fastest placement for budgets and print its predicted speed")
    p.add_argument("store", nargs="?", help="a block store; or use --synthetic")
    p.add_argument("--synthetic", metavar="SHAPE", help="a named model shape (e.g. opt-30b, llama-111b)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none", help="for --synthetic")
    p.add_argument("--group-size", type=int, default=64, help="for --synthetic quantization")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default=None, help="compute dtype")
    p.add_argument("--gpu-memory", required=True, help="GPU budget, e.g. 24GiB")
    p.add_argument("--cpu-memory", required=True, help="pinned host memory budget, e.g. 48GiB")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--hardware", default=None, help="Hardware JSON (default: the cached probe of this machine)")
    p.add_argument("--refresh-probe", action="store_true",
                   help="measure this machine's rates again (the disk's on STORE) instead of using the cached probe")
    p.add_argument("--kv", choices=["gpu", "cpu", "disk"], default=None, help="fix the KV cache placement")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="the KV cache may live in a file here (load with the same offload_dir); on CUDA that tier is "
                        "timed here first: up to 1 GiB written, synced and read back")
    p.add_argument("--kv-quant", choices=["int8", "int4", "auto"], default=None,
                   help="the KV cache is stored quantized (one group per head); auto: the planner chooses among the "
                        "compute dtype, int8 and int4 (a less precise one only when 5%% faster); pass the same to "
                        "load / bench")
    p.add_argument("--micro-batches", type=int, default=None, help="fix the micro-batch count")
    p.add_argument("--lookahead", type=int, default=None, help="fix the prefetch lookahead")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    add_cuda_graphs_flags(p, "plan decode steps as CUDA graph replays (every block in HBM, KV on the GPU); default: "
                             "as load does, where the plan allows them and they are predicted no slower (CUDA only)",
                          "plan decode steps as they are issued from Python")
    p.add_argument("--alternatives", action="store_true",
                   help="also print the best plan with one choice fixed (KV placement, micro-batches, lookahead)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", required=True)
    v = csub.add_parser("verify", help="check every checksum of a checkpoint and print a summary")
    v.add_argument("path")
    v.set_defaults(func=_cmd_checkpoint_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TiermemError as exc:
        print(f"tiermem: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
