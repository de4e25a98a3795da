"""The block-store manifest: constants, checksum, and structural validation.

A manifest is trusted only after its checksum (xxh3_64 of the canonical JSON of everything but
"checksum") matches and `validate_manifest` accepted its structure; see storage/format.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import xxhash

from tiermem.errors import ConfigError, StoreError
from tiermem.kernels.quant import QuantScheme
from tiermem.storage.safetensors_io import DTYPE_SIZES, tensor_nbytes

FORMAT_NAME = "tiermem-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_START = 4096
TENSOR_ALIGN = 256
FILE_ALIGN = 4096
MAX_MANIFEST_BYTES = 256 * 2**20
QUANT_PARTS = ("qdata", "scale", "zero")
HEX_DIGITS = "0123456789abcdef"


def manifest_checksum(body: Mapping) -> str:
    """xxh3_64 (hex) of the canonical JSON of a manifest body (everything but "checksum")."""
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def block_file_name(block: str) -> str:
    if not block or block.startswith(".") or not all(c.isalnum() or c in "._-" for c in block):
        raise StoreError(f"block name {block!r} must be non-empty, use only letters, digits, '.', '_', '-'")
    return f"{block}.safetensors"


def fail(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}; the store is corrupt or was edited; re-pack it with `tiermem pack`")


def _check_part(path: Path, where: str, part: object, file_nbytes: int) -> tuple[int, int]:
    ok = (
        isinstance(part, dict)
        and part.get("dtype") in DTYPE_SIZES
        and isinstance(part.get("shape"), list)
        and all(type(d) is int and d >= 0 for d in part["shape"])
        and type(part.get("offset")) is int
        and type(part.get("nbytes")) is int
    )
    if not ok or part["nbytes"] != tensor_nbytes(part["dtype"], part["shape"]):
        raise fail(path, f"malformed tensor entry {where}")
    begin, end = part["offset"], part["offset"] + part["nbytes"]
    if begin % TENSOR_ALIGN or begin < DATA_START or end > file_nbytes:
        raise fail(path, f"tensor {where} lies at bad offset {begin}..{end} of a {file_nbytes}-byte file")
    return begin, end


def _check_tensor(path: Path, where: str, entry: object, quant: QuantScheme | None, nbytes: int) -> list:
    if not isinstance(entry, dict):
        raise fail(path, f"malformed tensor entry {where}")
    if "quant" not in entry:
        return [_check_part(path, where, entry, nbytes)]
    shape = entry.get("shape")
    if quant is None or entry.get("quant") != quant.name or entry.get("group_size") != quant.group_size:
        raise fail(path, f"quantized tensor {where} does not match the store's quantization {quant}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise fail(path, f"bad shape for quantized tensor {where}")
    try:
        quant.check_shape(where, tuple(shape))
    except ConfigError as exc:
        raise fail(path, str(exc)) from exc
    parts = entry.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(QUANT_PARTS):
        raise fail(path, f"quantized tensor {where} must have parts {QUANT_PARTS}")
    expected = {"qdata": ("U8", quant.packed_shape(*shape)), "scale": ("F16", quant.groups_shape(*shape)),
                "zero": ("F16", quant.groups_shape(*shape))}
    spans = []
    for key, (dtype, part_shape) in expected.items():
        spans.append(_check_part(path, f"{where}.{key}", parts[key], nbytes))
        if parts[key]["dtype"] != dtype or tuple(parts[key]["shape"]) != tuple(part_shape):
            raise fail(path, f"part {key} of {where} has the wrong dtype or shape")
    return spans


def validate_manifest(body: object, path: Path) -> None:
    """Structural validation of a manifest body (after its checksum matched)."""
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise fail(path, "not a tiermem store manifest")
    if body.get("version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {body.get('version')!r} is not supported "
                         f"(this tiermem reads version {FORMAT_VERSION}); re-pack the checkpoint")
    if not isinstance(body.get("model_config"), dict):
        raise fail(path, "model_config must be an object")
    files = body.get("tokenizer_files")
    if not isinstance(files, list) or not all(isinstance(f, str) and Path(f).name == f for f in files):
        raise fail(path, "tokenizer_files must be a list of file names")
    if "quant" not in body:
        raise fail(path, "manifest has no quant entry (null for a dense store)")
    quant = quant_of(body["quant"], path)
    blocks = body.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise fail(path, "blocks must be a non-empty list")
    seen: set[str] = set()
    for block in blocks:
        keys_ok = isinstance(block, dict) and {"name", "file", "nbytes", "checksum", "tensors"} <= set(block)
        if not keys_ok or not isinstance(block["name"], str) or block["name"] in seen:
            raise fail(path, f"malformed or duplicate block entry {str(block)[:80]}")
        seen.add(block["name"])
        where = f"block {block['name']}"
        if block["file"] != block_file_name(block["name"]):
            raise fail(path, f"{where} names file {block['file']!r}")
        nbytes = block["nbytes"]
        if type(nbytes) is not int or nbytes < DATA_START or nbytes % FILE_ALIGN:
            raise fail(path, f"{where} has a bad size {nbytes!r}")
        checksum = block["checksum"]
        hex_ok = isinstance(checksum, str) and len(checksum) == 16 and set(checksum) <= set(HEX_DIGITS)
        if not hex_ok:
            raise fail(path, f"{where} has a bad checksum {checksum!r}")
        if not isinstance(block["tensors"], dict):
            raise fail(path, f"{where}: tensors must be an object")
        spans = sorted(s for name, entry in block["tensors"].items()
                       for s in _check_tensor(path, f"{name} ({where})", entry, quant, nbytes))
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
            raise fail(path, f"{where}: tensors overlap")


def quant_of(value: object, path: Path) -> QuantScheme | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"bits", "group_size"} or \
            not all(type(v) is int for v in value.values()):
        raise fail(path, f"bad quant entry {value!r}")
    try:
        return QuantScheme(value["bits"], value["group_size"])
    except (ConfigError, TypeError) as exc:
        raise fail(path, f"bad quant entry {value!r}") from exc
