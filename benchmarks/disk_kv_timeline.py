"""Where a decode step with the KV cache on disk spends its I/O time: per layer, the prefix read (and its rate),
the wait for a staging slot, the write of the new slots, and the compute thread's wait for each read.

    python3 benchmarks/disk_kv_timeline.py --synthetic llama3-8b --quant int4 --batch 16 --prompt-len 2048 \
        --offload-dir /root/kv --kv-quant int4 --variants plain,writeback --out DIR

Weights are random and resident (tiermem.synthetic in HBM); the KV cache lives in a file in --offload-dir.
After the prompt the page cache is written back and dropped, as `tiermem bench` does. Variants, each a fresh
generation in the same process: `plain` (the cache as it is) and `writeback` (each write of new slots is
followed by sync_file_range(SYNC_FILE_RANGE_WRITE) on its range: writeback starts at once instead of when the
next step's O_DIRECT read of that layer forces it). Writes DIR/disk_kv_timeline.json and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from synthetic_model import add_model_arguments, command, quant_scheme, synthetic_store

from tiermem import kv_disk
from tiermem.api import load_from_reader
from tiermem.ceilings import drop_page_cache, measure_disk_read
from tiermem.presets import preset
from tiermem.storage.format import StoreReader
from tiermem.synthetic import write_synthetic_store

SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)


class Timeline:
    """Durations of the disk cache's I/O calls, by decode step."""

    def __init__(self) -> None:
        self.step = -1
        self.lock = threading.Lock()
        self.events: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.events[self.step][name].append(seconds)


def instrument(timeline: Timeline, writeback: bool) -> list[tuple[object, str, object]]:
    """Wrap DiskKVCache's I/O methods to record their durations; returns what to restore."""
    cls = kv_disk.DiskKVCache
    saved = [(cls, n, getattr(cls, n)) for n in ("_read", "_write", "_ready")]
    read, write, ready = (getattr(cls, n) for n in ("_read", "_write", "_ready"))

    def timed_read(self, layer, length, slot):
        wait_start = time.perf_counter()
        self.mover.host_wait(self._slot_free[slot])
        timeline.add("slot_wait_s", time.perf_counter() - wait_start)
        backend_read = self.backend.read_many

        def read_many(path, requests):
            start = time.perf_counter()
            backend_read(path, requests)
            timeline.add("read_s", time.perf_counter() - start)
            timeline.add("read_bytes", sum(out.numel() * out.element_size() for _, out in requests))

        self.backend.read_many = read_many
        start = time.perf_counter()
        try:
            return read(self, layer, length, slot)
        finally:
            self.backend.read_many = backend_read
            timeline.add("read_task_s", time.perf_counter() - start)

    def timed_write(self, layer, slot, start_slot, end_slot, marker):
        start = time.perf_counter()
        write(self, layer, slot, start_slot, end_slot, marker)
        if writeback:
            for region in self.regions[layer]:
                offset = region.offset + start_slot * region.slot_bytes
                _libc.sync_file_range(self.file.fd, ctypes.c_int64(offset),
                                      ctypes.c_int64((end_slot - start_slot) * region.slot_bytes),
                                      SYNC_FILE_RANGE_WRITE)
        timeline.add("write_task_s", time.perf_counter() - start)

    def timed_ready(self, done):
        start = time.perf_counter()
        try:
            return ready(self, done)
        finally:
            timeline.add("compute_waits_for_read_s", time.perf_counter() - start)

    cls._read, cls._write, cls._ready = timed_read, timed_write, timed_ready
    return saved


def run_variant(model, args, writeback: bool) -> dict:
    timeline = Timeline()
    saved = instrument(timeline, writeback)
    stamps: list[float] = []

    def on_step(k: int) -> None:
        torch.cuda.synchronize()
        if k == 1:
            drop_page_cache()
        stamps.append(time.perf_counter())
        timeline.step = k

    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len))
    try:
        model.generate(ids, args.gen_len, eos_token_id=[], on_step=on_step)
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    per_step = []
    for k in range(1, args.gen_len):
        ev = timeline.events[k]
        read_s, read_bytes = sum(ev["read_s"]), sum(ev["read_bytes"])
        per_step.append({"step_s": steps[k - 1], "reads": len(ev["read_s"]), "read_s": read_s,
                         "read_bytes": read_bytes, "read_Bps": read_bytes / read_s if read_s else None,
                         **{name: sum(ev[name]) for name in ("read_task_s", "slot_wait_s", "write_task_s",
                                                             "compute_waits_for_read_s")},
                         "largest_write_s": max(ev["write_task_s"], default=0.0),
                         "median_read_s": statistics.median(ev["read_s"]) if ev["read_s"] else None})
    return {"writeback": writeback, "steps": per_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, prompt_len=2048)
    p.add_argument("--gen-len", type=int, default=6)
    p.add_argument("--offload-dir", required=True)
    p.add_argument("--variants", default="plain,writeback")
    p.add_argument("--measure-ceilings", default=None, metavar="READERS",
                   help="with --store: first measure the disk's read ceilings on it with these readers (comma-"
                   "separated: posix, kvikio, dd; bench uses all three)")
    p.add_argument("--store", default=None, help="bench this store (written once if missing) with the planner's "
                   "placement, as `tiermem bench --write-store` does, instead of random weights in HBM")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    if args.store is None:
        store = synthetic_store(args, "cuda")
    else:
        if not (Path(args.store) / "manifest.json").is_file():
            write_synthetic_store(preset(args.synthetic), args.store, quant_scheme(args), torch.bfloat16,
                                  device="cuda")
        store = StoreReader(args.store)
    model = load_from_reader(store, "cuda", None, None, dtype=torch.bfloat16, max_batch_size=args.batch,
                             max_seq_len=args.prompt_len + args.gen_len, kv_quant=args.kv_quant,
                             plan=None if args.store is None else "auto", kv_placement="disk",
                             offload_dir=args.offload_dir)
    results = []
    if args.measure_ceilings:
        measure_disk_read(list(Path(args.store).glob("*.safetensors")),
                          readers=tuple(args.measure_ceilings.split(",")))
    with model:
        for variant in args.variants.split(","):
            results.append({"variant": variant, **run_variant(model, args, writeback=variant == "writeback")})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk_kv_timeline.json").write_text(json.dumps(
        {"command": command(), "gpu": torch.cuda.get_device_name(), "variants": results}, indent=1))
    print(f"{'variant':>10} {'step s':>7} {'reads':>5} {'read s':>7} {'GB/s':>5} {'task s':>7} {'slot s':>7} "
          f"{'write s':>7} {'max w':>6} {'waits s':>7}")
    for r in results:
        for s in r["steps"]:
            print(f"{r['variant']:>10} {s['step_s']:7.3f} {s['reads']:5d} {s['read_s']:7.3f} "
                  f"{(s['read_Bps'] or 0) / 1e9:5.2f} {s['read_task_s']:7.3f} {s['slot_wait_s']:7.3f} "
                  f"{s['write_task_s']:7.3f} {s['largest_write_s']:6.3f} {s['compute_waits_for_read_s']:7.3f}")


if __name__ == "__main__":
    main()
