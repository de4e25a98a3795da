import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from tiermem.errors import PackError
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, quantize
from tiermem.storage import hf
from tiermem.storage.format import StoreReader
from tiermem.storage.pack import block_of, block_order, default_should_quantize, pack_checkpoint

CONFIG = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3, "vocab_size": 64}
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 8}',
             "special_tokens_map.json": '{"eos_token": "</s>"}'}


def tiny_tensors(layers=3, d=32, ffn=48, vocab=64):
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = torch.randn(d, d, generator=g)
        t[p + "self_attn.q_proj.bias"] = torch.randn(d, generator=g)
        t[p + "mlp.gate_proj.weight"] = torch.randn(ffn, d, generator=g).bfloat16()
        t[p + "mlp.up_proj.weight"] = torch.randn(ffn, d, generator=g).half()
        t[p + "mlp.down_proj.weight"] = torch.randn(d, ffn, generator=g)
        t[p + "input_layernorm.weight"] = torch.randn(d, generator=g)
        t[p + "post_attention_layernorm.weight"] = torch.randn(d, generator=g).bfloat16()
    t["model.layers.0.self_attn.rotary_emb.step"] = torch.tensor([3], dtype=torch.int64)
    t["model.norm.weight"] = torch.randn(d, generator=g)
    t["lm_head.weight"] = torch.randn(vocab, d, generator=g)
    return t


