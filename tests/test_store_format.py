import json
import os
import shutil

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from tiermem.errors import ChecksumError, StoreError
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, quantize
from tiermem.storage.format import StoreReader, StoreWriter
from tiermem.storage.manifest import manifest_checksum
from tiermem.storage.safetensors_io import read_header

INT4 = QuantScheme(4, 16)


def make_blocks():
    g = torch.Generator().manual_seed(0)
    return {
        "embed": {"model.embed_tokens.weight": torch.randn(16, 32, generator=g)},
        "layers.0": {
            "model.layers.0.self_attn.q_proj.weight": quantize(torch.randn(32, 32, generator=g), INT4),
            "model.layers.0.self_attn.q_proj.bias": torch.randn(32, generator=g),
            "model.layers.0.input_layernorm.weight": torch.randn(32, generator=g).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": quantize(torch.randn(48, 32, generator=g), INT4),
        },
        "layers.1": {
            "model.layers.1.input_layernorm.weight": torch.randn(32, generator=g).half(),
            "model.layers.1.mlp.down_proj.weight": quantize(torch.randn(32, 48, generator=g), INT4),
            "model.layers.1.rotary.inv_freq": torch.arange(5, dtype=torch.int64),
        },
        "head": {"model.norm.weight": torch.ones(32), "lm_head.weight": quantize(torch.randn(16, 32), INT4)},
    }


CONFIG = {"model_type": "llama", "hidden_size": 32, "rms_norm_eps": 1e-6, "num_hidden_layers": 2}


def write_store(path, blocks=None, tokenizer=True):
    path.mkdir()
    blocks = make_blocks() if blocks is None else blocks
    writer = StoreWriter(path)
    for name, tensors in blocks.items():
        writer.add_block(name, tensors)
    files = []
    if tokenizer:
        (path.parent / "tokenizer.json").write_text('{"model": {}}')
        files = [path.parent / "tokenizer.json"]
    writer.finish(CONFIG, INT4, files)
    return blocks


def assert_same(actual, expected):
    if isinstance(expected, QuantizedWeight):
        assert isinstance(actual, QuantizedWeight)
        assert actual.scheme == expected.scheme and actual.shape == expected.shape
        for part in ("qdata", "scale", "zero"):
            assert torch.equal(getattr(actual, part), getattr(expected, part))
    else:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "store"
    return path, write_store(path)


@pytest.fixture
def store(pristine, tmp_path):
    path, blocks = pristine
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    return copy, blocks


def test_round_trip(store):
    path, blocks = store
    reader = StoreReader(path)
    assert reader.block_names == list(blocks)
    assert reader.model_config == CONFIG and reader.quant == INT4
    assert reader.manifest["tokenizer_files"] == ["tokenizer.json"] and (path / "tokenizer.json").is_file()
    for name, tensors in blocks.items():
        assert reader.block_nbytes(name) == reader.block_file(name).stat().st_size
        loaded = reader.load_block(name)
        assert list(loaded) == list(tensors)
        for tname, value in tensors.items():
            assert_same(loaded[tname], value)
    specs = reader.tensor_specs("layers.0")
    assert specs["model.layers.0.self_attn.q_proj.weight"] == ((32, 32), "int4")
    assert specs["model.layers.0.input_layernorm.weight"] == ((32,), torch.bfloat16)


