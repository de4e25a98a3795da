"""tiermem.probe: the hardware cache (CPU), the CPU-side measurements, and the GPU probe (gpu marker)."""

import json
import os
import socket

import pytest
import torch

from tiermem import probe
from tiermem.errors import ConfigError, TiermemError
from tiermem.planner import Hardware

FIGURES = Hardware(disk_read_Bps=1.3e9, h2d_Bps=55.5e9, hbm_Bps=4.2e12, matmul_flops=6e14, cpu_memcpy_Bps=1e10,
                   name="NVIDIA H200")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


class Counter:
    def __init__(self, hw: Hardware = FIGURES) -> None:
        self.calls, self.hw = 0, hw

    def __call__(self) -> Hardware:
        self.calls += 1
        return self.hw


def test_cache_path_is_per_host_and_gpu(tmp_path):
    path = probe.cache_path("NVIDIA H200 NVL", host="vm 1", cache_dir=tmp_path)
    assert path == tmp_path / "hardware-vm_1-NVIDIA_H200_NVL.json"
    assert probe.cache_path("x").parent.parts[-2:] == (".cache", "tiermem")


def test_measures_once_then_reads_the_fresh_cache(tmp_path):
    measure = Counter()
    path = tmp_path / "sub" / "hw.json"
    assert probe.cached_hardware(path, measure=measure) == FIGURES
    assert probe.cached_hardware(path, measure=measure) == FIGURES
    assert measure.calls == 1
    body = json.loads(path.read_text())
    assert body["host"] == socket.gethostname() and body["hardware"]["h2d_Bps"] == 55.5e9
    assert probe.read_cache(path)[0] == FIGURES


def test_stale_or_refresh_measures_again(tmp_path):
    measure = Counter()
    path = tmp_path / "hw.json"
    probe.cached_hardware(path, measure=measure)
    probe.cached_hardware(path, measure=measure, refresh=True)
    assert measure.calls == 2
    body = json.loads(path.read_text())
    body["measured_at"] -= 8 * 24 * 3600
    path.write_text(json.dumps(body))
    probe.cached_hardware(path, measure=measure)
    assert measure.calls == 3
    assert probe.cached_hardware(path, measure=measure, max_age_s=3600) == FIGURES and measure.calls == 3


@no_cuda
def test_without_cuda_uses_any_cache_of_this_host_or_asks_for_a_file(tmp_path):
    with pytest.raises(TiermemError, match="--hardware"):
        probe.cached_hardware(cache_dir=tmp_path)
    path = probe.cache_path("NVIDIA H200", cache_dir=tmp_path)
    probe.write_cache(path, FIGURES)
    assert probe.cached_hardware(cache_dir=tmp_path) == FIGURES
    body = json.loads(path.read_text())
    body["measured_at"] = 0  # stale, but nothing here can measure: still used
    path.write_text(json.dumps(body))
    assert probe.cached_hardware(cache_dir=tmp_path) == FIGURES


