"""Reading HF config.json as different transformers versions write it, and checking weight names."""

import json

import pytest
import torch
from hf_models import VARIANTS, build_tiny

from tiermem.engine.config import check_weights, expected_weights, model_config_from_hf, tied_head_alias
from tiermem.engine.rope import inverse_frequencies
from tiermem.engine.weights import block_of, split_state_dict
from tiermem.errors import ConfigError, UnsupportedArchitectureError, WeightsError
from tiermem.storage.hf import HFCheckpoint

transformers = pytest.importorskip("transformers")

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
             num_attention_heads=8, num_hidden_layers=2, vocab_size=1000, rms_norm_eps=1e-5,
             max_position_embeddings=4096)
LLAMA31_RS = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=1024)
CONFIGS = {
    # transformers 4.2x: no num_key_value_heads / head_dim / rope_theta, torch_dtype
    "llama2-v4.28": dict(LLAMA, torch_dtype="float16", rope_scaling=None),
    # transformers 4.3x: rope_scaling with "type", rope_theta at the top
    "llama-linear-v4.36": dict(LLAMA, num_key_value_heads=8, rope_theta=10000.0, torch_dtype="bfloat16",
                               rope_scaling={"type": "linear", "factor": 2.0}),
    # transformers 4.43+: llama3 rope_scaling with "rope_type"
    "llama3.1-v4.43": dict(LLAMA, num_key_value_heads=2, rope_theta=500000.0, torch_dtype="bfloat16",
                           eos_token_id=[128001, 128008, 128009],
                           rope_scaling=dict(LLAMA31_RS, rope_type="llama3")),
    # transformers 5.x: rope_parameters carries rope_theta, "dtype", head_dim written out
    "llama3.1-v5": dict(LLAMA, num_key_value_heads=2, head_dim=32, dtype="bfloat16",
                        eos_token_id=[128001, 128008, 128009],
                        rope_parameters=dict(LLAMA31_RS, rope_type="llama3", rope_theta=500000.0)),
    # both keys (an old config edited by a newer tool): transformers 5 takes rope_scaling whole
    "llama-both-rope-keys": dict(LLAMA, num_key_value_heads=2, rope_theta=250000.0,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                 rope_scaling={"type": "linear", "factor": 4.0}),
    "mistral-no-kv-heads": dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral",
                                sliding_window=4096, head_dim=64),
    "mistral-v0.2": dict(LLAMA, model_type="mistral", num_key_value_heads=2, sliding_window=None,
                         rope_theta=1000000.0),
    "qwen2": dict(LLAMA, model_type="qwen2", num_key_value_heads=2, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=1, tie_word_embeddings=True),
    "qwen2-sliding": dict(LLAMA, model_type="qwen2", num_key_value_heads=2, use_sliding_window=True,
                          sliding_window=64, max_window_layers=1),
    "qwen3-defaults": dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_key_value_heads=2),
    "qwen3-sliding": dict(LLAMA, model_type="qwen3", num_key_value_heads=2, head_dim=64, use_sliding_window=True,
                          sliding_window=128, max_window_layers=1, tie_word_embeddings=True),
    # Qwen2.5's long-context recipe (transformers 4.x "type"), the factor from the lengths (DeepSeek's way),
    # mscale / mscale_all_dim, an explicit attention_factor and untruncated ramp bounds
    "qwen2.5-yarn-v4": dict(LLAMA, model_type="qwen2", num_key_value_heads=2, rope_theta=1000000.0,
                            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
    "yarn-factor-from-lengths": dict(LLAMA, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                             "factor": None, "original_max_position_embeddings": 512}),
    "yarn-mscale": dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                             "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2,
                                             "original_max_position_embeddings": 256}),
    "yarn-attention-factor-untruncated": dict(LLAMA, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9, "truncate": False,
        "original_max_position_embeddings": 2048}),
    "yarn-top-level-original-length": dict(LLAMA, original_max_position_embeddings=1024,
                                           rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    # dynamic NTK (transformers 4.3x "type"); its frequencies start as the default ones
    "llama-dynamic-v4": dict(LLAMA, rope_scaling={"type": "dynamic", "factor": 2.5}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_family_configs_read_like_transformers(name):
    raw = CONFIGS[name]
    cfg = model_config_from_hf(raw)
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.rope.theta == hf.rope_parameters["rope_theta"]
    assert cfg.rope.type == hf.rope_parameters["rope_type"]
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.norm_eps == hf.rms_norm_eps
    layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * cfg.num_layers
    window = getattr(hf, "sliding_window", None)
    assert cfg.sliding_windows == tuple(window if t == "sliding_attention" or cfg.model_type == "mistral"
                                        else None for t in layer_types)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    assert torch.allclose(inverse_frequencies(cfg.rope, cfg.head_dim), rotary.inv_freq, rtol=1e-6, atol=0)
    assert cfg.rope.attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)


def test_dynamic_frequencies_are_transformers_at_every_length():
    """Up to max_position_embeddings the default frequencies, past it NTK's rescaled base, from the step's length as a
    tensor (as a graph replay computes it), against a fresh LlamaRotaryEmbedding after a forward of that length."""
    from tiermem.engine.rope import dynamic_frequencies

    raw = CONFIGS["llama-dynamic-v4"]
    cfg = model_config_from_hf(raw)
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    longest = hf.max_position_embeddings
    for length in (5, longest - 1, longest, longest + 1, 3 * longest + 7):
        rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
        rotary(torch.zeros(1, 1, cfg.head_dim), torch.arange(length)[None])
        ours = dynamic_frequencies(cfg.rope, cfg.head_dim, torch.tensor(length))
        assert torch.allclose(ours, rotary.inv_freq, rtol=1e-6, atol=0), length
        assert torch.equal(ours, inverse_frequencies(cfg.rope, cfg.head_dim)) == (length <= longest)


def test_versions_agree_and_derived_fields():
    old, new = model_config_from_hf(CONFIGS["llama3.1-v4.43"]), model_config_from_hf(CONFIGS["llama3.1-v5"])
    assert old == new
    assert new.dtype == torch.bfloat16 and new.eos_token_id == (128001, 128008, 128009)
    assert new.rope.original_max_position_embeddings == 1024 and new.rope.factor == 8.0
    llama2 = model_config_from_hf(CONFIGS["llama2-v4.28"])
    assert (llama2.num_kv_heads, llama2.head_dim, llama2.rope.theta) == (8, 32, 10000.0)
    assert llama2.dtype == torch.float16
    assert model_config_from_hf(CONFIGS["mistral-no-kv-heads"]).num_kv_heads == 8  # MistralConfig's default
    assert model_config_from_hf(CONFIGS["qwen2"]).qkv_bias
    qwen3 = model_config_from_hf(CONFIGS["qwen3-defaults"])
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128  # Qwen3Config's head_dim, not D / H
    assert model_config_from_hf({k: v for k, v in LLAMA.items() if k != "model_type"}).model_type == "llama"


def test_opt_350m_style_config():
    raw = dict(architectures=["OPTForCausalLM"], model_type="opt", hidden_size=1024, ffn_dim=4096,
               num_attention_heads=16, num_hidden_layers=24, vocab_size=50272, max_position_embeddings=2048,
               do_layer_norm_before=False, word_embed_proj_dim=512, torch_dtype="float16",
               activation_function="relu", _remove_final_layer_norm=False, enable_bias=True)
    cfg = model_config_from_hf(raw)
    assert cfg.family == "opt" and cfg.rope is None and cfg.position_offset == 2
    assert (cfg.word_embed_proj_dim, cfg.embed_dim, cfg.final_layer_norm) == (512, 512, False)
    assert cfg.tie_word_embeddings and cfg.qkv_bias and cfg.head_dim == 64
    shapes = expected_weights(cfg)
    assert shapes["embed"]["model.decoder.project_in.weight"] == (1024, 512)
    assert shapes["head"] == {"model.decoder.project_out.weight": (512, 1024)}


@pytest.mark.parametrize(
    ("raw", "error", "words"),
    [
        (dict(LLAMA, model_type="gpt2"), UnsupportedArchitectureError, "gpt2"),
        (dict(LLAMA, rope_scaling={"type": "proportional", "factor": 4.0}), UnsupportedArchitectureError,
         "proportional"),
        (dict(LLAMA, rope_scaling={"type": "dynamic"}), ConfigError, "'dynamic' lack key 'factor'"),
        (dict(LLAMA, rope_scaling={"type": "dynamic", "factor": 0.0}), ConfigError, "rope factor"),
        (dict(LLAMA, rope_scaling={"type": "yarn", "factor": -4.0}), ConfigError, "positive factor"),
        (dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0}), ConfigError, "low_freq_factor"),
        (dict(LLAMA, hidden_act="gelu"), UnsupportedArchitectureError, "gelu"),
        (dict(LLAMA, num_attention_heads=0), ConfigError, "num_attention_heads must be a positive integer"),
        (dict(LLAMA, num_hidden_layers=-2), ConfigError, "num_hidden_layers must be a positive integer"),
        (dict(LLAMA, hidden_size=64.5), ConfigError, "hidden_size must be a positive integer"),
        (dict(LLAMA, num_key_value_heads=3), ConfigError, "not a multiple of num_key_value_heads 3"),
        (dict(LLAMA, torch_dtype="int8"), ConfigError, "int8"),
        ({"hidden_size": 64}, ConfigError, "model_type"),
        # values that would give NaN logits rather than an error
        (dict(LLAMA, rms_norm_eps=-1.0), ConfigError, "rms_norm_eps .* positive finite"),
        (dict(LLAMA, rms_norm_eps=float("nan")), ConfigError, "rms_norm_eps .* positive finite"),
        (dict(LLAMA, rope_theta=0), ConfigError, "rope_theta must be a positive finite"),
        (dict(LLAMA, rope_scaling={"type": "linear", "factor": 0.0}), ConfigError, "rope factor"),
        # values of the wrong type or form
        (dict(LLAMA, vocab_size=None), ConfigError, "vocab_size is null"),
        (dict(LLAMA, rms_norm_eps="abc"), ConfigError, "wrong type or form"),
        (dict(LLAMA, rope_scaling="linear"), ConfigError, "wrong type or form"),
        (dict(LLAMA, eos_token_id="abc"), ConfigError, "wrong type or form"),
        (dict(LLAMA, model_type=["llama"]), ConfigError, "wrong type or form"),
        (dict(LLAMA, pad_token_id="x"), ConfigError, "pad_token_id must be a token id"),
        (dict(LLAMA, num_hidden_layers=10**12), ConfigError, "num_hidden_layers .* more than 4096"),
        ([1, 2], ConfigError, "JSON object"),
    ],
)
def test_bad_configs_raise(raw, error, words):
    with pytest.raises(error, match=words):
        model_config_from_hf(raw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_expected_weights_are_exactly_the_hf_checkpoint(variant, tmp_path):
    """What save_pretrained writes (transformers 5 fuses MoE experts in memory, and writes them per expert), as pack
    reads it (Phi-3's fused projections split into the engine's names)."""
    path = build_tiny(variant, tmp_path)
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    ckpt = HFCheckpoint(path)
    state = {name: ckpt.load_tensor(name) for name in ckpt.tensor_names}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    got = {b: {n: tuple(t.shape) for n, t in ws.items()} for b, ws in split_state_dict(state).items()}
    assert got == expected_weights(cfg)
    for alias, source in tied_head_alias(cfg).items():
        state[alias] = state[source]
    check_weights(cfg, split_state_dict(state))  # a tied lm_head copy is tolerated


def test_check_weights_names_the_bad_tensors():
    cfg = model_config_from_hf(CONFIGS["mistral-v0.2"])
    specs = {b: dict(ws) for b, ws in expected_weights(cfg).items()}
    check_weights(cfg, specs)
    check_weights(cfg, {n: (s, torch.bfloat16) for ws in specs.values() for n, s in ws.items()})  # flat form
    del specs["layers.1"]["model.layers.1.mlp.up_proj.weight"]
    specs["layers.0"]["model.layers.0.self_attn.k_proj.weight"] = (256, 256)
    specs["embed"]["model.extra.weight"] = (3,)
    specs["embed"]["model.norm.weight"] = specs["head"].pop("model.norm.weight")
    specs["head"]["lm_head.weight"] = ((1000, 256), torch.int32)
    specs["layers.0"]["model.layers.0.rotary_emb.inv_freq"] = (16,)  # old checkpoints have these: ignored
    with pytest.raises(WeightsError) as info:
        check_weights(cfg, specs)
    msg = str(info.value)
    for words in ("missing model.layers.1.mlp.up_proj.weight",
                  "model.layers.0.self_attn.k_proj.weight has shape",
                  "unexpected model.extra.weight", "model.norm.weight is in block 'embed'",
                  "lm_head.weight has dtype torch.int32"):
        assert words in msg
    assert "inv_freq" not in msg


def test_block_rule():
    assert block_of("model.layers.12.self_attn.q_proj.weight") == "layers.12"
    assert block_of("model.decoder.layers.3.final_layer_norm.bias") == "layers.3"
    assert block_of("model.decoder.final_layer_norm.weight") == "head"
    assert block_of("model.decoder.project_out.weight") == "head"
    assert block_of("model.decoder.project_in.weight") == "embed"
    assert block_of("lm_head.weight") == "head" and block_of("model.norm.weight") == "head"
    assert block_of("model.embed_tokens.weight") == "embed"


PHI4 = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=5120, intermediate_size=17920,
            num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10, vocab_size=100352,
            max_position_embeddings=16384, original_max_position_embeddings=16384, rope_theta=250000.0,
            rope_scaling=None, sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
            torch_dtype="bfloat16", bos_token_id=100257, eos_token_id=100265, pad_token_id=100349)