def test_read_block_into_buffer_and_zero_copy_decode(store):
    path, blocks = store
    reader = StoreReader(path)
    out = torch.zeros(reader.block_nbytes("layers.0") + 4096, dtype=torch.uint8)
    buf = reader.read_block("layers.0", out=out)
    assert buf.data_ptr() == out.data_ptr() and buf.numel() == reader.block_nbytes("layers.0")
    decoded = reader.decode_block("layers.0", buf)
    lo, hi = out.data_ptr(), out.data_ptr() + out.numel()
    for value in decoded.values():
        for t in [value.qdata, value.scale, value.zero] if isinstance(value, QuantizedWeight) else [value]:
            assert lo <= t.data_ptr() < hi  # a view into the buffer, not a copy
    bias = decoded["model.layers.0.self_attn.q_proj.bias"]
    bias_offset = bias.data_ptr() - out.data_ptr()
    out[bias_offset:bias_offset + 4] = torch.tensor([1.5], dtype=torch.float32).view(torch.uint8)
    assert bias[0].item() == 1.5
    with pytest.raises(StoreError):
        reader.read_block("layers.0", out=torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(StoreError):
        reader.decode_block("layers.0", buf[:100])
    with pytest.raises(StoreError, match="no block named"):
        reader.block_nbytes("layers.9")


def test_decode_block_is_device_agnostic(store):
    path, blocks = store
    reader = StoreReader(path)
    buf = reader.read_block("layers.1")
    decoded = reader.decode_block("layers.1", buf.to("meta"))  # no data: only views, shapes and dtypes
    down = decoded["model.layers.1.mlp.down_proj.weight"]
    assert down.qdata.device.type == "meta" and down.qdata.shape == (32, 24)
    assert down.scale.dtype == torch.float16 and down.scale.shape == (32, 3)
    assert decoded["model.layers.1.rotary.inv_freq"].shape == (5,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_block_on_cuda(store):
    path, blocks = store
    reader = StoreReader(path)
    decoded = reader.decode_block("layers.0", reader.read_block("layers.0").cuda())
    for tname, value in blocks["layers.0"].items():
        got = decoded[tname]
        assert_same(got.to("cpu") if isinstance(got, QuantizedWeight) else got.cpu(), value)


def test_files_are_aligned_valid_safetensors(store):
    path, blocks = store
    reader = StoreReader(path)
    for name, tensors in blocks.items():
        file = reader.block_file(name)
        assert file.stat().st_size % 4096 == 0
        header, data_start = read_header(file)
        assert data_start == 4096
        assert header["__metadata__"]["block"] == name
        for key, info in header.items():
            if not key.startswith(("__pad__", "__metadata__")):
                assert (data_start + info["data_offsets"][0]) % 256 == 0
        with safe_open(file, "pt") as f:
            for tname, value in tensors.items():
                if isinstance(value, QuantizedWeight):
                    for part in ("qdata", "scale", "zero"):
                        assert torch.equal(f.get_tensor(f"{tname}.{part}"), getattr(value, part))
                else:
                    assert torch.equal(f.get_tensor(tname), value)


@pytest.fixture(scope="module")
def corrupt_target(pristine, tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "store"
    shutil.copytree(pristine[0], path)
    return path


@settings(max_examples=40, deadline=None)
@given(block=st.sampled_from(["embed", "layers.0", "layers.1", "head"]), where=st.floats(0, 1),
       flip=st.integers(1, 255))
@example(block="embed", where=0.0, flip=1)  # the header length prefix
@example(block="layers.0", where=0.49, flip=0x20)  # header padding (spaces)
@example(block="head", where=1.0, flip=0x80)  # the last byte of the tail padding
def test_any_flipped_byte_is_detected(corrupt_target, block, where, flip):
    reader = StoreReader(corrupt_target)
    file = reader.block_file(block)
    original = file.read_bytes()
    position = min(int(where * len(original)), len(original) - 1)
    corrupted = bytearray(original)
    corrupted[position] ^= flip
    file.write_bytes(bytes(corrupted))
    try:
        with pytest.raises(ChecksumError, match=file.name):
            reader.read_block(block)
        with pytest.raises(ChecksumError, match=file.name):
            StoreReader(corrupt_target).load_block(block)
    finally:
        file.write_bytes(original)


@settings(max_examples=30, deadline=None)
@given(block=st.sampled_from(["embed", "layers.0", "head"]), keep=st.floats(0, 1), grow=st.booleans())
def test_truncated_or_grown_file_fails_at_open(corrupt_target, block, keep, grow):
    file = corrupt_target / f"{block}.safetensors"
    original = file.read_bytes()
    changed = original + b"\0" * 4096 if grow else original[: int(keep * (len(original) - 1))]
    file.write_bytes(changed)
    try:
        with pytest.raises(StoreError, match=file.name):
            StoreReader(corrupt_target)
    finally:
        file.write_bytes(original)


def test_a_path_that_is_no_store_directory_says_so(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a tiermem store"):
        StoreReader(tmp_path / "file")
    with pytest.raises(StoreError, match="no manifest.json"):
        StoreReader(tmp_path / "missing")
    with pytest.raises(StoreError, match="a store is a directory path, got None"):
        StoreReader(None)


def test_missing_file_fails_at_open(store):
    path, _ = store
    os.remove(path / "layers.1.safetensors")
    with pytest.raises(StoreError, match="layers.1.safetensors"):
        StoreReader(path)


def test_missing_tokenizer_file_fails_at_open(store):
    path, _ = store
    os.remove(path / "tokenizer.json")
    with pytest.raises(StoreError, match="tokenizer.json"):
        StoreReader(path)


def leaves(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*prefix, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from leaves(v, (*prefix, i))
    else:
        yield prefix


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 0
    return [*value, 1] if isinstance(value, list) else None


@settings(max_examples=40, deadline=None)
@given(choice=st.integers(0, 10**6))
def test_any_manifest_value_edit_is_detected(corrupt_target, choice):
    manifest_file = corrupt_target / "manifest.json"
    original = manifest_file.read_bytes()
    manifest = json.loads(original)
    paths = list(leaves(manifest))
    target = paths[choice % len(paths)]
    node = manifest
    for key in target[:-1]:
        node = node[key]
    node[target[-1]] = changed(node[target[-1]])
    manifest_file.write_text(json.dumps(manifest))
    try:
        with pytest.raises(StoreError, match="manifest"):
            StoreReader(corrupt_target)
    finally:
        manifest_file.write_bytes(original)


@settings(max_examples=40, deadline=None)
@given(where=st.floats(0, 1), flip=st.integers(1, 255))
def test_flipped_manifest_byte_is_detected_or_harmless(corrupt_target, where, flip):
    manifest_file = corrupt_target / "manifest.json"
    original = manifest_file.read_bytes()
    corrupted = bytearray(original)
    corrupted[min(int(where * len(original)), len(original) - 1)] ^= flip
    manifest_file.write_bytes(bytes(corrupted))
    try:
        try:
            reader = StoreReader(corrupt_target)
        except StoreError:
            return
        # Accepted only if the edit was whitespace: the parsed manifest is unchanged.
        assert json.dumps(reader.manifest, sort_keys=True) == json.dumps(
            {k: v for k, v in json.loads(original).items() if k != "checksum"}, sort_keys=True)
    finally:
        manifest_file.write_bytes(original)


def rewrite_manifest(path, edit):
    """Apply `edit` to the manifest body and re-sign it, as a careless tool would."""
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["checksum"]
    edit(manifest)
    manifest["checksum"] = manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def set_part(key, value):
    def edit(m):
        m["blocks"][1]["tensors"]["model.layers.0.self_attn.q_proj.bias"][key] = value
    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(version=2), "version 2 is not supported"),
        (lambda m: m.update(format="other"), "not a tiermem store"),
        (lambda m: m["blocks"].pop(2), "not listed in the manifest"),
        (lambda m: m.update(blocks=[]), "non-empty"),
        (lambda m: m["blocks"][0].update(nbytes=m["blocks"][0]["nbytes"] + 4096), "truncated"),
        (lambda m: m["blocks"][0].update(file="../x.safetensors"), "names file"),
        (lambda m: m["blocks"][0].update(checksum="zz"), "bad checksum"),
        (lambda m: m["blocks"][1].update(name="embed"), "duplicate"),
        (lambda m: m.update(quant={"bits": 3, "group_size": 16}), "bad quant"),
        (lambda m: m.update(quant=None), "quantization"),
        (lambda m: m.update(model_config=[]), "model_config"),
        (lambda m: m.update(tokenizer_files=["../etc/passwd"]), "tokenizer_files"),
        (set_part("offset", 10**9), "bad offset"),
        (set_part("offset", 4100), "bad offset"),
        (set_part("dtype", "F64"), "malformed"),
        (set_part("shape", [33]), "malformed"),
        (set_part("offset", 4096), "overlap"),
    ],
)
def test_resigned_structural_edits_are_rejected(store, edit, message):
    path, _ = store
    rewrite_manifest(path, edit)
    with pytest.raises(StoreError, match=message):
        StoreReader(path)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"format": "tiermem-store"}', b"\xff\xfe"])
def test_unreadable_manifest(store, content):
    path, _ = store
    (path / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match="manifest"):
        StoreReader(path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="tiermem pack"):
        StoreReader(tmp_path)


def test_writer_checks_its_inputs(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        StoreWriter(tmp_path / "absent")
    writer = StoreWriter(tmp_path)
    specs = {"a": ((2,), torch.float32), "b": ((4, 16), INT4)}
    block = writer.open_block("embed", specs)
    with pytest.raises(StoreError, match="expected a"):
        block.write("b", quantize(torch.randn(4, 16), INT4))
    with pytest.raises(StoreError, match="spec"):
        block.write("a", torch.zeros(2, dtype=torch.float16))
    block.write("a", torch.zeros(2))
    with pytest.raises(StoreError, match="never written"):
        block.finish()
    block.write("b", quantize(torch.randn(4, 16), INT4))
    writer.close_block(block)
    with pytest.raises(StoreError, match="already written"):
        writer.open_block("embed", {})
    with pytest.raises(StoreError, match="block name"):
        writer.open_block("../evil", {})
    with pytest.raises(StoreError, match="reserved"):
        writer.add_block("layers.0", {"__pad__0": torch.zeros(1)})
