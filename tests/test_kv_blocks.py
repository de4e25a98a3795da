"""KVBlockManager scenarios: pure bookkeeping, no GPU (in the style of vLLM tests/v1/kv_offload)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import BudgetError, ConfigError, TiermemError
from tiermem.kv_blocks import KVBlockManager, Move, kv_page_bytes
from tiermem.tiers import Tier

GPU, HOST, DISK = Tier.GPU, Tier.HOST, Tier.DISK


def make(gpu=4, host=4, disk=16, page_tokens=4, layers=1, page_bytes=100):
    return KVBlockManager(page_bytes, {GPU: gpu, HOST: host, DISK: disk}, page_tokens, num_layers=layers)


def run(mgr, page_ids, tier):
    """require + execute (on a simulated slot memory) + commit; returns the moves."""
    moves = mgr.require(page_ids, tier)
    execute(mgr, moves)
    mgr.commit(moves)
    return moves


def execute(mgr, moves):
    """Run `moves` one after the other on slot buffers built from the manager's slot maps.

    Fails if a move reads a slot that does not hold its page or writes a slot that holds another.
    """
    memory = {(t, s): p for t in Tier for s, p in mgr.slot_map(t).items()}
    for m in moves:
        assert memory.get((m.src, m.src_slot)) == m.page, f"{m}: source slot holds {memory.get((m.src, m.src_slot))}"
        assert (m.dst, m.dst_slot) not in memory, f"{m}: destination slot holds page {memory[(m.dst, m.dst_slot)]}"
        assert 0 <= m.dst_slot < mgr.capacity[m.dst]
        memory[(m.dst, m.dst_slot)] = memory.pop((m.src, m.src_slot))
    return memory


def check_invariants(mgr):
    where = {}
    for t in Tier:
        slots = mgr.slot_map(t)
        assert len(slots) <= mgr.capacity[t]
        assert mgr.free_slots(t) == mgr.capacity[t] - len(slots)
        assert mgr.pages_per_tier()[t] == len(slots)
        for slot, page in slots.items():
            assert 0 <= slot < mgr.capacity[t]
            assert page not in where, f"page {page} in two slots"
            where[page] = (t, slot)
    owned = []
    for seq in mgr.sequences:
        n_pages = -(-mgr.tokens(seq) // mgr.page_tokens)
        for layer in range(mgr.num_layers):
            pages = mgr.pages(seq, layer)
            assert len(pages) == n_pages
            for index, page in enumerate(pages):
                info = mgr.info(page)
                assert (info.seq_id, info.layer, info.index) == (seq, layer, index)
                assert where[page] == (info.current, info.slot)
            owned += pages
    assert sorted(owned) == sorted(where), "every page in exactly one tier, and no orphan slot"
    assert mgr.pinned <= set(owned)


def test_page_bytes_is_k_and_v_of_one_layer():
    assert kv_page_bytes(num_kv_heads=8, head_dim=128, page_tokens=16, dtype_bytes=2) == 2 * 8 * 16 * 128 * 2


def test_bad_config():
    with pytest.raises(ConfigError):
        KVBlockManager(0, {GPU: 1}, 4)
    with pytest.raises(ConfigError):
        KVBlockManager(10, {GPU: -1}, 4)


def test_growth_allocates_pages_across_boundaries():
    mgr = make(page_tokens=4, layers=2)
    assert mgr.append_tokens("a", 3) == [0, 1]  # page 0 of layers 0 and 1
    assert mgr.append_tokens("a", 1) == []  # token 4 still fits page 0
    assert mgr.append_tokens("a", 1) == [2, 3]  # token 5 opens page 1
    assert mgr.append_tokens("a", 8) == [4, 5, 6, 7]  # tokens 6..13: pages 2 and 3
    assert mgr.tokens("a") == 13
    assert mgr.pages("a", 0) == [0, 2, 4, 6] and mgr.pages("a", 1) == [1, 3, 5, 7]
    assert [mgr.info(p).index for p in mgr.pages("a", 1)] == [0, 1, 2, 3]
    # fastest tier first: 4 GPU slots, then host; nothing moved
    assert [mgr.info(p).current for p in range(8)] == [GPU] * 4 + [HOST] * 4
    assert mgr.info(5).home is HOST and mgr.info(5).slot == 1
    assert mgr.stats.moves == {}
    check_invariants(mgr)


def test_append_without_room_raises_and_changes_nothing():
    mgr = make(gpu=1, host=1, disk=1)
    mgr.append_tokens("a", 8)
    with pytest.raises(BudgetError, match="free slots"):
        mgr.append_tokens("a", 8)
    assert mgr.tokens("a") == 8 and len(mgr.pages("a", 0)) == 2
    check_invariants(mgr)


def test_eviction_when_gpu_full_follows_lru():
    mgr = make(gpu=3, host=8, page_tokens=1)
    mgr.append_tokens("a", 3)  # pages 0, 1, 2 on GPU, allocated (= used) in that order
    mgr.append_tokens("b", 3)  # pages 3, 4, 5 on host
    run(mgr, [1], GPU)  # use 1: LRU order on GPU is now 0, 2, 1
    moves = run(mgr, [3], GPU)
    assert moves == [Move(0, GPU, HOST, 0, 3, eviction=True), Move(3, HOST, GPU, 0, 0)]
    moves = run(mgr, [4, 5], GPU)
    assert [(m.page, m.eviction) for m in moves] == [(2, True), (4, False), (1, True), (5, False)]
    assert {mgr.info(p).current for p in (3, 4, 5)} == {GPU}
    assert mgr.stats.evictions == 3
    assert mgr.stats.bytes_moved == {(GPU, HOST): 300, (HOST, GPU): 300}
    check_invariants(mgr)


def test_reload_of_an_evicted_page():
    mgr = make(gpu=1, host=4, page_tokens=1)
    mgr.append_tokens("a", 2)  # page 0 GPU slot 0, page 1 host slot 0
    assert run(mgr, [1], GPU) == [Move(0, GPU, HOST, 0, 1, True), Move(1, HOST, GPU, 0, 0)]
    assert run(mgr, [0], GPU) == [Move(1, GPU, HOST, 0, 0, True), Move(0, HOST, GPU, 1, 0)]
    assert mgr.info(0).current is GPU and mgr.info(1).current is HOST
    assert run(mgr, [0], GPU) == []  # already there
    check_invariants(mgr)


def test_eviction_cascades_to_disk_and_listed_first():
    mgr = make(gpu=1, host=1, disk=4, page_tokens=1)
    mgr.append_tokens("a", 3)  # 0 GPU, 1 host, 2 disk
    moves = run(mgr, [2], GPU)
    # the host page goes to disk first, then the GPU page takes its host slot, then 2 takes the GPU slot
    assert moves == [Move(1, HOST, DISK, 0, 1, True), Move(0, GPU, HOST, 0, 0, True), Move(2, DISK, GPU, 0, 0)]
    assert mgr.stats.bytes_moved == {(HOST, DISK): 100, (GPU, HOST): 100, (DISK, GPU): 100}
    check_invariants(mgr)


def test_eviction_skips_a_full_tier_that_cannot_make_room():
    mgr = make(gpu=1, host=1, disk=4, page_tokens=1)
    mgr.append_tokens("a", 3)  # 0 GPU, 1 host, 2 disk
    mgr.pin([1])
    assert run(mgr, [2], GPU) == [Move(0, GPU, DISK, 0, 1, True), Move(2, DISK, GPU, 0, 0)]


def test_ordering_eviction_precedes_the_load_into_its_slot():
    mgr = make(gpu=4, host=8, disk=16, page_tokens=1, layers=2)
    mgr.append_tokens("a", 10)
    run(mgr, mgr.pages("a", 1)[:4], GPU)
    moves = mgr.require(mgr.pages("a", 0)[4:8], GPU)
    execute(mgr, moves)  # asserts that no move writes a slot still holding another page
    for i, m in enumerate(moves):
        if not m.eviction and m.dst is GPU:
            leaving = [e for e in moves[:i] if e.src is GPU and e.src_slot == m.dst_slot]
            assert leaving, f"{m} loads into a slot that nobody left"
    mgr.commit(moves)
    check_invariants(mgr)


def test_pinned_pages_are_never_evicted():
    mgr = make(gpu=2, host=8, page_tokens=1)
    mgr.append_tokens("a", 6)  # 0, 1 on GPU
    mgr.pin([0])
    for page in (2, 3, 4, 5):
        moves = run(mgr, [page], GPU)
        assert all(m.page != 0 for m in moves)
    assert mgr.info(0).current is GPU
    assert sorted(mgr.slot_map(GPU).values()) == [0, 5]
    with pytest.raises(BudgetError, match="1 pinned, 2 in the current require set"):
        mgr.require([2, 3], GPU)  # 5 makes room for 2, then only pinned 0 and protected 2 are left
    mgr.unpin([0])
    evict = run(mgr, [2], GPU)[0]
    assert (evict.page, evict.src, evict.dst, evict.eviction) == (0, GPU, HOST, True)
    check_invariants(mgr)


def test_pinned_gpu_full_raises_budget_error():
    mgr = make(gpu=2, host=8, page_tokens=1)
    mgr.append_tokens("a", 3)
    mgr.pin([0, 1])
    with pytest.raises(BudgetError, match="2 pinned"):
        mgr.require([2], GPU)
    run(mgr, [], GPU)  # the failed require left no pending plan behind
    check_invariants(mgr)


def test_free_returns_all_slots_in_every_tier():
    mgr = make(gpu=2, host=2, disk=2, page_tokens=2, layers=2)
    mgr.append_tokens("a", 3)  # 4 pages: GPU, GPU, host, host
    mgr.append_tokens("b", 1)  # 2 pages on disk
    mgr.pin(mgr.pages("a", 0))
    mgr.free("a")
    assert mgr.pages_per_tier() == {GPU: 0, HOST: 0, DISK: 2}
    assert mgr.pinned == frozenset() and mgr.sequences == ["b"]
    with pytest.raises(KeyError):
        mgr.pages("a", 0)
    assert {mgr.info(p).current for p in mgr.append_tokens("c", 4)} == {GPU, HOST}
    check_invariants(mgr)


def test_require_set_larger_than_tier():
    mgr = make(gpu=2, host=8, page_tokens=1)
    mgr.append_tokens("a", 3)
    with pytest.raises(BudgetError, match="3 KV pages are required in gpu at once but it holds 2"):
        mgr.require([0, 1, 2], GPU)


def test_protocol_require_commit_discard():
    mgr = make(gpu=1, host=2, page_tokens=1)
    mgr.append_tokens("a", 2)
    moves = mgr.require([1], GPU)
    assert mgr.info(1).current is HOST  # require only plans
    for call in (lambda: mgr.require([0], GPU), lambda: mgr.append_tokens("a", 1), lambda: mgr.free("a")):
        with pytest.raises(TiermemError, match="pending"):
            call()
    with pytest.raises(TiermemError, match="other than"):
        mgr.commit(moves[:1])
    mgr.discard()
    with pytest.raises(TiermemError, match="without a pending"):
        mgr.commit(moves)
    assert mgr.info(1).current is HOST and mgr.stats.moves == {}
    check_invariants(mgr)


# ---- randomized ----------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 3), st.integers(0, 12)),
        st.tuples(st.just("require"), st.lists(st.integers(0, 40), min_size=1, max_size=6),
                  st.sampled_from([GPU, GPU, HOST, DISK]), st.sampled_from([True, True, True, False])),
        st.tuples(st.just("require"), st.lists(st.integers(0, 40), min_size=1, max_size=3),
                  st.just(GPU), st.just(True)),
        st.tuples(st.just("free"), st.integers(0, 3)),
        st.tuples(st.just("pin"), st.lists(st.integers(0, 40), max_size=2)),
        st.tuples(st.just("unpin"), st.lists(st.integers(0, 40), max_size=3)),
    ),
    min_size=3,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5), st.integers(0, 6), st.integers(0, 10), st.integers(1, 3), st.integers(1, 4), ops)
def test_random_operations_keep_invariants(gpu, host, disk, page_tokens, layers, program):
    random_program(gpu, host, disk, page_tokens, layers, program, {"refused": 0, "evictions": 0, "cascades": 0})


def random_program(gpu, host, disk, page_tokens, layers, program, stats):
    mgr = KVBlockManager(64, {GPU: gpu, HOST: host, DISK: disk}, page_tokens, num_layers=layers)
    traffic = 0
    for op in program:
        live = [p for s in mgr.sequences for layer in range(layers) for p in mgr.pages(s, layer)]
        if op[0] == "append":
            try:
                mgr.append_tokens(op[1], op[2])
            except BudgetError:
                pass
        elif op[0] == "require" and live:
            wanted = [live[i % len(live)] for i in op[1]]
            tier, do_commit = op[2], op[3]
            before = {t: mgr.slot_map(t) for t in Tier}
            try:
                moves = mgr.require(wanted, tier)
            except BudgetError:
                moves = None
            assert before == {t: mgr.slot_map(t) for t in Tier}, "require changed the placement"
            memory = execute(mgr, moves or [])
            if moves is None:
                stats["refused"] += 1
            elif do_commit:
                stats["evictions"] += sum(m.eviction for m in moves)
                stats["cascades"] += any(m.eviction and m.dst is DISK and m.src is HOST for m in moves)
                mgr.commit(moves)
                traffic += 64 * len(moves)
                assert {p: (t, s) for (t, s), p in memory.items()} == {
                    p: (mgr.info(p).current, mgr.info(p).slot) for p in live}
                assert all(mgr.info(p).current is tier for p in wanted)
                assert not any(m.eviction and m.page in set(wanted) | mgr.pinned for m in moves)
            else:
                mgr.discard()
        elif op[0] == "free" and op[1] in mgr.sequences:
            mgr.free(op[1])
        elif op[0] in ("pin", "unpin") and live:
            getattr(mgr, op[0])([live[i % len(live)] for i in op[1]])
        check_invariants(mgr)
    assert sum(mgr.stats.bytes_moved.values()) == traffic
