import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiermem.errors import StoreError
from tiermem.storage.safetensors_io import (
    SAFETENSORS_DTYPES,
    dtype_to_str,
    plan_layout,
    read_header,
    str_to_dtype,
    tensor_bytes,
)


def write_aligned(path, tensors, metadata=None, **layout):
    entries = [(n, dtype_to_str(t.dtype), list(t.shape), t.nbytes) for n, t in tensors.items()]
    header, offsets = plan_layout(entries, metadata, **layout)
    file_align = layout.get("file_align", 4096)
    with open(path, "wb") as f:
        f.write(header)
        for t, offset in zip(tensors.values(), offsets, strict=True):
            f.write(b"\0" * (offset - f.tell()))
            f.write(tensor_bytes(t))
        f.write(b"\0" * (-f.tell() % file_align))
    return header, offsets


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.f16": torch.randn(7, generator=g).half(),
        "w.bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }


def test_dtype_tables_round_trip():
    for dtype, name in SAFETENSORS_DTYPES.items():
        assert str_to_dtype(name) == dtype and dtype_to_str(dtype) == name
    with pytest.raises(StoreError):
        dtype_to_str(torch.complex64)
    with pytest.raises(StoreError):
        str_to_dtype("C64")


def test_plan_layout_alignment_and_safe_open(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "a.safetensors"
    header, offsets = write_aligned(path, tensors, {"block": "embed"})
    assert len(header) == 4096
    assert all(o % 256 == 0 for o in offsets) and offsets[0] == 4096
    assert path.stat().st_size % 4096 == 0
    parsed, start = read_header(path)
    assert start == 4096 and parsed["__metadata__"] == {"block": "embed"}
    for name, offset in zip(tensors, offsets, strict=True):
        assert parsed[name]["data_offsets"][0] + start == offset
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"block": "embed"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
        pads = [k for k in f.keys() if k.startswith("__pad__")]
        assert pads and all(f.get_tensor(k).dtype == torch.uint8 for k in pads)


def test_plan_layout_grows_header_that_does_not_fit(tmp_path):
    tensors = {f"model.layers.{i}.some_long_module.weight": torch.full((3,), float(i)) for i in range(200)}
    path = tmp_path / "big.safetensors"
    header, offsets = write_aligned(path, tensors)
    assert len(header) > 4096 and len(header) % 4096 == 0
    assert offsets[0] == len(header)
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.7.some_long_module.weight"), torch.full((3,), 7.0))


@pytest.mark.parametrize(
    "entries",
    [
        [("a", "F32", [2], 4)],  # wrong nbytes
        [("a", "F32", [1], 4), ("a", "F32", [1], 4)],  # duplicate
        [("__pad__0", "U8", [1], 1)],  # reserved
        [("a", "Q4", [1], 1)],  # unknown dtype
    ],
)
def test_plan_layout_rejects(entries):
    with pytest.raises(StoreError):
        plan_layout(entries)


def test_read_header_accepts_files_written_by_safetensors(tmp_path):
    tensors = sample_tensors()
    del tensors["empty"]
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    header, start = read_header(tmp_path / "ref.safetensors")
    assert set(header) - {"__metadata__"} == set(tensors)
    assert start > 8


def raw_file(path, header_obj, data: bytes, length=None):
    text = json.dumps(header_obj).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


@pytest.mark.parametrize(
    ("header_obj", "data", "length"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None),  # truncated data
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None),  # trailing bytes
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None),  # gap at start
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None),  # size vs shape
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),  # bad dtype
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None),  # bad shape
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None),  # missing offsets
        ({"__metadata__": {"k": 1}}, b"", None),  # non-string metadata
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9),  # header > file
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 200_000_000),  # > 100 MB
    ],
)
def test_read_header_rejects(tmp_path, header_obj, data, length):
    path = raw_file(tmp_path / "bad.safetensors", header_obj, data, length)
    with pytest.raises(StoreError, match="bad.safetensors"):
        read_header(path)


@pytest.mark.parametrize(
    "content", [b"", b"\x01\x02", struct.pack("<Q", 4) + b"[1] ", struct.pack("<Q", 3) + b"{x}"]
)
def test_read_header_rejects_garbage(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="junk.safetensors"):
        read_header(path)


def test_read_header_missing_file(tmp_path):
    with pytest.raises(StoreError, match="nope.safetensors"):
        read_header(tmp_path / "nope.safetensors")
