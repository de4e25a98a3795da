"""The disk KV tier's probe (tiermem.disk_kv_probe) and how the cost model uses its figure."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from tiermem import disk_kv_probe
from tiermem.cost_model import Hardware, Workload, step_cost
from tiermem.engine.config import model_config_from_hf
from tiermem.kernels.quant import QuantScheme
from tiermem.kv_disk import DiskKVCache
from tiermem.presets import preset
from tiermem.scratch_file import PREFIX

HW = Hardware(disk_read_Bps=2e9, h2d_Bps=50e9, hbm_Bps=4e12, matmul_flops=6e14, cpu_memcpy_Bps=10e9)


def workload() -> Workload:
    sizes = {"embed": 10, **{f"layers.{i}": 1_000_000 for i in range(4)}, "head": 10}
    return Workload(sizes, num_layers=4, kv_bytes_per_token_layer=100, flops_per_token_layer=1e6, batch=4,
                    prompt_len=8, gen_len=4)


@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_the_probe_reads_every_layers_prefix_from_the_disk_and_removes_its_file(monkeypatch, tmp_path, kv_quant):
    """Warm and timed steps read each layer's filled prefix at the workload's context from a file in offload_dir
    (CPU here, SyncMover), then the file is gone."""
    reads = []
    read = DiskKVCache._read

    def counted(self, layer, length, slot):
        reads.append((layer, length, self.batch))
        return read(self, layer, length, slot)

    monkeypatch.setattr(DiskKVCache, "_read", counted)
    config = preset("tiny-llama")
    scheme = QuantScheme.from_name(kv_quant, 32) if kv_quant else None
    seconds = disk_kv_probe.disk_kv_layer_seconds(config, torch.bfloat16, scheme, 3, 40, tmp_path, "cpu")
    assert 0 < seconds < 5
    layers = model_config_from_hf(config).num_layers
    steps = disk_kv_probe.WARM_STEPS + disk_kv_probe.TIMED_STEPS + 1  # the last one ends the timed ones
    primed = (0, 40 + steps, 3)  # the last layer primes layer 0 of the next step
    assert sorted(reads) == sorted([*((layer, 40 + step, 3) for step in range(steps) for layer in range(layers)),
                                    primed])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(PREFIX)]


def test_the_probe_takes_as_many_layers_as_fit_its_bytes(monkeypatch, tmp_path):
    allocated = []
    allocate = DiskKVCache.allocate.__func__

    def recorded(cls, cfg, batch, max_len, *args, **kwargs):
        allocated.append(cfg.num_layers)
        return allocate(cls, cfg, batch, max_len, *args, **kwargs)

    monkeypatch.setattr(DiskKVCache, "allocate", classmethod(recorded))
    config = preset("tiny-llama")
    cfg = model_config_from_hf(config)
    layer_bytes = 2 * 2 * cfg.num_kv_heads * 16 * cfg.head_dim * 2  # K and V, batch 2, 16 tokens, bf16
    monkeypatch.setattr(disk_kv_probe, "PROBE_BYTES", layer_bytes)
    disk_kv_probe.disk_kv_layer_seconds(config, torch.bfloat16, None, 2, 16, tmp_path, "cpu")
    assert allocated == [2]  # at least two layers: the staging slots alternate


def test_the_step_figure_counts_every_layer_and_needs_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(disk_kv_probe, "disk_kv_layer_seconds", lambda *args: 2e-3)
    assert disk_kv_probe.disk_kv_step_seconds(preset("llama-111b"), torch.bfloat16, None, 2, 136.5, tmp_path) == \
        pytest.approx(80 * 2e-3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert disk_kv_probe.disk_kv_step_seconds(preset("llama-111b"), torch.bfloat16, None, 2, 136.5, tmp_path) == 0.0


def test_a_bad_offload_dir_is_a_clear_error(tmp_path):
    from tiermem.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        disk_kv_probe.disk_kv_layer_seconds(preset("tiny-llama"), torch.bfloat16, None, 2, 16, tmp_path / "no", "cpu")


def test_the_measured_disk_kv_time_replaces_the_bytes_at_the_read_rate():
    w = workload()
    args = dict(resident=0, host=0, disk=4_000_000, kv="disk", cpu_cache_compute=False, micro_batches=1)
    by_bytes = step_cost(w, HW, **args)
    kv_bytes = 4 * 4 * (8 + 2) * 100 + 4 * 4 * 100  # read back at the mean context, plus the new slots
    assert by_bytes["disk"] == pytest.approx((4_000_000 + kv_bytes) / HW.disk_read_Bps)
    measured = step_cost(replace(w, disk_kv_s=0.25), HW, **args)
    assert measured["disk"] == pytest.approx(4_000_000 / HW.disk_read_Bps + 0.25)
    assert measured["step"] == measured["disk"]
    on_gpu = step_cost(replace(w, disk_kv_s=0.25), HW, **dict(args, kv="gpu"))
    assert on_gpu["disk"] == pytest.approx(4_000_000 / HW.disk_read_Bps)  # only a disk KV cache costs it


LAYER_S = 1e-3  # what the stand-in probe of a layer returns


@pytest.fixture
def probe_calls(monkeypatch) -> list[tuple]:
    """CUDA taken as present, no host or kernel time measured, and disk_kv_layer_seconds standing in (it returns
    LAYER_S): the arguments of each of its calls."""
    from tiermem import gpu_probe, host_probe

    asked: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "host_step_seconds", lambda *args: {})
    monkeypatch.setattr(gpu_probe, "gpu_step_seconds", lambda *args: {})
    monkeypatch.setattr(disk_kv_probe, "disk_kv_layer_seconds", lambda *args: asked.append(args) or LAYER_S)
    return asked


def tiny_store(quant: QuantScheme | None = None):
    """tiny-llama's SyntheticStore (sizes only) and its ModelConfig."""
    from tiermem.synthetic import SyntheticStore

    store = SyntheticStore(preset("tiny-llama"), quant, torch.bfloat16)
    return store, model_config_from_hf(store.model_config)


