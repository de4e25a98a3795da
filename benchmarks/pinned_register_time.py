"""Seconds to page-lock (PinnedArena: allocate + cudaHostRegister) and to release 1 GiB and 4.3 GB, twice each.

    OUT=DIR python3 benchmarks/pinned_register_time.py

Writes $OUT/pinned_arena_time.json: size in bytes -> [[register_s, close_s], ...]. 4311744512 B is the bf16 KV
cache of llama3-8b at batch 16 x 2056 tokens.
"""

from __future__ import annotations

import json
import os
import time

from tiermem.pinned import PinnedArena


def main() -> None:
    out = {}
    for nbytes in (1 << 30, 4311744512):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            arena = PinnedArena(nbytes)
            registered = time.perf_counter()
            arena.close()
            times.append((registered - start, time.perf_counter() - registered))
        out[str(nbytes)] = times
    print(json.dumps(out))
    with open(os.environ["OUT"] + "/pinned_arena_time.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
