// Decode attention over a quantized KV cache: one query token per (row, head), K and V dequantized
// inside the kernel (never materialised in the compute dtype), split along the sequence (flash-decoding).
//
// Layouts (tiermem/kernels/kv_quant.py, tiermem/engine/kv_cache.py):
//   q           T      [B, H, Dh]                   (the query of the one new token, contiguous)
//   k/v codes   uint8  [B, Hkv, S_max, Dh*BITS/8]   (int8: one code per byte; int4: low nibble = even dim)
//   k/v scale   fp16   [B, Hkv, S_max, Dh/G]        value = code * scale + zero, per group of G dims
//   k/v zero    fp16   [B, Hkv, S_max, Dh/G]
//   key_mask    uint8  [B, mask_stride]             1 = real token (slots 0..len-1 read)
//   part_out    float  [splits, B, H, Dh]           this split's unnormalised output, sum_s p_s * v_s
//   part_ml     float  [splits, B, H, 2]            this split's max score and sum of p_s = exp(score_s - max)
//   out         T      [B, H, Dh]
//   query_slot  int64  [1] or NULL                  the query's slot when not len-1 (a CUDA graph's step)
// The query sits at slot len-1, or at *query_slot when given (slots past it are read but never attended). It
// attends to slot s < self when key_mask[s] and s > self-window (window 0: no window), and always to itself, as
// engine.attention.causal_mask builds it.
//
// kv_attention_split: one block of 128 threads per (split of `chunk` slots, kv head, row) serves all QPK
// = H / Hkv query heads of that kv head, so each K and V code is read once. Pass 1: one thread per slot
// dequantizes its K row 8 dims at a time and scores it against every query head (queries in shared memory,
// read as broadcasts). Pass 2: a warp per query head takes the chunk's max and exp-sum. Pass 3: Dh/4
// threads per slot, each with 4 dims, accumulate p * V over the slots of its phase; the phases are summed
// in shared memory. kv_attention_combine: one block per (row, head) merges the splits.
// Limits (checked by the caller): Dh % 8 == 0, Dh <= 256, group % 8 == 0, QPK <= 16, and shared memory
// 4 * QPK * (Dh + chunk) bytes <= 48 KiB.
#include "common.cuh"

namespace tiermem {

constexpr int KV_THREADS = 128;
constexpr int KV_MAX_QPK = 16;  // query heads per kv head

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Eight consecutive dims d..d+7 of one slot (d % 8 == 0), dequantized with that group's scale and zero.
template <int BITS>
__device__ __forceinline__ void load8(const unsigned char* codes, float scale, float zero, int d, float* v) {
  if (BITS == 4) {
    const u32 w = *reinterpret_cast<const u32*>(codes + (d >> 1));
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = static_cast<float>((w >> (4 * j)) & 15u) * scale + zero;
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(codes + d);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = static_cast<float>((w.x >> (8 * j)) & 255u) * scale + zero;
      v[4 + j] = static_cast<float>((w.y >> (8 * j)) & 255u) * scale + zero;
    }
  }
}

// Four consecutive dims d..d+3 (d % 4 == 0) of one slot.
template <int BITS>
__device__ __forceinline__ void load4(const unsigned char* codes, float scale, float zero, int d, float* v) {
  u32 w;
  if (BITS == 4) {
    w = *reinterpret_cast<const unsigned short*>(codes + (d >> 1));
  } else {
    w = *reinterpret_cast<const u32*>(codes + d);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const u32 q = BITS == 4 ? (w >> (4 * j)) & 15u : (w >> (8 * j)) & 255u;
    v[j] = static_cast<float>(q) * scale + zero;
  }
}