def test_phi_configs_read_as_phi3config_does():
    """Phi-4 (14.7B) as the hub has it; Phi-3-mini-4k's sliding window; Phi-3.5-mini's LongRoPE (the old names 'su'
    and 'yarn' mean it too in a phi3 config); Phi-4-mini's partial rotary (96 of 128 dimensions, its LongRoPE
    factors counted on those); partial rotary outside Phi-3's family is refused, as transformers cannot run it."""
    import math

    phi4 = model_config_from_hf(PHI4)
    assert phi4.family == "llama" and phi4.rope.theta == 250000.0 and phi4.sliding_windows == (None,) * 40
    params = sum(math.prod(s) for block in expected_weights(phi4).values() for s in block.values())
    assert params / 1e9 == pytest.approx(14.7, rel=0.01)
    mini = model_config_from_hf(dict(PHI4, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, sliding_window=2047))
    assert mini.sliding_windows == (2047,) * 32
    phi35 = dict(PHI4, hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=131072, original_max_position_embeddings=4096)
    factors = dict(short_factor=[1.0] * 48, long_factor=[2.0] * 48)
    for scaling in (dict(type="su", **factors), dict(type="yarn", **factors), dict(rope_type="longrope", **factors)):
        rope = model_config_from_hf(dict(phi35, rope_scaling=scaling)).rope
        assert (rope.type, rope.factor, rope.original_max_position_embeddings) == ("longrope", 32.0, 4096)
        assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    with pytest.raises(ConfigError, match="short_factor has 47 values; 96 rotary dimensions of head_dim 96 need 48"):
        model_config_from_hf(dict(phi35, rope_scaling=dict(factors, type="longrope", short_factor=[1.0] * 47)))
    with pytest.raises(ConfigError, match="need short_factor and long_factor"):
        model_config_from_hf(dict(phi35, rope_scaling=dict(type="longrope", short_factor=[1.0] * 48)))
    # microsoft/Phi-4-mini-instruct's config (transformers 4.45): head_dim 128, 3/4 of it rotates
    phi4_mini = dict(PHI4, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=200064, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, partial_rotary_factor=0.75, rope_theta=10000.0,
                     tie_word_embeddings=True, rope_scaling=dict(type="longrope", short_factor=[1.0] * 48,
                                                                 long_factor=[2.0] * 48))
    rope = model_config_from_hf(phi4_mini).rope
    assert (rope.type, rope.partial_rotary_factor, rope.rotary_dim(128)) == ("longrope", 0.75, 96)
    with pytest.raises(ConfigError, match="64 values; 96 rotary dimensions of head_dim 128 need 48"):
        model_config_from_hf(dict(phi4_mini, rope_scaling=dict(type="longrope", short_factor=[1.0] * 64,
                                                               long_factor=[2.0] * 64)))
    with pytest.raises(ConfigError, match="rotates 1 dimensions"):
        model_config_from_hf(dict(PHI4, partial_rotary_factor=1 / 128))
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        model_config_from_hf(dict(PHI4, partial_rotary_factor=1.5))
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor 0.75 .* model_type 'llama'"):
        model_config_from_hf(dict(PHI4, partial_rotary_factor=0.75, model_type="llama",
                                  architectures=["LlamaForCausalLM"]))


