"""OPT: learned positions (offset 2), LayerNorm before or after each sublayer, ReLU MLP, biases,
optional project_in/project_out when word_embed_proj_dim != hidden_size (opt-350m).

Pure math, no I/O; weight dicts keyed by full HF names; matmuls through ops.linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tiermem.engine.families import output
from tiermem.kernels import ops

if TYPE_CHECKING:
    from tiermem.engine.attention import Attention
    from tiermem.engine.config import ModelConfig

Weights = Mapping[str, object]
P = "model.decoder."
EMBED = P + "embed_tokens.weight"
POSITIONS = P + "embed_positions.weight"
PROJECT_IN = P + "project_in.weight"
PROJECT_OUT = P + "project_out.weight"
FINAL_NORM = P + "final_layer_norm."
LM_HEAD = output.LM_HEAD


def weight_shapes(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Block -> {HF name -> shape} of a checkpoint for cfg."""
    D, F_, E = cfg.hidden_size, cfg.intermediate_size, cfg.embed_dim
    n_positions = cfg.max_position_embeddings + cfg.position_offset
    embed_block = {EMBED: (cfg.vocab_size, E), POSITIONS: (n_positions, D)}
    if cfg.word_embed_proj_dim:
        embed_block[PROJECT_IN] = (D, E)
    blocks: dict[str, dict[str, tuple[int, ...]]] = {"embed": embed_block}
    for i in range(cfg.num_layers):
        p = f"{P}layers.{i}."
        w: dict[str, tuple[int, ...]] = {}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[f"{p}self_attn.{proj}.weight"] = (D, D)
            if cfg.qkv_bias:
                w[f"{p}self_attn.{proj}.bias"] = (D,)
        w |= {p + "fc1.weight": (F_, D), p + "fc2.weight": (D, F_)}
        if cfg.mlp_bias:
            w |= {p + "fc1.bias": (F_,), p + "fc2.bias": (D,)}
        if cfg.layer_norm_affine:
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                w |= {f"{p}{norm}.weight": (D,), f"{p}{norm}.bias": (D,)}
        blocks[f"layers.{i}"] = w
    head_block: dict[str, tuple[int, ...]] = {}
    if cfg.final_layer_norm and cfg.layer_norm_affine:
        head_block |= {FINAL_NORM + "weight": (D,), FINAL_NORM + "bias": (D,)}
    if cfg.word_embed_proj_dim:
        head_block[PROJECT_OUT] = (E, D)
    if not cfg.tie_word_embeddings:
        head_block[LM_HEAD] = (cfg.vocab_size, E)
    blocks["head"] = head_block
    return blocks


def _layer_norm(cfg: ModelConfig, w: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    weight, bias = w.get(prefix + "weight"), w.get(prefix + "bias")
    weight = weight.to(x.dtype) if weight is not None else None
    bias = bias.to(x.dtype) if bias is not None else None
    return F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_eps)


def _activation(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) if cfg.hidden_act == "relu" else F.gelu(x)


def embed(
    cfg: ModelConfig, w: Weights, input_ids: torch.Tensor, positions: torch.Tensor,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """input_ids, positions [B, T] -> h [B, T, D] = project_in(tokens) + learned positions.

    Rows are gathered where the tables live, then moved to `device` and cast to `dtype`.
    """
    table, pos_table = w[EMBED], w[POSITIONS]  # [V, E], [P + 2, D]
    device, dtype = device or table.device, dtype or table.dtype
    x = F.embedding(input_ids.to(table.device), table).to(device, dtype)  # [B, T, E]
    if cfg.word_embed_proj_dim:
        x = ops.linear(x, w[PROJECT_IN].to(device, dtype, non_blocking=True))  # [B, T, D]; the block may be on the host
    pos = F.embedding(positions.to(pos_table.device) + cfg.position_offset, pos_table)  # [B, T, D]
    return x + pos.to(device, dtype)


def layer(cfg: ModelConfig, i: int, w: Weights, h: torch.Tensor, attn: Attention) -> torch.Tensor:
    """One decoder layer: h [B, T, D] -> [B, T, D]."""
    p = f"{P}layers.{i}."
    B, T, D = h.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    x = _layer_norm(cfg, w, p + "self_attn_layer_norm.", h) if cfg.do_layer_norm_before else h
    q = ops.linear(x, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))  # [B, T, D]
    k = ops.linear(x, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
    v = ops.linear(x, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
    q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
    a = attn(i, q, k, v)  # [B, T, D]
    h = h + ops.linear(a, w[p + "self_attn.out_proj.weight"], w.get(p + "self_attn.out_proj.bias"))
    if not cfg.do_layer_norm_before:
        h = _layer_norm(cfg, w, p + "self_attn_layer_norm.", h)
    x = _layer_norm(cfg, w, p + "final_layer_norm.", h) if cfg.do_layer_norm_before else h
    x = _activation(cfg, ops.linear(x, w[p + "fc1.weight"], w.get(p + "fc1.bias")))  # [B, T, F]
    h = h + ops.linear(x, w[p + "fc2.weight"], w.get(p + "fc2.bias"))
    if not cfg.do_layer_norm_before:
        h = _layer_norm(cfg, w, p + "final_layer_norm.", h)
    return h


def final(cfg: ModelConfig, w_head: Weights, h: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm (pre-norm models only) then project_out: h [B, T, D] -> [B, T, E]."""
    if cfg.final_layer_norm:
        h = _layer_norm(cfg, w_head, FINAL_NORM, h)
    if cfg.word_embed_proj_dim:
        h = ops.linear(h, w_head[PROJECT_OUT])  # [B, T, E]
    return h


def lm_head_weight_name(cfg: ModelConfig) -> tuple[str, str]:
    """(block, HF name) of the output projection: the embedding table when tied."""
    return output.lm_head_weight_name(cfg, EMBED)


def logits(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    """h [B, T, E] -> logits [B, T, V] (see families.output.logits)."""
    return output.logits(cfg, w, h, EMBED)
