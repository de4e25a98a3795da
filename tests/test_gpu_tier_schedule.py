"""The GPU tier's copy schedule on the host, with CUDA streams and events faked (copies then happen when they are
issued): every block it yields holds that block's bytes, over passes that repeat, change or stop early, and the
copies of the next pass start as soon as a slot is free."""

import pytest
import torch

from tiermem.gpu_tier import GpuWeights

SIZES = {"embed": 64, **{f"layers.{i}": 96 + 16 * (i % 3) for i in range(8)}, "head": 80}


def blocks():
    """Each block's bytes: its own value, so that a block read from the wrong slot shows."""
    return {name: torch.full((n,), k + 1, dtype=torch.uint8) for k, (name, n) in enumerate(SIZES.items())}


def tier(resident: list[str], lookahead: int, log: list) -> GpuWeights:
    host = blocks()
    gpu = {n: host.pop(n).clone() for n in resident}

    def decode(name, buffer):
        return {"bytes": buffer[:SIZES[name]]}

    weights = GpuWeights(gpu, host, decode, device="cpu", host_only=["embed"], lookahead=lookahead)
    issue = weights._issue_copy

    def logged(name, disk_blocks):
        log.append(("copy", name))
        return issue(name, disk_blocks)

    weights._issue_copy = logged
    return weights


def run_pass(weights, names, log, stop_after=None):
    expected = blocks()
    with weights.stream(names) as it:
        for k, (name, w) in enumerate(it):
            assert torch.equal(w["bytes"], expected[name]), f"block {name} holds another block's bytes"
            log.append(("use", name))
            if stop_after is not None and k == stop_after:
                break


ORDER = list(SIZES)
RESIDENT_PATTERNS = [[], ["layers.0", "layers.2", "layers.4", "layers.6", "head"],
                     [f"layers.{i}" for i in range(6)], ["layers.7", "head"]]


@pytest.mark.parametrize("lookahead", [1, 2, 3])
@pytest.mark.parametrize("resident", RESIDENT_PATTERNS)
def test_every_yielded_block_holds_its_bytes_over_repeated_changed_and_stopped_passes(fake_cuda, lookahead, resident):
    log: list = []
    weights = tier(resident, lookahead, log)
    for _ in range(3):
        run_pass(weights, ORDER, log)
    run_pass(weights, ORDER[:1] + ORDER[5:], log)  # another sequence of blocks: the primed copies are dropped
    run_pass(weights, ORDER, log, stop_after=4)  # a pass that stops early (an exception in a layer)
    run_pass(weights, ORDER, log)
    run_pass(weights, ORDER, log)
    streamed = [n for n in ORDER if n not in resident and n != "embed"]
    assert [n for kind, n in log if kind == "copy"][:len(streamed)] == streamed[:len(streamed)]


def test_the_next_passs_copies_start_once_a_slot_is_free_not_at_the_end_of_the_pass(fake_cuda):
    """Streamed blocks early in the order, resident ones after: the copy of the next pass's first streamed block is
    issued while this pass still yields its resident blocks, so that PCIe does not idle until the pass ends."""
    log: list = []
    resident = [f"layers.{i}" for i in range(3, 8)] + ["head"]
    weights = tier(resident, 1, log)
    run_pass(weights, ORDER, log)
    first_copy_of_next = len([e for e in log if e[0] == "copy"])  # copies of pass 1 and the primed ones
    used_last = log.index(("use", "head"))
    primed = [i for i, e in enumerate(log) if e == ("copy", "layers.0")]
    assert len(primed) == 2 and primed[1] < used_last, log
    assert first_copy_of_next == 3 + 2  # layers.0-2 this pass, layers.0-1 primed for the next