def write_checkpoint(path, tensors, shards=1, config=CONFIG, tokenizer=True):
    """A HF-style directory: config.json, model.safetensors or N shards with an index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        for name, text in TOKENIZER.items():
            (path / name).write_text(text)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("model.embed_tokens.weight", "embed"),
        ("model.layers.0.self_attn.q_proj.weight", "layers.0"),
        ("model.layers.12.mlp.down_proj.bias", "layers.12"),
        ("model.norm.weight", "head"),
        ("lm_head.weight", "head"),
        ("model.decoder.embed_tokens.weight", "embed"),
        ("model.decoder.embed_positions.weight", "embed"),
        ("model.decoder.layers.3.fc1.weight", "layers.3"),
        ("model.decoder.final_layer_norm.bias", "head"),
        ("model.decoder.project_out.weight", "head"),
        ("decoder.final_layer_norm.weight", "head"),
        ("model.normalizer.weight", "embed"),
        ("model.sublayers.1.weight", "embed"),
    ],
)
def test_block_of(name, block):
    assert block_of(name) == block


def test_block_order_is_numeric():
    assert block_order({"head", "layers.10", "layers.2", "embed", "layers.0"}) == [
        "embed", "layers.0", "layers.2", "layers.10", "head"]


def test_default_should_quantize():
    assert default_should_quantize("model.layers.0.mlp.up_proj.weight", (48, 32))
    assert default_should_quantize("lm_head.weight", (64, 32))
    assert not default_should_quantize("model.embed_tokens.weight", (64, 32))
    assert not default_should_quantize("model.layers.0.input_layernorm.weight", (32,))
    assert not default_should_quantize("model.layers.0.self_attn.q_proj.bias", (32,))
    assert not default_should_quantize("model.norm.weight", (32,))


@pytest.mark.parametrize("shards", [1, 3])
def test_pack_dense_is_bit_exact(tmp_path, shards):
    tensors = tiny_tensors()
    src = write_checkpoint(tmp_path / "hf", tensors, shards=shards)
    dst = pack_checkpoint(src, tmp_path / "store", quant=None, progress=False)
    reader = StoreReader(dst)
    assert reader.block_names == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    assert reader.model_config == CONFIG and reader.quant is None
    loaded = {}
    for block in reader.block_names:
        for name, value in reader.load_block(block).items():
            assert block_of(name) == block
            loaded[name] = value
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert sorted(reader.manifest["tokenizer_files"]) == sorted(TOKENIZER)
    for name, text in TOKENIZER.items():
        assert (dst / name).read_text() == text


@pytest.mark.parametrize(("bits", "shards"), [(4, 1), (8, 2)])
def test_pack_quantizes_exactly_the_selected_weights(tmp_path, bits, shards):
    tensors = tiny_tensors()
    scheme = QuantScheme(bits, 16)
    src = write_checkpoint(tmp_path / "hf", tensors, shards=shards)
    reader = StoreReader(pack_checkpoint(src, tmp_path / "store", quant=scheme, progress=False))
    assert reader.quant == scheme
    selected = {n for n, t in tensors.items() if default_should_quantize(n, tuple(t.shape))}
    assert len(selected) == 3 * 7 + 1
    quantized = set()
    for block in reader.block_names:
        for name, value in reader.load_block(block).items():
            if isinstance(value, QuantizedWeight):
                quantized.add(name)
                expected = quantize(tensors[name], scheme, name)
                assert value.shape == expected.shape and value.scheme == scheme
                assert torch.equal(value.qdata, expected.qdata) and torch.equal(value.scale, expected.scale)
                assert torch.equal(value.zero, expected.zero)
                assert reader.tensor_specs(block)[name] == (tuple(tensors[name].shape), scheme.name)
            else:
                assert torch.equal(value, tensors[name]) and value.dtype == tensors[name].dtype
    assert quantized == selected


def test_pack_custom_selection_and_dtype(tmp_path):
    tensors = tiny_tensors(layers=1)
    src = write_checkpoint(tmp_path / "hf", tensors)
    dst = pack_checkpoint(
        src, tmp_path / "store", quant=QuantScheme(8, 16), progress=False, dtype=torch.float16,
        should_quantize=lambda name, shape: ".mlp." in name and len(shape) == 2,
    )
    reader = StoreReader(dst)
    layer = reader.load_block("layers.0")
    assert {n for n, v in layer.items() if isinstance(v, QuantizedWeight)} == {
        f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert layer["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert torch.equal(layer["model.layers.0.self_attn.q_proj.weight"],
                       tensors["model.layers.0.self_attn.q_proj.weight"].half())
    assert layer["model.layers.0.self_attn.rotary_emb.step"].dtype == torch.int64  # ints untouched
    assert reader.load_block("head")["lm_head.weight"].dtype == torch.float16


def test_pack_a_checkpoint_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    reader = StoreReader(pack_checkpoint(tmp_path / "hf", tmp_path / "store", quant=QuantScheme(4, 16),
                                         progress=False))
    assert reader.block_names == ["embed", "layers.0", "layers.1", "head"]
    assert reader.model_config["model_type"] == "llama" and reader.model_config["num_hidden_layers"] == 2
    stored = {n: v for b in reader.block_names for n, v in reader.load_block(b).items()}
    state = model.state_dict()
    assert set(stored) == set(state)
    for name, value in state.items():
        if isinstance(stored[name], QuantizedWeight):
            assert torch.equal(stored[name].qdata, quantize(value, QuantScheme(4, 16)).qdata)
        else:
            assert torch.equal(stored[name], value)


def test_failure_mid_pack_leaves_no_store(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "hf", tiny_tensors(), shards=2)
    real_load = hf.HFCheckpoint.load_tensor
    calls = []

    def failing_load(self, name):
        calls.append(name)
        if len(calls) == 20:
            raise RuntimeError("disk vanished")
        return real_load(self, name)

    monkeypatch.setattr(hf.HFCheckpoint, "load_tensor", failing_load)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="disk vanished"):
        pack_checkpoint(src, out / "store", progress=False)
    assert list(out.iterdir()) == []  # neither the store nor its hidden temporary directory


def test_pack_refuses_existing_destination_unless_overwrite(tmp_path):
    src = write_checkpoint(tmp_path / "hf", tiny_tensors(layers=1))
    dst = pack_checkpoint(src, tmp_path / "store", progress=False)
    with pytest.raises(PackError, match="already exists"):
        pack_checkpoint(src, dst, progress=False)
    pack_checkpoint(src, dst, quant=QuantScheme(4, 16), progress=False, overwrite=True)
    assert StoreReader(dst).quant == QuantScheme(4, 16)


def test_overwrite_replaces_only_a_store(tmp_path):
    """overwrite=True is not a way to delete what is not a store: a user's directory or file stays as it was."""
    src = write_checkpoint(tmp_path / "hf", tiny_tensors(layers=1))
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.txt").write_text("years of work")
    file = tmp_path / "notes.txt"
    file.write_text("notes")
    for dst, words in ((project, "does not hold a complete tiermem-store"), (file, "is a file")):
        with pytest.raises(PackError, match=words):
            pack_checkpoint(src, dst, progress=False, overwrite=True)
    assert (project / "thesis.txt").read_text() == "years of work" and file.read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes.txt", "project"]  # no temporary left
    (tmp_path / "empty").mkdir()
    assert StoreReader(pack_checkpoint(src, tmp_path / "empty", progress=False, overwrite=True)).block_names


