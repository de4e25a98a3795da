"""Where each block lives: bookkeeping only (no bytes are moved here)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from tiermem.errors import StoreError
from tiermem.tiers import Tier


@dataclass(frozen=True)
class BlockInfo:
    """One block: its execution-order `index`, size, home tier (between passes) and current tier."""

    name: str
    index: int
    nbytes: int
    home: Tier = Tier.DISK
    current: Tier = Tier.DISK


class BlockTable:
    """Block name -> BlockInfo, in execution order."""

    def __init__(self, infos: Iterable[BlockInfo]) -> None:
        self._infos: dict[str, BlockInfo] = {}
        for info in infos:
            if info.name in self._infos:
                raise ValueError(f"block {info.name!r} appears twice")
            self._infos[info.name] = info

    @classmethod
    def from_sizes(cls, names: Sequence[str], nbytes: Sequence[int]) -> BlockTable:
        """All blocks at home on disk, in the given order."""
        if len(names) != len(nbytes):
            raise ValueError(f"{len(names)} names but {len(nbytes)} sizes")
        return cls(BlockInfo(name, i, size) for i, (name, size) in enumerate(zip(names, nbytes, strict=True)))

    def __getitem__(self, name: str) -> BlockInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise StoreError(f"unknown block {name!r}; the blocks are {', '.join(self._infos)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[BlockInfo]:
        return iter(self._infos.values())

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def set_home(self, name: str, tier: Tier) -> None:
        """Make `tier` the block's home (where it stays between passes)."""
        self._infos[name] = replace(self[name], home=tier)

    def move(self, name: str, tier: Tier) -> None:
        """Record that the block's bytes are now in `tier`."""
        self._infos[name] = replace(self[name], current=tier)

    def homed_in(self, tier: Tier) -> list[str]:
        """Names of the blocks whose home is `tier`, in execution order."""
        return [info.name for info in self if info.home is tier]

    def nbytes_homed_in(self, tier: Tier) -> int:
        return sum(info.nbytes for info in self if info.home is tier)

    def largest(self, tier: Tier) -> int:
        """Size of the largest block whose home is `tier` (0 if none)."""
        return max((info.nbytes for info in self if info.home is tier), default=0)
