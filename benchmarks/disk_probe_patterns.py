"""Which short read of a store predicts the disk tier's steady rate: the planner's probe designs side by side.

    python benchmarks/disk_probe_patterns.py STORE --probe-gib 4 --cycle-gib 12 --cycles 3 --out probe.json

Run right after the store is written (as `tiermem bench --write-store` does), all with tiermem's reader
(PosixBackend, O_DIRECT, 4 threads) and the page cache dropped before each pass:
1. fresh: the probe of tiermem.probe (the largest block files, read once);
2. re-read: the same files again;
3. other fresh: files no pass has read;
4. cycle: the disk tier's pattern, the same `cycle-gib` of other block files read over and over (it re-reads
   its disk blocks every step), rate per cycle.
Writes the rates (bytes/s) and each pass's start time to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tiermem.ceilings import backend_read_rate, drop_page_cache
from tiermem.pinned import PinnedArena
from tiermem.storage.backends.posix import PosixBackend


def take(files: list[Path], nbytes: int) -> list[Path]:
    """Files from the front of `files` (removed from it) up to nbytes."""
    out: list[Path] = []
    while files and sum(f.stat().st_size for f in out) < nbytes:
        out.append(files.pop(0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--probe-gib", type=float, default=4)
    p.add_argument("--cycle-gib", type=float, default=12)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    files = sorted(Path(args.store).glob("*.safetensors"), key=lambda f: -f.stat().st_size)
    probe = take(files, int(args.probe_gib * 2**30))
    other = take(files, int(args.probe_gib * 2**30))
    cycle = take(files, int(args.cycle_gib * 2**30))
    start = time.perf_counter()
    passes = []
    with PinnedArena(max(f.stat().st_size for f in probe + other + cycle)) as arena, \
            PosixBackend(threads=4, direct=True) as backend:
        buf = arena.take(arena.capacity)
        plan = [("fresh", probe), ("re-read", probe), ("other fresh", other)]
        plan += [(f"cycle {k + 1}", cycle) for k in range(args.cycles)]
        for name, chunk in plan:
            drop_page_cache()
            at = time.perf_counter() - start
            rate = backend_read_rate(backend, chunk, buf)
            passes.append({"pass": name, "start_s": at, "bytes": sum(f.stat().st_size for f in chunk),
                           "Bps": rate})
            print(f"{at:6.1f} s  {name:12s} {rate / 1e9:6.2f} GB/s")
    args.out.write_text(json.dumps({"command": "python benchmarks/disk_probe_patterns.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("store", "out")),
        "passes": passes}, indent=1))


if __name__ == "__main__":
    main()
