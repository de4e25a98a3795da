"""The GPU tier copies a streamed sparse layer's routed experts on demand (CUDA streams and events faked, as in
conftest.fake_cuda: copies happen when issued): the experts a pass uses hold their bytes, the ones it does not
use never cross, and after a sparse layer that used every expert blocks are copied whole."""

import pytest
import torch

from tiermem.expert_split import split_experts
from tiermem.gpu_tier import GpuWeights

EXPERT = "block_sparse_moe.experts.{j}.{w}.weight"
# tensor name -> (start, end) in each layer block; gaps are alignment padding
LAYOUT = {
    "self_attn.q_proj.weight": (0, 32),
    EXPERT.format(j=0, w="w1"): (32, 64), EXPERT.format(j=0, w="w2"): (64, 80),
    EXPERT.format(j=1, w="w1"): (96, 128),
    "block_sparse_moe.gate.weight": (128, 144),
    EXPERT.format(j=2, w="w1"): (144, 176), EXPERT.format(j=2, w="w2"): (192, 200),
}
BLOCK_BYTES = 208
NAMES = ["embed", "layers.0", "layers.1", "layers.2", "head"]


def decode(name, buffer):
    if not name.startswith("layers."):
        return {"bytes": buffer[:16]}
    return {tensor: buffer[a:b] for tensor, (a, b) in LAYOUT.items()}


def host_blocks():
    """Every byte of every block distinct from the same byte of the other blocks."""
    return {name: ((torch.arange(BLOCK_BYTES) * 7 + 31 * k) % 251).to(torch.uint8) for k, name in enumerate(NAMES)}


def expert_bytes(*experts):
    """Bytes of the runs of `experts` (each from its first tensor's start to its last one's end)."""
    runs = {0: (32, 80), 1: (96, 128), 2: (144, 200)}
    return sum(runs[j][1] - runs[j][0] for j in experts)


SHARED_BYTES = 32 + 16


def run_pass(weights, use):
    """One pass over NAMES, reading the shared tensors and the tensors of experts `use` in each layer; returns the
    bytes copied host -> HBM meanwhile (the next pass's first copies, issued within this one, included)."""
    expected = host_blocks()
    before = weights.h2d_bytes
    with weights.stream(NAMES) as blocks:
        for name, w in blocks:
            if not name.startswith("layers."):
                continue
            for tensor, (a, b) in LAYOUT.items():
                j = next((j for j in range(3) if f"experts.{j}." in tensor), None)
                if j is None or j in use:
                    assert torch.equal(w[tensor], expected[name][a:b]), (name, tensor)
    return weights.h2d_bytes - before


def steady(weights, use):
    """The bytes a pass copies once passes using experts `use` repeat (the primed copies of the next pass follow
    the same rule as the pass's own by then)."""
    return [run_pass(weights, use) for _ in range(3)][-1]


@pytest.mark.parametrize("lookahead", [1, 2])
def test_only_the_experts_a_pass_uses_cross_once_a_pass_left_some_unused(fake_cuda, lookahead):
    weights = GpuWeights({}, host_blocks(), decode, device="cpu", host_only=["embed"], lookahead=lookahead)
    assert weights.sparse_host_blocks == ["layers.0", "layers.1", "layers.2"]
    head = BLOCK_BYTES  # "head" has no experts: always whole
    # before any sparse layer was used, whole blocks: the first lookahead + 1 copies; the rest, issued after layers.0
    # left experts unused, are shared parts (and expert 0 when used), the next pass's first lookahead + 1 too
    whole = lookahead + 1
    assert run_pass(weights, use={0}) == (whole * BLOCK_BYTES + (3 - whole) * (SHARED_BYTES + expert_bytes(0))
                                          + head + (lookahead + 1) * SHARED_BYTES)
    assert steady(weights, {0}) == 3 * (SHARED_BYTES + expert_bytes(0)) + head
    assert steady(weights, {1, 2}) == 3 * (SHARED_BYTES + expert_bytes(1, 2)) + head
    assert steady(weights, {0, 1, 2}) == 4 * BLOCK_BYTES  # each pass used every expert: whole blocks again
    assert steady(weights, {1}) == 3 * (SHARED_BYTES + expert_bytes(1)) + head


def test_experts_are_copied_whole_without_on_demand(fake_cuda):
    weights = GpuWeights({}, host_blocks(), decode, device="cpu", host_only=["embed"], lookahead=1,
                         experts_on_demand=False)
    assert steady(weights, {0}) == 4 * BLOCK_BYTES


def test_a_membership_test_copies_nothing(fake_cuda):
    weights = GpuWeights({}, host_blocks(), decode, device="cpu", host_only=["embed"], lookahead=1)
    steady(weights, {0})
    before = weights.h2d_bytes
    with weights.stream(NAMES) as blocks:
        for name, w in blocks:
            if name.startswith("layers."):
                assert EXPERT.format(j=1, w="w1") in w and "missing" not in w
    # layers.2's shared part, the head, and the next pass's first two shared parts
    assert weights.h2d_bytes - before == 3 * SHARED_BYTES + BLOCK_BYTES


def test_the_split_runs_cover_each_owners_tensors_and_skip_padding_between_owners():
    buffer = torch.zeros(BLOCK_BYTES, dtype=torch.uint8)
    split = split_experts(decode("layers.0", buffer), buffer)
    assert split.shared == ((0, 32), (128, 144))
    assert split.experts == {0: ((32, 80),), 1: ((96, 128),), 2: ((144, 200),)}  # 176-192: padding of expert 2
    assert split.owner[EXPERT.format(j=2, w="w2")] == 2 and "block_sparse_moe.gate.weight" not in split.owner
    assert split_experts({"self_attn.q_proj.weight": buffer[:32]}, buffer) is None


def test_turning_on_demand_off_between_passes_copies_whole_blocks_from_the_next_copy_on(fake_cuda):
    weights = GpuWeights({}, host_blocks(), decode, device="cpu", host_only=["embed"], lookahead=1)
    steady(weights, {0})
    weights.experts_on_demand = False
    assert steady(weights, {0}) == 4 * BLOCK_BYTES


def test_a_prompt_after_decode_steps_and_the_step_after_it_follow_their_own_first_layers(fake_cuda):
    """lookahead 1: a pass that uses every expert (a prompt) after passes that used one fetches all experts of its
    first two layers (copied before it showed), and copies the rest whole; the pass after it gets its first two
    layers whole and splits from the third."""
    weights = GpuWeights({}, host_blocks(), decode, device="cpu", host_only=["embed"], lookahead=1)
    steady(weights, {0})
    every = expert_bytes(0, 1, 2)
    assert run_pass(weights, {0, 1, 2}) == 2 * every + 2 * BLOCK_BYTES + 2 * BLOCK_BYTES  # + layers.2, head, primes
    assert run_pass(weights, {0}) == (SHARED_BYTES + expert_bytes(0)) + BLOCK_BYTES + 2 * SHARED_BYTES
