"""storage.page_cache: how much of a file the page cache holds (mincore), and bench's check of the disk tier."""

import mmap
import os
import sys
from types import SimpleNamespace

import pytest

from tiermem import bench
from tiermem.storage import page_cache
from tiermem.storage.page_cache import cached_bytes, cached_fraction, evict

SIZE = 8 << 20


@pytest.fixture
def written(tmp_path):
    """Two files just written (so cached), and whether this filesystem lets them be evicted (tmpfs does not)."""
    paths = [tmp_path / f"block.{i}" for i in range(2)]
    for p in paths:
        p.write_bytes(os.urandom(SIZE))
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    evict([probe])
    return paths, cached_bytes(probe) == 0


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or sys.platform != "linux", reason="needs Linux")
def test_cached_bytes_follows_reads_and_eviction(written):
    paths, evictable = written
    assert cached_bytes(paths[0]) == SIZE and cached_fraction(paths) == 1.0
    if not evictable:
        pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to evict")
    evict(paths[:1])
    assert cached_bytes(paths[0]) == 0 and cached_fraction(paths) == pytest.approx(0.5)
    with open(paths[0], "rb") as f:
        f.seek(SIZE // 2)
        f.read(1 << 20)  # a buffered read caches what it read (and some readahead), not the whole file
    assert (1 << 20) <= cached_bytes(paths[0]) < SIZE


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux")
def test_empty_files_and_no_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert cached_bytes(empty) == 0 and cached_fraction([empty]) is None and cached_fraction([]) is None


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or sys.platform != "linux", reason="needs Linux")
def test_a_file_is_counted_window_by_window(written, monkeypatch):
    """cached_bytes maps a file a window at a time (here 3 pages, so the last window is short)."""
    paths, evictable = written
    if not evictable:
        pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to evict")
    monkeypatch.setattr(page_cache, "_WINDOW", 3 * mmap.PAGESIZE)
    evict(paths[:1])
    with open(paths[0], "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly the pages read
        for page in (0, 4, 5, SIZE // mmap.PAGESIZE - 1):
            f.seek(page * mmap.PAGESIZE)
            f.read(1)
    assert cached_bytes(paths[0]) == 4 * mmap.PAGESIZE


def test_a_file_mincore_does_not_report_for_is_not_told(written, monkeypatch):
    """Since Linux 5.2 mincore calls every page of a file the caller may not write resident: no figure then."""
    monkeypatch.setattr(page_cache, "_mincore_tells", lambda path: False)
    assert cached_bytes(written[0][0]) is None and cached_fraction(written[0]) is None


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or sys.platform != "linux", reason="needs Linux")
def test_bench_reports_the_disk_tiers_blocks_in_the_page_cache(written):
    paths, evictable = written
    files = dict(zip(("layers.0", "layers.1"), paths, strict=True))
    model = SimpleNamespace(source=SimpleNamespace(weights=SimpleNamespace(disk_names=frozenset(files))),
                            reader=SimpleNamespace(block_file=files.__getitem__))
    assert bench.disk_tier_page_cache(model) == {"disk_blocks_page_cached_fraction": 1.0}
    if evictable:
        evict(paths)
        assert bench.disk_tier_page_cache(model) == {"disk_blocks_page_cached_fraction": 0.0}
    resident_only = SimpleNamespace(source=SimpleNamespace(weights=SimpleNamespace(disk_names=frozenset())))
    assert bench.disk_tier_page_cache(resident_only) == {}
    assert bench.disk_tier_page_cache(SimpleNamespace(source=None)) == {}


def test_bench_warns_when_a_run_read_its_disk_blocks_from_ram():
    run = {"batch": 64, "micro_batches": 1, "prefill_s": 1.0, "decode_step_s": 1.2, "decode_tok_per_s": 53.0,
           "peak_gpu_bytes": None}
    result = {"model": "m", "quant": "int4", "machine": {"gpu": None}, "ceilings": {}, "placement": {},
              "runs": [dict(run, disk_blocks_page_cached_fraction=0.98)]}
    assert "WARNING: at batch [64]" in bench.format_table(result) and "page cache" in bench.format_table(result)
    result["runs"] = [dict(run, disk_blocks_page_cached_fraction=0.01)]
    assert "WARNING" not in bench.format_table(result)


def test_bench_notes_a_step_that_beat_its_roofline():
    run = {"batch": 16, "micro_batches": 1, "prefill_s": 1.0, "decode_step_s": 2.0, "decode_tok_per_s": 8.0,
           "peak_gpu_bytes": None}
    result = {"model": "m", "quant": "int4", "machine": {"gpu": None}, "ceilings": {}, "placement": {},
              "runs": [dict(run, fraction_of_roofline=1.15)]}
    assert "NOTE: at batch [16] the step beat its roofline" in bench.format_table(result)
    result["runs"] = [dict(run, fraction_of_roofline=0.99)]
    assert "NOTE" not in bench.format_table(result)
