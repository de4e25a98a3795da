"""kv_quant="auto": the planner chooses the KV cache's precision (planner.choose_kv_quant, placement.auto_plan_kv_quant,
load, tiermem plan)."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from test_planner import H200

import tiermem
from tiermem.cli import main
from tiermem.engine.config import model_config_from_hf
from tiermem.errors import BudgetError, ConfigError
from tiermem.kernels.kv_quant import KV_QUANT_AUTO, auto_kv_schemes
from tiermem.kernels.quant import QuantScheme
from tiermem.planner import KV_QUANT_MIN_GAIN, choose_kv_quant
from tiermem.presets import preset
from tiermem.synthetic import SyntheticStore

GiB = 2**30


def steps(*seconds):
    return [None if s is None else SimpleNamespace(predicted_step_s=s) for s in seconds]


def test_the_most_precise_kv_cache_is_kept_unless_a_less_precise_one_is_clearly_faster():
    just_short = 1.0 - KV_QUANT_MIN_GAIN + 1e-3  # not quite KV_QUANT_MIN_GAIN faster
    assert choose_kv_quant(steps(1.0, just_short, just_short)) == 0
    assert choose_kv_quant(steps(1.0, just_short, just_short ** 2)) == 2  # against the one chosen so far: bf16
    assert choose_kv_quant(steps(1.0, 0.7, 0.5)) == 2
    assert choose_kv_quant(steps(1.0, 0.7, 0.7 * just_short)) == 1  # int4 against int8, not against bf16
    assert choose_kv_quant(steps(None, 2.0, 1.99)) == 1  # what fits first, then the same rule
    assert choose_kv_quant(steps(None, None, 3.0)) == 2
    with pytest.raises(BudgetError, match="int8 or int4"):
        choose_kv_quant(steps(None, None, None))


@pytest.mark.parametrize("graph_s,graph_rank,eager_s,eager_rank,taken", [
    (1.00, 0, 1.00, 0, True),  # same precision: graphs when no slower
    (1.01, 0, 1.00, 0, False),
    (0.97, 2, 1.00, 0, False),  # graphs chose int4 where eager steps kept bf16: 3% is not enough
    (0.94, 2, 1.00, 0, True),
    (1.02, 0, 0.98, 2, True),  # graphs keep bf16, eager steps chose int4 only 4% faster: the more precise wins
    (1.10, 0, 1.00, 2, False),
])
def test_graph_replays_follow_the_kv_precision_rule_against_eager_steps(graph_s, graph_rank, eager_s, eager_rank,
                                                                       taken):
    """placement.with_graph_replays with kv_quant="auto": where the graph plan's KV precision differs from the eager
    plan's, the planner.kv_precision_prefers rule (5%) decides, as among precisions; same precision, no slower."""
    from tiermem.placement import with_graph_replays
    from tiermem.planner import Plan

    def plan_for(graphs: bool):
        seconds, rank = (graph_s, graph_rank) if graphs else (eager_s, eager_rank)
        return Plan(("layers.0", "head"), (), (), host_only=("embed",), predicted_step_s=seconds), rank

    answer, graphs = with_graph_replays(plan_for, "auto", lambda a: a[0], lambda a: a[1])
    assert graphs is taken and answer == plan_for(taken)


def test_auto_kv_schemes_are_the_compute_dtype_int8_and_int4():
    assert KV_QUANT_AUTO == (None, "int8", "int4")
    assert auto_kv_schemes(128) == (None, QuantScheme.from_name("int8", 128), QuantScheme.from_name("int4", 128))
    assert auto_kv_schemes(128, 32)[2] == QuantScheme.from_name("int4", 32)


def _auto_plan(shape, gpu, cpu, batch, prompt_len, monkeypatch):
    from tiermem.placement import auto_plan_kv_quant

    monkeypatch.setattr("tiermem.probe.cached_hardware", lambda **kw: H200)
    reader = SyntheticStore(preset(shape), QuantScheme.from_name("int4", 128), torch.bfloat16)
    cfg = model_config_from_hf(reader.model_config)
    schemes = auto_kv_schemes(cfg.head_dim)
    return auto_plan_kv_quant(reader, cfg, torch.bfloat16, gpu, cpu, batch, prompt_len + 32, schemes, None, None,
                              None), schemes


