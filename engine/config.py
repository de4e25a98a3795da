"""HF `config.json` (as any transformers version writes it) -> ModelConfig, and weight-name checks.

Absent keys take the defaults the model's transformers config class would give them, so a config
written by transformers 4.x (`torch_dtype`, `rope_scaling` with "type", no `head_dim`) and one written
by 5.x (`dtype`, `rope_parameters`) describe the same model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch

from tiermem.engine.families import llama, opt, output
from tiermem.engine.moe import MoeConfig
from tiermem.errors import ConfigError, UnsupportedArchitectureError, WeightsError
from tiermem.kernels.quant import QuantizedWeight
from tiermem.storage.moe_names import NAMING_OF_MODEL_TYPE

FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "llama",
                        "qwen2_moe": "llama", "qwen3": "llama", "qwen3_moe": "llama", "phi3": "llama",
                        "gemma2": "llama", "gemma3_text": "llama", "opt": "opt"}
MODEL_TYPE_OF_ARCHITECTURE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "OPTForCausalLM": "opt",
}
# Defaults of the transformers config classes for keys a config.json may omit.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, sliding_window=4096),
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      num_experts_per_tok=4, num_local_experts=60, norm_topk_prob=False, decoder_sparse_step=1),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, moe_intermediate_size=768, num_experts_per_tok=8, num_local_experts=128,
                      norm_topk_prob=False, decoder_sparse_step=1),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
                 rms_norm_eps=1e-5),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        sliding_window_pattern=6),
    "opt": dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=2048),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
MAX_LAYERS = 4096  # far beyond any model; a larger count is a broken config (its per-layer tables would not fit RAM)
IGNORED_WEIGHT_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling`, standardized)."""

    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # dynamic: max_position_embeddings, past which it rescales
    # yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # scales cos and sin
    # longrope only: per-frequency divisors of the default frequencies while the sequence is within
    # original_max_position_embeddings (short) and once it is longer (long)
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions that rotate (Phi-4-mini: 0.75)

    def rotary_dim(self, head_dim: int) -> int:
        """How many of a head's head_dim dimensions rotate (the first ones; the rest pass through), as transformers
        counts them: int(head_dim * partial_rotary_factor)."""
        return int(head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a decoder-only model; built by model_config_from_hf."""

    model_type: str  # a key of FAMILY_OF_MODEL_TYPE
    family: str  # "llama" | "opt": which module in engine/families runs it
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str  # "silu" | "gelu_pytorch_tanh" (Gemma 2) in the llama family; "relu" | "gelu" (opt)
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3)
    # Gemma 2: RMSNorm weights applied as (1 + w) in fp32; norms of the attention's and the MLP's outputs too (and
    # before the MLP: pre_feedforward_layernorm); the embedding times sqrt(hidden_size); tanh soft-capping of the
    # attention scores and of the logits (x -> cap * tanh(x / cap)); the softmax scale query_pre_attn_scalar ** -0.5
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    moe: MoeConfig | None = None  # the sparse MLP of Mixtral and Qwen3-MoE (None: every layer's MLP is dense)
    rope: RopeConfig | None = None  # None: learned positions (OPT)
    rope_local: RopeConfig | None = None  # Gemma 3: the sliding-window layers' own RoPE (None: `rope` everywhere)
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full causal attention
    # OPT only
    word_embed_proj_dim: int = 0  # 0: same as hidden_size
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    layer_norm_affine: bool = True
    position_offset: int = 0
    # generation defaults
    dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def block_names(self) -> list[str]:
        """Weight blocks in execution order."""
        return ["embed", *(f"layers.{i}" for i in range(self.num_layers)), "head"]

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (OPT's word_embed_proj_dim, else hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size


def family_module(cfg: ModelConfig) -> ModuleType:
    """The module of engine/families that implements cfg's math."""
    return {"llama": llama, "opt": opt}[cfg.family]


def _model_type(hf: Mapping[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type is None:
        for arch in hf.get("architectures") or ():
            if arch in MODEL_TYPE_OF_ARCHITECTURE:
                return MODEL_TYPE_OF_ARCHITECTURE[arch]
        raise ConfigError("config.json has no 'model_type' (nor a known 'architectures' entry); "
                          "is this a Hugging Face causal-LM config?")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; tiermem runs {sorted(FAMILY_OF_MODEL_TYPE)}")
    return model_type


def _dtype(hf: Mapping[str, Any]) -> torch.dtype | None:
    name = hf.get("dtype") or hf.get("torch_dtype")  # 5.x writes "dtype", 4.x "torch_dtype"
    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"config.json dtype {name!r} is not a floating dtype known: {sorted(DTYPES)}")
    return DTYPES[name]


def _rope(hf: Mapping[str, Any], max_pos: int) -> RopeConfig:
    """The rotary embedding of a config, with RoPE on part of each head where the model rotates so (Phi-3's family:
    Phi-4-mini rotates 3/4 of each head)."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and hf.get("model_type") != "phi3":
        raise UnsupportedArchitectureError(
            f"partial_rotary_factor {partial} (RoPE on part of each head) with model_type {hf.get('model_type')!r}: "
            "transformers rotates part of each head in Phi-3's family only, and so does tiermem")
    if not (isinstance(partial, (int, float)) and 0 < partial <= 1):
        raise ConfigError(f"config.json partial_rotary_factor must be in (0, 1], got {partial!r}")
    return replace(_whole_head_rope(hf, params, max_pos), partial_rotary_factor=float(partial))


def _whole_head_rope(hf: Mapping[str, Any], params: dict, max_pos: int) -> RopeConfig:
    # transformers 5 takes a (legacy) rope_scaling whole where it is set, even next to rope_parameters
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if hf.get("model_type") == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config reads these old names so
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} is not supported; tiermem implements {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type == "yarn":
        return _yarn_rope(hf, params, float(theta), max_pos)
    if rope_type == "longrope":
        return _longrope(hf, params, float(theta), max_pos)
    try:
        factor = float(params["factor"])
        if rope_type == "linear":
            return RopeConfig(theta=float(theta), type="linear", factor=factor)
        if rope_type == "dynamic":
            return RopeConfig(theta=float(theta), type="dynamic", factor=factor,
                              original_max_position_embeddings=max_pos)
        return RopeConfig(
            theta=float(theta), type="llama3", factor=factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_pos)),
        )
    except KeyError as e:
        raise ConfigError(f"rope parameters of type {rope_type!r} lack key {e.args[0]!r}: {params}") from e


def _yarn_rope(hf: Mapping[str, Any], params: Mapping[str, Any], theta: float, max_pos: int) -> RopeConfig:
    """YaRN parameters as transformers 5 standardizes them (a top-level original_max_position_embeddings wins)."""
    old_len = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                  or max_pos)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / old_len
    if factor <= 0 or old_len <= 0:
        raise ConfigError(f"yarn rope parameters need a positive factor and original length: {dict(params)}")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeConfig(
        theta=theta, type="yarn", factor=factor, original_max_position_embeddings=old_len,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor),
    )


def _longrope(hf: Mapping[str, Any], params: Mapping[str, Any], theta: float, max_pos: int) -> RopeConfig:
    """LongRoPE (Phi-3's long-context variants) as transformers computes it: the factor defaults to max_pos over the
    original length, the attention factor to sqrt(1 + ln(factor) / ln(original length))."""
    old_len = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                  or max_pos)
    if "short_factor" not in params or "long_factor" not in params:
        raise ConfigError(f"longrope rope parameters need short_factor and long_factor: {dict(params)}")
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / old_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return RopeConfig(theta=theta, type="longrope", factor=factor, original_max_position_embeddings=old_len,
                      attention_factor=float(attention_factor), short_factor=tuple(map(float, params["short_factor"])),
                      long_factor=tuple(map(float, params["long_factor"])))


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _llama_windows(model_type: str, d: Mapping[str, Any], n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window (None = full attention), as Mistral / Mixtral / Qwen2 / Qwen3 configs set them."""
    if model_type in ("mistral", "mixtral", "phi3"):
        return (d.get("sliding_window"),) * n_layers
    if model_type in ("gemma2", "gemma3_text"):  # every other layer slides in Gemma 2, 5 of each 6 in Gemma 3
        pattern = 2 if model_type == "gemma2" else int(d["sliding_window_pattern"])
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                         for i in range(n_layers)]
        return tuple(d.get("sliding_window") if t == "sliding_attention" else None for t in types)
    if model_type == "qwen3_moe":
        return (d.get("sliding_window") if d.get("use_sliding_window", False) else None,) * n_layers
    if model_type == "qwen2_moe" and d.get("use_sliding_window", False):
        raise UnsupportedArchitectureError("qwen2_moe with use_sliding_window is not supported (transformers "
                                           "versions place its windows differently; no released model uses it)")
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
        window = d.get("sliding_window", 4096)
        types = d.get("layer_types") or [
            "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28)
            else "full_attention" for i in range(n_layers)]
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * n_layers


def _moe(model_type: str, d: Mapping[str, Any], n_layers: int) -> MoeConfig | None:
    """The sparse MLP as MixtralConfig / Qwen2MoeConfig / Qwen3MoeConfig read it (the hub's Qwen-MoE configs say
    num_experts, transformers 5 writes num_local_experts)."""
    if model_type not in NAMING_OF_MODEL_TYPE:
        return None
    experts = d.get("num_local_experts")
    if model_type != "mixtral" and "num_experts" in d:
        experts = d["num_experts"]
    top_k = d.get("num_experts_per_tok")
    for key, value in (("num_experts", experts), ("num_experts_per_tok", top_k)):
        _check_positive_int(key, value)
        if value is None:
            raise ConfigError(f"config.json {key} is null: it must be a positive integer")
    experts, top_k = int(experts), int(top_k)
    if top_k > experts:
        raise ConfigError(f"config.json num_experts_per_tok {top_k} is more than the {experts} experts")
    if model_type == "mixtral":
        return MoeConfig(experts, top_k, int(d["intermediate_size"]), True, (True,) * n_layers,
                         NAMING_OF_MODEL_TYPE[model_type])
    _check_positive_int("moe_intermediate_size", d.get("moe_intermediate_size"))
    _check_positive_int("decoder_sparse_step", d.get("decoder_sparse_step"))
    shared = 0
    if model_type == "qwen2_moe":
        _check_positive_int("shared_expert_intermediate_size", d.get("shared_expert_intermediate_size"))
        shared = int(d["shared_expert_intermediate_size"])
    dense = set(d.get("mlp_only_layers") or ())
    step = int(d.get("decoder_sparse_step") or 1)
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))
    return MoeConfig(experts, top_k, int(d["moe_intermediate_size"]), bool(d.get("norm_topk_prob", False)), sparse,
                     NAMING_OF_MODEL_TYPE[model_type], shared)


