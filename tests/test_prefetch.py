import random
import threading
import time
from collections import Counter

import pytest

from tiermem.errors import ChecksumError, TierIOError, TiermemError
from tiermem.prefetch import Prefetcher

NAMES = [f"layers.{i}" for i in range(12)]
WAIT = 5.0  # seconds; generous upper bound for events that should happen at once


class Recorder:
    """A load function that logs what happens, and the release callback that balances it."""

    def __init__(self, delay=None, fail: dict | None = None):
        self.lock = threading.Lock()
        self.delay = delay or (lambda name: 0.0)
        self.fail = fail or {}
        self.begun: list[str] = []
        self.finished: list[str] = []
        self.released: list[str] = []
        self.running = 0
        self.holding = 0  # loads begun and not released (failed loads hold nothing)
        self.peak_holding = 0
        self.threads: set[str] = set()
        self.started = {name: threading.Event() for name in NAMES}

    def load(self, name):
        with self.lock:
            self.begun.append(name)
            self.running += 1
            self.holding += 1
            self.peak_holding = max(self.peak_holding, self.holding)
            self.threads.add(threading.current_thread().name)
        self.started[name].set()
        try:
            time.sleep(self.delay(name))
            if name in self.fail:
                raise self.fail[name]
        except BaseException:
            with self.lock:
                self.holding -= 1
            raise
        finally:
            with self.lock:
                self.running -= 1
        with self.lock:
            self.finished.append(name)
        return ("value", name)

    def release(self, name, value):
        assert value == ("value", name)
        with self.lock:
            self.released.append(name)
            self.holding -= 1

    def assert_balanced(self):
        """Every successful load was released exactly once and nothing is still running."""
        assert self.running == 0
        assert self.holding == 0
        assert Counter(self.released) == Counter(self.finished)


def new_threads(before):
    return set(threading.enumerate()) - before


def test_yields_in_order_whatever_order_loads_complete_in():
    rng = random.Random(0)
    delays = {name: rng.uniform(0, 0.004) for name in NAMES}
    delays[NAMES[0]] = 0.03  # block 0 finishes after block 1 for sure
    rec = Recorder(delay=delays.__getitem__)
    with Prefetcher(rec.load, lookahead=3, io_threads=4, release=rec.release) as p:
        for _ in range(2):
            with p.stream(NAMES) as blocks:
                got = list(blocks)
            assert got == [(name, ("value", name)) for name in NAMES]
    assert rec.finished.index(NAMES[1]) < rec.finished.index(NAMES[0])
    assert all(name.startswith("tiermem-io") for name in rec.threads)  # loads run on its own executor
    rec.assert_balanced()


@pytest.mark.parametrize(("lookahead", "io_threads"), [(1, 1), (2, 4), (4, 2)])
def test_lookahead_is_bounded(lookahead, io_threads):
    """Loads begun and not yet released never exceed lookahead + 1 (the block being consumed plus
    `lookahead` ahead), and load i starts only once block i - lookahead has been handed out."""
    rng = random.Random(lookahead)
    rec = Recorder(delay=lambda name: rng.uniform(0, 0.003))
    violations = []

    def load(name):
        delivered = prefetcher.stats.delivered  # blocks handed to the consumer so far
        if delivered < NAMES.index(name) - lookahead + 1:
            violations.append((name, delivered))
        return rec.load(name)

    prefetcher = Prefetcher(load, lookahead=lookahead, io_threads=io_threads, release=rec.release)
    with prefetcher as p:
        with p.stream(NAMES) as blocks:
            for _ in blocks:
                time.sleep(0.004)  # a slow consumer lets the prefetcher run as far ahead as it may
        assert p.stats.peak_outstanding == lookahead + 1
        assert p.stats.outstanding == 0
    assert violations == []
    assert rec.peak_holding == lookahead + 1
    rec.assert_balanced()


def test_load_k_plus_lookahead_waits_until_block_k_is_handed_out():
    gate = threading.Event()
    hold = threading.Event()
    rec = Recorder(delay=lambda name: 0.0)
    original = rec.load

    def load(name):
        if name == NAMES[0]:
            gate.wait(WAIT)
        return original(name)

    got = []

    def consume(p):
        with p.stream(NAMES) as blocks:
            for name, _ in blocks:
                got.append(name)
                hold.wait(WAIT)

    with Prefetcher(load, lookahead=2, io_threads=4, release=rec.release) as p:
        consumer = threading.Thread(target=consume, args=(p,))
        consumer.start()
        assert rec.started[NAMES[1]].wait(WAIT)
        time.sleep(0.05)
        assert set(rec.begun) == {NAMES[1]}  # block 0 is gated; only 0 and 1 were submitted
        gate.set()
        assert rec.started[NAMES[2]].wait(WAIT)  # block 0 handed out -> load 2 may start
        time.sleep(0.05)
        assert got == [NAMES[0]]
        assert set(rec.begun) == set(NAMES[:3])  # load 3 waits until block 1 is handed out
        hold.set()
        consumer.join(WAIT)
        assert not consumer.is_alive()
    assert got == NAMES
    rec.assert_balanced()


