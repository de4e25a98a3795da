"""The command line: demo on the embedded default, pack / info / generate, --help everywhere, errors."""

import pytest
from hf_models import build_tiny

from tiermem.cli import build_parser, main

SUBCOMMANDS = [[], ["demo"], ["pack"], ["generate"], ["info"], ["bench"], ["plan"], ["checkpoint"],
               ["checkpoint", "verify"]]


@pytest.mark.parametrize("words", SUBCOMMANDS)
def test_help_everywhere(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tiermem" in capsys.readouterr().out


def test_demo_builds_packs_and_generates(tmp_path, capsys):
    assert main(["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "6 tokens in" in out and "tokens/s" in out and "output:" in out
    assert (tmp_path / "demo" / "tiny-llama-int4" / "manifest.json").is_file()
    assert main(["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "2"]) == 0  # cached the second time


def test_pack_info_generate(tmp_path, capsys):
    src = build_tiny("llama2", tmp_path / "hf")
    store = tmp_path / "store"
    assert main(["pack", str(src), str(store), "--quant", "int8", "--group-size", "32"]) == 0
    assert main(["info", str(store)]) == 0
    assert "int8 (group 32)" in capsys.readouterr().out
    assert main(["generate", str(store), "--prompt", "t5 t6 t7", "--prompt", "t9", "--max-new-tokens", "4",
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("t5 t6 t7") and lines[1].startswith("t9")
    for temperature in ("-0.5", "nan"):  # nan decoded greedily before
        assert main(["generate", str(store), "--prompt", "t5", "--temperature", temperature]) == 2
        assert "--temperature must be a number >= 0" in capsys.readouterr().err
    import tiermem

    with tiermem.load(store, max_batch_size=2, max_seq_len=16) as model:
        for prompts in ([], "t5 t6"):
            with pytest.raises(tiermem.ConfigError, match="non-empty list of strings"):
                model.generate_text(prompts, 2)


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "tiermem: error:" in capsys.readouterr().err
    src = build_tiny("opt", tmp_path / "hf")
    assert main(["pack", str(src), str(tmp_path / "s"), "--quant", "int4", "--group-size", "48"]) == 2
    assert "group" in capsys.readouterr().err


def test_checkpoint_verify_command(tmp_path, capsys):
    import torch

    import tiermem

    path = tmp_path / "ckpt"
    tiermem.checkpoint.save_async({"w": torch.randn(64, 64), "step": 3}, path).result()
    assert main(["checkpoint", "verify", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    data = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoint", "verify", str(path)])
    assert exit_info.value.code == 1 and "FAILED" in capsys.readouterr().out
    store = tiermem.pack(build_tiny("llama2", tmp_path / "hf"), tmp_path / "store", progress=False)
    assert main(["checkpoint", "verify", str(store)]) == 2
    assert "is a tiermem block store, not a checkpoint" in capsys.readouterr().err
    with pytest.raises(tiermem.NotACheckpointError, match="block store"):
        tiermem.checkpoint.load(store)


def test_bench_table_shows_peak_gpu_memory_and_warns_over_budget():
    """A bench run whose measured peak went past gpu_memory says so in the table, not only in the JSON; the table
    shows the median step and how long the host took to issue a decode step (median), next to the mean step."""
    from tiermem.bench import format_table

    def result(peak: int) -> dict:
        run = {"batch": 64, "micro_batches": 1, "prefill_s": 20.0, "decode_step_s": 5.8, "decode_step_median_s": 5.7,
               "decode_tok_per_s": 11.0,
               "peak_gpu_bytes": peak, "within_gpu_budget": peak <= 24 << 30, "decode_host_issue_s": [0.3, 0.1, 0.2]}
        return {"model": "llama-111b", "quant": "int4", "machine": {"gpu": "H200"}, "ceilings": {},
                "placement": {"gpu_budget_bytes": 24 << 30}, "runs": [run]}

    within = format_table(result(23 << 30))
    assert "23.00 GiB" in within and "WARNING" not in within
    assert "median s  issued s" in within  # the median step, and its host issue time
    assert "    5.8000    5.7000    0.2000 " in within
    over = format_table(result(int(25.6 * 2**30)))
    assert "25.60 GiB" in over and "WARNING: peak GPU memory went over gpu_memory (24.00 GiB) at batch [64]" in over


def test_bench_options_are_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--synthetic", "tiny-llama"]) == 2
    assert "pass --device cpu" in capsys.readouterr().err
    for option, value in (("--batch", "0"), ("--batch", "1,x"), ("--micro-batches", "-1")):
        assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", option, value]) == 2
        assert f"{option} takes positive integers" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for text, match in (("{", "cannot read a plan"), ('{"x": 1}', "holds no plan"), ('{"plan": {"kv": "gpu"}}',
                                                                                        "not a tiermem plan")):
        bad.write_text(text)
        assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--plan", str(bad)]) == 2
        assert match in capsys.readouterr().err
    assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--plan", str(tmp_path / "none")]) == 2
    assert "cannot read a plan" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--gpu-memory", "1GiB"]) == 2
    assert "on the CPU pass cpu_memory only" in capsys.readouterr().err
    for option, value in (("--gen-len", "1"), ("--gen-len", "0"), ("--prompt-len", "0")):
        assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", option, value]) == 2
        assert "bench needs --prompt-len >= 1 and --gen-len >= 2" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "r.json"  # under a file: checked before the run, not after it
    assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--out", str(unwritable)]) == 2
    assert f"--out {unwritable}: cannot create its directory" in capsys.readouterr().err
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find(name, *a))
    assert main(["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--plot", "x.png"]) == 2
    assert "pip install 'tiermem[plot]'" in capsys.readouterr().err


def test_bench_reuses_a_written_store_only_if_it_is_the_one_asked_for(tmp_path, capsys):
    short = ["--device", "cpu", "--prompt-len", "4", "--gen-len", "2", "--batch", "1"]
    store = tmp_path / "ws"
    assert main(["bench", "--synthetic", "tiny-llama", "--quant", "int4", "--write-store", str(store), *short]) == 0
    written = (store / "manifest.json").stat().st_mtime_ns
    assert main(["bench", "--synthetic", "tiny-llama", "--quant", "int4", "--write-store", str(store), *short]) == 0
    assert (store / "manifest.json").stat().st_mtime_ns == written  # reused, not written again
    capsys.readouterr()
    assert main(["bench", "--synthetic", "tiny-llama", "--quant", "none", "--write-store", str(store), *short]) == 2
    assert "holds another model (int4, not --synthetic tiny-llama --quant none)" in capsys.readouterr().err


def test_bench_of_a_store_records_the_stores_quantization(tmp_path):
    import json

    store = tmp_path / "ws"
    short = ["--device", "cpu", "--prompt-len", "4", "--gen-len", "2", "--batch", "1"]
    assert main(["bench", "--synthetic", "tiny-llama", "--quant", "int4", "--write-store", str(store), *short]) == 0
    assert main(["bench", str(store), *short, "--out", str(tmp_path / "r.json")]) == 0  # no --quant: it is the store's
    assert json.loads((tmp_path / "r.json").read_text())["quant"] == "int4"


def test_bench_measures_the_disk_ceilings_after_its_timed_runs(tmp_path, monkeypatch):
    """Reading the store to measure the disk slowed the disk KV tier's reads when it came first (device calls
    9-10 of session 5): bench times every run, then measures, then computes rooflines and predictions."""
    import json

    import tiermem
    from tiermem import bench

    store = tiermem.pack(build_tiny("llama2", tmp_path / "hf"), tmp_path / "store", progress=False)
    order: list[str] = []
    timed, measured = bench.time_generation, bench.after_run_ceilings
    monkeypatch.setattr(bench, "time_generation", lambda *a, **k: (order.append("run"), timed(*a, **k))[1])
    monkeypatch.setattr(bench, "after_run_ceilings", lambda *a, **k: (order.append("ceilings"), measured(*a, **k))[1])
    out = tmp_path / "r.json"
    assert main(["bench", str(store), "--device", "cpu", "--batch", "1,2", "--prompt-len", "4", "--gen-len", "3",
                 "--out", str(out)]) == 0
    assert order == ["run", "run", "run", "ceilings"]  # the warm-up, two batches, then the ceilings
    runs = json.loads(out.read_text())["runs"]
    assert [r["batch"] for r in runs] == [1, 2] and all(len(r["decode_steps_s"]) == 2 for r in runs)


def test_bench_records_each_decode_steps_host_issue_time_and_the_cpu_steal(tmp_path, monkeypatch):
    """time_generation: for every decode step, the seconds until the host had issued it (here, on the CPU, where
    nothing runs behind the host, the whole step but its sync), and the share of busy CPU time the VM's host stole."""
    import tiermem
    from tiermem import bench

    store = tiermem.pack(build_tiny("llama2", tmp_path / "hf"), tmp_path / "store", progress=False)
    with tiermem.load(store, max_batch_size=2, max_seq_len=32) as m:
        run = bench.time_generation(m, 2, None, 8, 5)
    assert len(run["decode_host_issue_s"]) == len(run["decode_steps_s"]) == 4
    assert all(0 < i <= s for i, s in zip(run["decode_host_issue_s"], run["decode_steps_s"], strict=True))
    assert run["gpu_sm_clock_mhz_after"] is None  # a CPU model
    ticks = bench.cpu_steal_ticks()
    if ticks is None:
        assert run["decode_cpu_steal_of_busy"] is None
    else:
        assert 0 <= ticks[0] <= ticks[1]
        assert run["decode_cpu_steal_of_busy"] is None or 0 <= run["decode_cpu_steal_of_busy"] <= 1
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert bench.cpu_steal_ticks() is None


def test_the_hbm_roofline_counts_a_kv_cache_in_hbm():
    """A step over a KV cache in HBM reads every filled slot of it as well as the weights: both bound the step at
    HBM's rate (llama3-8b int4 at batch 16 x 2048: 4.0 GB of weights, 4.3 GB of bf16 KV)."""
    from tiermem.bench import roofline

    info = {"gpu_weight_bytes": 4.0e9, "streamed_bytes_per_step": 0}
    ceilings = {"h2d_pinned_Bps": 55e9, "hbm_Bps": 4.0e12}
    weights_only = roofline(info, ceilings, 0.01)
    with_kv = roofline(info, ceilings, 0.01, kv_hbm_bytes=4.3e9)
    assert weights_only["roofline_link"] == with_kv["roofline_link"] == "hbm"
    assert weights_only["roofline_step_s"] == pytest.approx(1e-3)
    assert with_kv["roofline_step_s"] == pytest.approx(2.075e-3) and with_kv["fraction_of_roofline"] == \
        pytest.approx(0.2075)
