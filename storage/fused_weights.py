"""Fused weight tensors of a checkpoint, read as the separate tensors tiermem's model families name.

- transformers 5's fused experts. Mixtral and Qwen-MoE checkpoints on the hub hold each expert's projections as
  2-D tensors (`block_sparse_moe.experts.{j}.w1.weight` ..., `mlp.experts.{j}.gate_proj.weight` ...), and
  transformers 5.24 saves them so. In memory, transformers 5 fuses them per layer (`mlp.experts.gate_up_proj`
  [E, 2I, D], the gate's rows then the up projection's; `mlp.experts.down_proj` [E, D, I]; Mixtral's router is
  `mlp.gate.weight`), and a state dict saved from that layout holds those names.
- Phi-3 / Phi-4's fused projections: `self_attn.qkv_proj.weight` [(H + 2 Hkv) Dh, D] (q's rows, k's, v's) and
  `mlp.gate_up_proj.weight` [2I, D] (the gate's rows, then the up projection's), which are Llama's q/k/v_proj and
  gate/up_proj stacked.

`split_fused` maps each separate name to (fused tensor, expert, row range), so that a checkpoint of either layout
packs to the same store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tiermem.storage.moe_names import NAMING, NAMING_OF_MODEL_TYPE, ROUTER

FUSED_EXPERTS = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+\.)mlp\.(?P<part>experts\.gate_up_proj"
                           r"|experts\.down_proj|gate\.weight)$")
FUSED_PROJECTIONS = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+\.)(?P<part>self_attn\.qkv_proj|mlp\.gate_up_proj)"
                               r"\.weight$")

# (fused tensor, expert or None: a 2-D tensor, rows [begin, end) or None: all of them)
Piece = tuple[str, int | None, tuple[int, int] | None]


def split_fused(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Piece]:
    """Separate tensor name -> where it lies in a fused tensor, for each fused tensor of `shapes` whose shape
    matches the config ({} for other models, or a checkpoint already split)."""
    model_type = config.get("model_type")
    if model_type in NAMING_OF_MODEL_TYPE:
        return _split_experts(config, shapes, NAMING[NAMING_OF_MODEL_TYPE[model_type]])
    if model_type == "phi3":
        return _split_projections(config, shapes)
    return {}


def _split_experts(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                   naming: tuple[str, tuple[str, str, str]]) -> dict[str, Piece]:
    prefix, (gate, up, down) = naming
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size" if config.get("model_type") == "mixtral" else "moe_intermediate_size")
    pieces: dict[str, Piece] = {}
    for name, shape in shapes.items():
        match = FUSED_EXPERTS.match(name)
        if match is None:
            continue
        layer, part = match["layer"], match["part"]
        if part == ROUTER:
            if layer + prefix + ROUTER != name:  # Mixtral's router: mlp.gate -> block_sparse_moe.gate
                pieces[layer + prefix + ROUTER] = (name, None, None)
        elif part == "experts.gate_up_proj" and len(shape) == 3 and tuple(shape[1:]) == (2 * inter, hidden):
            for j in range(shape[0]):
                pieces[layer + prefix + gate.format(j=j)] = (name, j, (0, inter))
                pieces[layer + prefix + up.format(j=j)] = (name, j, (inter, 2 * inter))
        elif part == "experts.down_proj" and len(shape) == 3 and tuple(shape[1:]) == (hidden, inter):
            for j in range(shape[0]):
                pieces[layer + prefix + down.format(j=j)] = (name, j, None)
    return pieces


def _split_projections(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Piece]:
    hidden, heads, inter = config.get("hidden_size"), config.get("num_attention_heads"), config.get("intermediate_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, heads, inter)):
        return {}  # the config check names the bad key
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = {"self_attn.qkv_proj": (("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, q + kv),
                                   ("self_attn.v_proj", q + kv, q + 2 * kv)),
            "mlp.gate_up_proj": (("mlp.gate_proj", 0, inter), ("mlp.up_proj", inter, 2 * inter))}
    pieces: dict[str, Piece] = {}
    for name, shape in shapes.items():
        match = FUSED_PROJECTIONS.match(name)
        if match is None:
            continue
        parts = rows[match["part"]]
        if len(shape) == 2 and shape[0] == parts[-1][2] and shape[1] == hidden:
            for separate, begin, end in parts:
                pieces[f"{match['layer']}{separate}.weight"] = (name, None, (begin, end))
    return pieces


def piece_shape(piece: Piece, fused_shape: tuple[int, ...]) -> tuple[int, ...]:
    _, expert, rows = piece
    inner = tuple(fused_shape) if expert is None else tuple(fused_shape[1:])
    return inner if rows is None else (rows[1] - rows[0], *inner[1:])
