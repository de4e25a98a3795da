"""The cost model against recorded benchmark runs (benchmarks/results/*.json): each run's placement, predicted
from the link rates measured in its run or from the probe figures its plan had at load, against its measured
decode step. A miss is a strict xfail that says why, so that a change that fixes or breaks one shows."""

import json
import math
from dataclasses import replace

import pytest
import torch
from test_planner import RESULTS, _block_bytes, weights, workload

from tiermem.ceilings import best_disk_read
from tiermem.config import parse_size
from tiermem.engine.config import model_config_from_hf
from tiermem.kernels.kv_quant import kv_scheme
from tiermem.placement import plan_host_tier
from tiermem.planner import Hardware, Plan, Workload, predict
from tiermem.presets import preset


def _kv_quant_of(placement: dict):
    """The KV cache's QuantScheme as bench records it ("none", or e.g. "int4 (group 128)")."""
    kind = placement["kv_quant"]
    return None if kind == "none" else kv_scheme(kind.split()[0], 128)


RECORDED = [("opt30b_fp16_vs_flexgen_h200.json", "opt-30b"), ("llama13b_bf16_vs_accelerate_h200.json", "llama-13b")]


@pytest.mark.parametrize("name,shape", RECORDED)
def test_prediction_of_recorded_placements_within_15_percent(name, shape):
    result = json.loads((RESULTS / name).read_text())
    placement = result["placement"]
    dtype = getattr(torch, placement["dtype"])
    hw = Hardware.from_ceilings(result["ceilings"], matmul_flops=6e14)
    runs = [c["tiermem"] for c in result["comparisons"]] + result.get("tiermem_runs_without_peer", [])
    assert runs
    for run in runs:
        w = workload(shape, dtype=dtype, batch=run["batch"], prompt_len=run["prompt_len"], gen_len=run["gen_len"])
        used = Plan.build(w, placement["gpu_resident_blocks"], kv="gpu", micro_batches=run["micro_batches"],
                          lookahead=2)
        assert weights(w, used.host_blocks) == placement["streamed_bytes_per_step"]  # the same placement
        predicted = predict(used, w, hw).predicted_step_s
        measured = run["decode_step_s"]
        assert abs(predicted - measured) / measured <= 0.15, (run["batch"], predicted, measured)


DISK_RECORDED = [
    ("llama13b_int4_disk_tier_h200.json", "llama-13b", 64, 1),
    ("llama13b_int4_disk_tier_h200.json", "llama-13b", 64, 8),
    ("llama111b_int4_gpu24_cpu32_disk_h200.json", "llama-111b", 128, 1),
    ("llama111b_int4_gpu24_cpu32_disk_h200.json", "llama-111b", 128, 16),
    ("llama111b_int4_gpu24_host_h200.json", "llama-111b", 128, 1),
    pytest.param("llama111b_int4_gpu24_host_h200.json", "llama-111b", 128, 16, marks=pytest.mark.xfail(
        strict=True, reason="measured 0.84 of the PCIe bound: the per-layer host overhead of 31 resident plus 50 "
        "streamed layers at batch 16 is larger than the cost model's 50 us per layer (fit it from runs)")),
]


@pytest.mark.parametrize("name,shape,group,batch", DISK_RECORDED)
def test_prediction_of_recorded_disk_and_host_placements_within_15_percent(name, shape, group, batch):
    """The same check on raw `tiermem bench` results whose placement includes the disk tier."""
    result = json.loads((RESULTS / name).read_text())
    placement, ceilings = result["placement"], result["ceilings"]
    disk_Bps = max(ceilings.get("disk_read_posix_direct_Bps", 0), ceilings.get("disk_read_dd_direct_Bps", 0))
    hw = Hardware.from_ceilings(ceilings, matmul_flops=6e14, disk_read_Bps=disk_Bps or 1.3e9)
    words = result["command"].split()
    cpu_memory = parse_size(words[words.index("--cpu-memory") + 1]) if "--cpu-memory" in words else None
    (run,) = [r for r in result["runs"] if r["batch"] == batch]
    w = workload(shape, "int4", group, torch.bfloat16, batch=batch, prompt_len=run["prompt_len"],
                 gen_len=run["gen_len"])
    gpu = list(w.streamable[: placement["gpu_resident_blocks"]])
    host, _disk, _staging = plan_host_tier(dict(w.block_bytes), list(w.block_bytes), gpu, cpu_memory, 2)
    used = Plan.build(w, gpu, [b for b in host if b not in w.host_only], kv="gpu",
                      micro_batches=run["micro_batches"], lookahead=2)
    assert weights(w, used.disk_blocks) == placement["disk_bytes_per_step"]  # the placement that ran
    predicted = predict(used, w, hw).predicted_step_s
    measured = run["decode_step_s"]
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def _placement_of(w: Workload, placement: dict) -> Plan:
    """A plan with the recorded tier counts and byte totals (the cost model sees nothing else): layers by
    count, the head in whichever tier makes the recorded streamed and disk bytes come out."""
    g, d = placement["gpu_resident_blocks"], placement["disk_blocks"]
    h = placement["streamed_blocks"] - d
    layers = [b for b in w.streamable if b != "head"]
    for head in "ghd":
        n = {"g": g, "h": h, "d": d}
        n[head] -= 1
        if min(n.values()) < 0:
            continue
        gpu = layers[:n["g"]] + (["head"] if head == "g" else [])
        host = layers[n["g"]:n["g"] + n["h"]] + (["head"] if head == "h" else [])
        p = Plan.build(w, gpu, host, kv=placement["kv_placement"], lookahead=placement["lookahead"],
                       cpu_cache_compute=placement.get("cpu_attention", False))
        if (weights(w, p.disk_blocks) == placement["disk_bytes_per_step"]
                and weights(w, [*p.host_blocks, *p.disk_blocks]) == placement["streamed_bytes_per_step"]):
            return p
    raise AssertionError(f"no placement of {g} / {h} / {d} blocks has the recorded byte counts")


S9_111B_DISK = [f"llama111b_int4_gpu24_cpu32_{run}_s9call{call}_h200.json"
                for run, call in (("plan_int4kv", 2), ("plan_autokv", 3), ("kvcpu_int4", 3))]
S11_111B_DISK = ["llama111b_int4_gpu24_cpu32_plan_autokv_s11call3_h200.json"]  # read with kvikio, O_DIRECT
S12_111B_DISK = ["llama111b_int4_gpu24_cpu32_plan_autokv_s12call1_h200.json"]  # POSIX; bench evicted its files
COLD_111B_DISK = S11_111B_DISK + S12_111B_DISK  # each run checked for disk blocks left in the page cache


