"""safetensors files at the byte level: dtype names, aligned layouts, and header validation.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`),
then the tensor data, whose offsets are relative to the end of the header, contiguous and
covering the rest of the file exactly. `plan_layout` produces such headers with every tensor's
data aligned (explicit `__pad__N` U8 tensors fill the gaps, because offsets must be contiguous);
`read_header` applies safetensors' own validation rules before anything trusts the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence

import torch

from tiermem.errors import StoreError

MAX_HEADER_SIZE = 100_000_000  # safetensors refuses larger headers
PAD_PREFIX = "__pad__"
METADATA_KEY = "__metadata__"

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
DTYPE_SIZES: dict[str, int] = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}

Entry = tuple[str, str, Sequence[int], int]  # (name, dtype string, shape, nbytes)


def dtype_to_str(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype string ("F32", ...)."""
    try:
        return SAFETENSORS_DTYPES[dtype]
    except KeyError:
        raise StoreError(f"dtype {dtype} cannot be stored in safetensors; convert the tensor first") from None


def str_to_dtype(name: str) -> torch.dtype:
    """safetensors dtype string -> torch dtype."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise StoreError(f"unknown safetensors dtype {name!r}") from None


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor as a memoryview (no copy when it is already contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_layout(
    entries: list[Entry],
    metadata: dict[str, str] | None = None,
    data_start: int = 4096,
    align: int = 256,
    file_align: int = 4096,
) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix + space-padded JSON) and each entry's absolute file offset.

    Tensor data starts at `data_start` (grown to the next multiple of `file_align` only if the
    header does not fit), every tensor's offset is a multiple of `align`, and `__pad__N` tensors
    make the file size a multiple of `file_align`. The caller writes the header, then each
    tensor at its offset, writing zero bytes for the gaps (the padding tensors).
    """
    if data_start % align or file_align % align or data_start % 8:
        raise StoreError(f"data_start {data_start} and file_align {file_align} must be multiples of {align}")
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise StoreError("safetensors metadata must map str to str")
        header[METADATA_KEY] = dict(metadata)
    relative: list[int] = []
    cursor = 0
    pads = 0

    def pad_to(target: int) -> None:
        nonlocal cursor, pads
        if target > cursor:
            header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [target - cursor],
                                             "data_offsets": [cursor, target]}
            pads += 1
            cursor = target

    for name, dtype, shape, nbytes in entries:
        if name in header or name.startswith(PAD_PREFIX) or name == METADATA_KEY:
            raise StoreError(f"tensor name {name!r} is reserved or duplicated; rename the tensor")
        if dtype not in DTYPE_SIZES:
            raise StoreError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
        if nbytes != tensor_nbytes(dtype, shape):
            raise StoreError(f"tensor {name!r}: {nbytes} bytes do not match {dtype} {list(shape)}")
        pad_to(_round_up(cursor, align))
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape],
                        "data_offsets": [cursor, cursor + nbytes]}
        relative.append(cursor)
        cursor += nbytes
    pad_to(_round_up(cursor, file_align))

    text = json.dumps(header, separators=(",", ":")).encode()
    start = data_start
    if 8 + len(text) > start:
        start = _round_up(8 + len(text), file_align)
    prefix = struct.pack("<Q", start - 8) + text + b" " * (start - 8 - len(text))
    return prefix, [start + offset for offset in relative]


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The parsed header of a safetensors file and the absolute offset where its data starts.

    Applies safetensors' rules: header length <= 100 MB and inside the file, valid UTF-8 JSON
    object, known dtypes, sizes matching shapes, offsets contiguous from 0 and ending exactly at
    the end of the file. Raises StoreError naming the file otherwise.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise StoreError(f"{path}: {size} bytes is too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_SIZE:
                raise StoreError(f"{path}: header length {length} exceeds {MAX_HEADER_SIZE} bytes")
            if 8 + length > size:
                raise StoreError(f"{path}: header length {length} runs past the end of the file ({size} B)")
            raw = f.read(length)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    header = parse_header(raw, path)
    validate_offsets(header, size - 8 - length, path)
    return header, 8 + length


def parse_header(raw: bytes, path: str | os.PathLike) -> dict:
    """Decode and type-check the JSON header (without checking offsets against the file)."""
    if not raw.startswith(b"{"):
        raise StoreError(f"{path}: safetensors header does not start with '{{'; the file is corrupt")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: safetensors header is not valid JSON ({exc}); file corrupt") from exc
    if not isinstance(header, dict):
        raise StoreError(f"{path}: safetensors header is not a JSON object")
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StoreError(f"{path}: __metadata__ must map strings to strings")
    for name, info in header.items():
        if name == METADATA_KEY:
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in DTYPE_SIZES
            and isinstance(info.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int and o >= 0 for o in info["data_offsets"])
        )
        if not ok:
            raise StoreError(f"{path}: malformed entry for tensor {name!r} in the safetensors header")
        begin, end = info["data_offsets"]
        if end - begin != tensor_nbytes(info["dtype"], info["shape"]):
            raise StoreError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match dtype/shape")
    return header


def validate_offsets(header: dict, data_len: int, path: str | os.PathLike) -> None:
    """Offsets must be contiguous from 0 and cover exactly `data_len` bytes."""
    spans = sorted(tuple(info["data_offsets"]) for name, info in header.items() if name != METADATA_KEY)
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise StoreError(f"{path}: tensor data offsets are not contiguous at byte {cursor}; file corrupt")
        cursor = end
    if cursor != data_len:
        raise StoreError(
            f"{path}: tensors cover {cursor} data bytes but the file holds {data_len}; "
            "the file is truncated or corrupt"
        )
