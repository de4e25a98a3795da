"""Kernel dispatch: the functions model code calls.

CUDA tensors go to the fused CuPy kernels (kernels/cupy_ops.py) when CuPy is there and the case is
one they implement; everything else, and every CPU tensor, runs the torch reference unchanged.
- linear: quantized weight, x with at most GEMV_SPLIT_ROWS (32) rows -> fused dequant-GEMV (one 8-row
  chunk up to 8 rows, 16-row chunks beyond, all in one launch); more rows -> dequantize on the GPU, then
  torch's matmul; unquantized weight -> F.linear (the reference).
- routed_linear: a mixture's chosen experts (quantized) for a few rows, or its every expert over a step's rows, the
  choice read on the GPU -> the routed GEMV (one launch); otherwise, and on the CPU, the reference (which reads the
  choice on the host).
- rms_norm, apply_rope, silu_mul: fused for fp16/bf16 CUDA tensors.
- kv_decode_attention: one query token over a quantized KV cache, dequantized inside the kernel
  (engine.attention falls back to dequantize + SDPA where kv_decode_attention_supported says no).
- write_quantized_kv: new K or V quantized straight into the cache's slots in one launch on CUDA
  (while FUSED_KV_QUANTIZE), the reference quantize_kv + slice copies otherwise; the first slot may be held in
  device memory (a graph step's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tiermem.kernels import cupy_ops, reference
from tiermem.kernels.kv_quant import quantize_kv
from tiermem.kernels.quant import QuantizedWeight, QuantScheme

__all__ = ["apply_rope", "dequantize", "gelu_tanh_mul", "kv_decode_attention", "kv_decode_attention_supported",
           "linear", "rms_norm", "rms_norm_plus_one", "routed_gemv_takes", "routed_linear", "routed_table", "silu_mul",
           "softcap_", "write_quantized_kv"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_LIMIT = 2**31  # the elementwise kernels index with 32-bit integers


def _fused(*tensors: torch.Tensor) -> bool:
    """All tensors on one CUDA device, the first fp16/bf16, and the CUDA kernels usable."""
    first = tensors[0]
    return (
        first.is_cuda
        and first.dtype in cupy_ops.HALF_DTYPES
        and all(t.device == first.device for t in tensors)
        and cupy_ops.cuda_kernels_available()
    )


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[out, in] = q * scale + zero (see reference.dequantize)."""
    if qw.qdata.is_cuda and dtype in _FLOAT_DTYPES and cupy_ops.cuda_kernels_available():
        if qw.qdata.numel() < 2**32:
            return cupy_ops.dequantize_cuda(qw, dtype)
    return reference.dequantize(qw, dtype)


# Up to this many rows, the fused GEMV on 8-row chunks (all in one launch) beat dequantize + matmul on every
# measured shape (benchmarks/results/linear_rows_single_launch_h200.json: at 32 rows 0.10-0.26 ms against
# 0.14-0.35 ms, a tie at 48). With a launch per chunk it had lost from 24 rows on (linear_rows_h200.json). With two
# 8-row tiles per block (session 12) the split still holds (linear_rows_s14call2_h200.json): at 32 rows 0.09-0.23 ms
# against 0.12-0.33 ms, a tie at 48, dequantize + matmul ahead at 64.
GEMV_SPLIT_ROWS = 32


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y[..., out] = x[..., in] @ W[out, in]^T + b, in x's dtype (see reference.linear)."""
    if (
        isinstance(weight, QuantizedWeight)
        and x.is_cuda
        and weight.device == x.device
        and x.dtype in _FLOAT_DTYPES
        and cupy_ops.cuda_kernels_available()
    ):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            x.dtype in cupy_ops.HALF_DTYPES
            and 1 <= rows <= GEMV_SPLIT_ROWS
            and cupy_ops.gemv_supported(weight)
            and (bias is None or bias.device == x.device)
        ):
            return cupy_ops.quant_linear(x, weight, bias)
        return reference.linear(x, dequantize(weight, x.dtype), bias)
    return reference.linear(x, weight, bias)


def routed_gemv_takes(x: torch.Tensor) -> bool:
    """Whether the routed GEMV may run on x (fp16/bf16 on the GPU, the CUDA kernels usable): the check before any
    weight is looked up for it (routed_table then checks the weights)."""
    return x.is_cuda and x.dtype in cupy_ops.HALF_DTYPES and cupy_ops.cuda_kernels_available()


def routed_table(x: torch.Tensor, matrices: Sequence[Sequence[object]]) -> cupy_ops.ExpertTable | None:
    """The table with which routed_linear runs x over matrices[m][e] in one fused launch, with no host sync, or None
    where it does not: routed_gemv_takes(x), quantized weights on x's device that the fused GEMV takes, and, while a
    CUDA graph is being captured, their table made already (by the step run as it is before the capture)."""
    if not routed_gemv_takes(x):
        return None
    return cupy_ops.expert_table(matrices, x.device, build=not torch.cuda.is_current_stream_capturing())


