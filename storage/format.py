"""The block store: a directory of aligned safetensors files (one per block) and a checksummed manifest.

Layout of a store::

    manifest.json            {"format", "version", "model_config", "quant", "tokenizer_files",
                              "blocks": [{"name", "file", "nbytes", "checksum", "tensors"}], "checksum"}
    embed.safetensors        one valid safetensors file per block: data from byte 4096, every
    layers.0.safetensors     tensor at a multiple of 256, file size a multiple of 4096
    ...  head.safetensors
    tokenizer.json ...       copied verbatim

`tensors` maps each logical HF weight name to either a dense part
`{"dtype", "shape", "offset", "nbytes"}` (offset absolute in the file) or a quantized weight
`{"quant": "int4"|"int8", "group_size", "shape": [O, I], "parts": {"qdata", "scale", "zero"}}`
whose parts are stored as the safetensors tensors `{name}.qdata/.scale/.zero`.
Block checksums are xxh3_64 of the whole file; the manifest's own checksum is xxh3_64 of the
canonical JSON of everything else, so that any edit is detected before anything is trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import xxhash

from tiermem.errors import ChecksumError, StoreError
from tiermem.kernels.quant import QuantizedWeight, QuantScheme
from tiermem.storage.durable import write_file_atomic
from tiermem.storage.manifest import (
    DATA_START,
    FILE_ALIGN,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    QUANT_PARTS,
    TENSOR_ALIGN,
    block_file_name,
    fail,
    manifest_checksum,
    quant_of,
    validate_manifest,
)
from tiermem.storage.safetensors_io import (
    dtype_to_str,
    plan_layout,
    str_to_dtype,
    tensor_bytes,
    tensor_nbytes,
)

Value = torch.Tensor | QuantizedWeight
TensorSpec = tuple[tuple[int, ...], torch.dtype | QuantScheme]  # shape, dtype or quant scheme


def _parts_of_spec(name: str, spec: TensorSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """The safetensors tensors (name, dtype, shape) a logical weight is stored as."""
    shape, kind = spec
    if isinstance(kind, QuantScheme):
        kind.check_shape(name, shape)
        packed, groups = kind.packed_shape(*shape), kind.groups_shape(*shape)
        return [(f"{name}.qdata", "U8", packed), (f"{name}.scale", "F16", groups),
                (f"{name}.zero", "F16", groups)]
    return [(name, dtype_to_str(kind), tuple(shape))]


def _values_of(name: str, value: Value, spec: TensorSpec) -> list[torch.Tensor]:
    shape, kind = spec
    if isinstance(kind, QuantScheme):
        ok = isinstance(value, QuantizedWeight) and value.scheme == kind and value.shape == tuple(shape)
        parts = [value.qdata, value.scale, value.zero] if ok else []
    else:
        ok = isinstance(value, torch.Tensor) and value.dtype == kind and tuple(value.shape) == tuple(shape)
        parts = [value] if ok else []
    if not ok:
        raise StoreError(f"tensor {name}: value does not match its declared spec {tuple(shape)} {kind}")
    return parts


def stored_nbytes(name: str, spec: TensorSpec) -> int:
    """Bytes a logical weight takes in a block file: all of its parts (codes, scales and zeros of a quantized one),
    alignment padding aside."""
    return sum(tensor_nbytes(dt, shape) for _, dt, shape in _parts_of_spec(name, spec))


def spec_of(value: Value) -> TensorSpec:
    if isinstance(value, QuantizedWeight):
        return tuple(value.shape), value.scheme
    return tuple(value.shape), value.dtype


class BlockLayout:
    """Where every safetensors part of a block's tensors lies in its file: header, offsets, size."""

    def __init__(self, block: str, specs: Mapping[str, TensorSpec]) -> None:
        self.block = block
        self.specs = dict(specs)
        parts = [p for name, spec in self.specs.items() for p in _parts_of_spec(name, spec)]
        entries = [(n, dt, shape, tensor_nbytes(dt, shape)) for n, dt, shape in parts]
        self.header, offsets = plan_layout(entries, {"format": FORMAT_NAME, "block": block},
                                           DATA_START, TENSOR_ALIGN, FILE_ALIGN)
        self.offsets = dict(zip((p[0] for p in parts), offsets, strict=True))
        self.part_nbytes = {n: nb for n, _dt, _s, nb in entries}
        end = max((off + nb for off, nb in zip(offsets, self.part_nbytes.values(), strict=True)), default=0)
        self.nbytes = -(-max(end, len(self.header)) // FILE_ALIGN) * FILE_ALIGN

    def parts(self, name: str) -> list[tuple[str, int, int]]:
        """(part name, offset, nbytes) of each safetensors tensor a logical weight is stored as."""
        return [(p, self.offsets[p], self.part_nbytes[p]) for p, _dt, _sh in _parts_of_spec(name, self.specs[name])]

    def entry(self, name: str) -> dict:
        """The manifest entry of logical weight `name`."""
        shape, kind = self.specs[name]
        parts = [{"dtype": dt, "shape": list(sh), "offset": self.offsets[p], "nbytes": self.part_nbytes[p]}
                 for p, dt, sh in _parts_of_spec(name, self.specs[name])]
        if isinstance(kind, QuantScheme):
            return {"quant": kind.name, "group_size": kind.group_size, "shape": list(shape),
                    "parts": dict(zip(QUANT_PARTS, parts, strict=True))}
        return parts[0]


class BlockWriter:
    """Writes one block file sequentially: header first, then each tensor in declared order."""

    def __init__(self, directory: Path, block: str, specs: Mapping[str, TensorSpec]) -> None:
        self.block = block
        self.file = block_file_name(block)
        self.path = directory / self.file
        self.layout = BlockLayout(block, specs)
        self._pending = list(self.layout.specs)
        self._hash = xxhash.xxh3_64()
        try:
            self._f = open(self.path, "xb")  # closed by finish() or abort()
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc}") from exc
        self._emit(self.layout.header)

    def _emit(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, value: Value) -> None:
        """Write the next declared tensor (tensors must come in the order of `specs`)."""
        if not self._pending or self._pending[0] != name:
            expected = self._pending[0] if self._pending else "nothing"
            raise StoreError(f"block {self.block}: got tensor {name}, expected {expected} (declared order)")
        tensors = _values_of(name, value, self.layout.specs[name])
        for (_part, offset, _nbytes), tensor in zip(self.layout.parts(name), tensors, strict=True):
            self._emit(b"\0" * (offset - self._f.tell()))
            self._emit(tensor_bytes(tensor.cpu()))
        self._pending.pop(0)

    def finish(self) -> dict:
        """Pad the file to its planned size, close it, and return its manifest entry."""
        if self._pending:
            raise StoreError(f"block {self.block}: tensors never written: {', '.join(self._pending)}")
        self._emit(b"\0" * (-self._f.tell() % FILE_ALIGN))
        nbytes = self._f.tell()
        self._f.close()
        return {"name": self.block, "file": self.file, "nbytes": nbytes, "checksum": self._hash.hexdigest(),
                "tensors": {name: self.layout.entry(name) for name in self.layout.specs}}

    def abort(self) -> None:
        self._f.close()


