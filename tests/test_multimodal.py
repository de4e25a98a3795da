"""A multimodal checkpoint's text model (Gemma 3's Gemma3ForConditionalGeneration): packed under a text checkpoint's
names, its vision tower left out, and its text-only logits and greedy tokens those of transformers."""

import pytest
import torch
from hf_models import VARIANTS, _randomize, rel_err, write_tokenizer

import tiermem
from tiermem.engine.config import model_config_from_hf
from tiermem.storage.format import StoreReader
from tiermem.storage.hf import HFCheckpoint

transformers = pytest.importorskip("transformers")

IMAGE_TOKENS = dict(boi_token_index=253, eoi_token_index=254, image_token_index=255)  # kept out of the inputs


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory):
    """A tiny random Gemma3ForConditionalGeneration (the tiny gemma3 text model, a one-layer vision tower), saved."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    _, text = VARIANTS["gemma3"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **IMAGE_TOKENS)
    config._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(config).eval()
    _randomize(model, 3)
    directory = tmp_path_factory.mktemp("gemma3-mm")
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return model, directory


def test_a_multimodal_gemma3_packs_its_text_model_and_runs_as_transformers_does(gemma3_multimodal, tmp_path,
                                                                                capsys):
    model, directory = gemma3_multimodal
    ckpt = HFCheckpoint(directory)
    assert ckpt.left_out and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in ckpt.left_out)
    assert "model.layers.0.self_attn.q_norm.weight" in ckpt.tensor_names
    store = tiermem.pack(directory, tmp_path / "store", progress=True)
    assert f"packing the text model; {len(ckpt.left_out)} tensors of its vision tower" in capsys.readouterr().err
    reader = StoreReader(store)
    assert model_config_from_hf(reader.model_config).model_type == "gemma3_text"
    stored = {n for b in reader.block_names for n in reader.tensor_specs(b)}
    assert not any("vision" in n or "projector" in n for n in stored)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ref_tokens = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                                    eos_token_id=2, pad_token_id=0)
    with tiermem.load(store, max_batch_size=2, max_seq_len=32) as m:
        logits = m.forward(ids, mask)
        tokens = m.generate(ids, 16, attention_mask=mask, eos_token_id=2, pad_token_id=0)
    real = mask.bool()
    assert rel_err(logits[real], ref[real]) <= 1e-4
    assert torch.equal(tokens, ref_tokens)


def test_a_gemma3_config_without_its_text_config_is_refused():
    from tiermem.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a text_config"):
        model_config_from_hf({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
