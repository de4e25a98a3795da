"""Async checkpoints: round trips, staging semantics, ordering, failures (disk full, corruption)."""

import errno
import json
import math
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiermem
from tiermem import checkpoint_writer
from tiermem.checkpoint import AsyncCheckpointer, format_report, load, save_async, verify
from tiermem.checkpoint_staging import StagingRing
from tiermem.errors import CheckpointError, ConfigError
from tiermem.storage.durable import is_unfinished

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool]


def _tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def _state(seed=0):
    return {
        "model": {f"w_{str(d).split('.')[1]}": _tensor(d, (37, 5), seed + i) for i, d in enumerate(DTYPES)},
        "buffers": [_tensor(torch.float32, (4, 6), seed).t(), torch.tensor(2.5), torch.zeros(3, 0)],
        "optimizer": {"state": {0: {"step": 7, "exp_avg": _tensor(torch.bfloat16, (300,), seed + 99)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "nesterov": False, "name": None}]},
        "meta": {"epoch": 3, "loss": float("nan"), "best": float("-inf"), "tag": "run-1",
                 "nested": ((1, 2), [])},
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        bits = [t.contiguous().view(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*bits), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_round_trip_every_dtype(tmp_path, compress):
    state = _state()
    handle = save_async(state, tmp_path / "ckpt", compress=compress)
    assert handle.result(timeout=30) == (tmp_path / "ckpt").absolute()
    assert handle.done()
    _assert_same(state, load(tmp_path / "ckpt", device="cpu"))
    report = verify(tmp_path / "ckpt")
    assert report.ok and report.tensors == report.tensors_ok == 14 and report.failed == []
    model_bytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    assert report.nbytes == model_bytes + 4 * 24 + 4 + 600
    assert "OK" in format_report(report)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert {e["compression"] for e in manifest["tensors"].values()} == {compress}
    if compress is None:  # plain safetensors: readable by the reference implementation
        for name, entry in manifest["tensors"].items():
            with safe_open(tmp_path / "ckpt" / entry["file"], "pt") as f:
                stored = f.get_tensor(name)
            assert list(stored.shape) == entry["shape"]
        with safe_open(tmp_path / "ckpt" / "data-00000.safetensors", "pt") as f:
            assert torch.equal(f.get_tensor("model.w_bfloat16"), state["model"]["w_bfloat16"])


@pytest.mark.parametrize("backend", ["posix", "direct"])
def test_staged_in_pieces_through_a_small_ring(tmp_path, backend):
    state = {f"t{i}": _tensor(torch.float32, (1000 + 517 * i,), i) for i in range(12)}  # ~250 KB
    with AsyncCheckpointer(staging_bytes=16384, shard_bytes=40_000, pin=False, backend=backend) as ckpt:
        first = ckpt.save(state, tmp_path / "a")
        second = ckpt.save({"x": state["t3"] * 2}, tmp_path / "b", compress="zstd")
        assert second.result(timeout=30) and first.done()  # issued second, so durable second
    _assert_same(state, load(tmp_path / "a"))
    _assert_same({"x": state["t3"] * 2}, load(tmp_path / "b"))
    assert len(json.loads((tmp_path / "a" / "manifest.json").read_text())["files"]) > 4


def test_staging_ring_never_hands_out_overlapping_regions():
    ring = StagingRing(64 * 1024, pin=False, grow=False)
    sizes = [(i * 7919) % (20 * 1024) + 1 for i in range(300)]
    handed: list = []
    done = threading.Event()

    def consume():  # the writer: frees regions in order, after checking nobody overwrote them
        for i in range(len(sizes)):
            while len(handed) <= i:
                done.wait(0.0005)
            region = handed[i]
            assert bool((region.tensor[:sizes[i]] == i % 251).all()), f"region {i} was overwritten"
            ring.free(region)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i, n in enumerate(sizes):
        region = ring.alloc(n)
        assert region.start % 4096 == 0 and region.start + region.nbytes <= ring.capacity
        assert region.tensor.numel() == region.nbytes and region.tensor.data_ptr() % 4096 == 0
        region.tensor[:n] = i % 251
        handed.append(region)
    consumer.join(timeout=30)
    assert not consumer.is_alive()
    with pytest.raises(CheckpointError, match="cannot hold"):
        ring.alloc(65 * 1024)
    grow = StagingRing(0, pin=False, grow=True)
    grow.reserve(10_000)
    region = grow.alloc(10_000)
    assert grow.capacity == region.nbytes == 12_288
    grow.free(region)
    grow.reserve(20_000)
    assert grow.capacity == 20_480


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_staging_ring_hands_out_whole_page_aligned_regions():
    small = torch.empty(512, dtype=torch.uint8, pin_memory=True)  # torch's pinned blocks need not be page-aligned
    for capacity in (16 << 10, 1 << 20, (1 << 20) + 4096):
        ring = StagingRing(capacity, pin=True, grow=False)
        for _ in range(4):  # four quarter-size regions
            region = ring.alloc(capacity // 4 // 4096 * 4096)
            assert region.tensor.is_pinned() and region.tensor.numel() == region.nbytes
            assert region.tensor.data_ptr() % 4096 == 0
        ring.release()
    del small


def test_two_saves_in_flight_are_ordered(tmp_path):
    big = {"w": torch.randn(1 << 20)}  # 4 MiB written first, a tiny one right behind it
    with AsyncCheckpointer(staging_bytes=1 << 20, pin=False) as ckpt:
        first = ckpt.save(big, tmp_path / "first")
        second = ckpt.save({"w": torch.ones(3)}, tmp_path / "second")
        second.result(timeout=30)
        assert first.done()
    created = [json.loads((tmp_path / n / "manifest.json").read_text())["created_ns"]
               for n in ("first", "second")]
    assert created[0] < created[1]
    _assert_same(big, load(tmp_path / "first"))


def test_mutation_after_return_does_not_change_the_checkpoint(tmp_path):
    state = {"w": torch.arange(1 << 18, dtype=torch.float32), "b": torch.ones(10, dtype=torch.bfloat16)}
    expected = {k: v.clone() for k, v in state.items()}
    handle = save_async(state, tmp_path / "c")
    state["w"].fill_(-1)
    state["b"].zero_()
    handle.result(timeout=30)
    _assert_same(expected, load(tmp_path / "c"))


async def test_handle_is_awaitable(tmp_path):
    handle = save_async({"w": torch.ones(5)}, tmp_path / "c")
    assert await handle == (tmp_path / "c").absolute()
    assert torch.equal(load(tmp_path / "c")["w"], torch.ones(5))


def test_result_timeout_while_still_writing(tmp_path, monkeypatch):
    release = threading.Event()
    real = checkpoint_writer.pwrite_all

    def slow(fd, data, offset):
        release.wait(10)
        real(fd, data, offset)

    monkeypatch.setattr(checkpoint_writer, "pwrite_all", slow)
    handle = save_async({"w": torch.ones(5)}, tmp_path / "c")
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)
    assert not handle.done() and not (tmp_path / "c").exists()
    release.set()
    assert handle.result(timeout=30) == (tmp_path / "c").absolute()


def _only_final_names(parent: Path) -> list[str]:
    names = sorted(p.name for p in parent.iterdir())
    assert not [n for n in names if is_unfinished(parent / n)], names
    return names


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_disk_full_is_reported_and_previous_checkpoint_survives(tmp_path, monkeypatch, compress):
    state = {"w": torch.randn(50_000), "step": 1}
    with AsyncCheckpointer(staging_bytes=65536, pin=False) as ckpt:
        ckpt.save(state, tmp_path / "step-1", compress=compress).result(timeout=30)

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoint_writer, "pwrite_all", full)
        handle = ckpt.save({"w": torch.randn(50_000), "step": 2}, tmp_path / "step-2", compress=compress)
        with pytest.raises(CheckpointError, match="disk full") as info:
            handle.result(timeout=30)
        assert "free space" in str(info.value) and "step-2" in str(info.value)
        assert _only_final_names(tmp_path) == ["step-1"]
        assert verify(tmp_path / "step-1").ok
        monkeypatch.undo()  # the ring was drained: the same checkpointer saves again
        ckpt.save(state, tmp_path / "step-3", compress=compress, keep=1).result(timeout=30)
    assert _only_final_names(tmp_path) == ["step-3"]
    _assert_same(state, load(tmp_path / "step-3"))


def test_disk_full_on_a_tiny_real_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tiermem-test", str(mnt)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root/CAP_SYS_ADMIN): {mounted.stderr.decode()[:200]}")
    try:
        small = {"w": torch.randn(60_000)}  # 240 KB: fits
        save_async(small, mnt / "a").result(timeout=30)
        with pytest.raises(CheckpointError, match="disk full"):
            save_async({"w": torch.randn(400_000)}, mnt / "b").result(timeout=30)  # 1.6 MB: cannot
        assert _only_final_names(mnt) == ["a"]
        _assert_same(small, load(mnt / "a"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_keep_prunes_only_older_tiermem_checkpoints(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    with AsyncCheckpointer(pin=False) as ckpt:
        for step in range(5):
            ckpt.save({"step": step, "w": torch.full((10,), step)}, tmp_path / f"s{step}", keep=2)
    assert _only_final_names(tmp_path) == ["not-a-checkpoint", "s3", "s4"]
    assert load(tmp_path / "s4")["step"] == 4


def test_existing_path_overwrite_and_bad_arguments(tmp_path):
    save_async({"a": 1}, tmp_path / "c").result(timeout=30)
    with pytest.raises(CheckpointError, match="already exists"):
        save_async({"a": 2}, tmp_path / "c")
    save_async({"a": 2}, tmp_path / "c", overwrite=True).result(timeout=30)
    assert load(tmp_path / "c") == {"a": 2}
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "thesis.txt").write_text("years of work")
    (tmp_path / "notes.txt").write_text("notes")
    for other, words in (("project", "does not hold a complete tiermem-checkpoint"), ("notes.txt", "is a file")):
        with pytest.raises(CheckpointError, match=words):
            save_async({"a": 3}, tmp_path / other, overwrite=True)
    assert (tmp_path / "project" / "thesis.txt").read_text() == "years of work"
    assert (tmp_path / "notes.txt").read_text() == "notes"
    with pytest.raises(CheckpointError, match="opt.bad"):
        save_async({"opt": {"bad": object()}}, tmp_path / "d")
    with pytest.raises(ConfigError):
        save_async({"a": 1}, tmp_path / "d", compress="gzip")
    with pytest.raises(ConfigError):
        save_async({"a": 1}, tmp_path / "d", keep=0)
    with pytest.raises(ConfigError):
        AsyncCheckpointer(backend="aio")
    deep: dict = {}
    leaf = deep
    for _ in range(2000):
        leaf["a"] = {}
        leaf = leaf["a"]
    cyclic: dict = {"w": torch.zeros(2)}
    cyclic["me"] = cyclic
    shared = {"x": 1}
    for bad, error, match in ((deep, CheckpointError, "nested deeper than 200 levels"),
                              (cyclic, CheckpointError, "the dict at 'me' contains itself")):
        with pytest.raises(error, match=match):  # RecursionError before
            save_async(bad, tmp_path / "e")
    save_async({"a": shared, "b": [shared, shared]}, tmp_path / "shared").result(timeout=30)  # not a cycle
    assert load(tmp_path / "shared") == {"a": {"x": 1}, "b": [{"x": 1}, {"x": 1}]}
    with pytest.raises(CheckpointError, match="is a str or os.PathLike, got NoneType"):
        save_async({"a": 1}, None)
    with pytest.raises(CheckpointError, match="is a str or os.PathLike, got NoneType"):
        load(None)
    with pytest.raises(CheckpointError, match="notes.txt is a file, not a directory"):
        save_async({"a": 1}, tmp_path / "notes.txt" / "c")  # said "already exists" before
    with pytest.raises(tiermem.NotACheckpointError, match="is a file; a tiermem checkpoint is a directory"):
        verify(tmp_path / "notes.txt")
    from tiermem.storage.manifest import manifest_checksum

    body = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    body.pop("checksum")
    del body["tensors"]
    (tmp_path / "shared" / "manifest.json").write_text(json.dumps(dict(body, checksum=manifest_checksum(body))))
    with pytest.raises(CheckpointError, match="has no 'tensors' object"):  # a KeyError before
        load(tmp_path / "shared")
    assert not verify(tmp_path / "shared").ok
    with pytest.raises(ConfigError, match="'bogus' is not a torch device"):
        load(tmp_path / "c", device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load(tmp_path / "c", device="cuda")
    with pytest.raises(ConfigError, match="at least 16384"):  # 2 pages hung: the writer held both (the 16 KiB
        AsyncCheckpointer(staging_bytes=8192)                 # minimum stages 250 KB above)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="kvikio"):
            AsyncCheckpointer(backend="kvikio")
    ckpt = AsyncCheckpointer(pin=False)
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save({"a": 1}, tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_corruption_is_detected_and_named(tmp_path, compress):
    state = {"good": torch.ones(1000), "bad": torch.zeros(1000)}
    save_async(state, tmp_path / "c", compress=compress).result(timeout=30)
    entry = json.loads((tmp_path / "c" / "manifest.json").read_text())["tensors"]["bad"]
    with open(tmp_path / "c" / entry["file"], "r+b") as f:
        f.seek(entry["offset"] + entry["stored_nbytes"] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="'bad'"):
        load(tmp_path / "c")
    report = verify(tmp_path / "c")
    assert not report.ok and report.tensors_ok == 1 and [name for name, _ in report.failed] == ["bad"]
    assert "bad bad" in format_report(report) and "FAILED" in format_report(report)


def test_truncated_file_and_missing_manifest(tmp_path):
    save_async({"w": torch.ones(5000)}, tmp_path / "c").result(timeout=30)
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    data = tmp_path / "c" / "data-00000.safetensors"
    data.write_bytes(data.read_bytes()[:-4096])
    report = verify(tmp_path / "c")
    assert not report.ok and report.failed[0][0] == "data-00000.safetensors"
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path / "c")
    (tmp_path / "d" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load(tmp_path / "d")
    with pytest.raises(tiermem.NotACheckpointError, match="manifest.json is missing"):
        verify(tmp_path / "d")  # no checkpoint there at all: not a report of damage
    with pytest.raises(tiermem.NotACheckpointError, match="missing"):
        verify(tmp_path / "nothing-here")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("staging_bytes", [None, 1 << 20])
def test_cuda_tensors_staged_on_a_side_stream(tmp_path, staging_bytes):
    state = {"w": torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16),
             "t": torch.randn(64, 96, device="cuda").t(), "cpu": torch.arange(10), "n": 1}
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    with AsyncCheckpointer(staging_bytes=staging_bytes) as ckpt:
        handle = ckpt.save(state, tmp_path / "c")
        state["w"].mul_(0)  # on the default stream, right after the call returned
        state["t"].add_(1)
        handle.result(timeout=60)
    loaded = load(tmp_path / "c", device="cuda")
    assert loaded["w"].is_cuda
    _assert_same({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in expected.items()},
                 {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in loaded.items()})
