import pytest
import torch

from tiermem.blocks import BlockInfo, BlockTable
from tiermem.errors import BudgetError, ConfigError, StoreError, TiermemError
from tiermem.tiers import HostPool, Tier

KiB = 1024


def test_allocate_and_free_are_accounted():
    pool = HostPool(budget=64 * KiB)
    a = pool.allocate(16 * KiB, "staging buffer 0")
    b = pool.allocate(32 * KiB, "resident block 'embed'")
    assert (a.dtype, a.shape, a.device.type) == (torch.uint8, (16 * KiB,), "cpu")
    assert pool.used_bytes == 48 * KiB
    assert pool.available_bytes == 16 * KiB
    pool.free(a)
    assert pool.used_bytes == 32 * KiB
    c = pool.allocate(32 * KiB, "x")  # the freed bytes are available again
    assert pool.used_bytes == 64 * KiB == pool.peak_bytes
    pool.free(b)
    pool.free(c)
    assert pool.used_bytes == 0
    assert pool.peak_bytes == 64 * KiB


def test_budget_is_hard_and_the_error_says_what_to_do():
    pool = HostPool(budget=40 * KiB)
    pool.allocate(32 * KiB, "staging buffer 0")
    assert not pool.fits(16 * KiB)
    with pytest.raises(BudgetError) as info:
        pool.allocate(16 * KiB, "resident block 'head'")
    message = str(info.value)
    assert "'head'" in message and "16.00 KiB" in message and "40.00 KiB" in message
    assert "8.00 KiB" in message  # what is left
    assert "raise cpu_memory" in message
    assert pool.used_bytes == 32 * KiB  # a refused allocation costs nothing


def test_no_budget_means_no_limit_but_still_counts():
    pool = HostPool(budget=None)
    bufs = [pool.allocate(8 * KiB, f"b{i}") for i in range(4)]
    assert pool.used_bytes == pool.peak_bytes == 32 * KiB
    assert pool.available_bytes is None
    for buf in bufs:
        pool.free(buf)
    assert pool.used_bytes == 0


def test_free_rejects_foreign_or_double_frees():
    pool = HostPool(budget=None)
    buf = pool.allocate(4 * KiB, "b")
    with pytest.raises(ValueError, match="did not allocate"):
        pool.free(torch.empty(4 * KiB, dtype=torch.uint8))
    pool.free(buf)
    with pytest.raises(ValueError):
        pool.free(buf)


def test_close_drops_everything_and_is_idempotent():
    with HostPool(budget=None) as pool:
        pool.allocate(4 * KiB, "b")
    assert pool.used_bytes == 0
    pool.close()
    with pytest.raises(TiermemError, match="closed"):
        pool.allocate(1, "late")


def test_pinning_follows_cuda_availability():
    assert HostPool(None).pin == torch.cuda.is_available()
    assert HostPool(None, pin=False).pin is False
    with pytest.raises(ConfigError):
        HostPool(budget=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_pin_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="CUDA"):
        HostPool(None, pin=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_buffers_are_pinned():
    pool = HostPool(None)
    assert pool.allocate(4 * KiB, "b").is_pinned()


def test_block_table_bookkeeping():
    table = BlockTable.from_sizes(["embed", "layers.0", "layers.1", "head"], [8, 4, 6, 8])
    assert table.names == ["embed", "layers.0", "layers.1", "head"]
    assert table["layers.1"] == BlockInfo("layers.1", 2, 6, Tier.DISK, Tier.DISK)
    assert len(table) == 4 and "head" in table and "nope" not in table
    table.set_home("embed", Tier.HOST)
    table.move("embed", Tier.HOST)
    table.move("layers.0", Tier.HOST)
    assert table["embed"].home is table["embed"].current is Tier.HOST
    assert table["layers.0"].home is Tier.DISK and table["layers.0"].current is Tier.HOST
    assert table.homed_in(Tier.HOST) == ["embed"]
    assert table.homed_in(Tier.DISK) == ["layers.0", "layers.1", "head"]
    assert table.nbytes_homed_in(Tier.DISK) == 18
    assert table.largest(Tier.DISK) == 8
    assert table.largest(Tier.GPU) == 0
    with pytest.raises(StoreError, match="'nope'"):
        table["nope"]
    with pytest.raises(ValueError, match="twice"):
        BlockTable([BlockInfo("a", 0, 1), BlockInfo("a", 1, 1)])
