"""The host-time probe (tiermem.host_probe) and how the cost model uses its figures."""

from __future__ import annotations

import pytest
import torch

from tiermem.cost_model import Hardware, Workload, step_cost
from tiermem.engine.config import model_config_from_hf
from tiermem.host_probe import HostTime, host_step_seconds, measure_host_time, narrow_config
from tiermem.kernels.quant import QuantScheme
from tiermem.planner import plan
from tiermem.presets import preset

HW = Hardware(disk_read_Bps=2e9, h2d_Bps=50e9, hbm_Bps=4e12, matmul_flops=6e14, cpu_memcpy_Bps=10e9)
GiB = 1 << 30


@pytest.mark.parametrize("shape", ["llama3-8b", "llama-111b", "llama-7b", "opt-30b", "qwen3-32b", "mixtral-8x22b",
                                   "qwen3-235b-a22b", "phi-4"])
def test_the_narrow_model_keeps_the_code_path_and_is_small(shape):
    full = model_config_from_hf(preset(shape))
    narrow = model_config_from_hf(narrow_config(preset(shape), 2, quant_group=128))
    assert narrow.num_layers == 2 and narrow.family == full.family
    assert (narrow.model_type, narrow.qk_norm, narrow.rope) == (full.model_type, full.qk_norm, full.rope)
    assert narrow.head_dim == full.head_dim
    assert narrow.num_heads // narrow.num_kv_heads == full.num_heads // full.num_kv_heads
    assert narrow.hidden_size % 256 == 0 and narrow.hidden_size <= 2048
    assert narrow.vocab_size < 2048
    if full.moe is not None:  # the same experts, top_k and sparse layers, at most 2 x 256 wide
        assert (narrow.moe.num_experts, narrow.moe.top_k) == (full.moe.num_experts, full.moe.top_k)
        assert narrow.moe.sparse_layers == full.moe.sparse_layers[:2]
        assert narrow.moe.intermediate_size <= 2 * narrow.hidden_size


def test_host_time_scales_with_micro_batches():
    t = HostTime(rows=4, num_layers=10, step_seconds=15e-3)
    assert t.step_s(1) == pytest.approx(15e-3)
    assert t.step_s(4) == pytest.approx(60e-3)


def test_the_narrow_model_has_the_depth_it_is_asked_for():
    assert model_config_from_hf(narrow_config(preset("llama-111b"), 80, quant_group=128)).num_layers == 80


def workload(host: dict[int, float]) -> Workload:
    sizes = {"embed": 10, **{f"layers.{i}": 1_000_000 for i in range(4)}, "head": 10}
    return Workload(sizes, num_layers=4, kv_bytes_per_token_layer=100, flops_per_token_layer=1e6, batch=4,
                    prompt_len=8, gen_len=4, host_step_s=host)


def test_the_step_costs_the_host_time_when_issuing_is_slower_than_every_link():
    w = workload({1: 0.5, 2: 0.9, 4: 1.7})
    cost = step_cost(w, HW, resident=4_000_000, host=0, disk=0, kv="gpu", cpu_cache_compute=False,
                     micro_batches=2)
    assert cost["host"] == 0.9 and cost["step"] == 0.9  # max, not a sum: the host issues ahead of the GPU
    quick = step_cost(workload({1: 1e-9, 2: 1e-9, 4: 1e-9}), HW, resident=0, host=4_000_000, disk=0, kv="gpu",
                      cpu_cache_compute=False, micro_batches=2)
    assert quick["step"] == quick["pcie"]


def test_unmeasured_host_time_falls_back_to_the_per_layer_figure():
    cost = step_cost(workload({}), HW, resident=4_000_000, host=0, disk=0, kv="gpu", cpu_cache_compute=False,
                     micro_batches=2, per_layer_overhead_s=0.25)
    assert cost["host"] == pytest.approx(0.25 * 4 * 2)


def test_the_planner_splits_a_batch_only_when_that_pays():
    w = workload({1: 0.5, 2: 0.9, 4: 1.7})
    chosen = plan(w, HW, 1 * GiB, 1 * GiB)
    assert chosen.micro_batches == 1 and chosen.bound == "host" and chosen.predicted_step_s == 0.5
    # every split hidden behind the disk: the ties go to one micro-batch
    hidden = plan(workload({1: 1e-6, 2: 2e-6, 4: 4e-6}), HW, 1 * GiB, 1 * GiB, gpu_blocks=0, host_blocks=0)
    assert hidden.disk_blocks and hidden.micro_batches == 1