# config.json of google/gemma-2-9b (transformers 4.42), weights not needed
GEMMA2_9B = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=3584, intermediate_size=14336,
                 num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                 hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                 sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=256000,
                 torch_dtype="float32", bos_token_id=2, eos_token_id=1, pad_token_id=0, cache_implementation="hybrid")


def test_gemma2_configs_read_as_gemma2config_does():
    """Gemma-2-9B as the hub has it: 9.24B parameters, tied embeddings, every other layer (0, 2, ...) in a 4096-token
    window, softcaps 50 and 30, the softmax scale 256 ** -0.5, the embedding scaled by sqrt(3584); layer_types and a
    null cap as transformers 5 may write them; another activation is refused."""
    import math

    cfg = model_config_from_hf(GEMMA2_9B)
    params = sum(math.prod(s) for block in expected_weights(cfg).values() for s in block.values())
    assert params / 1e9 == pytest.approx(9.24, rel=0.01)
    assert cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.norm_plus_one
    assert cfg.sliding_windows[:4] == (4096, None, 4096, None)
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.attn_scale) == (50.0, 30.0, 256**-0.5)
    assert cfg.embed_scale == 3584**0.5
    assert "model.layers.0.pre_feedforward_layernorm.weight" in expected_weights(cfg)["layers.0"]
    v5 = model_config_from_hf(dict(GEMMA2_9B, layer_types=["full_attention"] * 42, final_logit_softcapping=None))
    assert v5.sliding_windows == (None,) * 42 and v5.final_softcap is None
    with pytest.raises(UnsupportedArchitectureError, match="'silu' is not supported"):
        model_config_from_hf(dict(GEMMA2_9B, hidden_act="silu", hidden_activation="silu"))
    with pytest.raises(ConfigError, match="attn logit softcapping must be a positive number"):
        model_config_from_hf(dict(GEMMA2_9B, attn_logit_softcapping=0))


