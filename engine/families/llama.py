"""Llama 2/3/3.1, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Phi-3/Phi-4 (its fused q/k/v and gate/up
projections read as Llama's, storage/fused_weights.py) and Gemma 2: pre-norm RMSNorm decoder, RoPE, GQA, SwiGLU MLP
(in the MoE models' sparse layers, a router's pick of SwiGLU experts: engine/moe.py). Gemma 2 adds norms of the
attention's and the MLP's outputs, (1 + w) norm weights, a scaled embedding, GeGLU and soft-capped attention scores
and logits (ModelConfig's Gemma fields).

Pure math, no I/O. Weight dicts are keyed by full HF names; values are tensors or QuantizedWeight,
and every matmul goes through ops.linear (which casts/dequantizes to the activation dtype).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tiermem.engine import moe
from tiermem.engine.families import output
from tiermem.kernels import ops

if TYPE_CHECKING:
    from tiermem.engine.attention import Attention
    from tiermem.engine.config import ModelConfig

Weights = Mapping[str, object]
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = output.LM_HEAD


def weight_shapes(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Block -> {HF name -> shape} of a checkpoint for cfg."""
    D, F_, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * Dh, cfg.num_kv_heads * Dh
    blocks: dict[str, dict[str, tuple[int, ...]]] = {"embed": {EMBED: (cfg.vocab_size, D)}}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w = {
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            **({p + "pre_feedforward_layernorm.weight": (D,), p + "post_feedforward_layernorm.weight": (D,)}
               if cfg.sandwich_norms else {}),
            p + "self_attn.q_proj.weight": (q_dim, D), p + "self_attn.k_proj.weight": (kv_dim, D),
            p + "self_attn.v_proj.weight": (kv_dim, D), p + "self_attn.o_proj.weight": (D, q_dim),
        }
        if _sparse(cfg, i):
            w |= moe.weight_shapes(cfg.moe, p, D)
        else:
            w |= {p + "mlp.gate_proj.weight": (F_, D), p + "mlp.up_proj.weight": (F_, D),
                  p + "mlp.down_proj.weight": (D, F_)}
        if cfg.qkv_bias:
            w |= {p + "self_attn.q_proj.bias": (q_dim,), p + "self_attn.k_proj.bias": (kv_dim,),
                  p + "self_attn.v_proj.bias": (kv_dim,)}
        if cfg.o_bias:
            w[p + "self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm:
            w |= {p + "self_attn.q_norm.weight": (Dh,), p + "self_attn.k_norm.weight": (Dh,)}
        if cfg.mlp_bias and not _sparse(cfg, i):
            w |= {p + "mlp.gate_proj.bias": (F_,), p + "mlp.up_proj.bias": (F_,),
                  p + "mlp.down_proj.bias": (D,)}
        blocks[f"layers.{i}"] = w
    blocks["head"] = {NORM: (D,)} if cfg.tie_word_embeddings else {NORM: (D,), LM_HEAD: (cfg.vocab_size, D)}
    return blocks


def _sparse(cfg: ModelConfig, i: int) -> bool:
    return cfg.moe is not None and cfg.moe.sparse_layers[i]


def embed(
    cfg: ModelConfig, w: Weights, input_ids: torch.Tensor, positions: torch.Tensor,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """input_ids [B, T] -> h [B, T, D] on `device` in `dtype` (positions unused: RoPE is in attention).

    Rows are gathered where the table lives; only the gathered rows move.
    """
    table = w[EMBED]  # [V, D]
    rows = F.embedding(input_ids.to(table.device), table)  # [B, T, D]
    if cfg.embed_scale != 1.0:  # Gemma: the scale rounded to the table's dtype, as transformers multiplies
        rows = rows * _rounded(cfg.embed_scale, table.dtype)
    return rows.to(device or table.device, dtype or table.dtype)


@functools.cache  # asked for at every step
def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it."""
    return float(torch.tensor(value).to(dtype))


def _norm(cfg: ModelConfig, x: torch.Tensor, weight) -> torch.Tensor:
    return (ops.rms_norm_plus_one if cfg.norm_plus_one else ops.rms_norm)(x, weight, cfg.norm_eps)


def layer(cfg: ModelConfig, i: int, w: Weights, h: torch.Tensor, attn: Attention) -> torch.Tensor:
    """One decoder layer: h [B, T, D] -> [B, T, D]."""
    p = f"model.layers.{i}."
    B, T, _ = h.shape
    x = _norm(cfg, h, w[p + "input_layernorm.weight"])  # [B, T, D]
    q = ops.linear(x, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))  # [B, T, H*Dh]
    k = ops.linear(x, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))  # [B, T, Hkv*Dh]
    v = ops.linear(x, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
    q = q.view(B, T, cfg.num_heads, cfg.head_dim)  # [B, T, H, Dh]
    k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)  # [B, T, Hkv, Dh]
    if cfg.qk_norm:  # per head, over Dh
        q = _norm(cfg, q, w[p + "self_attn.q_norm.weight"])
        k = _norm(cfg, k, w[p + "self_attn.k_norm.weight"])
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Dh], [B, Hkv, T, Dh]
    v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    local = cfg.sliding_windows[i] is not None  # Gemma 3: sliding layers rotate with their own RoPE
    q, k = attn.rope(q, local), attn.rope(k, local)
    a = attn(i, q, k, v, cfg.sliding_windows[i], cfg.attn_scale, cfg.attn_softcap)
    a = ops.linear(a, w[p + "self_attn.o_proj.weight"], w.get(p + "self_attn.o_proj.bias"))  # [B, T, D]
    if cfg.sandwich_norms:  # Gemma 2: post_attention_layernorm normalizes the attention's output
        h = h + _norm(cfg, a, w[p + "post_attention_layernorm.weight"])
        x = _norm(cfg, h, w[p + "pre_feedforward_layernorm.weight"])
    else:
        h = h + a
        x = _norm(cfg, h, w[p + "post_attention_layernorm.weight"])
    if _sparse(cfg, i):
        return h + moe.sparse_mlp(cfg.moe, p, w, x)
    gate = ops.linear(x, w[p + "mlp.gate_proj.weight"], w.get(p + "mlp.gate_proj.bias"))  # [B, T, I]
    up = ops.linear(x, w[p + "mlp.up_proj.weight"], w.get(p + "mlp.up_proj.bias"))
    x = ops.gelu_tanh_mul(gate, up) if cfg.hidden_act == "gelu_pytorch_tanh" else ops.silu_mul(gate, up)  # [B, T, I]
    x = ops.linear(x, w[p + "mlp.down_proj.weight"], w.get(p + "mlp.down_proj.bias"))  # [B, T, D]
    return h + (_norm(cfg, x, w[p + "post_feedforward_layernorm.weight"]) if cfg.sandwich_norms else x)


def final(cfg: ModelConfig, w_head: Weights, h: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm: h [B, T, D] -> [B, T, D]."""
    return _norm(cfg, h, w_head[NORM])


def lm_head_weight_name(cfg: ModelConfig) -> tuple[str, str]:
    """(block, HF name) of the output projection: the embedding table when tied."""
    return output.lm_head_weight_name(cfg, EMBED)


def logits(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    """h [B, T, D] -> logits [B, T, V] (see families.output.logits)."""
    return output.logits(cfg, w, h, EMBED)
