"""Measure the Hardware figures the planner needs, once per machine, and cache them as JSON.

measure_hardware() needs a GPU (pinned H2D and HBM through tiermem.ceilings, a bf16 matmul rate);
the host memcpy and cold disk read rates are measured on the CPU. cached_hardware() reads
~/.cache/tiermem/hardware-<hostname>-<gpu>.json when it is fresh and measures (and writes it) otherwise.
The disk's read rate is kept per block store: on the GPU machine the rate measured on one store (5 GB,
llama3-8b) was 1.98 GB/s and the 111B store's disk tier then read 1.55 GB/s (plan-time predictions
18-22% short), while a probe of the 111B store itself read 1.58 GB/s and predicted its plan within 2%
(benchmarks/results/llama111b_int4_gpu24_cpu32_*_s7call3/4_h200.json).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tiermem.cost_model import Hardware
from tiermem.errors import ConfigError, TiermemError

if TYPE_CHECKING:
    from tiermem.planner import Plan

DEFAULT_MAX_AGE_S = 7 * 24 * 3600
# A plan that reads weights from a store every step takes that store's rate measured within this long (see
# plan_with_fresh_disk_rate): the GPU machine's disk read 1.65 and 1.53 GB/s at two loads six minutes apart.
DISK_RATE_FRESH_S = 60.0
CHUNK = 16 << 20  # one read; 4 KiB aligned as O_DIRECT wants


def measure_matmul(n: int = 8192, reps: int = 10, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul FLOP/s of an n x n x n product (median of reps)."""
    from tiermem.ceilings import median_seconds

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.matmul(a, b, out=out), reps)
    return 2 * n**3 / seconds


