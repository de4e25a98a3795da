"""Sampling and stopping in engine.generate (greedy equality with HF is in test_engine_hf.py)."""

import pytest
import torch
from hf_models import build_model

from tiermem.engine.config import model_config_from_hf
from tiermem.engine.executor import Executor
from tiermem.engine.generate import generate, process_logits
from tiermem.engine.weights import DictWeightSource, split_state_dict
from tiermem.errors import ConfigError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model():
    return build_model("llama2")


@pytest.fixture(scope="module")
def executor(hf_model):
    cfg = model_config_from_hf(hf_model.config.to_dict())
    return Executor(cfg, DictWeightSource(split_state_dict(hf_model.state_dict())))


@pytest.fixture(scope="module")
def prompt():
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def sample(executor, prompt, seed, **kwargs):
    ids, mask = prompt
    gen = torch.Generator().manual_seed(seed)
    return generate(executor, ids, 12, do_sample=True, attention_mask=mask, generator=gen, **kwargs)


def test_seeded_sampling_is_reproducible(executor, prompt):
    a, b = sample(executor, prompt, 7), sample(executor, prompt, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(executor, prompt, 8))
    assert torch.equal(sample(executor, prompt, 7, micro_batches=2), a)


def test_top_k_1_top_p_tiny_and_cold_temperature_are_greedy(executor, prompt):
    ids, mask = prompt
    greedy = generate(executor, ids, 12, attention_mask=mask)
    assert not torch.equal(sample(executor, prompt, 0), greedy)
    assert torch.equal(sample(executor, prompt, 0, top_k=1), greedy)
    assert torch.equal(sample(executor, prompt, 0, top_p=1e-6), greedy)
    assert torch.equal(sample(executor, prompt, 0, temperature=1e-4), greedy)


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ref = TemperatureLogitsWarper(0.7)(None, logits.clone())
    ref = TopKLogitsWarper(10)(None, ref)
    ref = TopPLogitsWarper(0.8)(None, ref)
    out = process_logits(logits, temperature=0.7, top_k=10, top_p=0.8)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.allclose(out[~torch.isinf(out)], ref[~torch.isinf(ref)])
    assert torch.allclose(process_logits(logits, temperature=2.0), logits / 2)
    with pytest.raises(ConfigError):
        process_logits(logits, temperature=0.0)


def test_eos_pads_the_row_and_matches_transformers(executor, hf_model, prompt):
    ids, mask = prompt
    greedy = generate(executor, ids, 12, attention_mask=mask)
    eos = int(greedy[1, 5 + 3])  # row 1 emits it at step 3 (row 0 maybe elsewhere)
    out = generate(executor, ids, 12, attention_mask=mask, eos_token_id=[eos], pad_token_id=0)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    first = int((out[1, 5:] == eos).nonzero()[0])
    assert (out[1, 5 + first + 1:] == 0).all()


def test_generation_stops_when_every_row_has_finished(executor, prompt):
    ids, mask = prompt
    greedy = generate(executor, ids, 4, attention_mask=mask)
    eos = greedy[:, 5].tolist()  # every row's first new token
    out = generate(executor, ids, 4, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(out, greedy[:, :6])
    assert generate(executor, ids, 0, attention_mask=mask).shape == ids.shape


def test_the_prompt_and_the_decode_steps_split_the_batch_separately(executor, prompt, monkeypatch):
    """decode(prefill_micro_batches=2, micro_batches=1): the prompt step runs as 2 micro-batches, every
    later step as 1, and the tokens are those of an unsplit run."""
    from tiermem.engine.generate import DecodeState, Sampling, decode
    from tiermem.engine.kv_cache import KVCache

    ids, mask = prompt
    splits = []
    forward = executor.forward

    def spy(input_ids, attention_mask=None, cache=None, micro_batches=1, last_only=False):
        splits.append((input_ids.shape[1], micro_batches))
        return forward(input_ids, attention_mask, cache, micro_batches=micro_batches, last_only=last_only)

    ref = generate(executor, ids, 6, attention_mask=mask, eos_token_id=[])
    monkeypatch.setattr(executor, "forward", spy)
    state = DecodeState.start(ids, mask, KVCache.allocate(executor.cfg, 2, 11))
    decode(executor, state, Sampling.make(eos_token_id=[]), 6, micro_batches=1, prefill_micro_batches=2)
    assert splits == [(5, 2)] + [(1, 1)] * 5
    assert torch.equal(state.tokens, ref)


def test_a_cleared_cache_generates_as_a_new_one(executor, prompt):
    """KVCache.clear (what a kept graph cache gets between generations): no token left, so that a generation over a
    cache a longer one filled gives the tokens of a new cache, also through static decode steps, whose attention
    spans slots past the fill where the longer generation's K and V are left (masked out)."""
    from tiermem.engine.generate import DecodeState, Sampling, decode
    from tiermem.engine.kv_cache import KVCache
    from tiermem.engine.static_decode import StaticDecoder

    ids, mask = prompt
    longer = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    cache = KVCache.allocate(executor.cfg, 2, 21)
    generate(executor, longer, 12, cache=cache)
    cache.clear()
    assert cache.length == 0 and not bool(cache.key_mask.any())
    state = DecodeState.start(ids, mask, cache)
    decode(executor, state, Sampling.make(False, 1.0, 0, 1.0, [], None), 12,
           step_decoder=StaticDecoder(executor, cache, bucket=4))
    assert torch.equal(state.tokens, generate(executor, ids, 12, attention_mask=mask))
