"""The named synthetic shapes: each reads as its family and has the size its name says."""

import math

import pytest

from tiermem.engine.config import expected_weights, model_config_from_hf
from tiermem.errors import ConfigError
from tiermem.presets import PRESETS, preset

BILLIONS = {"llama-1b": 1.2, "llama-7b": 6.7, "llama-13b": 13.0, "llama3-8b": 8.0, "llama-111b": 111.0,
            "qwen3-32b": 32.8, "phi-4": 14.7, "gemma-2-9b": 9.24, "gemma-2-27b": 27.2, "gemma-3-27b": 27.0,
            "mixtral-8x7b": 46.7, "mixtral-8x22b": 140.6, "qwen3-30b-a3b": 30.5,
            "qwen3-235b-a22b": 235.1, "opt-1.3b": 1.3, "opt-6.7b": 6.7, "opt-30b": 30.0, "opt-66b": 66.0}


@pytest.mark.parametrize("name", sorted(BILLIONS))
def test_preset_has_the_size_of_its_name(name):
    cfg = model_config_from_hf(preset(name))
    params = sum(math.prod(shape) for block in expected_weights(cfg).values() for shape in block.values())
    assert params / 1e9 == pytest.approx(BILLIONS[name], rel=0.05), f"{name}: {params / 1e9:.2f}B parameters"


def test_every_preset_is_covered_and_unknown_names_are_refused():
    assert set(PRESETS) - set(BILLIONS) == {"tiny-llama"}
    assert model_config_from_hf(preset("qwen3-32b")).qk_norm
    with pytest.raises(ConfigError, match="known: "):
        preset("llama-9000b")


def test_synthetic_norms_start_as_transformers_initialises_them():
    """Llama's norm weights start at 1; Gemma's at 0, since its norms apply 1 + w (a synthetic Gemma with weights of 1
    would double every normalized activation)."""
    import torch

    from tiermem.synthetic import SyntheticStore

    small = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    for name, start in (("llama-1b", 1.0), ("gemma-2-9b", 0.0)):
        store = SyntheticStore(dict(preset(name), **small, head_dim=32), None, torch.float32)
        norms = [t for n, t in store.tensors("layers.0").items() if n.endswith("layernorm.weight")]
        assert len(norms) >= 2 and all(torch.equal(t, torch.full_like(t, start)) for t in norms), name
