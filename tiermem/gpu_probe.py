"""The GPU time of a decode step's kernels at the model's own width, measured on this machine.

The cost model's HBM term counts the bytes a step must move at the copy rate of HBM. The kernels do not move them
that fast: llama3-8b int4 at batch 16 x 2048 on an H200 computes for 9-15 ms a step where those bytes take 2.9 ms
(the int4 GEMV at batch 16 reaches about 38% of the copy rate, attention about 32%;
benchmarks/results/llama3_8b_int4_b16x2048_*_profile_*.json, *_s10call2_*). With every block in HBM and the host
out of the way (CUDA graphs) that time is the step. So it is measured, on the code path the model runs: a copy of
the model one and two layers deep at its real width (random weights, same quantization, KV cache in the same
precision, filled to the step's context), its decode step captured as a CUDA graph (engine.static_decode) and
replayed. The two depths give the time of a layer and of the rest (the head); the model's step is the rest plus
its depth times a layer.
"""

from __future__ import annotations

import json
import warnings

import torch

from tiermem.engine.config import model_config_from_hf
from tiermem.errors import BudgetError, NotResidentError
from tiermem.kernels.quant import QuantScheme

PROBE_DEPTHS = (1, 2)
WARM_REPLAYS, TIMED_REPLAYS = 3, 20


def _replay_seconds(model, rows: int, context: int) -> float:
    """Median GPU seconds of one captured decode step of `model` at `rows` rows after `context` cached tokens."""
    from tiermem.engine.kv_cache import KVCache
    from tiermem.engine.static_decode import StaticDecoder, span_of

    span = span_of(context)  # the slots a graph's attention reads
    cache = KVCache.allocate(model.config, rows, span, model.dtype, model.device, kv_quant=model.kv_quant)
    cache.key_mask[:, :context] = True  # the cached keys hold zeros: their values do not change the kernels' work
    cache.length = context
    decoder = StaticDecoder(model.executor, cache, graphs=True)
    decoder.forward(torch.zeros(rows, 1, dtype=torch.long))  # runs the step and captures it
    graph = decoder.graph(span)
    for _ in range(WARM_REPLAYS):
        graph.replay()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_REPLAYS + 1)]
    events[0].record()
    for event in events[1:]:
        graph.replay()  # the same step again: the same slot is rewritten, the same keys are read
        event.record()
    events[-1].synchronize()
    times = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:], strict=False))
    return times[len(times) // 2]


def _layer_and_rest(hf_config: dict, quant: QuantScheme | None, dtype: torch.dtype, kv_quant: str | None,
                    kv_group_size: int | None, rows: tuple[int, ...], context: int, device: str,
                    budgets: tuple[int | None, int | None]) -> dict[int, tuple[float, float]]:
    """rows -> (GPU seconds of one layer, of everything else in a step) at `rows` rows and `context` tokens, the
    copies loaded within budgets (gpu_memory, cpu_memory)."""
    from tiermem.api import load_from_reader
    from tiermem.engine.static_decode import DEFAULT_BUCKET
    from tiermem.synthetic import SyntheticStore

    seconds: dict[int, list[float]] = {r: [] for r in rows}
    for depth in PROBE_DEPTHS:
        store = SyntheticStore(dict(hf_config, num_hidden_layers=depth), quant, dtype, device)
        try:
            with load_from_reader(store, device, *budgets, dtype=dtype, max_batch_size=max(rows),
                                  max_seq_len=context + DEFAULT_BUCKET, kv_quant=kv_quant, kv_group_size=kv_group_size,
                                  plan=None, cuda_graphs=True) as model:
                for r in rows:
                    seconds[r].append(_replay_seconds(model, r, context))
        finally:
            torch.cuda.empty_cache()  # a load that sizes its budget by the free memory sees none of this
    layer_and_rest = {}
    for r, (one, two) in seconds.items():
        layer = max(two - one, 0.0)
        layer_and_rest[r] = (layer, max(one - layer, 0.0))
    return layer_and_rest


_MEASURED: dict[tuple, dict[int, tuple[float, float]]] = {}  # what the process measured, by all but the budgets
MAX_MEASURED = 64  # shapes remembered; the oldest is dropped beyond


def gpu_step_seconds(hf_config: dict, quant: QuantScheme | None, dtype: torch.dtype, kv_quant: QuantScheme | None,
                     batch: int, context: float, device: str = "cuda", gpu_memory: int | None = None,
                     cpu_memory: int | None = None) -> dict[int, float]:
    """Micro-batch count m -> GPU seconds of the kernels of a decode step of `batch` rows split into m, at `context`
    cached tokens (cost_model.Workload.gpu_step_s), for every divisor m of batch: m steps of batch / m rows, each
    the measured rest plus the model's depth times a measured layer. Two loads of a one- and a two-layer copy of
    the model (a second or two for a 100B shape), remembered for the process. The copies are placed within
    gpu_memory and cpu_memory (None: no limit but the free memory); their blocks are generated on the GPU one at a
    time first (a block's transient memory, up to a few GB for a 100B shape, before anything of the model is
    loaded). {} without CUDA; {} with a warning where the copies do not fit the budgets in HBM (the cost model's
    byte counts stand in then: optimistic for a step that the kernels bound)."""
    from tiermem.cost_model import divisors

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        return {}
    ms = divisors(batch)
    kv = (kv_quant.name, kv_quant.group_size) if kv_quant is not None else (None, None)
    rows, tokens = tuple(sorted({batch // m for m in ms})), max(1, round(context))
    key = (json.dumps(hf_config, sort_keys=True), quant, str(dtype), *kv, rows, tokens, str(device))
    if key not in _MEASURED:
        try:
            _MEASURED[key] = _layer_and_rest(hf_config, quant, dtype, *kv, rows, tokens, str(device),
                                             (gpu_memory, cpu_memory))
            if len(_MEASURED) > MAX_MEASURED:
                del _MEASURED[next(iter(_MEASURED))]
        except (torch.cuda.OutOfMemoryError, BudgetError, NotResidentError) as exc:
            warnings.warn(f"tiermem: the kernels' time of a decode step is not measured: a one- and a two-layer "
                          f"copy of the model cannot replay CUDA graphs within the budgets ({exc}); the plan counts "
                          "bytes at HBM's copy rate instead", stacklevel=2)
            return {}
    measured = _MEASURED[key]
    num_layers = model_config_from_hf(hf_config).num_layers
    return {m: m * (num_layers * measured[batch // m][0] + measured[batch // m][1]) for m in ms}