def test_without_cuda_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert host_step_seconds(preset("tiny-llama"), None, torch.bfloat16, None, 8) == {}
    assert host_step_seconds(preset("tiny-llama"), None, torch.bfloat16, None, 8, device="cpu") == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_host_time_is_measured_on_the_gpu(kv_quant):
    config = preset("llama3-8b")
    t = measure_host_time(config, QuantScheme.from_name("int4", 128), torch.bfloat16, kv_quant, None, 4)
    assert t.num_layers == 32 and 32 * 1e-6 < t.step_seconds < 1
    steps = host_step_seconds(config, QuantScheme.from_name("int4", 128), torch.bfloat16,
                              QuantScheme.from_name(kv_quant, 128), 4)
    assert set(steps) == {1, 2, 4} and steps[4] > steps[1]


def test_each_split_is_timed_at_its_rows_and_counted_once_per_micro_batch(monkeypatch):
    """host_step_seconds times a step of batch / m rows for every divisor m and charges it m times (CUDA faked, the
    measurement replaced by a step time that grows with the rows)."""
    from tiermem import host_probe

    asked = []

    def fake(hf_config, quant, dtype, kv_name, kv_group, rows, device, cuda_graphs):
        asked.append(("graphs", rows) if cuda_graphs else rows)
        return HostTime(rows, model_config_from_hf(hf_config).num_layers, 1e-3 * (10 + rows))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "measure_host_time", fake)
    steps = host_step_seconds(preset("llama3-8b"), None, torch.bfloat16, None, 8)
    assert sorted(asked) == [1, 2, 4, 8]
    assert steps == pytest.approx({1: 18e-3, 2: 2 * 14e-3, 4: 4 * 12e-3, 8: 8 * 11e-3})
    asked.clear()  # CUDA graphs replay whole-batch steps: one split, timed as graph replays
    assert host_step_seconds(preset("llama3-8b"), None, torch.bfloat16, None, 8, cuda_graphs=True) == \
        pytest.approx({1: 18e-3})
    assert asked == [("graphs", 8)]


@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_cpu_attention_is_timed_through_host_attend_at_the_workloads_shape(monkeypatch, kv_quant):
    """Every split m of the batch calls HostKVCache.attend m times per layer over batch / m rows of `context`
    cached tokens (a warm pass, then the timed ones), and the figure is one layer's seconds (CPU only here)."""
    from tiermem import host_probe
    from tiermem.kv_offload import HostKVCache

    calls = []
    attend = HostKVCache.attend

    def counted(self, layer, rows, q, k, v, mask, scale):
        out = attend(self, layer, rows, q, k, v, mask, scale)
        calls.append((layer, rows.stop - rows.start, self.length + 1))
        assert out.shape == q.shape
        return out

    monkeypatch.setattr(HostKVCache, "attend", counted)
    config = preset("tiny-llama")
    scheme = QuantScheme.from_name(kv_quant, 32) if kv_quant else None
    seconds = host_probe._cpu_attention_layer_seconds(config, torch.bfloat16, scheme, 4, 24, "cpu")
    assert set(seconds) == {1, 2, 4} and all(s > 0 for s in seconds.values())
    layers = model_config_from_hf(config).num_layers
    passes = 1 + host_probe.ATTENTION_TIMED_PASSES
    assert len(calls) == passes * layers * (1 + 2 + 4)
    assert {rows for _, rows, _ in calls} == {1, 2, 4} and {ctx for *_, ctx in calls} == {24}


def test_cpu_attention_step_counts_every_layer(monkeypatch):
    from tiermem import host_probe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "_cpu_attention_layer_seconds",
                        lambda cfg, dtype, kv_quant, batch, context, device: {1: 1e-3, 2: 3e-3})
    assert host_probe.cpu_attention_step_seconds(preset("llama-111b"), torch.bfloat16, None, 2, 136.5) == \
        pytest.approx({1: 80e-3, 2: 240e-3})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert host_probe.cpu_attention_step_seconds(preset("llama-111b"), torch.bfloat16, None, 2, 136.5) == {}


def test_measured_cpu_attention_replaces_the_copy_rate_figure():
    w = workload({1: 1e-3, 2: 2e-3, 4: 4e-3})
    args = dict(resident=4_000_000, host=0, disk=0, kv="cpu", cpu_cache_compute=True, micro_batches=2)
    by_bytes = step_cost(w, HW, **args)
    assert by_bytes["cpu_attention"] == pytest.approx(4 * 4 * 10 * 100 / HW.cpu_memcpy_Bps)
    from dataclasses import replace

    measured = step_cost(replace(w, cpu_attention_s={1: 0.5, 2: 0.7}), HW, **args)
    assert measured["cpu_attention"] == 0.7 and measured["step"] == pytest.approx(0.7 + max(
        measured[k] for k in ("disk", "pcie", "hbm", "compute", "host")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_attention_is_measured_with_the_query_on_the_gpu():
    from tiermem.host_probe import cpu_attention_step_seconds

    steps = cpu_attention_step_seconds(preset("llama3-8b"), torch.bfloat16, None, 4, 64)
    assert set(steps) == {1, 2, 4} and all(32 * 1e-6 < s < 5 for s in steps.values())