PLANNED_RECORDED = [
    ("llama111b_int4_gpu24_host_plan_h200.json", 1), ("llama111b_int4_gpu24_host_plan_h200.json", 32),
    ("llama111b_int4_gpu24_host_greedy_h200.json", 1), ("llama111b_int4_gpu24_host_greedy_h200.json", 32),
    ("llama111b_int4_gpu24_cpu32_plan_h200.json", 64), ("llama111b_int4_gpu24_cpu32_kvcpu_bf16_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_kvcpu_int4_call4_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_kvcpu_bf16_call4_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_kvcpu_bf16_lookahead1_h200.json", 64),
    pytest.param("llama111b_int4_gpu24_cpu32_kvcpu_int4_h200.json", 64, marks=pytest.mark.xfail(strict=True, reason=(
        "measured 7.79 s against 6.32 predicted: the disk tier read 1.42 GB/s while the POSIX probe of the same "
        "run read 1.78. Decode ran as 32 micro-batches then; with 1 (session 3) the same configuration is within "
        "10% (the _s3call2 and _s3call3 files)"))),
    ("llama111b_int4_gpu24_cpu32_kvcpu_int4_s3call2_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_plan_s3call2_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_plan_int4kv_s3call3_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_kvcpu_int4_s3call3_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_plan_s3call4_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_kvcpu_bf16_s3call4_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_plan_s6call2_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_plan_int4kv_s6call2_h200.json", 64),
    ("llama111b_int4_gpu24_host_plan_s6call4_h200.json", 1), ("llama111b_int4_gpu24_host_plan_s6call4_h200.json", 32),
    ("llama111b_int4_gpu24_host_plan_cpu_attention_s6call3_h200.json", 1),
    pytest.param("llama111b_int4_gpu24_host_plan_cpu_attention_s6call3_h200.json", 32, marks=pytest.mark.xfail(
        strict=True, reason="0.70 s predicted, 0.837 measured: CPU attention took 0.18 s of the step where the model "
        "gives it 0.045 s (its KV bytes at the host copy rate); at 32 rows of 136 tokens a layer its per-layer costs "
        "(q, k, v to the host and the output back, a wait for the GPU) outweigh its bytes. Since session 7 the "
        "attention is timed (the _s7call2 CPU-attention run)")),
    *((f"llama111b_int4_gpu24_host_{run}_s7call2_h200.json", b) for run in ("plan", "greedy") for b in (1, 32)),
    ("llama111b_int4_gpu24_host_cpu_attention_s7call2_h200.json", 32),
    *((f"llama111b_int4_gpu24_host_plan_{call}_h200.json", b) for call in ("s11call4", "s12call2") for b in (1, 32)),
    *((f"llama111b_int4_gpu24_cpu32_{run}_s7call3_h200.json", 64) for run in ("plan_int4kv", "kvcpu_int4", "plan")),
    *((f"llama111b_int4_gpu24_cpu32_{run}_s7call4_h200.json", 64) for run in ("plan_int4kv_fresh_probe", "kvcpu_bf16")),
    *((f"llama111b_int4_gpu24_cpu32_{run}_s8call2_h200.json", 64) for run in ("plan_int4kv", "kvcpu_int4")),
    ("llama111b_int4_gpu24_cpu32_kvcpu_int4_s8call5_h200.json", 64),
    *((name, 64) for name in S9_111B_DISK + COLD_111B_DISK),
]


PLAN_TIME_RECORDED = [
    ("llama111b_int4_gpu24_cpu32_plan_int4kv_s3call3_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_kvcpu_int4_s3call3_h200.json", 64),
    *(pytest.param(name, 64, marks=pytest.mark.xfail(strict=True, reason=(
        "the plan-time probe read the store at 1.35-1.44 GB/s right after it was written; a minute later the disk "
        "tier read 1.75-1.92 GB/s")))
      for name in ("llama111b_int4_gpu24_cpu32_kvcpu_int4_s3call2_h200.json",
                   "llama111b_int4_gpu24_cpu32_plan_s3call2_h200.json",
                   "llama111b_int4_gpu24_cpu32_plan_s3call4_h200.json",
                   "llama111b_int4_gpu24_cpu32_kvcpu_bf16_s3call4_h200.json")),
    ("llama111b_int4_gpu24_cpu32_plan_s6call2_h200.json", 64),
    ("llama111b_int4_gpu24_cpu32_plan_int4kv_s6call2_h200.json", 64),
    ("llama111b_int4_gpu24_host_plan_s6call4_h200.json", 32),
    pytest.param("llama111b_int4_gpu24_host_plan_cpu_attention_s6call3_h200.json", 32, marks=pytest.mark.xfail(
        strict=True, reason="planned with session 5's cost model, in which CPU attention hid behind the PCIe stream "
        "(0.658 s predicted); it stalls the stream (0.837 s measured). The model now adds it to the step, and the "
        "planner keeps attention on the GPU for this configuration (the _s6call4 file: within 8%)")),
    ("llama111b_int4_gpu24_host_plan_s7call2_h200.json", 32),
    ("llama111b_int4_gpu24_host_cpu_attention_s7call2_h200.json", 32),
    *((f"llama111b_int4_gpu24_host_plan_{call}_h200.json", b) for call in ("s11call4", "s12call2") for b in (1, 32)),
    *(pytest.param(f"llama111b_int4_gpu24_cpu32_{run}_s7call3_h200.json", 64, marks=pytest.mark.xfail(
        strict=True, reason="planned with the disk rate cached in call 1, measured on the llama3-8b store (1.98 "
        "GB/s); the disk tier then read the 111B store at about 1.55. A probe of the 111B store itself read 1.58 "
        "and predicted within 2-3% (the _s7call4 files); the cache now keeps the disk rate per store"))
      for run in ("plan_int4kv", "kvcpu_int4", "plan")),
    *((f"llama111b_int4_gpu24_cpu32_{run}_s7call4_h200.json", 64) for run in ("plan_int4kv_fresh_probe", "kvcpu_bf16")),
    ("llama111b_int4_gpu24_cpu32_plan_int4kv_s8call2_h200.json", 64),
    pytest.param("llama111b_int4_gpu24_cpu32_kvcpu_int4_s8call2_h200.json", 64, marks=pytest.mark.xfail(
        strict=True, reason="6.10 s predicted, 7.56 measured: the probe of the store at the load of the call's first "
        "run read 1.81 GB/s; this second run's disk tier read about 1.46 (the POSIX probe after it 1.52, after the "
        "first run 1.77). The same configuration run first on a newly written store (the _s8call5 file): within "
        "13%")),
    ("llama111b_int4_gpu24_cpu32_kvcpu_int4_s8call5_h200.json", 64),
    *((name, 64) for name in S9_111B_DISK + COLD_111B_DISK),
]


@pytest.mark.parametrize("name,batch", PLAN_TIME_RECORDED)
def test_plan_time_prediction_of_recorded_111b_runs_within_15_percent(name, batch):
    """Session 3's 111B runs: the step time the plan predicted at load, from the probe cached then (recorded as
    plan_hardware), against the measured step."""
    result = json.loads((RESULTS / name).read_text())
    (run,) = [r for r in result["runs"] if r["batch"] == batch]
    assert run["plan_hardware"]["disk_read_Bps"] > 0
    predicted, measured = result["placement"]["predicted_step_s"], run["decode_step_s"]
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def test_recorded_plan_beats_the_hand_written_alternative_of_its_call():
    """111B int4, 24 GiB GPU, 32 GiB RAM, batch 64, int4 KV, one device call: the planner's placement (KV on the
    GPU) against KV fixed in host RAM."""
    def step(name: str) -> float:
        return json.loads((RESULTS / name).read_text())["runs"][0]["decode_step_s"]

    planned = json.loads((RESULTS / "llama111b_int4_gpu24_cpu32_plan_int4kv_s3call3_h200.json").read_text())
    assert planned["placement"]["placement"] == "plan" and planned["placement"]["kv_placement"] == "gpu"
    assert step("llama111b_int4_gpu24_cpu32_plan_int4kv_s3call3_h200.json") < step(
        "llama111b_int4_gpu24_cpu32_kvcpu_int4_s3call3_h200.json")


def _steps(name: str) -> dict[int, float]:
    return {r["batch"]: r["decode_step_s"] for r in json.loads((RESULTS / name).read_text())["runs"]}


def test_session_7_plans_beat_every_hand_written_alternative_tried():
    """111B int4 in 24 GiB of GPU, session 7, one machine held through calls 2-4. The rest in RAM (call 2): the
    planner's placement against the greedy one (HBM-resident prefix) at batch 1 and 32, and against KV in host
    RAM with CPU attention at 32. With 32 GiB of RAM (call 3): the plan with an int4 KV cache (on the GPU)
    against KV fixed in host RAM; the plan with a bf16 KV cache against KV fixed in host RAM (call 4)."""
    host = "llama111b_int4_gpu24_host_{}_s7call2_h200.json"
    plan, greedy, cpu_attention = (_steps(host.format(run)) for run in ("plan", "greedy", "cpu_attention"))
    assert plan[1] < greedy[1] and plan[32] < greedy[32] and plan[32] < cpu_attention[32]
    planned = json.loads((RESULTS / host.format("plan")).read_text())["placement"]
    assert planned["placement"] == "plan" and not planned["cpu_attention"]  # CPU attention timed at load, not chosen
    disk = "llama111b_int4_gpu24_cpu32_{}_h200.json"
    assert _steps(disk.format("plan_int4kv_s7call3"))[64] < _steps(disk.format("kvcpu_int4_s7call3"))[64]
    assert _steps(disk.format("plan_s7call3"))[64] < _steps(disk.format("kvcpu_bf16_s7call4"))[64]
    for name in ("plan_int4kv_s7call3", "plan_s7call3"):
        assert json.loads((RESULTS / disk.format(name)).read_text())["placement"]["kv_placement"] == "gpu"


