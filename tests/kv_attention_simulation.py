"""A CPU model of kernels/cuda/kv_attention.cu, block by block and warp by warp, to desk-check its indexing
without a GPU: the same flat buffers, the same offset arithmetic (slot0, code bytes, groups, the mask
stride), the same three passes (warp-strided scores with lanes splitting head_dim, max / exp / sum, one
output dim per thread over all slots)."""

from __future__ import annotations

import math

import torch

THREADS = 128


def _kv_value(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, base_code: int, base_group: int,
              d: int, bits: int, group: int) -> float:
    if bits == 8:
        q = int(codes[base_code + d])
    else:
        byte = int(codes[base_code + (d >> 1)])
        q = byte >> 4 if d & 1 else byte & 15
    g = d // group
    return q * float(scale[base_group + g]) + float(zero[base_group + g])


def simulate_kv_attention(q: torch.Tensor, k: tuple, v: tuple, bits: int, group: int, key_mask: torch.Tensor,
                          length: int, window: int | None, softmax_scale: float) -> torch.Tensor:
    """q [b, H, Dh]; k, v: (codes, scale, zero) [b, Hkv, S_max, *]; key_mask bool [b, >= length] -> [b, H, Dh]."""
    b, heads, head_dim = q.shape
    kv_heads, s_max = k[0].shape[1], k[0].shape[2]
    kc, ks, kz = (t.contiguous().reshape(-1) for t in k)  # the kernel's flat pointers
    vc, vs, vz = (t.contiguous().reshape(-1) for t in v)
    ks, kz, vs, vz = (t.float() for t in (ks, kz, vs, vz))
    mask_stride = key_mask.stride(0)
    mask_flat = key_mask.as_strided((key_mask.shape[0] * mask_stride,), (1,)) if key_mask.shape[0] else key_mask
    qf = q.float().contiguous().reshape(-1)
    out = torch.empty(b * heads * head_dim)
    code_bytes, groups = head_dim * bits // 8, head_dim // group
    window = window or 0
    nwarps = THREADS // 32
    for block in range(b * heads):
        row, head = block // heads, block % heads
        kv_head = head // (heads // kv_heads)
        slot0 = (row * kv_heads + kv_head) * s_max
        qs = qf[(row * heads + head) * head_dim:][:head_dim]
        scores = [0.0] * length
        self_slot = length - 1
        for warp in range(nwarps):
            for s in range(warp, length, nwarps):
                allowed = s == self_slot or (bool(mask_flat[row * mask_stride + s]) and
                                             (window <= 0 or s > self_slot - window))
                partial = 0.0
                if allowed:
                    for lane in range(32):
                        for d in range(lane, head_dim, 32):
                            partial += float(qs[d]) * _kv_value(kc, ks, kz, (slot0 + s) * code_bytes,
                                                                (slot0 + s) * groups, d, bits, group)
                scores[s] = partial * softmax_scale if allowed else -math.inf
        m = max(scores)
        p = [math.exp(x - m) for x in scores]
        total = sum(p)
        for d in range(head_dim):
            acc = sum(p[s] * _kv_value(vc, vs, vz, (slot0 + s) * code_bytes, (slot0 + s) * groups, d, bits, group)
                      for s in range(length) if p[s] != 0.0)
            out[(row * heads + head) * head_dim + d] = acc / total
    return out.reshape(b, heads, head_dim)
