"""Durable publication: write into a temporary sibling, fsync, rename into place, fsync the parent.

A reader never sees a half-written file or directory under its final name: either the old
content or the complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".tmp-"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, deepest first, root last."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def temp_sibling(final: Path) -> Path:
    """A unique hidden name next to final, recognisable as unfinished by TMP_MARKER."""
    return final.parent / f".{final.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}"


def why_not_replaceable(path: Path, manifest_name: str, formats: tuple[str, ...]) -> str | None:
    """None when overwrite=True may replace `path`, else why not.

    It may replace what is absent, an empty directory, or a directory whose manifest (JSON, `manifest_name`) has
    a "format" of `formats`: never a file or a directory of something else (overwrite is not a way to delete a
    user's files).
    """
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} is a file"
    if not any(path.iterdir()):
        return None
    try:
        manifest = json.loads((path / manifest_name).read_bytes())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") in formats:
        return None
    return f"{path} is a directory that does not hold a complete {' or '.join(formats)} (no readable {manifest_name})"


def is_unfinished(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARKER in path.name


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success publish it as `final` durably.

    On an exception inside the block the temporary directory is removed and `final` is untouched.
    With overwrite=True an existing `final` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        publish_directory(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename a complete, fsynced directory into place and fsync the parent."""
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists")
        old = temp_sibling(final)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(final.parent)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


def write_file_atomic(final: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `final` so that it is either absent/old or complete and durable."""
    final = Path(final)
    tmp = temp_sibling(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_path(final.parent)
