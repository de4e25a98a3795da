"""How much of a file the kernel's page cache holds now (mmap + mincore, Linux).

The disk tier's rates count only if its reads came from the disk: a benchmark checks after its runs that the
blocks it read every step are not sitting in the page cache (a buffered reader leaves them there, and a machine
with RAM to spare then serves every later step from memory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable

_PROT_READ = 0x1
_MAP_SHARED = 0x1
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def cached_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of `path` resident in the page cache (whole pages, capped at the file's size); None where mincore
    is not available (not Linux) or the file cannot be mapped."""
    if not os.uname().sysname == "Linux":
        return None
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident = sum(b & 1 for b in vec)
        finally:
            libc.munmap(addr, size)
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
