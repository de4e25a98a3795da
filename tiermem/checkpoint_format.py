"""On-disk format of tiermem checkpoints: nesting structure, shard layout and the manifest.

A checkpoint is a directory holding `data-NNNNN.safetensors` shards and `manifest.json`, which is
written last. The manifest records the nesting of the state dict (dicts, lists, tuples and the
non-tensor leaves: int, float, bool, str, None) and, per tensor, its shard, absolute offset,
dtype, shape, byte counts, compression (None or "zstd") and the xxh3_64 of its raw bytes.
Uncompressed shards are plain safetensors files (aligned by `plan_layout`); in a zstd shard each
tensor is stored as one U8 entry holding a zstd frame, and its header metadata says so.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tiermem.errors import CheckpointError, NotACheckpointError, StoreError
from tiermem.storage.durable import is_unfinished
from tiermem.storage.manifest import FORMAT_NAME as STORE_FORMAT
from tiermem.storage.manifest import manifest_checksum
from tiermem.storage.safetensors_io import DTYPE_SIZES, dtype_to_str, plan_layout

FORMAT = "tiermem-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
PAGE = 4096
MAX_DEPTH = 200  # levels of nesting of a state dict (deeper ones hit Python's recursion limit)
ALIGN = 256


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _float_leaf(value: float) -> dict:
    return {"value": value} if math.isfinite(value) else {"float": repr(value)}


def flatten(state: Any) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """The JSON-able structure of `state` and its tensors in order, each named by its key path."""
    tensors: list[tuple[str, torch.Tensor]] = []
    names: set[str] = set()
    open_containers: set[int] = set()  # ids of the dicts, lists and tuples `visit` is inside

    def visit(obj: Any, path: tuple) -> dict:
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in open_containers:
                raise CheckpointError(f"the {type(obj).__name__} at {_where(path)} contains itself: a checkpoint "
                                      "holds a tree of values; break the cycle first")
            if len(path) >= MAX_DEPTH:
                raise CheckpointError(f"the state dict is nested deeper than {MAX_DEPTH} levels (at "
                                      f"{_where(path)[:200]}): flatten it first")
            open_containers.add(id(obj))
            try:
                return visit_container(obj, path)
            finally:
                open_containers.discard(id(obj))
        if isinstance(obj, torch.Tensor):
            name = ".".join(str(p) for p in path) or "tensor"
            name = f"t{name}" if name.startswith("__") else name  # "__" names are reserved by safetensors
            base, k = name, 1
            while name in names:
                name, k = f"{base}#{k}", k + 1
            names.add(name)
            tensors.append((name, obj))
            return {"tensor": name}
        if isinstance(obj, float):
            return _float_leaf(obj)
        if obj is None or isinstance(obj, (bool, int, str)):
            return {"value": obj}
        raise CheckpointError(
            f"value of type {type(obj).__name__} at {_where(path)} cannot be checkpointed: a checkpoint "
            "holds tensors, dicts, lists, tuples, int, float, bool, str and None; convert it first")

    def visit_container(obj: dict | list | tuple, path: tuple) -> dict:
        if isinstance(obj, dict):
            for key in obj:
                if not (key is None or isinstance(key, (str, int, float))):
                    raise CheckpointError(
                        f"key {key!r} ({type(key).__name__}) at {_where(path)}: checkpoint dict keys must be "
                        "str, int, float, bool or None; convert the key first")
            return {"dict": [[key, visit(val, (*path, key))] for key, val in obj.items()]}
        kind = "tuple" if isinstance(obj, tuple) else "list"
        return {kind: [visit(val, (*path, i)) for i, val in enumerate(obj)]}

    return visit(state, ()), tensors


def _where(path: tuple) -> str:
    return repr(".".join(str(p) for p in path)) if path else "the top level"


def unflatten(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`: rebuild the nested state from the structure and the loaded tensors."""
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {key: unflatten(val, tensors) for key, val in node["dict"]}
    if "list" in node:
        return [unflatten(val, tensors) for val in node["list"]]
    if "tuple" in node:
        return tuple(unflatten(val, tensors) for val in node["tuple"])
    if "float" in node:
        return float(node["float"])
    return node["value"]


@dataclass(frozen=True)
class TensorPlan:
    """Where one tensor goes: its shard and its offset in that shard's staging stream."""

    index: int  # position in the flattened tensor list
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    nbytes: int
    start: int  # offset in the shard's stream (raw shards: file offset - data_start)


@dataclass
class ShardPlan:
    file: str
    tensors: list[TensorPlan]
    stream_bytes: int  # bytes to stage; raw shards: file size - data_start
    header: bytes = b""  # raw shards only: length prefix + header, exactly data_start bytes


@dataclass(frozen=True)
class Span:
    tensor: TensorPlan
    offset: int  # byte offset inside the tensor
    region_offset: int  # byte offset inside the piece's staging region
    nbytes: int


@dataclass
class Piece:
    """A contiguous range [begin, end) of one shard's stream, staged and written as one unit."""

    shard: int
    begin: int
    end: int
    spans: list[Span] = field(default_factory=list)
    last_in_shard: bool = False


