"""POSIX read backend: large reads are split into chunks read in parallel with os.preadv.

preadv releases the GIL, so a small thread pool keeps several requests in flight on NVMe.
With direct=True, reads whose offset, length and buffer address are 4 KiB aligned bypass the
page cache (O_DIRECT); anything else, or a filesystem that refuses O_DIRECT, falls back to
buffered reads.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from tiermem.errors import ConfigError, TierIOError
from tiermem.storage.backends.base import PAGE, check_out, is_aligned

DEFAULT_CHUNK = 8 * 2**20


class PosixBackend:
    """ReadBackend over os.preadv and a ThreadPoolExecutor of `threads` workers."""

    def __init__(self, threads: int = 4, direct: bool = False, chunk_size: int = DEFAULT_CHUNK) -> None:
        if threads < 1 or chunk_size < PAGE or chunk_size % PAGE:
            raise ConfigError(f"PosixBackend needs threads >= 1 and chunk_size a multiple of {PAGE}, "
                              f"got threads={threads}, chunk_size={chunk_size}")
        self.threads = threads
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.chunk_size = chunk_size
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiermem-posix")
        self._lock = threading.Lock()
        self._closed = False
        self.direct_reads = 0  # requests (read_into calls) served with O_DIRECT
        self.buffered_reads = 0

    def read_into(self, path: str | os.PathLike, offset: int, out: torch.Tensor) -> None:
        self.read_many(path, [(offset, out)])

    def read_many(self, path: str | os.PathLike, requests: Sequence[tuple[int, torch.Tensor]]) -> None:
        """read_into for several (offset, out) of one file at once: the chunks of every request are in flight
        together, so small reads overlap each other as the chunks of one large read do."""
        if self._closed:
            raise TierIOError(f"reading {path}: the PosixBackend was closed")
        fds: dict[bool, tuple[int, bool]] = {}  # wanted O_DIRECT -> (fd, got O_DIRECT)
        pieces: list[tuple[int, memoryview, int]] = []
        served = {True: 0, False: 0}
        try:
            for offset, out in requests:
                check_out(path, out)
                if out.numel() == 0:
                    continue
                want = self.direct and is_aligned(offset, out)
                if want not in fds:
                    fds[want] = self._open(path, want)
                fd, direct = fds[want]
                _check_size(fd, path, offset, out.numel())
                view = memoryview(out.numpy()).cast("B")
                pieces += [(fd, view[start:start + self.chunk_size], offset + start)
                           for start in range(0, out.numel(), self.chunk_size)]
                served[direct] += 1
            if len(pieces) == 1 or self.threads == 1:
                for fd, piece, at in pieces:
                    _pread_exact(fd, path, piece, at)
            else:
                futures = [self._pool.submit(_pread_exact, fd, path, piece, at) for fd, piece, at in pieces]
                for future in futures:  # wait for all before closing the files, then raise the first error
                    future.exception()
                for future in futures:
                    future.result()
        finally:
            for fd, _ in fds.values():
                os.close(fd)
        with self._lock:
            self.direct_reads += served[True]
            self.buffered_reads += served[False]

    def _open(self, path: str | os.PathLike, direct: bool) -> tuple[int, bool]:
        try:
            if direct:
                try:
                    return os.open(path, os.O_RDONLY | os.O_DIRECT), True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: this filesystem refuses O_DIRECT
                        raise
            return os.open(path, os.O_RDONLY), False
        except OSError as exc:
            raise TierIOError(f"cannot open {path}: {exc}") from exc

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PosixBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_size(fd: int, path: str | os.PathLike, offset: int, nbytes: int) -> None:
    size = os.fstat(fd).st_size
    if offset + nbytes > size:
        raise TierIOError(f"short read from {path}: wanted {nbytes} bytes at offset {offset} but the file "
                          f"has {size} bytes; it was truncated; re-pack or restore it")


def _pread_exact(fd: int, path: str | os.PathLike, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`, looping over partial reads; EOF first -> TierIOError."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise TierIOError(f"reading {path} at byte {offset + done}: {exc}") from exc
        if n == 0:
            raise TierIOError(f"short read from {path}: wanted {len(view)} bytes at offset {offset}, "
                              f"the file ends after {done}; it was truncated; re-pack or restore it")
        done += n
