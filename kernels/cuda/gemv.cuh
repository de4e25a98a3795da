// Fused group-wise int4/int8 dequantization + GEMV for small batches on the tensor cores: the device function
// quant_gemv, which gemv.cu (one weight, the batch in chunks) and routed_gemv.cu (a mixture's experts, one pick per
// block) launch.
//
//   y[n, o] = sum_i x[n, i] * (q[o, i] * scale[o, i / gs] + zero[o, i / gs])  (+ bias[o]),  n < batch
//
// Layout (kernels/quant.py): qdata uint8 [O, I * BITS / 8] row-major (int4: low nibble = even column),
// scale and zero fp16 [O, I / gs]; x [batch, I] and y [batch, O] in T (fp16 or bf16); fp32 accumulation.
//
// Batch chunks. The mma's n is 8; a block takes NT (1 or 2) tiles of 8 batch rows, a chunk of 8 * NT rows: x and
// y rows chunk_row .. + nb - 1, nb = min(8 * NT, batch - chunk_row) (gemv.cu: chunk_row = 8 * NT * blockIdx.y,
// gridDim.y = ceil(batch / (8 * NT))); every chunk reads the whole weight, and each weight fragment dequantized
// in registers feeds one mma per tile (at 16 rows, NT = 2 reads the weight once where NT = 1 read it twice).
//
// Work split. A block owns 16 * MT consecutive output rows; its warps split the input dimension
// (warp w takes steps w, w + nwarps, ...) and are summed through shared memory at the end. In one
// step lane (g = lane / 4, t = lane % 4) loads, for each of its rows (g and g + 8 of every 16-row
// tile), U consecutive 16-byte chunks: the 4 lanes of a row read 64 * U contiguous bytes. Each chunk
// (CW = 32 int4 or 16 int8 columns) is dequantized in registers straight into the A fragments of
// mma.m16n8k16 (rows = outputs, k = inputs); x forms the B fragment (n = batch row 8 * tile + g, lanes whose
// row is not below nb hold zeros). The k order inside one mma is free as long as A and B agree, so it follows
// what the bit tricks produce cheaply:
//   int4: word j of a chunk holds columns 8j..8j+7; pair k (0..3) = columns (8j+k, 8j+k+4), the
//         nibbles that (word >> 4k) & 0x000F000F isolates; mma s (0, 1) of the word takes pairs 2s,
//         2s+1 as (a0a1 | a4a5), and x's halves are regrouped to match with byte permutes.
//   int8: word j holds columns 4j..4j+3; pair p (0, 1) = columns (4j+2p, 4j+2p+1); one mma per word.
// Dequantization (fast path, gs a multiple of CW so a chunk lies in one group):
//   fp16: t = 1024 + q (magic exponent), w = (t - 1024) * s + z: exact q, one rounding (HFMA2).
//   bf16 int4: t = 128 + q, s = s_hi + s_lo and z - 128 s = z_hi + z_lo (bf16 splits of the fp16
//         values), w = (t * s_hi + z_hi) + (t * s_lo + z_lo): bf16 alone cannot hold fp16's scale.
//   bf16 int8: q -> fp32 via the 2^23 magic, w = q * s + z in fp32, packed to bf16x2.
// GENERAL (gs / CW not a power of two, e.g. gs < CW or int4 gs = 96): per column group lookup and
// fp32 dequantization. The fast path also needs gs / CW >= U (cupy_ops lowers U to fit).
#pragma once
#include "common.cuh"

namespace tiermem {

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                                 u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                                        u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

__device__ __forceinline__ u32 as_u32(__half2 h) { return *reinterpret_cast<u32*>(&h); }
__device__ __forceinline__ u32 as_u32(__nv_bfloat162 h) { return *reinterpret_cast<u32*>(&h); }
__device__ __forceinline__ __half2 as_h2(u32 w) { return *reinterpret_cast<__half2*>(&w); }
__device__ __forceinline__ __nv_bfloat162 as_b2(u32 w) { return *reinterpret_cast<__nv_bfloat162*>(&w); }

// (a & MASK) | MAGIC in one instruction (the compiler splits it in two otherwise).
template <u32 MASK, u32 MAGIC>
__device__ __forceinline__ u32 and_or(u32 a) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "n"(MAGIC));
  return d;
}

// Per (row, group) constants of the fast path and the dequantization of code pair k (0..3 for int4,
// 0..1 for int8) of a 32-bit word `w`; `w8` is w >> 8 (int4 only).
template <int BITS, typename T> struct Dequant;

