"""A scratch file for data that does not fit memory (the disk KV tier): unique name, space reserved, removed.

The file is created by tempfile.mkstemp in the given directory (so two users never share one), its
blocks are allocated up front (posix_fallocate: running out of disk space shows at creation, not in
the middle of a generation), it is mapped shared as a flat uint8 tensor, and it is deleted on close()
or, at the latest, when the ScratchFile is collected (weakref.finalize; also at interpreter exit).
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from tiermem.config import format_size
from tiermem.errors import BudgetError, ConfigError, TierIOError

PREFIX = "tiermem-kv-"


def check_offload_dir(directory: str | os.PathLike | None, nbytes: int = 0, what: str = "the disk KV cache") -> Path:
    """`directory` as a Path when it is an existing, writable directory with `nbytes` free;
    ConfigError (not a usable directory) or BudgetError (too little free space) saying what to do."""
    if directory is None:
        raise ConfigError(f"{what} needs a directory for its file: pass offload_dir=DIR (on a fast local disk)")
    path = Path(directory)
    if not path.exists():
        raise ConfigError(f"offload_dir {path} does not exist: create it (on a fast local disk) or pass another one")
    if not path.is_dir():
        raise ConfigError(f"offload_dir {path} is not a directory: pass a directory on a fast local disk")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"offload_dir {path} is not writable by this user: fix its permissions or pass another "
                          "directory")
    free = shutil.disk_usage(path).free
    if nbytes > free:
        raise BudgetError(f"offload_dir {path} has {format_size(free)} free but {what} needs {format_size(nbytes)}: "
                          "free space there, pass an offload_dir on a larger disk, or lower max_batch_size / "
                          "max_seq_len")
    return path


def _remove(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ScratchFile:
    """A file of `nbytes` (blocks allocated) under a unique name in `directory`; see the module doc."""

    def __init__(self, directory: str | os.PathLike, nbytes: int, what: str = "the disk KV cache") -> None:
        self.directory = check_offload_dir(directory, nbytes, what)
        self.nbytes = nbytes
        try:
            fd, path = tempfile.mkstemp(prefix=PREFIX, suffix=".bin", dir=self.directory)
        except OSError as exc:
            raise ConfigError(f"cannot create {what}'s file in offload_dir {self.directory} ({exc}): pass a "
                              "writable directory") from exc
        self.path = path
        self.fd = fd
        self._remove = weakref.finalize(self, _remove, fd, path)
        try:
            _reserve(fd, nbytes, path, what)
            self._map = mmap.mmap(fd, nbytes)  # MAP_SHARED: writes through it reach the file
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return not self._remove.alive

    def tensor(self) -> torch.Tensor:
        """The whole file as a flat uint8 tensor (shared mapping; valid after close() too, until collected)."""
        return torch.frombuffer(self._map, dtype=torch.uint8)

    def write(self, offset: int, data: torch.Tensor) -> None:
        """Write the bytes of `data` (a contiguous uint8 CPU tensor) at `offset` (pwrite, looping over short writes)."""
        view = memoryview(data.numpy()).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise TierIOError(f"writing {self.path} at byte {offset + done}: {exc}") from exc

    def drop_cached(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to drop the page cache of bytes offset..offset+nbytes (whole pages: clean ones go at once,
        dirty ones stay until written back, which this starts), so that the file's data lives on disk, not in RAM."""
        if hasattr(os, "posix_fadvise") and nbytes > 0:
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Delete the file (its space comes back once no tensor maps it any more)."""
        self._remove()


def _reserve(fd: int, nbytes: int, path: str, what: str) -> None:
    """Allocate the file's blocks; BudgetError when the disk is full, a sparse file where fallocate is not offered."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise BudgetError(f"no room for {what} ({format_size(nbytes)}) in {os.path.dirname(path)}: free space "
                              "there or pass another offload_dir") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise TierIOError(f"cannot allocate {format_size(nbytes)} for {path}: {exc}") from exc
        os.ftruncate(fd, nbytes)
