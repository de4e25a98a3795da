"""The engine against transformers itself: same random weights, same logits, same greedy tokens."""

import json

import pytest
import torch
from hf_models import VARIANTS, build_tiny, load_tiny, longer_batch, rel_err

from tiermem.engine.config import check_weights, model_config_from_hf
from tiermem.engine.executor import Executor, micro_batch_slices
from tiermem.engine.generate import generate
from tiermem.engine.kv_cache import KVCache
from tiermem.engine.weights import DictWeightSource, split_state_dict
from tiermem.kernels.quant import QuantScheme, quantize
from tiermem.storage.hf import HFCheckpoint

pytest.importorskip("transformers")


class Tiny:
    """A saved tiny checkpoint, its transformers model and the engine's view of it."""

    def __init__(self, variant, directory):
        path = build_tiny(variant, directory)
        self.hf = load_tiny(path)
        self.cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
        ckpt = HFCheckpoint(path)  # as pack reads it: fused tensors (Phi-3's) split into the engine's names
        self.blocks = split_state_dict({name: ckpt.load_tensor(name) for name in ckpt.tensor_names})
        check_weights(self.cfg, self.blocks)

    def executor(self, blocks=None):
        return Executor(self.cfg, DictWeightSource(blocks or self.blocks))


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    return Tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def batch():
    """3 rows of 9 tokens, left-padded by 0, 3 and 6."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_forward_logits_match_transformers(tiny, batch, micro_batches):
    ids, mask = batch
    ref = hf_logits(tiny.hf, ids, mask)
    out = tiny.executor().forward(ids, mask, micro_batches=micro_batches)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    real = mask.bool()  # padding rows are garbage in both, compare real tokens only
    err = rel_err(out[real], ref[real])
    assert err <= 1e-4, f"{tiny.cfg.model_type}: max rel error {err:.2e}"


@pytest.mark.parametrize("variant", ["llama-dynamic", "phi3-longrope", "phi3-partial"])
def test_a_forward_past_the_length_where_the_frequencies_change_matches_transformers(variant, tmp_path):
    """22 tokens, past the 16 positions where dynamic NTK rescales and LongRoPE takes its long factors: the whole
    forward at the frequencies of its length, as transformers computes them."""
    tiny = Tiny(variant, tmp_path)
    ids, mask = longer_batch(12)  # [2, 22], the second row left-padded by 4
    ref = hf_logits(tiny.hf, ids, mask)
    out = tiny.executor().forward(ids, mask)
    real = mask.bool()
    assert rel_err(out[real], ref[real]) <= 1e-4


def test_greedy_generate_matches_transformers(tiny, batch):
    ids, mask = batch
    with torch.no_grad():
        ref = tiny.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                               eos_token_id=2, pad_token_id=0)
    executor = tiny.executor()
    out = generate(executor, ids, 32, attention_mask=mask, eos_token_id=2, pad_token_id=0)
    assert out.shape == ref.shape and out.shape[1] > 9
    assert torch.equal(out, ref), f"{tiny.cfg.model_type}: differs at {(out != ref).nonzero()[:3].tolist()}"
    out2 = generate(executor, ids, 32, attention_mask=mask, eos_token_id=2, pad_token_id=0, micro_batches=2)
    assert torch.equal(out2, out)


def test_each_block_fetched_once_per_step_whatever_the_micro_batches(tiny, batch):
    ids, mask = batch
    source = DictWeightSource(tiny.blocks)
    executor = Executor(tiny.cfg, source)
    executor.forward(ids, mask, micro_batches=3)
    expected = {name: 1 for name in tiny.cfg.block_names}
    if tiny.cfg.tie_word_embeddings:
        expected["embed"] = 2  # streamed again for the tied output projection
    assert dict(source.fetches) == expected


def test_cache_steps_equal_full_forward_and_padding_is_finite(tiny):
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :] = 0  # an all-padding row must not produce NaN
    mask[1, 6:] = 1
    executor = tiny.executor()
    full = executor.forward(ids, mask)
    cache = KVCache.allocate(tiny.cfg, 2, 10)
    first = executor.forward(ids[:, :6], mask[:, :6], cache, micro_batches=2)
    second = executor.forward(ids[:, 6:], mask, cache, last_only=True)  # HF-style full mask
    assert cache.length == 10 and torch.isfinite(first).all()
    assert rel_err(first[0], full[0, :6]) <= 1e-5
    assert rel_err(second[:, 0], full[:, -1]) <= 1e-5
    assert cache.nbytes == 2 * tiny.cfg.num_layers * 2 * tiny.cfg.num_kv_heads * 10 * tiny.cfg.head_dim * 4


def test_int4_weights_run_through_ops_linear(batch, tmp_path_factory):
    tiny = Tiny("llama3", tmp_path_factory.mktemp("llama3-int4"))
    scheme = QuantScheme.from_name("int4", group_size=32)
    quantized = {
        block: {n: quantize(t, scheme, n) if t.ndim == 2 and block != "embed" else t for n, t in ws.items()}
        for block, ws in tiny.blocks.items()
    }
    check_weights(tiny.cfg, quantized)
    ids, mask = batch
    ref = tiny.executor().forward(ids, mask)
    out = tiny.executor(quantized).forward(ids, mask)
    err = rel_err(out[mask.bool()], ref[mask.bool()])
    assert torch.isfinite(out).all() and 0 < err < 0.5, f"int4 logits rel error {err:.3f}"


def test_micro_batch_slices():
    assert micro_batch_slices(5, 2) == [slice(0, 3), slice(3, 5)]
    assert micro_batch_slices(2, 4) == [slice(0, 1), slice(1, 2)]
    assert micro_batch_slices(4, 1) == [slice(0, 4)]
