"""A CPU model of kernels/cuda/kv_attention.cu, block by block and thread by thread, to desk-check its indexing
without a GPU: the same flat buffers, the same offset arithmetic (slot0 at the split's first slot, code bytes,
groups, the mask stride, 8-dim words of K and 4-dim words of V read as little-endian integers), the same passes
(a thread per slot scoring every query head of the kv head, a warp per head for max / exp / sum, Dh/4 threads
per slot in phases summed in order) and the combine of the splits."""

from __future__ import annotations

import math

import torch

from tiermem.kernels.cupy_ops import kv_attention_splits

THREADS = 128


def _word(codes: torch.Tensor, offset: int, nbytes: int) -> int:
    """Little-endian unsigned integer of nbytes codes from `offset` (the kernel's u16 / u32 / uint2 loads)."""
    return int.from_bytes(bytes(codes[offset:offset + nbytes].tolist()), "little")


def _dims(codes: torch.Tensor, row_offset: int, d: int, count: int, bits: int, scale: float, zero: float) -> list:
    """Dims d..d+count-1 of one slot, dequantized (kernel load8 / load4)."""
    w = _word(codes, row_offset + d * bits // 8, count * bits // 8)
    mask = (1 << bits) - 1
    return [((w >> (bits * j)) & mask) * scale + zero for j in range(count)]


def simulate_kv_attention(q: torch.Tensor, k: tuple, v: tuple, bits: int, group: int, key_mask: torch.Tensor,
                          length: int, window: int | None, softmax_scale: float, chunk: int | None = None,
                          sm_count: int = 132) -> torch.Tensor:
    """q [b, H, Dh]; k, v: (codes, scale, zero) [b, Hkv, S_max, *]; key_mask bool [b, >= length] -> [b, H, Dh].
    chunk: slots per split (default: cupy_ops.kv_attention_splits for sm_count)."""
    b, heads, head_dim = q.shape
    kv_heads, s_max = k[0].shape[1], k[0].shape[2]
    qpk = heads // kv_heads
    if chunk is None:
        splits, chunk = kv_attention_splits(b, heads, kv_heads, head_dim, length, sm_count)
    splits = math.ceil(length / chunk)
    kc, ks, kz = (t.contiguous().reshape(-1) for t in k)  # the kernel's flat pointers
    vc, vs, vz = (t.contiguous().reshape(-1) for t in v)
    ks, kz, vs, vz = (t.float() for t in (ks, kz, vs, vz))
    mask_stride = key_mask.stride(0)
    mask_flat = key_mask.as_strided((key_mask.shape[0] * mask_stride,), (1,)) if key_mask.shape[0] else key_mask
    qf = q.float().contiguous().reshape(-1)
    part_out = torch.zeros(splits * b * heads * head_dim)
    part_ml = torch.zeros(splits * b * heads * 2)
    code_bytes, groups = head_dim * bits // 8, head_dim // group
    window = window or 0
    self_slot = length - 1
    for row in range(b):
        for kv_head in range(kv_heads):
            for split in range(splits):
                begin = split * chunk
                n = min(length, begin + chunk) - begin
                slot0 = (row * kv_heads + kv_head) * s_max + begin
                head0 = row * heads + kv_head * qpk
                qs = [float(qf[head0 * head_dim + i]) * softmax_scale for i in range(qpk * head_dim)]
                scores = [[0.0] * n for _ in range(qpk)]
                for i in range(n):  # pass 1, thread i
                    s = begin + i
                    allowed = s == self_slot or (bool(mask_flat[row * mask_stride + s]) and
                                                 (window <= 0 or s > self_slot - window))
                    acc = [0.0] * qpk
                    if allowed:
                        for d in range(0, head_dim, 8):
                            g = (slot0 + i) * groups + d // group
                            kd = _dims(kc, (slot0 + i) * code_bytes, d, 8, bits, float(ks[g]), float(kz[g]))
                            for h in range(qpk):
                                acc[h] += sum(qs[h * head_dim + d + j] * kd[j] for j in range(8))
                    for h in range(qpk):
                        scores[h][i] = acc[h] if allowed else -math.inf
                for h in range(qpk):  # pass 2
                    m = max(scores[h], default=-math.inf)
                    scores[h] = [0.0 if m == -math.inf else math.exp(x - m) for x in scores[h]]
                    at = (split * b * heads + head0 + h) * 2
                    part_ml[at], part_ml[at + 1] = m, sum(scores[h])
                per_slot = head_dim // 4
                phases = THREADS // per_slot
                total = [[0.0] * head_dim for _ in range(qpk)]
                for phase in range(phases):  # pass 3, summed phase by phase as the kernel does
                    for t in range(per_slot):
                        d = t * 4
                        for i in range(phase, n, phases):
                            g = (slot0 + i) * groups + d // group
                            vd = _dims(vc, (slot0 + i) * code_bytes, d, 4, bits, float(vs[g]), float(vz[g]))
                            for h in range(qpk):
                                for j in range(4):
                                    total[h][d + j] += scores[h][i] * vd[j]
                for h in range(qpk):
                    at = (split * b * heads + head0 + h) * head_dim
                    part_out[at:at + head_dim] = torch.tensor(total[h])
    out = torch.empty(b * heads * head_dim)
    for rh in range(b * heads):  # combine
        ms = [float(part_ml[(s * b * heads + rh) * 2]) for s in range(splits)]
        ls = [float(part_ml[(s * b * heads + rh) * 2 + 1]) for s in range(splits)]
        m = max(ms)
        weights = [0.0 if x == -math.inf else math.exp(x - m) for x in ms]
        denom = sum(w * total for w, total in zip(weights, ls, strict=True))
        for d in range(head_dim):
            acc = sum(w * float(part_out[(s * b * heads + rh) * head_dim + d]) for s, w in enumerate(weights))
            out[rh * head_dim + d] = acc / denom
    return out.reshape(b, heads, head_dim)
