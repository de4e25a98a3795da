"""The GPU path's disk tier without a GPU: DiskStager reads store blocks in order through its ring."""

import threading

import pytest
import torch
from hf_models import build_tiny

import tiermem
from tiermem.disk_tier import DiskStager
from tiermem.errors import TiermemError
from tiermem.pinned import PinnedArena
from tiermem.storage.backends.posix import PosixBackend
from tiermem.storage.format import StoreReader


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    return StoreReader(tiermem.pack(build_tiny("llama2", root / "hf"), root / "store", progress=False))


def test_stager_yields_verified_blocks_in_order_and_reuses_its_ring(reader):
    names = [b for b in reader.block_names if b != "embed"]
    largest = max(reader.block_nbytes(b) for b in names)
    threads_before = set(threading.enumerate())
    with PinnedArena(3 * largest) as arena, PosixBackend(threads=2, direct=True) as backend:
        stager = DiskStager(reader, names, arena, lookahead=2, io_threads=2, backend=backend)
        for _ in range(2):  # two passes, as two decode steps
            with stager.stream(names) as blocks:
                seen = []
                for name, buf in blocks:
                    expected = reader.load_block(name)
                    got = reader.decode_block(name, buf)
                    assert all(torch.equal(got[t], expected[t]) for t in expected)
                    seen.append(name)
            assert seen == names
        assert stager.bytes_read == 2 * sum(reader.block_nbytes(b) for b in names)
        assert arena.used <= 3 * largest  # the ring is all the host memory the disk tier takes
        stager.close()
    assert set(threading.enumerate()) <= threads_before  # close() left no prefetch or I/O thread behind


def test_stager_reports_a_truncated_block_file(reader, tmp_path):
    names = ["layers.0", "layers.1"]
    with PinnedArena(3 * max(reader.block_nbytes(b) for b in names)) as arena:
        stager = DiskStager(reader, names, arena, lookahead=1, io_threads=1)
        path = reader.block_file("layers.1")
        original = path.read_bytes()
        path.write_bytes(original[:4096])
        try:
            with pytest.raises(TiermemError, match="layers.1"), stager.stream(names) as blocks:
                for _ in blocks:
                    pass
        finally:
            path.write_bytes(original)
            stager.close()


def test_disk_ceilings_read_each_file_once(tmp_path, monkeypatch):
    """measure_disk_read deals the files out: no reader re-reads a file another one has read (a second read
    came back faster on the GPU machine's disk)."""
    from tiermem import ceilings

    files = []
    for k in range(7):
        path = tmp_path / f"f{k}.bin"
        path.write_bytes(bytes([k]) * ((k + 1) << 16))
        files.append(path)
    read: list[str] = []
    real = PosixBackend.read_into

    def spy(self, path, offset, out):
        read.append(str(path))
        real(self, path, offset, out)

    monkeypatch.setattr(PosixBackend, "read_into", spy)
    result = ceilings.measure_disk_read(files, nbytes_cap=1 << 30, threads=2)
    assert result["disk_read_posix_direct_Bps"] > 0 and result["disk_probe_files_disjoint"]
    assert len(read) == len(set(read)) >= 2
    assert result["disk_probe_bytes"] == sum(f.stat().st_size for f in files)
