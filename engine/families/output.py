"""The output projection, shared by every family: where lm_head lives and how logits are computed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tiermem.kernels import ops

if TYPE_CHECKING:
    from tiermem.engine.config import ModelConfig

LM_HEAD = "lm_head.weight"


def lm_head_weight_name(cfg: ModelConfig, embed_name: str) -> tuple[str, str]:
    """(block, HF name) of the output projection: the embedding table `embed_name` when tied."""
    return ("embed", embed_name) if cfg.tie_word_embeddings else ("head", LM_HEAD)


def logits(cfg: ModelConfig, w: dict, h: torch.Tensor, embed_name: str) -> torch.Tensor:
    """h [B, T, D] -> logits [B, T, V]; `w` holds lm_head.weight (a tied store may carry a copy in
    "head") or else is the block named by lm_head_weight_name; soft-capped where the model caps them (Gemma 2)."""
    out = ops.linear(h, w[LM_HEAD] if LM_HEAD in w else w[lm_head_weight_name(cfg, embed_name)[1]])
    return out if cfg.final_softcap is None else ops.softcap_(out, cfg.final_softcap)  # out: fresh from linear