# config.json of google/gemma-3-1b-it (transformers 4.50), weights not needed
GEMMA3_1B = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152,
                 intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                 head_dim=256, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=512,
                 sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                 final_logit_softcapping=None, attn_logit_softcapping=None, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, vocab_size=262144, torch_dtype="bfloat16", bos_token_id=2, eos_token_id=[1, 106],
                 pad_token_id=0)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 8.0}])
def test_gemma3_configs_read_as_gemma3textconfig_does(scaling):
    """Gemma-3-1B as the hub has it (and with the 4B+ models' linear scaling of the global layers): 5 of each 6
    layers in a 512-token window with RoPE base 10000, the others global with base 1e6; each RoPE's frequencies
    against transformers' Gemma3RotaryEmbedding, from the legacy keys and from transformers 5's nested
    rope_parameters; q/k norms; no soft-capping."""
    import math

    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    raw = dict(GEMMA3_1B, rope_scaling=scaling)
    cfg = model_config_from_hf(raw)
    params = sum(math.prod(s) for block in expected_weights(cfg).values() for s in block.values())
    assert params / 1e9 == pytest.approx(1.0, rel=0.01)
    assert cfg.sliding_windows[:7] == (512,) * 5 + (None, 512)
    assert cfg.qk_norm and cfg.norm_plus_one and cfg.attn_softcap is None and cfg.final_softcap is None
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    rotary = Gemma3RotaryEmbedding(hf)
    nested = model_config_from_hf(json.loads(hf.to_json_string()))  # as transformers 5 writes it back
    for read in (cfg, nested):
        assert torch.allclose(inverse_frequencies(read.rope, 256), rotary.full_attention_inv_freq, rtol=1e-6, atol=0)
        assert torch.allclose(inverse_frequencies(read.rope_local, 256), rotary.sliding_attention_inv_freq,
                              rtol=1e-6, atol=0)
    assert (cfg.rope.type, cfg.rope_local.type) == (("linear" if scaling else "default"), "default")
    with pytest.raises(UnsupportedArchitectureError, match="without a sliding_window"):
        model_config_from_hf(dict(GEMMA3_1B, sliding_window=None))


