"""transformers 5's fused expert tensors, read as the hub's per-expert ones.

Mixtral and Qwen-MoE checkpoints on the hub hold each expert's projections as 2-D tensors
(`block_sparse_moe.experts.{j}.w1.weight` ..., `mlp.experts.{j}.gate_proj.weight` ...), and transformers
5.24 saves them so. In memory, transformers 5 fuses them per layer (`mlp.experts.gate_up_proj` [E, 2I, D], the
gate's rows then the up projection's; `mlp.experts.down_proj` [E, D, I]; Mixtral's router is `mlp.gate.weight`),
and a state dict saved from that layout holds those names. `split_fused_experts` maps each per-expert name to
(fused tensor, expert, row range), so that a checkpoint of either layout packs to the same store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FUSED = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+\.)mlp\.(?P<part>experts\.gate_up_proj|experts\.down_proj"
                   r"|gate\.weight)$")
PER_EXPERT = {  # model_type -> (prefix of the sparse MLP, gate, up, down names of expert j)
    "mixtral": ("block_sparse_moe.", "experts.{j}.w1.weight", "experts.{j}.w3.weight", "experts.{j}.w2.weight"),
    "qwen3_moe": ("mlp.", "experts.{j}.gate_proj.weight", "experts.{j}.up_proj.weight",
                  "experts.{j}.down_proj.weight"),
}
PER_EXPERT["qwen2_moe"] = PER_EXPERT["qwen3_moe"]

Piece = tuple[str, int | None, tuple[int, int] | None]  # (fused tensor, expert or None: all of it, rows or None)


def split_fused_experts(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Piece]:
    """Per-expert tensor name -> where it lies in a fused tensor, for each fused tensor of `shapes` whose shape
    matches the config ({} for other models, or a checkpoint already per expert)."""
    model_type = config.get("model_type")
    if model_type not in PER_EXPERT:
        return {}
    prefix, gate, up, down = PER_EXPERT[model_type]
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size" if model_type == "mixtral" else "moe_intermediate_size")
    pieces: dict[str, Piece] = {}
    for name, shape in shapes.items():
        match = FUSED.match(name)
        if match is None:
            continue
        layer, part = match["layer"], match["part"]
        if part == "gate.weight":
            if layer + prefix + "gate.weight" != name:  # Mixtral's router: mlp.gate -> block_sparse_moe.gate
                pieces[layer + prefix + "gate.weight"] = (name, None, None)
        elif part == "experts.gate_up_proj" and len(shape) == 3 and tuple(shape[1:]) == (2 * inter, hidden):
            for j in range(shape[0]):
                pieces[layer + prefix + gate.format(j=j)] = (name, j, (0, inter))
                pieces[layer + prefix + up.format(j=j)] = (name, j, (inter, 2 * inter))
        elif part == "experts.down_proj" and len(shape) == 3 and tuple(shape[1:]) == (hidden, inter):
            for j in range(shape[0]):
                pieces[layer + prefix + down.format(j=j)] = (name, j, None)
    return pieces


def piece_shape(piece: Piece, fused_shape: tuple[int, ...]) -> tuple[int, ...]:
    _, expert, rows = piece
    if expert is None:
        return tuple(fused_shape)
    inner = tuple(fused_shape[1:])
    return inner if rows is None else (rows[1] - rows[0], *inner[1:])
