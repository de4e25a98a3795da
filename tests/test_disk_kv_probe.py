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


def test_timed_workload_times_the_disk_kv_tier_only_with_an_offload_dir(monkeypatch, tmp_path):
    from tiermem import host_probe
    from tiermem.synthetic import SyntheticStore

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "host_step_seconds", lambda *args: {})
    monkeypatch.setattr(disk_kv_probe, "disk_kv_layer_seconds", lambda *args: asked.append(args) or 1e-3)
    store = SyntheticStore(preset("tiny-llama"), None, torch.bfloat16)
    cfg = model_config_from_hf(store.model_config)
    without = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False)
    assert without.disk_kv_s == 0.0 and not asked
    timed = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                      offload_dir=tmp_path)
    assert timed.disk_kv_s == pytest.approx(cfg.num_layers * 1e-3)
    (args,) = asked
    assert args[3:6] == (2, 32, tmp_path)  # batch, the mean context (30 + 4 / 2), offload_dir


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_disk_kv_tier_is_timed_on_the_gpu(tmp_path):
    seconds = disk_kv_probe.disk_kv_step_seconds(preset("llama3-8b"), torch.bfloat16, None, 4, 256, tmp_path)
    assert 32 * 1e-5 < seconds < 30
    assert not [p for p in os.listdir(tmp_path) if p.startswith(PREFIX)]


def test_no_probe_where_the_cache_would_not_fit_and_a_clear_error_for_no_directory(monkeypatch, tmp_path):
    """An offload_dir without room for the whole cache is not probed (the planner's byte estimate stands, and the
    load's own space check says what to do if it picks the disk); one that does not exist is a ConfigError."""
    import shutil
    from collections import namedtuple

    from tiermem import host_probe
    from tiermem.errors import ConfigError
    from tiermem.synthetic import SyntheticStore

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "host_step_seconds", lambda *args: {})
    monkeypatch.setattr(disk_kv_probe, "disk_kv_layer_seconds", lambda *args: asked.append(args) or 1e-3)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1000))
    store = SyntheticStore(preset("tiny-llama"), None, torch.bfloat16)
    cfg = model_config_from_hf(store.model_config)
    full = host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                     offload_dir=tmp_path)
    assert full.kv_reserved_bytes > 1000 and full.disk_kv_s == 0.0 and not asked
    with pytest.raises(ConfigError, match="does not exist"):
        host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                  offload_dir=tmp_path / "missing")


def test_no_probe_where_the_disk_tiers_own_buffers_go_over_a_budget(monkeypatch, tmp_path):
    """The probe takes the tier's buffers (two layers pinned, two and a half on the GPU): where they do not fit the
    budgets no plan can put the cache on disk, and timing it would go over a hard limit."""
    from tiermem import host_probe
    from tiermem.cost_model import kv_memory
    from tiermem.synthetic import SyntheticStore

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "host_step_seconds", lambda *args: {})
    monkeypatch.setattr(disk_kv_probe, "disk_kv_layer_seconds", lambda *args: asked.append(args) or 1e-3)
    store = SyntheticStore(preset("tiny-llama"), None, torch.bfloat16)
    cfg = model_config_from_hf(store.model_config)

    def timed(budgets):
        return host_probe.timed_workload(store, cfg, 2, 30, 4, torch.bfloat16, None, cpu_attention=False,
                                         offload_dir=tmp_path, budgets=budgets)

    gpu, pinned = kv_memory(timed(None).kv_reserved_bytes, cfg.num_layers, "disk", False)
    assert len(asked) == 1
    assert timed((gpu, pinned - 1)).disk_kv_s == 0.0 and timed((gpu - 1, pinned)).disk_kv_s == 0.0
    assert len(asked) == 1
    assert timed((gpu, pinned)).disk_kv_s > 0 and len(asked) == 2


def test_load_time_planning_times_the_disk_tier_within_its_budgets(monkeypatch, tmp_path):
    """placement.auto_plan (what load(plan="auto") runs) passes offload_dir and its budgets to the probe: the disk
    KV figure it plans with is the timed one."""
    from tiermem import host_probe
    from tiermem.kernels.quant import QuantScheme
    from tiermem.placement import auto_plan
    from tiermem.synthetic import SyntheticStore

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "host_step_seconds", lambda *args: {})
    monkeypatch.setattr(disk_kv_probe, "disk_kv_layer_seconds", lambda *args: asked.append(args) or 0.5)
    monkeypatch.setattr("tiermem.probe.cached_hardware", lambda **kw: HW)
    store = SyntheticStore(preset("tiny-llama"), QuantScheme.from_name("int4", 32), torch.bfloat16)
    cfg = model_config_from_hf(store.model_config)
    plan = auto_plan(store, cfg, torch.bfloat16, 1 << 30, 1 << 30, 2, 64, None, "disk", None, None,
                     offload_dir=tmp_path, device="cuda")
    assert plan.kv == "disk" and len(asked) == 1
    assert plan.breakdown["disk"] == pytest.approx(cfg.num_layers * 0.5)  # every weight resident: all of it KV
