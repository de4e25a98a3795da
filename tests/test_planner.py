"""The planner: fixed H200 figures, known shapes, overrides, exactness against brute force, CPU attention and
HBM traffic choices (recorded benchmark runs against their predictions: test_recorded_runs.py)."""

import functools
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tiermem.cli import main
from tiermem.cost_model import KV_MODES, divisors, step_cost
from tiermem.engine.config import model_config_from_hf
from tiermem.errors import BudgetError, ConfigError
from tiermem.kernels.quant import QuantScheme
from tiermem.planner import MIN_DISK_LOOKAHEAD, Hardware, Plan, Workload, plan, predict, spread
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore

GiB = 2**30
H200 = Hardware(disk_read_Bps=1.3e9, h2d_Bps=55.5e9, hbm_Bps=4.2e12, matmul_flops=6e14, cpu_memcpy_Bps=10e9)
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@functools.cache
def _block_bytes(shape: str, quant: str | None, group: int, dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    store = SyntheticStore(preset(shape), QuantScheme.from_name(quant, group) if quant else None, dtype)
    return tuple((b, store.block_nbytes(b)) for b in store.block_names)


def workload(shape: str, quant: str | None = None, group: int = 64, dtype: torch.dtype = torch.float16,
             **kw) -> Workload:
    cfg = model_config_from_hf(preset(shape))
    kw.setdefault("quantized", quant is not None)
    return Workload.from_config(cfg, dict(_block_bytes(shape, quant, group, dtype)), dtype=dtype, **kw)


def weights(w: Workload, names) -> int:
    return sum(w.block_bytes[b] for b in names)


def fits(p: Plan, gpu: int, cpu: int) -> bool:
    return p.memory["gpu"] <= gpu and p.memory["host"] <= cpu


def test_everything_fits_in_hbm_is_all_resident_and_hbm_bound():
    w = workload("llama-7b", batch=1, prompt_len=128, gen_len=32)
    p = plan(w, H200, 80 * GiB, 64 * GiB)
    assert p.gpu_blocks == w.streamable and not p.host_blocks and not p.disk_blocks
    assert p.kv == "gpu" and p.micro_batches == 1 and p.bound == "hbm"
    kv = w.num_layers * (w.mean_context + 1) * w.kv_bytes_per_token_layer
    expected = (weights(w, w.streamable) + kv) / H200.hbm_Bps
    assert expected > 50e-6 * w.num_layers  # the host time the default stands in for is hidden behind HBM
    assert p.predicted_step_s == pytest.approx(expected, rel=1e-9)
    assert p.predicted_tok_per_s == pytest.approx(1 / expected, rel=1e-9)


def test_opt30b_in_24gib_streams_the_rest_from_host_at_pcie_speed():
    w = workload("opt-30b", batch=1, prompt_len=512, gen_len=32)
    p = plan(w, H200, 24 * GiB, 200 * GiB)
    assert 0 < len(p.gpu_blocks) < len(w.streamable) and p.host_blocks and not p.disk_blocks
    assert p.bound == "pcie" and p.memory["gpu"] <= 24 * GiB
    streamed = weights(w, p.host_blocks)
    assert p.predicted_step_s == pytest.approx(streamed / H200.h2d_Bps, rel=1e-3)
    # the resident prefix is as long as the budget allows: one more layer would not fit
    more = Plan.build(w, len(p.gpu_blocks) + 1, kv=p.kv, cpu_cache_compute=p.cpu_cache_compute, lookahead=1)
    assert predict(more, w, H200).memory["gpu"] > 24 * GiB


def test_small_cpu_memory_streams_from_disk_and_disk_dominates():
    w = workload("opt-30b", batch=1, prompt_len=512, gen_len=32)
    p = plan(w, H200, 24 * GiB, 24 * GiB)
    assert p.disk_blocks and p.host_blocks and p.bound == "disk"
    assert p.memory["host"] <= 24 * GiB and p.memory["host_staging"] > 0
    expected = weights(w, p.disk_blocks) / H200.disk_read_Bps
    assert p.predicted_step_s == pytest.approx(expected, rel=1e-9)
    assert p.breakdown["disk"] > 5 * p.breakdown["pcie"]


def _int4_block(rows: int, cols: int, group: int) -> int:
    return rows * cols // 2 + 2 * 2 * rows * (cols // group)  # packed nibbles + fp16 scale and zero per group


def test_llama111b_int4_in_24gib_gpu_32gib_host_streams_from_disk():
    D, F, V, L, Dkv, g = 12288, 28672, 32768, 80, 8 * 128, 128
    layer = (_int4_block(D, D, g) * 2 + _int4_block(Dkv, D, g) * 2 + _int4_block(F, D, g) * 2
             + _int4_block(D, F, g) + 2 * D * 2)
    stored = lambda n: 4096 + -(-n // 4096) * 4096  # noqa: E731  (a 4 KiB safetensors header, 4 KiB multiples)
    sizes = {"embed": stored(V * D * 2), **{f"layers.{i}": stored(layer) for i in range(L)},
             "head": stored(D * 2 + _int4_block(V, D, g))}
    assert sizes == dict(_block_bytes("llama-111b", "int4", 128, torch.bfloat16))  # same as the store layout
    w = workload("llama-111b", "int4", 128, torch.bfloat16, batch=1, prompt_len=512, gen_len=32)
    p = plan(w, H200, 24 * GiB, 32 * GiB)
    assert p.gpu_blocks and p.host_blocks and p.disk_blocks and p.bound == "disk"
    assert fits(p, 24 * GiB, 32 * GiB)
    assert weights(w, p.disk_blocks) + weights(w, p.host_blocks) + weights(w, p.gpu_blocks) == sum(
        sizes[b] for b in w.streamable)


def test_kv_moves_to_the_cpu_when_it_no_longer_fits_the_gpu():
    small = plan(workload("llama-13b", dtype=torch.bfloat16, batch=1, prompt_len=512, gen_len=32),
                 H200, 24 * GiB, 256 * GiB)
    big_w = workload("llama-13b", dtype=torch.bfloat16, batch=64, prompt_len=512, gen_len=32)
    assert big_w.kv_reserved_bytes > 24 * GiB
    big = plan(big_w, H200, 24 * GiB, 256 * GiB)
    assert small.kv == "gpu" and big.kv == "cpu"
    assert big.memory["host_kv"] == big_w.kv_reserved_bytes and big.memory["gpu_kv"] < big_w.kv_reserved_bytes
    with pytest.raises(BudgetError):
        plan(big_w, H200, 24 * GiB, 256 * GiB, kv="gpu")


def test_overrides_are_respected():
    w = workload("opt-30b", batch=8, prompt_len=256, gen_len=32)
    free = plan(w, H200, 24 * GiB, 200 * GiB)
    p = plan(w, H200, 24 * GiB, 200 * GiB, gpu_blocks=5, kv="cpu", cpu_cache_compute=False, micro_batches=2,
             lookahead=3)
    assert (len(p.gpu_blocks), p.kv, p.cpu_cache_compute, p.micro_batches, p.lookahead) == (5, "cpu", False, 2, 3)
    assert p.predicted_step_s >= free.predicted_step_s
    named = plan(w, H200, 24 * GiB, 200 * GiB, gpu_blocks=["head", "layers.3"], host_blocks=10)
    assert named.gpu_blocks == ("layers.3", "head") and len(named.host_blocks) == 10
    assert len(named.disk_blocks) == len(w.streamable) - 12
    none_resident = plan(w, H200, 24 * GiB, 200 * GiB, gpu_blocks=0)
    assert not none_resident.gpu_blocks
    with pytest.raises(ConfigError):
        plan(w, H200, 24 * GiB, 200 * GiB, micro_batches=3)
    with pytest.raises(ConfigError):
        plan(w, H200, 24 * GiB, 200 * GiB, kv="gpu", cpu_cache_compute=True)
    with pytest.raises(ConfigError):
        plan(w, H200, 24 * GiB, 200 * GiB, gpu_blocks=["embed"])  # host-only, not placeable


def test_nothing_fits_raises_budget_error():
    w = workload("opt-30b", batch=1, prompt_len=512, gen_len=32)
    with pytest.raises(BudgetError, match="gpu_memory 1.00 GiB"):
        plan(w, H200, 1 * GiB, 200 * GiB)
    with pytest.raises(BudgetError, match="choices fixed by the caller"):
        plan(w, H200, 24 * GiB, 200 * GiB, gpu_blocks=len(w.streamable))


@pytest.mark.parametrize("case", [("opt-30b", None, 1, 24, 200), ("opt-30b", None, 32, 24, 200),
                                  ("opt-30b", None, 1, 24, 24), ("llama-111b", "int4", 1, 24, 32),
                                  ("llama-13b", None, 16, 24, 128)])
def test_plan_beats_hand_written_alternatives(case):
    shape, quant, batch, gpu, cpu = case
    w = workload(shape, quant, 128, torch.bfloat16, batch=batch, prompt_len=512, gen_len=32)
    best = plan(w, H200, gpu * GiB, cpu * GiB)
    n = len(w.streamable)
    tried = 0
    for resident, host, (kv, ccc), micro, la in itertools.product(
            [0, 1, n // 4, n // 3, n // 2, n - 1], [None, 0, n // 4, n // 2], KV_MODES, [1, 2, batch], [1, 2, 3]):
        if batch % micro or (host or 0) > n - resident:
            continue
        alt = predict(Plan.build(w, resident, host, kv=kv, cpu_cache_compute=ccc, micro_batches=micro,
                                 lookahead=la), w, H200)
        if fits(alt, gpu * GiB, cpu * GiB):
            tried += 1
            assert best.predicted_step_s <= alt.predicted_step_s * (1 + 1e-9), alt.describe()
    assert tried > 0


def _tiny() -> Workload:
    sizes = {"embed": 400, "layers.0": 1000, "layers.1": 1000, "layers.2": 1300, "layers.3": 1000, "head": 1500}
    return Workload(block_bytes=sizes, num_layers=4, kv_bytes_per_token_layer=20, flops_per_token_layer=2000.0,
                    batch=4, prompt_len=6, gen_len=4, head_flops_per_token=3000.0, attn_flops_per_token_ctx_layer=80.0,
                    act_bytes_per_token_layer=20, workspace_bytes={1: 900, 2: 500, 4: 300})


TINY_HW = Hardware(disk_read_Bps=800.0, h2d_Bps=4000.0, hbm_Bps=30000.0, matmul_flops=3e5, cpu_memcpy_Bps=2000.0)


@functools.lru_cache(maxsize=1)
def _every_tiny_plan() -> list[Plan]:
    """Every placement of the tiny model (3^5 tier assignments x KV modes x micro-batches x lookaheads)."""
    w = _tiny()
    order = w.streamable
    every = []
    for tiers in itertools.product("ghd", repeat=len(order)):
        placed = {t: tuple(b for b, x in zip(order, tiers, strict=True) if x == t) for t in "ghd"}
        for (kv, ccc), micro, la in itertools.product(KV_MODES, divisors(w.batch), (1, 2, 3)):
            if placed["d"] and la < MIN_DISK_LOOKAHEAD:
                continue  # the planner never reads from disk with fewer reads in flight
            for prefill in (d for d in divisors(w.batch) if d >= micro):
                p = Plan(placed["g"], placed["h"], placed["d"], kv, ccc, micro, la,
                         prefill_micro_batches=None if prefill == micro else prefill)
                every.append(predict(p, w, TINY_HW, per_layer_overhead_s=0.01))
    return every


def _matches(p: Plan, fixed: dict) -> bool:
    for key, value in fixed.items():
        attr = {"gpu_blocks": p.gpu_blocks, "host_blocks": p.host_blocks}.get(key, getattr(p, key, None))
        if isinstance(value, int) and key in ("gpu_blocks", "host_blocks"):
            if len(attr) != value:
                return False
        elif isinstance(value, list):
            if set(attr) != set(value):
                return False
        elif attr != value:
            return False
    return True


@pytest.mark.parametrize("fixed", [{}, {"lookahead": 2}, {"kv": "cpu"}, {"cpu_cache_compute": False},
                                   {"micro_batches": 2}, {"gpu_blocks": 2}, {"host_blocks": 1},
                                   {"gpu_blocks": ["head"]}, {"host_blocks": ["layers.2", "layers.3"]},
                                   {"gpu_blocks": []}, {"host_blocks": [], "lookahead": 3},
                                   {"gpu_blocks": 1, "host_blocks": ["layers.0"], "kv": "gpu"}])
def test_search_is_exact_against_brute_force(fixed):
    w = _tiny()
    candidates = [p for p in _every_tiny_plan() if _matches(p, fixed)]
    gpu_mem = np.array([p.memory["gpu"] for p in candidates])
    host_mem = np.array([p.memory["host"] for p in candidates])
    steps = np.array([p.predicted_step_s for p in candidates])
    kinds, checked = set(), 0
    grid = 500
    for gpu, cpu in itertools.product(range(2500, 11001, grid), range(1000, 8001, grid)):
        feasible = steps[(gpu_mem <= gpu) & (host_mem <= cpu)]
        if not feasible.size:
            with pytest.raises(BudgetError):
                plan(w, TINY_HW, gpu, cpu, per_layer_overhead_s=0.01, **fixed)
            continue
        got = plan(w, TINY_HW, gpu, cpu, per_layer_overhead_s=0.01, **fixed)
        assert fits(got, gpu, cpu) and _matches(got, fixed)
        assert got.predicted_step_s == pytest.approx(feasible.min(), rel=1e-9), (gpu, cpu, got.describe())
        split = got.prefill_micro_batches or got.micro_batches
        kinds.add((bool(got.host_blocks), bool(got.disk_blocks), got.kv, got.cpu_cache_compute, split > 1, got.bound))
        checked += 1
    assert checked >= 10
    if not fixed:  # the budgets exercise host, KV and micro-batch choices
        assert checked >= 100 and len(kinds) >= 10, kinds


def test_search_is_fast_for_80_layers():
    for batch in (1, 64):
        w = workload("llama-111b", "int4", 128, torch.bfloat16, batch=batch, prompt_len=512, gen_len=32)
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            plan(w, H200, 24 * GiB, 256 * GiB)
            seconds.append(time.perf_counter() - start)
        assert min(seconds) < 0.1


def test_hardware_json_round_trip_and_errors():
    assert Hardware.from_json(H200.to_json()) == H200
    assert Hardware.from_json({**json.loads(H200.to_json()), "extra": 1}) == H200
    with pytest.raises(ConfigError, match="lacks"):
        Hardware.from_json('{"h2d_Bps": 1}')
    with pytest.raises(ConfigError, match="positive"):
        Hardware(disk_read_Bps=0, h2d_Bps=1, hbm_Bps=1, matmul_flops=1, cpu_memcpy_Bps=1)
    with pytest.raises(ConfigError):
        predict(Plan(("layers.0",), (), ()), _tiny(), TINY_HW)  # not every block placed


def test_spread_spaces_blocks_evenly():
    names = [f"layers.{i}" for i in range(10)]
    assert spread(names, 0) == [] and spread(names, 10) == names and spread(names, 12) == names
    assert spread(names, 2) == ["layers.2", "layers.7"]
    assert spread(names, 5) == ["layers.1", "layers.3", "layers.5", "layers.7", "layers.9"]


def test_plan_interleaves_resident_and_streamed_layers():
    """A resident prefix would leave PCIe idle while the GPU computes it; the plan spreads the tiers."""
    w = workload("opt-30b", batch=16, prompt_len=512, gen_len=32)
    p = plan(w, H200, 24 * GiB, 24 * GiB)
    layers = [b for b in w.streamable if b.startswith("layers.")]
    for tier in (p.gpu_blocks, p.host_blocks, p.disk_blocks):
        index = [layers.index(b) for b in tier if b in layers]
        assert len(index) > 2
        gaps = [b - a for a, b in zip(index, index[1:], strict=False)]
        assert max(gaps) <= 2 * len(layers) / len(index) + 1  # spaced out, not one contiguous run
        assert index[0] < len(layers) // 2 < index[-1]


def test_describe_names_tiers_memory_and_time():
    w = workload("opt-30b", batch=1, prompt_len=512, gen_len=32)
    text = "\n".join(plan(w, H200, 24 * GiB, 24 * GiB).describe())
    for word in ("GPU-resident", "pinned host", "from disk", "KV cache", "GPU memory", "host memory",
                 "predicted decode step", "bound: disk", "more ..."):
        assert word in text
    assert math.isnan(Plan((), (), ()).predicted_step_s) and "predicted" not in "\n".join(Plan((), (), ()).describe())


def test_cli_plan_prints_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--synthetic", "llama-111b", "--quant", "int4", "--group-size", "128",
                 "--gpu-memory", "24GiB", "--cpu-memory", "32GiB", "--hardware", str(hw), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "from disk" in out and "tok/s" in out and "predicted:" in out
    assert f"rates ({hw}): disk 1.30 GB/s, PCIe 55.5 GB/s, HBM 4200 GB/s" in out
    assert main(["plan", "--synthetic", "opt-30b", "--gpu-memory", "24GiB", "--cpu-memory", "48GiB",
                 "--hardware", str(hw), "--refresh-probe"]) == 2
    assert "pass one" in capsys.readouterr().err
    assert ("host time not measured" in out) == (not torch.cuda.is_available())
    assert json.loads(out_json.read_text())["plan"]["disk_blocks"]
    if not torch.cuda.is_available():
        assert main(["plan", "--synthetic", "opt-30b", "--gpu-memory", "24GiB", "--cpu-memory", "48GiB"]) == 2
        assert "--hardware" in capsys.readouterr().err
    assert main(["plan", "--gpu-memory", "24GiB", "--cpu-memory", "48GiB", "--hardware", str(hw)]) == 2
    assert "STORE or --synthetic" in capsys.readouterr().err


def test_cli_plan_reads_a_store(tmp_path, capsys):
    from hf_models import build_tiny

    src = build_tiny("llama2", tmp_path / "hf")
    store = tmp_path / "store"
    assert main(["pack", str(src), str(store), "--quant", "int4", "--group-size", "32"]) == 0
    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    assert main(["plan", str(store), "--gpu-memory", "1GiB", "--cpu-memory", "1GiB", "--batch", "4",
                 "--prompt-len", "8", "--gen-len", "4", "--hardware", str(hw)]) == 0
    out = capsys.readouterr().out
    assert "bound: host" in out and "from disk         0 blocks" in out  # a tiny model: launches, not bytes
    assert main(["plan", str(store), "--gpu-memory", "1GiB", "--cpu-memory", "1GiB", "--micro-batches", "3",
                 "--hardware", str(hw)]) == 2
    assert "micro_batches must divide" in capsys.readouterr().err


def test_a_large_batch_splits_the_prompt_not_the_decode_steps():
    """111B int4, batch 64 x 518 tokens in 24 GiB: the prompt's activations need the batch split; decode steps
    (one token per row) do not, and each extra decode micro-batch costs launches on every layer. The plan
    splits only the prompt, and its workspace is the larger of the two."""
    cfg = model_config_from_hf(preset("llama-111b"))
    w = Workload.from_config(cfg, dict(_block_bytes("llama-111b", "int4", 128, torch.bfloat16)), 64, 512, 6,
                             torch.bfloat16, quantized=True)
    p = plan(w, H200, 24 * GiB, 32 * GiB)
    assert p.micro_batches == 1 and p.prefill_micro_batches is not None and p.prefill_micro_batches > 1
    assert p.memory["gpu_workspace"] == max(w.workspace_bytes[p.prefill_micro_batches], w.decode_workspace_bytes[1])
    whole = predict(Plan(p.gpu_blocks, p.host_blocks, p.disk_blocks, p.kv, micro_batches=1, lookahead=p.lookahead),
                    w, H200)
    assert whole.memory["gpu"] > 24 * GiB  # the same placement without the prompt split does not fit


def test_bench_predicts_the_followed_plan_from_the_runs_own_rates():
    """tiermem bench records, per run, the followed plan's step time under the link rates measured in that run: the
    disk's that of the reader the disk tier used (POSIX here), not the faster dd's."""
    from types import SimpleNamespace

    from tiermem.bench import same_run_prediction, same_run_workload
    from tiermem.kernels.kv_quant import kv_scheme

    config = preset("opt-1.3b")
    store = SyntheticStore(config, QuantScheme.from_name("int4", 64), torch.float16)
    cfg = model_config_from_hf(config)
    sizes = {b: store.block_nbytes(b) for b in store.block_names}
    w = Workload.from_config(cfg, sizes, 8, 64, 8, torch.float16, quantized=True, kv_quant=kv_scheme("int8", 64))
    chosen = plan(w, H200, 1 * GiB, 64 * GiB)
    ceilings = {"h2d_pinned_Bps": 50e9, "hbm_Bps": 3e12, "disk_read_posix_direct_Bps": 1.5e9,
                "disk_read_dd_direct_Bps": 1.8e9, "disk_read_kvikio_Bps": 1.2e9}
    source = SimpleNamespace(followed_plan=chosen, describe=lambda: {"read_backend": "posix"})
    model = SimpleNamespace(source=source, reader=store, config=cfg,
                            dtype=torch.float16, kv_quant=kv_scheme("int8", 64), device=torch.device("cpu"),
                            cpu_attention=False, offload_dir=None, kv_placement="gpu", cuda_graphs=False)
    same_run = same_run_workload(model, 8, 64, 8)
    assert same_run == w  # nothing timed on the CPU
    got = same_run_prediction(model, ceilings, same_run, 8)["predicted_step_s_same_run_rates"]
    hw = Hardware.from_ceilings(ceilings, disk_read_Bps=1.5e9)
    assert got == pytest.approx(predict(chosen, w, hw).predicted_step_s, rel=1e-12)
    assert same_run_prediction(SimpleNamespace(source=SimpleNamespace(followed_plan=None)), ceilings, w, 8) == {}


def test_alternatives_never_beat_the_plan():
    from tiermem.planner import ALTERNATIVES, alternatives

    w = workload("opt-30b", batch=8, prompt_len=256, gen_len=32)
    chosen = plan(w, H200, 24 * GiB, 48 * GiB, cpu_cache_compute=False)
    alts = alternatives(w, H200, 24 * GiB, 48 * GiB, cpu_cache_compute=False)
    assert [name for name, _ in alts] == [name for name, _ in ALTERNATIVES]
    fitted = [p for name, p in alts if p is not None and name != "KV in host RAM, CPU attention"]  # overrides
    assert len(fitted) >= 5
    assert all(p.predicted_step_s >= chosen.predicted_step_s * (1 - 1e-9) for p in fitted)
    assert min(p.predicted_step_s for p in fitted) == pytest.approx(chosen.predicted_step_s, rel=1e-9)
    assert dict(alts)["no block in HBM"].gpu_blocks == ()


def test_cli_plan_lists_alternatives(tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    assert main(["plan", "--synthetic", "opt-1.3b", "--gpu-memory", "1GiB", "--cpu-memory", "8GiB",
                 "--hardware", str(hw), "--alternatives"]) in (None, 0)
    out = capsys.readouterr().out
    assert "the best plan with one choice fixed" in out and "KV in host RAM, CPU attention" in out


def test_the_planner_chooses_cpu_attention_where_the_host_reads_kv_faster_than_pcie_carries_it():
    """llama3-8b int4, batch 16 x 2048, a dense KV cache kept in host RAM (kv="cpu"): with GPU attention every step
    reads it over PCIe; a host that copies 4x faster than PCIe makes attention there the faster plan. Left free
    (cpu_attention_choice(None, dense)), the planner takes whichever the model predicts faster."""
    from dataclasses import replace

    from tiermem.planner import cpu_attention_choice

    w = workload("llama3-8b", "int4", 128, torch.bfloat16, batch=16, prompt_len=2048, gen_len=8,
                 host_step_s={m: 0.02 * m for m in (1, 2, 4, 8, 16)})
    free = cpu_attention_choice(None, kv_quantized=False)
    assert free is None and cpu_attention_choice(None, kv_quantized=True) is False
    assert cpu_attention_choice(True, kv_quantized=True) is True
    slow, fast = H200, replace(H200, cpu_memcpy_Bps=4 * H200.h2d_Bps)
    on_slow, on_fast = (plan(w, hw, 12 * GiB, 64 * GiB, kv="cpu", cpu_cache_compute=free) for hw in (slow, fast))
    assert not on_slow.cpu_cache_compute and on_slow.bound == "pcie"
    assert on_fast.cpu_cache_compute
    gpu_attention = plan(w, fast, 12 * GiB, 64 * GiB, kv="cpu", cpu_cache_compute=False)
    assert on_fast.predicted_step_s < gpu_attention.predicted_step_s


def test_cpu_attention_adds_to_a_disk_bound_step_and_the_planner_keeps_attention_on_the_gpu():
    """Every block on disk, a small KV cache in host RAM: attending to it on the GPU hides behind the disk, on the
    host it does not (the host issues no copy while it computes attention, so the weight stream stalls), and with
    no HBM to win the planner keeps attention on the GPU."""
    sizes = {"embed": 10, **{f"layers.{i}": 1_000_000 for i in range(4)}, "head": 10}
    w = Workload(sizes, num_layers=4, kv_bytes_per_token_layer=100, flops_per_token_layer=1e6, batch=4,
                 prompt_len=8, gen_len=4, host_step_s={1: 1e-6, 2: 2e-6, 4: 4e-6})
    gpu, cpu = [plan(w, H200, GiB, GiB, gpu_blocks=0, host_blocks=0, kv="cpu", cpu_cache_compute=c)
                for c in (False, True)]
    assert gpu.bound == cpu.bound == "disk"
    assert cpu.predicted_step_s == pytest.approx(gpu.predicted_step_s + cpu.breakdown["cpu_attention"], rel=1e-12)
    assert cpu.breakdown["cpu_attention"] > 0
    free = plan(w, H200, GiB, GiB, gpu_blocks=0, host_blocks=0, kv="cpu", cpu_cache_compute=None)
    assert not free.cpu_cache_compute


def test_quantized_weights_cost_hbm_traffic_by_the_rows_a_micro_batch_has():
    """The fused GEMV reads a quantized weight once up to 16 rows, once per 16 rows up to 32 (two 8-row tiles per
    block beyond 8 rows); beyond that the weight is dequantized to a dense copy (written, then read by the matmul).
    Dense weights are read once whatever the rows."""
    q = workload("llama3-8b", "int4", 128, torch.bfloat16, batch=64)
    dense = workload("llama3-8b", None, 128, torch.bfloat16, batch=64)
    assert dense.dense_per_stored == 0 and q.dense_per_stored == pytest.approx(2 / (0.5 + 4 / 128), rel=0.01)
    assert [dense.weight_traffic(r) for r in (1, 16, 64)] == [1.0, 1.0, 1.0]
    assert [q.weight_traffic(r) for r in (1, 8, 9, 16, 17, 32)] == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert q.weight_traffic(33) == q.weight_traffic(64) == pytest.approx(1 + 2 * q.dense_per_stored)
    resident = sum(q.block_bytes[b] for b in q.streamable)
    hbm = {m: step_cost(q, H200, resident=resident, host=0, disk=0, kv="gpu", cpu_cache_compute=False,
                        micro_batches=m)["hbm"] for m in (1, 4, 8)}
    weights = {m: hbm[m] - hbm[8] + 8 * resident / H200.hbm_Bps for m in hbm}  # the same KV bytes in each
    assert weights[8] == pytest.approx(8 * resident / H200.hbm_Bps)  # 8 rows each: one read per micro-batch
    assert weights[4] == pytest.approx(4 * resident / H200.hbm_Bps)  # 16 rows: one GEMV chunk of two tiles
    assert weights[1] == pytest.approx((1 + 2 * q.dense_per_stored) * resident / H200.hbm_Bps)  # 64 rows


def test_cli_plan_plans_graph_replays_as_load_does(tmp_path, capsys, monkeypatch):
    """tiermem plan makes load's cuda_graphs="auto" choice (CUDA and the probes faked): a model that fits HBM with
    its KV cache is planned again for graph replays, whose host part (0.5 ms) and kernels (9 ms) add up to less than
    the eager step (host-bound, 30 ms), and the JSON says so; --no-cuda-graphs keeps the eager plan; where blocks
    must stream no replay is planned; --cuda-graphs with the KV cache fixed elsewhere is a clear error."""
    from dataclasses import replace

    from tiermem import host_probe

    asked = []

    def timed(reader, cfg, batch, prompt_len, gen_len, dtype, kv_quant, *, cuda_graphs=False, kernels=True, **kw):
        asked.append(cuda_graphs)
        assert not kernels  # taken apart, where the plan without them leaves room for them to set the step
        w = Workload.from_config(cfg, {b: reader.block_nbytes(b) for b in reader.block_names}, batch, prompt_len,
                                 gen_len, dtype, quantized=reader.quant is not None, kv_quant=kv_quant)
        return replace(w, host_step_s={m: (5e-4 if cuda_graphs else 30e-3) * m for m in divisors(batch)},
                       cuda_graphs=cuda_graphs)

    def kernel_timed(workload, *args):
        asked.append("kernels")
        return replace(workload, gpu_step_s={m: 9e-3 * m for m in divisors(workload.batch)})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_probe, "timed_workload", timed)
    monkeypatch.setattr(host_probe, "with_kernel_time", kernel_timed)
    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    out_json = tmp_path / "plan.json"
    args = ["plan", "--synthetic", "llama3-8b", "--quant", "int4", "--group-size", "128", "--batch", "16",
            "--prompt-len", "2048", "--gen-len", "16", "--hardware", str(hw), "--json", str(out_json)]
    assert main([*args, "--gpu-memory", "40GiB", "--cpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    # eager steps: 30 ms of host time, more than 8x the bytes at HBM's rate: the kernels cannot set the step
    assert asked == [False, True, "kernels"] and "decode steps as CUDA graph replays" in out
    saved = json.loads(out_json.read_text())
    assert saved["cuda_graphs"] and saved["plan"]["predicted_step_s"] == pytest.approx(9.5e-3)
    asked.clear()
    assert main([*args, "--gpu-memory", "40GiB", "--cpu-memory", "8GiB", "--no-cuda-graphs"]) == 0
    assert asked == [False] and "graph replays" not in capsys.readouterr().out
    assert json.loads(out_json.read_text())["plan"]["predicted_step_s"] == pytest.approx(30e-3)
    asked.clear()
    assert main([*args, "--gpu-memory", "6GiB", "--cpu-memory", "8GiB"]) == 0  # weights stream: no replays
    assert asked == [False] and not json.loads(out_json.read_text())["cuda_graphs"]
    assert main([*args, "--gpu-memory", "40GiB", "--cpu-memory", "8GiB", "--cuda-graphs", "--kv", "cpu"]) == 2
    assert "--cuda-graphs plans whole-batch decode steps" in capsys.readouterr().err
    assert main([*args, "--gpu-memory", "10GiB", "--cpu-memory", "8GiB", "--cuda-graphs"]) == 2  # load refuses too
    assert "--cuda-graphs needs every block and the KV cache in HBM" in capsys.readouterr().err

    def graphs_fail(*a, cuda_graphs=False, **kw):
        if cuda_graphs:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return timed(*a, cuda_graphs=cuda_graphs, **kw)

    monkeypatch.setattr(host_probe, "timed_workload", graphs_fail)
    with pytest.warns(UserWarning, match="planned without CUDA graphs: planning for them failed"):
        assert main([*args, "--gpu-memory", "40GiB", "--cpu-memory", "8GiB"]) == 0
    assert json.loads(out_json.read_text())["cuda_graphs"] is False


def test_cli_plan_without_cuda_leaves_graph_replays_to_load(tmp_path, capsys, monkeypatch):
    """With no GPU to time them, tiermem plan does not consider graph replays and its JSON says so (null), so that
    bench --plan FILE leaves them to load's "auto" on the GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--synthetic", "llama3-8b", "--quant", "int4", "--group-size", "128", "--gpu-memory", "40GiB",
                 "--cpu-memory", "8GiB", "--hardware", str(hw), "--json", str(out_json)]) == 0
    assert "graph replays" not in capsys.readouterr().out
    assert json.loads(out_json.read_text())["cuda_graphs"] is None


def test_qwen3_32b_int4_in_16gib_streams_the_rest_from_host():
    """Qwen3's wide vocabulary (151936) and per-head q/k norms go into the blocks the planner places."""
    w = workload("qwen3-32b", "int4", batch=8, prompt_len=1024, gen_len=32, dtype=torch.bfloat16)
    layer = dict(_block_bytes("qwen3-32b", "int4", 64, torch.bfloat16))["layers.0"]
    as_llama = dict(preset("qwen3-32b"), model_type="llama", architectures=["LlamaForCausalLM"])
    without_norms = SyntheticStore(as_llama, QuantScheme(4, 64), torch.bfloat16).block_nbytes("layers.0")
    assert layer > without_norms  # the same shapes as Llama but for the two [head_dim] norms
    p = plan(w, H200, 16 * GiB, 64 * GiB)
    assert fits(p, 16 * GiB, 64 * GiB) and p.host_blocks and not p.disk_blocks and p.bound == "pcie"
