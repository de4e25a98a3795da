"""Group-wise asymmetric int8/int4 quantization of KV cache entries (torch reference, any device).

A K or V tensor x[..., Dh] (e.g. [B, Hkv, S, Dh]) is quantized per (batch row, kv head, token) along
head_dim, in groups of `scheme.group_size` (head_dim by default, or a divisor of it), with exactly the
layout of `tiermem.kernels.quant` for weights: the leading dims are flattened into the rows of a 2-D
view [N, Dh] and quantized as a weight of `N` output rows and `Dh` inputs:

- codes: uint8 [..., Dh * bits / 8]   (int8: one code per byte; int4: q[2j] | q[2j + 1] << 4, low nibble first)
- scale: fp16  [..., Dh / group_size]
- zero:  fp16  [..., Dh / group_size]   (x ≈ q * scale + zero)
"""

from __future__ import annotations

import torch

from tiermem.errors import ConfigError
from tiermem.kernels.quant import QuantizedWeight, QuantScheme, quantize
from tiermem.kernels.reference import dequantize


def kv_scheme(name: str | None, head_dim: int, group_size: int | None = None) -> QuantScheme | None:
    """None -> None; "int8"/"int4" -> the KV scheme with groups of `group_size` (default: head_dim)."""
    if name is None:
        return None
    group_size = head_dim if group_size is None else int(group_size)
    scheme = QuantScheme.from_name(name, group_size)
    check_kv_scheme(scheme, head_dim)
    return scheme


KV_QUANT_AUTO = (None, "int8", "int4")  # what kv_quant="auto" lets the planner choose from, most precise first


def auto_kv_schemes(head_dim: int, group_size: int | None = None) -> tuple[QuantScheme | None, ...]:
    """The KV schemes of kv_quant="auto" (KV_QUANT_AUTO), with groups of `group_size` (default: head_dim)."""
    return tuple(kv_scheme(name, head_dim, group_size) for name in KV_QUANT_AUTO)


def check_kv_scheme(scheme: QuantScheme, head_dim: int) -> None:
    """ConfigError unless the group size divides head_dim."""
    if head_dim % scheme.group_size:
        raise ConfigError(f"kv_group_size {scheme.group_size} does not divide head_dim {head_dim}: "
                          "use None (one group per head) or a divisor of head_dim")


def kv_bytes_per_vector(head_dim: int, scheme: QuantScheme) -> int:
    """Bytes that one quantized vector of head_dim values takes: codes + fp16 scale and zero per group."""
    return head_dim * scheme.bits // 8 + 2 * (head_dim // scheme.group_size) * 2


def quantize_kv(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., Dh] -> (codes uint8 [..., Dh*bits/8], scale fp16 [..., Dh/g], zero fp16 [..., Dh/g])."""
    *lead, dh = x.shape
    check_kv_scheme(scheme, dh)
    qw = quantize(x.reshape(-1, dh), scheme, name="KV")  # [N, Dh] viewed as a weight of N rows
    return (qw.qdata.reshape(*lead, -1), qw.scale.reshape(*lead, -1), qw.zero.reshape(*lead, -1))


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes [..., Dh*bits/8], scale/zero [..., Dh/g]) -> x [..., Dh] in `dtype`."""
    *lead, nbytes = codes.shape
    dh = nbytes * 8 // scheme.bits
    n = codes.numel() // nbytes if nbytes else 0
    qw = QuantizedWeight(qdata=codes.reshape(n, nbytes), scale=scale.reshape(n, -1), zero=zero.reshape(n, -1),
                         scheme=scheme, shape=(n, dh))
    return dequantize(qw, dtype).reshape(*lead, dh)
