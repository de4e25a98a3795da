"""DiskKVCache: the KV cache in a scratch file, staged through two host slots (tiermem.kv_disk).

On the CPU the staging copies are plain tensor copies (SyncMover) and the file I/O is real, so these
tests check the bookkeeping and the bytes on disk against the dense cache without a GPU. The CUDA
path (landing buffer, permute on the copy stream, pinned staging) is checked by the GPU tests at the end.
"""

import errno
import functools
import gc
import itertools
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from hf_models import left_padded_batch, longer_batch, packed_stores, teacher_forced
from test_kv_offload import assert_session_state_matches_the_device_cache
from test_planner import H200, TINY_HW, _every_tiny_plan, _tiny

import tiermem
from tiermem import GenerationSession
from tiermem.cost_model import step_cost
from tiermem.engine.kv_cache import KVCache
from tiermem.errors import BudgetError, ConfigError
from tiermem.kernels.kv_quant import kv_scheme
from tiermem.kv_disk import DiskKVCache
from tiermem.pinned import aligned_size
from tiermem.placement import kv_cache_bytes
from tiermem.planner import Plan, plan, predict
from tiermem.scratch_file import PREFIX


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return packed_stores(tmp_path_factory.mktemp("kv-disk"), ("llama3", "opt", "phi3-longrope"))


def kv_files(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.startswith(PREFIX))


def test_a_disk_cache_generates_what_the_device_cache_does_through_a_longrope_rerun(stores, tmp_path):
    """LongRoPE's generate runs the whole sequence again once it passes the original length (16 here): a disk cache
    whose length goes back to 0 mid-generation rewrites its slots from the first."""
    from hf_models import left_padded_batch

    from tiermem.engine.generate import generate

    ids, mask = left_padded_batch()
    with tiermem.load(stores["phi3-longrope"], max_batch_size=2, max_seq_len=64) as m:
        ref = generate(m.executor, ids, 20, attention_mask=mask, cache=KVCache.allocate(m.config, 2, 40, m.dtype))
        disk = DiskKVCache.allocate(m.config, 2, 40, m.dtype, "cpu", offload_dir=tmp_path)
        out = generate(m.executor, ids, 20, attention_mask=mask, cache=disk)
        disk.flush()
    assert out.shape == (2, 30) and torch.equal(out, ref) and disk.length == 29


@pytest.mark.parametrize("variant", ["llama3", "opt"])
@pytest.mark.parametrize("kv_quant", [None, "int8", "int4"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_disk_cache_gives_the_logits_of_the_device_cache(stores, tmp_path, variant, kv_quant, micro_batches):
    ids, mask = longer_batch()
    with tiermem.load(stores[variant], max_batch_size=2, max_seq_len=64) as m:
        scheme = kv_scheme(kv_quant, m.config.head_dim)
        ref_cache = KVCache.allocate(m.config, 2, 40, m.dtype, kv_quant=scheme)
        ref = teacher_forced(m, ref_cache, ids, mask, 10, micro_batches)
        disk = DiskKVCache.allocate(m.config, 2, 40, m.dtype, "cpu", kv_quant=scheme, offload_dir=tmp_path)
        out = teacher_forced(m, disk, ids, mask, 10, micro_batches)
        disk.flush()
    assert torch.equal(out, ref)
    nbytes = kv_cache_bytes(m.config, 2, 40, m.dtype, scheme)
    assert disk.length == ids.shape[1] and disk.nbytes == nbytes
    assert disk.staging_bytes == 2 * nbytes // m.config.num_layers  # two layers' worth in host memory
    L = disk.length
    for a, b in zip(disk.to("cpu").keys + disk.values, ref_cache.keys + ref_cache.values, strict=True):
        for x, y in zip(*(s.tensors if kv_quant else (s,) for s in (a, b)), strict=True):
            assert torch.equal(x[:, :, :L], y[:, :, :L])  # the file holds what the device cache does
    disk.close()
    assert kv_files(tmp_path) == []


class Recorder:
    """Wraps a DiskKVCache's file reads and writes: (layer region index, byte offset, nbytes)."""

    def __init__(self, cache: DiskKVCache):
        self.starts = {r.offset: (layer, i) for layer, regs in enumerate(cache.regions) for i, r in enumerate(regs)}
        self.reads: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, int]] = []
        read, write = cache.backend.read_many, cache.file.write

        def read_many(path, requests):  # a prefix is read as its whole pages, then the partial one
            for offset, out in requests:
                region = self.starts[max(s for s in self.starts if s <= offset)]
                if out.numel() and offset not in self.starts and self.reads and self.reads[-1][:2] == region:
                    self.reads[-1] = (*region, self.reads[-1][2] + out.numel())
                elif out.numel():
                    self.reads.append((*region, out.numel()))
            read(path, requests)

        def write_at(offset, data):
            self.writes.append((offset, data.numel()))
            write(offset, data)

        cache.backend.read_many, cache.file.write = read_many, write_at


