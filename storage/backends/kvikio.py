"""ReadBackend over kvikio: GPUDirect Storage where the machine has it, kvikio's own thread pool
of POSIX reads (compat mode) otherwise. Optional: needs `pip install tiermem[gpu]` and CUDA, since
kvikio loads libcuda on every read, also into host memory."""

from __future__ import annotations

import os

import torch

from tiermem.errors import ConfigError, TierIOError
from tiermem.storage.backends.base import check_out


def kvikio_available() -> bool:
    """True when kvikio imports and CUDA is usable (kvikio can do no I/O without it)."""
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class KvikioBackend:
    """Reads byte ranges with kvikio.CuFile.pread into host (ideally pinned) uint8 tensors."""

    def __init__(self, threads: int = 16) -> None:
        if not kvikio_available():
            raise ConfigError("the kvikio backend needs kvikio and CUDA: pip install 'tiermem[gpu]' on a GPU "
                              "machine, or use the POSIX backend")
        import kvikio.defaults

        self.threads = threads
        try:
            kvikio.defaults.set("num_threads", threads)
        except (AttributeError, TypeError):  # kvikio before 25.02 had a per-setting reset function
            kvikio.defaults.num_threads_reset(threads)
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
