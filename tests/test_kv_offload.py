"""HostKVCache: the KV cache in host memory with two layers of compute-side buffers (tiermem.kv_offload).

On the CPU the copies are plain tensor copies (SyncMover), so these tests check the bookkeeping:
which layer's prefix is in which buffer, prefetch order, new slots written back, roll-backs,
micro-batches, quantized storage, sessions. The CUDA copies (stream, events, 2-D memcpy) are
checked by the GPU tests at the end.
"""

import pytest
import torch
from hf_models import left_padded_batch, longer_batch, packed_stores, teacher_forced

import tiermem
from tiermem import GenerationSession
from tiermem.engine.kv_cache import KVCache
from tiermem.errors import BudgetError, ConfigError
from tiermem.kernels.kv_quant import kv_scheme
from tiermem.kv_offload import HostKVCache, SyncMover
from tiermem.placement import kv_cache_bytes


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return packed_stores(tmp_path_factory.mktemp("kv-offload"), ("llama3", "opt", "phi3-longrope", "gemma2"))


class CountingMover(SyncMover):
    """SyncMover that records what is copied: (direction, layer tensor id, rows, start, end)."""

    def __init__(self, host_ids: set[int]):
        self.host_ids = host_ids
        self.log: list[tuple[str, int, int, int]] = []

    def copy_slots(self, dst, src, rows, start, end):
        direction = "to_host" if id(dst) in self.host_ids else "to_device"
        self.log.append((direction, rows.stop - rows.start, start, end))
        super().copy_slots(dst, src, rows, start, end)


@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_a_host_cache_generates_what_the_device_cache_does_through_a_longrope_rerun(stores, kv_quant):
    """LongRoPE's generate runs the whole sequence again once it passes the original length (16 here): a host
    cache whose length goes back to 0 mid-generation, with its layer prefetches in flight."""
    from tiermem.engine.generate import generate

    ids, mask = left_padded_batch()
    with tiermem.load(stores["phi3-longrope"], max_batch_size=2, max_seq_len=64) as m:
        scheme = kv_scheme(kv_quant, m.config.head_dim)
        ref = generate(m.executor, ids, 20, attention_mask=mask,
                       cache=KVCache.allocate(m.config, 2, 40, m.dtype, kv_quant=scheme))
        host = HostKVCache.allocate(m.config, 2, 40, m.dtype, "cpu", kv_quant=scheme)
        out = generate(m.executor, ids, 20, attention_mask=mask, cache=host)
    assert out.shape == (2, 30) and torch.equal(out, ref) and host.length == 29


