"""How much of a file the kernel's page cache holds now (mmap + mincore, Linux), and dropping a file from it.

The disk tier's rates count only if its reads came from the disk: a benchmark checks after its runs that the
blocks it read every step are not sitting in the page cache (a buffered reader leaves them there, and a machine
with RAM to spare then serves every later step from memory)."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Iterable

import numpy as np

_PROT_READ = 0x1
_MAP_SHARED = 0x1
_MAP_FAILED = ctypes.c_void_p(-1).value
_WINDOW = 1 << 30  # bytes mapped at a time (a multiple of the page size)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)  # the process's C library
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def _mincore_tells(path: str | os.PathLike) -> bool:
    """Whether mincore reports this file's real residency: since Linux 5.2 it says "all resident" for a file the
    caller neither owns nor may write (unless root)."""
    return os.geteuid() == 0 or os.stat(path).st_uid == os.geteuid() or os.access(path, os.W_OK)


def _resident_pages(libc: ctypes.CDLL, fd: int, offset: int, length: int) -> int | None:
    """Pages of bytes offset..offset+length of the file `fd` in the page cache; None where it cannot be mapped."""
    addr = libc.mmap(None, length, _PROT_READ, _MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        vec = (ctypes.c_ubyte * ((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        if libc.mincore(addr, length, vec) != 0:
            return None
        return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
    finally:
        libc.munmap(addr, length)


def cached_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of `path` resident in the page cache (whole pages, capped at the file's size); None where it cannot be
    told: not Linux, a file mincore does not report for (see _mincore_tells), or one that cannot be mapped."""
    size = os.path.getsize(path)
    if sys.platform != "linux" or not _mincore_tells(path):
        return None
    if size == 0:
        return 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        resident = 0
        for offset in range(0, size, _WINDOW):
            pages = _resident_pages(libc, fd, offset, min(_WINDOW, size - offset))
            if pages is None:
                return None
            resident += pages
    finally:
        os.close(fd)
    return min(resident * mmap.PAGESIZE, size)


def cached_fraction(paths: Iterable[str | os.PathLike]) -> float | None:
    """Share of the files' bytes in the page cache now; None where it cannot be told (see cached_bytes) or
    the files hold no bytes."""
    total = cached = 0
    for path in paths:
        found = cached_bytes(path)
        if found is None:
            return None
        cached += found
        total += os.path.getsize(path)
    return cached / total if total else None


def evict(paths: Iterable[str | os.PathLike]) -> None:
    """Write back and drop the files' pages from the page cache (posix_fadvise DONTNEED, no root needed; a no-op
    where the call does not exist, or on a filesystem that keeps files in memory, such as tmpfs). Best effort:
    a file whose pages cannot be written back (a read-only mount) keeps its dirty pages."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)
            except OSError:  # EROFS / EINVAL on some read-only filesystems: clean pages are dropped anyway
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
