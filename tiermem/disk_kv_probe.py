"""The disk KV tier's time per decode step, timed through DiskKVCache itself in the caller's offload_dir.

The KV bytes at the disk's read rate missed the tier's step by 24-33% at plan time (llama3-8b int4, batch
16 x 2048, session 7 call 1: 2.107 s predicted, 2.786 s measured for bf16 KV; 0.560 against 0.835 s for int4),
for two reasons the byte count cannot see: the scratch file in offload_dir read at 1.58-1.85 GB/s where the
store's probe had read 1.98, and each layer costs 3.1-4.9 ms that do not scale with its bytes (fitted to bf16 /
int4 pairs in benchmarks/results/disk_kv_fixed_cost.json; where they go is not known).
So, as CPU attention is (tiermem.host_probe), the tier is timed: a DiskKVCache of up to 1 GiB of the workload's
layers, rows and context in offload_dir, its file written with random bytes, synced and dropped from the page
cache, then decode steps appending one token to every layer, nothing else running (the GPU's share of a disk KV
step is small: its copies run on their own stream). The steady-state seconds per layer times the model's depth
are the step's disk KV time (cost_model.Workload.disk_kv_s). Planned with it, disk-KV steps came within 4-13% of
the measured ones (H200, session 8: bf16 / int4 KV at batch 16 x 2048 in two calls, int8 at 32 x 1024;
benchmarks/results/llama3_8b_int4_*_kv_disk*_s8call*_h200.json).
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import torch

from tiermem.engine.config import model_config_from_hf
from tiermem.kernels.quant import QuantScheme
from tiermem.placement import kv_cache_bytes

PROBE_BYTES = 1 << 30  # KV prefix read per probe step: the layers of the workload's shape that fit, at least 2
WARM_STEPS, TIMED_STEPS = 1, 2
FILL_CHUNK = 64 << 20


def _fill(file) -> None:
    """Write random bytes over the whole scratch file, sync it, and drop it from the page cache: the reads that
    follow come from the disk, as a run's do after its prompt."""
    chunk = torch.frombuffer(bytearray(os.urandom(min(FILL_CHUNK, file.nbytes))), dtype=torch.uint8)
    for offset in range(0, file.nbytes, chunk.numel()):
        file.write(offset, chunk[:file.nbytes - offset])
    os.fsync(file.fd)
    file.drop_cached(0, file.nbytes)


def disk_kv_layer_seconds(hf_config: dict, dtype: torch.dtype, kv_quant: QuantScheme | None, batch: int,
                          context: int, offload_dir: str | os.PathLike, device: str) -> float:
    """Wall seconds per layer of decode steps of `batch` rows at `context` cached tokens with the KV cache on disk
    in offload_dir (DiskKVCache, new K/V coming from `device`), in the steady state: after WARM_STEPS steps, the
    mean over TIMED_STEPS steps of up to PROBE_BYTES of layers each, each timed from its layer 0's prefix being read
    to the next step's (so every layer's read and write of a step, the next step's layer 0 primed, are in it)."""
    from tiermem.kv_disk import DiskKVCache

    cfg = model_config_from_hf(hf_config)
    layer_bytes = kv_cache_bytes(cfg, batch, context, dtype, kv_quant) // cfg.num_layers
    layers = max(2, min(cfg.num_layers, PROBE_BYTES // max(layer_bytes, 1)))
    shape = SimpleNamespace(num_layers=layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    steps = WARM_STEPS + TIMED_STEPS + 1
    cache = DiskKVCache.allocate(shape, batch, context + steps, dtype, device, kv_quant, offload_dir=offload_dir)
    try:
        _fill(cache.file)
        cache.length = context
        new = torch.randn(batch, cfg.num_kv_heads, 1, cfg.head_dim, dtype=dtype, device=device)  # [B, Hkv, 1, Dh]
        new_mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
        layer0_read: list[float] = []  # when each step had layer 0's prefix: one step's I/O from one to the next
        for _ in range(steps):
            cache.begin_step(new_mask)
            for layer in range(layers):
                cache.append(layer, slice(0, batch), new, new)  # waits until the layer's prefix is read
                if layer == 0:
                    layer0_read.append(time.perf_counter())
            cache.end_step(1)
        return (layer0_read[-1] - layer0_read[WARM_STEPS]) / (TIMED_STEPS * layers)
    finally:
        cache.close()


def disk_kv_step_seconds(hf_config: dict, dtype: torch.dtype, kv_quant: QuantScheme | None, batch: int,
                         context: float, offload_dir: str | os.PathLike, device: str = "cuda") -> float:
    """Seconds of a decode step's disk KV I/O (cost_model.Workload.disk_kv_s): the model's depth times
    disk_kv_layer_seconds at `batch` rows and `context` cached tokens (a few seconds, up to 1 GiB written to
    offload_dir and read back four times); 0.0 without CUDA, where the disk KV tier does not run (the cost model's
    KV bytes at the disk's read rate stand in)."""
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        return 0.0
    layers = model_config_from_hf(hf_config).num_layers
    return layers * disk_kv_layer_seconds(hf_config, dtype, kv_quant, batch, max(1, round(context)), offload_dir,
                                          str(device))
