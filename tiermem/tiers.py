"""Memory tiers and the host (CPU RAM) pool that allocates staging and resident buffers under a budget."""

from __future__ import annotations

from enum import Enum

import torch

from tiermem.config import format_size
from tiermem.errors import BudgetError, ConfigError, TiermemError


class Tier(Enum):
    """Where a block's bytes can live, slowest first."""

    DISK = "disk"
    HOST = "host"
    GPU = "gpu"


class HostPool:
    """Byte buffers in host RAM, every one accounted against a hard budget.

    `budget=None` means no limit (accounting still happens). Buffers are pinned (page-locked, so
    host-to-GPU copies run at full PCIe speed) when `pin` is true; `pin=None` pins exactly when CUDA
    is available, because `pin_memory` raises on a machine without CUDA.
    """

    def __init__(self, budget: int | None, pin: bool | None = None) -> None:
        cuda = torch.cuda.is_available()
        if pin and not cuda:
            raise ConfigError("pinned host memory needs CUDA, which is not available: pass pin=None or False")
        if budget is not None and budget < 0:
            raise ConfigError(f"host memory budget must not be negative, got {budget}")
        self.budget = budget
        self.pin = cuda if pin is None else pin
        self._buffers: dict[int, tuple[torch.Tensor, str]] = {}
        self._used = 0
        self._peak = 0
        self._closed = False

    @property
    def used_bytes(self) -> int:
        """Bytes held by live buffers."""
        return self._used

    @property
    def peak_bytes(self) -> int:
        """Most bytes held at once since the pool was created."""
        return self._peak

    @property
    def available_bytes(self) -> int | None:
        """Bytes that can still be allocated (None without a budget)."""
        return None if self.budget is None else self.budget - self._used

    def fits(self, nbytes: int) -> bool:
        """Whether a buffer of `nbytes` can be allocated now."""
        return self.budget is None or self._used + nbytes <= self.budget

    def allocate(self, nbytes: int, purpose: str) -> torch.Tensor:
        """A new uint8 CPU tensor [nbytes] (contents undefined); `purpose` names it in errors.

        Raises BudgetError if it does not fit the remaining budget.
        """
        if self._closed:
            raise TiermemError(f"cannot allocate {purpose}: the host pool is closed")
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative number of bytes ({nbytes}) for {purpose}")
        if not self.fits(nbytes):
            raise BudgetError(
                f"{purpose} needs {format_size(nbytes)} of host memory but only "
                f"{format_size(self.budget - self._used)} of the {format_size(self.budget)} cpu_memory "
                f"budget is left ({format_size(self._used)} in use): raise cpu_memory"
            )
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self._buffers[id(buf)] = (buf, purpose)
        self._used += nbytes
        self._peak = max(self._peak, self._used)
        return buf

    def free(self, buf: torch.Tensor) -> None:
        """Return a buffer obtained from `allocate`; its bytes no longer count against the budget."""
        entry = self._buffers.pop(id(buf), None)
        if entry is None or entry[0] is not buf:
            raise ValueError("free() got a buffer that this pool did not allocate (or freed already)")
        self._used -= buf.numel()

    def close(self) -> None:
        """Drop every buffer (idempotent). Tensors still referenced elsewhere stay valid but uncounted."""
        self._buffers.clear()
        self._used = 0
        self._closed = True

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