def _check_positive_int(key: str, value: Any) -> None:
    """ConfigError unless value is None (not in the config) or a whole number >= 1 (as int or its digits)."""
    if value is None:
        return
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not (whole and value > 0) and not (isinstance(value, str) and value.isdigit() and int(value) > 0):
        raise ConfigError(f"config.json {key} must be a positive integer, got {value!r}")


def _check_values(cfg: ModelConfig) -> None:
    """ConfigError for values of the right type that no model has (they would give NaN logits, not an error)."""
    positive = {"rms_norm_eps / layer norm eps": cfg.norm_eps}
    if cfg.rope_local is not None:
        positive |= {"rope_local_base_freq": cfg.rope_local.theta, "sliding layers' rope factor": cfg.rope_local.factor}
    if cfg.rope is not None:
        positive |= {"rope_theta": cfg.rope.theta, "rope factor": cfg.rope.factor}
        rotary = cfg.rope.rotary_dim(cfg.head_dim)
        if rotary < 2 or rotary % 2:
            raise ConfigError(f"partial_rotary_factor {cfg.rope.partial_rotary_factor} of head_dim {cfg.head_dim} "
                              f"rotates {rotary} dimensions; RoPE turns them in pairs (an even number >= 2)")
        if cfg.rope.type == "longrope":
            for key in ("short_factor", "long_factor"):
                values = getattr(cfg.rope, key)
                if len(values) != rotary // 2:
                    raise ConfigError(f"config.json longrope {key} has {len(values)} values; {rotary} rotary "
                                      f"dimensions of head_dim {cfg.head_dim} need {rotary // 2}")
                positive |= {f"longrope {key}": min(values)}
    for key, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"config.json {key} must be a positive finite number, got {value!r}")
    for key in ("bos_token_id", "pad_token_id"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"config.json {key} must be a token id (an integer) or null, got {value!r}")


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Read an HF config.json dict the way its transformers config class would.

    ConfigError (naming the key where it can) for a config no transformers version would write.
    """
    if not isinstance(hf, Mapping):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    try:
        cfg = _read_config(_text_model(hf))
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"config.json has a value of the wrong type or form ({e}); compare it with the config "
                          "transformers writes for this model, or re-export it") from e
    _check_values(cfg)
    return cfg


def _text_model(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config of a multimodal checkpoint's text model (Gemma 3: its text_config, read as a Gemma3ForCausalLM
    config; the token ids, dtype and tying at the top where text_config leaves them out); other configs as they are."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError("a gemma3 config.json needs a text_config object (the language model's config)")
    top = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "dtype",
                              "torch_dtype") if k in hf}
    return {**top, **text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def _read_config(hf: Mapping[str, Any]) -> ModelConfig:
    model_type = _model_type(hf)
    d = {**HF_DEFAULTS[model_type], **hf}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "intermediate_size", "ffn_dim", "num_key_value_heads", "head_dim"):
        _check_positive_int(key, d.get(key))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
        if d.get(key) is None:
            raise ConfigError(f"config.json {key} is null: it must be a positive integer")
    if int(d["num_hidden_layers"]) > MAX_LAYERS:
        raise ConfigError(f"config.json num_hidden_layers {d['num_hidden_layers']} is more than {MAX_LAYERS}: "
                          "no such model exists; check the config")
    common = dict(
        model_type=model_type, family=FAMILY_OF_MODEL_TYPE[model_type], vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]), num_layers=int(d["num_hidden_layers"]),
        num_heads=int(d["num_attention_heads"]), max_position_embeddings=int(d["max_position_embeddings"]),
        dtype=_dtype(hf), bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
    if common["hidden_size"] % common["num_heads"] and not d.get("head_dim"):
        raise ConfigError(f"hidden_size {common['hidden_size']} is not a multiple of "
                          f"num_attention_heads {common['num_heads']}")
    if model_type == "opt":
        act = d.get("activation_function", "relu")
        if act not in ("relu", "gelu"):
            raise UnsupportedArchitectureError(f"OPT activation_function {act!r} unsupported: relu, gelu")
        proj = int(d.get("word_embed_proj_dim") or d["hidden_size"])
        before = bool(d.get("do_layer_norm_before", True))
        return ModelConfig(
            **common, intermediate_size=int(d["ffn_dim"]), num_kv_heads=common["num_heads"],
            head_dim=common["hidden_size"] // common["num_heads"], norm_eps=1e-5, hidden_act=act,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            qkv_bias=bool(d.get("enable_bias", True)), o_bias=bool(d.get("enable_bias", True)),
            mlp_bias=bool(d.get("enable_bias", True)), sliding_windows=(None,) * common["num_layers"],
            word_embed_proj_dim=0 if proj == common["hidden_size"] else proj,
            do_layer_norm_before=before,
            final_layer_norm=before and not d.get("_remove_final_layer_norm", False),
            layer_norm_affine=bool(d.get("layer_norm_elementwise_affine", True)), position_offset=2,
        )
    gemma = model_type in ("gemma2", "gemma3_text")
    act = (d.get("hidden_activation") or d.get("hidden_act")) if gemma else d.get("hidden_act", "silu")
    supported = "gelu_pytorch_tanh" if gemma else "silu"
    if act != supported:
        raise UnsupportedArchitectureError(f"{model_type} hidden_act {act!r} is not supported (only {supported})")
    attention_bias = bool(d.get("attention_bias", False))
    qwen2_bias = model_type == "qwen2" or (model_type == "qwen2_moe" and bool(d.get("qkv_bias", True)))
    kv_heads = int(d.get("num_key_value_heads") or common["num_heads"])
    if common["num_heads"] % kv_heads:
        raise ConfigError(f"num_attention_heads {common['num_heads']} is not a multiple of num_key_value_heads "
                          f"{kv_heads}: each kv head serves a whole group of query heads")
    return ModelConfig(
        **common, intermediate_size=int(d["intermediate_size"]),
        num_kv_heads=kv_heads,
        head_dim=int(d.get("head_dim") or common["hidden_size"] // common["num_heads"]),
        norm_eps=float(d["rms_norm_eps"]), hidden_act=act,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qwen2_bias or attention_bias, o_bias=attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        moe=_moe(model_type, d, common["num_layers"]),
        sliding_windows=_llama_windows(model_type, d, common["num_layers"]),
        **(_gemma3_ropes(d) if model_type == "gemma3_text" else {"rope": _rope(d, int(d["max_position_embeddings"]))}),
        **(_gemma(d, common["hidden_size"]) if gemma else {}),
    )


def _gemma3_ropes(d: Mapping[str, Any]) -> dict[str, RopeConfig]:
    """Gemma 3's two RoPEs, as Gemma3TextConfig reads them: rope_parameters per layer type (transformers 5), or
    rope_theta (+ a rope_scaling) for the full-attention layers and rope_local_base_freq for the sliding ones."""
    params = d.get("rope_parameters") or {}
    nested = bool({"full_attention", "sliding_attention"} & set(params))  # else a flat one: the full layers'
    full = dict(params.get("full_attention") or {}) if nested else dict(params)
    local = dict(params.get("sliding_attention") or {}) if nested else {}
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])
    full.setdefault("rope_theta", d["rope_theta"])
    local.setdefault("rope_theta", d["rope_local_base_freq"])
    max_pos = int(d["max_position_embeddings"])
    if d.get("sliding_window") is None:
        raise UnsupportedArchitectureError("gemma3_text without a sliding_window is not supported (its sliding "
                                           "layers would still rotate with their own RoPE; no released model has it)")
    plain = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")}
    ropes = {"rope": _rope(dict(plain, rope_parameters=full), max_pos),
             "rope_local": _rope(dict(plain, rope_parameters=local), max_pos)}
    if ropes["rope_local"].type in ("dynamic", "longrope"):
        raise UnsupportedArchitectureError(f"a {ropes['rope_local'].type} RoPE on Gemma 3's sliding layers is not "
                                           "supported (their tables are made once per step from fixed frequencies)")
    return ropes


def _gemma(d: Mapping[str, Any], hidden: int) -> dict[str, Any]:
    """Gemma 2's ModelConfig fields, as Gemma2Config reads them (a cap of null: none)."""
    caps = {key: None if d.get(name) is None else float(d[name])
            for key, name in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping"))}
    for key, cap in caps.items():
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise ConfigError(f"config.json {key.replace('_softcap', '')} logit softcapping must be a positive "
                              f"number or null, got {cap!r}")
    scalar = float(d["query_pre_attn_scalar"])
    if not scalar > 0:
        raise ConfigError(f"config.json query_pre_attn_scalar must be positive, got {scalar!r}")
    return dict(norm_plus_one=True, sandwich_norms=True, embed_scale=hidden**0.5, attn_scale=scalar**-0.5, **caps)


def gpu_compute_dtype(cfg: ModelConfig, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a GPU load computes in: `dtype` when given, else the checkpoint's fp16/bf16, else bf16."""
    return dtype or (cfg.dtype if cfg.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16)


def expected_weights(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Block name -> {HF tensor name -> shape} that a checkpoint of cfg must hold."""
    return family_module(cfg).weight_shapes(cfg)


def _shape_and_dtype(spec: Any) -> tuple[tuple[int, ...], Any]:
    if isinstance(spec, QuantizedWeight):
        return tuple(spec.shape), spec.scheme.name
    if isinstance(spec, torch.Tensor):
        return tuple(spec.shape), spec.dtype
    if len(spec) == 2 and isinstance(spec[0], (tuple, list, torch.Size)):
        return tuple(spec[0]), spec[1]
    return tuple(spec), None


def tied_head_alias(cfg: ModelConfig) -> dict[str, str]:
    """{"lm_head.weight": embedding name} when the output projection is tied to the embedding, else {}.

    tiermem stores that copy in the "head" block (pack, synthetic stores), so that the head never needs
    the embedding table on the GPU.
    """
    block, name = family_module(cfg).lm_head_weight_name(cfg)
    return {output.LM_HEAD: name} if block == "embed" else {}


def check_weights(cfg: ModelConfig, specs: Mapping[str, Any]) -> None:
    """Raise WeightsError naming every missing, unexpected, misplaced or misshaped tensor.

    `specs` is block -> {name -> spec} (as StoreReader.tensor_specs gives per block) or a flat
    {name -> spec}; a spec is a shape, a (shape, dtype) pair, a tensor or a QuantizedWeight.
    """
    nested = all(isinstance(v, Mapping) for v in specs.values())
    flat = {n: (b, s) for b, block in specs.items() for n, s in block.items()} if nested else {
        n: (None, s) for n, s in specs.items()}
    expected = {n: (b, shape) for b, block in expected_weights(cfg).items() for n, shape in block.items()}
    problems = [f"missing {n} {shape}" for n, (_, shape) in expected.items() if n not in flat]
    for name, (block, spec) in flat.items():
        if name not in expected:
            tied_head = cfg.tie_word_embeddings and name == "lm_head.weight"
            if not (tied_head or name.endswith(IGNORED_WEIGHT_SUFFIXES)):
                problems.append(f"unexpected {name}")
            continue
        want_block, want_shape = expected[name]
        shape, dtype = _shape_and_dtype(spec)
        if shape != want_shape:
            problems.append(f"{name} has shape {shape}, expected {want_shape}")
        if block is not None and block != want_block:
            problems.append(f"{name} is in block {block!r}, expected {want_block!r}")
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            problems.append(f"{name} has dtype {dtype}, expected a floating dtype")
        elif isinstance(dtype, str) and (dtype not in ("int4", "int8") or len(shape) != 2):
            problems.append(f"{name} has dtype {dtype!r}; only 2-D weights may be int4/int8")
    if problems:
        raise WeightsError(
            f"weights do not match the {cfg.model_type} config ({len(problems)} problems): "
            + "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
            + ". Re-export the checkpoint with transformers or check that config.json belongs to it.")