def test_a_disk_bound_111b_plan_takes_the_int4_cache_a_short_resident_one_keeps_the_compute_dtype(monkeypatch):
    """111B int4 in 24 GiB of GPU and 32 GiB of RAM, batch 64 x 512: a smaller cache leaves HBM to weights that
    would otherwise be read from disk every step (`tiermem plan` on fixed figures: 10.2 s bf16, 7.4 int8, 5.7 int4).
    llama3-8b int4, one sequence of 128 tokens, room for everything: the cache is a sliver of each step's bytes."""
    (chosen, scheme), schemes = _auto_plan("llama-111b", 24 * GiB, 32 * GiB, 64, 512, monkeypatch)
    assert scheme == schemes[2] and chosen.disk_blocks
    (chosen, scheme), _ = _auto_plan("llama3-8b", 40 * GiB, 40 * GiB, 1, 128, monkeypatch)
    assert scheme is None and not chosen.disk_blocks and not chosen.host_blocks


def test_auto_plan_kv_quant_says_when_nothing_fits(monkeypatch):
    with pytest.raises(BudgetError, match="int8 or int4"):
        _auto_plan("llama-111b", 1 * GiB, 1 * GiB, 64, 512, monkeypatch)


def test_cli_plan_kv_quant_auto_prints_every_precision_and_the_choice(tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--synthetic", "llama-111b", "--quant", "int4", "--group-size", "128", "--gpu-memory",
                 "24GiB", "--cpu-memory", "32GiB", "--batch", "64", "--prompt-len", "512", "--gen-len", "6",
                 "--hardware", str(hw), "--kv-quant", "auto", "--json", str(out_json)]) in (None, 0)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "--kv-quant auto" in x)
    assert line.startswith("KV cache stored as int4 (group 128), chosen by --kv-quant auto (per step: the compute ")
    dense, int8, int4 = (float(x) for x in re.findall(r"([\d.]+) s", line))
    assert int4 < (1 - KV_QUANT_MIN_GAIN) * int8 < (1 - KV_QUANT_MIN_GAIN) ** 2 * dense
    assert f"predicted: {int4:.4f} s per decode step" in out
    assert json.loads(out_json.read_text())["kv_quant"] == "int4"


def test_kv_quant_auto_is_a_gpu_planner_choice(tmp_path):
    from hf_models import build_tiny

    src = build_tiny("llama2", tmp_path / "hf")
    store = tmp_path / "store"
    assert main(["pack", str(src), str(store)]) in (None, 0)
    with pytest.raises(ConfigError, match="GPU path's planner"):
        tiermem.load(store, kv_quant="auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_load_with_kv_quant_auto_generates_what_the_chosen_precision_does(tmp_path):
    """The cache generate() allocates is in the scheme the planner chose (Model.info), and the tokens are those of a
    load with that scheme given; a fixed placement cannot choose."""
    from hf_models import build_tiny

    src = build_tiny("llama2", tmp_path / "hf")
    store = tmp_path / "store"
    assert main(["pack", str(src), str(store)]) in (None, 0)
    ids = torch.randint(0, 100, (2, 12))
    kw = dict(device="cuda", max_batch_size=2, max_seq_len=64)
    with tiermem.load(store, kv_quant="auto", **kw) as m:
        chosen = m.info()["kv_quant"]
        out = m.generate(ids, 8, eos_token_id=[])
        assert m.kv_quant == m.executor.source.kv_quant
    name = None if chosen == "none" else chosen.split()[0]
    with tiermem.load(store, kv_quant=name, **kw) as m:
        assert torch.equal(m.generate(ids, 8, eos_token_id=[]), out)
    with pytest.raises(ConfigError, match="needs plan='auto'"):
        tiermem.load(store, kv_quant="auto", plan=None, **kw)


def test_bench_follows_the_kv_precision_of_a_plan_file(tmp_path):
    """bench --plan FILE without --kv-quant takes the precision the plan was made for; a different one is refused."""
    from argparse import Namespace

    from tiermem.bench import _kv_quant, _plan_file

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"plan": {}, "kv_quant": "int4"}))
    planned = _plan_file(Namespace(plan=str(plan)))
    assert _kv_quant(Namespace(plan=str(plan), kv_quant=None), planned) == "int4"
    assert _kv_quant(Namespace(plan=str(plan), kv_quant="int4"), planned) == "int4"
    with pytest.raises(ConfigError, match="made for an int4 KV cache"):
        _kv_quant(Namespace(plan=str(plan), kv_quant="int8"), planned)
    plan.write_text(json.dumps({"plan": {}, "kv_quant": None}))
    assert _kv_quant(Namespace(plan=str(plan), kv_quant="int8"), _plan_file(Namespace(plan=str(plan)))) == "int8"
    assert _kv_quant(Namespace(plan="auto", kv_quant=None), None) is None


