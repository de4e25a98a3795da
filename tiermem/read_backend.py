"""Which read backend the disk tier uses: the faster of POSIX O_DIRECT preadv and kvikio on this
machine, by a measured probe of cold reads of the store's own files, cached per host."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from tiermem.ceilings import backend_read_rate, drop_page_cache
from tiermem.errors import ConfigError
from tiermem.pinned import PinnedArena
from tiermem.storage.backends.kvikio import KvikioBackend, kvikio_available
from tiermem.storage.backends.posix import PosixBackend
from tiermem.storage.durable import write_file_atomic

BACKENDS = ("auto", "posix", "kvikio")
MIN_PROBE_BYTES = 1 << 30  # a probe over less data than this is not cached: too small to be representative
KVIKIO_READS = "o_direct"  # how KvikioBackend reads; a cached choice made before it read with O_DIRECT is stale


def check_backend_name(name: str) -> None:
    """ConfigError unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown read backend {name!r}: choose one of {', '.join(BACKENDS)}")


def make_backend(name: str, threads: int):
    """A read backend by name: "posix" (O_DIRECT preadv pool) or "kvikio" ("auto": choose_backend first)."""
    if name == "posix":
        return PosixBackend(threads=threads, direct=True)
    if name == "kvikio":
        return KvikioBackend(threads=max(threads, 16))
    check_backend_name(name)
    raise ConfigError("read backend 'auto' picks one by a measured probe: resolve it with choose_backend first")


def measure_backends(files: list[Path], threads: int, nbytes_cap: int = 2 << 30) -> dict[str, float]:
    """Cold read bandwidth (bytes/s) of each available backend over up to nbytes_cap of `files`
    (the "bytes" entry says how much was read)."""
    chosen, total = [], 0
    for f in sorted(files, key=lambda p: -p.stat().st_size):
        if total >= nbytes_cap:
            break
        chosen.append(f)
        total += f.stat().st_size
    names = ["posix"] + (["kvikio"] if kvikio_available() else [])
    result = {}
    with PinnedArena(max(f.stat().st_size for f in chosen)) as arena:
        buf = arena.take(arena.capacity)
        for name in names:
            drop_page_cache()
            with make_backend(name, threads) as backend:
                result[name] = backend_read_rate(backend, chosen, buf)
    result["bytes"] = total
    return result


def cache_file() -> Path:
    return Path.home() / ".cache" / "tiermem" / f"read-backend-{platform.node()}.json"


def choose_backend(name: str, store_dir: Path, threads: int) -> str:
    """`name` itself unless "auto"; for "auto" the faster backend by the cached (or a fresh) probe."""
    if name != "auto":
        return name
    if not kvikio_available():
        return "posix"
    path = cache_file()
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("kvikio_reads") == KVIKIO_READS:  # else measured when kvikio's reads were buffered
            return cached["best"]
    rates = measure_backends(list(store_dir.glob("*.safetensors")), threads)
    probed = rates.pop("bytes")
    best = max(rates, key=rates.__getitem__)
    if probed >= MIN_PROBE_BYTES:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, json.dumps({"best": best, "Bps": rates, "probe_bytes": probed,
                                            "measured_at": time.time(), "store": os.fspath(store_dir),
                                            "kvikio_reads": KVIKIO_READS}).encode())
    return best