template <> struct Dequant<4, __half> {
  u32 s2, z2;
  __device__ __forceinline__ void set(__half s, __half z) {
    s2 = as_u32(__halves2half2(s, s));
    z2 = as_u32(__halves2half2(z, z));
  }
  __device__ __forceinline__ u32 pair(u32 w, u32 w8, int k) const {
    const u32 src = k < 2 ? w : w8;
    __half2 q;
    if ((k & 1) == 0) {  // nibbles at bits 0 and 16: t = 1024 + q, q = t - 1024 (exact)
      q = __hsub2(as_h2(and_or<0x000F000Fu, 0x64006400u>(src)), as_h2(0x64006400u));
    } else {  // nibbles at bits 4 and 20: t = 1024 + 16 q, q = t / 16 - 64 (exact)
      q = __hfma2(as_h2(and_or<0x00F000F0u, 0x64006400u>(src)), as_h2(0x2C002C00u), as_h2(0xD400D400u));
    }
    return as_u32(__hfma2(q, as_h2(s2), as_h2(z2)));
  }
};

template <> struct Dequant<8, __half> {
  u32 s2, z2;
  __device__ __forceinline__ void set(__half s, __half z) {
    s2 = as_u32(__halves2half2(s, s));
    z2 = as_u32(__halves2half2(z, z));
  }
  __device__ __forceinline__ u32 pair(u32 w, u32, int k) const {
    // bytes (2k, 2k + 1) under 0x64 high bytes (bytes 5 and 7 of the magic): t = 1024 + q.
    const __half2 t = as_h2(__byte_perm(w, 0x64006400u, k ? 0x5352 : 0x5150));
    const __half2 q = __hsub2(t, as_h2(0x64006400u));
    return as_u32(__hfma2(q, as_h2(s2), as_h2(z2)));
  }
};

template <> struct Dequant<4, __nv_bfloat16> {
  u32 shi, slo, zhi, zlo;
  __device__ __forceinline__ void set(__half s, __half z) {
    const float sf = __half2float(s), zf = __half2float(z);
    const __nv_bfloat16 sh = __float2bfloat16_rn(sf);
    const __nv_bfloat16 sl = __float2bfloat16_rn(sf - __bfloat162float(sh));
    const float zz = fmaf(-128.0f, sf, zf);  // the magic offset folded into the zero
    const __nv_bfloat16 zh = __float2bfloat16_rn(zz);
    const __nv_bfloat16 zl = __float2bfloat16_rn(zz - __bfloat162float(zh));
    shi = as_u32(__halves2bfloat162(sh, sh));
    slo = as_u32(__halves2bfloat162(sl, sl));
    zhi = as_u32(__halves2bfloat162(zh, zh));
    zlo = as_u32(__halves2bfloat162(zl, zl));
  }
  __device__ __forceinline__ u32 pair(u32 w, u32, int k) const {
    const __nv_bfloat162 t = as_b2(and_or<0x000F000Fu, 0x43004300u>(w >> (4 * k)));  // 128 + q, exact
    const __nv_bfloat162 big = __hfma2(t, as_b2(shi), as_b2(zhi));
    const __nv_bfloat162 small = __hfma2(t, as_b2(slo), as_b2(zlo));
    return as_u32(__hadd2(big, small));
  }
};

template <> struct Dequant<8, __nv_bfloat16> {
  float s, z;
  __device__ __forceinline__ void set(__half sh, __half zh) {
    s = __half2float(sh);
    z = __half2float(zh);
  }
  __device__ __forceinline__ u32 pair(u32 w, u32, int k) const {
    // 0x4B0000qq is the float 2^23 + q.
    const float q0 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 + 2 * k)) - 8388608.0f;
    const float q1 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7441 + 2 * k)) - 8388608.0f;
    return pack2<__nv_bfloat16>(fmaf(q0, s, z), fmaf(q1, s, z));
  }
};

// Slow path: code pair k of word j of the chunk starting at column col0, each column its own group.
template <int BITS, typename T>
__device__ __forceinline__ u32 general_pair(u32 w, int j, int k, int col0, const __half* srow,
                                            const __half* zrow, int gs, int groups) {
  int ca, cb;
  u32 qa, qb;
  if (BITS == 4) {
    ca = col0 + 8 * j + k;
    cb = ca + 4;
    qa = (w >> (4 * k)) & 0xFu;
    qb = (w >> (4 * k + 16)) & 0xFu;
  } else {
    ca = col0 + 4 * j + 2 * k;
    cb = ca + 1;
    qa = (w >> (16 * k)) & 0xFFu;
    qb = (w >> (16 * k + 8)) & 0xFFu;
  }
  const int ga = min(ca / gs, groups - 1), gb = min(cb / gs, groups - 1);  // clamped past the row end
  const float va = fmaf(static_cast<float>(qa), __half2float(srow[ga]), __half2float(zrow[ga]));
  const float vb = fmaf(static_cast<float>(qb), __half2float(srow[gb]), __half2float(zrow[gb]));
  return pack2<T>(va, vb);
}