def test_a_plain_hardware_file_reads_too(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(FIGURES.to_json())
    assert probe.read_cache(path)[0] == FIGURES
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json"):
        probe.read_cache(tmp_path / "bad.json")


def test_cpu_measurements(tmp_path):
    assert probe.measure_cpu_memcpy(nbytes=16 << 20, reps=2) > 1e7
    assert probe.measure_disk_read(tmp_path, nbytes=32 << 20) > 1e6
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tiermem-probe-")]  # the file is removed


def test_disk_probe_reads_a_stores_own_block_files(tmp_path, monkeypatch):
    from tiermem import ceilings

    for k in range(4):
        (tmp_path / f"layers.{k}.safetensors").write_bytes(bytes(8 << 20))
    calls = []
    real = ceilings.measure_disk_read
    monkeypatch.setattr(ceilings, "measure_disk_read", lambda files, **kw: calls.append(files) or real(files, **kw))
    assert probe.measure_disk_read(tmp_path, nbytes=16 << 20) > 1e6
    assert calls and all(f.suffix == ".safetensors" for f in calls[0])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tiermem-probe-")]  # no probe file written
    calls.clear()
    assert probe.measure_disk_read(tmp_path, nbytes=64 << 20) > 1e6  # too few block bytes: a probe file
    assert not calls


def test_disk_probe_of_a_directory_that_takes_no_file_uses_the_temp_dir(tmp_path, monkeypatch):
    store = tmp_path / "read-only-store"
    store.mkdir()
    real, asked = probe.tempfile.NamedTemporaryFile, []

    def refuse_the_store(*args, dir=None, **kw):
        asked.append(dir)
        if dir == store:
            raise PermissionError(13, "Permission denied", str(store))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(probe.tempfile, "NamedTemporaryFile", refuse_the_store)
    assert probe.measure_disk_read(store, nbytes=16 << 20) > 1e6
    assert asked == [store, None] and not list(store.iterdir())


@no_cuda
def test_measure_hardware_needs_cuda():
    with pytest.raises(ConfigError, match="CUDA"):
        probe.measure_hardware()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_hardware_on_the_gpu(tmp_path):
    hw = probe.measure_hardware("cuda", store_dir=tmp_path)
    assert 1e9 < hw.h2d_Bps < 1e12 and 1e11 < hw.hbm_Bps < 1e14 and 1e12 < hw.matmul_flops < 1e16
    assert 1e7 < hw.disk_read_Bps and 1e8 < hw.cpu_memcpy_Bps and hw.name
    assert probe.cached_hardware(tmp_path / "hw.json", measure=lambda: hw) == hw


class DiskCounter:
    def __init__(self, rates: dict) -> None:
        self.rates, self.asked = rates, []

    def __call__(self, store_dir) -> float:
        self.asked.append(store_dir.name)
        return self.rates[store_dir.name]


def fake_store(directory, nbytes: int = 1 << 30):
    """A directory with a sparse block file of nbytes (what probe.store_blocks counts)."""
    directory.mkdir()
    with open(directory / "layers.0.safetensors", "wb") as f:
        f.truncate(nbytes)
    return directory


def test_the_disk_rate_is_measured_per_store_and_kept(tmp_path):
    """A fresh cache measured on one store gives another store its own disk rate, measured once; the other
    figures and their age stay as they were."""
    path = tmp_path / "hw.json"
    a, b = fake_store(tmp_path / "a"), fake_store(tmp_path / "b")
    probe.cached_hardware(path, measure=Counter(), store_dir=a)
    measured_at = probe.read_cache(path)[1]
    disk = DiskCounter({"a": 9e9, "b": 1.6e9})
    assert probe.cached_hardware(path, measure=Counter(), store_dir=a, measure_disk=disk) == FIGURES
    got = probe.cached_hardware(path, measure=Counter(), store_dir=b, measure_disk=disk)
    assert got.disk_read_Bps == 1.6e9 and got.h2d_Bps == FIGURES.h2d_Bps
    assert probe.cached_hardware(path, measure=Counter(), store_dir=b, measure_disk=disk).disk_read_Bps == 1.6e9
    assert disk.asked == ["b"]  # a's rate came with the full measurement, b's once
    assert probe.read_cache(path) == (FIGURES, measured_at)
    assert probe.read_cache_for_store(path, b)[0].disk_read_Bps == 1.6e9
    assert probe.read_cache_for_store(path, tmp_path)[0] == FIGURES  # no rate for that directory
    assert probe.cached_hardware(path, measure=Counter()) == FIGURES  # no store: the figures as measured


def test_a_stale_store_rate_is_measured_again(tmp_path):
    path = tmp_path / "hw.json"
    store = fake_store(tmp_path / "s")
    probe.cached_hardware(path, measure=Counter())
    disk = DiskCounter({"s": 1.5e9})
    probe.cached_hardware(path, measure=Counter(), store_dir=store, measure_disk=disk)
    body = json.loads(path.read_text())
    body["disk_read_by_store"][str(store.resolve())]["measured_at"] -= 8 * 24 * 3600
    path.write_text(json.dumps(body))
    assert probe.cached_hardware(path, measure=Counter(), store_dir=store, measure_disk=disk).disk_read_Bps == 1.5e9
    assert disk.asked == ["s", "s"]


def test_a_small_store_keeps_the_machine_figure_and_gets_nothing_written(tmp_path):
    path = tmp_path / "hw.json"
    small = fake_store(tmp_path / "small", nbytes=1 << 20)
    probe.cached_hardware(path, measure=Counter())
    disk = DiskCounter({})
    assert probe.cached_hardware(path, measure=Counter(), store_dir=small, measure_disk=disk) == FIGURES
    assert disk.asked == [] and sorted(p.name for p in small.iterdir()) == ["layers.0.safetensors"]


def test_writers_at_once_leave_one_whole_cache_and_no_temp_file(tmp_path):
    import threading

    path = tmp_path / "hw.json"
    figures = [Hardware(disk_read_Bps=1e9 + k, h2d_Bps=5e10, hbm_Bps=4e12, matmul_flops=6e14, cpu_memcpy_Bps=1e10)
               for k in range(8)]
    failures = []

    def write(hw: Hardware) -> None:
        try:
            for _ in range(20):
                probe.write_cache(path, hw)
        except OSError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(hw,)) for hw in figures]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert probe.read_cache(path)[0] in figures
    assert [p.name for p in tmp_path.iterdir()] == ["hw.json"]


