"""Cold read rate of one store by several access patterns, each on files no other pattern has read.

    python benchmarks/disk_read_patterns.py STORE --rounds 3 --files-per-read 2 --out patterns.json

Patterns: `dd iflag=direct bs=16M` (one file after the other), tiermem's PosixBackend (O_DIRECT
preadv) at several thread counts and chunk sizes, and kvikio where it imports. Rounds interleave the
patterns so that a disk whose rate drifts (burst credits, throttling) affects each alike; no file is
read twice, so no device-side cache can favour a pattern.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tiermem.ceilings import backend_read_rate, dd_read_rate, drop_page_cache
from tiermem.pinned import PinnedArena
from tiermem.storage.backends.kvikio import KvikioBackend, kvikio_available
from tiermem.storage.backends.posix import PosixBackend

POSIX = [(1, 16), (4, 8), (8, 8), (4, 32)]  # (threads, chunk MiB)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--files-per-read", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    files = sorted(Path(args.store).glob("layers.*.safetensors"))
    patterns = ["dd bs=16M"] + [f"posix {t} threads x {c} MiB" for t, c in POSIX] + (
        ["kvikio"] if kvikio_available() else [])
    rates: dict[str, list[float]] = {name: [] for name in patterns}
    fresh = iter(files)
    with PinnedArena(max(f.stat().st_size for f in files)) as arena:
        buf = arena.take(arena.capacity)
        for _ in range(args.rounds):
            for name in patterns:
                chunk = [next(fresh) for _ in range(args.files_per_read)]
                drop_page_cache()
                if name.startswith("dd"):
                    rate = dd_read_rate(chunk)
                elif name == "kvikio":
                    with KvikioBackend(threads=16) as backend:
                        rate = backend_read_rate(backend, chunk, buf)
                else:
                    threads, mib = POSIX[patterns.index(name) - 1]
                    with PosixBackend(threads=threads, direct=True, chunk_size=mib << 20) as backend:
                        rate = backend_read_rate(backend, chunk, buf)
                rates[name].append(rate)
                print(f"{name:>28}: {rate / 1e9:.3f} GB/s", flush=True)
    summary = {name: {"median_Bps": statistics.median(r), "runs_Bps": r} for name, r in rates.items()}
    for name, s in summary.items():
        print(f"median {name:>28}: {s['median_Bps'] / 1e9:.3f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"store": args.store, "files_per_read": args.files_per_read,
                                              "patterns": summary}, indent=1))


if __name__ == "__main__":
    main()
