import errno
import os
import threading

import pytest
import torch

from tiermem.errors import ConfigError, TierIOError
from tiermem.storage.backends.base import ReadBackend, aligned_empty
from tiermem.storage.backends.posix import PosixBackend
from tiermem.storage.format import StoreReader, StoreWriter

CHUNK = 64 * 1024


@pytest.fixture
def data_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (3 * 2**20 + 123,), dtype=torch.uint8, generator=g)
    path = tmp_path / "data.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data


@pytest.fixture
def backend():
    with PosixBackend(threads=4, chunk_size=CHUNK) as b:
        yield b


def require_o_direct(path):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this platform has no O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip(f"the filesystem of {path} refuses O_DIRECT")
        raise
    os.close(fd)


def test_is_a_read_backend(backend):
    assert isinstance(backend, ReadBackend)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 10), (0, CHUNK), (4096, 5 * CHUNK), (7, 3 * CHUNK + 11), (100_000, 2**20), (0, 3 * 2**20 + 123),
     (5, 0)],
)
def test_reads_exact_bytes_at_offsets(backend, data_file, offset, length):
    path, data = data_file
    out = torch.full((length,), 0xAB, dtype=torch.uint8)
    backend.read_into(path, offset, out)
    assert torch.equal(out, data[offset:offset + length])


def test_reads_into_a_slice_of_a_larger_buffer(backend, data_file):
    path, data = data_file
    big = torch.zeros(4 * CHUNK, dtype=torch.uint8)
    backend.read_into(path, 1000, big[CHUNK:3 * CHUNK])
    assert torch.equal(big[CHUNK:3 * CHUNK], data[1000:1000 + 2 * CHUNK])
    assert int(big[:CHUNK].count_nonzero()) == 0 and int(big[3 * CHUNK:].count_nonzero()) == 0


def test_concurrent_callers(backend, data_file):
    path, data = data_file
    outs = [torch.empty(2**20, dtype=torch.uint8) for _ in range(6)]
    threads = [threading.Thread(target=backend.read_into, args=(path, 4096 * k, out))
               for k, out in enumerate(outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, out in enumerate(outs):
        assert torch.equal(out, data[4096 * k:4096 * k + 2**20])


def test_o_direct_when_aligned(data_file):
    path, data = data_file
    require_o_direct(path)
    with PosixBackend(threads=3, direct=True, chunk_size=CHUNK) as backend:
        out = aligned_empty(8 * CHUNK)
        assert out.data_ptr() % 4096 == 0
        backend.read_into(path, 8192, out)
        assert torch.equal(out, data[8192:8192 + 8 * CHUNK])
        assert (backend.direct_reads, backend.buffered_reads) == (1, 0)
        # unaligned offset, length or address: same bytes through the buffered path
        backend.read_into(path, 100, out)
        backend.read_into(path, 8192, out[:1000])
        shifted = aligned_empty(CHUNK + 4096)[1:CHUNK + 1]
        backend.read_into(path, 8192, shifted)
        assert torch.equal(shifted, data[8192:8192 + CHUNK])
        assert (backend.direct_reads, backend.buffered_reads) == (1, 3)


def test_read_many_reads_every_request_direct_or_buffered(data_file):
    path, data = data_file
    require_o_direct(path)
    with PosixBackend(threads=3, direct=True, chunk_size=CHUNK) as backend:
        whole, partial, empty = aligned_empty(5 * CHUNK), torch.empty(777, dtype=torch.uint8), aligned_empty(0)
        backend.read_many(path, [(4096, whole), (4096 + 5 * CHUNK, partial), (0, empty)])
        assert torch.equal(whole, data[4096:4096 + 5 * CHUNK])
        assert torch.equal(partial, data[4096 + 5 * CHUNK:4096 + 5 * CHUNK + 777])
        assert (backend.direct_reads, backend.buffered_reads) == (1, 1)
        with pytest.raises(TierIOError, match="truncated"):
            backend.read_many(path, [(0, whole), (data.numel() - 10, partial)])


def test_o_direct_short_read(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 8192)
    require_o_direct(path)
    with PosixBackend(direct=True) as backend, pytest.raises(TierIOError, match="short.bin"):
        backend.read_into(path, 4096, aligned_empty(8192))


@pytest.mark.parametrize(("offset", "length"), [(3 * 2**20, 4096), (0, 4 * 2**20), (4 * 2**20, 1)])
def test_short_read_names_the_file(backend, data_file, offset, length):
    path, _ = data_file
    with pytest.raises(TierIOError, match="data.bin"):
        backend.read_into(path, offset, torch.empty(length, dtype=torch.uint8))


def test_truncated_while_open_is_a_short_read(data_file):
    path, _ = data_file
    with PosixBackend(threads=2, chunk_size=CHUNK) as backend:
        os.truncate(path, 2 * CHUNK + 5)
        with pytest.raises(TierIOError, match="truncated"):
            backend.read_into(path, 0, torch.empty(6 * CHUNK, dtype=torch.uint8))


def test_missing_file_and_bad_buffers(backend, tmp_path, data_file):
    with pytest.raises(TierIOError, match="missing.bin"):
        backend.read_into(tmp_path / "missing.bin", 0, torch.empty(10, dtype=torch.uint8))
    path, _ = data_file
    with pytest.raises(TierIOError, match="uint8"):
        backend.read_into(path, 0, torch.empty(10, dtype=torch.float32))
    with pytest.raises(TierIOError, match="contiguous"):
        backend.read_into(path, 0, torch.empty(10, 2, dtype=torch.uint8).t())


def test_close_shuts_the_pool(data_file):
    path, _ = data_file
    backend = PosixBackend(threads=3, chunk_size=CHUNK)
    backend.read_into(path, 0, torch.empty(10 * CHUNK, dtype=torch.uint8))  # starts workers
    assert any(t.name.startswith("tiermem-posix") for t in threading.enumerate())
    backend.close()
    assert not any(t.name.startswith("tiermem-posix") for t in threading.enumerate())
    with pytest.raises(TierIOError, match="closed"):
        backend.read_into(path, 0, torch.empty(10, dtype=torch.uint8))


def test_bad_settings():
    with pytest.raises(ConfigError):
        PosixBackend(threads=0)
    with pytest.raises(ConfigError):
        PosixBackend(chunk_size=1000)


@pytest.mark.parametrize("direct", [False, True])
def test_store_reads_blocks_through_the_backend(tmp_path, direct):
    store = tmp_path / "store"
    store.mkdir()
    weight = torch.randn(300, 257)
    writer = StoreWriter(store)
    writer.add_block("layers.0", {"w": weight})
    writer.finish({"model_type": "llama"}, None)
    reader = StoreReader(store)
    if direct:
        require_o_direct(reader.block_file("layers.0"))
    with PosixBackend(threads=2, direct=direct, chunk_size=CHUNK) as backend:
        out = aligned_empty(reader.block_nbytes("layers.0"))
        buf = reader.read_block("layers.0", out=out, backend=backend)
        assert torch.equal(reader.decode_block("layers.0", buf)["w"], weight)
        assert backend.direct_reads == int(direct)