def _leave_early(p, rec, how):
    with p.stream(NAMES) as blocks:
        for i, (name, value) in enumerate(blocks):
            assert value == ("value", name)
            if i == 1:
                if how == "break":
                    break
                raise RuntimeError("consumer failed")
    # leaving the context waited for running loads and released every loaded value
    rec.assert_balanced()


@pytest.mark.parametrize("how", ["break", "raise"])
def test_leaving_early_cancels_pending_loads_and_releases_buffers(how):
    before = set(threading.enumerate())
    rec = Recorder(delay=lambda name: 0.01)
    p = Prefetcher(rec.load, lookahead=3, io_threads=2, release=rec.release)
    if how == "raise":
        with pytest.raises(RuntimeError, match="consumer failed"):
            _leave_early(p, rec, how)
    else:
        _leave_early(p, rec, how)
    assert p.stats.cancelled >= 1  # with 2 threads, some submitted loads had not started
    assert len(rec.begun) < len(NAMES)
    assert p.stats.outstanding == 0
    # the prefetcher is still usable for the next pass
    with p.stream(NAMES) as blocks:
        assert [name for name, _ in blocks] == NAMES
    p.close()
    rec.assert_balanced()
    assert new_threads(before) == set()


def test_oserror_in_a_load_surfaces_as_tier_io_error_naming_the_block():
    bad = NAMES[3]
    rec = Recorder(delay=lambda name: 0.002, fail={bad: OSError(5, "Input/output error")})
    got = []
    with Prefetcher(rec.load, lookahead=2, io_threads=4, release=rec.release) as p:
        with p.stream(NAMES) as blocks:
            with pytest.raises(TierIOError, match=bad) as info:
                for name, _ in blocks:
                    got.append(name)
            assert isinstance(info.value, TiermemError)
            assert isinstance(info.value.__cause__, OSError)
            with pytest.raises(StopIteration):  # later blocks are never yielded
                next(blocks)
        assert got == NAMES[:3]
        assert p.stats.outstanding == 0
    rec.assert_balanced()


def test_tiermem_errors_from_a_load_pass_through_unchanged():
    rec = Recorder(fail={NAMES[0]: ChecksumError("layers.0.safetensors: checksum mismatch")})
    with Prefetcher(rec.load, lookahead=2, release=rec.release) as p, p.stream(NAMES) as blocks:
        with pytest.raises(ChecksumError, match="layers.0.safetensors"):
            next(blocks)
    rec.assert_balanced()


def test_repeated_streams_reuse_the_same_threads():
    before = set(threading.enumerate())
    rec = Recorder()
    seen = set()
    with Prefetcher(rec.load, lookahead=2, io_threads=3, release=rec.release) as p:
        for _ in range(25):
            with p.stream(NAMES) as blocks:
                assert [name for name, _ in blocks] == NAMES
            seen |= new_threads(before)
    assert 1 <= len(seen) <= 3 + 1  # the I/O threads and the event-loop thread, created once
    assert new_threads(before) == set()
    rec.assert_balanced()


def test_close_is_idempotent_and_stops_every_thread():
    before = set(threading.enumerate())
    rec = Recorder()
    p = Prefetcher(rec.load, release=rec.release)
    blocks_cm = p.stream(NAMES)
    blocks = blocks_cm.__enter__()
    next(blocks)
    p.close()  # closes the open stream too
    p.close()
    rec.assert_balanced()
    assert new_threads(before) == set()
    with pytest.raises(TiermemError, match="closed"):
        p.stream(NAMES)


def test_context_manager_closes():
    before = set(threading.enumerate())
    with Prefetcher(lambda name: name) as p, p.stream(["a", "b"]) as blocks:
        assert list(blocks) == [("a", "a"), ("b", "b")]
    assert new_threads(before) == set()
    with pytest.raises(TiermemError):
        p.stream(["a"])


def test_misuse_is_reported():
    with Prefetcher(lambda name: name) as p:
        stream = p.stream(["a"])
        with pytest.raises(TiermemError, match="context manager"):
            next(iter(stream))
        with p.stream(["a", "b"]) as first:
            with pytest.raises(TiermemError, match="another stream"), p.stream(["a"]):
                pass
            assert list(first) == [("a", "a"), ("b", "b")]
        with p.stream([]) as empty:
            assert list(empty) == []