def test_bench_follows_the_kind_of_step_a_plan_file_was_made_for(tmp_path):
    """bench --plan FILE without --cuda-graphs / --no-cuda-graphs replays graphs if and only if the plan was made for
    them (tiermem plan --json records it); a file without the record leaves it to load's "auto"; a flag wins."""
    from argparse import Namespace

    from tiermem.bench import _cuda_graphs, _plan_file

    plan = tmp_path / "plan.json"
    for recorded in (True, False):
        plan.write_text(json.dumps({"plan": {}, "kv_quant": None, "cuda_graphs": recorded}))
        planned = _plan_file(Namespace(plan=str(plan)))
        assert _cuda_graphs(Namespace(plan=str(plan), cuda_graphs="auto"), planned) is recorded
        assert _cuda_graphs(Namespace(plan=str(plan), cuda_graphs=not recorded), planned) is (not recorded)
    for unrecorded in ({"plan": {}, "kv_quant": None}, {"plan": {}, "kv_quant": None, "cuda_graphs": None}):
        plan.write_text(json.dumps(unrecorded))  # an older file, or one made where no GPU could time graphs
        planned = _plan_file(Namespace(plan=str(plan)))
        assert _cuda_graphs(Namespace(plan=str(plan), cuda_graphs="auto"), planned) == "auto"
    assert _cuda_graphs(Namespace(plan="auto", cuda_graphs="auto"), None) == "auto"


def test_load_plans_graph_replays_with_every_kv_precision_too(monkeypatch):
    """kv_quant="auto" with cuda_graphs="auto": build_gpu_source plans eager steps with the KV cache in each
    precision, and, that plan keeping everything in HBM, graph replays with each precision again (not only with the
    one chosen for eager steps). The planner is faked; the load stops after the second planning."""
    from tiermem import placement
    from tiermem.planner import Plan

    class Planned(Exception):
        pass

    schemes = auto_kv_schemes(128)
    asked = []

    def fake(reader, cfg, dtype, budget, cpu_memory, max_batch, max_seq, kv_schemes, *choices, cuda_graphs, **kw):
        asked.append((kv_schemes, cuda_graphs))
        if cuda_graphs:
            raise Planned
        return Plan(("layers.0", "head"), (), (), predicted_step_s=0.03), schemes[2]

    monkeypatch.setattr(placement, "auto_plan_kv_quant", fake)
    reader = SyntheticStore(dict(preset("tiny-llama")), None, torch.float32)
    cfg = model_config_from_hf(reader.model_config)
    with pytest.raises(Planned):
        placement.build_gpu_source(reader, cfg, torch.device("cpu"), torch.float32, 1 << 30, None, 1, 64, None, None,
                                   1, None, False, kv_quant=schemes, cuda_graphs="auto")
    assert asked == [(schemes, False), (schemes, True)]