@pytest.mark.parametrize("variant", ["llama3", "opt", "gemma2"])
@pytest.mark.parametrize("kv_quant", [None, "int8", "int4"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_host_cache_gives_the_logits_of_the_device_cache(stores, variant, kv_quant, micro_batches):
    ids, mask = longer_batch()
    with tiermem.load(stores[variant], max_batch_size=2, max_seq_len=64) as m:
        scheme = kv_scheme(kv_quant, m.config.head_dim)
        ref = teacher_forced(m, KVCache.allocate(m.config, 2, 40, m.dtype, kv_quant=scheme), ids, mask, 10,
                             micro_batches)
        host = HostKVCache.allocate(m.config, 2, 40, m.dtype, "cpu", kv_quant=scheme)
        out = teacher_forced(m, host, ids, mask, 10, micro_batches)
    assert torch.equal(out, ref)
    assert host.length == ids.shape[1] and host.nbytes == kv_cache_bytes(m.config, 2, 40, m.dtype, scheme)


@pytest.mark.parametrize("variant", ["llama3", "opt", "gemma2"])
@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_cpu_attention_gives_the_logits_of_the_device_cache(stores, variant, kv_quant):
    """cpu_attention: attention computed on the host over the host K/V (FlexGen's cpu_cache_compute); Gemma 2's
    scores soft-capped there too."""
    ids, mask = left_padded_batch()
    with tiermem.load(stores[variant], max_batch_size=2, max_seq_len=64) as m:
        scheme = kv_scheme(kv_quant, m.config.head_dim)
        ref = teacher_forced(m, KVCache.allocate(m.config, 2, 20, m.dtype, kv_quant=scheme), ids, mask, 6, 2)
        host = HostKVCache.allocate(m.config, 2, 20, m.dtype, "cpu", kv_quant=scheme, cpu_attention=True)
        assert host.buffers == [] and host.cpu_attention
        out = teacher_forced(m, host, ids, mask, 6, 2)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), float((out - ref).abs().max())


def test_cpu_attention_is_a_gpu_path_option(stores):
    with pytest.raises(ConfigError, match="GPU path"):
        tiermem.load(stores["opt"], cpu_attention=True)


def test_each_layer_prefix_is_fetched_once_per_step_and_only_new_slots_go_back(stores):
    ids, mask = left_padded_batch()
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        cache = HostKVCache.allocate(m.config, 2, 32, m.dtype, "cpu")
        host_ids = {id(t) for t in (*cache.keys, *cache.values)}
        cache.mover = mover = CountingMover(host_ids)
        L = m.config.num_layers
        m.executor.forward(ids, mask, cache, micro_batches=2)  # prefill 10
        prefill = list(mover.log)
        mover.log.clear()
        m.executor.forward(ids[:, :1], mask[:, :1], cache, micro_batches=2)  # one decode step
    fetched = [e for e in prefill if e[0] == "to_device"]
    # prefill: an empty prefix (K and V) of each layer, then layer 0 primed for the next step (slots 0..9)
    assert [e[1:] for e in fetched] == [(2, 0, 0)] * 2 * L + [(2, 0, 10)] * 2
    back = [e for e in prefill if e[0] == "to_host"]
    assert len(back) == 2 * 2 * L and all((rows, s, e) == (1, 0, 10) for _, rows, s, e in back)
    step = mover.log
    fetched = [e for e in step if e[0] == "to_device"]
    # layer 0 was primed by the prefill's last layer; this step fetches layers 1..L-1 and primes layer 0
    assert len(fetched) == 2 * L and all((rows, s, e) == (2, 0, 10) for _, rows, s, e in fetched[:-2])
    assert fetched[-1][2:] == (0, 11)
    back = [e for e in step if e[0] == "to_host"]
    assert len(back) == 2 * 2 * L and all((rows, s, e) == (1, 10, 11) for _, rows, s, e in back)


class LayerLog(SyncMover):
    """SyncMover that records each copy as (direction, layer, GPU buffer, end slot), K copies only."""

    def __init__(self, cache: HostKVCache):
        self.layer_of = {id(k): layer for layer, k in enumerate(cache.keys)}
        self.buffer_of = {id(k): b for b, (k, _v) in enumerate(cache.buffers)}
        self.log: list[tuple[str, int, int, int]] = []

    def copy_slots(self, dst, src, rows, start, end):
        if id(src) in self.layer_of:
            self.log.append(("in", self.layer_of[id(src)], self.buffer_of[id(dst)], end))
        elif id(dst) in self.layer_of:
            self.log.append(("back", self.layer_of[id(dst)], self.buffer_of[id(src)], end))
        super().copy_slots(dst, src, rows, start, end)


def test_the_two_gpu_buffers_evict_reload_and_write_back_in_order():
    """The KV blocks of a host cache are its layers; two GPU buffers hold the layers in flight. Over two decode
    steps of a 4-layer model: eviction (each fetch takes the buffer the layer before last used), reload (every layer
    comes back once a step, one slot longer), ordering (a buffer is fetched into only after the new slots of the
    layer it held went back to the host, and every layer's went back)."""
    from tiermem.api import load_from_reader
    from tiermem.presets import preset
    from tiermem.synthetic import SyntheticStore

    ids, mask = left_padded_batch()
    store = SyntheticStore(preset("tiny-llama"), None, torch.float32)
    with load_from_reader(store, "cpu", None, None, dtype=torch.float32, max_batch_size=2, max_seq_len=64) as m:
        L = m.config.num_layers
        cache = HostKVCache.allocate(m.config, 2, 32, m.dtype, "cpu")
        m.executor.forward(ids, mask, cache)  # prefill 10 tokens
        cache.mover = mover = LayerLog(cache)
        for t in range(2):
            m.executor.forward(ids[:, t:t + 1], mask[:, t:t + 1], cache)
    assert L == 4
    fetched = [(layer, buffer, end) for kind, layer, buffer, end in mover.log if kind == "in"]
    # layer 0 was primed at the end of the prefill; each step fetches layers 1..L-1, then primes layer 0
    assert [f[0] for f in fetched] == [*range(1, L), 0] * 2
    buffers = [f[1] for f in fetched]
    assert all(a != b for a, b in zip(buffers, buffers[1:], strict=False))  # alternating: j + 2 evicts layer j
    assert [f[2] for f in fetched] == [10] * (L - 1) + [11] + [11] * (L - 1) + [12]  # reload, one slot longer
    held = {1 - fetched[0][1]: 0}  # GPU buffer -> layer whose new slots it holds (layer 0 was primed there)
    for kind, layer, buffer, _end in mover.log:
        if kind == "in":
            assert buffer not in held, f"buffer {buffer} fetched into before layer {held[buffer]} went back"
            held[buffer] = layer
        else:
            assert held.pop(buffer) == layer
    backs = [layer for kind, layer, _b, _e in mover.log if kind == "back"]
    assert sorted(backs) == sorted(list(range(L)) * 2)


def test_a_rolled_back_step_is_fetched_again(stores):
    ids, mask = left_padded_batch()
    with tiermem.load(stores["opt"], max_batch_size=2, max_seq_len=64) as m:
        ref_cache = KVCache.allocate(m.config, 2, 32, m.dtype)
        cache = HostKVCache.allocate(m.config, 2, 32, m.dtype, "cpu")
        for c in (ref_cache, cache):
            m.executor.forward(ids, mask, c)
        ref = m.executor.forward(ids[:, 3:5], mask[:, 3:5], ref_cache)
        m.executor.forward(ids[:, 5:6], mask[:, 5:6], cache)  # a step that is then rolled back ...
        cache.length = 10
        out = m.executor.forward(ids[:, 3:5], mask[:, 3:5], cache)  # ... the primed layer 0 is stale now
    assert torch.equal(out, ref)


def test_micro_batches_must_start_at_row_zero(stores):
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        cache = HostKVCache.allocate(m.config, 2, 16, m.dtype, "cpu")
        k = torch.zeros(1, m.config.num_kv_heads, 1, m.config.head_dim)
        cache.begin_step(torch.ones(2, 1))
        with pytest.raises(ConfigError, match="row 0"):
            cache.update(0, slice(1, 2), k, k)


def test_grow_copy_from_and_to_keep_the_filled_slots(stores):
    ids, mask = left_padded_batch()
    with tiermem.load(stores["llama3"], max_batch_size=2, max_seq_len=64) as m:
        scheme = kv_scheme("int8", m.config.head_dim)
        ref = KVCache.allocate(m.config, 2, 40, m.dtype, kv_quant=scheme)
        m.executor.forward(ids, mask, ref)
        host = HostKVCache.allocate(m.config, 2, 12, m.dtype, "cpu", kv_quant=scheme)
        host.copy_from(ref)
        host.grow(40)
        assert host.max_len == 40 and host.length == 10
        a = m.executor.forward(ids[:, :3], mask[:, :3], ref)
        b = m.executor.forward(ids[:, :3], mask[:, :3], host)
        assert torch.equal(a, b)
        assert host.to("cpu") is host and host.to("meta").key_mask.device.type == "meta"
        with pytest.raises(ConfigError, match="does not fit"):
            HostKVCache.allocate(m.config, 1, 40, m.dtype, "cpu", kv_quant=scheme).copy_from(ref)


def assert_session_state_matches_the_device_cache(store, allocate, cache_class) -> None:
    """A session generated with caches from allocate(m, batch, max_len) (what Model.generate makes on CUDA for an
    offloaded KV cache, here on the CPU) saves the same state as one with the dense device cache."""
    ids, mask = left_padded_batch()
    states = []
    with tiermem.load(store, max_batch_size=2, max_seq_len=64) as m:
        for offload in (False, True):
            session = GenerationSession()
            if offload:
                m._new_cache = lambda b, n: allocate(m, b, n)
            m.generate(ids, 6, attention_mask=mask, eos_token_id=[], session=session)
            assert isinstance(session.cache, cache_class) == offload
            states.append(session.state_dict())
    dense, offloaded = states
    assert torch.equal(dense["tokens"], offloaded["tokens"])
    for a, b in zip(dense["kv"]["keys"] + dense["kv"]["values"],
                    offloaded["kv"]["keys"] + offloaded["kv"]["values"], strict=True):
        assert torch.equal(a, b)


def test_session_state_of_a_host_cache_matches_the_device_cache(stores):
    assert_session_state_matches_the_device_cache(
        stores["opt"], lambda m, b, n: HostKVCache.allocate(m.config, b, n, m.dtype, "cpu"), HostKVCache)


def test_model_tracks_live_host_caches_against_the_reservation(stores, monkeypatch):
    """Model.generate with offloaded KV (forced here on the CPU): a session holding the reserved host KV
    makes another generate a BudgetError until it is dropped; a plain generate frees its cache."""
    ids, mask = left_padded_batch()
    with tiermem.load(stores["opt"], max_batch_size=2, max_seq_len=32) as m:
        ref = m.generate(ids, 6, attention_mask=mask, eos_token_id=[])
        monkeypatch.setattr(m, "_offloads_kv", lambda: True)
        assert torch.equal(m.generate(ids, 6, attention_mask=mask, eos_token_id=[]), ref)
        assert all(c.closed for c in m._host_caches)
        session = GenerationSession()
        m.generate(ids, 3, attention_mask=mask, eos_token_id=[], session=session)
        assert isinstance(session.cache, HostKVCache) and session.cache.max_len == 32
        with pytest.raises(BudgetError, match="sessions"):
            m.generate(ids, 6, attention_mask=mask, eos_token_id=[])
        assert torch.equal(m.generate(None, 3, session=session), ref[:, :16])
        del session
        assert torch.equal(m.generate(ids, 6, attention_mask=mask, eos_token_id=[]), ref)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.parametrize("kv_quant", [None, "int8"])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kv_offload_generates_what_kv_on_the_gpu_does(stores, kv_quant, micro_batches):
    ids, mask = left_padded_batch()
    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64, plan=None, kv_quant=kv_quant,
              micro_batches=micro_batches)
    with tiermem.load(stores["llama3"], kv_placement="gpu", **kw) as m:
        ref = m.generate(ids, 24, attention_mask=mask, eos_token_id=[])
        ref_logits = teacher_forced(m, m._new_cache(2, 64), ref, torch.cat(
            [mask, torch.ones(2, 24, dtype=mask.dtype)], 1), 10, micro_batches)
    with tiermem.load(stores["llama3"], kv_placement="cpu", **kw) as m:
        assert m.info()["kv_placement"] == "cpu" and m.info()["host_kv_reserved_bytes"] > 0
        out = m.generate(ids, 24, attention_mask=mask, eos_token_id=[])
        cache = m._new_cache(2, 64)
        host_part = cache.keys[0].codes if kv_quant else cache.keys[0]
        assert isinstance(cache, HostKVCache) and host_part.device.type == "cpu" and cache.arena.registered
        logits = teacher_forced(m, cache, ref, torch.cat([mask, torch.ones(2, 24, dtype=mask.dtype)], 1), 10,
                                micro_batches)
        cache.close()
    assert torch.equal(out, ref)
    assert torch.equal(logits, ref_logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_gpu_kv_offload_reuses_its_pinned_memory_from_one_generation_to_the_next(stores, tmp_path, where):
    """The second generation of the same batch takes the arena the first one registered (its host KV, or the disk
    tier's staging), and gives the same tokens; closing the model releases it."""
    ids, mask = left_padded_batch()
    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64, plan=None, kv_placement=where,
              **({"offload_dir": tmp_path} if where == "disk" else {}))
    with tiermem.load(stores["llama3"], **kw) as m:
        first = m.generate(ids, 8, attention_mask=mask, eos_token_id=[])
        (kept,) = m._kv_arenas._kept
        assert kept.registered
        second = m.generate(ids, 8, attention_mask=mask, eos_token_id=[])
        assert m._kv_arenas._kept == [kept] and not kept.closed
    assert kept.closed and not kept.registered
    assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kv_offload_keeps_kv_off_the_gpu_and_within_the_reservation():
    from tiermem.api import load_from_reader
    from tiermem.presets import preset
    from tiermem.synthetic import SyntheticStore

    config = dict(preset("llama-1b"), hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=1024, torch_dtype="float16")
    store = SyntheticStore(config, None, torch.float16, device="cuda")
    ids = torch.randint(3, 1024, (8, 200), generator=torch.Generator().manual_seed(2))  # 200 + 16 = max_seq_len
    kw = dict(dtype=torch.float16, max_batch_size=8, max_seq_len=216, plan=None, resident_weights=None)
    torch.cuda.empty_cache()
    peaks = {}
    for where in ("gpu", "cpu"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        m = load_from_reader(store, "cuda", None, None, kv_placement=where, **kw)
        try:
            # 8 layers: the GPU keeps 2 of them (generate's KV on the GPU is T + new = max_seq_len long here too;
            # the host cache and its GPU buffers always span max_seq_len)
            kv = kv_cache_bytes(m.config, 8, 216, torch.float16)
            m.generate(ids, 16, eos_token_id=[])
            peaks[where] = torch.cuda.max_memory_allocated() - base
            info = m.info()
            if where == "cpu":
                assert info["host_kv_reserved_bytes"] == kv and info["gpu_kv_reserved_bytes"] == 2 * kv // 8
                session = GenerationSession()
                m.generate(ids, 4, eos_token_id=[], session=session)
                with pytest.raises(BudgetError, match="sessions"):
                    m.generate(ids, 4, eos_token_id=[])  # the session holds the whole reservation
                del session
                m.generate(ids, 4, eos_token_id=[])
        finally:
            m.close()
    assert peaks["gpu"] - peaks["cpu"] > 0.6 * kv, {k: v / 2**20 for k, v in peaks.items()}


def test_aligned_size_is_what_takes_of_those_sizes_need():
    """The host KV arena holds many tensors, each 4 KiB aligned: sized by their sum it overflowed (int4 KV)."""
    from tiermem.pinned import PinnedArena, aligned_size

    sizes = [265216, 4100, 1, 8192, 12345]
    with PinnedArena(aligned_size(sizes)) as arena:
        assert arena.registered == torch.cuda.is_available()
        for n in sizes:
            assert arena.take(n).numel() == n
    with PinnedArena(sum(sizes)) as arena, pytest.raises(BudgetError):
        for n in sizes:
            arena.take(n)


def test_arena_pool_hands_back_a_kept_arena_of_the_same_size_and_releases_the_rest():
    """Registering host memory took 1.3-1.7 s per 4.3 GB on the GPU machine: the pool keeps a closed cache's arena for
    the next cache of that size; any other size releases what is kept before registering anew."""
    from tiermem.pinned import ALIGN, ArenaPool

    pool = ArenaPool()
    first = pool.get(3 * ALIGN + 5)
    first.take(2 * ALIGN)
    pool.put(first)
    assert pool.kept_bytes == 4 * ALIGN
    again = pool.get(4 * ALIGN)  # the same capacity after rounding
    assert again is first and again.used == 0 and pool.kept_bytes == 0
    pool.put(again)
    other = pool.get(ALIGN)
    assert other is not first and first.closed and not other.closed and pool.kept_bytes == 0
    pool.put(other)
    pool.close()
    assert other.closed and pool.kept_bytes == 0
    late = pool.get(ALIGN)
    pool.put(late)  # put back after close: released, not kept
    assert late.closed and pool.kept_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_quant", [None, "int8"])
def test_gpu_cpu_attention_generates_what_kv_on_the_gpu_does(stores, kv_quant):
    """cpu_attention on the GPU path: K/V stay in host memory, attention runs there in fp32, no GPU KV buffers."""
    ids, mask = left_padded_batch()
    kw = dict(device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64, plan=None, kv_quant=kv_quant)
    with tiermem.load(stores["llama3"], kv_placement="gpu", **kw) as m:
        ref = m.generate(ids, 16, attention_mask=mask, eos_token_id=[])
    with tiermem.load(stores["llama3"], kv_placement="cpu", cpu_attention=True, **kw) as m:
        info = m.info()
        assert info["cpu_attention"] and info["gpu_kv_reserved_bytes"] == 0
        out = m.generate(ids, 16, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, ref)