template <typename T, int BITS>
__device__ void kv_attention_split(const T* __restrict__ q, const unsigned char* __restrict__ kc,
                                   const __half* __restrict__ ks, const __half* __restrict__ kz,
                                   const unsigned char* __restrict__ vc, const __half* __restrict__ vs,
                                   const __half* __restrict__ vz, const unsigned char* __restrict__ key_mask,
                                   const long long* __restrict__ query_slot, float* __restrict__ part_out,
                                   float* __restrict__ part_ml, int batch, int heads,
                                   int kv_heads, int s_max, int len, int head_dim, int group, int mask_stride,
                                   int window, float softmax_scale, int chunk) {
  extern __shared__ float smem[];
  const int qpk = heads / kv_heads;
  float* qs = smem;                    // [qpk, head_dim] queries, scaled; pass 3: the phases' sum
  float* scores = smem + qpk * head_dim;  // [qpk, chunk]: scores, then p
  const int split = blockIdx.x, kv_head = blockIdx.y, row = blockIdx.z;
  const int begin = split * chunk, n = min(len, begin + chunk) - begin;
  const int code_bytes = head_dim * BITS / 8, groups = head_dim / group;
  const long long slot0 = (static_cast<long long>(row) * kv_heads + kv_head) * s_max + begin;  // [row, kvh, begin]
  const long long head0 = static_cast<long long>(row) * heads + kv_head * qpk;  // first query head, [row, h]
  for (int i = threadIdx.x; i < qpk * head_dim; i += blockDim.x) {
    qs[i] = to_float(q[head0 * head_dim + i]) * softmax_scale;
  }
  __syncthreads();

  // Pass 1: scores[h, i] for slot begin + i, one thread per slot.
  const int self = query_slot == nullptr ? len - 1 : static_cast<int>(*query_slot);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int s = begin + i;
    const bool allowed = s == self || (s < self && key_mask[static_cast<long long>(row) * mask_stride + s] &&
                                       (window <= 0 || s > self - window));
    float acc[KV_MAX_QPK];
#pragma unroll
    for (int h = 0; h < KV_MAX_QPK; ++h) acc[h] = 0.0f;
    if (allowed) {
      const unsigned char* codes = kc + (slot0 + i) * code_bytes;
      const __half* scale = ks + (slot0 + i) * groups;
      const __half* zero = kz + (slot0 + i) * groups;
      for (int d = 0; d < head_dim; d += 8) {
        float k[8];
        load8<BITS>(codes, __half2float(scale[d / group]), __half2float(zero[d / group]), d, k);
#pragma unroll
        for (int h = 0; h < KV_MAX_QPK; ++h) {
          if (h < qpk) {
            const float* qh = qs + h * head_dim + d;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[h] += qh[j] * k[j];
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < KV_MAX_QPK; ++h) {
      if (h < qpk) scores[h * chunk + i] = allowed ? acc[h] : neg_inf();
    }
  }
  __syncthreads();

  // Pass 2: per query head, the chunk's max m and p = exp(score - m), sum l (a warp per head).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int h = warp; h < qpk; h += nwarps) {
    float* sh = scores + h * chunk;
    float m = neg_inf();
    for (int i = lane; i < n; i += 32) m = fmaxf(m, sh[i]);
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.0f;
    for (int i = lane; i < n; i += 32) {
      const float p = m == neg_inf() ? 0.0f : __expf(sh[i] - m);  // a chunk of padding only: p = 0
      sh[i] = p;
      l += p;
    }
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) {
      float* ml = part_ml + ((static_cast<long long>(split) * batch * heads) + head0 + h) * 2;
      ml[0] = m;
      ml[1] = l;
    }
  }
  __syncthreads();

  // Pass 3: sum_i p[h, i] * v[i] over 4 dims per thread; `phases` slots at a time.
  const int per_slot = head_dim / 4, phases = blockDim.x / per_slot;
  const int phase = threadIdx.x / per_slot, d = (threadIdx.x % per_slot) * 4;
  float acc[KV_MAX_QPK][4];
#pragma unroll
  for (int h = 0; h < KV_MAX_QPK; ++h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[h][j] = 0.0f;
  }
  if (phase < phases) {
    for (int i = phase; i < n; i += phases) {
      float v[4];
      load4<BITS>(vc + (slot0 + i) * code_bytes, __half2float(vs[(slot0 + i) * groups + d / group]),
                  __half2float(vz[(slot0 + i) * groups + d / group]), d, v);
#pragma unroll
      for (int h = 0; h < KV_MAX_QPK; ++h) {
        if (h < qpk) {
          const float p = scores[h * chunk + i];
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[h][j] += p * v[j];
        }
      }
    }
  }
  for (int f = 0; f < phases; ++f) {  // qs becomes the phases' sum, one phase at a time
    if (phase == f) {
#pragma unroll
      for (int h = 0; h < KV_MAX_QPK; ++h) {
        if (h < qpk) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float* sum = qs + h * head_dim + d + j;
            *sum = (f == 0 ? 0.0f : *sum) + acc[h][j];
          }
        }
      }
    }
    __syncthreads();
  }
  float* out = part_out + (static_cast<long long>(split) * batch * heads + head0) * head_dim;
  for (int i = threadIdx.x; i < qpk * head_dim; i += blockDim.x) out[i] = qs[i];
}

