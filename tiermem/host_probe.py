"""The host time of a decode step: Python, torch dispatch and kernel launches, measured on this machine.

A decode step issues tens of kernels per layer; with resident weights and small batches the CPU issuing
them, not the GPU running them, sets the step time (llama3-8b int4 at batch 16: 9-13 ms of GPU kernels in
a 30-38 ms step). The cost is a property of the code path (family, weight and KV quantization, rows per
micro-batch), not of the model's width, so it is measured on a narrow copy of the model: same depth, heads
per KV head, head_dim, quantization and dtype, hidden size a few hundred, random weights, everything
resident. Its GPU kernels take microseconds, so its step time is host time. The copy has the model's own
depth: a per-layer figure taken from the difference of a 2- and a 10-layer copy scattered by 0.53-1.13x
of the full model's step from one measurement to the next (benchmarks/results/host_time_check_*), where
one measurement of the full depth repeats within a few percent.

Attention computed on the host (a KV cache in host RAM with FlexGen's cpu_cache_compute) is timed apart, at the
model's real shape: at short contexts its KV bytes do not set its cost (111B int4, batch 32 at 136 tokens: 0.18 s
of a step where the bytes at the host copy rate take 0.045 s), so HostKVCache.attend itself is timed over a few
layers' worth of host K/V of the workload's rows and context.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tiermem.engine.config import model_config_from_hf
from tiermem.engine.executor import micro_batch_slices
from tiermem.kernels.quant import QuantScheme

TINY_VOCAB = 1024
WARM_STEPS, TIMED_STEPS, PROMPT_LEN = 3, 16, 16
ATTENTION_PROBE_BYTES = 1 << 30  # host K/V the CPU-attention probe cycles through: more than the host's caches
ATTENTION_TIMED_PASSES = 3


@dataclass(frozen=True)
class HostTime:
    """Host seconds of one decode step at `rows` rows of a model `num_layers` deep."""

    rows: int
    num_layers: int
    step_seconds: float

    def step_s(self, micro_batches: int) -> float:
        """Host seconds of a decode step run as micro_batches slices of `rows` rows."""
        return micro_batches * self.step_seconds


def narrow_config(hf_config: dict, num_layers: int, quant_group: int = 128) -> dict:
    """The HF config of a narrow model with hf_config's code path: the same heads per KV head, head_dim,
    family and options (a MoE's experts and top_k too: they set its launches); as few KV heads as make the hidden
    size a multiple of 2 * quant_group, experts 2 * quant_group wide (Qwen3-235B's 128 experts per layer, 1536
    wide, would have put 56 GB on the GPU for this probe)."""
    cfg = model_config_from_hf(hf_config)
    group = cfg.num_heads // cfg.num_kv_heads
    kv_heads = 1
    while (kv_heads * group * cfg.head_dim) % (2 * quant_group) and kv_heads < cfg.num_kv_heads:
        kv_heads *= 2
    hidden = kv_heads * group * cfg.head_dim
    narrow = dict(hf_config, hidden_size=hidden, num_attention_heads=kv_heads * group,
                  num_key_value_heads=kv_heads, num_hidden_layers=num_layers, vocab_size=TINY_VOCAB)
    for key, value in (("head_dim", cfg.head_dim), ("intermediate_size", 2 * hidden), ("ffn_dim", 2 * hidden),
                       ("word_embed_proj_dim", hidden), ("moe_intermediate_size", 2 * quant_group),
                       ("shared_expert_intermediate_size", 2 * quant_group)):
        if key in narrow:
            narrow[key] = value
    return narrow


def _step_seconds(hf_config: dict, quant: QuantScheme | None, dtype: torch.dtype, kv_quant: str | None,
                  kv_group_size: int | None, rows: int, device: str, prompt_len: int = PROMPT_LEN,
                  cuda_graphs: bool = False) -> float:
    """Median wall seconds of a decode step of the model (random weights, all resident on `device`) after a prompt
    of prompt_len tokens; with cuda_graphs (steps replayed as CUDA graphs) the seconds of a step before it waits
    for the GPU: the host's part, which the replay follows rather than overlaps (cost_model's module doc)."""
    from tiermem.api import load_from_reader
    from tiermem.synthetic import SyntheticStore

    store = SyntheticStore(hf_config, quant, dtype, device)
    total = WARM_STEPS + TIMED_STEPS
    issued: list[float] = []
    stamps: list[float] = []

    def on_step(k: int) -> None:
        issued.append(time.perf_counter())
        torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    with load_from_reader(store, device, None, None, dtype=dtype, max_batch_size=rows,
                          max_seq_len=prompt_len + total, kv_quant=kv_quant, kv_group_size=kv_group_size,
                          plan=None, cuda_graphs=cuda_graphs) as model:
        ids = torch.randint(3, TINY_VOCAB, (rows, prompt_len))
        model.generate(ids, total, eos_token_id=[], on_step=on_step)
    torch.cuda.empty_cache()  # a load that sizes its budget by the free memory sees none of this
    if cuda_graphs:  # the host's part: from the last step's end to the sync, which then waits for the replay
        steps = [i - a for a, i in zip(stamps[WARM_STEPS - 1:-1], issued[WARM_STEPS:], strict=True)]
    else:
        steps = [b - a for a, b in zip(stamps[WARM_STEPS - 1:-1], stamps[WARM_STEPS:], strict=True)]
    return statistics.median(steps)


@functools.lru_cache(maxsize=256)
def _measure(config_json: str, quant_name: str | None, quant_group: int, dtype_name: str, kv_quant: str | None,
             kv_group_size: int | None, rows: int, device: str, prompt_len: int, cuda_graphs: bool) -> HostTime:
    hf_config = json.loads(config_json)
    quant = QuantScheme.from_name(quant_name, quant_group) if quant_name else None
    num_layers = model_config_from_hf(hf_config).num_layers
    seconds = _step_seconds(narrow_config(hf_config, num_layers, quant_group), quant, getattr(torch, dtype_name),
                            kv_quant, kv_group_size, rows, device, prompt_len, cuda_graphs)
    return HostTime(rows, num_layers, seconds)


def measure_host_time(hf_config: dict, quant: QuantScheme | None, dtype: torch.dtype, kv_quant: str | None,
                      kv_group_size: int | None, rows: int, device: str = "cuda",
                      prompt_len: int = PROMPT_LEN, cuda_graphs: bool = False) -> HostTime:
    """HostTime of hf_config's decode step at `rows` rows per micro-batch on `device` after a prompt of prompt_len
    tokens, issued as CUDA graph replays with cuda_graphs (needs CUDA; about 20 decode steps of the narrow copy,
    0.5-2 s per call, remembered for the process)."""
    return _measure(json.dumps(hf_config, sort_keys=True), quant.name if quant else None,
                    quant.group_size if quant else 128, str(dtype).removeprefix("torch."), kv_quant, kv_group_size,
                    rows, device, prompt_len, cuda_graphs)


def host_step_seconds(hf_config: dict, quant: QuantScheme | None, dtype: torch.dtype,
                      kv_quant: QuantScheme | None, batch: int, device: str = "cuda",
                      cuda_graphs: bool = False) -> dict[int, float]:
    """Micro-batch count m -> host seconds of a decode step of `batch` rows split into m, for every divisor m
    of batch (cost_model.Workload.host_step_s; with cuda_graphs, which replay whole-batch steps, m = 1 only); {}
    without CUDA (the cost model's default stands in)."""
    from tiermem.cost_model import divisors

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        return {}
    kv = (kv_quant.name, kv_quant.group_size) if kv_quant is not None else (None, None)
    return {m: measure_host_time(hf_config, quant, dtype, *kv, batch // m, str(device),
                                 cuda_graphs=cuda_graphs).step_s(m)
            for m in ([1] if cuda_graphs else divisors(batch))}


def _cpu_attention_layer_seconds(hf_config: dict, dtype: torch.dtype, kv_quant: QuantScheme | None, batch: int,
                                 context: int, device: str) -> dict[int, float]:
    """Micro-batch count m -> wall seconds of one layer's CPU attention over `batch` rows split into m (m calls of
    HostKVCache.attend, new k, v and q coming from `device`), each over `context` cached tokens."""
    from tiermem.cost_model import divisors
    from tiermem.kv_offload import HostKVCache

    cfg = model_config_from_hf(hf_config)
    layer_bytes = 2 * batch * cfg.num_kv_heads * context * cfg.head_dim * dtype.itemsize
    layers = max(2, min(cfg.num_layers, ATTENTION_PROBE_BYTES // max(layer_bytes, 1)))
    shape = SimpleNamespace(num_layers=layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    cache = HostKVCache.allocate(shape, batch, context, dtype, "cpu", kv_quant, cpu_attention=True)
    cache.length = context - 1  # each call appends the step's token at the last slot and attends over all
    q = torch.randn(batch, cfg.num_heads, 1, cfg.head_dim, dtype=dtype, device=device)  # [B, H, 1, Dh]
    kv = torch.randn(batch, cfg.num_kv_heads, 1, cfg.head_dim, dtype=dtype, device=device)  # [B, Hkv, 1, Dh]
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=device)
    scale = cfg.head_dim**-0.5

    def one_pass(slices: list[slice]) -> None:
        for layer in range(layers):
            for r in slices:
                cache.attend(layer, r, q[r], kv[r], kv[r], mask[r], scale)

    seconds = {}
    try:
        for m in divisors(batch):
            slices = micro_batch_slices(batch, m)
            one_pass(slices)  # warm: first touch of the host K/V, CPU kernels' set-up
            start = time.perf_counter()
            for _ in range(ATTENTION_TIMED_PASSES):
                one_pass(slices)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            seconds[m] = (time.perf_counter() - start) / (ATTENTION_TIMED_PASSES * layers)
    finally:
        cache.close()
    return seconds


def cpu_attention_step_seconds(hf_config: dict, dtype: torch.dtype, kv_quant: QuantScheme | None, batch: int,
                               context: float, device: str = "cuda") -> dict[int, float]:
    """Micro-batch count m -> host seconds of the attention a decode step of `batch` rows at `context` cached
    tokens computes on the host (cost_model.Workload.cpu_attention_s), for every divisor m of batch: the
    model's depth times one layer's m calls of HostKVCache.attend, timed here on up to 1 GiB of host K/V
    (about 0.1-1 s); {} without CUDA (the cost model's host copy rate over the KV bytes stands in)."""
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        return {}
    layers = model_config_from_hf(hf_config).num_layers
    per_layer = _cpu_attention_layer_seconds(hf_config, dtype, kv_quant, batch, max(1, round(context)), str(device))
    return {m: layers * s for m, s in per_layer.items()}


def timed_workload(reader, cfg, batch: int, prompt_len: int, gen_len: int, dtype: torch.dtype | None,
                   kv_quant: QuantScheme | None, *, kv: str | None = None, cpu_attention: bool | None = None,
                   device: str = "cuda", offload_dir=None, budgets: tuple[int, int] | None = None,
                   cuda_graphs: bool = False, kernels: bool = True):
    """cost_model.Workload of the store behind `reader` (its block sizes, model config cfg) for decode steps of
    `batch` rows, with what this machine takes, measured on `device` (nothing without CUDA), for what the plan may
    do: the host time of a step (host_step_seconds; as CUDA graph replays with cuda_graphs) and, with kernels, the
    GPU time of its kernels (with_kernel_time); where attention may run on the host, that attention
    (cpu_attention_step_seconds); where the KV cache may live in a file in offload_dir, that tier's I/O
    (tiermem.disk_kv_probe).

    kv: the KV placement fixed by the caller (None: the planner's to choose); cpu_attention: CPU attention fixed
    (True / False) or left to the planner (None; planner.cpu_attention_choice). The disk KV tier is timed only
    where offload_dir has room for the whole cache and the tier's own buffers (cost_model.kv_memory) fit budgets,
    the (GPU, pinned host) bytes of the load (None: no limit): elsewhere no plan can put the cache there, and the
    probe, which takes those buffers, could go over a budget. ConfigError when offload_dir is not a writable
    directory."""
    from dataclasses import replace

    from tiermem.cost_model import Workload, kv_memory
    from tiermem.disk_kv_probe import disk_kv_step_seconds
    from tiermem.engine.config import gpu_compute_dtype
    from tiermem.errors import BudgetError
    from tiermem.scratch_file import check_offload_dir

    dtype = gpu_compute_dtype(cfg, dtype)
    workload = Workload.from_config(cfg, {b: reader.block_nbytes(b) for b in reader.block_names}, batch, prompt_len,
                                    gen_len, dtype, quantized=reader.quant is not None, kv_quant=kv_quant,
                                    host_step_s=host_step_seconds(reader.model_config, reader.quant, dtype, kv_quant,
                                                                  batch, device, cuda_graphs))
    workload = replace(workload, cuda_graphs=cuda_graphs)
    if kernels:
        workload = with_kernel_time(workload, reader, dtype, kv_quant, device, budgets)
    if cpu_attention is not False and kv in (None, "cpu"):
        workload = replace(workload, cpu_attention_s=cpu_attention_step_seconds(
            reader.model_config, dtype, kv_quant, batch, workload.mean_context, device))
    if offload_dir is None or cpu_attention or kv not in (None, "disk"):
        return workload
    try:
        check_offload_dir(offload_dir, workload.kv_reserved_bytes)
    except BudgetError:  # too little free space there for the cache
        return workload
    buffers = kv_memory(workload.kv_reserved_bytes, workload.num_layers, "disk", False)  # (GPU, pinned)
    if budgets is not None and any(need > budget for need, budget in zip(buffers, budgets, strict=True)):
        return workload
    return replace(workload, disk_kv_s=disk_kv_step_seconds(reader.model_config, dtype, kv_quant, batch,
                                                            workload.mean_context, offload_dir, device))


def with_kernel_time(workload, reader, dtype: torch.dtype, kv_quant: QuantScheme | None, device: str = "cuda",
                     budgets: tuple[int, int] | None = None):
    """`workload` with the GPU time of its decode step's kernels (tiermem.gpu_probe, at the store's width, its
    rows per micro-batch and mean context, the probe's copies within budgets): a second or two for a 100B shape,
    so the planners take it only where cost_model.kernels_may_bound says the kernels could set the step."""
    from dataclasses import replace

    from tiermem.engine.config import gpu_compute_dtype
    from tiermem.gpu_probe import gpu_step_seconds

    cfg = model_config_from_hf(reader.model_config)
    kernels = gpu_step_seconds(reader.model_config, reader.quant, gpu_compute_dtype(cfg, dtype), kv_quant,
                               workload.batch, workload.mean_context, device, *(budgets or (None, None)))
    return replace(workload, gpu_step_s=kernels)