def test_each_layer_prefix_is_one_read_per_part_and_new_slots_one_write(stores, tmp_path):
    ids, mask = left_padded_batch()
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        cache = DiskKVCache.allocate(m.config, 2, 32, m.dtype, "cpu", offload_dir=tmp_path)
        rec = Recorder(cache)
        L = m.config.num_layers
        slot = cache.regions[0][0].slot_bytes  # one token of K (or V), all rows
        m.executor.forward(ids, mask, cache, micro_batches=2)  # prefill 10
        cache.flush()
        # an empty prefix needs no read; the last layer primes layer 0 of the next step: K and V, slots 0..9
        assert rec.reads == [(0, 0, 10 * slot), (0, 1, 10 * slot)]
        regions = [r for regs in cache.regions for r in regs]
        assert rec.writes == [(r.offset, 10 * slot) for r in regions]  # per layer and tensor: one write
        rec.reads.clear()
        rec.writes.clear()
        m.executor.forward(ids[:, :1], mask[:, :1], cache, micro_batches=2)  # one decode step
        cache.flush()
    # layers 1..L-1 read now (layer 0 was primed), then layer 0 primed again with the new slot
    assert rec.reads == [(layer, i, 10 * slot) for layer in range(1, L) for i in (0, 1)] + [
        (0, 0, 11 * slot), (0, 1, 11 * slot)]
    assert rec.writes == [(r.offset + 10 * slot, slot) for r in regions]
    cache.close()


def o_direct_works(directory) -> bool:
    path = os.path.join(directory, "probe")
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def test_prefix_reads_bypass_the_page_cache_up_to_the_last_partial_page(stores, tmp_path):
    """Each part of a layer's prefix: its whole pages in one O_DIRECT read, the partial page after them buffered."""
    if not hasattr(os, "O_DIRECT") or not o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        cache = DiskKVCache.allocate(m.config, 2, 32, m.dtype, "cpu", offload_dir=tmp_path)
        m.executor.forward(ids, torch.ones_like(ids), cache)  # prefill 20: the last layer primes layer 0
        cache.flush()
        parts = len(cache.regions[0])
        assert 20 * cache.regions[0][0].slot_bytes % 4096  # a partial page per part
        assert (cache.backend.direct_reads, cache.backend.buffered_reads) == (parts, parts)
        cache.close()


