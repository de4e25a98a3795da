"""tiermem.pinned.device_alias: page-locked host memory that kernels on the GPU read in place."""

import pytest
import torch
import torch.nn.functional as F

from tiermem.errors import ConfigError
from tiermem.pinned import PinnedArena, device_alias


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.mark.parametrize("buffer", [torch.zeros(8, dtype=torch.float32), torch.zeros(2, 4, dtype=torch.uint8)])
def test_device_alias_takes_a_flat_byte_buffer(buffer):
    with pytest.raises(ConfigError, match="1-D uint8 host buffer"):
        device_alias(buffer, "cuda")


@gpu
def test_gpu_alias_of_an_arena_slice_reads_the_host_bytes_in_place():
    """A table in a registered arena, gathered on the GPU through the alias, as on the host; a later host write is
    what the next GPU read sees (no copy was made)."""
    with PinnedArena(1 << 20) as arena:
        table = arena.take(1000 * 64 * 2).view(torch.bfloat16).view(1000, 64)  # [V, D]
        table.copy_(torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)))
        allocated = torch.cuda.memory_allocated()
        alias = device_alias(table.view(torch.uint8).view(-1), "cuda")
        assert torch.cuda.memory_allocated() == allocated  # the table is not copied into HBM
        assert alias is not None and alias.device.type == "cuda" and alias.numel() == table.numel() * 2
        on_gpu = alias.view(torch.bfloat16).view(1000, 64)
        ids = torch.tensor([[3], [999], [0]])
        assert torch.equal(F.embedding(ids.cuda(), on_gpu).cpu(), F.embedding(ids, table))
        table[999].fill_(7.0)
        assert bool((on_gpu[999] == 7.0).all())


@gpu
def test_gpu_pageable_memory_has_no_alias():
    assert device_alias(torch.zeros(1 << 16, dtype=torch.uint8), "cuda") is None