class StoreWriter:
    """Builds a store inside an existing (usually temporary) directory; `finish` writes the manifest."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"store directory {self.path} does not exist; create it first")
        self.blocks: list[dict] = []

    def open_block(self, block: str, specs: Mapping[str, TensorSpec]) -> BlockWriter:
        if any(b["name"] == block for b in self.blocks):
            raise StoreError(f"block {block} was already written")
        return BlockWriter(self.path, block, specs)

    def close_block(self, writer: BlockWriter) -> None:
        self.blocks.append(writer.finish())

    def add_block(self, block: str, tensors: Mapping[str, Value]) -> None:
        """Write a whole block from in-memory tensors (pack streams through open_block instead)."""
        writer = self.open_block(block, {name: spec_of(value) for name, value in tensors.items()})
        try:
            for name, value in tensors.items():
                writer.write(name, value)
        except BaseException:
            writer.abort()
            raise
        self.close_block(writer)

    def finish(
        self, model_config: dict, quant: QuantScheme | None, tokenizer_files: Iterable[str | os.PathLike] = ()
    ) -> dict:
        """Copy tokenizer files in (paths outside the store; bare names must already be inside) and
        write manifest.json. Returns the manifest."""
        names = []
        for item in tokenizer_files:
            src = Path(item)
            dst = self.path / src.name
            if src.parent != Path(".") and src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            if not dst.is_file():
                raise StoreError(f"tokenizer file {src} not found")
            names.append(src.name)
        body = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_config": model_config,
            "quant": None if quant is None else {"bits": quant.bits, "group_size": quant.group_size},
            "tokenizer_files": names,
            "blocks": self.blocks,
        }
        manifest = {**body, "checksum": manifest_checksum(body)}
        write_file_atomic(self.path / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        return manifest


class StoreReader:
    """Validated, read-only view of a block store; reads and decodes whole blocks."""

    def __init__(self, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise StoreError(f"a store is a directory path, got {path!r}")
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a tiermem store (a directory made by `tiermem pack`)")
        try:
            if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
                raise StoreError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes")
            data = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{self.path} is not a tiermem store (no {MANIFEST_NAME}); "
                             "create one with `tiermem pack`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise fail(manifest_path, f"unreadable manifest ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("checksum"), str):
            raise fail(manifest_path, "manifest has no checksum")
        body = {k: v for k, v in data.items() if k != "checksum"}
        if manifest_checksum(body) != data["checksum"]:
            raise ChecksumError(f"{manifest_path}: checksum mismatch; the manifest was edited or corrupted; "
                                "re-pack the checkpoint")
        validate_manifest(body, manifest_path)
        self.manifest: dict = body
        self.model_config: dict = body["model_config"]
        self.quant: QuantScheme | None = quant_of(body["quant"], manifest_path)
        self._blocks = {b["name"]: b for b in body["blocks"]}
        self.block_names: list[str] = [b["name"] for b in body["blocks"]]
        self._check_files()

    def _check_files(self) -> None:
        for block in self._blocks.values():
            file = self.path / block["file"]
            try:
                size = file.stat().st_size
            except OSError:
                raise StoreError(f"{file} is missing; the store is incomplete; re-pack it") from None
            if size != block["nbytes"]:
                raise StoreError(f"{file} has {size} bytes but the manifest records {block['nbytes']}; "
                                 "the file is truncated or was replaced; re-pack the checkpoint")
        listed = {b["file"] for b in self._blocks.values()}
        extra = sorted(p.name for p in self.path.glob("*.safetensors") if p.name not in listed)
        if extra:
            raise StoreError(f"{self.path}: data files {extra} are not listed in the manifest; "
                             "the manifest was edited or the store mixed with another; re-pack it")
        for name in self.manifest["tokenizer_files"]:
            if not (self.path / name).is_file():
                raise StoreError(f"{self.path / name} is missing; re-pack the checkpoint")

    def _block(self, name: str) -> dict:
        try:
            return self._blocks[name]
        except KeyError:
            raise StoreError(f"{self.path}: no block named {name!r} (blocks: {self.block_names})") from None

    def block_nbytes(self, name: str) -> int:
        return self._block(name)["nbytes"]

    def block_file(self, name: str) -> Path:
        return self.path / self._block(name)["file"]

    def tensor_specs(self, name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        """HF name -> (shape, torch dtype or "int4"/"int8") of the block's logical weights."""
        return {n: (tuple(e["shape"]), e["quant"] if "quant" in e else str_to_dtype(e["dtype"]))
                for n, e in self._block(name)["tensors"].items()}

    def read_block(self, name: str, out: torch.Tensor | None = None, backend=None) -> torch.Tensor:
        """Read the block's file into `out` (or a new tensor), verify its checksum; uint8 [nbytes]."""
        nbytes = self.block_nbytes(name)
        path = self.block_file(name)
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8)
        usable = out.dtype == torch.uint8 and out.device.type == "cpu" and out.is_contiguous()
        if not usable or out.numel() < nbytes:
            raise StoreError(f"read_block({name}): out must be contiguous uint8 on CPU, >= {nbytes} B")
        buf = out.reshape(-1)[:nbytes]
        if backend is None:
            _read_whole(path, buf)
        else:
            backend.read_into(path, 0, buf)
        self.verify_buffer(name, buf)
        return buf

    def verify_buffer(self, name: str, buf: torch.Tensor) -> None:
        """ChecksumError unless `buf` (uint8 CPU) holds exactly the recorded bytes of the block."""
        digest = xxhash.xxh3_64_hexdigest(buf.numpy())
        if digest != self._block(name)["checksum"]:
            raise ChecksumError(f"{self.block_file(name)}: checksum mismatch (block {name}); the file is "
                                "corrupt; re-pack the checkpoint or restore the file")

    def decode_block(self, name: str, buf: torch.Tensor) -> dict[str, torch.Tensor | QuantizedWeight]:
        """Zero-copy views into `buf` (uint8, any device): HF name -> tensor or QuantizedWeight."""
        return decode_entry(self._block(name), buf, self.quant)

    def load_block(self, name: str) -> dict[str, torch.Tensor | QuantizedWeight]:
        return self.decode_block(name, self.read_block(name))

    def verify(self) -> None:
        """Read every block and check its checksum (slow: reads the whole store)."""
        for name in self.block_names:
            self.read_block(name)

    def total_nbytes(self) -> int:
        return sum(self.block_nbytes(n) for n in self.block_names)