// B fragment (b0b1, b2b3) of mma `s` of word `j` from the chunk's x vectors (see file comment).
template <int BITS>
__device__ __forceinline__ void x_fragment(const uint4 (&xv)[128 / BITS / 8], int j, int s, u32& b0,
                                           u32& b1) {
  if (BITS == 4) {
    const uint4 v = xv[j];
    const u32 lo = s ? v.y : v.x, hi = s ? v.w : v.z;
    b0 = __byte_perm(lo, hi, 0x5410);  // (x[c], x[c + 4]) for the even pair
    b1 = __byte_perm(lo, hi, 0x7632);  // (x[c + 1], x[c + 5]) for the odd pair
  } else {
    const uint4 v = xv[j >> 1];
    b0 = (j & 1) ? v.z : v.x;
    b1 = (j & 1) ? v.w : v.y;
  }
}

template <int BITS, typename T, bool GENERAL, int U, int MT, int NT>
__device__ __forceinline__ void quant_gemv(const uint4* __restrict__ qdata, const __half* __restrict__ scale,
                                           const __half* __restrict__ zero, const T* __restrict__ x,
                                           const T* __restrict__ bias, T* __restrict__ y, int O, int I,
                                           int gs, int batch, int cpg_shift, int chunk_row) {
  constexpr int CW = 128 / BITS;  // columns per 16-byte chunk
  constexpr int XV = CW / 8;      // 16-byte x vectors per chunk
  constexpr int WORD_MMAS = BITS == 4 ? 2 : 1;
  constexpr int CPS = 4 * U;      // chunks of a row per warp step
  extern __shared__ float red[];  // [nwarps][MT][NT][32 lanes][4]

  // This block's chunk of the batch: x [nb, I] and y [nb, O] from row chunk_row.
  x += static_cast<size_t>(chunk_row) * I;
  y += static_cast<size_t>(chunk_row) * O;
  const int nb = min(8 * NT, batch - chunk_row);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row_base = blockIdx.x * (16 * MT);
  const int row_chunks = I / CW;
  const int groups = I / gs;
  const int nsteps = (row_chunks + CPS - 1) / CPS;
  // This lane's x rows (batch 8 * nt + g) from its first chunk; a step adds step * CPS chunks.
  bool has_x[NT];
  const uint4* xlane[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    has_x[nt] = 8 * nt + g < nb;
    xlane[nt] = reinterpret_cast<const uint4*>(x + static_cast<size_t>(has_x[nt] ? 8 * nt + g : 0) * I) + t * U * XV;
  }
  // Rows past O are clamped to O - 1: valid memory, results never stored.
  int rows[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[mt][h] = min(row_base + 16 * mt + 8 * h + g, O - 1);

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.0f;

  for (int step = warp; step < nsteps; step += nwarps) {
    const int ci0 = step * CPS + t * U;  // this lane's first chunk in the row
    bool cok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) cok[u] = ci0 + u < row_chunks;
    uint4 q[MT][2][U];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4* src = qdata + static_cast<size_t>(rows[mt][h]) * row_chunks + ci0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          q[mt][h][u] = make_uint4(0u, 0u, 0u, 0u);
          if (cok[u]) q[mt][h][u] = load_stream16(src + u);
        }
      }
    // x of columns past I is zero, so the (finite) weights there contribute nothing.
    uint4 xv[NT][U][XV];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int v = 0; v < XV; ++v) {
          xv[nt][u][v] = make_uint4(0u, 0u, 0u, 0u);
          if (cok[u] && has_x[nt]) xv[nt][u][v] = __ldg(xlane[nt] + (step * CPS + u) * XV + v);
        }

    if (!GENERAL) {
      // gs / CW is a power of two >= U, so the U chunks of a lane share one group.
      const int grp = min(ci0 >> cpg_shift, groups - 1);
      Dequant<BITS, T> dq[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const size_t idx = static_cast<size_t>(rows[mt][h]) * groups + grp;
          dq[mt][h].set(scale[idx], zero[idx]);
        }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int s = 0; s < WORD_MMAS; ++s) {
            u32 b0[NT], b1[NT];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) x_fragment<BITS>(xv[nt][u], j, s, b0[nt], b1[nt]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const u32 w0 = word_of(q[mt][0][u], j), w1 = word_of(q[mt][1][u], j);
              const u32 w08 = w0 >> 8, w18 = w1 >> 8;
              const u32 a0 = dq[mt][0].pair(w0, w08, 2 * s), a1 = dq[mt][1].pair(w1, w18, 2 * s);
              const u32 a2 = dq[mt][0].pair(w0, w08, 2 * s + 1), a3 = dq[mt][1].pair(w1, w18, 2 * s + 1);
#pragma unroll
              for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a0, a1, a2, a3, b0[nt], b1[nt]);
            }
          }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int s = 0; s < WORD_MMAS; ++s) {
            u32 b0[NT], b1[NT];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) x_fragment<BITS>(xv[nt][u], j, s, b0[nt], b1[nt]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              u32 a[2][2];
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const size_t off = static_cast<size_t>(rows[mt][h]) * groups;
                const u32 w = word_of(q[mt][h][u], j);
#pragma unroll
                for (int e = 0; e < 2; ++e)
                  a[h][e] = general_pair<BITS, T>(w, j, 2 * s + e, (ci0 + u) * CW, scale + off, zero + off, gs,
                                                  groups);
              }
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
                mma16816<T>(acc[mt][nt], a[0][0], a[1][0], a[0][1], a[1][1], b0[nt], b1[nt]);
            }
          }
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[(((warp * MT + mt) * NT + nt) * 32 + lane) * 4 + r] = acc[mt][nt][r];
  __syncthreads();

  // Output (row m of tile mt, batch 8 nt + n) sits in lane 4 * (m % 8) + n / 2, register 2 * (m / 8) + n % 2 of
  // tile (mt, nt).
  for (int i = threadIdx.x; i < MT * NT * 128; i += blockDim.x) {
    const int tile = i >> 7, m = i & 15, n = (i >> 4) & 7;
    const int mt = tile / NT, nt = tile % NT;
    const int row = row_base + 16 * mt + m, col = 8 * nt + n;
    if (col >= nb || row >= O) continue;
    const int src = (tile * 32 + 4 * (m & 7) + (n >> 1)) * 4 + 2 * (m >> 3) + (n & 1);
    float sum = 0.0f;
    for (int w = 0; w < nwarps; ++w) sum += red[w * MT * NT * 128 + src];
    if (bias != nullptr) sum += to_float(bias[row]);
    y[static_cast<size_t>(col) * O + row] = from_float<T>(sum);
  }
}

}  // namespace tiermem

