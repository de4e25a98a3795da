"""Bounded-lookahead prefetcher: runs `schedule.pipeline` with blocking loads overlapped with compute.

An asyncio event loop runs in one background thread; each load is a task on it that enters a
ThreadPoolExecutor owned by the prefetcher through `loop.run_in_executor` (the loads are blocking,
GIL-free I/O). The synchronous consumer gets results through the concurrent futures returned by
`asyncio.run_coroutine_threadsafe`. Threads are created once per Prefetcher and reused by every
`stream` (one pass per decode step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tiermem.errors import ConfigError, TierIOError, TiermemError
from tiermem.schedule import OpKind, Step, pipeline

T = TypeVar("T")


@dataclass
class PrefetchStats:
    """Counters over the prefetcher's lifetime. `outstanding` = loads submitted and not yet released."""

    submitted: int = 0
    cancelled: int = 0
    released: int = 0
    delivered: int = 0
    outstanding: int = 0
    peak_outstanding: int = 0


@dataclass(eq=False)
class _Job:
    """One load of one stream; `started`/`cancelled` are guarded by `lock` (set by two threads)."""

    index: int
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    cancelled: bool = False
    future: concurrent.futures.Future = field(init=False)  # set by Prefetcher._submit


class Prefetcher(Generic[T]):
    """Streams `load(name)` results in order, with at most `lookahead` loads running ahead.

    `release(name, value)` (optional) is called in the consumer's thread for every loaded value
    once it is no longer needed: when the consumer advances past it, or when a stream is left early
    and the value was loaded but never handed out. Use it to recycle buffers.
    """

    def __init__(
        self,
        load: Callable[[str], T],
        lookahead: int = 2,
        io_threads: int = 4,
        release: Callable[[str, T], None] | None = None,
    ) -> None:
        if lookahead < 1 or io_threads < 1:
            raise ConfigError(f"lookahead and io_threads must be >= 1, got {lookahead} and {io_threads}")
        self.lookahead = lookahead
        self.io_threads = io_threads
        self.stats = PrefetchStats()
        self._load = load
        self._release = release
        self._active: _Stream[T] | None = None
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="tiermem-io")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="tiermem-prefetch-loop", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def stream(self, names: Sequence[str]) -> _Stream[T]:
        """A context manager whose value iterates `(name, load(name))` in the order of `names`.

        Leaving the context (normally, by `break`, or by an exception) cancels loads not yet started,
        waits for running ones and releases every loaded value. Only one stream may be open at once.
        """
        if self._closed:
            raise TiermemError("this prefetcher is closed; create a new one")
        return _Stream(self, list(names))

    # -- called by _Stream, in the consumer's thread ------------------------------------------

    def _submit(self, job: _Job) -> None:
        job.future = asyncio.run_coroutine_threadsafe(self._fetch(job), self._loop)
        self.stats.submitted += 1
        self.stats.outstanding += 1
        self.stats.peak_outstanding = max(self.stats.peak_outstanding, self.stats.outstanding)

    def _retire(self, job: _Job, value: T | None, loaded: bool) -> None:
        """Account a job that will no longer be waited on; release its value if it has one."""
        self.stats.outstanding -= 1
        if loaded:
            self.stats.released += 1
            if self._release is not None:
                self._release(job.name, value)

    # -- runs on the event loop and in the I/O threads ---------------------------------------

    async def _fetch(self, job: _Job) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._run_job, job)
        except OSError as exc:
            raise TierIOError(
                f"loading block {job.name!r} failed: {exc}; check the store's files and the disk"
            ) from exc

    def _run_job(self, job: _Job) -> T | None:
        with job.lock:
            if job.cancelled:
                return None
            job.started = True
        return self._load(job.name)

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Close an open stream, stop the event loop and the I/O threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._active is not None:
            self._active.close()
        asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Stream(Generic[T]):
    """One pass over a list of names; see `Prefetcher.stream`. Not thread-safe: one consumer."""

    def __init__(self, owner: Prefetcher[T], names: list[str]) -> None:
        self._owner = owner
        self._steps: tuple[Step, ...] = pipeline(names, owner.lookahead)
        self._jobs: dict[int, _Job] = {}
        self._values: dict[int, T] = {}
        self._position = 0
        self._entered = False
        self._done = False

    def __enter__(self) -> Iterator[tuple[str, T]]:
        if self._entered:
            raise TiermemError("a stream can be entered only once; call stream() again for a new pass")
        if self._owner._closed:
            raise TiermemError("this prefetcher is closed; create a new one")
        if self._owner._active is not None:
            raise TiermemError("another stream of this prefetcher is open: leave its `with` block first")
        self._owner._active = self
        self._entered = True
        self._issue_loads(self._steps[0])
        return self

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return self

    def __next__(self) -> tuple[str, T]:
        if not self._entered:
            raise TiermemError("use the stream as a context manager: `with prefetcher.stream(names) as it:`")
        if self._done:
            raise StopIteration
        self._position += 1
        step = self._steps[self._position]
        for op in step.of_kind(OpKind.RELEASE):
            job = self._jobs.pop(op.index)
            self._owner._retire(job, self._values.pop(op.index), loaded=True)
        compute = step.compute
        if compute is None:
            self.close()
            raise StopIteration
        try:
            value = self._jobs[compute.index].future.result()
        except BaseException:  # the load failed, or the wait was interrupted: close() sorts it out
            self.close()
            raise
        self._values[compute.index] = value
        self._owner.stats.delivered += 1
        self._issue_loads(step)
        return compute.name, value

    def _issue_loads(self, step: Step) -> None:
        for op in step.of_kind(OpKind.LOAD):
            job = _Job(op.index, op.name)
            self._jobs[op.index] = job
            self._owner._submit(job)

    def close(self) -> None:
        """Cancel loads not started, wait for running ones, release every loaded value (idempotent)."""
        if self._done:
            return
        self._done = True
        if self._owner._active is self:
            self._owner._active = None
        for job in self._jobs.values():
            with job.lock:
                job.cancelled = not job.started
            if job.cancelled:
                job.future.cancel()
                self._owner.stats.cancelled += 1
        concurrent.futures.wait([job.future for job in self._jobs.values()])  # running loads finish
        for index, job in sorted(self._jobs.items()):
            if index in self._values:
                self._owner._retire(job, self._values.pop(index), loaded=True)
            elif job.cancelled or job.future.cancelled() or job.future.exception() is not None:
                self._owner._retire(job, None, loaded=False)
            else:
                self._owner._retire(job, job.future.result(), loaded=True)
        self._jobs.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()
