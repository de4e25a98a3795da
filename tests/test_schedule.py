import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiermem.errors import ConfigError
from tiermem.schedule import Op, OpKind, Step, describe, peak_outstanding, pipeline, ring_slot


def test_lookahead_2_over_5_blocks():
    assert describe(pipeline(list("abcde"), 2)) == [
        "load a | load b",
        "compute a | load c",
        "release a | compute b | load d",
        "release b | compute c | load e",
        "release c | compute d",
        "release d | compute e",
        "release e",
    ]


def test_lookahead_1_is_double_buffering():
    assert describe(pipeline(["x", "y", "z"], 1)) == [
        "load x",
        "compute x | load y",
        "release x | compute y | load z",
        "release y | compute z",
        "release z",
    ]


def test_lookahead_longer_than_the_pass():
    steps = pipeline(["a", "b"], 4)
    assert describe(steps) == ["load a | load b", "compute a", "release a | compute b", "release b"]


def test_empty_pass_has_empty_prologue_and_epilogue():
    assert pipeline([], 2) == (Step(()), Step(()))


def test_ops_carry_indices_so_names_may_repeat():
    steps = pipeline(["embed", "head", "embed"], 1)
    loads = [op for step in steps for op in step.of_kind(OpKind.LOAD)]
    assert loads == [Op(OpKind.LOAD, 0, "embed"), Op(OpKind.LOAD, 1, "head"), Op(OpKind.LOAD, 2, "embed")]
    assert [step.compute.index for step in steps[1:-1]] == [0, 1, 2]


def test_lookahead_must_be_positive():
    with pytest.raises(ConfigError, match="lookahead"):
        pipeline(["a"], 0)


@given(n=st.integers(0, 40), lookahead=st.integers(1, 8))
def test_invariants(n, lookahead):
    names = [f"layers.{i}" for i in range(n)]
    steps = pipeline(names, lookahead)
    assert len(steps) == n + 2
    # every block is loaded, computed and released exactly once, in that order
    assert peak_outstanding(steps) == min(n, lookahead + 1)
    for j, step in enumerate(steps[1:-1]):
        assert step.compute == Op(OpKind.COMPUTE, j, names[j])
        # the release comes first in the step, so the load of j + lookahead can reuse its buffer
        assert [op.kind for op in step.ops][0] is (OpKind.RELEASE if j else OpKind.COMPUTE)
        loads = [op.index for op in step.of_kind(OpKind.LOAD)]
        assert loads == ([j + lookahead] if j + lookahead < n else [])


@given(n=st.integers(1, 30), lookahead=st.integers(1, 6))
def test_ring_slot_is_free_when_its_block_loads(n, lookahead):
    in_use: dict[int, int] = {}  # slot -> block holding it
    for step in pipeline([str(i) for i in range(n)], lookahead):
        for op in step.ops:
            slot = ring_slot(op.index, lookahead)
            if op.kind is OpKind.LOAD:
                assert slot not in in_use, f"block {op.index} would overwrite block {in_use.get(slot)}"
                in_use[slot] = op.index
            elif op.kind is OpKind.RELEASE:
                assert in_use.pop(slot) == op.index
    assert not in_use


def test_peak_outstanding_rejects_broken_pipelines():
    load, compute, release = (Op(kind, 0, "a") for kind in OpKind)
    with pytest.raises(ValueError, match="compute a"):
        peak_outstanding([Step((compute, load))])
    with pytest.raises(ValueError, match="never released"):
        peak_outstanding([Step((load, compute))])
    assert peak_outstanding([Step((load,)), Step((compute,)), Step((release,))]) == 1
