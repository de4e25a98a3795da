"""Named model shapes (HF config.json dicts) for synthetic benchmarks and the demo."""

from __future__ import annotations

from tiermem.errors import ConfigError


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int = 32000,
           **extra: object) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, **extra,
    }


def _qwen3(hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> dict:
    return _llama(hidden, inter, layers, heads, kv_heads, vocab=151936, architectures=["Qwen3ForCausalLM"],
                  model_type="qwen3", head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645)


def _mixtral(hidden: int, inter: int, layers: int, heads: int, vocab: int) -> dict:
    return _llama(hidden, inter, layers, heads, 8, vocab=vocab, architectures=["MixtralForCausalLM"],
                  model_type="mixtral", max_position_embeddings=32768 if vocab == 32000 else 65536,
                  rope_theta=1000000.0, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)


def _qwen3_moe(hidden: int, layers: int, heads: int, kv_heads: int, experts_inter: int) -> dict:
    return dict(_qwen3(hidden, 6144, layers, heads, kv_heads), architectures=["Qwen3MoeForCausalLM"],
                model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8, moe_intermediate_size=experts_inter,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


def _gemma2(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int, query_scalar: int) -> dict:
    return _llama(hidden, inter, layers, heads, kv_heads, vocab=256000, architectures=["Gemma2ForCausalLM"],
                  model_type="gemma2", head_dim=head_dim, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                  tie_word_embeddings=True, query_pre_attn_scalar=query_scalar, sliding_window=4096,
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0, bos_token_id=2, eos_token_id=1)


def _opt(hidden: int, ffn: int, layers: int, heads: int) -> dict:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt",
        "hidden_size": hidden, "ffn_dim": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "vocab_size": 50272, "max_position_embeddings": 2048,
        "word_embed_proj_dim": hidden, "do_layer_norm_before": True, "activation_function": "relu",
        "enable_bias": True, "layer_norm_elementwise_affine": True, "torch_dtype": "float16",
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "tie_word_embeddings": True,
    }


PRESETS: dict[str, dict] = {
    "tiny-llama": _llama(128, 384, 4, 4, 2, vocab=512, max_position_embeddings=512,
                         tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=1),
    "llama-1b": _llama(2048, 5504, 22, 16, 16),
    "llama-7b": _llama(4096, 11008, 32, 32, 32),
    "llama-13b": _llama(5120, 13824, 40, 40, 40),
    "llama3-8b": _llama(4096, 14336, 32, 32, 8, vocab=128256, rope_theta=500000.0),
    "llama-111b": _llama(12288, 28672, 80, 96, 8, vocab=32768),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8),
    "phi-4": _llama(5120, 17920, 40, 40, 10, vocab=100352, architectures=["Phi3ForCausalLM"], model_type="phi3",
                    max_position_embeddings=16384, rope_theta=250000.0, bos_token_id=100257, eos_token_id=100265),
    "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),
    # the text model of google/gemma-3-27b-it (whose checkpoint also holds a vision tower tiermem does not read)
    "gemma-3-27b": dict(_gemma2(5376, 21504, 62, 32, 16, 128, 168), architectures=["Gemma3ForCausalLM"],
                        model_type="gemma3_text", vocab_size=262208, sliding_window=1024, sliding_window_pattern=6,
                        final_logit_softcapping=None, attn_logit_softcapping=None, max_position_embeddings=131072,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "mixtral-8x7b": _mixtral(4096, 14336, 32, 32, 32000),
    "mixtral-8x22b": _mixtral(6144, 16384, 56, 48, 32768),
    "qwen3-30b-a3b": _qwen3_moe(2048, 48, 32, 4, 768),
    "qwen3-235b-a22b": _qwen3_moe(4096, 94, 64, 4, 1536),
    "opt-1.3b": _opt(2048, 8192, 24, 32),
    "opt-6.7b": _opt(4096, 16384, 32, 32),
    "opt-30b": _opt(7168, 28672, 48, 56),
    "opt-66b": _opt(9216, 36864, 64, 72),
}


def preset(name: str) -> dict:
    """A copy of the HF config dict of a named shape (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