@pytest.mark.parametrize("name,batch", PLANNED_RECORDED)
def test_prediction_of_recorded_111b_runs_within_15_percent(name, batch):
    """Session 2's 111B runs (planner, greedy, KV in host RAM), predicted from the link rates measured in the
    same run. Disk: the rate of the reader the disk tier read with (POSIX in every one of them)."""
    from dataclasses import replace

    from tiermem.ceilings import backend_disk_read

    result = json.loads((RESULTS / name).read_text())
    placement, ceilings = result["placement"], result["ceilings"]
    disk = backend_disk_read(ceilings, placement["read_backend"])  # NaN or 0 where nothing was on disk
    hw = Hardware.from_ceilings(ceilings, matmul_flops=6e14, disk_read_Bps=disk if disk > 0 else 1.3e9)
    (run,) = [r for r in result["runs"] if r["batch"] == batch]
    kv_quant = _kv_quant_of(placement)
    cfg = model_config_from_hf(preset("llama-111b"))
    attention = {int(m): s for m, s in run.get("cpu_attention_step_s_same_run", {}).items()}
    w = Workload.from_config(cfg, dict(_block_bytes("llama-111b", "int4", 128, torch.bfloat16)), batch,
                             run["prompt_len"], run["gen_len"], torch.bfloat16, quantized=True, kv_quant=kv_quant,
                             cpu_attention_s=attention)
    used = replace(_placement_of(w, placement), micro_batches=min(run["micro_batches"], batch))
    predicted = predict(used, w, hw).predicted_step_s
    measured = run["decode_step_s"]
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def _kv_tier_xfail(name: str, reason: str):
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reason))


PROBE_DRIFT = ("the probe at load read the disk faster than the disk KV tier then read it: this virtual disk's rate "
               "drifts by 20-30% within a device call")


HOST_PROBE_MACHINE = (
    "the narrow-model host probe read 16.3 ms on that machine where the full step took 28.6 ms; on the machine of "
    "call 3 the probe is within 2% (the _s6call3 file), and in call 2 the full step ran 18.6 ms against the probe's "
    "21-22 ms (host_gap_*_s6call2): a machine-to-machine error, not explained")


HOST_PROBE_S8 = (
    "22.6 ms predicted (all host time: the narrow-model probe at load), 33.9 ms measured, on a fresh machine; the "
    "machine of calls 2-5 ran the same configuration in 27.2 ms against 24.6 (the _s8call3 file). The host's speed "
    "drifts within a call: on call 7's machine one bench run took 30.5 ms against 27.4 planned, the next 20.4 "
    "against 19.5 (the _s8call7 file); the probe's prompt length does not matter (host_time_check_*_s8call6: 17-20 "
    "ms after 16 tokens, 17-18 after 2048, the full model 19-21)")


HOST_UNSTABLE_S9 = (
    "three identical bench runs back to back on one fresh machine (session 9, call 4) decoded in 19.5, 44.1 and 37.7 "
    "ms per step (their steps 18-23, 40-47 and 32-43 ms), where the narrow-model host probe at their loads read "
    "28.3, 18.3 and 19.4 ms: the host's speed of issuing a step's ~600 launches from Python changes between runs "
    "seconds apart, and no probe before the run predicts it. A step that is not host-bound (one CUDA graph) would "
    "not depend on it")


DISK_KV_AFTER_CEILINGS = (
    "bench timed the disk KV tier for its same-run figure after the disk's ceilings had read 5 GB of the store, "
    "which slows the disk's next reads (see PROBE_DRIFT): 20-26% slower than the run; the plan-time probe, before "
    "the run, is within 13%. bench now times the tier first (the _s8call4 files: within 13%)")


S9_DISK_KV = [  # session 9, call 1: KV on disk fixed (weights in HBM), and the plan's under budgets (weights in HBM
    # and pinned RAM, KV on disk: it fits nowhere else)
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s9call1_h200.json" for run in ("disk", "disk_int4")),
    *(f"llama3_8b_int4_b16x2048_kv_plan_gpu{g}_cpu{c}_offload_s9call1_h200.json" for g, c in ((7, 3), (6, 2))),
]


HOST_UNSTABLE_S10 = (
    "session 10's eager runs of the resident config (KV bf16 or int4 in HBM), 12 over calls 2-5: +37% to -47% off "
    "their host probe, 4 of 12 within 15%; the eager step is the host's time of issuing ~700 launches, which "
    "changed 2x between runs seconds apart. The same config as CUDA graphs is predicted within 7% "
    "(test_session_10_graph_steps_are_predicted_within_15_percent)")
S10_EAGER_WITHIN_15 = ("kvnone_s10call2_run1", "kvint4_s10call2_run2", "kvnone_s10call3_run1", "kvint4_s10call4_run1")
S10_EAGER = [
    name if any(k in name for k in S10_EAGER_WITHIN_15) else _kv_tier_xfail(name, HOST_UNSTABLE_S10)
    for name in (f"llama3_8b_int4_b16x2048_resident_eager_kv{kv}_s10call{c}_run{k}_h200.json"
                 for kv, c, k in (("int4", 2, 1), ("int4", 2, 2), ("int4", 3, 1), ("int4", 4, 1), ("int4", 4, 2),
                                  ("none", 2, 1), ("none", 2, 2), ("none", 3, 1), ("none", 4, 1), ("none", 4, 2),
                                  ("none", 5, 1), ("none", 5, 2)))]
S11_EAGER = [
    *(_kv_tier_xfail(f"llama3_8b_int4_b16x2048_resident_eager_{run}_h200.json", (
        "session 11's eager runs, the hand-written alternative to graph replays: 32.2 ms predicted against 18.2 "
        "measured (bf16 KV, call 1), 33.6 against 27.1 (int4 KV, call 3); see HOST_UNSTABLE_S10"))
      for run in ("kvnone_s11call1_run1", "kvint4_s11call3_run1")),
    "llama3_8b_int4_b16x2048_resident_eager_kvint4_gen32_s11call4_h200.json",  # 32.5 ms predicted, 31.5 measured
]
S11_KV_TIERS = [f"llama3_8b_int4_b16x2048_kv_{run}_s11call1_h200.json" for run in ("cpu", "disk", "disk_int4")]


KV_TIER_PLAN_TIME = [
    *(f"llama3_8b_int4_b16x2048_kv_{run}_h200.json" for run in ("gpu", "cpu", "cpu_attention")),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_disk_h200.json", PROBE_DRIFT),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_disk_int4_h200.json", PROBE_DRIFT),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_gpu_call5_h200.json", (
        "the host probe took a 2- and a 10-layer copy's difference then, which scattered by 0.53-1.13x of the "
        "full model's host time; it now times one copy of the model's full depth (call 7: within 2-12%)")),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_cpu_attention_call5_h200.json", (
        "18% slower predicted than measured: attention on that machine's host ran 1.2x faster than its host copy "
        "rate, which the model takes for it (calls 3 and 7: within 5% and 7%)")),
    "llama3_8b_int4_b16x2048_kv_disk_int4_call5_h200.json",
    *(f"llama3_8b_int4_b16x2048_kv_{run}_call7_h200.json" for run in ("gpu", "cpu", "cpu_attention", "disk")),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_disk_int4_call7_h200.json", (
        "bench measured the disk's ceilings (3 GB of store reads) right before the run, which slowed the disk KV "
        "tier's reads to 1.0-1.5 GB/s (disk_kv_timeline_int4_*_call9/10); bench now measures them after the runs")),
    "llama3_8b_int4_b16x2048_kv_disk_call11_h200.json",
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_disk_int4_call11_h200.json", PROBE_DRIFT),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_gpu_s6call1_h200.json", HOST_PROBE_MACHINE),
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s6call1_h200.json" for run in ("cpu", "cpu_attention", "disk", "disk_int4")),
    "llama3_8b_int4_b16x2048_kv_gpu_s6call3_h200.json",
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s7call1_h200.json" for run in ("gpu", "cpu", "cpu_attention")),
    *(_kv_tier_xfail(f"llama3_8b_int4_b16x2048_kv_{run}_s7call1_h200.json", PROBE_DRIFT)
      for run in ("disk", "disk_int4")),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_gpu_s8call1_h200.json", HOST_PROBE_S8),
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s8call1_h200.json" for run in ("cpu", "cpu_attention", "disk", "disk_int4")),
    "llama3_8b_int4_b16x2048_kv_gpu_s8call3_h200.json", "llama3_8b_int4_b32x1024_kv_disk_int8_s8call3_h200.json",
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s8call4_h200.json" for run in ("disk", "disk_int4")),
    "llama3_8b_int4_b16x2048_kv_gpu_s8call7_h200.json",
    *S9_DISK_KV,
    *(_kv_tier_xfail(f"llama3_8b_int4_b16x2048_kv_gpu_s9call4_run{k}_h200.json", HOST_UNSTABLE_S9) for k in (1, 2, 3)),
    *S10_EAGER,
    *S11_KV_TIERS[:2],
    _kv_tier_xfail(S11_KV_TIERS[2], PROBE_DRIFT + " (the int4 disk KV tier timed at load: 0.605 s a step, "
                   "after the run: 0.712; measured 0.729, median 0.691)"),
    *S11_EAGER,
]


