"""Cold O_DIRECT read rate of a store's block files by the POSIX backend, for several thread counts.

    python benchmarks/disk_read_threads.py STORE --threads 4,8,16 --out disk_threads.json

Prints the fastest thread count last (for a shell to pick up); the page cache is dropped before each
measurement (root only) and O_DIRECT bypasses it anyway.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tiermem.ceilings import backend_read_rate, drop_page_cache
from tiermem.pinned import PinnedArena
from tiermem.storage.backends.posix import PosixBackend


def measure(files: list[Path], threads: int, chunk: int) -> float:
    with PinnedArena(max(f.stat().st_size for f in files)) as arena, \
            PosixBackend(threads=threads, direct=True, chunk_size=chunk) as backend:
        drop_page_cache()
        return backend_read_rate(backend, files, arena.take(arena.capacity))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("--threads", default="4,8,16")
    p.add_argument("--chunk-mib", default="8")
    p.add_argument("--files", type=int, default=6, help="how many of the largest block files to read")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    files = sorted(Path(args.store).glob("*.safetensors"), key=lambda f: -f.stat().st_size)[: args.files]
    results = []
    for chunk in (int(c) << 20 for c in args.chunk_mib.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            rate = measure(files, threads, chunk)
            results.append({"threads": threads, "chunk_bytes": chunk, "Bps": rate})
            print(f"threads {threads:>3} chunk {chunk >> 20:>3} MiB: {rate / 1e9:.3f} GB/s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"store": args.store, "files": len(files), "results": results}, indent=1))
    print(max(results, key=lambda r: r["Bps"])["threads"])


if __name__ == "__main__":
    main()