def decode_entry(block: dict, buf: torch.Tensor, quant: QuantScheme | None) -> dict[str, Value]:
    """Zero-copy views into `buf` (uint8, any device) of the tensors a block's manifest entry lists."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < block["nbytes"]:
        raise StoreError(f"decode_block({block['name']}): buf must be 1-D uint8 of >= {block['nbytes']} B")

    def view(part: dict) -> torch.Tensor:
        raw = buf[part["offset"]:part["offset"] + part["nbytes"]]
        return raw.view(str_to_dtype(part["dtype"])).reshape(part["shape"])

    out: dict[str, Value] = {}
    for tname, entry in block["tensors"].items():
        if "quant" in entry:
            parts = entry["parts"]
            scheme = QuantScheme(QuantScheme.from_name(entry["quant"]).bits, entry["group_size"])
            out[tname] = QuantizedWeight(view(parts["qdata"]), view(parts["scale"]), view(parts["zero"]),
                                         scheme, tuple(entry["shape"]))
        else:
            out[tname] = view(entry)
    return out


def encode_block(block: str, tensors: Mapping[str, Value],
                 allocate: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Lay a block out exactly as its store file would be, into `allocate(nbytes)` (a uint8 CPU tensor).

    Tensors may live on any device (GPU tensors are copied straight into the buffer). Returns the
    buffer and the block's manifest entry without a checksum (for decode_entry); used to build
    blocks in host memory, e.g. for synthetic benchmarks.
    """
    layout = BlockLayout(block, {name: spec_of(value) for name, value in tensors.items()})
    buffer = allocate(layout.nbytes)
    header = torch.frombuffer(bytearray(layout.header), dtype=torch.uint8)
    buffer[:len(header)] = header
    cursor = len(header)
    for name, value in tensors.items():
        for (_part, offset, nbytes), tensor in zip(layout.parts(name), _values_of(name, value, layout.specs[name]),
                                                    strict=True):
            buffer[cursor:offset].zero_()
            buffer[offset:offset + nbytes].copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
            cursor = offset + nbytes
    buffer[cursor:].zero_()
    return buffer, {"name": block, "file": block_file_name(block), "nbytes": layout.nbytes, "checksum": None,
                    "tensors": {name: layout.entry(name) for name in layout.specs}}


def planned_block_nbytes(block: str, specs: Mapping[str, TensorSpec]) -> int:
    """The size a block of these tensor specs takes in the store (its file size)."""
    return BlockLayout(block, specs).nbytes


def _read_whole(path: Path, buf: torch.Tensor) -> None:
    view = memoryview(buf.numpy()).cast("B")
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    break
                done += n
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if done != len(view) or size != len(view):
        raise StoreError(f"{path} has {size} bytes, expected {len(view)}; the file was truncated or "
                         "replaced; re-pack the checkpoint")

