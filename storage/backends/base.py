"""The interface every read backend implements, and helpers for the buffers they read into."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch

from tiermem.errors import TierIOError

PAGE = 4096  # O_DIRECT / GDS alignment of offsets, lengths and buffer addresses


@runtime_checkable
class ReadBackend(Protocol):
    """Reads byte ranges of files into host buffers."""

    def read_into(self, path: str | os.PathLike, offset: int, out: torch.Tensor) -> None:
        """Read exactly out.numel() bytes of `path` at `offset` into `out` (contiguous uint8 CPU).

        A short read or an OSError raises TierIOError naming the file.
        """
        ...

    def close(self) -> None:
        """Release threads and handles; the backend is unusable afterwards."""
        ...


def check_out(path: str | os.PathLike, out: torch.Tensor) -> None:
    """TierIOError unless `out` is a buffer a backend can read into."""
    if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
        raise TierIOError(f"reading {path}: the destination must be a contiguous uint8 CPU tensor, "
                          f"got {out.dtype} on {out.device}")


def is_aligned(offset: int, out: torch.Tensor, alignment: int = PAGE) -> bool:
    """True when file offset, length and buffer address are all multiples of `alignment`."""
    return offset % alignment == 0 and out.numel() % alignment == 0 and out.data_ptr() % alignment == 0


def aligned_empty(nbytes: int, alignment: int = PAGE) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of nbytes whose address is a multiple of `alignment`
    (pinned CUDA host allocations already are; plain torch.empty guarantees only 64 bytes)."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    start = -raw.data_ptr() % alignment
    return raw[start:start + nbytes]