def plan_shards(tensors: list[tuple[str, torch.Tensor]], compress: str | None,
                shard_bytes: int) -> list[ShardPlan]:
    """Group tensors into shards of about `shard_bytes` and lay each shard out (no tensors: no shard)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for index, (name, tensor) in enumerate(tensors):
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise CheckpointError(f"tensor {name!r}: only dense tensors with data can be checkpointed")
        try:
            dtype = dtype_to_str(tensor.dtype)
        except StoreError as exc:
            raise CheckpointError(f"tensor {name!r}: {exc}") from None
        nbytes = tensor.numel() * DTYPE_SIZES[dtype]
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(TensorPlan(index, name, dtype, tuple(tensor.shape), nbytes, 0))
        size += nbytes
    return [_layout(f"data-{i:05d}.safetensors", group, compress) for i, group in enumerate(groups) if group]


def _layout(file: str, group: list[TensorPlan], compress: str | None) -> ShardPlan:
    if compress is not None:  # staging stream only; the file is laid out once sizes are known
        placed, cursor = [], 0
        for t in group:
            cursor = round_up(cursor, ALIGN)
            placed.append(TensorPlan(t.index, t.name, t.dtype, t.shape, t.nbytes, cursor))
            cursor += t.nbytes
        return ShardPlan(file, placed, round_up(cursor, PAGE))
    entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in group]
    header, offsets = plan_layout(entries, {"format": FORMAT})  # data_start grows if the header needs it
    start = len(header)
    placed = [TensorPlan(t.index, t.name, t.dtype, t.shape, t.nbytes, off - start)
              for t, off in zip(group, offsets, strict=True)]
    end = max((t.start + t.nbytes for t in placed), default=0)
    return ShardPlan(file, placed, round_up(end, PAGE), header)


def cut_pieces(shards: list[ShardPlan], piece_bytes: int) -> Iterator[Piece]:
    """Split every shard's stream into pieces of at most `piece_bytes` (an empty shard gets one)."""
    for s, shard in enumerate(shards):
        begins = list(range(0, shard.stream_bytes, piece_bytes)) or [0]
        for i, begin in enumerate(begins):
            end = min(begin + piece_bytes, shard.stream_bytes)
            piece = Piece(s, begin, end, last_in_shard=i == len(begins) - 1)
            for t in shard.tensors:
                lo, hi = max(begin, t.start), min(end, t.start + t.nbytes)
                if lo < hi:
                    piece.spans.append(Span(t, lo - t.start, lo - begin, hi - lo))
            yield piece


def manifest_bytes(body: dict) -> bytes:
    """The manifest file: the body plus `checksum` = xxh3_64 of the body's canonical JSON."""
    full = dict(body, checksum=manifest_checksum(body))
    return json.dumps(full, separators=(",", ":"), allow_nan=False).encode()


def new_manifest(structure: dict, compress: str | None) -> dict:
    return {"format": FORMAT, "version": VERSION, "created_ns": time.time_ns(), "compression": compress,
            "structure": structure, "files": {}, "tensors": {}}


def read_manifest(path: str | Path) -> dict:
    """Parse and check a checkpoint's manifest; CheckpointError saying what is wrong otherwise."""
    file = Path(path) / MANIFEST
    if Path(path).is_file():
        raise NotACheckpointError(f"{path} is a file; a tiermem checkpoint is a directory (made by save_async)")
    try:
        body = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise NotACheckpointError(f"{path} is not a tiermem checkpoint: {MANIFEST} is missing "
                                  "(an unfinished save never has one); pick a complete checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}; the checkpoint is damaged") from exc
    if isinstance(body, dict) and body.get("format") == STORE_FORMAT:
        raise NotACheckpointError(f"{path} is a tiermem block store, not a checkpoint: open it with tiermem.load "
                                  "(`tiermem info` shows it; loading checks its checksums)")
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a tiermem checkpoint manifest")
    if body.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {body.get('version')} is not supported "
                              f"(this tiermem reads version {VERSION}); upgrade tiermem")
    if body.pop("checksum", None) != manifest_checksum(body):
        raise CheckpointError(f"{file}: manifest checksum mismatch; the manifest was edited or is corrupt")
    missing = [key for key in ("structure", "files", "tensors") if not isinstance(body.get(key), dict)]
    if missing:
        raise CheckpointError(f"{file} has no {missing[0]!r} object; the manifest was edited or is corrupt")
    return body


def list_checkpoints(parent: Path) -> list[tuple[int, Path]]:
    """Complete tiermem checkpoints directly under `parent`, oldest first, as (created_ns, path)."""
    found = []
    for entry in parent.iterdir() if parent.is_dir() else []:
        if is_unfinished(entry) or not (entry / MANIFEST).is_file():
            continue
        try:
            found.append((int(read_manifest(entry)["created_ns"]), entry))
        except (CheckpointError, KeyError, ValueError, TypeError):
            continue  # not ours or damaged: never pruned
    return sorted(found)
