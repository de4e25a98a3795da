"""The writer half of an async save: staged pieces in, a durable checkpoint directory out.

The caller copies each piece of the state dict into a region of the ring and queues it; the
writer thread writes the region into a temporary directory (large pwrites on an I/O pool while it
hashes the same bytes), frees the region, and finally writes the manifest and publishes the
directory under its final name (storage/durable.py). Regions are freed in order, so a save larger
than the ring is staged in pieces while the writer drains it.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from tiermem.checkpoint_format import (
    FORMAT,
    MANIFEST,
    PAGE,
    Piece,
    ShardPlan,
    TensorPlan,
    list_checkpoints,
    manifest_bytes,
    round_up,
)
from tiermem.checkpoint_staging import Region, StagingRing
from tiermem.errors import CheckpointError
from tiermem.storage.durable import atomic_directory, fsync_path, temp_sibling
from tiermem.storage.safetensors_io import plan_layout

WRITE_CHUNK = 16 << 20  # bytes per pwrite task on the I/O pool
BACKENDS = ("posix", "direct", "kvikio")
END = "end"  # queue marker: the caller staged every piece
ABORT = "abort"  # queue marker: staging failed, discard the job


@dataclass(frozen=True)
class WriterOptions:
    """How the writer writes: concurrent writes per save, zstd level, and the write backend.

    backend: "posix" (buffered pwrite from a thread pool), "direct" (O_DIRECT pwrite of the
    page-aligned staging regions; falls back to buffered where the filesystem refuses), or
    "kvikio" (kvikio.CuFile.pwrite from host memory; needs kvikio and CUDA).
    """

    io_threads: int = 4
    zstd_level: int = 3
    backend: str = "direct"


class _Sink:
    """One data file open for writing (a buffered fd, plus an O_DIRECT fd or a kvikio CuFile)."""

    def __init__(self, path: Path, backend: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.direct_fd, self.cufile = -1, None
        if backend == "direct":
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self.direct_fd = -1  # e.g. tmpfs: buffered writes only
        elif backend == "kvikio":
            import kvikio

            self.cufile = kvikio.CuFile(path, "r+")

    def write(self, data: np.ndarray, offset: int) -> None:
        if self.cufile is not None:
            self.cufile.pwrite(data, data.nbytes, offset).get()
            return
        if self.direct_fd >= 0 and not (offset | data.nbytes | data.ctypes.data) % PAGE:
            try:
                pwrite_all(self.direct_fd, data, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        pwrite_all(self.fd, data, offset)

    def sync_after(self, writes: list[Future]) -> None:
        for f in writes:  # submitted earlier to the same FIFO pool, so already running or done
            f.result()
        os.fsync(self.fd)

    def close(self) -> None:
        if self.cufile is not None:
            self.cufile.close()
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        os.close(self.fd)


@dataclass
class Job:
    """One save: what to write, where, and the queue of staged pieces feeding the writer."""

    final: Path
    shards: list[ShardPlan]
    manifest: dict
    compress: str | None
    keep: int | None
    overwrite: bool
    future: Future = field(default_factory=Future)
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    failed: threading.Event = field(default_factory=threading.Event)
    ended: bool = False  # the writer has taken the END or ABORT marker off `pieces`


def pwrite_all(fd: int, data: np.ndarray | bytes, offset: int) -> None:
    """Write all of `data` at `offset` (the one write primitive of the checkpoint writer)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class _JobWriter:
    """Writes one job's shards into a temporary directory; `close` leaves no thread or fd behind."""

    def __init__(self, job: Job, tmp: Path, ring: StagingRing, pool: ThreadPoolExecutor,
                 options: WriterOptions) -> None:
        self.job, self.tmp, self.ring, self.pool, self.options = job, tmp, ring, pool, options
        self.sinks: dict[int, _Sink] = {}
        self.pending: deque[tuple[Region, list[Future]]] = deque()
        self.shard_writes: dict[int, list[Future]] = {}
        self.syncs: list[Future] = []
        self.hashers: dict[int, xxhash.xxh3_64] = {}
        self.blobs: dict[int, list[bytes]] = {}
        self.compressors: dict = {}

    def _open(self, s: int) -> _Sink:
        if s not in self.sinks:
            shard = self.job.shards[s]
            raw = self.job.compress is None
            self.sinks[s] = sink = _Sink(self.tmp / shard.file, self.options.backend if raw else "posix")
            if raw:
                pwrite_all(sink.fd, shard.header, 0)
                os.ftruncate(sink.fd, len(shard.header) + shard.stream_bytes)
        return self.sinks[s]

    def write_piece(self, piece: Piece, region: Region | None, events: list) -> None:
        """Write one staged piece (after its GPU copies landed), hash it, free its region later."""
        for event in events:
            event.synchronize()
        futures: list[Future] = []
        if region is not None:  # registered first, so `close` frees it whatever fails below
            self.pending.append((region, futures))
        shard, raw = self.job.shards[piece.shard], self.job.compress is None
        sink = self._open(piece.shard) if raw else None
        if region is not None:
            data = region.array[:piece.end - piece.begin]
            if raw:
                base = len(shard.header) + piece.begin
                for off in range(0, len(data), WRITE_CHUNK):
                    futures.append(self.pool.submit(sink.write, data[off:off + WRITE_CHUNK], base + off))
                self.shard_writes.setdefault(piece.shard, []).extend(futures)
            for span in piece.spans:  # hashing (and compressing) overlaps the pwrites on the pool
                chunk = data[span.region_offset:span.region_offset + span.nbytes]
                self.hashers.setdefault(span.tensor.index, xxhash.xxh3_64()).update(chunk)
                if not raw:
                    compressed = self._compressor(span.tensor).compress(chunk)
                    self.blobs.setdefault(span.tensor.index, []).append(compressed)
        if piece.last_in_shard:
            self._finish_shard(piece.shard)
        self._retire(limit=2)

    def _compressor(self, t: TensorPlan):
        if t.index not in self.compressors:
            compressor = zstandard.ZstdCompressor(level=self.options.zstd_level, threads=-1)
            self.compressors[t.index] = compressor.compressobj(size=t.nbytes)
        return self.compressors[t.index]

    def _retire(self, limit: int) -> None:
        while len(self.pending) > limit:
            region, futures = self.pending.popleft()
            try:
                for f in futures:
                    f.result()
            finally:
                wait_all(futures)
                self.ring.free(region)

    def _finish_shard(self, s: int) -> None:
        shard = self.job.shards[s]
        entries = self.job.manifest["tensors"]
        digests = {t.index: self.hashers.get(t.index, xxhash.xxh3_64()).hexdigest() for t in shard.tensors}
        if self.job.compress is None:
            self.syncs.append(self.pool.submit(self.sinks[s].sync_after, self.shard_writes.pop(s, [])))
            offsets = [len(shard.header) + t.start for t in shard.tensors]
            stored = [t.nbytes for t in shard.tensors]
            size = len(shard.header) + shard.stream_bytes
        else:
            blobs = [b"".join(self.blobs.pop(t.index, [])) + self._compressor(t).flush()
                     for t in shard.tensors]
            entries_u8 = [(t.name, "U8", [len(b)], len(b)) for t, b in zip(shard.tensors, blobs, strict=True)]
            header, offsets = plan_layout(entries_u8, {"format": FORMAT, "compression": "zstd"})
            fd = self._open(s).fd
            pwrite_all(fd, header, 0)
            for blob, off in zip(blobs, offsets, strict=True):
                pwrite_all(fd, blob, off)
            end = max((o + len(b) for o, b in zip(offsets, blobs, strict=True)), default=len(header))
            size = len(header) + round_up(end - len(header), PAGE)
            os.ftruncate(fd, size)
            os.fsync(fd)
            stored = [len(b) for b in blobs]
        for t, off, n in zip(shard.tensors, offsets, stored, strict=True):
            entries[t.name] = {"file": shard.file, "offset": off, "dtype": t.dtype, "shape": list(t.shape),
                               "nbytes": t.nbytes, "stored_nbytes": n, "compression": self.job.compress,
                               "xxh3_64": digests[t.index]}
        self.job.manifest["files"][shard.file] = {"nbytes": size}

    def finish(self) -> None:
        self._retire(limit=0)
        for f in self.syncs:
            f.result()

    def close(self) -> None:
        """Wait for every outstanding write, free every region, close every file (errors ignored)."""
        while self.pending:
            region, futures = self.pending.popleft()
            wait_all(futures)
            self.ring.free(region)
        wait_all([f for fs in self.shard_writes.values() for f in fs] + self.syncs)
        for sink in self.sinks.values():
            sink.close()
        self.sinks.clear()