KV_TIER_SAME_RUN = [
    *(f"llama3_8b_int4_b16x2048_kv_{run}_call7_h200.json" for run in ("gpu", "cpu", "cpu_attention", "disk")),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_disk_int4_call7_h200.json", (
        "its disk ceilings were measured before the run and slowed it (see the plan-time case)")),
    "llama3_8b_int4_b16x2048_kv_disk_call11_h200.json", "llama3_8b_int4_b16x2048_kv_disk_int4_call11_h200.json",
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_gpu_s6call1_h200.json", HOST_PROBE_MACHINE),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_cpu_attention_s6call1_h200.json", (
        "32% slower predicted than measured: the host copy rate measured after the run (34.6 GB/s) was 0.61 of the "
        "probe's at load (56.5), and attention ran faster than the slower one (from the probe's: within 15%)")),
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s6call1_h200.json" for run in ("cpu", "disk", "disk_int4")),
    "llama3_8b_int4_b16x2048_kv_gpu_s6call3_h200.json",
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s7call1_h200.json" for run in ("gpu", "cpu", "cpu_attention", "disk",
                                                                          "disk_int4")),
    _kv_tier_xfail("llama3_8b_int4_b16x2048_kv_gpu_s8call1_h200.json", HOST_PROBE_S8),
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s8call1_h200.json" for run in ("cpu", "cpu_attention", "disk")),
    *(_kv_tier_xfail(name, DISK_KV_AFTER_CEILINGS)
      for name in ("llama3_8b_int4_b16x2048_kv_disk_int4_s8call1_h200.json",
                   "llama3_8b_int4_b32x1024_kv_disk_int8_s8call3_h200.json")),
    "llama3_8b_int4_b16x2048_kv_gpu_s8call3_h200.json",
    *(f"llama3_8b_int4_b16x2048_kv_{run}_s8call4_h200.json" for run in ("disk", "disk_int4")),
    "llama3_8b_int4_b16x2048_kv_gpu_s8call7_h200.json",
    *S9_DISK_KV,
    *(_kv_tier_xfail(f"llama3_8b_int4_b16x2048_kv_gpu_s9call4_run{k}_h200.json", HOST_UNSTABLE_S9) for k in (1, 2, 3)),
    *S10_EAGER,
    *S11_KV_TIERS,
    *S11_EAGER,
]


def _kv_tier_prediction(name: str, same_run: bool) -> tuple[float, float]:
    """(predicted, measured) decode step of a recorded llama3-8b int4 run (batch 16 x 2048 but one) with no weight
    read from disk: the placement it followed under the probe figures of its plan (plan_hardware) or the ceilings
    measured in the run, with the host time (and CPU attention, disk KV tier where timed) timed by the probes then."""
    from tiermem.ceilings import backend_disk_read
    result = json.loads((RESULTS / name).read_text())
    placement, (run,) = result["placement"], result["runs"]
    kv_quant = _kv_quant_of(placement)
    breakdown = run["predicted_breakdown_same_run_s" if same_run else "plan_breakdown_s"]
    # runs since session 7 time CPU attention (at load and after the run); before, it was the KV bytes' copy time
    attention = {1: breakdown["cpu_attention"]} if "cpu_attention_step_s_same_run" in run else None
    # runs since session 8 time the disk KV tier (at load and after the run); no weight is read from disk, so the
    # disk term is all KV
    assert placement["disk_blocks"] == 0
    disk_kv = breakdown["disk"] if "disk_kv_step_s_same_run" in run else 0.0
    w = workload("llama3-8b", "int4", 128, torch.bfloat16, batch=run["batch"], prompt_len=run["prompt_len"],
                 gen_len=run["gen_len"], kv_quant=kv_quant, host_step_s={1: breakdown["host"]},
                 cpu_attention_s=attention)
    w = replace(w, disk_kv_s=disk_kv)
    used = _placement_of(w, placement)
    if same_run:
        disk = backend_disk_read(result["ceilings"], placement["read_backend"])
        hw = Hardware.from_ceilings(result["ceilings"], **({} if math.isnan(disk) else {"disk_read_Bps": disk}))
    else:
        hw = Hardware.from_json(run["plan_hardware"])
    return predict(used, w, hw).predicted_step_s, run["decode_step_s"]


@pytest.mark.parametrize("name", KV_TIER_PLAN_TIME)
def test_plan_time_prediction_of_recorded_kv_tier_runs_within_15_percent(name):
    """Session 5's llama3-8b int4, batch 16 x 2048 runs, the KV cache in HBM, in host RAM (attention on the GPU or
    on the host) and on disk, predicted from the figures the planner had at load (its own prediction assumed a
    context of max_seq - max_seq/16 tokens: 3% shorter than the runs')."""
    predicted, measured = _kv_tier_prediction(name, same_run=False)
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


@pytest.mark.parametrize("name", KV_TIER_SAME_RUN)
def test_same_run_prediction_of_recorded_kv_tier_runs_within_15_percent(name):
    """The same runs (those whose bench measured the host copy rate in the run), predicted from the link rates
    measured in the run."""
    predicted, measured = _kv_tier_prediction(name, same_run=True)
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def test_recorded_kv_tier_plan_beats_every_hand_written_kv_placement_of_its_call():
    """llama3-8b int4, batch 16 x 2048, call 7: the planner's own choice (nothing fixed: KV in HBM) against the KV
    cache fixed in host RAM (GPU or CPU attention) and on disk (bf16 and int4), each measured in the same call."""
    def run(kind: str) -> tuple[dict, float]:
        result = json.loads((RESULTS / f"llama3_8b_int4_b16x2048_kv_{kind}_call7_h200.json").read_text())
        return result, result["runs"][0]["decode_step_s"]

    planned, step = run("gpu")
    assert planned["placement"]["placement"] == "plan" and "--kv-placement" not in planned["command"]
    assert planned["placement"]["kv_placement"] == "gpu"
    for kind in ("cpu", "cpu_attention", "disk", "disk_int4"):
        assert step < run(kind)[1], kind


def test_session_8_plans_beat_every_hand_written_alternative_tried():
    """Session 8. 111B int4 in 24 GiB of GPU and 32 GiB of RAM, batch 64, int4 KV (call 2): the planner's placement
    (KV on the GPU) against KV fixed in host RAM. llama3-8b int4, batch 16 x 2048 (call 1): the planner's choice with
    nothing fixed (KV in HBM) against KV fixed in host RAM (GPU or CPU attention) and on disk (bf16 and int4)."""
    disk = "llama111b_int4_gpu24_cpu32_{}_s8call2_h200.json"
    planned = json.loads((RESULTS / disk.format("plan_int4kv")).read_text())["placement"]
    assert planned["placement"] == "plan" and planned["kv_placement"] == "gpu"
    assert _steps(disk.format("plan_int4kv"))[64] < _steps(disk.format("kvcpu_int4"))[64]
    tiers = "llama3_8b_int4_b16x2048_kv_{}_s8call1_h200.json"
    planned = json.loads((RESULTS / tiers.format("gpu")).read_text())
    assert "--kv-placement" not in planned["command"] and planned["placement"]["kv_placement"] == "gpu"
    for kind in ("cpu", "cpu_attention", "disk", "disk_int4"):
        assert _steps(tiers.format("gpu"))[16] < _steps(tiers.format(kind))[16], kind


