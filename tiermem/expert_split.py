"""Where a sparse layer's bytes lie in its block: the part every step needs, and each routed expert's part.

A decode step of few tokens uses top_k of a sparse layer's E experts (Mixtral-8x22B at batch 1: 2 of 8, about 70%
of the layer's bytes unused). The GPU tier copies a streamed block's shared part (attention, norms, router, a shared
expert) ahead of use, as it copies any block, and each routed expert when a kernel first asks for one of its
tensors (tiermem.gpu_tier, after a sparse layer that left experts unused), so that only the chosen experts cross
PCIe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tiermem.kernels.quant import QuantizedWeight
from tiermem.storage.moe_names import expert_index

Runs = tuple[tuple[int, int], ...]  # (start, end) byte ranges of a block's buffer
SHARED = -1  # the owner of the bytes that are not a routed expert's


@dataclass(frozen=True)
class ExpertSplit:
    """A block's bytes as the runs copied with the block and, per routed expert, the runs copied on demand."""

    shared: Runs
    experts: Mapping[int, Runs]  # expert index -> its runs
    owner: Mapping[str, int]  # name of a routed expert's tensor -> that expert's index


def _parts(value: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor, ...]:
    return (value.qdata, value.scale, value.zero) if isinstance(value, QuantizedWeight) else (value,)


def split_experts(views: Mapping[str, torch.Tensor | QuantizedWeight], buffer: torch.Tensor) -> ExpertSplit | None:
    """The split of the block whose tensors `views` are (views into `buffer`, uint8); None for a block without
    routed experts. Neighbouring tensors of one owner make one run (the alignment padding between them included);
    the bytes no tensor holds (the safetensors header, padding between owners) are in no run."""
    base = buffer.data_ptr()
    owner: dict[str, int] = {}
    parts: list[tuple[int, int, int]] = []  # (start, end, owner)
    for name, value in views.items():
        j = expert_index(name)
        if j is not None:
            owner[name] = j
        for t in _parts(value):
            start = t.data_ptr() - base
            parts.append((start, start + t.numel() * t.element_size(), SHARED if j is None else j))
    if not owner:
        return None
    runs: dict[int, list[tuple[int, int]]] = {}
    last = None
    for start, end, who in sorted(parts):
        mine = runs.setdefault(who, [])
        if who == last:
            mine[-1] = (mine[-1][0], max(mine[-1][1], end))
        else:
            mine.append((start, end))
        last = who
    shared = tuple(runs.pop(SHARED, ()))
    return ExpertSplit(shared, {j: tuple(r) for j, r in runs.items()}, owner)
