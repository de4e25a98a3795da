"""The pipeline of one pass over blocks, written down once as data (pure; no I/O, no threads).

With lookahead k, block j is computed while blocks j+1 .. j+k are being loaded, and the buffer of
block j-1 is handed back just before (FlexGen's "load j+1 || compute j || store j-1", generalised
to k blocks ahead)::

    prologue      load 0 .. load k-1
    step j        release j-1  ->  wait for block j  ->  load j+k  ||  compute j
    epilogue      release n-1

Within a step the order matters and is the order of `Step.ops`: the release comes first (the
consumer asked for block j, so it is done with j-1, whose buffer the load of j+k may reuse); the
load of j+k starts once block j is ready (it has been handed to the consumer) and runs while
j is computed. Hence at most k+1 blocks are ever loaded-or-loading and not yet released:
a ring of k+1 buffers suffices, and block i may use ring slot i mod (k+1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from tiermem.errors import ConfigError


class OpKind(Enum):
    """What an op does to its block."""

    LOAD = "load"
    COMPUTE = "compute"
    RELEASE = "release"


@dataclass(frozen=True)
class Op:
    """One op of the pipeline: `kind` applied to block number `index` (named `name`)."""

    kind: OpKind
    index: int
    name: str

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name}"


@dataclass(frozen=True)
class Step:
    """Ops issued together, in this order: releases, then the compute's wait, then the loads."""

    ops: tuple[Op, ...]

    def of_kind(self, kind: OpKind) -> tuple[Op, ...]:
        return tuple(op for op in self.ops if op.kind is kind)

    @property
    def compute(self) -> Op | None:
        ops = self.of_kind(OpKind.COMPUTE)
        return ops[0] if ops else None

    def __str__(self) -> str:
        return " | ".join(str(op) for op in self.ops)


def pipeline(names: Sequence[str], lookahead: int) -> tuple[Step, ...]:
    """The steps of one pass over `names` (execution order) with `lookahead` >= 1.

    Returns n + 2 steps: the prologue (first loads), one step per block (whose compute op is that
    block), and the epilogue (release of the last block). Names may repeat; ops carry indices.
    """
    if lookahead < 1:
        raise ConfigError(f"lookahead must be >= 1, got {lookahead}")
    n = len(names)

    def op(kind: OpKind, i: int) -> Op:
        return Op(kind, i, names[i])

    steps = [Step(tuple(op(OpKind.LOAD, i) for i in range(min(lookahead, n))))]
    for j in range(n):
        ops = [op(OpKind.RELEASE, j - 1)] if j >= 1 else []
        ops.append(op(OpKind.COMPUTE, j))
        if j + lookahead < n:
            ops.append(op(OpKind.LOAD, j + lookahead))
        steps.append(Step(tuple(ops)))
    steps.append(Step((op(OpKind.RELEASE, n - 1),) if n else ()))
    return tuple(steps)


def describe(steps: Sequence[Step]) -> list[str]:
    """Human-readable form, one line per step: ["load a | load b", "compute a | load c", ...]."""
    return [str(step) for step in steps]


def ring_slot(index: int, lookahead: int) -> int:
    """Ring buffer that block number `index` may use when every block streams through the ring."""
    return index % (lookahead + 1)


def peak_outstanding(steps: Sequence[Step]) -> int:
    """Most blocks loaded-or-loading and not yet released at any point of `steps`.

    Also checks the pipeline's invariants (each block loaded once, computed after its load and
    released after its compute) and raises ValueError if one is broken.
    """
    state: dict[int, OpKind] = {}
    outstanding = peak = 0
    expected_previous = {OpKind.LOAD: None, OpKind.COMPUTE: OpKind.LOAD, OpKind.RELEASE: OpKind.COMPUTE}
    for step in steps:
        for op in step.ops:
            if state.get(op.index) is not expected_previous[op.kind]:
                raise ValueError(f"{op} comes after {state.get(op.index)} of the same block")
            state[op.index] = op.kind
            outstanding += {OpKind.LOAD: 1, OpKind.COMPUTE: 0, OpKind.RELEASE: -1}[op.kind]
            peak = max(peak, outstanding)
    if outstanding:
        raise ValueError(f"{outstanding} blocks are never released")
    return peak
