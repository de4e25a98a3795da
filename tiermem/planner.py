"""The auto planner: the fastest placement of a model's blocks and KV cache that fits the budgets.

Pure (no CUDA calls): a Workload (block sizes as stored, KV and FLOPs per token), a Hardware (link
rates, measured by tiermem.probe) and two budgets in, a Plan out. The decode-step cost model and the
memory accounting live in tiermem.cost_model (its module doc states them); `predict` applies them to
any Plan, so that a measured run can be compared with the prediction of its own placement.

Search (exact over the discrete choices). For each KV mode (gpu; cpu with GPU attention; cpu with
CPU attention; disk, when the caller has a directory for it: disk_kv), micro-batch count (divisors
of batch), lookahead (1..3; 2..3 when blocks are read from disk, see MIN_DISK_LOOKAHEAD), ring slot
size S and disk staging size Z (each one of the distinct block sizes, or 0 for none; blocks larger
than S must be GPU-resident, blocks larger than Z must not be on disk, so memory is linear in the
counts below):

- Blocks of equal size are interchangeable in the cost model (it sees byte sums and the largest
  streamed / disk block only), so a placement is a count per size class. Within a class the GPU
  takes blocks spread evenly over execution order, the host spreads its blocks evenly over the
  rest, disk takes what is left (`spread`). The model assumes the links stay busy all step; a
  resident prefix breaks that: while the GPU computes 30 resident layers, the copy ring holds only
  lookahead + 1 streamed blocks and PCIe idles (the 111B batch-16 run reached 0.84 of PCIe so).
  Interleaved, every resident layer's compute overlaps the copies of the streamed ones after it.
- Every term of the step is non-increasing in the resident bytes R (PCIe and HBM ring writes fall,
  and for a fixed R the disk bytes are total - R - H), and moving a block from HBM back to the pool
  lets the host bytes H grow by at most that block. So, with S and Z fixed, for each count vector of
  the minor classes it is optimal to make the major class (the layers) as resident as the GPU
  budget allows, then as host-resident as the host budget allows. The minor classes (embed, head,
  a few odd layers) are enumerated: exact, and a few thousand cost evaluations at most for 80 layers
  (beyond MAX_MINOR_VECTORS minor vectors, minor classes are tried all-or-nothing: no longer exact).

The fastest feasible plan wins; ties (relative 1e-9) go to the fewest decode micro-batches (the host time
the model hides behind a slower link still costs something), then to GPU attention (CPU attention's prompt
steps take 2-5x longer: 5.3-6.3 s against 1.1-3.0 s, llama3-8b batch 16 x 2048), then to the one using less
GPU + host memory among
the candidates above (residency is maximal: a block that fits stays resident even when it does not
make the step faster, e.g. when compute-bound).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from tiermem.config import format_size
from tiermem.cost_model import (
    DEFAULT_LAYER_OVERHEAD_S,
    DISK_KV_MODE,
    KV_MODES,
    Hardware,
    Workload,
    bound_of,
    divisors,
    memory,
    step_cost,
)
from tiermem.errors import BudgetError, ConfigError

__all__ = ["Hardware", "Workload", "Plan", "alternatives", "choose_kv_quant", "cpu_attention_choice", "plan", "predict"]

LOOKAHEADS = (1, 2, 3)
# With one disk read in flight each block's read and its checksum run one after the other (measured: 1.49 GB/s
# against 1.70 with two in flight, 111B batch 64), so a plan that reads from disk keeps two or more.
MIN_DISK_LOOKAHEAD = 2
MAX_SPAN_PARTS = 8  # describe() lists at most this many runs of blocks per tier
MAX_MINOR_VECTORS = 4096  # beyond this the minor classes are tried all-or-nothing only (not exact)
Choice = int | Sequence[str] | None


@dataclass(frozen=True)
class Plan:
    """Where every block and the KV cache live, how a step is split, and (after predict) its cost."""

    gpu_blocks: tuple[str, ...]  # resident in HBM
    host_blocks: tuple[str, ...]  # resident in pinned host memory, streamed to the GPU every step
    disk_blocks: tuple[str, ...]  # read from the store every step, staged in pinned memory, streamed
    kv: str = "gpu"  # "gpu" | "cpu" | "disk" (a file in load()'s offload_dir)
    cpu_cache_compute: bool = False  # KV on CPU: attention computed there (FlexGen's cpu_cache_compute)
    micro_batches: int = 1  # decode steps split the batch so
    lookahead: int = 2
    host_only: tuple[str, ...] = ("embed",)  # used in host memory where they are (only gathered rows move)
    prefill_micro_batches: int | None = None  # the prefill's split (None: micro_batches)
    predicted_step_s: float = math.nan
    predicted_tok_per_s: float = math.nan
    breakdown: Mapping[str, float] = field(default_factory=dict)  # seconds per stage (cost_model.step_cost)
    memory: Mapping[str, int] = field(default_factory=dict)  # bytes per tier and part (cost_model.memory)
    bound: str = ""  # the stage that sets the step time

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        """The inverse of vars(plan), as `tiermem plan --json` writes it under "plan"."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"not a tiermem plan: unknown fields {sorted(unknown)}")
        tuples = ("gpu_blocks", "host_blocks", "disk_blocks", "host_only")
        try:
            return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})
        except TypeError as exc:
            raise ConfigError(f"not a tiermem plan: {exc}") from exc

    @classmethod
    def build(cls, workload: Workload, gpu: Choice = 0, host: Choice = None, **options) -> Plan:
        """A placement from counts (an execution-order prefix, as the greedy placement makes) or names.

        gpu: blocks resident in HBM; host: blocks resident in pinned memory among the others
        (None: all of them); the rest stream from disk. options: kv, cpu_cache_compute, micro_batches,
        lookahead.
        """
        order = workload.streamable
        gpu_names = _pick(order, gpu)
        rest = [b for b in order if b not in gpu_names]
        host_names = set(rest) if host is None else _pick(rest, host)
        return cls(tuple(b for b in order if b in gpu_names), tuple(b for b in rest if b in host_names),
                   tuple(b for b in rest if b not in host_names), host_only=workload.host_only, **options)

    def describe(self) -> list[str]:
        """Human-readable lines: placement, memory per tier, predicted step time and its breakdown."""
        mem, gib = self.memory, lambda n: format_size(n)
        lines = [f"GPU-resident   {len(self.gpu_blocks):>4} blocks {_span(self.gpu_blocks)}",
                 f"pinned host    {len(self.host_blocks):>4} blocks {_span(self.host_blocks)}"
                 + (f" (+ host-only {', '.join(self.host_only)})" if self.host_only else ""),
                 f"from disk      {len(self.disk_blocks):>4} blocks {_span(self.disk_blocks)}"]
        kv = {"gpu": "GPU", "disk": "disk (offload_dir), staged two layers at a time"}.get(self.kv) or (
            "CPU, attention on the CPU" if self.cpu_cache_compute else "CPU, read over PCIe by GPU attention")
        prefill = self.prefill_micro_batches or self.micro_batches
        lines.append(f"KV cache on {kv}; micro-batches {self.micro_batches} (prefill {prefill}), "
                     f"lookahead {self.lookahead}")
        if mem:
            lines.append(f"GPU memory  {gib(mem['gpu'])}: weights {gib(mem['gpu_weights'])}, ring "
                         f"{gib(mem['gpu_ring'])}, KV {gib(mem['gpu_kv'])}, workspace {gib(mem['gpu_workspace'])}")
            lines.append(f"host memory {gib(mem['host'])} pinned: weights {gib(mem['host_weights'])}, staging "
                         f"{gib(mem['host_staging'])}, KV {gib(mem['host_kv'])}")
        if self.breakdown:
            parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in self.breakdown.items() if k != "step")
            lines.append(f"per step (ms): {parts}")
            lines.append(f"predicted decode step {self.predicted_step_s * 1e3:.2f} ms, "
                         f"{self.predicted_tok_per_s:.2f} tok/s (bound: {self.bound})")
        return lines


