"""Tiny random-weight Hugging Face models of every supported family, saved as HF checkpoints.

    from hf_models import VARIANTS, build_tiny, load_tiny
    path = build_tiny("llama3", tmp_path / "llama3")   # config.json + model.safetensors + tokenizer
    model = load_tiny(path)                             # transformers model, eval, fp32, eager attention

Weights are seeded per variant (same bytes on every call). Unlike transformers' init, norm weights
and biases are random too, so that every parameter influences the logits.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA = dict(COMMON, intermediate_size=128, rms_norm_eps=1e-5)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama2": ("llama", dict(LLAMA)),
    "llama3": ("llama", dict(LLAMA, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama-tied": ("llama", dict(LLAMA, tie_word_embeddings=True, num_key_value_heads=1)),
    # dynamic NTK scaling past 16 positions: the tests' 32 new tokens after 9 cross it mid-generation
    "llama-dynamic": ("llama", dict(LLAMA, num_key_value_heads=2, max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=3.0))),
    "mistral": ("mistral", dict(LLAMA, num_key_value_heads=2, sliding_window=16, head_dim=32)),
    "qwen2": ("qwen2", dict(LLAMA, num_key_value_heads=2, rope_parameters=dict(rope_type="default",
                                                                                 rope_theta=1000000.0))),
    "qwen2-yarn": ("qwen2", dict(LLAMA, num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))),
    "qwen3": ("qwen3", dict(LLAMA, num_key_value_heads=2, head_dim=32)),
    "mixtral": ("mixtral", dict(LLAMA, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                intermediate_size=96)),
    # Mixtral's 8 experts: a decode step of 2 rows (4 picks) takes the routed GEMV (engine.moe.routed_experts)
    "mixtral-8experts": ("mixtral", dict(LLAMA, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                         intermediate_size=96)),
    "qwen3-moe": ("qwen3_moe", dict(LLAMA, num_key_value_heads=2, head_dim=32, num_experts=6, num_experts_per_tok=2,
                                    moe_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False,
                                    num_hidden_layers=3)),
    "qwen2-moe": ("qwen2_moe", dict(LLAMA, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                    norm_topk_prob=True)),
    "phi3": ("phi3", dict(LLAMA, num_key_value_heads=2, sliding_window=16)),
    # LongRoPE past 16 positions: the tests' 32 new tokens after 9 cross it mid-generation
    "phi3-longrope": ("phi3", dict(LLAMA, original_max_position_embeddings=16, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
        long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]))),
    # Phi-4-mini's shape of RoPE: 3/4 of each head rotates (12 of 16 dimensions), LongRoPE past 16 positions
    "phi3-partial": ("phi3", dict(LLAMA, num_key_value_heads=2, original_max_position_embeddings=16,
                                  partial_rotary_factor=0.75, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
        short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.0], long_factor=[1.0, 2.0, 3.0, 5.0, 8.0, 16.0]))),
    # Gemma 2 with caps low enough to bend these random weights' scores and logits, a softmax scale of
    # query_pre_attn_scalar 24 (not head_dim 16) and a window shorter than the tests' sequences on layer 0
    "gemma2": ("gemma2", dict(LLAMA, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                              attn_logit_softcapping=0.5, final_logit_softcapping=2.0)),
    # Gemma 3 (text): layers 0-4 of each 6 in a window of 8 with their own RoPE (base 10000), layer 5 global (base
    # 1e6, linear factor 4); q/k norms; 6 layers so that both kinds run
    "gemma3": ("gemma3_text", dict(LLAMA, num_hidden_layers=6, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=24, sliding_window=8, rope_theta=1_000_000.0,
                                   rope_local_base_freq=10_000.0, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "opt": ("opt", dict(COMMON, ffn_dim=128, do_layer_norm_before=True)),
    "opt-proj": ("opt", dict(COMMON, ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)),
}


def hf_config(variant: str):
    """The transformers config object of a variant."""
    from transformers import AutoConfig

    model_type, kwargs = VARIANTS[variant]
    return AutoConfig.for_model(model_type, **kwargs)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (including norms and biases), deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)


def build_model(variant: str):
    """A fresh transformers CausalLM of `variant` with seeded random fp32 weights (not saved)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(variant)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomize(model, zlib.crc32(variant.encode()))
    return model.eval()


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB tokens ("<pad>", "<s>", "</s>", then "t3".."t255")."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<pad>", "padding_side": "left"}))


def build_tiny(variant: str, directory: str | Path) -> Path:
    """Save a tiny random `variant` model as an HF checkpoint (safetensors + tokenizer) in directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_model(variant).save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return directory


def load_tiny(directory: str | Path):
    """Load a checkpoint written by build_tiny with transformers (fp32, eager attention, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        Path(directory), dtype=torch.float32, attn_implementation="eager").eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the logits comparison used throughout the tests."""
    return float((a - b).abs().max() / b.abs().max())


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 rows of 10 tokens (ids in [3, 256)), the second left-padded by 4: (ids, attention_mask)."""
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :4] = 0
    mask[1, :4] = 0
    return ids, mask


def longer_batch(new: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """left_padded_batch followed by `new` more real tokens per row (ids in [3, 256)): (ids, attention_mask)."""
    ids, mask = left_padded_batch()
    ids = torch.cat([ids, torch.randint(3, 256, (2, new), generator=torch.Generator().manual_seed(5))], dim=1)
    return ids, torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)


def teacher_forced(model, cache, ids: torch.Tensor, mask: torch.Tensor, prompt: int,
                   micro_batches: int = 1) -> torch.Tensor:
    """Logits [B, N, V]: prefill `prompt` tokens, then one token per step, through `cache` (a KVCache)."""
    out = [model.executor.forward(ids[:, :prompt], mask[:, :prompt], cache, micro_batches=micro_batches)]
    for t in range(prompt, ids.shape[1]):
        out.append(model.executor.forward(ids[:, t:t + 1], mask[:, t:t + 1], cache, micro_batches=micro_batches))
    return torch.cat(out, dim=1)


def cached_logits(model, ids: torch.Tensor, mask: torch.Tensor, prompt: int, kv_quant) -> torch.Tensor:
    """Teacher-forced logits [B, N, V] through a fresh KV cache of the model's device (fp32)."""
    from tiermem.engine.kv_cache import KVCache

    B, N = ids.shape
    cache = KVCache.allocate(model.config, B, N, model.dtype, model.device, kv_quant=kv_quant)
    return teacher_forced(model, cache, ids, mask, prompt).float()


def packed_stores(root: Path, variants: tuple[str, ...]) -> dict[str, Path]:
    """variant -> a tiermem store packed (dense) from build_tiny(variant), all under root."""
    import tiermem

    return {v: tiermem.pack(build_tiny(v, root / v / "hf"), root / v / "store", progress=False) for v in variants}