@pytest.mark.parametrize("name", S9_111B_DISK + COLD_111B_DISK)
def test_111b_disk_runs_meet_issue_5(name):
    """Issue 5 (b): 111B int4, gpu_memory 24 GiB, cpu_memory 32 GiB, the rest streamed from disk, batch 64, KV
    offloaded or quantized where the plan says so: at least 0.85 of the disk roofline, peak GPU memory within 24 GiB
    and pinned host memory within 32 GiB, each measured in its run. Sessions 9 (POSIX reads), 11 (kvikio, its
    reads now O_DIRECT; bench dropped the page cache before the runs) and 12 (POSIX, on the final code: bench
    evicted the disk tier's files before the run). After the runs of 11 and 12 bench found none of the disk tier's
    blocks in the page cache."""
    result = json.loads((RESULTS / name).read_text())
    placement, (run,) = result["placement"], result["runs"]
    assert run["roofline_link"] == "disk" and 0.85 <= run["fraction_of_roofline"] <= 1.05
    assert run["peak_gpu_bytes"] <= 24 * 2**30 and placement["pinned_host_bytes"] <= 32 * 2**30
    assert placement["disk_bytes_per_step"] > 0 and run["batch"] == 64
    if name in COLD_111B_DISK:
        assert run["disk_blocks_page_cached_fraction"] < 0.05
        assert run["predicted_breakdown_same_run_s"]["kernels"] == 0  # disk-bound: no kernel probe at load
    if name in S11_111B_DISK:
        assert placement["read_backend"] == "kvikio" and placement["page_cache_dropped_before_runs"]


@pytest.mark.parametrize("name", ["llama111b_int4_gpu24_host_plan_s7call2_h200.json",
                                  "llama111b_int4_gpu24_host_plan_s11call4_h200.json",
                                  "llama111b_int4_gpu24_host_plan_s12call2_h200.json"])
def test_111b_host_runs_meet_issue_5(name):
    """Issue 5 (a): 111B int4, gpu_memory 24 GiB, host RAM for the rest (no cpu_memory), the planner's placement:
    batch 1 and 32 at 0.9 of the PCIe roofline or more, peak GPU memory within 24 GiB, each measured in its run
    (session 7; session 11: 0.973 and 0.926; session 12 on the final code: 0.971 and 0.929)."""
    result = json.loads((RESULTS / name).read_text())
    assert "--cpu-memory" not in result["command"] and result["placement"]["placement"] == "plan"
    runs = {r["batch"]: r for r in result["runs"]}
    assert set(runs) == {1, 32}
    for run in runs.values():
        assert run["roofline_link"] == "pcie" and 0.9 <= run["fraction_of_roofline"] <= 1.05
        assert run["peak_gpu_bytes"] <= 24 * 2**30 and run["within_gpu_budget"]


def test_session_11_buffered_kvikio_reads_came_from_the_page_cache():
    """Call 2, before kvikio read with O_DIRECT: the same command "read" the disk tier's 10.3 GB per step in 1.22 s,
    8.5 GB/s from a disk whose every cold reader measured 1.7-2.0 GB/s in that run. The blocks had stayed in the
    page cache (128 GiB of RAM; cpu_memory bounds only pinned memory). Kept as the record of why; not a result."""
    result = json.loads((RESULTS / "llama111b_int4_gpu24_cpu32_plan_autokv_kvikio_buffered_s11call2_h200.json")
                        .read_text())
    placement, (run,) = result["placement"], result["runs"]
    assert placement["read_backend"] == "kvikio" and "disk_blocks_page_cached_fraction" not in run
    rate = placement["disk_bytes_per_step"] / run["decode_step_s"]
    assert rate > 4 * best_disk_read(result["ceilings"]) and run["fraction_of_roofline"] > 4


def test_session_9_kv_quant_auto_chose_int4_on_the_gpu_which_tied_with_int4_kv_in_ram():
    """Call 3: bench --kv-quant auto chose an int4 cache on the GPU (6.24 s predicted), the planner's pick among bf16,
    int8 and int4; int4 KV fixed in host RAM, the call's second run, was predicted 7.21 s from the disk rate measured
    again at its load and took the same time: 6.630 s against 6.626 (medians 6.59 against 6.74). Either cache takes
    its bytes from the weights' room in one budget or the other, so the disk reads the same per step; the planner's
    1.19x win of session 8 was the disk's drift between the two runs."""
    auto = json.loads((RESULTS / S9_111B_DISK[1]).read_text())
    assert "--kv-quant auto" in auto["command"] and "--kv-placement" not in auto["command"]
    assert auto["placement"]["kv_quant"] == "int4 (group 128)" and auto["placement"]["kv_placement"] == "gpu"
    ram = _steps(S9_111B_DISK[2])[64]
    assert abs(_steps(S9_111B_DISK[1])[64] - ram) / ram < 0.01


S10_GRAPHS = [
    *(f"llama3_8b_int4_b16x2048_resident_graphs_kvint4_s10call4_run{k}_h200.json" for k in (1, 2)),
    *(f"llama3_8b_int4_b16x2048_resident_graphs_kvnone_s10call5_run{k}_h200.json" for k in (1, 2)),
    "llama3_8b_int4_b16x2048_resident_graphs_kvnone_gen128_s10call5_h200.json",
    "llama3_8b_int4_b16x2048_resident_default_gen128_s10call6_h200.json",
]
S11_GRAPHS = [
    "llama3_8b_int4_b16x2048_kv_gpu_s11call1_h200.json",  # the KV-tier script's HBM run: graphs by default
    "llama3_8b_int4_b16x2048_resident_graphs_kvnone_s11call1_run1_h200.json",
    "llama3_8b_int4_b16x2048_resident_graphs_kvint4_s11call3_run1_h200.json",  # the KV attention at 4 blocks/SM
    *(f"llama3_8b_int4_b16x2048_resident_graphs_kv{kv}_gen32_s11call5_run{k}_h200.json"  # slot-reading quantize
      for kv, k in (("int4", 1), ("int4", 2), ("none", 1))),
    *(f"llama3_8b_int4_b16x2048_resident_graphs_kv{kv}_gen32_s12call3_h200.json"  # the embedding gathered in-graph
      for kv in ("none", "int4")),
    *(f"llama3_8b_int4_b16x2048_resident_graphs_kv{kv}_gen32{run}_h200.json"  # GEMV: two batch tiles per block
      for kv in ("none", "int4") for run in ("_gemv_u2m1n2_s12call5", "_s12call6")),
    pytest.param("llama3_8b_int4_b16x2048_resident_graphs_kvint4_gen32_s11call4_h200.json", marks=pytest.mark.xfail(
        strict=True, reason="12.4 ms predicted, 16.7 measured (median): the host's part of each step took 4-7 ms "
        "where its probe at load read 0.72, while the VM's host stole 18.7% of the busy CPU time (0-1.7% in every "
        "other session 11 run). The same command on the same machine minutes later (the _s11call5 files): 12.8 "
        "ms, host part 1.1. A graph step waits for its host part, so the host's speed adds to it")),
]


