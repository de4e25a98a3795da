"""Reading tiermem checkpoints back: `load` (every checksum verified) and `verify` (a report)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
import zstandard

from tiermem.checkpoint_format import read_manifest, unflatten
from tiermem.config import format_size
from tiermem.errors import CheckpointError, ConfigError, NotACheckpointError, StoreError
from tiermem.storage.safetensors_io import read_header, str_to_dtype

CHUNK = 16 << 20  # bytes per read while verifying


def _pread_into(fd: int, out: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{file} ends at byte {offset + done}, before the data the manifest "
                                  "records; the file is truncated")
        done += n


def _decompress_into(fd: int, entry: dict, out: memoryview, file: Path) -> None:
    blob = bytearray(entry["stored_nbytes"])
    _pread_into(fd, memoryview(blob), entry["offset"], file)
    done = 0
    with zstandard.ZstdDecompressor().stream_reader(bytes(blob)) as reader:
        while done < len(out) and (n := reader.readinto(out[done:])):
            done += n
        if done != len(out) or reader.read(1):
            raise zstandard.ZstdError(f"frame holds a different size than the {len(out)} bytes recorded")


def _read_tensor(fd: int, name: str, entry: dict, file: Path) -> torch.Tensor:
    """One tensor's bytes, decompressed and checked against the manifest's xxh3_64."""
    data = torch.empty(entry["nbytes"], dtype=torch.uint8)
    out = memoryview(data.numpy()).cast("B")
    try:
        if entry["compression"] == "zstd":
            _decompress_into(fd, entry, out, file)
        elif entry["compression"] is None:
            _pread_into(fd, out, entry["offset"], file)
        else:
            raise CheckpointError(f"tensor {name!r}: unknown compression {entry['compression']!r}; "
                                  "upgrade tiermem")
    except OSError as exc:
        raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise CheckpointError(f"tensor {name!r} in {file}: corrupt zstd data ({exc}); "
                              "the checkpoint is damaged") from exc
    if xxhash.xxh3_64_hexdigest(out) != entry["xxh3_64"]:
        raise CheckpointError(f"checksum mismatch for tensor {name!r} in {file}: the data is corrupt; "
                              "load an older checkpoint or restore this one from a copy")
    return data.view(str_to_dtype(entry["dtype"])).reshape(entry["shape"])


class _Files:
    """Open data files of one checkpoint, closed together."""

    def __init__(self, root: Path) -> None:
        self.root, self.fds = root, {}

    def fd(self, file: str) -> int:
        if file not in self.fds:
            try:
                self.fds[file] = os.open(self.root / file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise CheckpointError(f"cannot open {self.root / file}: {exc}; "
                                      "the checkpoint is incomplete") from exc
        return self.fds[file]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def checkpoint_path(path: object) -> Path:
    """`path` as a Path; CheckpointError for what is not a path (None, a number)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"a checkpoint path is a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _load_device(device: object) -> torch.device:
    """ConfigError for a device torch does not know or this machine does not have."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device: use 'cpu' or 'cuda'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available here: load with device='cpu'")
    return device


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The state dict saved at `path`, with tensors on `device`; every tensor's checksum is verified.

    Raises CheckpointError naming the tensor and file on any mismatch or damage.
    """
    root = checkpoint_path(path)
    device = _load_device(device)
    manifest = read_manifest(root)
    files = _Files(root)
    try:
        tensors = {name: _read_tensor(files.fd(e["file"]), name, e, root / e["file"]).to(device)
                   for name, e in manifest["tensors"].items()}
    finally:
        files.close()
    return unflatten(manifest["structure"], tensors)


@dataclass
class VerifyReport:
    """What `verify` found: counts, bytes, and every failure as (tensor or file, what is wrong)."""

    path: Path
    files: int = 0
    tensors: int = 0
    tensors_ok: int = 0
    nbytes: int = 0  # tensor data, uncompressed
    stored_bytes: int = 0  # data files on disk
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.tensors_ok == self.tensors


