"""The kernel-time probe (tiermem.gpu_probe) and how the cost model uses its figures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tiermem import gpu_probe
from tiermem.cost_model import Hardware, Workload, bound_of, kernels_may_bound, step_cost
from tiermem.errors import BudgetError, ConfigError, NotResidentError
from tiermem.kernels.quant import QuantScheme
from tiermem.presets import preset

HW = Hardware(disk_read_Bps=2e9, h2d_Bps=50e9, hbm_Bps=4e12, matmul_flops=6e14, cpu_memcpy_Bps=10e9)
SIZES = {"embed": 10, **{f"layers.{i}": 1_000_000 for i in range(4)}, "head": 10}
W = Workload(SIZES, num_layers=4, kv_bytes_per_token_layer=100, flops_per_token_layer=1e6, batch=4, prompt_len=8,
             gen_len=4, host_step_s={1: 1e-4, 2: 2e-4, 4: 4e-4})
RESIDENT = dict(resident=4_000_000, host=0, disk=0, micro_batches=2)


def test_measured_kernel_time_sets_the_step_where_it_is_the_slowest_stage():
    """The kernels' own time bounds a resident step from below where it exceeds the byte counts at the copy rate
    (max, like every overlapping stage), and is not counted where attention runs on the host."""
    plain = step_cost(W, HW, kv="gpu", cpu_cache_compute=False, **RESIDENT)
    assert plain["kernels"] == 0.0 and bound_of(plain) == "host"
    timed = step_cost(replace(W, gpu_step_s={1: 5e-3, 2: 7e-3, 4: 9e-3}), HW, kv="gpu", cpu_cache_compute=False,
                      **RESIDENT)
    assert timed["kernels"] == 7e-3 and timed["step"] == 7e-3 and bound_of(timed) == "kernels"
    streamed = step_cost(replace(W, gpu_step_s={2: 1e-5}, host_step_s={2: 1e-6}), HW, kv="gpu",
                         cpu_cache_compute=False, resident=0, host=4_000_000, disk=0, micro_batches=2)
    assert streamed["step"] == streamed["pcie"] > 1e-5
    on_host = step_cost(replace(W, gpu_step_s={2: 7e-3}, cpu_attention_s={2: 1e-3}), HW, kv="cpu",
                        cpu_cache_compute=True, **RESIDENT)
    assert on_host["kernels"] == 0.0


def test_with_cuda_graphs_the_replay_follows_the_hosts_part_of_the_step():
    """A graph's replay waits for the host to embed the step's token: the two add up (a sum where the eager step,
    issued as the GPU runs, costs the larger)."""
    timed = replace(W, gpu_step_s={1: 9e-3}, host_step_s={1: 2e-3})
    args = dict(kv="gpu", cpu_cache_compute=False, resident=4_000_000, host=0, disk=0, micro_batches=1)
    assert step_cost(timed, HW, **args)["step"] == 9e-3
    graphs = step_cost(replace(timed, cuda_graphs=True), HW, **args)
    assert graphs["step"] == pytest.approx(11e-3) and bound_of(graphs) == "kernels"


def test_no_kernel_time_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_probe.gpu_step_seconds(preset("llama3-8b"), QuantScheme.from_name("int4", 128), torch.bfloat16,
                                      None, 8, 1024.0) == {}


def test_a_step_is_the_rest_plus_the_depth_times_a_layer_once_per_micro_batch(monkeypatch):
    """gpu_step_seconds measures each micro-batch's rows once (a layer and the rest at the rounded context) and
    charges m micro-batches of batch / m rows each."""
    asked = []

    def fake(hf_config, quant, dtype, kv_name, kv_group, rows, context, device, budgets):
        asked.append((quant.name, dtype, kv_name, kv_group, rows, context, budgets))
        return {r: (1e-3 * r, 5e-3) for r in rows}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_probe, "_layer_and_rest", fake)
    monkeypatch.setattr(gpu_probe, "_MEASURED", {})
    args = (preset("llama3-8b"), QuantScheme.from_name("int4", 128), torch.bfloat16, QuantScheme.from_name("int8", 64),
            4, 1031.6)
    steps = gpu_probe.gpu_step_seconds(*args, gpu_memory=1 << 30, cpu_memory=2 << 30)
    assert asked == [("int4", torch.bfloat16, "int8", 64, (1, 2, 4), 1032, (1 << 30, 2 << 30))]
    assert steps == pytest.approx({m: m * (32 * 1e-3 * (4 // m) + 5e-3) for m in (1, 2, 4)})
    assert gpu_probe.gpu_step_seconds(*args) == steps and len(asked) == 1  # measured once, whatever the budgets
    monkeypatch.setattr(gpu_probe, "MAX_MEASURED", 2)
    for context in (100.0, 200.0):  # two more shapes: the first one is dropped
        gpu_probe.gpu_step_seconds(*args[:5], context)
    assert len(gpu_probe._MEASURED) == 2
    gpu_probe.gpu_step_seconds(*args)
    assert len(asked) == 4  # measured again


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory"), BudgetError("too small"),
                                   NotResidentError("3 blocks of this placement are streamed")])
def test_a_copy_that_does_not_fit_leaves_the_kernel_time_unmeasured_and_says_so(monkeypatch, error):
    def no_room(*args):
        raise error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_probe, "_layer_and_rest", no_room)
    monkeypatch.setattr(gpu_probe, "_MEASURED", {})
    with pytest.warns(UserWarning, match="not measured"):
        assert gpu_probe.gpu_step_seconds(preset("llama3-8b"), None, torch.bfloat16, None, 2, 64.0) == {}


def test_other_errors_of_the_probe_are_not_hidden(monkeypatch):
    def broken(*args):
        raise ConfigError("the KV cache is on cuda:0, the model on cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_probe, "_layer_and_rest", broken)
    monkeypatch.setattr(gpu_probe, "_MEASURED", {})
    with pytest.raises(ConfigError, match="cuda:0"):
        gpu_probe.gpu_step_seconds(preset("llama3-8b"), None, torch.bfloat16, None, 2, 64.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_gpu_the_one_and_two_layer_copies_predict_a_deeper_model(kv_quant):
    """The probe's extrapolation (rest + depth x layer) against the captured step of the whole model, 6 layers deep
    at a width where the kernels take tens of microseconds, int4 weights in bf16, batch 8 after 700 tokens."""
    from tiermem.api import load_from_reader
    from tiermem.synthetic import SyntheticStore

    config = dict(preset("llama-1b"), hidden_size=2048, intermediate_size=8192, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=8192, torch_dtype="bfloat16")
    int4, kv = QuantScheme.from_name("int4", 128), None if kv_quant is None else QuantScheme.from_name(kv_quant, 64)
    predicted = gpu_probe.gpu_step_seconds(config, int4, torch.bfloat16, kv, 8, 700.0)
    assert set(predicted) == {1, 2, 4, 8} and all(s > 0 for s in predicted.values())
    store = SyntheticStore(config, int4, torch.bfloat16, "cuda")
    with load_from_reader(store, "cuda", None, None, dtype=torch.bfloat16, max_batch_size=8, max_seq_len=1024,
                          kv_quant=kv_quant, kv_group_size=kv and 64, plan=None, cuda_graphs=True) as model:
        measured = gpu_probe._replay_seconds(model, 8, 700)
    assert predicted[1] == pytest.approx(measured, rel=0.15)


def test_kernels_may_bound_only_steps_within_a_few_times_the_bytes_at_hbms_rate():
    assert kernels_may_bound({"step": 0.02, "hbm": 0.003, "compute": 0.0004})  # resident, host-bound: 7x
    assert not kernels_may_bound({"step": 6.5, "hbm": 0.014, "compute": 0.002})  # 111B read from disk
    assert kernels_may_bound({"step": 0.01, "hbm": 0.0001, "compute": 0.002})  # compute-heavy


@pytest.mark.parametrize("shape,gpu,batch,max_seq,probed", [("llama3-8b", 40, 16, 2176, True),
                                                             ("llama-111b", 24, 64, 544, False)])
def test_the_planner_times_the_kernels_only_where_they_could_set_the_step(monkeypatch, shape, gpu, batch, max_seq,
                                                                          probed):
    """auto_plan plans without the kernels' time first; a plan within KERNELS_OVER_HBM of its HBM term (llama3-8b
    int4 resident at batch 16 x 2176, host-bound at 20 ms) is planned again with it, one bound by the disk (111B
    int4 in 24 GiB of GPU and 32 of RAM, batch 64 x 544) is not (its probe would load two 111B layers for
    nothing). The host probe and the kernel probe faked."""
    from tiermem import host_probe
    from tiermem.engine.config import model_config_from_hf
    from tiermem.placement import auto_plan
    from tiermem.synthetic import SyntheticStore

    probes = []
    monkeypatch.setattr("tiermem.probe.cached_hardware", lambda **kw: replace(HW, disk_read_Bps=1.6e9))
    monkeypatch.setattr(host_probe, "host_step_seconds", lambda *a: {m: 20e-3 * m for m in range(1, batch + 1)})
    monkeypatch.setattr(host_probe, "cpu_attention_step_seconds", lambda *a: {})

    def kernels(hf_config, quant, dtype, kv_quant, rows, context, device, gpu_memory, cpu_memory):
        probes.append((rows, round(context)))
        return {m: 0.1 * m for m in range(1, rows + 1)}  # slower than anything else: the plan must show it

    monkeypatch.setattr(gpu_probe, "gpu_step_seconds", kernels)
    reader = SyntheticStore(preset(shape), QuantScheme.from_name("int4", 128), torch.bfloat16)
    cfg = model_config_from_hf(reader.model_config)
    chosen = auto_plan(reader, cfg, torch.bfloat16, gpu << 30, 32 << 30, batch, max_seq, None, None, None, None,
                       cpu_attention=False)
    assert bool(probes) == probed
    assert (chosen.breakdown["kernels"] > 0) == probed
    if probed:
        gen = max_seq // 16  # auto_plan's: the prompt is the rest, the mean context half-way through the generation
        assert probes == [(batch, max_seq - gen + gen // 2)] and chosen.predicted_step_s >= 0.1