def _graph_prediction(name: str, same_run: bool) -> tuple[float, dict]:
    """The predicted step of a recorded CUDA-graph run (every block in HBM, KV on the GPU): the cost model over its
    placement, with the host's part and the kernels' time its probes measured (at load, or after the run)."""
    result = json.loads((RESULTS / name).read_text())
    placement, (run,) = result["placement"], result["runs"]
    assert placement["cuda_graphs"]
    assert placement["streamed_blocks"] == 0 and placement["kv_placement"] == "gpu"
    breakdown = run["predicted_breakdown_same_run_s" if same_run else "plan_breakdown_s"]
    w = workload("llama3-8b", "int4", 128, torch.bfloat16, batch=run["batch"], prompt_len=run["prompt_len"],
                 gen_len=run["gen_len"], kv_quant=_kv_quant_of(placement), host_step_s={1: breakdown["host"]})
    w = replace(w, gpu_step_s={1: breakdown["kernels"]}, cuda_graphs=True)
    hw = Hardware.from_ceilings(result["ceilings"]) if same_run else Hardware.from_json(run["plan_hardware"])
    return predict(_placement_of(w, placement), w, hw).predicted_step_s, run


@pytest.mark.parametrize("same_run", [False, True])
@pytest.mark.parametrize("name", S10_GRAPHS + S11_GRAPHS)
def test_graph_steps_are_predicted_within_15_percent(name, same_run):
    """Sessions 10 and 11, llama3-8b int4, batch 16 x 2048, every block and the KV cache (bf16 or int4) in HBM,
    decode steps as CUDA graph replays: the host's part plus the kernels' time, both measured on the machine at load
    (and again after the run), within 15% of the steady step: the median. The first step of each 256-slot span runs
    eagerly and is captured (60-65 ms more): 1 step in 15 of a 16-token run, 1 in 127 of the 128-token one, whose
    mean is held to 15% as well."""
    predicted, run = _graph_prediction(name, same_run)
    assert abs(predicted - run["decode_step_median_s"]) / run["decode_step_median_s"] <= 0.15
    if run["gen_len"] >= 128:
        assert abs(predicted - run["decode_step_s"]) / run["decode_step_s"] <= 0.15
    assert predicted == pytest.approx(run["plan_breakdown_s" if not same_run else "predicted_breakdown_same_run_s"]
                                      ["step"], rel=1e-6)  # what bench itself predicted


def test_graphs_that_gather_the_embedding_on_the_gpu_beat_the_host_gather_of_the_same_call():
    """Session 12, call 3, llama3-8b int4 batch 16 x 2048, alternating f55e533 (each step's tokens copied to the host,
    embedded there, copied back) and 5fa4492 (the graph gathers the rows from the pinned table mapped into the GPU's
    address space): every new run's host part and step (medians) below the old run's next to it, the step 3.4-6.2%
    shorter; the profile of the new host part holds no embedding op and no host sync but the timing's own. These
    runs were timed under the profiler (its cost in both host parts; call 7, below, timed without it)."""
    summary = json.loads((RESULTS / "graph_embedding_on_gpu_ab_s12call3_h200.json").read_text())
    assert len(summary["pairs"]) == 3
    for pair in summary["pairs"]:
        name = "graph_host_part_llama3_8b_int4_b16x2048_kv{kv_quant}_{{}}_run{run}_s12call3_h200.json".format(**pair)
        old, new = (json.loads((RESULTS / name.format(v)).read_text()) for v in ("old", "new"))
        assert (old["host_part_median_s"], new["host_part_median_s"]) == (pair["old_host_part_median_s"],
                                                                          pair["new_host_part_median_s"])
        assert (old["step_median_s"], new["step_median_s"]) == (pair["old_step_median_s"], pair["new_step_median_s"])
        assert new["host_part_median_s"] < 0.6 * old["host_part_median_s"]
        assert 0.93 < new["step_median_s"] / old["step_median_s"] < 0.97
        assert any("embedding" in row["function"] for row in old["profile_top_own_time_us_per_step"])
        assert not any("embedding" in row["function"] for row in new["profile_top_own_time_us_per_step"])
        syncs = [row for row in new["profile_top_own_time_us_per_step"] if "synchronize" in row["function"]]
        assert syncs and all(row["calls_per_step"] < 1.1 for row in syncs)  # on_step's, which times the step


def test_the_embedding_gathered_on_the_gpu_timed_without_the_profiler():
    """Session 12, call 7: call 3's pair again, f55e533 against 8f0c270, each generation timed without the profiler
    (a second one profiled): host part 1.53 -> 0.59 ms (bf16 KV), 1.03 -> 0.39 ms (int4 KV); steps 8.7% and 4.2%
    shorter."""
    summary = json.loads((RESULTS / "graph_embedding_on_gpu_ab_unprofiled_s12call7_h200.json").read_text())
    assert [p["kv_quant"] for p in summary["pairs"]] == ["none", "int4"]
    for pair in summary["pairs"]:
        name = f"graph_host_part_unprofiled_llama3_8b_int4_b16x2048_kv{pair['kv_quant']}_{{}}_run1_s12call7_h200.json"
        old, new = (json.loads((RESULTS / name.format(v)).read_text()) for v in ("old", "new"))
        assert new["profiled"] == "a second generation, after the timed one"
        assert (old["step_median_s"], new["step_median_s"]) == (pair["old_step_median_s"], pair["new_step_median_s"])
        assert new["host_part_median_s"] < 0.4 * old["host_part_median_s"]
        assert 0.9 < new["step_median_s"] / old["step_median_s"] < 0.96
        assert not any("embedding" in row["function"] for row in new["profile_top_own_time_us_per_step"])


def test_later_generations_of_one_batch_skip_the_capture():
    """Session 12, call 4, three generations of llama3-8b int4 batch 16 x 2048 in a row, alternating 8f0c270 (a new
    decoder per call, which runs and captures its span's first step) and 6b2fde2 (later calls of the batch replay
    the kept graph): the first call's decode time alike (within 3%), each later call's 5-16% shorter with the kept
    graph, its mean step within 3% of its median (no capture left in it) where the old calls' were 11-21% above."""
    summary = json.loads((RESULTS / "repeat_generation_graphs_ab_s12call4_h200.json").read_text())
    assert len(summary["runs"]) == 2
    for pair in summary["runs"]:
        name = "repeat_generation_graphs_llama3_8b_int4_b16x2048_{}_run" + f"{pair['run']}_s12call4_h200.json"
        old, new = (json.loads((RESULTS / name.format(v)).read_text())["calls"] for v in ("old", "new"))
        assert [c["decode_s"] for c in old] == pair["old_decode_s_per_call"]
        assert [c["decode_s"] for c in new] == pair["new_decode_s_per_call"]
        assert abs(new[0]["decode_s"] / old[0]["decode_s"] - 1) < 0.03
        for o, n in zip(old[1:], new[1:], strict=True):
            assert 0.80 < n["decode_s"] / o["decode_s"] < 0.96
            assert n["decode_step_mean_s"] < 1.03 * n["decode_step_median_s"]
            assert o["decode_step_mean_s"] > 1.1 * o["decode_step_median_s"]


@pytest.mark.parametrize("call,low,high", [("s12call5", 1.05, 1.11), ("s12call6", 0.88, 0.92)])
def test_gemv_with_two_batch_tiles_per_block_in_the_graph_step(call, low, high):
    """llama3-8b int4 batch 16 x 2048 graph steps (medians), alternating with 442a2c7 (one 8-row tile per block, the
    weight read once per tile) in one call: the two-tile GEMV with the variant picked before measuring (u2m1w8, call
    5) made the step 6-11% slower; the one call 5's sweep picked (u1m1w8, DEFAULT_GEMV_WIDE) 8-12% faster (call 6).
    The sweep itself: at 16 rows the chosen variant below DEFAULT_GEMV on every int4 shape, u2m1w8 with two tiles
    above it."""
    summary = json.loads((RESULTS / f"gemv_batch_tiles_decode_ab_{call}_h200.json").read_text())
    variant = {"s12call5": "u2m1n2", "s12call6": "u1m1n2"}[call]
    assert len(summary["pairs"]) == 3
    for pair in summary["pairs"]:
        name = (f"graph_host_part_gemv_{variant}_llama3_8b_int4_b16x2048_kv{pair['kv_quant']}_{{}}"
                f"_run{pair['run']}_{call}_h200.json")
        old, new = (json.loads((RESULTS / name.format(v)).read_text()) for v in ("old", "new"))
        assert (old["step_median_s"], new["step_median_s"]) == (pair["old_step_median_s"], pair["new_step_median_s"])
        assert low < new["step_median_s"] / old["step_median_s"] < high
    sweep = json.loads((RESULTS / "kernels_gemv_batch_tiles_s12call5_h200.json").read_text())["gemv"]
    us = {(r["bits"], r["dtype"], r["out"], r["in"], r["variant"]): r["us"] for r in sweep
          if r["kernel"] == "gemv" and r["batch"] == 16}
    shapes = {key[:4] for key in us if key[0] == 4}
    assert len(shapes) == 6  # 3 shapes x fp16, bf16
    for shape in shapes:
        assert us[(*shape, "u1m1w8n2")] < 0.91 * us[(*shape, "u2m2w8n1")]  # 10-17% less
        assert us[(*shape, "u2m1w8n2")] > us[(*shape, "u2m2w8n1")]


