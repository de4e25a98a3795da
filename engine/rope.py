"""Rotary position embedding tables: inverse frequencies (default, linear, llama3, yarn, longrope, dynamic) and
cos/sin.

Computed in fp32 exactly as transformers does (modeling_rope_utils), then cast to the compute dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tiermem.engine.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device | str = "cpu",
                        long: bool = False) -> torch.Tensor:
    """inv_freq[R / 2] in fp32 for the R = rope.rotary_dim(head_dim) dimensions of a head that rotate; long:
    longrope's frequencies for a sequence longer than the original length (its short ones otherwise; other types
    have one set)."""
    dim = rope.rotary_dim(head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
    if rope.type == "longrope":
        divisors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32, device=device)
        return 1.0 / (divisors * rope.theta ** (exponents / dim))
    inv_freq = 1.0 / (rope.theta ** (exponents / dim))  # [R/2]
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "yarn":
        return _yarn(rope, inv_freq, dim)
    if rope.type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeConfig, inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """YaRN: interpolated (inv_freq / factor) on slow dimensions, original on fast ones, a linear ramp between."""

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the old length
        old_len = rope.original_max_position_embeddings
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [Dh/2]
    extrapolated = 1 - ramp.to(inv_freq.device)  # 1: keep the original frequency
    return inv_freq / rope.factor * (1 - extrapolated) + inv_freq * extrapolated


def dynamic_frequencies(rope: RopeConfig, head_dim: int, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK scaling: inv_freq[R / 2] for a step whose longest row is seq_len (a 0-d integer tensor) tokens
    long, computed on its device (a graph replay recomputes it), as transformers computes it past
    max_position_embeddings M: base theta * (factor * seq_len / M - (factor - 1)) ** (R / (R - 2)); up to M, the
    default frequencies. transformers keeps the largest length seen until a step shorter than M resets it; from a
    fresh model on, steps whose length only grows (a generation) get the same frequencies here."""
    dim = rope.rotary_dim(head_dim)
    longest = rope.original_max_position_embeddings
    # made on seq_len's device with no copy from the host, which a CUDA graph capture would refuse
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).to(torch.float32)
    stretched = seq_len.clamp(min=longest)
    base = rope.theta * ((rope.factor * stretched / longest) - (rope.factor - 1)) ** (dim / (dim - 2))
    scaled = 1.0 / (base ** (exponents / dim))  # [R/2]
    default = 1.0 / (rope.theta ** (exponents / dim))
    return torch.where(seq_len > longest, scaled, default)


def cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, R] for positions [B, T] and inv_freq [R / 2] (frequencies repeated twice, HF's layout), times
    `scale`; R is the rotary part of a head (all of it, Dh, unless the model rotates part of each head).

    `scale` is RopeConfig.attention_factor (YaRN's and LongRoPE's; 1 for the other types), applied in fp32 as
    transformers does.
    """
    freqs = positions[..., None].to(torch.float32) * inv_freq.to(positions.device)  # [B, T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)