def routed_linear(x: torch.Tensor, matrices: Sequence[Sequence[torch.Tensor | QuantizedWeight]],
                  experts: torch.Tensor, x_div: int, rows: int = 1,
                  table: cupy_ops.ExpertTable | None = None) -> torch.Tensor:
    """y [M, P * rows, O]: y[m, p * rows + r] = x[(p // x_div) * rows + r] @ W^T for W = matrices[m][experts[p]]:
    x [P / x_div * rows, I], experts int64 [P] (see reference.routed_linear); one launch of
    kernels/cuda/routed_gemv.cu, the experts read on the GPU, where routed_table gives a table (`table`: that table,
    looked up already)."""
    table = routed_table(x, matrices) if table is None else table
    if table is not None:
        return cupy_ops.routed_quant_linear(x, table, experts, x_div, rows)
    return reference.routed_linear(x, matrices, experts, x_div, rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dimension (see reference.rms_norm)."""
    if (
        _fused(x, weight)
        and weight.dtype in _FLOAT_DTYPES
        and weight.shape == x.shape[-1:]
        and x.shape[-1] > 0
    ):
        return cupy_ops.rms_norm_cuda(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rms_norm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm (see reference.rms_norm_plus_one; torch's ops on every device)."""
    return reference.rms_norm_plus_one(x, weight, eps)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU's elementwise part (see reference.gelu_tanh_mul; torch's ops on every device)."""
    return reference.gelu_tanh_mul(gate, up)


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x = cap * tanh(x / cap) in place (see reference.softcap_)."""
    return reference.softcap_(x, cap)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x[B, H, T, Dh] with cos/sin[B, T, R], R <= Dh (see reference.apply_rope; the CUDA kernel
    rotates whole heads, R = Dh)."""
    if (
        x.dim() == 4
        and cos.dim() == 3
        and sin.dim() == 3
        and _fused(x, cos, sin)
        and cos.dtype in _FLOAT_DTYPES
        and sin.dtype == cos.dtype
        and x.shape[-1] % 2 == 0
        and x.numel() // 2 < _INDEX_LIMIT
    ):
        batch, _, seq, head_dim = x.shape
        if all(t.shape[0] in (1, batch) and t.shape[1:] == (seq, head_dim) for t in (cos, sin)):
            return cupy_ops.apply_rope_cuda(x, cos, sin)
    return reference.apply_rope(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise part: silu(gate) * up (see reference.silu_mul)."""
    if _fused(gate, up) and up.dtype == gate.dtype and up.shape == gate.shape:
        return cupy_ops.silu_mul_cuda(gate, up)
    return reference.silu_mul(gate, up)


# The engine calls kv_decode_attention for decode steps over a quantized KV cache while this is True (tests switch
# it off to compare with dequantize + SDPA). On the H200 it is 2.7-6.2x faster than that path
# (benchmarks/results/kv_attention_kernel_h200.json).
FUSED_KV_ATTENTION = True


def kv_decode_attention_supported(q: torch.Tensor, kv_heads: int, bits: int, group: int, length: int) -> bool:
    """Whether kv_decode_attention takes q [b, H, 1, Dh] over `kv_heads` K/V heads of `bits` in groups of `group`
    up to `length` slots."""
    return (
        q.is_cuda
        and q.dim() == 4
        and q.shape[2] == 1
        and q.dtype in _FLOAT_DTYPES
        and length >= 1
        and cupy_ops.kv_attention_supported(q.shape[1], kv_heads, q.shape[-1], bits, group)
        and cupy_ops.cuda_kernels_available()
    )


def kv_decode_attention(q: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], bits: int,
                        group: int, key_mask: torch.Tensor, length: int, window: int | None,
                        softmax_scale: float, query_slot: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, H, 1, Dh] -> [b, H, 1, Dh]: attention over slots 0..length-1 of K, V given as (codes, scale, zero)
    (tiermem.kernels.kv_quant layout), the query being slot length-1 (engine.attention.causal_mask's rule), or the
    slot held in query_slot (int64 [1] on the device; later slots are ignored)."""
    out = cupy_ops.kv_attention_cuda(q[:, :, 0], k, v, bits, group, key_mask, length, window, softmax_scale,
                                     query_slot)
    return out[:, :, None]


# write_quantized_kv uses kv_quant.cu on CUDA while this is True: bit-exact against the reference on an H200
# (tests/test_kernels_gpu.py -k kv_quantize); a decode step of llama3-8b int4, batch 16, int4 KV issues 1051
# launches instead of 2395 (benchmarks/results/llama3_8b_int4_kvint4_decode_profile_fused_quantize_h200.json).
FUSED_KV_QUANTIZE = True


def _fused_kv_quantize(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       scheme: QuantScheme) -> bool:
    """Whether kv_quant.cu takes this write (one thread per group writes whole bytes: int8, or int4 in even groups)."""
    packs_whole_bytes = scheme.bits == 8 or scheme.group_size % 2 == 0
    return (FUSED_KV_QUANTIZE and x.is_cuda and x.dtype in _FLOAT_DTYPES and packs_whole_bytes
            and all(t.is_contiguous() for t in (codes, scale, zero)) and cupy_ops.cuda_kernels_available())


def write_quantized_kv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       scheme: QuantScheme, rows: slice, start: int | torch.Tensor) -> None:
    """Quantize x [b, Hkv, T, Dh] into batch rows `rows` (step 1) and slots start..start+T-1 of a quantized
    cache's codes / scale / zero [B, Hkv, S_max, *] (tiermem.kernels.kv_quant layout). start: an int, or an int64
    [1] tensor on x's device, read where the write runs, so that a captured CUDA graph writes each replay's slot
    (the caller keeps it within S_max - T, as StaticDecoder's spans do: past it the kernel writes nothing and the
    reference path's index_copy_ fails)."""
    row0, _, _ = rows.indices(codes.shape[0])
    on_device = isinstance(start, torch.Tensor)
    if _fused_kv_quantize(x, codes, scale, zero, scheme):
        cupy_ops.kv_quantize_cuda(x, codes, scale, zero, scheme.bits, scheme.group_size, row0,
                                  0 if on_device else start, start_slot=start if on_device else None)
        return
    for dst, src in zip((codes, scale, zero), quantize_kv(x, scheme), strict=True):
        if on_device:
            dst[rows].index_copy_(2, start + torch.arange(x.shape[2], device=start.device), src)
        else:
            dst[rows, :, start:start + x.shape[2]] = src