EAGER_GRAPH_PAIRS = [
    *((f"llama3_8b_int4_b16x2048_resident_eager_kvint4_s10call4_run{k}_h200.json",
       f"llama3_8b_int4_b16x2048_resident_graphs_kvint4_s10call4_run{k}_h200.json") for k in (1, 2)),
    *((f"llama3_8b_int4_b16x2048_resident_eager_kvnone_s10call5_run{k}_h200.json",
       f"llama3_8b_int4_b16x2048_resident_graphs_kvnone_s10call5_run{k}_h200.json") for k in (1, 2)),
    *((f"llama3_8b_int4_b16x2048_resident_eager_{run}_h200.json",
       f"llama3_8b_int4_b16x2048_resident_graphs_{run}_h200.json") for run in ("kvnone_s11call1_run1",
                                                                               "kvint4_s11call3_run1",
                                                                               "kvint4_gen32_s11call4")),
]


def test_session_10_the_default_load_replays_graphs_where_everything_fits_hbm():
    """Call 6: bench with neither --cuda-graphs nor --no-cuda-graphs (load's cuda_graphs="auto") on the resident
    config chose graph replays, the planner having planned for both."""
    result = json.loads((RESULTS / S10_GRAPHS[-1]).read_text())
    assert "cuda-graphs" not in result["command"] and result["placement"]["cuda_graphs"]


@pytest.mark.parametrize("eager,graphs", EAGER_GRAPH_PAIRS)
def test_graphs_beat_eager_steps_of_the_same_call(eager, graphs):
    """Each graph run against the eager run just before it on the same machine, same command but --cuda-graphs:
    steady steps (medians) 1.26-1.36x faster with an int4 cache, 1.9-3.6x with bf16 (session 10; the eager step is
    the host's time of issuing ~700 launches, which changed 2x between runs); session 11: 1.75x (bf16), 2.06x (int4,
    the KV attention at 4 blocks per SM)."""
    def run(name: str) -> dict:
        return json.loads((RESULTS / name).read_text())["runs"][0]

    ratio = run(eager)["decode_step_median_s"] / run(graphs)["decode_step_median_s"]
    assert ratio > 1.2, ratio


def test_session_11_plan_beats_every_hand_written_kv_placement_of_its_call():
    """llama3-8b int4, batch 16 x 2048, call 1: the planner's choice with nothing fixed (KV in HBM, steps as graph
    replays) against the KV cache fixed in host RAM and on disk (bf16, int4), and against eager steps
    (--no-cuda-graphs), all in the same call; medians."""
    tiers = "llama3_8b_int4_b16x2048_kv_{}_s11call1_h200.json"
    planned = json.loads((RESULTS / tiers.format("gpu")).read_text())
    assert "--kv-placement" not in planned["command"] and "cuda-graphs" not in planned["command"]
    assert planned["placement"]["kv_placement"] == "gpu" and planned["placement"]["cuda_graphs"]
    step = planned["runs"][0]["decode_step_median_s"]
    others = [tiers.format(kind) for kind in ("cpu", "disk", "disk_int4")]
    others.append("llama3_8b_int4_b16x2048_resident_eager_kvnone_s11call1_run1_h200.json")
    for name in others:
        result = json.loads((RESULTS / name).read_text())
        assert result["placement"]["placement"] == "plan" and step < result["runs"][0]["decode_step_median_s"], name


def test_session_11_kv_attention_split_aims_at_the_sweeps_best():
    """bench_kernels' sweep of the fused KV attention's sequence split (call 1): for llama3-8b's b16 x 2304 graph span
    and for b8 x 4096, 4 blocks per SM was the fastest of 2, 4, 8, 16 in both int4 and int8; that is the constant."""
    from tiermem.kernels.cupy_ops import KV_ATTENTION_BLOCKS_PER_SM

    rows = json.loads((RESULTS / "kv_attention_splits_s11call1_h200.json").read_text())["kv_attention"]
    for batch, length in ((16, 2304), (8, 4096)):
        for bits in (4, 8):
            timed = {r["blocks_per_sm"]: r["us"] for r in rows
                     if (r["batch"], r["length"], r["bits"]) == (batch, length, bits)}
            assert set(timed) == {2, 4, 8, 16} and min(timed, key=timed.get) == 4, (batch, length, bits)
    assert KV_ATTENTION_BLOCKS_PER_SM == 4


def _moe_xfail(name: str, reason: str):
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reason))


MOE_HOST_BOUND = ("eager MoE steps streamed from host RAM are host-bound (the host issued the batch-16 step in "
                  "68-90 ms) and their host time does not hide behind PCIe as the model has it (max of the two)")
MOE_SPLIT_STEPS = ("0.883 s predicted, 1.21-1.27 measured: the plan split batch 8 into 4 micro-batches, whose host "
                   "syncs wait for each other's expert copies (the host issued the step in 1.19-1.25 s); the cost "
                   "model has counted split MoE steps with whole copies since, and the plan of call 5 keeps them whole")
MOE_RECORDED = [
    "mixtral_8x7b_int4_resident_graphs_s14call3_h200.json",
    "mixtral_8x7b_int4_resident_graphs_s14call4_h200.json",
    _moe_xfail("mixtral_8x7b_int4_resident_eager_s14call3_h200.json", "0.1365 s predicted, 0.0758 measured: the "
               "code synced the host with the GPU in every layer then; the probe's narrow copy waited more"),
    "mixtral_8x7b_int4_resident_eager_s14call4_h200.json",
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_s14call3_h200.json", "0.074 s predicted, 0.175 measured: the "
               "per-layer host sync of that code serialized the host's issuing with the GPU; " + MOE_HOST_BOUND),
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_s14call4_h200.json", MOE_HOST_BOUND),
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_s14call5_h200.json", MOE_HOST_BOUND),
    "mixtral_8x7b_int4_gpu24_host_kvgpu_s14call5_h200.json",
    "mixtral8x7b_4l_bf16_vs_accelerate_s14call6_h200.json",
    "mixtral8x7b_4l_int4_vs_accelerate_bf16_s14call6_h200.json",
    "mixtral_8x7b_int4_resident_graphs_s15call1_h200.json",
    "mixtral_8x7b_int4_gpu24_host_s15call1_h200.json",
    "mixtral_8x22b_int4_gpu24_host_s15call2_h200.json",
    "mixtral_8x7b_int4_gpu24_host_whole_experts_s15call3_h200.json",
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_experts_on_demand_s15call3_h200.json", MOE_HOST_BOUND),
    _moe_xfail("mixtral_8x22b_int4_gpu24_host_kvcpu_whole_experts_s15call4_h200.json", MOE_SPLIT_STEPS),
    _moe_xfail("mixtral_8x22b_int4_gpu24_host_kvcpu_experts_on_demand_s15call4_h200.json", MOE_SPLIT_STEPS),
    "mixtral_8x22b_int4_gpu24_host_experts_on_demand_s15call5_h200.json",
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_experts_on_demand_s15call5_h200.json", MOE_HOST_BOUND),
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_experts_on_demand_s15call6_h200.json", MOE_HOST_BOUND),
    _moe_xfail("mixtral_8x7b_int4_gpu24_host_routed_s16call3_h200.json", MOE_HOST_BOUND),
    "mixtral_8x22b_int4_resident_graphs_routed_s16call3_h200.json",
]