def _check_file(root: Path, file: str, info: dict, entries: dict[str, dict]) -> str | None:
    """Size and safetensors header of one data file against the manifest; the problem, or None."""
    actual = (root / file).stat().st_size
    if actual != info["nbytes"]:
        return f"{actual} bytes on disk but {info['nbytes']} recorded; the file is truncated or damaged"
    header, start = read_header(root / file)
    for name, e in entries.items():
        h = header.get(name)
        shape = e["shape"] if e["compression"] is None else [e["stored_nbytes"]]
        dtype = e["dtype"] if e["compression"] is None else "U8"
        if h is None or (h["dtype"], h["shape"], start + h["data_offsets"][0]) != (dtype, shape, e["offset"]):
            return f"safetensors header entry of tensor {name!r} disagrees with the manifest"
    return None


def _hash_chunks(fd: int, entry: dict, file: Path) -> Iterator[memoryview]:
    if entry["compression"] is None:
        buf = memoryview(bytearray(min(CHUNK, entry["nbytes"])))
        for off in range(0, entry["nbytes"], CHUNK):
            view = buf[:min(CHUNK, entry["nbytes"] - off)]
            _pread_into(fd, view, entry["offset"] + off, file)
            yield view
    else:  # compressed tensors are bounded by the shard size: decompress whole
        out = torch.empty(entry["nbytes"], dtype=torch.uint8)
        _decompress_into(fd, entry, memoryview(out.numpy()).cast("B"), file)
        yield memoryview(out.numpy()).cast("B")


def verify(path: str | os.PathLike) -> VerifyReport:
    """Check a checkpoint without loading it: manifest, file sizes and headers, every tensor's checksum.
    NotACheckpointError where the path holds no checkpoint at all (a damaged one is a report that fails)."""
    root = checkpoint_path(path)
    report = VerifyReport(root)
    try:
        manifest = read_manifest(root)
    except NotACheckpointError:
        raise
    except CheckpointError as exc:
        report.failed.append(("manifest.json", str(exc)))
        return report
    report.files, report.tensors = len(manifest["files"]), len(manifest["tensors"])
    report.nbytes = sum(e["nbytes"] for e in manifest["tensors"].values())
    bad_files = set()
    for file, info in manifest["files"].items():
        entries = {n: e for n, e in manifest["tensors"].items() if e["file"] == file}
        try:
            problem = _check_file(root, file, info, entries)
            report.stored_bytes += (root / file).stat().st_size
        except (OSError, StoreError) as exc:
            problem = str(exc)
        if problem:
            report.failed.append((file, problem))
            bad_files.add(file)
    files = _Files(root)
    try:
        for name, e in manifest["tensors"].items():
            if e["file"] in bad_files:
                report.failed.append((name, f"in damaged file {e['file']}"))
                continue
            try:
                hasher = xxhash.xxh3_64()
                for chunk in _hash_chunks(files.fd(e["file"]), e, root / e["file"]):
                    hasher.update(chunk)
            except Exception as exc:  # noqa: BLE001 - a report lists every damage it finds
                report.failed.append((name, str(exc)))
                continue
            if hasher.hexdigest() == e["xxh3_64"]:
                report.tensors_ok += 1
            else:
                report.failed.append((name, f"checksum mismatch in {e['file']}"))
    finally:
        files.close()
    return report


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_report(report: VerifyReport) -> str:
    """Human-readable lines for `tiermem checkpoint verify PATH`."""
    lines = [f"{'OK' if report.ok else 'FAILED'}: checkpoint {report.path}",
             f"  {_count(report.tensors, 'tensor')} in {_count(report.files, 'file')}, "
             f"{format_size(report.nbytes)} of tensor data, {format_size(report.stored_bytes)} on disk",
             f"  {report.tensors_ok} of {report.tensors} tensors verified (xxh3_64)"]
    lines += [f"  bad {what}: {why}" for what, why in report.failed]
    if not report.ok:
        lines.append("  this checkpoint is damaged: load an older one or restore it from a copy")
    return "\n".join(lines)