// The launch variants of a kernel macro KERNEL(NAME, BITS, T, GENERAL, U, MT, NT, MINB) that runs quant_gemv<BITS, T,
// GENERAL, U, MT, NT>, named PREFIX_int<BITS>_<TN>_<variant>: cupy_ops.GEMV_VARIANTS (u<U>m<MT>) and the general
// one, each with one batch tile and with two (suffix n2). MINB (blocks of 256 threads per SM) caps the registers so
// that no variant spills (ptxas -v); U2_MINB is the u2m1 variant's (int4 bf16 needs more registers for its split
// constants).
#define TM_GEMV_VARIANTS(KERNEL, PREFIX, BITS, TN, T, U2_MINB)                       \
  KERNEL(PREFIX##_int##BITS##_##TN##_u1m1, BITS, T, false, 1, 1, 1, 4)               \
  KERNEL(PREFIX##_int##BITS##_##TN##_u2m1, BITS, T, false, 2, 1, 1, U2_MINB)         \
  KERNEL(PREFIX##_int##BITS##_##TN##_u4m1, BITS, T, false, 4, 1, 1, 2)               \
  KERNEL(PREFIX##_int##BITS##_##TN##_u2m2, BITS, T, false, 2, 2, 1, 2)               \
  KERNEL(PREFIX##_int##BITS##_##TN##_general, BITS, T, true, 1, 1, 1, 2)             \
  KERNEL(PREFIX##_int##BITS##_##TN##_u1m1n2, BITS, T, false, 1, 1, 2, 2)             \
  KERNEL(PREFIX##_int##BITS##_##TN##_u2m1n2, BITS, T, false, 2, 1, 2, 2)             \
  KERNEL(PREFIX##_int##BITS##_##TN##_u4m1n2, BITS, T, false, 4, 1, 2, 1)             \
  KERNEL(PREFIX##_int##BITS##_##TN##_u2m2n2, BITS, T, false, 2, 2, 2, 1)             \
  KERNEL(PREFIX##_int##BITS##_##TN##_generaln2, BITS, T, true, 1, 1, 2, 1)