def test_phi3_fused_projections_are_read_as_llamas(tmp_path):
    from safetensors import safe_open

    path = build_tiny("phi3", tmp_path)
    ckpt = HFCheckpoint(path)
    with safe_open(path / "model.safetensors", "pt") as f:
        qkv, gate_up = (f.get_tensor(f"model.layers.1.{n}.weight") for n in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
    q, k, v = (ckpt.load_tensor(f"model.layers.1.self_attn.{n}_proj.weight") for n in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64) and torch.equal(torch.cat([q, k, v]), qkv)
    gate, up = (ckpt.load_tensor(f"model.layers.1.mlp.{n}_proj.weight") for n in ("gate", "up"))
    assert torch.equal(torch.cat([gate, up]), gate_up) and ckpt.tensor_shape("model.layers.1.mlp.up_proj.weight") == (
        128, 64)
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in ckpt.tensor_names)


def test_a_fused_projection_of_the_wrong_shape_is_named_not_split(tmp_path):
    """A qkv_proj whose rows are not q + k + v of the config stays whole, and pack's check names it."""
    from safetensors.torch import load_file, save_file

    import tiermem

    path = build_tiny("phi3", tmp_path / "hf")
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.qkv_proj.weight"] = state["model.layers.0.self_attn.qkv_proj.weight"][:-8]
    save_file(state, path / "model.safetensors")
    assert "model.layers.0.self_attn.qkv_proj.weight" in HFCheckpoint(path).tensor_names
    with pytest.raises(WeightsError, match=r"missing model\.layers\.0\.self_attn\.q_proj\.weight.*unexpected "
                                           r"model\.layers\.0\.self_attn\.qkv_proj\.weight"):
        tiermem.pack(path, tmp_path / "store", progress=False)
