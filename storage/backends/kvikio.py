"""ReadBackend over kvikio: GPUDirect Storage where the machine has it, kvikio's own thread pool
of POSIX reads (compat mode) otherwise. Optional: needs `pip install tiermem[gpu]` and CUDA, since
kvikio loads libcuda on every read, also into host memory.

Reads into host memory go through kvikio's POSIX path, which reads buffered unless its
`auto_direct_io_read` setting is on: the backend turns it on, so that blocks read every step come
from the disk and not from the page cache (buffered, a 111B store's 10 GB of disk blocks per step
came back from RAM at 8.5 GB/s on a disk that reads 2 GB/s, session 11; a kvikio without the
setting is not used)."""

from __future__ import annotations

import os

import torch

from tiermem.errors import ConfigError, TierIOError
from tiermem.storage.backends.base import check_out


def kvikio_available() -> bool:
    """True when kvikio imports, can read with O_DIRECT (its `auto_direct_io_read` setting) and CUDA is
    usable (kvikio can do no I/O without it)."""
    try:
        import kvikio.defaults
    except ImportError:
        return False
    try:
        kvikio.defaults.get("auto_direct_io_read")
    except (AttributeError, KeyError, ValueError):  # a kvikio before the setting: its host reads are buffered
        return False
    return torch.cuda.is_available()


class KvikioBackend:
    """Reads byte ranges with kvikio.CuFile.pread into host (ideally pinned) uint8 tensors."""

    def __init__(self, threads: int = 16) -> None:
        if not kvikio_available():
            raise ConfigError("the kvikio backend needs CUDA and a kvikio with the auto_direct_io_read setting "
                              "(26.x has it; older ones read through the page cache): pip install "
                              "'tiermem[gpu]' on a GPU machine, or use the POSIX backend")
        import kvikio.defaults

        self.threads = threads
        kvikio.defaults.set({"num_threads": threads, "auto_direct_io_read": True})
        self._closed = False

    def read_into(self, path: str | os.PathLike, offset: int, out: torch.Tensor) -> None:
        import kvikio

        if self._closed:
            raise TierIOError(f"reading {path}: the KvikioBackend was closed")
        check_out(path, out)
        nbytes = out.numel()
        if nbytes == 0:
            return
        try:
            with kvikio.CuFile(path, "r") as f:
                done = f.pread(out.numpy(), nbytes, file_offset=offset).get()
        except (OSError, RuntimeError) as exc:
            raise TierIOError(f"reading {path} at byte {offset} with kvikio: {exc}") from exc
        if done != nbytes:
            raise TierIOError(f"short read from {path}: wanted {nbytes} bytes at offset {offset}, got {done}; "
                              "the file was truncated; re-pack or restore it")

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> KvikioBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