def test_timed_workload_times_the_disk_kv_tier_only_with_an_offload_dir(probe_calls, tmp_path):
    from tiermem import host_probe

    store, cfg = tiny_store()
    without = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False)
    assert without.disk_kv_s == 0.0 and not probe_calls
    timed = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                      offload_dir=tmp_path)
    assert timed.disk_kv_s == pytest.approx(cfg.num_layers * LAYER_S)
    (args,) = probe_calls
    assert args[3:6] == (2, 32, tmp_path)  # batch, the mean context (30 + 4 / 2), offload_dir


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_disk_kv_tier_is_timed_on_the_gpu(tmp_path):
    seconds = disk_kv_probe.disk_kv_step_seconds(preset("llama3-8b"), torch.bfloat16, None, 4, 256, tmp_path)
    assert 32 * 1e-5 < seconds < 30
    assert not [p for p in os.listdir(tmp_path) if p.startswith(PREFIX)]


def test_no_probe_where_the_cache_would_not_fit_and_a_clear_error_for_no_directory(probe_calls, monkeypatch,
                                                                                  tmp_path):
    """An offload_dir without room for the whole cache is not probed (the planner's byte estimate stands, and the
    load's own space check says what to do if it picks the disk); one that does not exist is a ConfigError."""
    import shutil
    from collections import namedtuple

    from tiermem import host_probe
    from tiermem.errors import ConfigError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1000))
    store, cfg = tiny_store()
    full = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                     offload_dir=tmp_path)
    assert full.kv_reserved_bytes > 1000 and full.disk_kv_s == 0.0 and not probe_calls
    with pytest.raises(ConfigError, match="does not exist"):
        host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                  offload_dir=tmp_path / "missing")


def test_no_probe_where_the_disk_tiers_own_buffers_go_over_a_budget(probe_calls, tmp_path):
    """The probe takes the tier's buffers (two layers pinned, two and a half on the GPU): where they do not fit the
    budgets no plan can put the cache on disk, and timing it would go over a hard limit."""
    from tiermem import host_probe
    from tiermem.cost_model import kv_memory

    store, cfg = tiny_store()

    def timed(budgets):
        return host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                         offload_dir=tmp_path, budgets=budgets)

    gpu, pinned = kv_memory(timed(None).kv_reserved_bytes, cfg.num_layers, "disk", False)
    assert len(probe_calls) == 1
    assert timed((gpu, pinned - 1)).disk_kv_s == 0.0 and timed((gpu - 1, pinned)).disk_kv_s == 0.0
    assert len(probe_calls) == 1
    assert timed((gpu, pinned)).disk_kv_s > 0 and len(probe_calls) == 2


def test_load_time_planning_times_the_disk_tier_within_its_budgets(probe_calls, monkeypatch, tmp_path):
    """placement.auto_plan (what load(plan="auto") runs) passes offload_dir and its budgets to the probe: the disk
    KV figure it plans with is the timed one."""
    from tiermem.placement import auto_plan

    monkeypatch.setattr("tiermem.probe.cached_hardware", lambda **kw: HW)
    store, cfg = tiny_store(QuantScheme.from_name("int4", 32))
    plan = auto_plan(store, cfg, torch.bfloat16, 1 << 30, 1 << 30, 2, 64, None, "disk", None, None,
                     offload_dir=tmp_path, device="cuda")
    assert plan.kv == "disk" and len(probe_calls) == 1
    assert plan.breakdown["disk"] == pytest.approx(cfg.num_layers * LAYER_S)  # every weight resident: all of it KV


def test_a_fixed_placement_elsewhere_or_cpu_attention_is_not_timed_on_disk(probe_calls, monkeypatch, tmp_path):
    """timed_workload times the disk KV tier only where the plan may put the cache there: not with the KV placement
    fixed on the GPU or in host RAM, nor with CPU attention fixed (its cache lives in host RAM)."""
    from tiermem import host_probe

    monkeypatch.setattr(host_probe, "cpu_attention_step_seconds", lambda *args: {1: 0.1})
    store, cfg = tiny_store()
    for kv, attention in (("gpu", False), ("cpu", False), (None, True)):
        workload = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, kv=kv,
                                             cpu_attention=attention, offload_dir=tmp_path)
        assert workload.disk_kv_s == 0.0, (kv, attention)
    assert not probe_calls