@pytest.mark.parametrize("name", MOE_RECORDED)
def test_plan_time_prediction_of_recorded_moe_runs_within_15_percent(name):
    """Sessions 14-16's Mixtral runs: the step the plan predicted at load for the largest batch against that batch's
    median step (16 new tokens: the mean of a graph run carries its capture)."""
    result = json.loads((RESULTS / name).read_text())
    runs = [c["tiermem"] for c in result["comparisons"]] if "comparisons" in result else result["runs"]
    largest = max(runs, key=lambda r: r["batch"])
    predicted, measured = result["placement"]["predicted_step_s"], largest["decode_step_median_s"]
    assert largest.get("within_gpu_budget", True)
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def test_session_15_mixtral_8x22b_in_24_gib_streams_at_the_pcie_roofline():
    """Mixtral-8x22B (141B parameters, int4) in 24 GiB of GPU memory, 53 GB a step from pinned host RAM (call 2):
    every step within the GPU budget and the pinned RAM within cpu_memory, at >= 0.9 of the PCIe roofline."""
    result = json.loads((RESULTS / "mixtral_8x22b_int4_gpu24_host_s15call2_h200.json").read_text())
    placement = result["placement"]
    assert placement["pinned_host_bytes"] + placement["host_kv_reserved_bytes"] <= 100 * 2**30
    for run in result["runs"]:
        assert run["within_gpu_budget"] and run["peak_gpu_bytes"] <= 24 * 2**30
        assert run["roofline_link"] == "pcie" and run["fraction_of_roofline"] >= 0.9, run["batch"]


def test_session_15_copying_only_the_chosen_experts_makes_a_batch_of_one_3x_faster():
    """Mixtral-8x22B int4 in 24 GiB, the same placement (17 blocks in HBM, 40 streamed from host RAM, KV on the host),
    call 4: batch 1 copying the chosen experts against copying every expert (--whole-experts); and call 5, the plan's
    own placement: batch 1 at >= 0.85 of the roofline of its chosen experts' bytes (median step), batch 8 at >= 0.9
    of the PCIe roofline, both within 24 GiB."""
    def batch_one(name):
        result = json.loads((RESULTS / name).read_text())
        return result, next(r for r in result["runs"] if r["batch"] == 1)

    whole, whole_b1 = batch_one("mixtral_8x22b_int4_gpu24_host_kvcpu_whole_experts_s15call4_h200.json")
    chosen, chosen_b1 = batch_one("mixtral_8x22b_int4_gpu24_host_kvcpu_experts_on_demand_s15call4_h200.json")
    keys = ("gpu_resident_blocks", "streamed_blocks", "kv_placement", "streamed_bytes_per_step")
    assert [whole["placement"][k] for k in keys] == [chosen["placement"][k] for k in keys]
    assert (whole["experts"], chosen["experts"]) == ("whole", "on demand")
    assert whole_b1["decode_step_median_s"] / chosen_b1["decode_step_median_s"] >= 3.0
    assert chosen_b1["h2d_weight_bytes_per_step"] < 0.35 * whole_b1["h2d_weight_bytes_per_step"]
    result = json.loads((RESULTS / "mixtral_8x22b_int4_gpu24_host_experts_on_demand_s15call5_h200.json").read_text())
    b1, b8 = sorted(result["runs"], key=lambda r: r["batch"])
    assert b1["chosen_experts_roofline_step_s"] / b1["decode_step_median_s"] >= 0.85
    assert b8["fraction_of_roofline"] >= 0.9 and b8["roofline_link"] == "pcie"
    assert all(r["within_gpu_budget"] and r["peak_gpu_bytes"] <= 24 * 2**30 for r in (b1, b8))


def _ab(name: str) -> dict[tuple[bool, bool, int], list[float]]:
    """benchmarks/moe_routed_ab.py's median decode steps: {(graphs, routed, batch): seconds of each run}."""
    result = json.loads((RESULTS / name).read_text())
    runs: dict = {}
    for run in result["runs"]:
        runs.setdefault((run["cuda_graphs"], run["routed"], run["batch"]), []).append(run["decode_step_median_s"])
    return runs


def test_session_16_the_routed_gemv_makes_resident_mixtral_graph_steps_of_few_rows_3x_faster():
    """Mixtral-8x7B int4 resident on the H200, two machines (calls 2 and 6), each routed, not routed, routed again
    in one process: graph steps of one row take at most 0.36 of their time without the routed GEMV (19-20 ms, every
    expert), two and three rows at most 0.6; eager steps of 16 rows (every expert in two launches instead of 40)
    at most 0.65; graph steps of 16 rows at most 0.9."""
    call2 = _ab("mixtral_8x7b_int4_resident_routed_ab_s16call2_h200.json")
    call6 = _ab("mixtral_8x7b_int4_resident_routed_ab_s16call6_h200.json")
    for runs in (call2, call6):
        assert max(runs[True, True, 1]) <= 0.36 * runs[True, False, 1][0]
    for batch in (2, 3):
        assert max(call2[True, True, batch]) <= 0.6 * call2[True, False, batch][0]
        assert max(call2[False, True, batch]) <= 0.6 * call2[False, False, batch][0]
    assert max(call6[False, True, 16]) <= 0.65 * call6[False, False, 16][0]
    assert max(call6[True, True, 16]) <= 0.9 * call6[True, False, 16][0]


def test_session_16_the_routed_gemv_speeds_mixtral_in_24_gib_at_batch_1_and_16():
    """Mixtral-8x7B int4 in 24 GiB of GPU memory, the rest streamed from host RAM (the plan's placement), eager:
    batch 1 (its resident layers routed, its streamed ones copying the chosen experts on demand) at most 0.7 of its
    step without the routed GEMV (call 4); batch 16 (every expert in two launches) at most 0.75 (call 6), at 0.67+
    of its PCIe roofline; every run within 24 GiB."""
    call4 = _ab("mixtral_8x7b_int4_gpu24_host_routed_ab_s16call4_h200.json")
    call6 = _ab("mixtral_8x7b_int4_gpu24_host_routed_ab_s16call6_h200.json")
    assert max(call4[False, True, 1]) <= 0.7 * call4[False, False, 1][0]
    assert max(call6[False, True, 16]) <= 0.75 * call6[False, False, 16][0]
    for name in ("mixtral_8x7b_int4_gpu24_host_routed_ab_s16call4_h200.json",
                 "mixtral_8x7b_int4_gpu24_host_routed_ab_s16call6_h200.json"):
        runs = json.loads((RESULTS / name).read_text())["runs"]
        assert all(r["peak_gpu_bytes"] <= 24 * 2**30 for r in runs)
        assert all(r["fraction_of_chosen_experts_roofline"] >= 0.67 for r in runs if r["routed"] and r["batch"] == 16)


def test_session_16_the_cost_model_reads_the_picked_experts_of_a_resident_graph_step():
    """Mixtral-8x22B int4 (141B) resident on the H200, CUDA graphs, batch 1 (call 3, 15.8 ms a step): with its HBM
    term reading the other weights and one expert per pick (cost_model.Workload.read_share), the cost model, given
    that run's probed kernel and host seconds, predicts the step within 10%; the run's own prediction, made before
    (every expert read), said 17.9 ms."""
    from tiermem.cost_model import step_cost

    result = json.loads((RESULTS / "mixtral_8x22b_int4_resident_graphs_routed_s16call3_h200.json").read_text())
    b1 = next(r for r in result["runs"] if r["batch"] == 1)
    probed = b1["predicted_breakdown_same_run_s"]
    w = replace(workload("mixtral-8x22b", "int4", 128, torch.bfloat16, batch=1, prompt_len=512, gen_len=16),
                cuda_graphs=True, gpu_step_s={1: probed["kernels"]}, host_step_s={1: probed["host"]})
    hw = Hardware.from_ceilings(result["ceilings"], matmul_flops=6e14)
    cost = step_cost(w, hw, resident=result["placement"]["gpu_weight_bytes"], host=0, disk=0, kv="gpu",
                     cpu_cache_compute=False, micro_batches=1)
    assert cost["hbm"] < 0.4 * probed["hbm"]
    assert cost["step"] == pytest.approx(b1["decode_step_median_s"], rel=0.1)
    assert probed["step"] > 1.12 * b1["decode_step_median_s"]
