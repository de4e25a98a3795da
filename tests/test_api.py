"""End to end through the public API: pack an HF checkpoint, load the store, compare with transformers."""

import json

import pytest
import torch
from hf_models import VARIANTS, build_tiny, left_padded_batch, load_tiny, rel_err

import tiermem
from tiermem.engine.config import model_config_from_hf
from tiermem.placement import kv_cache_bytes
from tiermem.storage.format import StoreReader

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch()


@pytest.fixture(scope="module", params=list(VARIANTS))
def packed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = build_tiny(request.param, root / "hf")
    store = tiermem.pack(src, root / "store", progress=False)
    return request.param, load_tiny(src), store


def positions(mask):
    """HF generate's position ids [B, T] of a left-padded mask: real tokens before each, 0 on padding."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def greedy_without_cache(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id):
    """What HF greedy generate returns, each token from a forward over the whole sequence (no KV cache)."""
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1].argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))  # [B]
        unfinished &= token != eos_token_id
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if not unfinished.any():
            break
    return ids


def hf_reference(model, ids, mask):
    """transformers' logits [B, T, V] of the batch and its greedy tokens (32 new at most, EOS 2, pad 0).

    LongRoPE's tokens come from whole-sequence forwards: the step that first passes the original length reruns
    the sequence (Phi-3's generate drops its cache there, rotating every key with the long factors), and
    transformers 5.17 (the GPU machine's) then fed that step only its last token, with no cache at all (5.24 fixed
    it); a forward over the whole sequence at every step is the fixed behaviour in any version.
    """
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        if (getattr(model.config, "rope_parameters", None) or {}).get("rope_type") == "longrope":
            tokens = greedy_without_cache(model, ids, mask, 32, eos_token_id=2, pad_token_id=0)
        else:
            tokens = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                                    eos_token_id=2, pad_token_id=0)
    return logits, tokens


def smallest_budget(store, batch, seq, lookahead=1):
    """A cpu_memory that holds the KV reservation, the staging ring and the smallest block only."""
    reader = StoreReader(store)
    sizes = [reader.block_nbytes(b) for b in reader.block_names]
    kv = kv_cache_bytes(model_config_from_hf(reader.model_config), batch, seq, torch.float32)
    return kv + (lookahead + 1) * max(sizes) + min(sizes)


@pytest.mark.parametrize("budget", ["unlimited", "smaller than the model"])
def test_pack_load_matches_transformers(packed, batch, budget):
    variant, hf, store = packed
    ids, mask = batch
    ref_logits, ref_tokens = hf_reference(hf, ids, mask)
    cpu_memory = None if budget == "unlimited" else smallest_budget(store, 2, 64)
    with tiermem.load(store, cpu_memory=cpu_memory, max_batch_size=2, max_seq_len=64, lookahead=1) as m:
        logits = m.forward(ids, mask)
        real = mask.bool()
        err = rel_err(logits[real], ref_logits[real])
        assert err <= 1e-4, f"{variant}: logits max rel error {err:.2e}"
        out = m.generate(ids, 32, attention_mask=mask, eos_token_id=2, pad_token_id=0)
        assert out.shape[1] > 20 and torch.equal(out, ref_tokens), f"{variant}: greedy tokens differ"
        weights = m.source.weights
        if cpu_memory is not None:
            assert weights.streamed_blocks, "the budget should force some blocks to stream from disk"
            assert weights.peak_host_bytes + m.source.kv_reserved <= cpu_memory
            per_pass = sum(weights.table[b].nbytes for b in weights.streamed_blocks)
            # the forward and every generation step re-read every streamed block
            steps = 1 + out.shape[1] - ids.shape[1]
            assert weights.bytes_read_from_disk >= steps * per_pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("resident", ["streamed", "resident (CUDA graph replays)"])
def test_gpu_pack_load_matches_transformers(packed, batch, resident):
    """Every family on the CUDA path in fp32 (its kernels, the HBM ring or graph replays) against transformers."""
    variant, hf, store = packed
    ids, mask = batch
    ref_logits, ref_tokens = hf_reference(hf, ids, mask)
    with tiermem.load(store, device="cuda", dtype=torch.float32, max_batch_size=2, max_seq_len=64,
                      resident_weights=0 if resident == "streamed" else None) as m:
        assert bool(m.info()["streamed_blocks"]) == (resident == "streamed")
        logits = m.forward(ids, mask).cpu()
        out = m.generate(ids, 32, attention_mask=mask, eos_token_id=2, pad_token_id=0).cpu()
    real = mask.bool()
    err = rel_err(logits[real], ref_logits[real])
    assert err <= 1e-4, f"{variant}: GPU logits max rel error {err:.2e}"
    assert torch.equal(out, ref_tokens), f"{variant}: GPU greedy tokens differ"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_store_logits_error_is_small(tmp_path, batch, quant):
    src = build_tiny("llama3", tmp_path / "hf")
    dense = tiermem.pack(src, tmp_path / "dense", progress=False)
    packed = tiermem.pack(src, tmp_path / quant, quant=quant, group_size=32, progress=False)
    ids, mask = batch
    with tiermem.load(dense, max_batch_size=2, max_seq_len=16) as m:
        ref = m.forward(ids, mask)
    with tiermem.load(packed, max_batch_size=2, max_seq_len=16) as m:
        out = m.forward(ids, mask)
    err = rel_err(out[mask.bool()], ref[mask.bool()])
    # int8 keeps 8 bits per weight, int4 4: the logits error grows about 16x from one to the other.
    bound = {"int8": 0.02, "int4": 0.3}[quant]
    assert 0 < err < bound, f"{quant} logits relative error {err:.4f} (bound {bound})"


def test_pack_writes_tied_head_and_info(tmp_path):
    src = build_tiny("llama-tied", tmp_path / "hf")
    store = tiermem.pack(src, tmp_path / "store", quant="int4", group_size=32, progress=False)
    reader = StoreReader(store)
    assert "lm_head.weight" in reader.tensor_specs("head")
    info = tiermem.api.store_info(store)
    assert info["architecture"] == "llama" and info["quant"] == "int4 (group 32)"


def test_pack_rejects_unknown_architecture_and_bad_weights(tmp_path):
    src = build_tiny("llama2", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(tiermem.UnsupportedArchitectureError, match="mamba"):
        tiermem.pack(src, tmp_path / "a", progress=False)
    config["model_type"] = "llama"
    config["hidden_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(tiermem.WeightsError, match="shape"):
        tiermem.pack(src, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_budget_too_small_for_one_layer(packed):
    _variant, _hf, store = packed
    with pytest.raises(tiermem.BudgetError, match="cpu_memory"):
        tiermem.load(store, cpu_memory=4096, max_batch_size=1, max_seq_len=8)


def test_generate_rejects_bad_input(packed):
    _variant, _hf, store = packed
    with tiermem.load(store, max_batch_size=1, max_seq_len=8) as m:
        with pytest.raises(tiermem.ConfigError, match="LongTensor"):
            m.generate(torch.zeros(1, 3), 2)
        with pytest.raises(tiermem.ConfigError, match="token ids"):
            m.generate(torch.tensor([[10**6]]), 2)
        with pytest.raises(tiermem.BudgetError, match="max_seq_len"):
            m.generate(torch.tensor([[5, 6, 7]]), 16)
        for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)):
            with pytest.raises(tiermem.ConfigError, match="holds no token"):
                m.generate(empty, 2)
            with pytest.raises(tiermem.ConfigError, match="holds no token"):
                m.forward(empty)
        x = torch.tensor([[5, 6, 7]])
        wrong_types = [  # each a raw TypeError, ValueError or AttributeError from deeper down, or a silent cast
            (dict(max_new_tokens=1.5), "max_new_tokens must be an integer"),
            (dict(max_new_tokens="3"), "max_new_tokens must be an integer"),
            (dict(do_sample=True, seed="abc"), "seed must be an integer"),
            (dict(do_sample=True, seed=2**64), r"seed must be an integer in \[0, 2\*\*63\)"),
            (dict(do_sample=True, generator=5), "generator must be a torch.Generator"),
            (dict(on_step=5), "on_step must be callable"), (dict(session=5), "session must be a tiermem"),
            (dict(eos_token_id="x"), "eos_token_id must be an integer"),
            (dict(pad_token_id="x"), "pad_token_id must be"),
            (dict(do_sample=True, top_k=1.9), "top_k must be an integer"),
            (dict(do_sample="no"), "do_sample must be bool"),
            (dict(attention_mask=[[1, 1, 1]]), "attention_mask must be a tensor"),
            (dict(attention_mask=torch.ones(1, 3, 1)), r"attention_mask must be a tensor .* shape \(1, 3, 1\)"),
            (dict(attention_mask=torch.tensor([[1, 2, 1]])), "values other than 0 and 1"),
            (dict(attention_mask=torch.tensor([[0, 0, 0]])), "a row of padding only"),
            (dict(eos_token_id=[2, 10**6]), "eos_token_id 1000000 is not a token of this model"),
        ]
        for kw, match in wrong_types:
            with pytest.raises(tiermem.ConfigError, match=match):
                m.generate(x, **{"max_new_tokens": 2, **kw})
        with pytest.raises(tiermem.ConfigError, match="values other than 0 and 1"):
            m.forward(x, torch.tensor([[1, 0.5, 1]]))
        with pytest.raises(tiermem.ConfigError, match="list of strings"):
            m.generate_text([5], 2)
        with pytest.raises(tiermem.ConfigError, match="leave it out"):
            m.generate_text(["t5"], 2, attention_mask=torch.ones(1, 1))
    with pytest.raises(tiermem.TiermemError, match="closed"):
        m.forward(torch.tensor([[5]]))


def test_generate_rejects_bad_sampling_and_padding(packed):
    _variant, _hf, store = packed
    x = torch.tensor([[5, 6, 7]])
    with tiermem.load(store, max_batch_size=1, max_seq_len=16) as m:
        for kw, match in ((dict(temperature=float("nan")), "finite number > 0"), (dict(temperature=-1.0), "> 0"),
                          (dict(top_k=-2), "top_k must be >= 0"), (dict(top_p=float("nan")), "top_p")):
            with pytest.raises(tiermem.ConfigError, match=match):
                m.generate(x, 2, do_sample=True, **kw)
        with pytest.raises(tiermem.ConfigError, match="micro_batches must be >= 1"):
            m.generate(x, 2, micro_batches=0)
        with pytest.raises(tiermem.ConfigError, match="micro_batches must be >= 1"):
            m.forward(x, micro_batches=-1)
        with pytest.raises(tiermem.ConfigError, match="pad_token_id -1 is not a token"):
            m.generate(x, 2, eos_token_id=3, pad_token_id=-1)
        with pytest.raises(tiermem.ConfigError, match="pad on the left"):
            m.generate(x, 2, attention_mask=torch.tensor([[1, 1, 0]]))
        left = m.generate(x, 2, attention_mask=torch.tensor([[0, 1, 1]]))  # left padding is fine
        assert left.shape == (1, 5)


def test_a_config_pad_outside_the_vocabulary_falls_back_to_eos(tmp_path):
    """Some converted checkpoints carry pad_token_id -1: finished rows emit the first EOS id instead."""
    import json

    src = build_tiny("llama2", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, pad_token_id=-1)))
    with tiermem.load(tiermem.pack(src, tmp_path / "store", progress=False), max_batch_size=2, max_seq_len=16) as m:
        prompts = torch.tensor([[5, 6, 7], [9, 10, 11]])
        free = m.generate(prompts, 4, eos_token_id=[])
        first = int(free[0, 3])  # row 0's first token: its EOS here
        assert first not in free[1, 3:].tolist()  # row 1 runs on
        out = m.generate(prompts, 4, eos_token_id=[first])
    assert out[0, 3:].tolist() == [first] * 4 and torch.equal(out[1], free[1])


def test_a_config_eos_outside_the_vocabulary_without_pad_is_named_as_such(tmp_path):
    """Finished rows emit the first EOS id where no pad is set: the error names that id as an EOS, not as a pad."""
    import json

    src = build_tiny("llama2", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, pad_token_id=None, eos_token_id=999)))
    with tiermem.load(tiermem.pack(src, tmp_path / "store", progress=False), max_batch_size=1, max_seq_len=16) as m:
        with pytest.raises(tiermem.ConfigError, match="the first eos_token_id 999 .* pass a pad_token_id"):
            m.generate(torch.tensor([[5, 6, 7]]), 2)
        assert m.generate(torch.tensor([[5, 6, 7]]), 2, pad_token_id=0).shape == (1, 5)


def test_load_rejects_bad_options(packed):
    _variant, _hf, store = packed
    with pytest.raises(tiermem.ConfigError, match="'tpu' is not a device"):
        tiermem.load(store, device="tpu")
    with pytest.raises(tiermem.ConfigError, match="not supported"):
        tiermem.load(store, device="meta")
    for batch, seq in ((0, 8), (1, 0), (-2, 8)):
        with pytest.raises(tiermem.ConfigError, match="max_batch_size and max_seq_len must be >= 1"):
            tiermem.load(store, max_batch_size=batch, max_seq_len=seq)
    for kw, match in ((dict(lookahead=0), "lookahead must be >= 1"), (dict(micro_batches=0), "micro_batches"),
                      (dict(read_backend="magic"), "unknown read backend"), (dict(plan="fast"), "plan must be"),
                      (dict(dtype="int8"), "not a floating-point"), (dict(dtype="float17"), "not a floating"),
                      (dict(dtype=torch.int32), "not a floating-point"), (dict(dtype=torch.complex64), "floating"),
                      (dict(max_batch_size=1.5), "max_batch_size must be an integer"),
                      (dict(max_seq_len=10.5), "max_seq_len must be an integer")):
        with pytest.raises(tiermem.ConfigError, match=match):
            tiermem.load(store, **kw)
    with tiermem.load(store, dtype="bfloat16", max_batch_size=1, max_seq_len=8) as m:
        assert m.dtype == torch.bfloat16
        assert m.forward(torch.tensor([[5, 6]])).dtype == torch.float32


def test_synthetic_store_written_to_disk_loads_and_generates(tmp_path):
    from tiermem.kernels.quant import QuantScheme
    from tiermem.presets import preset
    from tiermem.synthetic import SyntheticStore, write_synthetic_store

    config = preset("tiny-llama")
    store = write_synthetic_store(config, tmp_path / "s", QuantScheme(4, 64), torch.float32, progress=False)
    reader = StoreReader(store)
    reader.verify()
    in_memory = SyntheticStore(config, QuantScheme(4, 64), torch.float32)
    assert [reader.block_nbytes(b) for b in reader.block_names] == [in_memory.block_nbytes(b)
                                                                      for b in in_memory.block_names]
    ids = torch.randint(3, 500, (2, 6))
    with tiermem.load(store, max_batch_size=2, max_seq_len=16, cpu_memory=smallest_budget(store, 2, 16),
                      lookahead=1) as m:
        assert m.source.weights.streamed_blocks
        streamed = m.generate(ids, 6, eos_token_id=[])
    with tiermem.load(store, max_batch_size=2, max_seq_len=16) as m:
        assert torch.equal(m.generate(ids, 6, eos_token_id=[]), streamed)
