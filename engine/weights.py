"""Weight sources for the executor: the protocol, an in-memory source, and HF state_dict splitting.

A WeightSource yields blocks in the order asked; block k's dict stays valid until the iterator is
advanced to block k + 1 (a streaming source may then reuse its buffer). The executor never keeps a
reference to a block's dict past that point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, Union

import torch

from tiermem.errors import WeightsError
from tiermem.kernels.quant import QuantizedWeight
from tiermem.storage.pack import block_of

WeightValue = Union[torch.Tensor, QuantizedWeight]  # noqa: UP007 (runtime alias)
Block = dict[str, WeightValue]



class WeightSource(Protocol):
    """Anything that streams weight blocks by name (DictWeightSource, tiermem's TieredWeights)."""

    def stream(self, names: Sequence[str]) -> AbstractContextManager[Iterator[tuple[str, Block]]]: ...


def split_state_dict(state_dict: Mapping[str, WeightValue]) -> dict[str, Block]:
    """HF name -> tensor  =>  block name -> {HF name -> tensor} (views, nothing copied)."""
    blocks: dict[str, Block] = {}
    for name, value in state_dict.items():
        blocks.setdefault(block_of(name), {})[name] = value
    return blocks


class DictWeightSource:
    """In-memory WeightSource over {block name -> {HF name -> tensor | QuantizedWeight}}."""

    def __init__(self, weights_by_block: Mapping[str, Mapping[str, WeightValue]]):
        self.blocks = {name: dict(block) for name, block in weights_by_block.items()}
        self.fetches: Counter[str] = Counter()  # how often each block was streamed (for tests)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, WeightValue]) -> DictWeightSource:
        return cls(split_state_dict(state_dict))

    @contextmanager
    def stream(self, names: Sequence[str]) -> Iterator[Iterator[tuple[str, Block]]]:
        missing = [n for n in names if n not in self.blocks]
        if missing:
            raise WeightsError(f"weight blocks {missing} are not in this source, only {sorted(self.blocks)}")
        yield self._iterate(list(names))

    def _iterate(self, names: list[str]) -> Iterator[tuple[str, Block]]:
        for name in names:
            self.fetches[name] += 1
            yield name, self.blocks[name]