def test_pack_never_replaces_its_own_source(tmp_path):
    src = write_checkpoint(tmp_path / "models" / "hf", tiny_tensors(layers=1))
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, src.parent, tmp_path, src / ".." / "hf"):
        with pytest.raises(PackError, match="would replace the checkpoint"):
            pack_checkpoint(src, dst, progress=False, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before
    assert StoreReader(pack_checkpoint(src, src / "store", progress=False)).block_names  # inside it is fine


def test_pack_errors(tmp_path):
    tensors = tiny_tensors(layers=1)
    src = write_checkpoint(tmp_path / "hf", tensors, shards=2)
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    index["weight_map"]["model.layers.0.extra.weight"] = shard  # named but not in the shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(PackError, match="does not contain tensor model.layers.0.extra.weight"):
        pack_checkpoint(src, tmp_path / "s1", progress=False)

    index["weight_map"]["model.layers.0.extra.weight"] = "model-missing.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(PackError, match="model-missing.safetensors"):
        pack_checkpoint(src, tmp_path / "s2", progress=False)

    index_file.unlink()
    with pytest.raises(PackError, match="model.safetensors"):
        pack_checkpoint(src, tmp_path / "s3", progress=False)

    (src / "config.json").unlink()
    with pytest.raises(PackError, match="config.json"):
        pack_checkpoint(src, tmp_path / "s4", progress=False)

    src2 = write_checkpoint(tmp_path / "hf2", tensors)
    with pytest.raises(PackError, match="group_size"):
        pack_checkpoint(src2, tmp_path / "s5", quant=QuantScheme(4, 64), progress=False)
    with pytest.raises(PackError, match="int3"):
        pack_checkpoint(src2, tmp_path / "s6", quant="int3", progress=False)
    (src2 / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    with pytest.raises(PackError, match="model.safetensors"):
        pack_checkpoint(src2, tmp_path / "s7", progress=False)
    assert not any(p.name.startswith("s") for p in tmp_path.iterdir())


def test_progress_bar(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "hf", tiny_tensors(layers=1))
    pack_checkpoint(src, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    pack_checkpoint(src, tmp_path / "loud", progress=True)
    err = capsys.readouterr().err
    assert "pack loud" in err and "100%" in err


# VmHWM, not ru_maxrss: ru_maxrss survives exec, so the child would inherit pytest's high-water mark.
RSS_CHILD = textwrap.dedent("""
    import sys
    import torch
    from tiermem.kernels.quant import QuantScheme
    from tiermem.storage.pack import pack_checkpoint

    def vm(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    torch.set_num_threads(1)
    base = vm("VmHWM")
    quant = None if sys.argv[3] == "none" else QuantScheme.from_name(sys.argv[3], 64)
    pack_checkpoint(sys.argv[1], sys.argv[2], quant=quant, progress=False)
    print(vm("VmHWM") - base)
""")


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory):
    """~530 MB fp32, 12 layers of ~43 MB in 12 shards (plus embed/head in a 13th)."""
    path = tmp_path_factory.mktemp("large") / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    d, weight_map, sizes = 1024, {}, {}
    for i in range(12):
        layer = {f"model.layers.{i}.mlp.{p}.weight": torch.rand(2816, d) for p in ("up_proj", "gate_proj")}
        layer[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.rand(d, d)
        layer[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.rand(d, d)
        layer[f"model.layers.{i}.mlp.down_proj.weight"] = torch.rand(d, 2816)
        layer[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(d)
        save_file(layer, path / f"model-{i:05d}.safetensors")
        weight_map.update(dict.fromkeys(layer, f"model-{i:05d}.safetensors"))
        sizes[f"layers.{i}"] = sum(t.nbytes for t in layer.values())
    ends = {"model.embed_tokens.weight": torch.rand(4096, d), "model.norm.weight": torch.ones(d)}
    save_file(ends, path / "model-ends.safetensors")
    weight_map.update(dict.fromkeys(ends, "model-ends.safetensors"))
    sizes["embed"] = ends["model.embed_tokens.weight"].nbytes
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path, sizes


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_pack_peak_rss_is_bounded_by_a_block(large_checkpoint, tmp_path, quant):
    path, sizes = large_checkpoint
    model_bytes, largest_block = sum(sizes.values()), max(sizes.values())
    assert model_bytes > 400e6 and largest_block > 35e6
    result = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(tmp_path / "store"), quant],
                            capture_output=True, text=True, timeout=120, check=True)
    peak_increase = int(result.stdout.strip().splitlines()[-1])
    report = f"peak RSS +{peak_increase / 2**20:.1f} MiB, largest block {largest_block / 2**20:.1f} MiB"
    assert peak_increase < 3 * largest_block, report
    assert peak_increase < 0.4 * model_bytes, report
    reader = StoreReader(tmp_path / "store")
    assert len(reader.block_names) == 14
