"""The GPU tier: resident blocks in HBM and a ring of HBM slots fed from pinned host buffers.

Blocks that do not stay resident are copied host -> HBM on a dedicated copy stream, `lookahead`
blocks ahead of the compute that needs them. Each slot carries two events: `ready` (recorded on
the copy stream after its copy) and `free` (recorded on the compute stream after the last kernel
that reads it). Compute waits only on its own block's `ready`; a copy into a slot waits only on
that slot's `free`. Nothing synchronises the host, so the CPU runs ahead and the copy engine is
never idle while a later block still has to cross PCIe.

A sparse layer streamed from host RAM is copied without its routed experts (tiermem.expert_split) when the sparse
layer used last left some of its experts unused: each expert crosses PCIe when a kernel first asks for one of its
tensors, and the kernels wait for that copy only. A step of few tokens (engine.moe.chosen_experts, which syncs the
host with the GPU at each sparse layer anyway) then moves only the experts its tokens chose; after a layer that
used every expert (a prompt, a step whose picks cover the experts), blocks are copied whole, ahead of use, as any
other block. The sparse layers of one pass see the same tokens, so the pass's first layers tell the rest: only the
copies issued before them (lookahead + 1) follow the pass before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tiermem.disk_tier import DiskStager
from tiermem.errors import BudgetError, ConfigError, TiermemError
from tiermem.expert_split import ExpertSplit, Runs, split_experts
from tiermem.pinned import device_alias

Decoder = Callable[[str, torch.Tensor], dict]


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 [slot_bytes] in HBM
    ready: torch.cuda.Event
    free: torch.cuda.Event
    whole: bool = True  # the last copy into it was its block's every byte (not the shared part of a split block)
    copied: dict[int, torch.cuda.Event] = field(default_factory=dict)  # expert -> after its latest copy in (reused)


class _ExpertsOnDemand(Mapping):
    """A split block's tensors in its slot: the first access to a routed expert's tensor copies that expert in
    (unless the slot holds the whole block) and makes the current stream wait for the copy."""

    def __init__(self, tier: GpuWeights, name: str, views: dict, split: ExpertSplit, slot: _Slot):
        self.tier, self.name, self.views, self.split, self.slot = tier, name, views, split, slot
        self.used: set[int] = set()

    @property
    def copies_experts_on_demand(self) -> bool:
        """Whether an expert's first tensor asked for may copy it in (engine.moe then reads the routing on the host
        and asks for the chosen experts only)."""
        return self.tier.experts_on_demand

    def __getitem__(self, key: str):
        j = self.split.owner.get(key)
        if j is not None and j not in self.used:
            self.used.add(j)
            if not self.slot.whole:
                self.tier._copy_expert(self.name, self.slot, j, self.split.experts[j])
        return self.views[key]

    def __contains__(self, key: object) -> bool:
        return key in self.views

    def __iter__(self):
        return iter(self.views)

    def __len__(self) -> int:
        return len(self.views)


class GpuWeights:
    """WeightSource for CUDA execution (see engine.executor): yields each block's tensors in HBM.

    resident: block name -> uint8 buffer in HBM holding the block's bytes (kept for good).
    host_blocks: block name -> uint8 buffer in pinned host memory, for every other block.
    decode: (block name, uint8 buffer on any device) -> {tensor name: tensor views}.
    host_only: host blocks whose tensors are used where they are (e.g. the token embedding: eager steps
    gather its rows on the host, graph replays on the GPU through device_views, so that only [B, T, D]
    activations cross PCIe instead of the whole table); the rest of host_blocks stream through the ring of
    HBM slots.
    disk: a DiskStager for the blocks that live only on disk; they are read into pinned staging
    buffers ahead of use and then stream through the same ring.
    experts_on_demand: copy the routed experts of a sparse layer streamed from host RAM when they are used, after a
    sparse layer that left experts unused (see the module doc); False copies every block whole. The attribute of that
    name may be changed between passes.
    h2d_bytes counts the bytes copied host -> HBM so far.
    """

    def __init__(
        self,
        resident: Mapping[str, torch.Tensor],
        host_blocks: Mapping[str, torch.Tensor],
        decode: Decoder,
        device: torch.device | str = "cuda",
        host_only: Sequence[str] = (),
        lookahead: int = 2,
        disk: DiskStager | None = None,
        experts_on_demand: bool = True,
    ) -> None:
        if lookahead < 1:
            raise ConfigError(f"lookahead must be >= 1, got {lookahead}")
        self.device = torch.device(device)
        self.decode = decode
        self.resident = dict(resident)
        self.host_blocks = dict(host_blocks)
        self.host_only = frozenset(host_only)
        self.lookahead = lookahead
        if self.host_only - set(self.host_blocks):
            raise ConfigError(f"host-only blocks {sorted(self.host_only - set(self.host_blocks))} are not "
                              "in the host tier")
        self.disk = disk
        self.disk_names = disk.names if disk is not None else frozenset()
        self._disk_copied = torch.cuda.Event()  # after the newest copy out of a disk staging buffer
        sizes = [self.host_blocks[n].numel() for n in self.host_blocks if n not in self.host_only]
        sizes += [disk.reader.block_nbytes(n) for n in self.disk_names] if disk is not None else []
        streamed = bool(sizes)
        slot_bytes = max(sizes, default=0)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.slots = [
            _Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device),
                  torch.cuda.Event(), torch.cuda.Event())
            for _ in range(lookahead + 1 if streamed else 0)
        ]
        self._next_slot = 0
        self._decoded: dict[tuple[str, int], dict] = {}  # (block, buffer address) -> views, see _views
        self._mapped: dict[str, dict | None] = {}  # host-only block -> views of its device alias: device_views
        self._primed: deque[_Slot] = deque()  # copies issued for the next pass over _primed_for
        self._primed_for: list[str] | None = None
        self._splits: dict[str, ExpertSplit] = {}  # streamed host block -> its split, where it has routed experts
        for name, buffer in self.host_blocks.items():
            split = None if name in self.host_only else split_experts(decode(name, buffer), buffer)
            if split is not None:
                self._splits[name] = split
        self.experts_on_demand = experts_on_demand
        self._used_all = True  # the split block used last took every expert (before any: True)
        self.h2d_bytes = 0

    @property
    def sparse_host_blocks(self) -> list[str]:
        """The streamed host blocks with routed experts, which experts_on_demand copies in parts."""
        return list(self._splits)

    def _nbytes(self, name: str) -> int:
        return self.disk.reader.block_nbytes(name) if name in self.disk_names else self.host_blocks[name].numel()

    @contextmanager
    def stream(self, names: Sequence[str]) -> Iterator[Iterator[tuple[str, dict]]]:
        names = list(names)
        disk_names = [n for n in names if n in self.disk_names]
        if not disk_names:
            yield self._iterate(names, iter(()))
            return
        with self.disk.stream(disk_names) as disk_blocks:
            try:
                yield self._iterate(names, disk_blocks)
            finally:
                self._disk_copied.synchronize()  # staging buffers go back to the ring on exit

    def _iterate(self, names: list[str], disk_blocks: Iterator[tuple[str, torch.Tensor]]
                 ) -> Iterator[tuple[str, dict]]:
        """Yield blocks in order; at most lookahead + 1 streamed copies are outstanding at any time.

        Copies run ahead over resident and host-only blocks (the window counts streamed blocks
        only), and once this pass's last copies are issued, the first copies of the next pass with the
        same names follow as their slots free up, so that PCIe stays busy across step boundaries
        (this pass's last layers, sampling, host syncs).
        """
        compute = torch.cuda.current_stream(self.device)
        streamed = [j for j, name in enumerate(names) if self._is_streamed(name)]
        pending = self._primed if names == self._primed_for else deque()
        self._primed, self._primed_for = deque(), None
        # The next pass's first copies, up to its first disk block (disk reads start with the next pass's stream),
        # are issued as soon as their slots are free, not when this pass ends: the PCIe copies then run on while
        # this pass's last layers compute and the step's sampling runs.
        head = streamed[: len(self.slots)]
        head = [names[j] for j in head[: next((k for k, j in enumerate(head) if names[j] in self.disk_names),
                                              len(head))]]
        primed: deque[_Slot] = deque()
        issued = len(pending)  # copies of this pass, then of the next one's head
        consumed = 0

        def issue_ahead() -> None:  # at most len(slots) copies not yet consumed: a slot is reused once consumed
            nonlocal issued
            while issued < min(len(streamed) + len(head), consumed + len(self.slots)):
                if issued < len(streamed):
                    pending.append(self._issue_copy(names[streamed[issued]], disk_blocks))
                else:
                    primed.append(self._issue_copy(head[issued - len(streamed)], disk_blocks))
                issued += 1

        for name in names:
            issue_ahead()
            if name in self.host_only:
                yield name, self._views(name, self.host_blocks[name])
            elif name in self.resident:
                yield name, self._views(name, self.resident[name])
            else:
                slot = pending.popleft()
                compute.wait_event(slot.ready)
                views = self._views(name, slot.buffer[: self._nbytes(name)])
                split = self._splits.get(name)
                if split is None:
                    yield name, views
                else:
                    on_demand = _ExpertsOnDemand(self, name, views, split, slot)
                    yield name, on_demand
                    self._used_all = len(on_demand.used) == len(split.experts)
                slot.free.record(compute)
                consumed += 1
        issue_ahead()
        self._primed, self._primed_for = primed, names

    def device_views(self, name: str) -> dict | None:
        """Block `name`'s tensors where kernels on the GPU read them in place: views into its HBM buffer if it is
        resident; if it is host-only, views into its pinned buffer mapped into the GPU's address space
        (pinned.device_alias: each read crosses PCIe); None for a streamed block or memory CUDA does not map."""
        if name in self.resident:
            return self._views(name, self.resident[name])
        if name not in self.host_only:
            return None
        if name not in self._mapped:
            mapped = device_alias(self.host_blocks[name], self.device)
            self._mapped[name] = None if mapped is None else self.decode(name, mapped)  # once, kept here
        return self._mapped[name]

    def _views(self, name: str, buffer: torch.Tensor) -> dict:
        """The block's tensors as views into `buffer`, decoded once per (block, buffer) and then reused:
        every buffer lives as long as this tier, and decoding each pass cost host time on every layer."""
        key = (name, buffer.data_ptr())
        if key not in self._decoded:
            self._decoded[key] = self.decode(name, buffer)
        return self._decoded[key]

    def _is_streamed(self, name: str) -> bool:
        if name not in self.host_blocks and name not in self.resident and name not in self.disk_names:
            raise ConfigError(f"block {name!r} is in no tier (GPU, host or disk)")
        return name not in self.resident and name not in self.host_only

    def _issue_copy(self, name: str, disk_blocks: Iterator[tuple[str, torch.Tensor]]) -> _Slot:
        """Copy block `name` into the next slot of the ring once the slot's last reader is done.

        A disk block is taken from the stager; the previous disk block's copy must have finished
        first, because advancing the stager hands that block's staging buffer to the next read.
        """
        if name in self.disk_names:
            self._disk_copied.synchronize()
            staged, src = next(disk_blocks)
            if staged != name:
                raise TiermemError(f"disk tier yielded block {staged!r}, expected {name!r}")
        else:
            src = self.host_blocks[name]
        slot = self.slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        self.copy_stream.wait_event(slot.free)
        split = self._splits.get(name)
        slot.whole = split is None or not self.experts_on_demand or self._used_all
        with torch.cuda.stream(self.copy_stream):
            if slot.whole:
                slot.buffer[: src.numel()].copy_(src, non_blocking=True)
                self.h2d_bytes += src.numel()
            else:
                self._copy(src, slot.buffer, split.shared)
            slot.ready.record(self.copy_stream)
            if name in self.disk_names:
                self._disk_copied.record(self.copy_stream)
        return slot

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, runs: Runs) -> None:
        """Issue the copies of byte ranges `runs` of src (pinned) into dst (HBM) on the current stream."""
        for start, end in runs:
            dst[start:end].copy_(src[start:end], non_blocking=True)
            self.h2d_bytes += end - start

    def _copy_expert(self, name: str, slot: _Slot, expert: int, runs: Runs) -> None:
        """Copy expert `expert` (its byte `runs`) of host block `name` into the block's slot, after what the copy
        stream has queued (the slot's shared part among it), and make the current stream wait for that copy (an
        event per slot and expert, made once: a wait binds to the record before it)."""
        if expert not in slot.copied:
            slot.copied[expert] = torch.cuda.Event()
        copied = slot.copied[expert]
        with torch.cuda.stream(self.copy_stream):
            self._copy(self.host_blocks[name], slot.buffer, runs)
            copied.record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(copied)

    def close(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        if self.disk is not None:
            self.disk.close()
        self._primed.clear()
        self._decoded.clear()
        self._mapped.clear()
        self.resident.clear()
        self.slots.clear()


def plan_gpu_residency(
    block_bytes: Mapping[str, int], order: Sequence[str], host_only: Sequence[str], budget: int,
    lookahead: int, max_resident: int | None = None,
) -> tuple[list[str], int]:
    """Which blocks stay in HBM, within `budget` bytes for weights (resident blocks plus the ring).

    Blocks are taken in execution order while resident bytes plus lookahead + 1 slots of the largest
    block still streamed fit; max_resident caps the resident bytes (0 streams every block).
    Returns (resident names, bytes used); BudgetError when not even the ring fits.
    """
    candidates = [n for n in order if n not in host_only]
    resident: list[str] = []
    used = 0

    def ring(streamed: list[str]) -> int:
        return (lookahead + 1) * max((block_bytes[n] for n in streamed), default=0)

    for k, name in enumerate(candidates):
        size = block_bytes[name]
        if max_resident is not None and used + size > max_resident:
            break
        if used + size + ring(candidates[k + 1:]) > budget:
            break
        resident.append(name)
        used += size
    total = used + ring(candidates[len(resident):])
    if total > budget:
        raise BudgetError(
            f"weights need {total / 2**30:.2f} GiB of GPU memory at least ({lookahead + 1} slots of the "
            f"largest block) but only {budget / 2**30:.2f} GiB are left for them: raise gpu_memory, "
            "lower the batch size or sequence length, or use a smaller lookahead")
    return resident, total
