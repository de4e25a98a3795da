"""Measure the links a decode step is bound by, in the same run as the benchmark that uses them."""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], None], reps: int) -> float:
    """Median wall time of fn() measured with CUDA events (one warm-up call first)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_h2d(nbytes: int = 1 << 30, reps: int = 10, device: str = "cuda") -> float:
    """Pinned host -> HBM copy bandwidth in bytes/s (one large copy, median of reps)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds = median_seconds(lambda: dev.copy_(host, non_blocking=True), reps)
    return nbytes / seconds


def measure_hbm(nbytes: int = 2 << 30, reps: int = 10, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), reps)
    return 2 * nbytes / seconds


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure_ceilings(device: str = "cuda") -> dict[str, float]:
    """{"h2d_pinned_Bps", "hbm_Bps", "gpu_name", ...} measured now on this machine."""
    start = time.perf_counter()
    result = {
        "gpu_name": torch.cuda.get_device_name(device),
        "h2d_pinned_Bps": measure_h2d(device=device),
        "hbm_Bps": measure_hbm(device=device),
    }
    torch.cuda.empty_cache()
    result["probe_seconds"] = time.perf_counter() - start
    return result


def backend_read_rate(backend, files: list, buf: torch.Tensor) -> float:
    """Bytes/s of reading `files` whole, one after the other, into `buf` (at least the largest) with a read
    backend (tiermem.storage.backends)."""
    start = time.perf_counter()
    for f in files:
        backend.read_into(f, 0, buf[: f.stat().st_size])
    return sum(f.stat().st_size for f in files) / (time.perf_counter() - start)


def dd_read_rate(files: list) -> float:
    """Bytes/s of `dd iflag=direct bs=16M` over `files`, one after the other, by dd's own timing (NaN if
    dd fails, e.g. where the filesystem refuses O_DIRECT)."""
    import subprocess

    seconds = 0.0
    for f in files:
        dd = subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True,
                            text=True)
        found = re.findall(r"copied, ([0-9.e+-]+) s", dd.stderr)
        if not found:
            return math.nan
        seconds += float(found[-1])
    return sum(f.stat().st_size for f in files) / seconds if seconds else math.nan


def measure_disk_read(files: list, nbytes_cap: int = 3 << 30, threads: int = 4,
                      readers: tuple[str, ...] = ("posix", "kvikio", "dd")) -> dict[str, float]:
    """Cold read bandwidth of the store's own files, in bytes/s, by three readers: O_DIRECT preadv through
    PosixBackend (tiermem's reader), kvikio (where it imports) and `dd iflag=direct bs=16M`.

    Each reader reads its own files (dealt round-robin from the largest down, up to nbytes_cap each): no
    file is read twice. On the GPU machine's disk a file read a second time came back faster (dd re-reading
    a file the other readers had just read: 1.9-2.6 GB/s; dd on fresh files: 1.0-1.3 GB/s, in one run,
    benchmarks/results/disk_read_patterns_h200.json), which made whichever reader went last look best.
    readers: which of them to run (kvikio only where it imports); the others' rates are NaN.
    """
    from tiermem.pinned import PinnedArena
    from tiermem.storage.backends.kvikio import KvikioBackend, kvikio_available
    from tiermem.storage.backends.posix import PosixBackend

    readers = [r for r in ("posix", "kvikio", "dd") if r in readers and (r != "kvikio" or kvikio_available())]
    dealt: dict[str, list] = {r: [] for r in ("posix", "kvikio", "dd")}
    for k, f in enumerate(sorted(files, key=lambda f: -f.stat().st_size)):
        name = readers[k % len(readers)]
        if sum(x.stat().st_size for x in dealt[name]) < nbytes_cap:
            dealt[name].append(f)
    sizes = {r: sum(f.stat().st_size for f in fs) for r, fs in dealt.items()}
    rates = {r: math.nan for r in dealt}
    largest = max((f.stat().st_size for fs in dealt.values() for f in fs), default=0)
    with PinnedArena(max(largest, 1)) as arena:
        buf = arena.take(largest)
        for name in ("posix", "kvikio"):
            if not dealt.get(name):
                continue
            drop_page_cache()
            backend = PosixBackend(threads=threads, direct=True) if name == "posix" else KvikioBackend(
                threads=max(threads, 16))
            with backend:
                rates[name] = backend_read_rate(backend, dealt[name], buf)
    if dealt["dd"]:
        rates["dd"] = dd_read_rate(dealt["dd"])
    return {"disk_read_posix_direct_Bps": rates["posix"], "disk_read_dd_direct_Bps": rates["dd"],
            "disk_read_kvikio_Bps": rates["kvikio"], "disk_probe_bytes": sum(sizes.values()),
            "disk_probe_files_disjoint": True}


BACKEND_DISK_READ = {"posix": "disk_read_posix_direct_Bps", "kvikio": "disk_read_kvikio_Bps"}


def backend_disk_read(ceilings: dict, backend: str) -> float:
    """The cold read rate measure_disk_read found with the disk tier's reader `backend` ("posix" or "kvikio");
    NaN when it was not measured. The roofline takes the best reader's rate (best_disk_read); a prediction of what
    the disk tier does takes the rate of the reader it reads with."""
    return ceilings.get(BACKEND_DISK_READ[backend], math.nan)


def best_disk_read(ceilings: dict) -> float:
    """The fastest cold read rate measure_disk_read found (NaN entries skipped)."""
    rates = [ceilings.get(k, math.nan) for k in ("disk_read_posix_direct_Bps", "disk_read_dd_direct_Bps",
                                                  "disk_read_kvikio_Bps")]
    return max((r for r in rates if not math.isnan(r)), default=math.nan)
