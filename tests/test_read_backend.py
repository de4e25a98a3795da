"""Choosing the disk tier's read backend; the kvikio backend where kvikio and CUDA exist."""

import json

import pytest
import torch

from tiermem.errors import ConfigError
from tiermem.read_backend import choose_backend, make_backend, measure_backends
from tiermem.storage.backends.kvikio import KvikioBackend, kvikio_available
from tiermem.storage.backends.posix import PosixBackend


@pytest.fixture
def files(tmp_path):
    data = torch.randint(0, 256, (3, 1 << 20), dtype=torch.uint8)
    paths = []
    for i, row in enumerate(data):
        path = tmp_path / f"layers.{i}.safetensors"
        path.write_bytes(row.numpy().tobytes())
        paths.append(path)
    return paths, data


def test_named_backends_and_errors(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert choose_backend("posix", tmp_path, 2) == "posix"
    with make_backend("posix", 2) as backend:
        assert isinstance(backend, PosixBackend) and backend.direct
    with pytest.raises(ConfigError, match="unknown read backend"):
        make_backend("nfs", 2)
    if not kvikio_available():
        assert choose_backend("auto", tmp_path, 2) == "posix"
        with pytest.raises(ConfigError, match="kvikio"):
            KvikioBackend()


def test_measure_backends_reads_everything(files):
    paths, _ = files
    rates = measure_backends(paths, threads=2)
    assert rates.pop("bytes") == 3 << 20
    assert set(rates) >= {"posix"} and all(rate > 0 for rate in rates.values())


@pytest.mark.gpu
@pytest.mark.skipif(not kvikio_available(), reason="needs kvikio and CUDA")
def test_kvikio_reads_what_posix_reads_and_auto_caches_its_choice(files, tmp_path, monkeypatch):
    paths, data = files
    out = torch.empty(1 << 20, dtype=torch.uint8).pin_memory()
    with KvikioBackend() as backend:
        backend.read_into(paths[1], 4096, out[: (1 << 20) - 4096])
    assert torch.equal(out[: (1 << 20) - 4096], data[1, 4096:])
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("tiermem.read_backend.MIN_PROBE_BYTES", 1)
    best = choose_backend("auto", tmp_path, 4)
    cached = json.loads((tmp_path / ".cache" / "tiermem").glob("read-backend-*.json").__next__().read_text())
    assert best == cached["best"] and set(cached["Bps"]) == {"posix", "kvikio"}


@pytest.mark.gpu
@pytest.mark.skipif(not kvikio_available(), reason="needs kvikio and CUDA")
def test_kvikio_reads_bypass_the_page_cache(files):
    """Blocks read every step must come from the disk: kvikio's host reads are buffered unless told otherwise."""
    from tiermem.storage.page_cache import cached_bytes, evict

    paths, data = files
    evict(paths[2:])
    if cached_bytes(paths[2]) != 0:
        pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to bypass")
    out = torch.empty(1 << 20, dtype=torch.uint8).pin_memory()
    with KvikioBackend() as backend:
        backend.read_into(paths[2], 0, out)
    assert torch.equal(out, data[2]) and cached_bytes(paths[2]) == 0


def test_a_cached_choice_from_before_kvikio_read_with_o_direct_is_measured_again(tmp_path, monkeypatch):
    """kvikio's buffered reads made it look fast from the page cache; a choice cached then is stale. The probe
    itself is faked (kvikio here or not)."""
    from tiermem import read_backend

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(read_backend, "kvikio_available", lambda: True)
    probes = []

    def fake_measure(files, threads):
        probes.append(threads)
        return {"posix": 2.0e9, "kvikio": 1.5e9, "bytes": 2 << 30}

    monkeypatch.setattr(read_backend, "measure_backends", fake_measure)
    path = read_backend.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"best": "kvikio", "Bps": {"posix": 1.4e9, "kvikio": 8.5e9}}))
    assert choose_backend("auto", tmp_path, 4) == "posix" and probes == [4]
    assert json.loads(path.read_text())["kvikio_reads"] == read_backend.KVIKIO_READS
    assert choose_backend("auto", tmp_path, 4) == "posix" and probes == [4]  # the fresh choice is reused
