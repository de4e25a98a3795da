"""Asynchronous, durable checkpoints of nested state dicts.

    h = tiermem.checkpoint.save_async(state_dict, "ckpt/step-1000", keep=3)   # returns once staged
    ...                                                                      # training goes on
    h.result()            # or `await h`: the final path, durable (fsynced, renamed, parent fsynced)
    sd = tiermem.checkpoint.load("ckpt/step-1000", device="cpu")            # every checksum verified

Only staging blocks the caller: GPU tensors are copied into pinned host memory on a side CUDA
stream (the call waits for that copy only), CPU tensors are copied with memcpy; after that the
caller may modify its tensors freely. A background writer thread writes the staged bytes into a
hidden temporary directory, fsyncs it, writes the manifest last and renames it into place, so a
crash never leaves a partial checkpoint under the final name. Modules: checkpoint_format (layout,
manifest), checkpoint_staging (the staging ring), checkpoint_writer (the writer), checkpoint_read.

An `AsyncCheckpointer` owns the staging memory and the writer thread; reuse one across saves so
the (pinned) staging buffer is allocated once. `save_async` without `checkpointer=` creates a
one-shot checkpointer that releases its staging buffer when that save finishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import deque
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from tiermem.checkpoint_format import FORMAT, MANIFEST, PAGE, Piece, cut_pieces, flatten, new_manifest, plan_shards
from tiermem.checkpoint_read import VerifyReport, checkpoint_path, format_report, load, verify
from tiermem.checkpoint_writer import ABORT, BACKENDS, END, Job, Region, StagingRing, WriterOptions, write_job
from tiermem.config import check_integer, parse_size
from tiermem.errors import CheckpointError, ConfigError, TiermemError
from tiermem.storage.durable import why_not_replaceable

__all__ = ["AsyncCheckpointer", "SaveHandle", "VerifyReport", "format_report", "load", "save_async", "verify"]

MAX_PIECE = 64 << 20  # bytes staged and queued to the writer as one unit


class SaveHandle:
    """The pending result of one save: `result()`, `done()`, or `await handle`."""

    def __init__(self, path: Path, future: concurrent.futures.Future, blocked_s: float) -> None:
        self.path = path
        self.blocked_s = blocked_s  # how long save_async blocked the caller (staging)
        self._future = future

    def result(self, timeout: float | None = None) -> Path:
        """The final path once the checkpoint is durable; CheckpointError if the save failed.

        Raises TimeoutError if it is still being written after `timeout` seconds.
        """
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"checkpoint {self.path} is still being written after {timeout} s") from None

    def done(self) -> bool:
        return self._future.done()

    def __await__(self) -> Generator[Any, None, Path]:
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        return f"SaveHandle({str(self.path)!r}, done={self.done()})"


MIN_STAGING_BYTES = 4 * PAGE  # pieces are >= a page, the writer keeps its last 2 until the next lands


class AsyncCheckpointer:
    """Owns a host staging buffer and a writer thread; saves are written in the order they are issued.

    staging_bytes: None lets the buffer grow to the largest state dict saved (allocated on first
      use, reused after, replaced only when no save is in flight); a size (bytes or "8GiB") is a
      hard limit allocated now, and a larger state dict is staged piece by piece, the caller
      blocking while the writer frees space.
    pin: page-lock the staging buffer (needed for fast, asynchronous GPU copies); default: when
      CUDA is available.
    shard_bytes: target size of each data file. io_threads: concurrent writes per save.
    backend: "direct" (default: O_DIRECT pwrites of the aligned staging regions, buffered where the
      filesystem refuses O_DIRECT), "posix" (buffered pwrites) or "kvikio" (needs kvikio and CUDA);
      see WriterOptions. On the H200 machine "direct" blocked the caller 1.03x the D2H floor against
      1.36x for "posix" (benchmarks/results/checkpoint_h200.json).

    The writer thread runs only while saves are pending, and is not a daemon: a save in flight
    finishes before the interpreter exits. `close()` (or leaving the `with` block) waits for
    pending saves and releases the staging buffer.
    """

    def __init__(self, staging_bytes: int | str | None = None, *, pin: bool | None = None,
                 shard_bytes: int | str = "1GiB", io_threads: int = 4, zstd_level: int = 3,
                 backend: str = "direct") -> None:
        limit = parse_size(staging_bytes)
        self.shard_bytes = parse_size(shard_bytes)
        if limit is not None and limit < MIN_STAGING_BYTES:
            raise ConfigError(f"staging_bytes must be at least {MIN_STAGING_BYTES} bytes (four pages: the writer "
                              f"holds two pieces of at least a page while the next are staged), got {limit}")
        if not self.shard_bytes or io_threads < 1:
            raise ConfigError("shard_bytes and io_threads must be positive")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "kvikio" and not _kvikio_usable():
            raise ConfigError("backend='kvikio' needs the kvikio package and a CUDA GPU; "
                              "use backend='posix' or install tiermem[gpu]")
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.options = WriterOptions(io_threads, zstd_level, backend)
        self._ring = StagingRing(limit or 0, self.pin, grow=limit is None)
        self._lock = threading.Lock()  # guards _jobs, _thread, _closed
        self._stage_lock = threading.Lock()  # one save stages at a time: ring regions stay in job order
        self._jobs: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def save(self, state_dict: Any, path: str | os.PathLike, *, compress: str | None = None,
             keep: int | None = None, overwrite: bool = False) -> SaveHandle:
        """Stage `state_dict` and queue it for writing to directory `path`; see `save_async`."""
        t0 = time.perf_counter()
        if compress not in (None, "zstd"):
            raise ConfigError(f"compress must be None or 'zstd', got {compress!r}")
        if keep is not None:
            check_integer("keep (the number of checkpoints to keep)", keep, minimum=1)
        final = checkpoint_path(path).absolute()
        blocking = next((parent for parent in final.parents if parent.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise CheckpointError(f"cannot save checkpoint {final}: {blocking} is a file, not a directory")
        if final.exists() and not overwrite:
            raise CheckpointError(f"checkpoint {final} already exists: choose a new path or pass "
                                  "overwrite=True")
        reason = why_not_replaceable(final, MANIFEST, (FORMAT,))
        if reason:
            raise CheckpointError(f"{reason}: overwrite=True replaces only a tiermem checkpoint; choose a new path "
                                  "or remove it yourself")
        structure, tensors = flatten(state_dict)
        shards = plan_shards(tensors, compress, self.shard_bytes)
        job = Job(final, shards, new_manifest(structure, compress), compress, keep, overwrite)
        with self._stage_lock:
            if self._closed:
                raise CheckpointError("this AsyncCheckpointer is closed; create a new one to save")
            if self._ring.grow:
                self._ring.reserve(sum(s.stream_bytes for s in shards))
            piece_bytes = min(MAX_PIECE, max(PAGE, self._ring.capacity // 4 // PAGE * PAGE))
            self._submit(job)
            self._stage(job, [t for _, t in tensors], cut_pieces(shards, piece_bytes))
        return SaveHandle(final, job.future, time.perf_counter() - t0)

    def _submit(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="tiermem-checkpoint-writer")
                self._thread.start()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    if self._closed:
                        self._ring.release()
                    return
                job = self._jobs.popleft()
            write_job(job, self._ring, self.options)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _stage(self, job: Job, tensors: list[torch.Tensor], pieces: Any) -> None:
        """Copy every piece into the ring and queue it; return once all copies have landed."""
        sources: dict[int, torch.Tensor] = {}  # tensor index -> flat uint8 view of its bytes
        streams: dict[torch.device, torch.cuda.Stream] = {}
        region = None
        try:
            for piece in pieces:
                if job.failed.is_set():  # the writer gave up (disk full...): stop copying
                    break
                region = self._ring.alloc(piece.end - piece.begin) if piece.end > piece.begin else None
                events = self._fill(piece, region, tensors, sources, streams) if region else []
                job.pieces.put((piece, region, events))
                region = None
            for stream in streams.values():  # the caller waits for its copies, nothing more
                stream.synchronize()
        except BaseException as exc:
            for stream in streams.values():
                stream.synchronize()
            if region is not None:
                self._ring.free(region)
            job.pieces.put(ABORT)
            if isinstance(exc, Exception) and not isinstance(exc, TiermemError):
                raise CheckpointError(f"copying the state dict into staging memory for {job.final} failed: "
                                      f"{exc}") from exc
            raise
        job.pieces.put(END)

    def _fill(self, piece: Piece, region: Region, tensors: list[torch.Tensor],
              sources: dict[int, torch.Tensor], streams: dict) -> list[torch.cuda.Event]:
        """Copy the piece's spans into the region (GPU: async on a side stream) and zero the gaps."""
        cursor = 0
        for span in piece.spans:
            index = span.tensor.index
            if index not in sources:
                sources[index] = self._source_bytes(tensors[index], streams)
            region.tensor[cursor:span.region_offset].zero_()  # alignment padding between tensors
            dst = region.tensor[span.region_offset:span.region_offset + span.nbytes]
            src = sources[index][span.offset:span.offset + span.nbytes]
            if src.is_cuda:
                with torch.cuda.stream(streams[src.device]):
                    dst.copy_(src, non_blocking=True)
            else:
                dst.copy_(src)
            cursor = span.region_offset + span.nbytes
            if span.offset + span.nbytes == span.tensor.nbytes:
                del sources[index]  # last span of this tensor: drop the (maybe contiguous-copied) source
        region.tensor[cursor:piece.end - piece.begin].zero_()
        events = []
        for stream in streams.values():
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events

    def _source_bytes(self, tensor: torch.Tensor, streams: dict) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 tensor on its own device."""
        tensor = tensor.detach()
        if not tensor.is_cuda:
            return tensor.contiguous().reshape(-1).view(torch.uint8)
        if tensor.device not in streams:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor's producers first
            streams[tensor.device] = stream
        with torch.cuda.stream(streams[tensor.device]):
            return tensor.contiguous().reshape(-1).view(torch.uint8)

    def close(self, wait: bool = True) -> None:
        """No new saves; with wait=True block until pending saves are durable. Releases staging memory."""
        with self._stage_lock, self._lock:
            self._closed = True
            thread = self._thread
            if thread is None:
                self._ring.release()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kvikio_usable() -> bool:
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def save_async(state_dict: Any, path: str | os.PathLike, compress: str | None = None, keep: int | None = None,
               *, overwrite: bool = False, checkpointer: AsyncCheckpointer | None = None) -> SaveHandle:
    """Save a nested state dict to directory `path` in the background; returns once it is staged.

    state_dict: dicts, lists and tuples of tensors (CPU or CUDA; bf16/fp16/fp32/fp64/int/bool/fp8),
      int, float, bool, str and None. Tensors are saved as independent copies (aliasing is not kept).
    compress: None (plain safetensors shards) or "zstd" (each tensor a zstd frame).
    keep: after the new checkpoint is durable, delete all but the `keep` newest tiermem checkpoints
      in the same parent directory (ordered by their manifest's creation time).
    checkpointer: reuse its staging buffer and writer (saves through one checkpointer complete in
      order). Without it a one-shot AsyncCheckpointer is made, and it releases its buffer when
      this save finishes.
    """
    if checkpointer is not None:
        return checkpointer.save(state_dict, path, compress=compress, keep=keep, overwrite=overwrite)
    one_shot = AsyncCheckpointer()
    try:
        return one_shot.save(state_dict, path, compress=compress, keep=keep, overwrite=overwrite)
    finally:
        one_shot.close(wait=False)
