"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router sends each token to top_k of E SwiGLU
experts.

Pure math, no I/O, like engine/families. probs = softmax(x @ router^T) over the E experts; each token keeps its
top_k, renormalized to sum 1 where the model does (Mixtral always, Qwen-MoE with norm_topk_prob), and its output
is the sum of those experts' outputs weighted by them; Qwen2-MoE adds a shared expert that every token goes
through, weighted by sigmoid(x @ shared_gate^T).

Three ways to run the experts, with the same result:
- routed_experts runs each pick (a token's chosen expert) as one block of the routed GEMV (ops.routed_linear), the
  choice read on the GPU: no host sync, the same launches for any routing, and only the chosen experts' weights read.
  It reads an expert once per pick, so it is what a decode step of quantized experts takes while its picks are fewer
  than the experts (rows x top_k < E), on the GPU, captured as a CUDA graph too, unless the weights copy each expert
  to the GPU when first asked for (gpu_tier's experts on demand, which need the choice on the host).
- chosen_experts groups the tokens by expert (one host sync per layer, for the count of tokens each expert got) and
  runs only the experts some token chose, on only their tokens: what prefill and the other steps of few rows take.
- all_experts runs every expert on every token and weights the unchosen ones by 0: no host sync and no shape that
  depends on the routing. A step being captured as a CUDA graph that routed_experts does not take runs it; so does a
  decode step whose picks cover the experts on average (rows x top_k >= E, at most GEMV_SPLIT_ROWS rows): its fused
  GEMVs read each expert's weights once either way, and the sync would make the host wait for the GPU at every
  layer, so that the host's issuing of a layer and the GPU's computing of the last one no longer overlap
  (Mixtral-8x7B int4, batch 16, weights streamed from host RAM: 0.41 of the PCIe roofline with the sync,
  benchmarks/results/*_s14call3_h200.json). Where the routed GEMV takes the weights, it runs as two launches of it,
  every expert a pick of all the step's rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch

from tiermem.kernels import ops
from tiermem.storage.moe_names import NAMING, ROUTER, SHARED_EXPERT


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a model: which layers have it, how many experts, how many per token."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    normalize_top_k: bool  # renormalize the kept probabilities to sum 1
    sparse_layers: tuple[bool, ...]  # per layer: the sparse MLP (True) or the model's dense MLP
    naming: str  # a key of storage.moe_names.NAMING
    shared_expert_size: int = 0  # intermediate size of Qwen2-MoE's shared expert (0: none)


# The experts run through the routed GEMV where it takes them while this is True: routed_experts, and all_experts in
# two launches (benchmarks/moe_routed_ab.py switches it off to compare with chosen_experts and all_experts' launches
# expert by expert).
ROUTED_EXPERTS = True


@cache  # the names are asked for in every layer of every step
def router_name(moe: MoeConfig, layer_prefix: str) -> str:
    prefix, _ = NAMING[moe.naming]
    return layer_prefix + prefix + ROUTER


@cache
def expert_names(moe: MoeConfig, layer_prefix: str, j: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of expert j in the layer whose names start with layer_prefix."""
    prefix, names = NAMING[moe.naming]
    gate, up, down = (layer_prefix + prefix + n.format(j=j) for n in names)
    return gate, up, down


@cache
def shared_expert_names(layer_prefix: str) -> tuple[tuple[str, str, str], str]:
    """((gate, up, down) of Qwen2-MoE's shared expert, its gate [1, D]) in the layer starting with layer_prefix."""
    p = layer_prefix + SHARED_EXPERT
    return (p + ".gate_proj.weight", p + ".up_proj.weight", p + ".down_proj.weight"), p + "_gate.weight"


def weight_shapes(moe: MoeConfig, layer_prefix: str, hidden: int) -> dict[str, tuple[int, int]]:
    """HF name -> shape of one sparse MLP: the router [E, D], each expert's gate, up [I, D] and down [D, I], and a
    shared expert with its gate [1, D] where the model has one."""
    shapes = {router_name(moe, layer_prefix): (moe.num_experts, hidden)}
    experts = [(expert_names(moe, layer_prefix, j), moe.intermediate_size) for j in range(moe.num_experts)]
    if moe.shared_expert_size:
        names, gate = shared_expert_names(layer_prefix)
        experts.append((names, moe.shared_expert_size))
        shapes[gate] = (1, hidden)
    for (gate, up, down), inter in experts:
        shapes |= {gate: (inter, hidden), up: (inter, hidden), down: (hidden, inter)}
    return shapes


def route(moe: MoeConfig, router: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (weights [N, top_k] fp32, experts [N, top_k] int64): each token's chosen experts."""
    probs = torch.softmax(ops.linear(x, router).float(), dim=-1)  # [N, E]
    weights, experts = probs.topk(moe.top_k, dim=-1)
    if moe.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _expert(w: Mapping[str, object], names: tuple[str, str, str], x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [n, D] -> [n, D]."""
    gate, up, down = names
    return ops.linear(ops.silu_mul(ops.linear(x, w[gate]), ops.linear(x, w[up])), w[down])


def sparse_mlp(moe: MoeConfig, layer_prefix: str, w: Mapping[str, object], x: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] -> [B, T, D]: each token through its top_k experts, weighted by the router."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)  # [N, D]
    weights, experts = route(moe, w[router_name(moe, layer_prefix)], flat)  # [N, k], [N, k]
    few = _few_picks(moe, w, flat)
    every = takes_all_experts(moe, flat)
    layer = layer_experts(moe, layer_prefix, w, flat) if few or every else None  # the experts looked up once
    if few and layer.routed:
        out = routed_experts(moe, layer_prefix, w, flat, weights, experts, layer)
    elif every:
        out = all_experts(moe, layer_prefix, w, flat, weights, experts, layer)
    else:
        out = chosen_experts(moe, layer_prefix, w, flat, weights, experts)
    if moe.shared_expert_size:
        names, gate = shared_expert_names(layer_prefix)
        share = torch.sigmoid(ops.linear(flat, w[gate]).float())  # [N, 1]
        out = out.float() + _expert(w, names, flat).float() * share
    return out.to(x.dtype).view(B, T, D)


class LayerExperts(NamedTuple):
    """A sparse layer's experts as ops.routed_linear takes them, with their routed GEMV tables (ops.routed_table;
    None where it does not take them, or while ROUTED_EXPERTS is off)."""

    gate_up: tuple[tuple, tuple]  # (gates, ups), each a tuple over the E experts
    down: tuple[tuple]  # (downs,)
    gate_up_table: object | None
    down_table: object | None

    @property
    def routed(self) -> bool:
        """Whether the routed GEMV runs these experts."""
        return self.gate_up_table is not None and self.down_table is not None


def layer_experts(moe: MoeConfig, layer_prefix: str, w: Mapping[str, object], x: torch.Tensor) -> LayerExperts:
    """The experts of the layer whose weights `w` are, for x [N, D] (every expert asked for: those copied on demand
    are copied)."""
    names = [expert_names(moe, layer_prefix, j) for j in range(moe.num_experts)]
    gates, ups, downs = (tuple(w[n[m]] for n in names) for m in range(3))
    if not ROUTED_EXPERTS:
        return LayerExperts((gates, ups), (downs,), None, None)
    return LayerExperts((gates, ups), (downs,), ops.routed_table(x, (gates, ups)), ops.routed_table(x, (downs,)))


def picks_fewer_than_experts(moe: MoeConfig, rows: int) -> bool:
    """Whether a step of `rows` rows is one that routed_experts takes (where the weights let it, see the module doc):
    fewer picks than experts (rows x top_k < E), at most GEMV_SPLIT_ROWS rows."""
    return rows <= ops.GEMV_SPLIT_ROWS and rows * moe.top_k < moe.num_experts


def _few_picks(moe: MoeConfig, w: Mapping[str, object], x: torch.Tensor) -> bool:
    """picks_fewer_than_experts for x [N, D] where the routed GEMV may run on it (ops.routed_gemv_takes), of weights
    that do not copy experts on demand (w.copies_experts_on_demand: those need the choice on the host,
    chosen_experts). Looks up no expert: a step that takes chosen_experts reads only those its tokens chose."""
    return (ROUTED_EXPERTS and picks_fewer_than_experts(moe, x.shape[0]) and ops.routed_gemv_takes(x)
            and not getattr(w, "copies_experts_on_demand", False))


def takes_routed_experts(moe: MoeConfig, layer_prefix: str, w: Mapping[str, object], x: torch.Tensor) -> bool:
    """Whether x [N, D] goes through routed_experts (see the module doc): _few_picks, with experts the routed GEMV
    takes on x's device."""
    return _few_picks(moe, w, x) and layer_experts(moe, layer_prefix, w, x).routed


def picks_cover_experts(moe: MoeConfig, rows: int) -> bool:
    """Whether a step of `rows` rows runs every expert outside a capture (see the module doc): few enough rows for
    the fused GEMV, whose picks cover the experts (rows x top_k >= E)."""
    return rows <= ops.GEMV_SPLIT_ROWS and rows * moe.top_k >= moe.num_experts


def takes_all_experts(moe: MoeConfig, x: torch.Tensor) -> bool:
    """Whether x [N, D] goes through all_experts (see the module doc): a CUDA graph capture, or rows whose picks
    cover the experts."""
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    return capturing or picks_cover_experts(moe, x.shape[0])


def chosen_experts(moe: MoeConfig, layer_prefix: str, w: Mapping[str, object], x: torch.Tensor,
                   weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """x [N, D], weights and experts [N, k] -> [N, D] fp32: each expert some token chose, on those tokens only (one
    expert at a time, so that a prefill of many tokens holds one expert's activations)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    chosen = experts.reshape(-1)  # [N * k]: token n's picks are n*k .. n*k + k-1
    order = chosen.argsort(stable=True)  # the picks grouped by expert
    counts = torch.bincount(chosen, minlength=moe.num_experts).tolist()  # the one host sync
    tokens = order // moe.top_k  # [N * k] the token of each pick, grouped by expert
    pick_weights = weights.reshape(-1)[order, None]  # [N * k, 1]
    start = 0
    for j, count in enumerate(counts):
        if count:
            mine = slice(start, start + count)  # expert j's picks
            y = _expert(w, expert_names(moe, layer_prefix, j), x[tokens[mine]])  # [count, D]
            out.index_add_(0, tokens[mine], y.float().mul_(pick_weights[mine]))
            start += count
    return out


def routed_experts(moe: MoeConfig, layer_prefix: str, w: Mapping[str, object], x: torch.Tensor,
                   weights: torch.Tensor, experts: torch.Tensor, layer: LayerExperts | None = None) -> torch.Tensor:
    """chosen_experts' result [N, D] fp32 from x [N, D], weights and experts [N, k], the choice never read on the host:
    each of the N * k picks through its expert (ops.routed_linear), summed by the router's weights. layer: the
    layer's experts, where the caller has looked them up."""
    N, D = x.shape
    layer = layer or layer_experts(moe, layer_prefix, w, x)
    picks = experts.reshape(-1)  # [P = N * k]: token n's picks are n*k .. n*k + k-1
    gate_up = ops.routed_linear(x, layer.gate_up, picks, moe.top_k, table=layer.gate_up_table)  # [2, P, I]
    h = ops.silu_mul(gate_up[0], gate_up[1])  # [P, I]
    y = ops.routed_linear(h, layer.down, picks, 1, table=layer.down_table)[0]  # [P, D]
    return (y.view(N, moe.top_k, D).float() * weights[..., None]).sum(1)  # [N, D], as chosen_experts rounds it


def all_experts(moe: MoeConfig, layer_prefix: str, w: Mapping[str, object], x: torch.Tensor,
                weights: torch.Tensor, experts: torch.Tensor, layer: LayerExperts | None = None) -> torch.Tensor:
    """chosen_experts' result without a host sync or a shape that depends on the routing: every expert on every
    token, the experts a token did not choose weighted by 0. Where the routed GEMV takes the weights, one launch
    for every expert's gate and up and one for their down (ops.routed_linear, each expert a pick of all N rows),
    summed in fp32; otherwise expert by expert, summed in x's dtype (as transformers sums a token's experts), one
    fused multiply-add per expert. These are the steps whose launches count. layer: as routed_experts takes it."""
    gates = torch.zeros(x.shape[0], moe.num_experts, device=x.device).scatter_(1, experts, weights)  # [N, E]
    layer = layer or layer_experts(moe, layer_prefix, w, x)
    if layer.routed:
        N, D = x.shape
        every = _every_expert(moe.num_experts, x.device)  # [E]
        y = ops.routed_linear(x, layer.gate_up, every, moe.num_experts, rows=N, table=layer.gate_up_table)
        h = ops.silu_mul(y[0], y[1])  # y [2, E * N, I] -> h [E * N, I]
        out = ops.routed_linear(h, layer.down, every, 1, rows=N, table=layer.down_table)[0]  # [E * N, D]
        return (out.view(moe.num_experts, N, D).float() * gates.T[:, :, None]).sum(0)  # [N, D]
    gates = gates.to(x.dtype)
    out = torch.zeros_like(x)  # [N, D]
    for j in range(moe.num_experts):
        out.addcmul_(_expert(w, expert_names(moe, layer_prefix, j), x), gates[:, j:j + 1])
    return out


@cache  # made in the step run as it is before a capture, which then reads it
def _every_expert(num_experts: int, device: torch.device) -> torch.Tensor:
    """int64 [E]: 0 .. E-1 on `device`, all_experts' picks."""
    return torch.arange(num_experts, device=device)
