import threading
import time
from collections import Counter

import pytest
import torch
from hf_models import build_tiny

from tiermem.config import PrefetchConfig
from tiermem.engine.config import model_config_from_hf
from tiermem.engine.executor import Executor
from tiermem.engine.weights import DictWeightSource
from tiermem.errors import BudgetError, ChecksumError, StoreError, TierIOError, TiermemError
from tiermem.residency import ResidencyPlan, TieredWeights, plan_residency
from tiermem.storage.backends.posix import PosixBackend
from tiermem.storage.format import StoreReader, StoreWriter
from tiermem.storage.pack import pack_checkpoint
from tiermem.tiers import Tier

KiB = 1024
SIZES = {"embed": 8 * KiB, **{f"layers.{i}": 4 * KiB for i in range(6)}, "head": 8 * KiB}  # 48 KiB
TOTAL = sum(SIZES.values())


class FakeReader:
    """Same methods as StoreReader; each block's bytes are a fixed pattern; reads are logged."""

    def __init__(self, sizes=SIZES, delay=0.0, fail=None):
        self.block_names = list(sizes)
        self.sizes = dict(sizes)
        self.data = {name: (torch.arange(n) * (i + 3) % 251).to(torch.uint8) for i, (name, n) in
                     enumerate(sizes.items())}
        self.delay = delay
        self.fail = fail or {}
        self.lock = threading.Lock()
        self.reads: list[str] = []
        self.backends: set = set()

    def block_nbytes(self, name):
        return self.sizes[name]

    def read_block(self, name, out=None, backend=None):
        nbytes = self.sizes[name]
        out = torch.empty(nbytes, dtype=torch.uint8) if out is None else out
        assert out.numel() >= nbytes
        time.sleep(self.delay)
        with self.lock:
            self.reads.append(name)
            self.backends.add(backend)
        if name in self.fail:
            raise self.fail[name]
        buf = out[:nbytes]
        buf.copy_(self.data[name])
        return buf

    def decode_block(self, name, buf):
        return {f"{name}.weight": buf[: self.sizes[name] // 2].view(torch.int16), f"{name}.bias": buf[-8:]}


def expected(reader, name):
    return reader.decode_block(name, reader.data[name].clone())


def run_pass(weights, names, reader, hold=0.0):
    """One pass; checks each block's weights, also after holding them a while. Returns data pointers."""
    ptrs = {}
    with weights.stream(names) as blocks:
        for name, w in blocks:
            time.sleep(hold)  # the prefetcher fills other buffers meanwhile; ours must stay intact
            want = expected(reader, name)
            assert w.keys() == want.keys()
            for key in want:
                assert torch.equal(w[key], want[key]), f"{name}/{key} differs"
            ptrs.setdefault(name, w[f"{name}.weight"].data_ptr())
    return ptrs


def test_plan_everything_resident_when_it_fits():
    assert plan_residency(SIZES, None, 2) == ResidencyPlan(tuple(SIZES), (), 0, 0)
    assert plan_residency(SIZES, TOTAL, 2).streamed == ()


def test_plan_reserves_the_ring_then_fills_greedily_in_order():
    plan = plan_residency(SIZES, 36 * KiB, 2)
    # ring for 8 KiB blocks (24 KiB) + embed 8 + layers.0 4 = 36; then head leaves only 4 KiB blocks streamed,
    # so the ring shrinks to 12 KiB and head (8) fits: 8 + 4 + 8 + 12 = 32 KiB
    assert plan.resident == ("embed", "layers.0", "head")
    assert plan.streamed == tuple(f"layers.{i}" for i in range(1, 6))
    assert (plan.ring_buffers, plan.ring_buffer_nbytes) == (3, 4 * KiB)
    assert sum(SIZES[n] for n in plan.resident) + plan.ring_nbytes <= 36 * KiB


def test_plan_with_the_bare_ring():
    plan = plan_residency(SIZES, 24 * KiB, 2)
    assert plan.resident == ()
    assert plan.ring_nbytes == 24 * KiB


@pytest.mark.parametrize(("budget", "suggestion"), [(20 * KiB, "lower lookahead to 1"), (7 * KiB, None)])
def test_plan_refuses_a_budget_below_the_ring(budget, suggestion):
    with pytest.raises(BudgetError) as info:
        plan_residency(SIZES, budget, 2)
    message = str(info.value)
    assert "24.00 KiB" in message and "'embed'" in message and "raise cpu_memory" in message
    assert (suggestion in message) if suggestion else ("lower lookahead" not in message)


def test_everything_resident_without_a_budget():
    reader = FakeReader()
    with TieredWeights(reader, cpu_memory=None) as weights:
        assert weights.resident_blocks == tuple(SIZES)
        for _ in range(2):
            run_pass(weights, list(SIZES), reader)
        assert Counter(reader.reads) == Counter(list(SIZES))  # each block read exactly once
        assert weights.bytes_read_from_disk == TOTAL
        assert weights.peak_host_bytes == TOTAL
        assert all(weights.table[n].home is Tier.HOST for n in SIZES)


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_budget_smaller_than_the_model_streams_the_rest_every_pass(lookahead):
    budget = 36 * KiB
    reader = FakeReader(delay=0.001)
    weights = TieredWeights(reader, budget, PrefetchConfig(lookahead=lookahead, io_threads=3), backend="be")
    streamed, resident = weights.streamed_blocks, weights.resident_blocks
    assert streamed and resident and set(streamed) | set(resident) == set(SIZES)
    ptrs = [run_pass(weights, list(SIZES), reader, hold=0.002) for _ in range(2)]
    weights.close()
    # resident blocks were read once, streamed ones once per pass; data was identical in both passes
    assert Counter(reader.reads) == Counter({**{n: 1 for n in resident}, **{n: 2 for n in streamed}})
    once, twice = sum(SIZES[n] for n in resident), sum(SIZES[n] for n in streamed)
    assert weights.bytes_read_from_disk == once + 2 * twice
    assert weights.peak_host_bytes <= budget
    assert reader.backends == {"be"}
    # resident blocks keep their buffer; streamed blocks close together in a pass never share one
    assert all(ptrs[0][n] == ptrs[1][n] for n in resident)
    for p in ptrs:
        order = [p[n] for n in SIZES if n in streamed]
        for i in range(len(order)):
            window = order[i:i + lookahead + 1]
            assert len(set(window)) == len(window)
        assert len(set(order)) == lookahead + 1  # the ring is the only memory used for streaming


def test_budget_too_small_raises_before_allocating():
    with pytest.raises(BudgetError, match="lookahead"):
        TieredWeights(FakeReader(), 16 * KiB)


def test_leaving_early_or_failing_returns_every_staging_buffer():
    reader = FakeReader(delay=0.002, fail={"layers.4": OSError(5, "Input/output error")})
    weights = TieredWeights(reader, 24 * KiB, PrefetchConfig(lookahead=2, io_threads=2))
    assert weights.free_staging_buffers == 3
    with weights.stream(list(SIZES)) as blocks:
        for name, _ in blocks:
            if name == "layers.1":
                break
    assert weights.free_staging_buffers == 3
    with pytest.raises(TierIOError, match="layers.4"), weights.stream(list(SIZES)) as blocks:
        for _ in blocks:
            pass
    assert weights.free_staging_buffers == 3
    weights.close()


def test_reader_errors_pass_through():
    reader = FakeReader(fail={"layers.2": ChecksumError("layers.2.safetensors: checksum mismatch")})
    with TieredWeights(reader, 24 * KiB) as weights:
        with pytest.raises(ChecksumError, match="layers.2"), weights.stream(list(SIZES)) as blocks:
            list(blocks)
        with pytest.raises(StoreError, match="'nope'"):
            weights.stream(["embed", "nope"])
    with pytest.raises(ChecksumError):  # a resident block that fails is reported at construction
        TieredWeights(reader, None)


def test_close_is_idempotent_and_leaves_no_threads():
    before = set(threading.enumerate())
    weights = TieredWeights(FakeReader(), 30 * KiB)
    run_pass(weights, ["embed", "layers.3", "head", "embed"], weights._reader)  # repeats are fine
    weights.close()
    weights.close()
    assert set(threading.enumerate()) - before == set()
    assert weights.host_bytes == 0
    with pytest.raises(TiermemError, match="closed"):
        weights.stream(["embed"])


@pytest.mark.parametrize("direct", [None, False, True])
def test_over_a_real_store(tmp_path, direct):
    """StoreWriter -> StoreReader -> TieredWeights, reading with the default reader path or PosixBackend."""
    torch.manual_seed(0)
    blocks = {
        "embed": {"model.embed_tokens.weight": torch.randn(64, 16)},
        **{f"layers.{i}": {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16),
                           f"model.layers.{i}.input_layernorm.weight": torch.randn(16)} for i in range(4)},
        "head": {"model.norm.weight": torch.randn(16), "lm_head.weight": torch.randn(64, 16)},
    }
    writer = StoreWriter(tmp_path)
    for name, tensors in blocks.items():
        writer.add_block(name, tensors)
    writer.finish({"model_type": "llama"}, None)
    reader = StoreReader(tmp_path)
    sizes = {n: reader.block_nbytes(n) for n in reader.block_names}
    budget = sum(sizes.values()) - 1  # one byte short of the whole model: some blocks must stream
    backend = None if direct is None else PosixBackend(threads=2, direct=direct, chunk_size=4096)
    with TieredWeights(reader, budget, PrefetchConfig(lookahead=1, io_threads=2), backend) as weights:
        assert weights.streamed_blocks
        for _ in range(2):
            with weights.stream(reader.block_names) as stream:
                for name, w in stream:
                    assert w.keys() == blocks[name].keys()
                    for key, value in blocks[name].items():
                        assert torch.equal(w[key], value), key
        streamed = sum(sizes[n] for n in weights.streamed_blocks)
        assert weights.bytes_read_from_disk == sum(sizes.values()) + streamed
        assert weights.peak_host_bytes <= budget
    if backend is not None:
        backend.close()


def test_executor_over_tiered_weights_matches_in_memory_weights(tmp_path):
    """End to end: a tied-embedding llama whose blocks stream ("embed" twice per pass) gives the same
    logits as the in-memory weights, pass after pass."""
    src = build_tiny("llama-tied", tmp_path / "hf")
    pack_checkpoint(src, tmp_path / "store", quant=None, progress=False)
    reader = StoreReader(tmp_path / "store")
    cfg = model_config_from_hf(reader.model_config)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    want = Executor(cfg, DictWeightSource({n: reader.load_block(n) for n in reader.block_names})).forward(ids)
    sizes = [reader.block_nbytes(n) for n in reader.block_names]
    with TieredWeights(reader, 2 * max(sizes), PrefetchConfig(lookahead=1)) as weights:
        assert weights.resident_blocks == ()
        executor = Executor(cfg, weights)
        for _ in range(2):
            assert torch.equal(executor.forward(ids), want)
        assert weights.peak_host_bytes <= 2 * max(sizes)