def write_job(job: Job, ring: StagingRing, options: WriterOptions) -> None:
    """Write one job to completion and resolve its future (result: the final path)."""
    try:
        with ThreadPoolExecutor(options.io_threads, thread_name_prefix="tiermem-ckpt-io") as pool:
            with atomic_directory(job.final, overwrite=job.overwrite) as tmp:
                writer = _JobWriter(job, tmp, ring, pool, options)
                try:
                    while (item := job.pieces.get()) not in (END, ABORT):
                        writer.write_piece(*item)
                    job.ended = True
                    if item == ABORT:
                        raise CheckpointError(f"staging the state dict for {job.final} failed; nothing saved")
                    writer.finish()
                finally:
                    writer.close()
                fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:  # the manifest goes last: a directory without one is never a checkpoint
                    pwrite_all(fd, manifest_bytes(job.manifest), 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the handle
        job.failed.set()
        _drain(job, ring)
        job.future.set_exception(_as_checkpoint_error(exc, job.final))
        return
    if job.keep is not None:
        try:
            prune(job.final.parent, job.keep, job.final)
        except Exception as exc:  # noqa: BLE001 - the new checkpoint is durable whatever happens here
            warnings.warn(f"could not prune old checkpoints next to {job.final}: {exc}", stacklevel=1)
    job.future.set_result(job.final)


def _drain(job: Job, ring: StagingRing) -> None:
    """Free the regions of pieces the caller still queues after a failure, up to its end marker."""
    while not job.ended:
        item = job.pieces.get()
        if item in (END, ABORT):
            job.ended = True
        elif item[1] is not None:
            ring.free(item[1])


def _as_checkpoint_error(exc: BaseException, final: Path) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        err = CheckpointError(
            f"disk full while saving checkpoint {final} ({exc.strerror or exc}): free space on that "
            "filesystem, prune old checkpoints (keep=N) or save to another disk, then save again; "
            "nothing was published and earlier checkpoints are intact")
    elif isinstance(exc, FileExistsError):
        err = CheckpointError(f"checkpoint {final} already exists: choose a new path or pass overwrite=True")
    elif isinstance(exc, OSError):
        err = CheckpointError(f"writing checkpoint {final} failed: {exc}; nothing was published")
    else:
        err = CheckpointError(f"saving checkpoint {final} failed: {exc!r}; nothing was published")
    err.__cause__ = exc
    return err


def prune(parent: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` newest tiermem checkpoints in `parent` (never `newest`).

    Each is first renamed to a hidden temporary name, so a crash mid-delete never leaves a partial
    checkpoint under a final name.
    """
    for _, path in list_checkpoints(parent)[:-keep]:
        if path == newest:
            continue
        try:
            doomed = temp_sibling(path)
            os.rename(path, doomed)
            fsync_path(parent)
            shutil.rmtree(doomed)
        except OSError as exc:
            warnings.warn(f"could not prune old checkpoint {path}: {exc}", stacklevel=1)
