"""Checkpoint names of the sparse MLPs of Mixtral and Qwen-MoE, as the hub stores them (one place for the engine,
the fused-weight reader, pack's quantization choice, the cost model and bench).

A sparse layer holds a router `{prefix}gate.weight` [E, D] and, per expert j, gate, up and down projections; Qwen2-MoE
adds a shared expert `mlp.shared_expert.*` and its gate `mlp.shared_expert_gate.weight` [1, D].
"""

from __future__ import annotations

import re

NAMING = {  # naming style -> (prefix of the sparse MLP in a layer, expert j's gate, up and down projections)
    "mixtral": ("block_sparse_moe.", ("experts.{j}.w1.weight", "experts.{j}.w3.weight", "experts.{j}.w2.weight")),
    "qwen": ("mlp.", ("experts.{j}.gate_proj.weight", "experts.{j}.up_proj.weight", "experts.{j}.down_proj.weight")),
}
NAMING_OF_MODEL_TYPE = {"mixtral": "mixtral", "qwen2_moe": "qwen", "qwen3_moe": "qwen"}
ROUTER = "gate.weight"
SHARED_EXPERT = "mlp.shared_expert"
GATES = tuple(prefix + ROUTER for prefix, _ in NAMING.values()) + (SHARED_EXPERT + "_gate.weight",)


def is_routed_expert(name: str) -> bool:
    """Whether tensor `name` belongs to one of a sparse layer's routed experts (not its router or shared expert)."""
    return ".experts." in name


_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The index j of the routed expert tensor `name` belongs to (`...experts.{j}....`), None for any other tensor."""
    found = _EXPERT_INDEX.search(name)
    return int(found.group(1)) if found else None


def is_gate(name: str) -> bool:
    """Whether tensor `name` is a router or the shared expert's gate (small, and rounding it changes the routing)."""
    return name.endswith(GATES)
