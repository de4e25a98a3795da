"""Where a loaded model's blocks live: budgets in, weight sources out.

CPU: TieredWeights keeps what fits cpu_memory (after the KV reservation) in RAM and re-reads the
rest from the store every step. CUDA: the blocks that fit gpu_memory (after KV and workspace
reservations and the ring of slots) stay in HBM; of the others, those that fit cpu_memory live in
one pinned host arena and the rest are read from disk every step into pinned staging buffers;
both stream through the ring of HBM slots. The token embedding stays in pinned host memory: eager steps
gather its rows on the host, CUDA graph replays on the GPU through the memory mapped into its address space.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from tqdm import tqdm

from tiermem.config import PrefetchConfig, format_size
from tiermem.cost_model import Workload, kv_memory
from tiermem.disk_tier import DiskStager
from tiermem.engine.config import ModelConfig
from tiermem.errors import BudgetError, ConfigError, TiermemError
from tiermem.gpu_tier import GpuWeights, plan_gpu_residency
from tiermem.kernels.kv_quant import kv_bytes_per_vector
from tiermem.kernels.quant import QuantScheme
from tiermem.pinned import PinnedArena
from tiermem.planner import Hardware, Plan, kv_precision_prefers
from tiermem.read_backend import choose_backend, make_backend
from tiermem.residency import TieredWeights, plan_residency
from tiermem.scratch_file import check_offload_dir
from tiermem.storage.backends.posix import PosixBackend
from tiermem.storage.format import StoreReader

T = TypeVar("T")

HOST_ONLY = ("embed",)
WORKSPACE_MARGIN = 256 << 20


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype,
                   kv_quant: QuantScheme | None = None) -> int:
    """Bytes of a KV cache: layers x (K and V) x [batch, kv heads, seq, head dim].

    kv_quant: K and V stored as int8/int4 codes plus fp16 scale and zero per group of head_dim
    (tiermem.kernels.kv_quant); `dtype` is then only what attention computes in.
    """
    per_vector = cfg.head_dim * dtype.itemsize if kv_quant is None else kv_bytes_per_vector(cfg.head_dim, kv_quant)
    return cfg.num_layers * 2 * batch * cfg.num_kv_heads * seq * per_vector


def workspace_bytes(cfg: ModelConfig, batch: int, seq: int, micro_batches: int, dtype: torch.dtype,
                    quantized: bool = False, kv_quantized: bool = False, new_tokens: int | None = None) -> int:
    """Upper estimate of a step's transient activations (HBM reservation): new_tokens per row (None: a
    prefill of all `seq`; 1: a decode step) attending over `seq` slots, the batch in micro_batches.

    quantized: the weights are int4/int8; a matmul of more rows than the fused GEMV takes dequantizes
    one whole weight first, so the largest weight in the compute dtype is reserved too.
    kv_quantized: attention reads K and V dequantized: one micro-batch's K and V of one layer.
    """
    rows = math.ceil(batch / micro_batches)
    new = seq if new_tokens is None else new_tokens
    e = dtype.itemsize
    dequant = max(cfg.intermediate_size * cfg.hidden_size, cfg.vocab_size * cfg.embed_dim) * e if quantized else 0
    if kv_quantized:
        dequant += 2 * rows * cfg.num_kv_heads * seq * cfg.head_dim * e
    hidden = 2 * batch * new * cfg.hidden_size * e  # every micro-batch's hidden state, plus one new
    layer = rows * new * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * e  # qkv/attn out, MLP
    if cfg.moe is not None:  # engine.moe.chosen_experts: the fp32 sum, one expert's fp32 output and its weighting
        layer += rows * new * (12 * cfg.hidden_size + 3 * 4 * cfg.moe.num_experts)  # ... and router probabilities
        if new == 1 and quantized:  # engine.moe.all_experts' launches: every expert's gate, up and product over
            # every row, its output, that in fp32 and weighted
            layer += cfg.moe.num_experts * rows * (3 * cfg.moe.intermediate_size * e + cfg.hidden_size * (e + 8))
    scores = rows * cfg.num_heads * new * seq * 4  # attention probabilities if materialised (fp32)
    logits = 2 * batch * cfg.vocab_size * 4  # last-position logits and their fp32 copy
    return hidden + layer + scores + logits + dequant + WORKSPACE_MARGIN


class CpuSource:
    """TieredWeights plus the backend it reads with; describe() for Model.info()."""

    def __init__(self, weights: TieredWeights, backend: PosixBackend, kv_reserved: int) -> None:
        self.weights = weights
        self.backend = backend
        self.kv_reserved = kv_reserved

    def stream(self, names):
        return self.weights.stream(names)

    def describe(self) -> dict:
        return {"resident_blocks": len(self.weights.resident_blocks),
                "streamed_from_disk": len(self.weights.streamed_blocks),
                "host_bytes": self.weights.host_bytes, "kv_reserved_bytes": self.kv_reserved}

    def close(self) -> None:
        self.weights.close()
        self.backend.close()


def build_cpu_source(reader: StoreReader, cfg: ModelConfig, dtype: torch.dtype, cpu_memory: int | None,
                     max_batch: int, max_seq: int, prefetch: PrefetchConfig,
                     kv_quant: QuantScheme | None = None) -> CpuSource:
    kv = kv_cache_bytes(cfg, max_batch, max_seq, dtype, kv_quant)
    budget = None if cpu_memory is None else cpu_memory - kv
    if budget is not None and budget <= 0:
        raise BudgetError(f"cpu_memory {format_size(cpu_memory)} does not even hold the KV cache "
                          f"({format_size(kv)} for {max_batch} x {max_seq} tokens): raise cpu_memory or "
                          "lower max_batch_size / max_seq_len")
    backend = PosixBackend(threads=prefetch.io_threads)
    try:
        weights = TieredWeights(reader, budget, prefetch, backend=backend, pin=False)
    except BaseException:
        backend.close()
        raise
    return CpuSource(weights, backend, kv)


class GpuSource:
    """GpuWeights plus the pinned arena and disk backend behind it; describe() for Model.info()."""

    def __init__(self, weights: GpuWeights, arena: PinnedArena, backend, plan: dict, kv_placement: str = "gpu",
                 micro_batches: int = 1, prefill_micro_batches: int | None = None, cpu_attention: bool = False,
                 offload_dir: str | os.PathLike | None = None) -> None:
        self.weights = weights
        self.arena = arena
        self.backend = backend
        self.plan = plan
        self.kv_placement = kv_placement  # "gpu", "cpu" (generate() allocates a HostKVCache), "disk" (a DiskKVCache)
        self.offload_dir = offload_dir  # where a DiskKVCache keeps its file
        self.micro_batches = micro_batches  # generate()'s default split of a batch in decode steps
        self.prefill_micro_batches = prefill_micro_batches or micro_batches  # ... and of the prompt
        self.cpu_attention = cpu_attention  # KV in host memory and attention computed there
        self.followed_plan: Plan | None = None  # the planner's Plan this placement follows (None: greedy)
        self.kv_quant: QuantScheme | None = None  # the KV cache's scheme this placement was made for

    def stream(self, names):
        return self.weights.stream(names)

    def describe(self) -> dict:
        return dict(self.plan)

    def close(self) -> None:
        self.weights.close()
        self.backend.close()
        self.arena.close()


def build_gpu_source(
    reader: StoreReader, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, gpu_memory: int | None,
    cpu_memory: int | None, max_batch: int, max_seq: int, micro_batches: int | None, lookahead: int | None,
    io_threads: int, resident_cap: int | None, progress: bool, read_backend: str = "auto",
    kv_quant: QuantScheme | tuple[QuantScheme | None, ...] | None = None, plan: Plan | str | None = "auto",
    kv_placement: str | None = None, cpu_attention: bool | None = None,
    offload_dir: str | os.PathLike | None = None, cuda_graphs: bool | str = False,
) -> GpuSource:
    """Place blocks and the KV cache in HBM / pinned host memory / disk within the budgets, and load them.

    plan: "auto" (the planner's placement for these budgets, with this machine's cached probe), a
    tiermem.planner.Plan to follow, or None (greedy: an execution-order prefix of blocks in HBM as
    far as it fits, KV on the GPU unless kv_placement says "cpu"). micro_batches, lookahead and
    kv_placement fix those choices (None: the plan's, or 1 / 2 / "gpu" for the greedy placement; "disk"
    keeps the KV cache in a file in offload_dir, which the planner considers only when it is given);
    cpu_attention (KV on the CPU and attention computed there, FlexGen's cpu_cache_compute): True / False fix
    it; None leaves it to the planner (plan="auto"), which may choose it for a dense KV cache;
    resident_cap (bytes of HBM-resident weights) implies the greedy placement. kv_quant: the KV cache's scheme
    (None: the compute dtype), or a tuple of them (plan "auto" only: the planner chooses, auto_plan_kv_quant); the
    source's kv_quant is the one used. cuda_graphs: True plans for decode steps as CUDA graph replays (the caller
    fixed the KV cache on the GPU and whole-batch steps); "auto" makes them so where every block ends up in HBM with
    the KV cache and whole-batch steps, and with plan "auto" where the planner, planning again for graph replays
    (graphable), prefers them (with_graph_replays); the source's cuda_graphs says whether they are.
    """
    budget = gpu_memory if gpu_memory is not None else torch.cuda.mem_get_info(device)[0]
    sizes = {b: reader.block_nbytes(b) for b in reader.block_names}
    if isinstance(kv_quant, tuple) and (plan != "auto" or resident_cap is not None):
        raise ConfigError("kv_quant='auto' lets the planner choose the KV cache's precision: it needs plan='auto' "
                          "and no resident_weights; pass kv_quant None, 'int8' or 'int4' with a fixed placement")
    if plan == "auto" and resident_cap is None:  # load() checked that plan is "auto", a Plan or None
        schemes = kv_quant  # a tuple: the planner chooses among them, for each kind of step

        def plan_for(graphs: bool) -> tuple[Plan, QuantScheme | None]:
            fixed = ("gpu", 1, False) if graphs else (kv_placement, micro_batches, cpu_attention)
            if isinstance(schemes, tuple):
                return auto_plan_kv_quant(reader, cfg, dtype, budget, cpu_memory, max_batch, max_seq, schemes,
                                          fixed[0], fixed[1], lookahead, fixed[2], offload_dir=offload_dir,
                                          device=str(device), cuda_graphs=graphs)
            return auto_plan(reader, cfg, dtype, budget, cpu_memory, max_batch, max_seq, schemes, fixed[0],
                             fixed[1], lookahead, fixed[2], offload_dir=offload_dir, device=str(device),
                             cuda_graphs=graphs), schemes

        (plan, kv_quant), cuda_graphs = with_graph_replays(
            plan_for, cuda_graphs, lambda planned: planned[0],
            lambda planned: schemes.index(planned[1]) if isinstance(schemes, tuple) else 0)
    elif plan == "auto":
        plan = None
    if plan is not None:
        for name, mine, planned in (("kv_placement", kv_placement, plan.kv), ("micro_batches", micro_batches,
                                    plan.micro_batches), ("lookahead", lookahead, plan.lookahead),
                                   ("cpu_attention", cpu_attention, plan.cpu_cache_compute)):
            if mine is not None and mine != planned:
                raise ConfigError(f"{name}={mine!r} but the plan chose {planned!r}: leave {name} out to follow "
                                  "the plan, or plan again with that choice fixed")
        kv_placement, micro_batches, lookahead = plan.kv, plan.micro_batches, plan.lookahead
    kv_placement, micro_batches, lookahead = kv_placement or "gpu", micro_batches or 1, lookahead or 2
    prefill_micro_batches = (plan.prefill_micro_batches if plan is not None else None) or micro_batches
    cpu_attention = plan.cpu_cache_compute if plan is not None else bool(cpu_attention)
    if cpu_attention and kv_placement != "cpu":
        raise ConfigError("cpu_attention computes attention where the KV cache is: it needs kv_placement='cpu'")
    if kv_placement not in ("gpu", "cpu", "disk"):
        raise ConfigError(f"kv_placement must be 'gpu', 'cpu' or 'disk', got {kv_placement!r}")
    kv = kv_cache_bytes(cfg, max_batch, max_seq, dtype, kv_quant)
    if kv_placement == "disk":
        check_offload_dir(offload_dir, kv, f"the disk KV cache of {max_batch} x {max_seq} tokens")
    gpu_kv, host_kv = kv_memory(kv, cfg.num_layers, kv_placement, cpu_attention)
    quantized = dict(quantized=reader.quant is not None, kv_quantized=kv_quant is not None)
    work = max(workspace_bytes(cfg, max_batch, max_seq, prefill_micro_batches, dtype, **quantized),
               workspace_bytes(cfg, max_batch, max_seq, micro_batches, dtype, **quantized, new_tokens=1))
    weights_budget = budget - gpu_kv - work
    if weights_budget <= 0:
        raise BudgetError(f"gpu_memory {format_size(budget)} is used up by the KV cache ({format_size(gpu_kv)}) "
                          f"and activations ({format_size(work)}) of {max_batch} x {max_seq} tokens: raise "
                          "gpu_memory, lower max_batch_size / max_seq_len, raise micro_batches or keep the KV "
                          "cache on the CPU or on disk (kv_placement='cpu', or 'disk' with offload_dir)")
    host_budget = None if cpu_memory is None else cpu_memory - host_kv
    if host_budget is not None and host_budget <= 0:
        raise BudgetError(f"cpu_memory {format_size(cpu_memory)} does not hold the KV cache ({format_size(kv)} "
                          f"for {max_batch} x {max_seq} tokens): raise cpu_memory or keep the KV on the GPU")
    if plan is not None:
        resident, host_names, disk_names, weight_bytes, staging = follow_plan(
            plan, sizes, reader.block_names, weights_budget, host_budget)
    else:
        resident, weight_bytes = plan_gpu_residency(sizes, reader.block_names, HOST_ONLY, weights_budget,
                                                    lookahead, resident_cap)
        host_names, disk_names, staging = plan_host_tier(sizes, reader.block_names, resident, host_budget,
                                                         lookahead)
    host_bytes = sum(sizes[b] for b in host_names)
    store_dir = getattr(reader, "path", None)
    backend_name = "posix" if store_dir is None else choose_backend(read_backend, store_dir, io_threads)
    backend = make_backend(backend_name, io_threads)
    try:
        arena = PinnedArena(host_bytes + staging)
    except BaseException:
        backend.close()
        raise
    try:
        host, gpu = {}, {}
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="load", disable=not progress) as bar:
            for name in reader.block_names:
                if name in resident:
                    gpu[name] = reader.read_block(name, backend=backend).to(device)
                elif name in host_names:
                    host[name] = reader.read_block(name, out=arena.take(sizes[name], name), backend=backend)
                bar.update(sizes[name])
        disk = DiskStager(reader, disk_names, arena, lookahead, io_threads, backend) if disk_names else None
        weights = GpuWeights(gpu, host, reader.decode_block, device, HOST_ONLY, lookahead, disk)
    except BaseException:
        arena.close()
        backend.close()
        raise
    streamed = [b for b in reader.block_names if b not in resident and b not in HOST_ONLY]
    described = {
        "placement": "greedy" if plan is None else "plan", "gpu_resident_blocks": len(resident),
        "streamed_blocks": len(streamed), "disk_blocks": len(disk_names), "host_only_blocks": list(HOST_ONLY),
        "gpu_weight_bytes": weight_bytes, "kv_placement": kv_placement, "micro_batches": micro_batches,
        "prefill_micro_batches": prefill_micro_batches, "cpu_attention": cpu_attention,
        "lookahead": lookahead, "gpu_kv_reserved_bytes": gpu_kv, "host_kv_reserved_bytes": host_kv,
        "gpu_workspace_reserved_bytes": work, "pinned_host_bytes": host_bytes + staging + host_kv,
        "disk_kv_file_bytes": kv if kv_placement == "disk" else 0,
        "streamed_bytes_per_step": sum(sizes[b] for b in streamed),
        "disk_bytes_per_step": sum(sizes[b] for b in disk_names), "gpu_budget_bytes": budget,
        "read_backend": backend_name, "experts_on_demand_blocks": len(weights.sparse_host_blocks)}
    if plan is not None:
        described["predicted_step_s"] = plan.predicted_step_s
    source = GpuSource(weights, arena, backend, described, kv_placement, micro_batches, prefill_micro_batches,
                       cpu_attention, offload_dir)
    source.followed_plan = plan
    source.kv_quant = kv_quant
    whole_steps_in_hbm = not streamed and kv_placement == "gpu" and micro_batches == 1 and not cpu_attention
    source.cuda_graphs = whole_steps_in_hbm if cuda_graphs == "auto" else bool(cuda_graphs)
    return source


def graph_options_allowed(kv_placement: str | None, cpu_attention: bool | None, micro_batches: int | None) -> bool:
    """Whether the choices fixed by a caller leave room for CUDA graphs: they capture whole-batch decode steps over
    a KV cache on the GPU."""
    return kv_placement in (None, "gpu") and not cpu_attention and micro_batches in (None, 1)


def graphable(plan: Plan) -> bool:
    """Whether the decode steps of `plan` can be CUDA graph replays: every block in HBM (the embedding, read in pinned
    host memory, aside), the KV cache there too, whole-batch steps."""
    return (not plan.host_blocks and not plan.disk_blocks and plan.kv == "gpu" and plan.micro_batches == 1
            and not plan.cpu_cache_compute)


def with_graph_replays(plan_for: Callable[[bool], T], mode: bool | str, plan_of: Callable[[T], Plan],
                       kv_rank: Callable[[T], int] = lambda _answer: 0) -> tuple[T, bool]:
    """The planning of decode steps as CUDA graph replays or not, as cuda_graphs `mode` says: plan_for(True) for
    True; plan_for(False) for False; for "auto", plan_for(False), and where its plan could replay graphs
    (graphable), plan_for(True) instead if that plan is graphable and preferred (plan_of: the Plan of a plan_for
    answer; kv_rank: the precision of its KV cache, 0 the most precise, where kv_quant="auto" chose it for each
    kind of step): no slower with the same KV precision, the 5% rule of planner.kv_precision_prefers across
    precisions. A replay plan that does not fit is dropped; one whose probes failed is dropped with a warning.
    Returns (the answer taken, whether it is for graph replays)."""
    if mode is True:
        return plan_for(True), True
    eager = plan_for(False)
    if mode != "auto" or not graphable(plan_of(eager)):
        return eager, False
    try:
        replayed = plan_for(True)
    except BudgetError:  # nothing fits with whole-batch steps over a KV cache in HBM
        return eager, False
    except (TiermemError, RuntimeError) as exc:  # a probe of graph replays failed: steps as they are
        warnings.warn(f"tiermem: decode steps planned without CUDA graphs: planning for them failed ({exc})",
                      stacklevel=3)
        return eager, False
    preferred = kv_precision_prefers(plan_of(replayed).predicted_step_s, kv_rank(replayed),
                                     plan_of(eager).predicted_step_s, kv_rank(eager))
    return (replayed, True) if graphable(plan_of(replayed)) and preferred else (eager, False)


def plan_timing_kernels(make: Callable[[Workload, Hardware], Plan], workload: Workload, hardware: Hardware,
                        store_dir: str | os.PathLike | None, time_kernels: Callable[[Workload], Workload],
                        cuda_graphs: bool) -> tuple[Plan, Hardware, Workload]:
    """make(workload, hardware) with the store's read rate fresh where the plan reads it
    (probe.plan_with_fresh_disk_rate; store_dir None keeps `hardware`'s), made again with time_kernels(workload)
    (the kernels' time, tiermem.gpu_probe) where cost_model.kernels_may_bound says the kernels could set the step.
    Returns (plan, the figures it was made with, the workload it was made for)."""
    from tiermem.cost_model import kernels_may_bound
    from tiermem.probe import plan_with_fresh_disk_rate

    chosen, used = plan_with_fresh_disk_rate(lambda hw: make(workload, hw), hardware, store_dir)
    if not kernels_may_bound(chosen.breakdown, cuda_graphs):
        return chosen, used, workload
    workload = time_kernels(workload)
    chosen, used = plan_with_fresh_disk_rate(lambda hw: make(workload, hw), used, store_dir)
    return chosen, used, workload


def auto_plan(reader: StoreReader, cfg: ModelConfig, dtype: torch.dtype, gpu_budget: int, cpu_memory: int | None,
              max_batch: int, max_seq: int, kv_quant: QuantScheme | None, kv_placement: str | None,
              micro_batches: int | None, lookahead: int | None, cpu_attention: bool | None = None,
              offload_dir: str | os.PathLike | None = None, device: str = "cuda", cuda_graphs: bool = False) -> Plan:
    """The planner's placement for a load: this machine's cached (or freshly probed) hardware figures, the
    GPU time of a decode step's kernels (tiermem.gpu_probe, where they could set the step:
    cost_model.kernels_may_bound; the planner then plans again with it) and the host time of a step
    (tiermem.host_probe, as CUDA graph replays with cuda_graphs; measured on `device` for every micro-batch split;
    where the planner may choose CPU attention, that attention timed at the step's rows and context too; where it
    may put the KV cache on disk, that tier's I/O timed in offload_dir; where the plan reads weights from the store
    every step, the store's read rate measured within the last minute: probe.plan_with_fresh_disk_rate), decode
    steps of max_batch sequences up to max_seq tokens (the KV reservation), the given choices fixed.
    Without cpu_memory the budget is the host memory available now. cpu_attention True / False fixes CPU
    attention; None lets the planner choose it for a dense KV cache (planner.cpu_attention_choice). The KV
    cache goes on disk only with an offload_dir (for its file)."""
    from tiermem.host_probe import timed_workload, with_kernel_time
    from tiermem.planner import cpu_attention_choice
    from tiermem.planner import plan as make_plan
    from tiermem.probe import cached_hardware

    store_dir = getattr(reader, "path", None)
    hardware = cached_hardware(store_dir=store_dir)
    gen_len = max(1, max_seq // 16)
    attention = cpu_attention_choice(cpu_attention, kv_quant is not None)
    cpu_budget = cpu_memory if cpu_memory is not None else available_host_bytes()
    workload = timed_workload(reader, cfg, max_batch, max_seq - gen_len, gen_len, dtype, kv_quant, kv=kv_placement,
                              cpu_attention=attention, device=device, offload_dir=offload_dir,
                              budgets=(gpu_budget, cpu_budget), cuda_graphs=cuda_graphs, kernels=False)

    def planned(w: Workload, hw: Hardware) -> Plan:
        return make_plan(w, hw, gpu_budget, cpu_budget, kv="cpu" if cpu_attention else kv_placement,
                         cpu_cache_compute=attention, micro_batches=micro_batches, lookahead=lookahead,
                         disk_kv=offload_dir is not None)

    def time_kernels(w: Workload) -> Workload:
        return with_kernel_time(w, reader, dtype, kv_quant, device, (gpu_budget, cpu_budget))

    return plan_timing_kernels(planned, workload, hardware, store_dir, time_kernels, cuda_graphs)[0]


def auto_plan_kv_quant(reader: StoreReader, cfg: ModelConfig, dtype: torch.dtype, gpu_budget: int,
                       cpu_memory: int | None, max_batch: int, max_seq: int, schemes: tuple[QuantScheme | None, ...],
                       *choices, **options) -> tuple[Plan, QuantScheme | None]:
    """kv_quant="auto": auto_plan with the KV cache in each of `schemes` (most precise first; choices and options
    as auto_plan takes them after kv_quant), and the plan and scheme planner.choose_kv_quant picks. Each scheme's
    host time (and disk KV tier, CPU attention where they may be used) is timed: a few seconds each."""
    from tiermem.planner import choose_kv_quant, each_that_fits

    plans = each_that_fits(schemes, lambda scheme: auto_plan(reader, cfg, dtype, gpu_budget, cpu_memory, max_batch,
                                                             max_seq, scheme, *choices, **options))
    chosen = choose_kv_quant(plans)
    return plans[chosen], schemes[chosen]


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo, less a tenth for everything else on the machine."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError) as exc:
        raise ConfigError(f"cannot read the available host memory ({exc}): pass cpu_memory") from exc
    return kib * 1024 * 9 // 10


def follow_plan(plan: Plan, sizes: dict[str, int], order: list[str], weights_budget: int,
                cpu_memory: int | None) -> tuple[list[str], list[str], list[str], int, int]:
    """Pure: a planner's placement checked against this store and the budgets as tiermem accounts them.

    weights_budget: HBM bytes left for weights; cpu_memory: pinned bytes left for weights (the KV
    cache's share already taken out). Returns (GPU-resident, host, disk blocks, HBM weight bytes,
    pinned staging bytes); ConfigError when the plan does not place every block exactly once,
    BudgetError when it does not fit.
    """
    placed = [*plan.gpu_blocks, *plan.host_blocks, *plan.disk_blocks, *HOST_ONLY]
    if sorted(placed) != sorted(order):
        raise ConfigError(f"the plan places {sorted(placed)} but the store has blocks {sorted(order)}: "
                          "make the plan for this store")
    ring = plan.lookahead + 1
    streamed = [*plan.host_blocks, *plan.disk_blocks]
    weight_bytes = sum(sizes[b] for b in plan.gpu_blocks) + ring * max((sizes[b] for b in streamed), default=0)
    staging = ring * max((sizes[b] for b in plan.disk_blocks), default=0)
    host_bytes = sum(sizes[b] for b in [*plan.host_blocks, *HOST_ONLY]) + staging
    if weight_bytes > weights_budget:
        raise BudgetError(f"the plan needs {format_size(weight_bytes)} of GPU memory for weights but "
                          f"{format_size(weights_budget)} are left after KV and activations: plan again for "
                          "these budgets")
    if cpu_memory is not None and host_bytes > cpu_memory:
        raise BudgetError(f"the plan needs {format_size(host_bytes)} of pinned host memory for weights but "
                          f"{format_size(cpu_memory)} are left of cpu_memory after the KV cache: plan again for "
                          "these budgets")
    host = [b for b in order if b in HOST_ONLY or b in plan.host_blocks]
    return list(plan.gpu_blocks), host, list(plan.disk_blocks), weight_bytes, staging


def plan_host_tier(sizes: dict[str, int], order: list[str], gpu_resident: list[str], cpu_memory: int | None,
                   lookahead: int) -> tuple[list[str], list[str], int]:
    """Pure: which non-GPU blocks live in pinned RAM and which are read from disk every step.

    The host-only blocks (the embedding) must be in RAM; the rest follow plan_residency (a staging
    ring of lookahead + 1 buffers for disk blocks, then first-fit in execution order).
    Returns (host blocks, disk blocks, staging bytes).
    """
    rest = {b: sizes[b] for b in order if b not in gpu_resident and b not in HOST_ONLY}
    fixed = sum(sizes[b] for b in order if b in HOST_ONLY)
    if cpu_memory is not None and fixed > cpu_memory:
        raise BudgetError(f"cpu_memory {format_size(cpu_memory)} cannot even hold the embedding table "
                          f"({format_size(fixed)}), which stays in pinned host memory: raise cpu_memory")
    if not rest:
        return [b for b in order if b in HOST_ONLY], [], 0
    tier = plan_residency(rest, None if cpu_memory is None else cpu_memory - fixed, lookahead)
    host = [b for b in order if b in HOST_ONLY or b in tier.resident]
    return host, list(tier.streamed), tier.ring_nbytes