def spread(names: Sequence[str], count: int) -> list[str]:
    """`count` of `names`, spaced as evenly as possible over the sequence (all of them if count >= len)."""
    n = len(names)
    if count >= n:
        return list(names)
    return [names[(2 * j + 1) * n // (2 * count)] for j in range(count)]


def _pick(order: Sequence[str], choice: Choice) -> set[str]:
    if isinstance(choice, int):
        if not 0 <= choice <= len(order):
            raise ConfigError(f"a block count must be in 0..{len(order)}, got {choice}")
        return set(order[:choice])
    names = set(choice or ())
    unknown = names - set(order)
    if unknown:
        raise ConfigError(f"blocks {sorted(unknown)} cannot be placed here (placeable: {_span(order)})")
    return names


def _span(names: Sequence[str]) -> str:
    """'layers.0-3, head' for layers.0, layers.1, layers.2, layers.3, head."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(f"layers.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for name in names:
        match = re.fullmatch(r"layers\.(\d+)", name)
        if match and (not run or int(match.group(1)) == run[-1] + 1):
            run.append(int(match.group(1)))
            continue
        flush()
        if match:
            run.append(int(match.group(1)))
        else:
            out.append(name)
    flush()
    if len(out) > MAX_SPAN_PARTS:  # an interleaved placement: the ends and how many between
        out = [*out[:3], f"... {len(out) - 5} more ...", *out[-2:]]
    return ", ".join(out) if out else "-"


def _check(plan_: Plan, w: Workload) -> None:
    placed = [*plan_.gpu_blocks, *plan_.host_blocks, *plan_.disk_blocks]
    if sorted(placed) != sorted(w.streamable) or set(plan_.host_only) != set(w.host_only):
        raise ConfigError(f"a plan must place each of {_span(w.streamable)} exactly once (host-only: "
                          f"{list(w.host_only)}); got {len(placed)} placements")
    _check_options(w, plan_.kv, plan_.cpu_cache_compute, plan_.micro_batches, plan_.lookahead)


def _check_options(w: Workload, kv: str | None, ccc: bool | None, micro: int | None, lookahead: int | None) -> None:
    if kv not in (None, "gpu", "cpu", "disk"):
        raise ConfigError(f"kv must be 'gpu', 'cpu' or 'disk', got {kv!r}")
    if kv in ("gpu", "disk") and ccc:
        raise ConfigError("cpu_cache_compute needs the KV cache on the CPU (kv='cpu')")
    if micro is not None and (micro < 1 or w.batch % micro):
        raise ConfigError(f"micro_batches must divide the batch {w.batch}, got {micro}")
    if lookahead is not None and lookahead < 1:
        raise ConfigError(f"lookahead must be >= 1, got {lookahead}")


def predict(plan_: Plan, workload: Workload, hardware: Hardware,
            per_layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S) -> Plan:
    """The plan with its predicted step time, tok/s, per-stage breakdown and memory filled in."""
    _check(plan_, workload)
    size = workload.block_bytes.__getitem__
    streamed = [*plan_.host_blocks, *plan_.disk_blocks]
    opts = dict(kv=plan_.kv, cpu_cache_compute=plan_.cpu_cache_compute, micro_batches=plan_.micro_batches)
    if plan_.prefill_micro_batches is not None and (plan_.prefill_micro_batches < 1
                                                    or workload.batch % plan_.prefill_micro_batches):
        raise ConfigError(f"prefill_micro_batches must divide the batch {workload.batch}, "
                          f"got {plan_.prefill_micro_batches}")
    cost = step_cost(workload, hardware, resident=sum(map(size, plan_.gpu_blocks)),
                     host=sum(map(size, plan_.host_blocks)), disk=sum(map(size, plan_.disk_blocks)),
                     per_layer_overhead_s=per_layer_overhead_s, **opts)
    mem = memory(workload, resident=sum(map(size, plan_.gpu_blocks)), host=sum(map(size, plan_.host_blocks)),
                 slot=max(map(size, streamed), default=0), staging=max(map(size, plan_.disk_blocks), default=0),
                 lookahead=plan_.lookahead, prefill_micro_batches=plan_.prefill_micro_batches, **opts)
    return replace(plan_, predicted_step_s=cost["step"], predicted_tok_per_s=workload.batch / cost["step"],
                   breakdown=cost, memory=mem, bound=bound_of(cost))


def _vectors(counts: Sequence[int], sizes: Sequence[int], main: int, limit: int, cap: int,
             target: int | None) -> Iterator[tuple[int, ...]]:
    """Count vectors x (x[c] <= counts[c]) with sum(x * sizes) <= cap, classes larger than `limit` taken
    whole, and (target) sum(x) == target; the main class as large as the rest allows (see module doc)."""
    options = [range(n + 1) if s <= limit else (n,) for n, s in zip(counts, sizes, strict=True)]
    options[main] = (0,)
    if math.prod(len(o) for o in options) > MAX_MINOR_VECTORS:
        options = [o if len(o) <= 2 else (0, o[-1]) for o in options]
    for x in itertools.product(*options):
        used = sum(n * s for n, s in zip(x, sizes, strict=True))
        room = counts[main] if sizes[main] > limit else min(counts[main], (cap - used) // max(sizes[main], 1))
        if target is not None:
            if not 0 <= target - sum(x) <= room or (sizes[main] > limit and target - sum(x) != counts[main]):
                continue
            room = target - sum(x)
        if room >= 0 and used + room * sizes[main] <= cap:
            yield (*x[:main], room, *x[main + 1:])


def _splits(w: Workload, modes: list[tuple[str, bool]], micro_batches: int | None,
            lookahead: int | None) -> Iterator[tuple[tuple[str, bool], int, int, int]]:
    """(KV mode, decode split m, prefill split m_p, lookahead) to search. Only m costs time; m_p >= m buys
    memory, so only the m_p whose workspace is smaller than that of every smaller m_p are tried."""
    for mode, m, la in itertools.product(modes, [micro_batches] if micro_batches else divisors(w.batch),
                                         [lookahead] if lookahead else LOOKAHEADS):
        least = None
        for mp in (d for d in divisors(w.batch) if d >= m):
            ws = w.workspace(m, mp)
            if least is None or ws < least:
                least = ws
                yield mode, m, mp, la


def _score(w: Workload, hw: Hardware, sizes: list[int], rest: list[int], g: tuple[int, ...], h: tuple[int, ...],
           fixed: tuple[int, int, int], lookahead: int, overhead_s: float, opts: dict,
           prefill_micro_batches: int) -> tuple[float, int]:
    """(step seconds, GPU + host bytes) with g / h blocks of each size class on GPU / host and the rest
    (rest: counts left after g) on disk; fixed: (bytes fixed on GPU, on host, largest fixed host block)."""
    resident = fixed[0] + sum(x * s for x, s in zip(g, sizes, strict=True))
    host = fixed[1] + sum(x * s for x, s in zip(h, sizes, strict=True))
    disk = sum(n * s for n, s in zip(rest, sizes, strict=True)) - (host - fixed[1])
    step = step_cost(w, hw, resident=resident, host=host, disk=disk, per_layer_overhead_s=overhead_s, **opts)["step"]
    slot = max([fixed[2], *(s for s, n in zip(sizes, rest, strict=True) if n)])
    staging = max((s for s, n, x in zip(sizes, rest, h, strict=True) if n - x), default=0)
    mem = memory(w, resident=resident, host=host, slot=slot, staging=staging, lookahead=lookahead,
                 prefill_micro_batches=prefill_micro_batches, **opts)
    return step, mem["gpu"] + mem["host"]


def plan(workload: Workload, hardware: Hardware, gpu_memory: int, cpu_memory: int, *,
         gpu_blocks: Choice = None, host_blocks: Choice = None, kv: str | None = None,
         cpu_cache_compute: bool | None = None, micro_batches: int | None = None, lookahead: int | None = None,
         per_layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S, disk_kv: bool = False) -> Plan:
    """The fastest placement within gpu_memory / cpu_memory bytes (see the module doc for the search).

    Every choice can be fixed: gpu_blocks / host_blocks as a count or as block names, kv ("gpu", "cpu"
    or "disk"), cpu_cache_compute, micro_batches (a divisor of the batch), lookahead. disk_kv: the KV
    cache may live on disk (the caller has an offload_dir for its file); otherwise only kv="disk" puts
    it there. Raises BudgetError when nothing fits.
    """
    w = workload
    _check_options(w, kv, cpu_cache_compute, micro_batches, lookahead)
    order, size = w.streamable, w.block_bytes
    by_name_gpu, by_name_host = (c is not None and not isinstance(c, int) for c in (gpu_blocks, host_blocks))
    fixed_gpu = _pick(order, gpu_blocks) if by_name_gpu else set()
    fixed_host = _pick(order, host_blocks) if by_name_host else set()
    if fixed_gpu & fixed_host:
        raise ConfigError(f"blocks {sorted(fixed_gpu & fixed_host)} cannot be both GPU- and host-resident")
    free = [b for b in order if b not in fixed_gpu | fixed_host]
    classes: dict[int, list[str]] = {}
    for b in free:
        classes.setdefault(size[b], []).append(b)
    sizes, counts = list(classes), [len(v) for v in classes.values()]
    main = max(range(len(sizes)), key=counts.__getitem__) if sizes else 0
    if not sizes:
        sizes, counts = [0], [0]
    gpu_target = gpu_blocks if isinstance(gpu_blocks, int) else (0 if by_name_gpu else None)
    host_target = host_blocks if isinstance(host_blocks, int) else (0 if by_name_host else None)
    fixed_r, fixed_h = sum(size[b] for b in fixed_gpu), sum(size[b] for b in fixed_host)
    fixed_slot = max((size[b] for b in fixed_host), default=0)
    searched = (*KV_MODES, DISK_KV_MODE) if disk_kv or kv == "disk" else KV_MODES
    modes = [(k, c) for k, c in searched if kv in (None, k) and cpu_cache_compute in (None, c)]
    best: tuple[float, int, int, bool, int, tuple] | None = None  # (step, splits, CPU attention, memory, choices)
    for (kv_, ccc), m, mp, la in _splits(w, modes, micro_batches, lookahead):
        opts = dict(kv=kv_, cpu_cache_compute=ccc, micro_batches=m)
        base = memory(w, resident=0, host=0, slot=0, staging=0, lookahead=la, prefill_micro_batches=mp, **opts)
        for slot in sorted({0, *sizes}):
            cap_g = gpu_memory - base["gpu"] - fixed_r - (la + 1) * max(slot, fixed_slot)
            for g in _vectors(counts, sizes, main, slot, cap_g, gpu_target):
                rest = [n - x for n, x in zip(counts, g, strict=True)]
                for staging in sorted({0, *(s for s, n in zip(sizes, rest, strict=True) if n)}):
                    cap_h = cpu_memory - base["host"] - fixed_h - (la + 1) * staging
                    for h in _vectors(rest, sizes, main, staging, cap_h, host_target):
                        if la < MIN_DISK_LOOKAHEAD and sum(rest) > sum(h):
                            continue  # blocks on disk
                        step, used = _score(w, hardware, sizes, rest, g, h, (fixed_r, fixed_h, fixed_slot), la,
                                            per_layer_overhead_s, opts, mp)
                        if best is None or step < best[0] * (1 - 1e-9) or (step <= best[0] * (1 + 1e-9)
                                                                           and (m, mp, ccc, used) < best[1:5]):
                            best = (step, m, mp, ccc, used, (g, h, kv_, ccc, m, la))
    if best is None:
        raise BudgetError(_nothing_fits(w, gpu_memory, cpu_memory, any(
            v is not None for v in (gpu_blocks, host_blocks, kv, cpu_cache_compute, micro_batches, lookahead))))
    mp, (g, h, kv_, ccc, m, la) = best[2], best[5]
    gpu_names, host_names = set(fixed_gpu), set(fixed_host)
    for names, ng, nh in zip(classes.values(), g, h, strict=False):
        on_gpu = spread(names, ng)
        gpu_names.update(on_gpu)
        host_names.update(spread([b for b in names if b not in on_gpu], nh))
    chosen = Plan(tuple(b for b in order if b in gpu_names), tuple(b for b in order if b in host_names),
                  tuple(b for b in order if b not in gpu_names | host_names), kv_, ccc, m, la, w.host_only,
                  None if mp == m else mp)
    chosen = predict(chosen, w, hardware, per_layer_overhead_s)
    assert chosen.memory["gpu"] <= gpu_memory and chosen.memory["host"] <= cpu_memory, chosen.memory
    return chosen


def cpu_attention_choice(asked: bool | None, kv_quantized: bool) -> bool | None:
    """What the planner may do about CPU attention (plan()'s cpu_cache_compute): what was asked, or when nothing
    was, None (search it) for a dense KV cache and False for a quantized one. The cost model charges CPU attention
    what HostKVCache.attend took when timed at the step's shape (tiermem.host_probe.cpu_attention_step_seconds);
    a quantized cache is dequantized on the host first; the planner leaves that to a caller who asks for it."""
    if asked is not None:
        return asked
    return False if kv_quantized else None


def each_that_fits(choices: Sequence, make: Callable) -> list:
    """[make(c) for c in choices], None for each choice where make raises BudgetError (nothing fits with it)."""
    made = []
    for choice in choices:
        try:
            made.append(make(choice))
        except BudgetError:
            made.append(None)
    return made


def read_plan_file(path: str | os.PathLike) -> dict:
    """The whole JSON of a file written by `tiermem plan --json FILE` ("plan", and what it was made for:
    "kv_quant", "cuda_graphs", ...); ConfigError where it is no such file."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a plan from {path}: {exc}; write one with `tiermem plan --json "
                          "FILE`") from exc
    if not isinstance(body, dict) or not isinstance(body.get("plan"), dict):
        raise ConfigError(f"{path} holds no plan (no \"plan\" object): write one with `tiermem plan --json "
                          "FILE`")
    return body


KV_QUANT_MIN_GAIN = 0.05  # kv_quant="auto" takes a less precise KV cache only for a plan at least this much faster


def kv_precision_prefers(step_s: float, rank: int, over_step_s: float, over_rank: int) -> bool:
    """Whether a plan predicted at step_s with a KV cache of precision `rank` (0 the most precise) is to be taken over
    one at over_step_s with `over_rank`: at the same precision when no slower; less precise only when at least
    KV_QUANT_MIN_GAIN faster (quantizing the cache costs accuracy, so a win within the cost model's error does not buy
    it); more precise unless the other is that much faster."""
    if rank == over_rank:
        return step_s <= over_step_s
    if rank > over_rank:
        return step_s < (1 - KV_QUANT_MIN_GAIN) * over_step_s
    return not over_step_s < (1 - KV_QUANT_MIN_GAIN) * step_s


def choose_kv_quant(plans: Sequence[Plan | None]) -> int:
    """kv_quant="auto": the index of the KV cache's scheme to use, given the best plan with each (most precise first,
    None where nothing fits): the most precise one, unless a less precise one's plan is predicted at least
    KV_QUANT_MIN_GAIN faster than the one chosen so far (kv_precision_prefers). BudgetError when no plan fits."""
    chosen = None
    for i, p in enumerate(plans):
        if p is not None and (chosen is None or kv_precision_prefers(p.predicted_step_s, i,
                                                                     plans[chosen].predicted_step_s, chosen)):
            chosen = i
    if chosen is None:
        raise BudgetError("no placement fits the budgets with the KV cache in the compute dtype, int8 or int4: "
                          "raise gpu_memory / cpu_memory, or lower the batch or the sequence length")
    return chosen


ALTERNATIVES = (
    ("KV on the GPU", {"kv": "gpu"}),
    ("KV in host RAM, GPU attention", {"kv": "cpu", "cpu_cache_compute": False}),
    ("KV in host RAM, CPU attention", {"kv": "cpu", "cpu_cache_compute": True}),
    ("one micro-batch", {"micro_batches": 1}),
    ("lookahead 1", {"lookahead": 1}),
    ("lookahead 3", {"lookahead": 3}),
    ("no block in HBM", {"gpu_blocks": 0}),
)


def alternatives(workload: Workload, hardware: Hardware, gpu_memory: int, cpu_memory: int,
                 per_layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S, **fixed) -> list[tuple[str, Plan | None]]:
    """The best plan under each of ALTERNATIVES' choices on top of `fixed` (plan()'s keyword choices), None
    where nothing fits: what the planner's choice is weighed against. None beats plan(..., **fixed), which
    searches all of them, unless it overrides one of `fixed` (e.g. CPU attention where `fixed` rules it out)."""
    out: list[tuple[str, Plan | None]] = []
    for name, choice in ALTERNATIVES:
        try:
            out.append((name, plan(workload, hardware, gpu_memory, cpu_memory,
                                   per_layer_overhead_s=per_layer_overhead_s, **{**fixed, **choice})))
        except BudgetError:
            out.append((name, None))
    return out


def _nothing_fits(w: Workload, gpu_memory: int, cpu_memory: int, overridden: bool) -> str:
    largest = max((w.block_bytes[b] for b in w.streamable), default=0)
    least = min(memory(w, resident=0, host=0, slot=largest, staging=largest, kv=k, cpu_cache_compute=c,
                       micro_batches=m, lookahead=1, prefill_micro_batches=w.batch)["gpu"]
                for k, c in KV_MODES for m in divisors(w.batch))
    host = memory(w, resident=0, host=0, slot=0, staging=largest, kv="gpu", cpu_cache_compute=False,
                  micro_batches=1, lookahead=1)["host"]
    return (f"no placement fits gpu_memory {format_size(gpu_memory)} and cpu_memory {format_size(cpu_memory)}"
            + (" with the choices fixed by the caller" if overridden else "")
            + f": streaming every block with lookahead 1 needs about {format_size(least)} of GPU memory "
            f"(2 slots of the largest block, {format_size(largest)}, plus activations, and the KV cache unless "
            f"it lives on the CPU) and {format_size(host)} of pinned host memory (host-only blocks and 2 disk "
            f"staging buffers); batch {w.batch} x {w.prompt_len + w.gen_len} tokens: raise the budgets or "
            "lower the batch or sequence length")
