"""Paged KV cache bookkeeping: which tier and slot holds each KV page (no bytes are moved here).

A **page** is the K and V of `page_tokens` consecutive tokens of one sequence for ONE layer. Per
layer, because the executor streams layers one at a time: attention of layer j reads only layer j's
pages, so the GPU needs to hold the pages of the layers in flight (lookahead + 1), not of all
layers, and a page is one contiguous [Hkv, page_tokens, Dh] slab of K and of V, like the per-layer
tensors of `engine.kv_cache` (see `kv_page_bytes`).

Each tier holds `capacity[tier]` pages in slots 0 .. capacity-1 (the caller's buffer of that tier is
addressed by slot). A page is in exactly one tier and slot at a time (placement is exclusive: a move
frees its source slot). New pages take a slot in the fastest tier with a free one; that tier is
their `home` (a label for the planner: nothing here depends on it).

The protocol, vLLM kv_offload style (plan as data, caller moves bytes, then commit)::

    moves = mgr.require(mgr.pages(seq, layer), Tier.GPU)   # plan only: the state is unchanged
    for m in moves: copy bytes (m.src, m.src_slot) -> (m.dst, m.dst_slot)   # in list order
    mgr.commit(moves)                                      # or mgr.discard() if the copies failed

Between `require` and `commit`/`discard` no other `require`, `append_tokens` or `free` is accepted.

Eviction policy: to make room in a full tier, the least recently used page there (use = being in a
committed `require` set, or being allocated) is moved to the next slower tier; if that tier is full
too it first makes room the same way (so colder pages sink further down and each slower tier keeps
the hotter of its pages); if it cannot (nothing evictable there), the next slower tier is tried.
Pages in the current `require` set and pinned pages are never evicted. If nothing can be evicted,
`require` raises BudgetError. Moves are listed in an order that is safe to run one after the other:
every move's destination slot is free once the moves before it have run (a page evicted from a slot
is listed before the page that is loaded into that slot), and no slot ever holds two pages.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from tiermem.errors import BudgetError, ConfigError, TiermemError
from tiermem.tiers import Tier

_FASTEST_FIRST = (Tier.GPU, Tier.HOST, Tier.DISK)


def kv_page_bytes(num_kv_heads: int, head_dim: int, page_tokens: int, dtype_bytes: int) -> int:
    """Bytes of one page: K and V [Hkv, page_tokens, Dh] of one layer."""
    return 2 * num_kv_heads * page_tokens * head_dim * dtype_bytes


@dataclass(frozen=True)
class Move:
    """Copy page `page` from slot `src_slot` of tier `src` to slot `dst_slot` of tier `dst`."""

    page: int
    src: Tier
    dst: Tier
    src_slot: int
    dst_slot: int
    eviction: bool = False  # made to free room, not asked for by require


@dataclass(frozen=True)
class PageInfo:
    """Where one page is: sequence, layer, position (page number in the sequence), tiers and slot."""

    page: int
    seq_id: object
    layer: int
    index: int
    home: Tier
    current: Tier
    slot: int
    last_use: int


@dataclass
class KVStats:
    """Committed traffic: bytes and moves per (src, dst) link, and how many moves were evictions."""

    bytes_moved: dict[tuple[Tier, Tier], int] = field(default_factory=dict)
    moves: dict[tuple[Tier, Tier], int] = field(default_factory=dict)
    evictions: int = 0


@dataclass
class _Page:
    seq_id: object
    layer: int
    index: int
    home: Tier
    tier: Tier
    slot: int
    last_use: int


@dataclass
class _Plan:
    moves: list[Move]
    touch: list[int]


class KVBlockManager:
    """Pages of growing sequences over the GPU, HOST and DISK tiers; see the module docstring."""

    def __init__(self, page_bytes: int, capacity: dict[Tier, int], page_tokens: int, num_layers: int = 1) -> None:
        if page_bytes < 1 or page_tokens < 1 or num_layers < 1:
            raise ConfigError(f"page_bytes, page_tokens and num_layers must be >= 1, got "
                              f"{page_bytes}, {page_tokens} and {num_layers}")
        if any(not isinstance(t, Tier) or n < 0 for t, n in capacity.items()):
            raise ConfigError(f"capacity must map Tier to a number of pages >= 0, got {capacity!r}")
        self.page_bytes = page_bytes
        self.page_tokens = page_tokens
        self.num_layers = num_layers
        self.capacity = {t: int(capacity.get(t, 0)) for t in Tier}
        self.stats = KVStats()
        self._owner: dict[Tier, dict[int, int]] = {t: {} for t in Tier}  # slot -> page
        self._free_heap: dict[Tier, list[int]] = {t: [] for t in Tier}  # freed slots (may hold stale entries)
        self._next_unused = {t: 0 for t in Tier}  # every slot >= this one is free
        self._pages: dict[int, _Page] = {}
        self._seq_tokens: dict[object, int] = {}
        self._seq_pages: dict[object, list[list[int]]] = {}  # per layer, in token order
        self._pinned: set[int] = set()
        self._next_page = 0
        self._clock = 0
        self._pending: _Plan | None = None

    # ---- queries -------------------------------------------------------------------------------

    def pages(self, seq_id: object, layer: int) -> list[int]:
        """Page ids of `seq_id` for `layer`, in token order."""
        return list(self._seq(seq_id)[layer])

    def tokens(self, seq_id: object) -> int:
        self._seq(seq_id)
        return self._seq_tokens[seq_id]

    @property
    def sequences(self) -> list[object]:
        return list(self._seq_pages)

    def info(self, page: int) -> PageInfo:
        p = self._page(page)
        return PageInfo(page, p.seq_id, p.layer, p.index, p.home, p.tier, p.slot, p.last_use)

    def slot_map(self, tier: Tier) -> dict[int, int]:
        """Slot -> page of every occupied slot of `tier`."""
        return dict(sorted(self._owner[tier].items()))

    def free_slots(self, tier: Tier) -> int:
        return self.capacity[tier] - len(self._owner[tier])

    def pages_per_tier(self) -> dict[Tier, int]:
        return {t: len(self._owner[t]) for t in Tier}

    @property
    def pinned(self) -> frozenset[int]:
        return frozenset(self._pinned)

    # ---- sequences ---------------------------------------------------------------------------

    def append_tokens(self, seq_id: object, n: int) -> list[int]:
        """Grow `seq_id` (created if new) by `n` tokens; returns the new page ids (page-major, then layer).

        New pages take free slots, fastest tier first; no data moves (they hold nothing yet). Raises
        BudgetError, changing nothing, if the tiers together lack free slots for them.
        """
        self._check_no_pending("append_tokens")
        if n < 0:
            raise ValueError(f"cannot append a negative number of tokens ({n})")
        tokens = self._seq_tokens.get(seq_id, 0) + n
        have = len(self._seq_pages[seq_id][0]) if seq_id in self._seq_pages else 0
        need = -(-tokens // self.page_tokens) - have
        free = sum(self.free_slots(t) for t in Tier)
        if need * self.num_layers > free:
            raise BudgetError(f"sequence {seq_id!r} needs {need * self.num_layers} new KV pages for {n} more "
                              f"tokens but the tiers have {free} free slots: raise the KV capacity or free sequences")
        per_layer = self._seq_pages.setdefault(seq_id, [[] for _ in range(self.num_layers)])
        self._seq_tokens[seq_id] = tokens
        new: list[int] = []
        for index in range(have, have + need):
            for layer in range(self.num_layers):
                tier = next(t for t in _FASTEST_FIRST if self.free_slots(t) > 0)
                page, self._next_page = self._next_page, self._next_page + 1
                self._clock += 1
                self._pages[page] = _Page(seq_id, layer, index, tier, tier, self._take_slot(tier, page), self._clock)
                per_layer[layer].append(page)
                new.append(page)
        return new

    def free(self, seq_id: object) -> None:
        """Forget `seq_id`: every slot of its pages, in every tier, becomes free."""
        self._check_no_pending("free")
        for layer_pages in self._seq(seq_id):
            for page in layer_pages:
                p = self._pages.pop(page)
                self._release_slot(p.tier, p.slot)
                self._pinned.discard(page)
        del self._seq_pages[seq_id], self._seq_tokens[seq_id]

    def pin(self, page_ids: Iterable[int]) -> None:
        """Never evict these pages (until `unpin`); `require` may still move them when asked to."""
        ids = list(page_ids)
        for page in ids:
            self._page(page)
        self._pinned.update(ids)

    def unpin(self, page_ids: Iterable[int]) -> None:
        self._pinned.difference_update(page_ids)

    # ---- plan and commit ---------------------------------------------------------------------

    def require(self, page_ids: Iterable[int], tier: Tier) -> list[Move]:
        """The moves, in safe execution order, that make `page_ids` present in `tier` (state unchanged).

        Follow with `commit(moves)` once the bytes are copied (also for an empty list: commit marks the
        pages as used for LRU), or `discard()`.
        """
        self._check_no_pending("require")
        wanted = list(dict.fromkeys(page_ids))
        for page in wanted:
            self._page(page)
        if len(wanted) > self.capacity[tier]:
            raise BudgetError(f"{len(wanted)} KV pages are required in {tier.value} at once but it holds "
                              f"{self.capacity[tier]}: raise its capacity or require fewer pages at a time")
        protected = set(wanted)
        moves: list[Move] = []
        try:
            for page in wanted:
                p = self._pages[page]
                if p.tier is not tier:
                    self._make_room(tier, protected, moves)
                    moves.append(self._move(page, tier, eviction=False))
        finally:
            for move in reversed(moves):
                self._undo(move)
        self._pending = _Plan(list(moves), wanted)
        return moves

    def commit(self, moves: list[Move]) -> None:
        """Record that the bytes of `moves` (the list the last `require` returned) have been copied."""
        if self._pending is None:
            raise TiermemError("commit() without a pending require(): call require() first")
        if list(moves) != self._pending.moves:
            raise TiermemError("commit() got moves other than those the pending require() returned")
        for move in moves:
            self._move(move.page, move.dst, move.eviction, slot=move.dst_slot)
            link = (move.src, move.dst)
            self.stats.bytes_moved[link] = self.stats.bytes_moved.get(link, 0) + self.page_bytes
            self.stats.moves[link] = self.stats.moves.get(link, 0) + 1
            self.stats.evictions += move.eviction
        for page in self._pending.touch:
            self._clock += 1
            self._pages[page].last_use = self._clock
        self._pending = None

    def discard(self) -> None:
        """Drop the pending plan (its copies were not made); the state stays as before `require`."""
        self._pending = None

    # ---- internals ---------------------------------------------------------------------------

    def _make_room(self, tier: Tier, protected: set[int], moves: list[Move]) -> None:
        """Append (and apply) evictions until `tier` has a free slot; if impossible, raise BudgetError, apply none."""
        if self.free_slots(tier) > 0:
            return
        candidates = [pg for pg in self._owner[tier].values() if pg not in protected and pg not in self._pinned]
        if candidates:
            victim = min(candidates, key=lambda pg: (self._pages[pg].last_use, pg))
            for lower in _FASTEST_FIRST[_FASTEST_FIRST.index(tier) + 1:]:
                try:
                    self._make_room(lower, protected, moves)
                except BudgetError:
                    continue
                moves.append(self._move(victim, lower, eviction=True))
                return
        pinned = sum(pg in self._pinned for pg in self._owner[tier].values())
        raise BudgetError(
            f"no KV page can be evicted from {tier.value} ({self.capacity[tier]} slots, {pinned} pinned, "
            f"{len(protected)} in the current require set; slower tiers full or nothing evictable there): "
            "raise the tier capacities, unpin pages or require fewer pages at a time")

    def _move(self, page: int, dst: Tier, eviction: bool, slot: int | None = None) -> Move:
        p = self._pages[page]
        if slot is not None and (slot in self._owner[dst] or not 0 <= slot < self.capacity[dst]):
            raise TiermemError(f"slot {slot} of {dst.value} is not free for page {page}")
        move = Move(page, p.tier, dst, p.slot, self._take_slot(dst, page, slot), eviction)
        self._release_slot(p.tier, p.slot)
        p.tier, p.slot = dst, move.dst_slot
        return move

    def _undo(self, move: Move) -> None:
        self._release_slot(move.dst, move.dst_slot)
        p = self._pages[move.page]
        p.tier, p.slot = move.src, self._take_slot(move.src, move.page, move.src_slot)

    def _take_slot(self, tier: Tier, page: int, slot: int | None = None) -> int:
        """Occupy `slot` (or the lowest free slot) of `tier` with `page`; the caller made sure one is free."""
        owner, heap = self._owner[tier], self._free_heap[tier]
        if slot is None:
            while heap and heap[0] in owner:  # stale entries of slots taken by number
                heapq.heappop(heap)
            slot = heapq.heappop(heap) if heap else self._next_unused[tier]
        for s in range(self._next_unused[tier], slot):  # keep "slots >= _next_unused are free"
            heapq.heappush(heap, s)
        self._next_unused[tier] = max(self._next_unused[tier], slot + 1)
        assert slot not in owner and slot < self.capacity[tier], (tier, slot)
        owner[slot] = page
        return slot

    def _release_slot(self, tier: Tier, slot: int) -> None:
        del self._owner[tier][slot]
        heapq.heappush(self._free_heap[tier], slot)

    def _seq(self, seq_id: object) -> list[list[int]]:
        try:
            return self._seq_pages[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _page(self, page: int) -> _Page:
        try:
            return self._pages[page]
        except KeyError:
            raise KeyError(f"unknown KV page {page} (never allocated, or its sequence was freed)") from None

    def _check_no_pending(self, what: str) -> None:
        if self._pending is not None:
            raise TiermemError(f"{what}() while a require() is pending: commit() or discard() its moves first")
