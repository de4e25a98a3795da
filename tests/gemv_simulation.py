"""A CPU model of kernels/cuda/gemv.cu, lane by lane, to desk-check its indexing without a GPU.

It replays what each block of the grid (row block, batch chunk of 8 * batch_tiles rows) and each of its lanes
loads and computes (16-byte chunks, magic-number dequantization, byte permutes of x) and what mma.m16n8k16 does
with the lanes' registers, using the fragment layout of the PTX ISA (written here independently of the
kernel), then the split-K reduction and the output map.
fp16 arithmetic is rounded like the hardware's (numpy float16); bf16 through torch.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from tiermem.kernels.quant import QuantizedWeight

MASK32 = 0xFFFFFFFF


def _f16_bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float16).view(np.uint16).astype(np.uint32)


def _f16_val(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def _bf16_val(bits: int) -> float:
    raw = np.array([bits & 0xFFFF], dtype=np.uint16).view(np.int16)
    return float(torch.from_numpy(raw).view(torch.bfloat16)[0])


def _round(v: float, dtype: str) -> float:
    if dtype == "f16":
        return float(np.float16(v))
    return float(torch.tensor(v, dtype=torch.float64).to(torch.bfloat16))


def _bits(v: float, dtype: str) -> int:
    if dtype == "f16":
        return int(np.array([v], dtype=np.float16).view(np.uint16)[0])
    return int(torch.tensor([v], dtype=torch.float64).to(torch.bfloat16).view(torch.int16)[0]) & 0xFFFF


def _halves(word: int, dtype: str) -> tuple[float, float]:
    conv = _f16_val if dtype == "f16" else _bf16_val
    return conv(word & 0xFFFF), conv(word >> 16)


def _pack(a: float, b: float, dtype: str) -> int:
    return _bits(a, dtype) | (_bits(b, dtype) << 16)


def byte_perm(x: int, y: int, sel: int) -> int:
    data = (x & MASK32) | ((y & MASK32) << 32)
    out = 0
    for i in range(4):
        src = (sel >> (4 * i)) & 7
        out |= ((data >> (8 * src)) & 0xFF) << (8 * i)
    return out


def _h2_op(word: int, fn, dtype: str) -> int:
    lo, hi = _halves(word, dtype)
    return _pack(_round(fn(lo), dtype), _round(fn(hi), dtype), dtype)


def _fast_pair(bits: int, dtype: str, w: int, k: int, s: float, z: float) -> int:
    """Dequant<BITS, T>::pair of the kernel (s, z as fp16 values)."""
    if dtype == "f16":
        if bits == 4:
            src = w if k < 2 else w >> 8
            if k % 2 == 0:
                t = (src & 0x000F000F) | 0x64006400
                q = _h2_op(t, lambda v: v - 1024.0, "f16")
            else:
                t = (src & 0x00F000F0) | 0x64006400
                q = _h2_op(t, lambda v: v * 0.0625 - 64.0, "f16")
        else:
            t = byte_perm(w, 0x64006400, 0x5352 if k else 0x5150)
            q = _h2_op(t, lambda v: v - 1024.0, "f16")
        return _h2_op(q, lambda v: v * s + z, "f16")
    if bits == 4:
        sh = _round(s, "bf16")
        sl = _round(float(np.float32(s) - np.float32(sh)), "bf16")
        zz = float(np.float32(-128.0 * s + z))
        zh = _round(zz, "bf16")
        zl = _round(float(np.float32(zz) - np.float32(zh)), "bf16")
        t = ((w >> (4 * k)) & 0x000F000F) | 0x43004300
        big = _h2_op(t, lambda v: v * sh + zh, "bf16")
        small = _h2_op(t, lambda v: v * sl + zl, "bf16")
        lo = _round(_halves(big, "bf16")[0] + _halves(small, "bf16")[0], "bf16")
        hi = _round(_halves(big, "bf16")[1] + _halves(small, "bf16")[1], "bf16")
        return _pack(lo, hi, "bf16")
    q0 = float((w >> (16 * k)) & 0xFF)
    q1 = float((w >> (16 * k + 8)) & 0xFF)
    return _pack(float(np.float32(q0 * s + z)), float(np.float32(q1 * s + z)), "bf16")


def _general_pair(bits: int, dtype: str, w: int, j: int, k: int, col0: int, srow, zrow, gs: int) -> int:
    if bits == 4:
        ca, qa, qb = col0 + 8 * j + k, (w >> (4 * k)) & 0xF, (w >> (4 * k + 16)) & 0xF
        cb = ca + 4
    else:
        ca, qa, qb = col0 + 4 * j + 2 * k, (w >> (16 * k)) & 0xFF, (w >> (16 * k + 8)) & 0xFF
        cb = ca + 1
    groups = len(srow)
    ga, gb = min(ca // gs, groups - 1), min(cb // gs, groups - 1)
    va = float(np.float32(qa * float(srow[ga]) + float(zrow[ga])))
    vb = float(np.float32(qb * float(srow[gb]) + float(zrow[gb])))
    return _pack(va, vb, dtype)


def _x_fragment(bits: int, xv: list[tuple[int, int, int, int]], j: int, s: int) -> tuple[int, int]:
    if bits == 4:
        v = xv[j]
        lo, hi = (v[1], v[3]) if s else (v[0], v[2])
        return byte_perm(lo, hi, 0x5410), byte_perm(lo, hi, 0x7632)
    v = xv[j >> 1]
    return (v[2], v[3]) if j & 1 else (v[0], v[1])


def _mma(acc: np.ndarray, a_regs: list[list[int]], b_regs: list[list[int]], dtype: str) -> None:
    """mma.m16n8k16.row.col: acc[lane][4] += A @ B with the PTX fragment layout."""
    a_mat = np.zeros((16, 16))
    b_mat = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        r = a_regs[lane]
        for reg, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            a_mat[row, col], a_mat[row, col + 1] = _halves(r[reg], dtype)
        b0, b1 = b_regs[lane]
        b_mat[2 * t, g], b_mat[2 * t + 1, g] = _halves(b0, dtype)
        b_mat[2 * t + 8, g], b_mat[2 * t + 9, g] = _halves(b1, dtype)
    c = a_mat @ b_mat
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        acc[lane] += (c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1])


def simulate_gemv(qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None, unroll: int = 2,
                  m_tiles: int = 1, warps: int = 4, general: bool = False, batch_tiles: int = 1) -> torch.Tensor:
    """What quant_gemv_<bits>_<dtype>_u{unroll}m{m_tiles} (or _general; n2 with batch_tiles 2) writes to y[B, O],
    as float64, for any number of rows B (ceil(B / (8 * batch_tiles)) chunks of the batch, blockIdx.y)."""
    bits, gs = qw.scheme.bits, qw.scheme.group_size
    dtype = "f16" if x.dtype == torch.float16 else "bf16"
    out_features, in_features = qw.shape
    batch = x.shape[0]
    cw = 128 // bits
    xv_per_chunk = cw // 8
    cps = 4 * unroll
    row_chunks = in_features // cw
    groups = in_features // gs
    nsteps = -(-row_chunks // cps)
    cpg = gs // cw
    shift = cpg.bit_length() - 1
    qwords = qw.qdata.cpu().numpy().view("<u4").astype(np.int64)  # [O, row_chunks * 4]
    scale = qw.scale.cpu().float().numpy()
    zero = qw.zero.cpu().float().numpy()
    xbits = x.cpu().view(torch.int16).numpy().astype(np.int64) & 0xFFFF  # [B, I]
    xwords_all = xbits[:, 0::2] | (xbits[:, 1::2] << 16)  # [B, I / 2]
    y_all = np.full((batch, out_features), np.nan)
    word_mmas = 2 if bits == 4 else 1
    nt_count, rows_per_chunk = batch_tiles, 8 * batch_tiles
    for chunk, block in itertools.product(range(-(-batch // rows_per_chunk)),
                                          range(-(-out_features // (16 * m_tiles)))):
        # blockIdx = (block, chunk): x and y from batch row 8 * batch_tiles * chunk, nb rows of them.
        first = rows_per_chunk * chunk
        xwords, y, nb = xwords_all[first:], y_all[first:], min(rows_per_chunk, batch - first)
        row_base = block * 16 * m_tiles
        red = np.zeros((warps, m_tiles, nt_count, 32, 4))
        for warp in range(warps):
            for step in range(warp, nsteps, warps):
                lanes = []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    ci0 = step * cps + t * unroll
                    rows = [[min(row_base + 16 * mt + 8 * h + g, out_features - 1) for h in range(2)]
                            for mt in range(m_tiles)]
                    q = [[[tuple(int(v) for v in qwords[rows[mt][h], 4 * (ci0 + u):4 * (ci0 + u) + 4])
                           if ci0 + u < row_chunks else (0, 0, 0, 0) for u in range(unroll)]
                          for h in range(2)] for mt in range(m_tiles)]
                    xv = []  # [nt][u][v]: batch row 8 * nt + g
                    for nt in range(nt_count):
                        per_tile = []
                        for u in range(unroll):
                            vecs = []
                            for v in range(xv_per_chunk):
                                if ci0 + u < row_chunks and 8 * nt + g < nb:
                                    base = ((ci0 + u) * cw + 8 * v) // 2
                                    vecs.append(tuple(int(w) for w in xwords[8 * nt + g, base:base + 4]))
                                else:
                                    vecs.append((0, 0, 0, 0))
                            per_tile.append(vecs)
                        xv.append(per_tile)
                    grp = 0 if general else min(ci0 >> shift, groups - 1)
                    lanes.append((g, ci0, rows, q, xv, grp))
                for u in range(unroll):
                    for j in range(4):
                        for s in range(word_mmas):
                            b_regs = [[_x_fragment(bits, ln[4][nt][u], j, s) for ln in lanes]
                                      for nt in range(nt_count)]
                            for mt in range(m_tiles):
                                a_regs = []
                                for _g, ci0, rows, q, _, grp in lanes:
                                    regs = []
                                    for k_off, h in ((0, 0), (0, 1), (1, 0), (1, 1)):
                                        w = q[mt][h][u][j]
                                        row = rows[mt][h]
                                        k = 2 * s + k_off
                                        if general:
                                            regs.append(_general_pair(bits, dtype, w, j, k, (ci0 + u) * cw,
                                                                      scale[row], zero[row], gs))
                                        else:
                                            regs.append(_fast_pair(bits, dtype, w, k, float(scale[row, grp]),
                                                                   float(zero[row, grp])))
                                    a_regs.append(regs)
                                for nt in range(nt_count):
                                    _mma(red[warp, mt, nt], a_regs, b_regs[nt], dtype)
        for i in range(m_tiles * nt_count * 128):
            tile, m, n = i >> 7, i & 15, (i >> 4) & 7
            mt, nt = tile // nt_count, tile % nt_count
            row, col = row_base + 16 * mt + m, 8 * nt + n
            if col >= nb or row >= out_features:
                continue
            total = float(np.float32(red[:, mt, nt, 4 * (m & 7) + (n >> 1), 2 * (m >> 3) + (n & 1)].sum()))
            if bias is not None:
                total += float(bias[row])
            y[col, row] = _round(total, dtype)
    return torch.from_numpy(y_all)