def _age_store_rate(path, store, seconds: float) -> None:
    body = json.loads(path.read_text())
    body["disk_read_by_store"][str(store.resolve())]["measured_at"] -= seconds
    path.write_text(json.dumps(body))


def test_a_plan_that_reads_the_store_every_step_takes_its_rate_measured_in_the_last_minute(tmp_path):
    """plan_with_fresh_disk_rate: the 13B int4 model in 4 GiB of GPU and 2 GiB of RAM reads weights from disk every
    step; a store rate cached two minutes ago is measured again and the plan made again with it (its disk term is
    the disk blocks' bytes at the new rate); one measured seconds ago is kept."""
    from test_planner import weights, workload

    from tiermem.planner import plan

    path, store = tmp_path / "hw.json", fake_store(tmp_path / "s")
    disk = DiskCounter({})
    cached = probe.cached_hardware(path, measure=Counter(), store_dir=store)  # the store's rate: FIGURES'
    w = workload("llama-13b", "int4", 128, torch.bfloat16, batch=4, prompt_len=256, gen_len=16)
    made: list[float] = []

    def planned(hw: Hardware):
        made.append(hw.disk_read_Bps)
        return plan(w, hw, 4 << 30, 2 << 30)

    chosen, used = probe.plan_with_fresh_disk_rate(planned, cached, store, path=path, measure=Counter(),
                                                   measure_disk=disk)
    assert chosen.disk_blocks and used is cached and made == [FIGURES.disk_read_Bps] and disk.asked == []
    _age_store_rate(path, store, 120)
    disk.rates["s"] = 1.5e9
    chosen, used = probe.plan_with_fresh_disk_rate(planned, cached, store, path=path, measure=Counter(),
                                                   measure_disk=disk)
    assert disk.asked == ["s"] and made == [FIGURES.disk_read_Bps] * 2 + [1.5e9] and used.disk_read_Bps == 1.5e9
    assert chosen.breakdown["disk"] == pytest.approx(weights(w, chosen.disk_blocks) / 1.5e9)
    assert probe.read_cache_for_store(path, store)[0].disk_read_Bps == 1.5e9  # the cache keeps the new rate


def test_a_plan_that_reads_no_weight_from_disk_measures_nothing(tmp_path):
    from test_planner import workload

    from tiermem.planner import plan

    path, store = tmp_path / "hw.json", fake_store(tmp_path / "s")
    disk = DiskCounter({})
    cached = probe.cached_hardware(path, measure=Counter(), store_dir=store)
    _age_store_rate(path, store, 3600)
    w = workload("llama-13b", "int4", 128, torch.bfloat16, batch=4, prompt_len=256, gen_len=16)
    chosen, used = probe.plan_with_fresh_disk_rate(lambda hw: plan(w, hw, 40 << 30, 2 << 30), cached, store,
                                                   path=path, measure=Counter(), measure_disk=disk)
    assert not chosen.disk_blocks and used is cached and disk.asked == []
    chosen, used = probe.plan_with_fresh_disk_rate(lambda hw: plan(w, hw, 4 << 30, 2 << 30), cached, None,
                                                   path=path, measure=Counter(), measure_disk=disk)
    assert chosen.disk_blocks and used is cached and disk.asked == []  # no store: nothing to measure


def test_the_rates_of_stores_that_are_gone_leave_the_cache_at_its_next_write(tmp_path):
    import shutil

    path = tmp_path / "hw.json"
    probe.cached_hardware(path, measure=Counter())
    disk = DiskCounter({"a": 1.5e9, "b": 1.6e9})
    a, b = fake_store(tmp_path / "a"), fake_store(tmp_path / "b")
    probe.cached_hardware(path, measure=Counter(), store_dir=a, measure_disk=disk)
    shutil.rmtree(a)
    probe.cached_hardware(path, measure=Counter(), store_dir=b, measure_disk=disk)
    assert list(probe.store_disk_rates(path)) == [str(b.resolve())]