def test_a_read_prefix_leaves_the_page_cache_except_its_last_partial_page(stores, tmp_path, monkeypatch):
    """After each prefix read the file's whole pages of it are dropped (POSIX_FADV_DONTNEED), so the disk tier does
    not keep the KV cache in RAM beyond cpu_memory; the partly filled last page, extended by the next write, stays."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    dropped = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        dropped.append((fd, offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        cache = DiskKVCache.allocate(m.config, 2, 32, m.dtype, "cpu", offload_dir=tmp_path)
        m.executor.forward(ids, torch.ones_like(ids), cache)  # prefill 20: the last layer primes layer 0
        cache.flush()
        slot = cache.regions[0][0].slot_bytes
        fd = cache.file.fd
        cache.close()
    assert 20 * slot % 4096 and 20 * slot > 4096  # a whole page and a partial one per part
    assert dropped == [(fd, r.offset, 20 * slot // 4096 * 4096, os.POSIX_FADV_DONTNEED)
                       for r in cache.regions[0]]


def test_a_rolled_back_step_is_read_again(stores, tmp_path):
    ids, mask = left_padded_batch()
    with tiermem.load(stores["opt"], max_batch_size=2, max_seq_len=64) as m:
        ref_cache = KVCache.allocate(m.config, 2, 32, m.dtype)
        cache = DiskKVCache.allocate(m.config, 2, 32, m.dtype, "cpu", offload_dir=tmp_path)
        for c in (ref_cache, cache):
            m.executor.forward(ids, mask, c)
        ref = m.executor.forward(ids[:, 3:5], mask[:, 3:5], ref_cache)
        m.executor.forward(ids[:, 5:6], mask[:, 5:6], cache)  # a step that is then rolled back ...
        cache.length = 10
        out = m.executor.forward(ids[:, 3:5], mask[:, 3:5], cache)  # ... the primed layer 0 is stale now
        cache.close()
    assert torch.equal(out, ref)


def test_grow_copy_from_and_to_keep_the_filled_slots(stores, tmp_path):
    ids, mask = left_padded_batch()
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        scheme = kv_scheme("int8", m.config.head_dim)
        ref = KVCache.allocate(m.config, 2, 40, m.dtype, kv_quant=scheme)
        m.executor.forward(ids, mask, ref)
        disk = DiskKVCache.allocate(m.config, 2, 12, m.dtype, "cpu", kv_quant=scheme, offload_dir=tmp_path)
        disk.copy_from(ref)
        small = kv_files(tmp_path)
        disk.grow(40)
        assert disk.max_len == 40 and disk.length == 10 and not disk.closed
        assert len(kv_files(tmp_path)) == 1 and kv_files(tmp_path) != small  # the smaller file is gone
        a = m.executor.forward(ids[:, :3], mask[:, :3], ref)
        b = m.executor.forward(ids[:, :3], mask[:, :3], disk)
        assert torch.equal(a, b)
        assert disk.to("cpu") is disk and disk.to("meta").key_mask.device.type == "meta"
        with pytest.raises(ConfigError, match="does not fit"):
            DiskKVCache.allocate(m.config, 1, 40, m.dtype, "cpu", kv_quant=scheme, offload_dir=tmp_path).copy_from(ref)
        disk.close()
    gc.collect()
    assert kv_files(tmp_path) == []


def test_session_state_of_a_disk_cache_matches_the_device_cache(stores, tmp_path):
    assert_session_state_matches_the_device_cache(
        stores["opt"], lambda m, b, n: DiskKVCache.allocate(m.config, b, n, m.dtype, "cpu", offload_dir=tmp_path),
        DiskKVCache)


def test_the_file_is_removed_on_close_and_when_collected(tmp_path):
    from types import SimpleNamespace

    shape = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=16)
    a = DiskKVCache.allocate(shape, 2, 8, offload_dir=tmp_path)
    b = DiskKVCache.allocate(shape, 2, 8, offload_dir=tmp_path)
    names = kv_files(tmp_path)
    assert len(names) == 2 and a.file.path != b.file.path  # unique names (mkstemp), never a fixed one
    assert os.path.getsize(a.file.path) == aligned_size([2 * 2 * 8 * 16 * 4] * 6)  # 4 KiB-aligned regions
    a.close()
    a.close()  # closing twice is harmless
    assert kv_files(tmp_path) == [os.path.basename(b.file.path)]
    del b
    gc.collect()
    assert kv_files(tmp_path) == []


def test_bad_offload_dir_is_a_clear_error(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import tiermem.scratch_file as scratch

    shape = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match="does not exist"):
        DiskKVCache.allocate(shape, 1, 8, offload_dir=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        DiskKVCache.allocate(shape, 1, 8, offload_dir=tmp_path / "file")
    with pytest.raises(ConfigError, match="offload_dir"):
        DiskKVCache.allocate(shape, 1, 8, offload_dir=None)
    monkeypatch.setattr(scratch.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="not writable"):
        DiskKVCache.allocate(shape, 1, 8, offload_dir=tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(BudgetError, match="free"):
        DiskKVCache.allocate(shape, 1, 8, offload_dir=tmp_path)
    monkeypatch.undo()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scratch.os, "posix_fallocate", full)
    with pytest.raises(BudgetError, match="no room"):
        DiskKVCache.allocate(shape, 1, 8, offload_dir=tmp_path)
    assert kv_files(tmp_path) == []  # nothing left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_offload_dir_is_a_clear_error(tmp_path):
    from types import SimpleNamespace

    shape = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            DiskKVCache.allocate(shape, 1, 8, offload_dir=tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_load_checks_the_disk_kv_options(stores, tmp_path):
    with pytest.raises(ConfigError, match="pass offload_dir"):
        tiermem.load(stores["opt"], kv_placement="disk")
    with pytest.raises(ConfigError, match="kv_placement='cpu' keeps it elsewhere"):
        tiermem.load(stores["opt"], kv_placement="cpu", offload_dir=tmp_path)
    with pytest.raises(ConfigError, match="device='cuda'"):
        tiermem.load(stores["opt"], offload_dir=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        tiermem.load(stores["opt"], device="cuda", offload_dir=tmp_path / "missing")


def test_model_tracks_live_disk_caches_against_the_reservation(stores, tmp_path, monkeypatch):
    """Model.generate with KV on disk (forced here on the CPU): each generation's file is gone when it ends; a
    session holding the reservation makes another generate a BudgetError until it is dropped."""
    ids, mask = left_padded_batch()
    with tiermem.load(stores["opt"], max_batch_size=2, max_seq_len=32) as m:
        ref = m.generate(ids, 6, attention_mask=mask, eos_token_id=[])
        monkeypatch.setattr(m, "_offloads_kv", lambda: True)
        m.kv_placement, m.offload_dir = "disk", tmp_path
        assert torch.equal(m.generate(ids, 6, attention_mask=mask, eos_token_id=[]), ref)
        assert kv_files(tmp_path) == [] and all(c.closed for c in m._host_caches)
        session = GenerationSession()
        m.generate(ids, 3, attention_mask=mask, eos_token_id=[], session=session)
        assert isinstance(session.cache, DiskKVCache) and len(kv_files(tmp_path)) == 1
        with pytest.raises(BudgetError, match="disk KV cache reserved"):
            m.generate(ids, 6, attention_mask=mask, eos_token_id=[])
        assert torch.equal(m.generate(None, 3, session=session), ref[:, :16])
        del session
        gc.collect()
        assert kv_files(tmp_path) == []
        assert torch.equal(m.generate(ids, 6, attention_mask=mask, eos_token_id=[]), ref)


# ------------------------------------------------------------------------------------------------ cost model

def test_a_disk_kv_step_reads_the_prefix_and_writes_the_new_slots_on_the_disk_link():
    w = _tiny()  # 4 layers, batch 4, mean context 6 + 4 / 2 = 8, 20 KV bytes per token and layer
    kv_read, kv_write = 4 * 4 * 8 * 20, 4 * 4 * 20
    blocks = dict(resident=1000, host=2300, disk=2000, cpu_cache_compute=False, micro_batches=1)
    cpu, disk = (step_cost(w, TINY_HW, kv=kv, **blocks) for kv in ("cpu", "disk"))
    assert disk["disk"] == pytest.approx((2000 + kv_read + kv_write) / TINY_HW.disk_read_Bps, rel=1e-12)
    assert cpu["disk"] == pytest.approx(2000 / TINY_HW.disk_read_Bps, rel=1e-12)
    assert disk["pcie"] == cpu["pcie"]  # the prefix crosses PCIe either way
    assert disk["hbm"] == pytest.approx(cpu["hbm"] + 2 * kv_read / TINY_HW.hbm_Bps, rel=1e-12)  # the permute
    assert disk["compute"] == cpu["compute"]
    chosen = Plan(("layers.0",), ("layers.1", "layers.2"), ("layers.3", "head"), kv="disk", lookahead=2)
    got = predict(chosen, w, TINY_HW, per_layer_overhead_s=0.01)
    disk_s = (1000 + 1500 + kv_read + kv_write) / TINY_HW.disk_read_Bps
    assert got.breakdown["disk"] == pytest.approx(disk_s, rel=1e-12) and got.bound == "disk"
    assert got.predicted_step_s == pytest.approx(disk_s, rel=1e-12) and disk_s > 0.01 * 4  # host time hidden
    layer = w.kv_reserved_bytes // 4
    assert (got.memory["gpu_kv"], got.memory["host_kv"]) == (2 * layer + layer // 2, 2 * layer)
    assert got.memory["disk_kv"] == w.kv_reserved_bytes and "disk (offload_dir)" in "\n".join(got.describe())


@functools.lru_cache(maxsize=1)
def _every_tiny_disk_plan() -> list[Plan]:
    w = _tiny()
    return [predict(replace(p, kv="disk"), w, TINY_HW, per_layer_overhead_s=0.01)
            for p in _every_tiny_plan() if (p.kv, p.cpu_cache_compute) == ("cpu", False)]


@pytest.mark.parametrize("fixed", [{}, {"kv": "disk"}])
def test_the_planner_puts_kv_on_disk_only_when_it_may_and_exactly(fixed):
    w = _tiny()
    candidates = _every_tiny_disk_plan() + ([] if fixed else _every_tiny_plan())
    gpu_mem = np.array([p.memory["gpu"] for p in candidates])
    host_mem = np.array([p.memory["host"] for p in candidates])
    steps = np.array([p.predicted_step_s for p in candidates])
    placements = set()
    for gpu, cpu in itertools.product(range(2500, 11001, 1000), range(1000, 8001, 1000)):
        feasible = steps[(gpu_mem <= gpu) & (host_mem <= cpu)]
        if not feasible.size:
            continue
        got = plan(w, TINY_HW, gpu, cpu, per_layer_overhead_s=0.01, disk_kv=True, **fixed)
        assert got.predicted_step_s == pytest.approx(feasible.min(), rel=1e-9), (gpu, cpu, got.describe())
        placements.add(got.kv)
        try:
            assert plan(w, TINY_HW, gpu, cpu, per_layer_overhead_s=0.01).kv != "disk"  # not without disk_kv
        except BudgetError:
            placements.add("only on disk")
    assert placements >= ({"disk"} if fixed else {"gpu", "disk", "only on disk"}), placements


def test_cli_plan_with_offload_dir(tmp_path, capsys):
    from tiermem.cli import main

    hw = tmp_path / "hw.json"
    hw.write_text(H200.to_json())
    args = ["plan", "--synthetic", "opt-1.3b", "--gpu-memory", "2GiB", "--cpu-memory", "4GiB", "--hardware", str(hw),
            "--batch", "32", "--prompt-len", "1024", "--kv", "disk"]
    assert main(args) == 2 and "--offload-dir" in capsys.readouterr().err
    assert main([*args, "--offload-dir", str(tmp_path)]) == 0
    assert "KV cache on disk" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_quant", [None, "int4"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gpu_disk_cache_gives_the_logits_of_the_device_cache(stores, tmp_path, kv_quant, micro_batches):
    """CudaStagingMover: pinned staging, landing buffer, permutes on the copy stream, copies from the I/O thread."""
    from tiermem.kv_disk import CudaStagingMover

    ids, mask = longer_batch()
    with tiermem.load(stores["llama3"], device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64,
                      plan=None) as m:
        scheme = kv_scheme(kv_quant, m.config.head_dim)
        ref = teacher_forced(m, KVCache.allocate(m.config, 2, 40, m.dtype, "cuda", kv_quant=scheme), ids, mask, 10,
                             micro_batches)
        disk = DiskKVCache.allocate(m.config, 2, 40, m.dtype, "cuda", kv_quant=scheme, offload_dir=tmp_path)
        assert isinstance(disk.mover, CudaStagingMover) and disk.arena.registered
        out = teacher_forced(m, disk, ids, mask, 10, micro_batches)
        disk.close()
    assert torch.equal(out, ref)
    assert kv_files(tmp_path) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_quant", [None, "int8"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gpu_disk_kv_generates_what_kv_on_the_gpu_does(stores, tmp_path, kv_quant, micro_batches):
    ids, mask = left_padded_batch()
    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64, plan=None, kv_quant=kv_quant,
              micro_batches=micro_batches)
    with tiermem.load(stores["llama3"], kv_placement="gpu", **kw) as m:
        ref = m.generate(ids, 24, attention_mask=mask, eos_token_id=[])
    with tiermem.load(stores["llama3"], kv_placement="disk", offload_dir=tmp_path, **kw) as m:
        info = m.info()
        kv = kv_cache_bytes(m.config, 2, 64, m.dtype, m.kv_quant)
        assert info["kv_placement"] == "disk" and info["disk_kv_file_bytes"] == kv
        assert info["host_kv_reserved_bytes"] == 2 * kv // m.config.num_layers
        out = m.generate(ids, 24, attention_mask=mask, eos_token_id=[])
        assert kv_files(tmp_path) == []
        session = GenerationSession()
        m.generate(ids, 12, attention_mask=mask, eos_token_id=[], session=session)
        assert isinstance(session.cache, DiskKVCache) and len(kv_files(tmp_path)) == 1
        assert torch.equal(m.generate(None, 12, session=session), ref)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_disk_kv_keeps_pinned_host_memory_within_cpu_memory(tmp_path):
    """A cpu_memory that cannot hold the KV cache: kv_placement='cpu' is refused, 'disk' generates the tokens of KV
    on the GPU with the pinned arenas (weights, KV staging) within cpu_memory at every step."""
    from tiermem.api import load_from_reader
    from tiermem.presets import preset
    from tiermem.synthetic import SyntheticStore

    config = dict(preset("llama-1b"), hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=1024, torch_dtype="float16")
    store = SyntheticStore(config, None, torch.float16, device="cuda")
    ids = torch.randint(3, 1024, (8, 200), generator=torch.Generator().manual_seed(2))
    kw = dict(dtype=torch.float16, max_batch_size=8, max_seq_len=216, plan=None)
    cpu_memory = 16 << 20  # the KV cache is 27 MiB; two layers of it 6.75 MiB
    with pytest.raises(BudgetError, match="cpu_memory"):
        load_from_reader(store, "cuda", None, cpu_memory, kv_placement="cpu", **kw)
    with load_from_reader(store, "cuda", None, cpu_memory, kv_placement="gpu", **kw) as m:
        ref = m.generate(ids, 16, eos_token_id=[])
    with load_from_reader(store, "cuda", None, cpu_memory, kv_placement="disk", offload_dir=tmp_path, **kw) as m:
        pinned = []

        def on_step(_k: int) -> None:
            caches = [c for c in m._host_caches if not c.closed]
            assert len(caches) == 1 and caches[0].arena.registered
            pinned.append(m.source.arena.capacity + caches[0].arena.capacity)

        out = m.generate(ids, 16, eos_token_id=[], on_step=on_step)
    assert torch.equal(out, ref)
    assert len(pinned) == 16 and max(pinned) <= cpu_memory, pinned
    assert kv_files(tmp_path) == []