template <typename T>
__device__ void kv_attention_combine(const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                     T* __restrict__ out, int rows_heads, int head_dim, int splits) {
  const long long rh = blockIdx.x;  // row * heads + head
  float m = neg_inf();
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_ml[(s * rows_heads + rh) * 2]);
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = part_ml[(s * rows_heads + rh) * 2];
    if (ms != neg_inf()) total += __expf(ms - m) * part_ml[(s * rows_heads + rh) * 2 + 1];
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = part_ml[(s * rows_heads + rh) * 2];
      if (ms != neg_inf()) acc += __expf(ms - m) * part_out[(s * rows_heads + rh) * head_dim + d];
    }
    out[rh * head_dim + d] = from_float<T>(acc / total);
  }
}

}  // namespace tiermem

#define TIERMEM_KV_ATTENTION(NAME, T, BITS)                                                                  \
  extern "C" __global__ void __launch_bounds__(tiermem::KV_THREADS) NAME(                                   \
      const T* q, const unsigned char* kc, const __half* ks, const __half* kz, const unsigned char* vc,      \
      const __half* vs, const __half* vz, const unsigned char* key_mask, const long long* query_slot,       \
      float* part_out, float* part_ml, int batch, int heads, int kv_heads, int s_max, int len, int head_dim, \
      int group, int mask_stride, int window, float softmax_scale, int chunk) {                             \
    tiermem::kv_attention_split<T, BITS>(q, kc, ks, kz, vc, vs, vz, key_mask, query_slot, part_out,         \
                                         part_ml, batch, heads, kv_heads, s_max, len, head_dim, group,      \
                                         mask_stride, window, softmax_scale, chunk);                        \
  }

#define TIERMEM_KV_COMBINE(NAME, T)                                                                          \
  extern "C" __global__ void __launch_bounds__(tiermem::KV_THREADS) NAME(                                   \
      const float* part_out, const float* part_ml, T* out, int rows_heads, int head_dim, int splits) {       \
    tiermem::kv_attention_combine<T>(part_out, part_ml, out, rows_heads, head_dim, splits);                 \
  }

TIERMEM_KV_ATTENTION(kv_attention_int8_f16, __half, 8)
TIERMEM_KV_ATTENTION(kv_attention_int8_bf16, __nv_bfloat16, 8)
TIERMEM_KV_ATTENTION(kv_attention_int8_f32, float, 8)
TIERMEM_KV_ATTENTION(kv_attention_int4_f16, __half, 4)
TIERMEM_KV_ATTENTION(kv_attention_int4_bf16, __nv_bfloat16, 4)
TIERMEM_KV_ATTENTION(kv_attention_int4_f32, float, 4)
TIERMEM_KV_COMBINE(kv_attention_combine_f16, __half)
TIERMEM_KV_COMBINE(kv_attention_combine_bf16, __nv_bfloat16)
TIERMEM_KV_COMBINE(kv_attention_combine_f32, float)
