"""Torch reference of every compute kernel: the specification for the CUDA kernels and the CPU path.

Every function is pure, works on any device and dtype torch supports, and is what the fused
CuPy kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tiermem.kernels.quant import QuantizedWeight, unpack_codes


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[out, in] = q * scale + zero, per group of `group_size` input columns."""
    out_features, in_features = qw.shape
    g = qw.scheme.group_size
    q = unpack_codes(qw).to(torch.float32).reshape(out_features, in_features // g, g)  # [O, G, g]
    scale = qw.scale.to(torch.float32).unsqueeze(-1)  # [O, G, 1]
    zero = qw.zero.to(torch.float32).unsqueeze(-1)
    return (q * scale + zero).reshape(out_features, in_features).to(dtype)


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y[..., out] = x[..., in] @ W[out, in]^T + b, in x's dtype; quantized W is dequantized first."""
    if isinstance(weight, QuantizedWeight):
        weight = dequantize(weight, x.dtype)
    elif weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def routed_linear(x: torch.Tensor, matrices: Sequence[Sequence[torch.Tensor | QuantizedWeight]],
                  experts: torch.Tensor, x_div: int, rows: int = 1) -> torch.Tensor:
    """y [M, P * rows, O]: y[m, p * rows + r] = x[(p // x_div) * rows + r] @ W^T for W = matrices[m][experts[p]],
    x [P / x_div * rows, I], experts [P] (a mixture's picks, or its every expert over all rows; read on the host
    here)."""
    blocks = x.view(-1, rows, x.shape[-1])  # [P / x_div, rows, I]
    return torch.stack([torch.cat([linear(blocks[p // x_div], row[e]) for p, e in enumerate(experts.tolist())])
                        for row in matrices])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: x[..., D] / rms(x) * w[D], the mean of squares in fp32 (as HF does)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == x.dtype:
        return weight * x32.to(x.dtype)
    return (weight.to(torch.float32) * x32).to(x.dtype)


def rms_norm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x[..., D] / rms(x) * (1 + w[D]), all in fp32, then cast to x's dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.to(torch.float32))).to(x.dtype)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU's elementwise part (Gemma 2): gelu(gate), tanh-approximated, * up."""
    return F.gelu(gate, approximate="tanh") * up


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x = cap * tanh(x / cap) in place, in x's dtype and transformers' order of operations (Gemma 2's attention
    scores and logits); returns x."""
    return x.div_(cap).tanh_().mul_(cap)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension (HF's non-interleaved RoPE convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x[B, H, T, Dh] with cos/sin[B, T, R] (frequencies repeated twice), R <= Dh: the first R
    dimensions of each head rotate, the rest pass through (RoPE on part of each head, as Phi-3's family has it)."""
    cos = cos.unsqueeze(1).to(x.dtype)  # [B, 1, T, R]
    sin = sin.unsqueeze(1).to(x.dtype)
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat([turned * cos + rotate_half(turned) * sin, kept], dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise part: silu(gate) * up."""
    return F.silu(gate) * up