def measure_cpu_memcpy(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Host memory copy rate in bytes copied per second (median of reps, after one warm-up)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def measure_disk_read(directory: str | os.PathLike | None = None, nbytes: int = 1 << 30,
                      store_nbytes: int = 4 << 30) -> float:
    """Cold read rate (bytes/s) of the disk under `directory`.

    When `directory` is a block store with at least `nbytes` of block files, up to `store_nbytes` of them
    are read the way the disk tier reads them (tiermem.ceilings: POSIX O_DIRECT preadv, 4 threads): on
    the GPU machine a probe file written and read back gave 1.2 GB/s where the disk tier then read
    1.5-2.0 GB/s, and the planner's predictions were 20-60% off. After a 1 GiB read of the store a plan
    predicted 9.6 s per step where the disk tier then took 5.8 s (session 3); reading more averages out
    the disk's drift. Otherwise a file is written, synced and evicted there (in the temp dir where
    `directory` takes no file, e.g. a read-only store) and read in CHUNK bytes with O_DIRECT where the
    filesystem allows it, else buffered after POSIX_FADV_DONTNEED (cold unless the kernel ignores the
    advice); the file is removed afterwards.
    """
    blocks = store_blocks(directory, nbytes) if directory else []
    if blocks:
        from tiermem.ceilings import measure_disk_read as measure_store_read

        return measure_store_read(blocks, nbytes_cap=store_nbytes, readers=("posix",))["disk_read_posix_direct_Bps"]
    nbytes = max(CHUNK, nbytes // CHUNK * CHUNK)
    block = os.urandom(CHUNK)
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tiermem-probe-", delete=False) as f:
            path = f.name
    except OSError:
        if directory is None:
            raise
        return measure_disk_read(None, nbytes, store_nbytes)
    try:
        with open(path, "wb") as f:
            for _ in range(nbytes // CHUNK):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        fd = _open_cold(path)
        buf = mmap.mmap(-1, CHUNK)  # page aligned
        try:
            start = time.perf_counter()
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [buf], done)
                if n <= 0:
                    raise TiermemError(f"short read of the probe file {path} at {done}")
                done += n
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
            buf.close()
    finally:
        os.unlink(path)
    return nbytes / seconds


def store_blocks(directory: str | os.PathLike, nbytes: int = 1 << 30) -> list[Path]:
    """The block files of the store in `directory`, largest first, when they hold at least nbytes; else []."""
    blocks = sorted(Path(directory).glob("*.safetensors"), key=lambda f: -f.stat().st_size)
    return blocks if sum(f.stat().st_size for f in blocks) >= nbytes else []


def _open_cold(path: str) -> int:
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            probe = mmap.mmap(-1, 4096)
            try:
                os.preadv(fd, [probe], 0)
                return fd
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                probe.close()
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem refuses O_DIRECT
                raise
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def measure_hardware(device: str = "cuda", store_dir: str | os.PathLike | None = None) -> Hardware:
    """Every Hardware figure, measured now (about 10 s; needs CUDA). store_dir: where the disk probe
    writes its temporary file (the filesystem the block store lives on); default the temp dir."""
    from tiermem.ceilings import measure_h2d, measure_hbm

    if not torch.cuda.is_available():
        raise ConfigError("measuring hardware needs CUDA; on this machine pass a Hardware JSON file instead")
    hw = Hardware(
        disk_read_Bps=measure_disk_read(store_dir), h2d_Bps=measure_h2d(device=device),
        hbm_Bps=measure_hbm(device=device), matmul_flops=measure_matmul(device=device),
        cpu_memcpy_Bps=measure_cpu_memcpy(), name=torch.cuda.get_device_name(device))
    torch.cuda.empty_cache()
    return hw


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir else Path.home() / ".cache" / "tiermem"


def cache_path(gpu_name: str, host: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """~/.cache/tiermem/hardware-<hostname>-<gpu>.json (names made filename-safe)."""
    return _cache_root(cache_dir) / f"hardware-{_safe(host or socket.gethostname())}-{_safe(gpu_name)}.json"


def read_cache(path: str | os.PathLike) -> tuple[Hardware, float]:
    """(figures, measured_at as a Unix time) of a cache file or of a plain Hardware JSON file (its mtime)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read hardware figures from {path}: {exc}") from exc
    return Hardware.from_json(data), float(data.get("measured_at", path.stat().st_mtime))


def read_cache_for_store(path: str | os.PathLike, store_dir: str | os.PathLike | None) -> tuple[Hardware, float]:
    """read_cache, with the disk read rate the cache holds for store_dir (if it holds one) in the figures."""
    hw, measured_at = read_cache(path)
    entry = store_disk_rates(path).get(_store_key(store_dir)) if store_dir is not None else None
    return (hw if entry is None else replace(hw, disk_read_Bps=float(entry["Bps"]))), measured_at


def _store_key(store_dir: str | os.PathLike) -> str:
    """The cache's key of a store's disk rate: its resolved directory."""
    return str(Path(store_dir).resolve())


def store_disk_rates(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """A cache file's disk read rates by block store: resolved directory -> {"Bps", "measured_at"}."""
    try:
        return dict(json.loads(Path(path).read_text()).get("disk_read_by_store", {}))
    except (OSError, ValueError):
        return {}


def write_cache(path: str | os.PathLike, hw: Hardware, disk_read_by_store: dict[str, dict[str, float]] | None = None,
                measured_at: float | None = None) -> Path:
    """Write figures with the time they were measured (default now) and the host, and the disk read rates by
    store, less those of stores that are gone (a temp file of this writer's own + rename, so that readers never
    see half a file and processes that write at once do not take each other's temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stores = {d: rate for d, rate in (disk_read_by_store or {}).items() if Path(d).is_dir()}
    body = {"hardware": asdict(hw), "measured_at": time.time() if measured_at is None else measured_at,
            "host": socket.gethostname(), "disk_read_by_store": stores}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # one per writer
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, indent=1))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_hardware(path: str | os.PathLike | None = None, *, device: str = "cuda",
                    store_dir: str | os.PathLike | None = None, max_age_s: float = DEFAULT_MAX_AGE_S,
                    refresh: bool = False, measure: Callable[[], Hardware] | None = None,
                    measure_disk: Callable[[Path], float] | None = None,
                    cache_dir: str | os.PathLike | None = None, disk_max_age_s: float | None = None) -> Hardware:
    """Cached figures when fresh (younger than max_age_s), else measured now and written to the cache.

    path: the cache file (default cache_path() of this host and GPU; without CUDA, the only cache
    file of this host if there is exactly one). measure: what measures (default measure_hardware).
    store_dir: the block store the figures are for; its disk read rate is measured on it (measure_disk,
    default measure_disk_read: a few seconds) unless the cache holds one for that directory younger than
    disk_max_age_s (default max_age_s), and replaces the cached disk_read_Bps. Without CUDA and without a
    measure function a stale cache is still used; no cache is a TiermemError telling the user to pass a
    Hardware JSON file.
    """
    gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    if path is None:
        if gpu is not None:
            path = cache_path(gpu, cache_dir=cache_dir)
        else:
            found = sorted(_cache_root(cache_dir).glob(f"hardware-{_safe(socket.gethostname())}-*.json"))
            path = found[0] if len(found) == 1 else None
    can_measure = measure is not None or gpu is not None
    hw, measured_at = None, 0.0
    if path is not None and Path(path).is_file() and not refresh:
        cached, measured_at = read_cache(path)
        if time.time() - measured_at <= max_age_s or not can_measure:
            hw = cached
    if hw is None:
        if not can_measure:
            raise TiermemError("no cached hardware figures for this machine and no CUDA to measure them: pass "
                               "--hardware FILE.json (tiermem.planner.Hardware.to_json: disk_read_Bps, h2d_Bps, "
                               "hbm_Bps, matmul_flops, cpu_memcpy_Bps)")
        hw = measure() if measure is not None else measure_hardware(device, store_dir)
        if path is None:
            path = cache_path(hw.name or gpu or "unknown", cache_dir=cache_dir)
        rates = {} if refresh else store_disk_rates(path)
        if store_dir is not None:
            rates[_store_key(store_dir)] = {"Bps": hw.disk_read_Bps, "measured_at": time.time()}
        write_cache(path, hw, rates)
        return hw
    if store_dir is None:
        return hw
    disk_age = max_age_s if disk_max_age_s is None else disk_max_age_s
    return replace(hw, disk_read_Bps=_store_disk_read(path, hw, measured_at, Path(store_dir), disk_age,
                                                      can_measure, measure_disk or measure_disk_read))


def plan_with_fresh_disk_rate(make_plan: Callable[[Hardware], Plan], hardware: Hardware,
                              store_dir: str | os.PathLike | None, max_age_s: float = DISK_RATE_FRESH_S,
                              **cache: Any) -> tuple[Plan, Hardware]:
    """make_plan(hardware), and the figures it was made with; where that plan reads weights from store_dir every
    step, made again with the store's read rate measured now unless it was measured in the last max_age_s
    (cache: more arguments of cached_hardware). The cache keeps a store's rate for days, and a disk drifts: on the
    GPU machine the probe at a device call's first load read the 111B store at 1.81 GB/s; the second run, minutes
    later, planned with that rate, took 19% longer than predicted, and the disk read 1.52 GB/s after it
    (benchmarks/results/llama111b_int4_gpu24_cpu32_kvcpu_int4_s8call2_h200.json). The probe reads up to 4 GiB
    of the store (2-3 s there)."""
    chosen = make_plan(hardware)
    if store_dir is None or not chosen.disk_blocks:
        return chosen, hardware
    fresh = cached_hardware(store_dir=store_dir, disk_max_age_s=max_age_s, **cache)
    if fresh.disk_read_Bps == hardware.disk_read_Bps:
        return chosen, hardware
    return make_plan(fresh), fresh


def _store_disk_read(path: str | os.PathLike, hw: Hardware, measured_at: float, store_dir: Path, max_age_s: float,
                     can_measure: bool, measure_disk: Callable[[Path], float]) -> float:
    """The disk read rate of store_dir: the cache's when fresh, else measured now on the store's own files and
    added to the cache. A store of less than 1 GiB of block files keeps the machine's figure: nothing is written
    into it to measure, and a model that small is not read from disk at a rate that matters."""
    if not store_blocks(store_dir):
        return hw.disk_read_Bps
    rates = store_disk_rates(path)
    key = _store_key(store_dir)
    entry = rates.get(key)
    if entry is not None and (time.time() - entry["measured_at"] <= max_age_s or not can_measure):
        return float(entry["Bps"])
    if not can_measure:
        return hw.disk_read_Bps
    rates[key] = {"Bps": measure_disk(store_dir), "measured_at": time.time()}
    write_cache(path, hw, rates, measured_at=measured_at)  # the other figures keep their age
    return rates[key]["Bps"]
