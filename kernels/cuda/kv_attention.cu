// Decode attention over a quantized KV cache: one query token per (row, head), K and V dequantized
// inside the kernel (never materialised in the compute dtype).
//
// Layouts (tiermem/kernels/kv_quant.py, tiermem/engine/kv_cache.py):
//   q, out      T      [B, H, Dh]                   (the query / output of the one new token, contiguous)
//   k/v codes   uint8  [B, Hkv, S_max, Dh*BITS/8]   (int8: one code per byte; int4: low nibble = even dim)
//   k/v scale   fp16   [B, Hkv, S_max, Dh/G]        value = code * scale + zero, per group of G dims
//   k/v zero    fp16   [B, Hkv, S_max, Dh/G]
//   key_mask    uint8  [B, mask_stride]             1 = real token (slots 0..len-1 read)
// The query sits at slot len-1. It attends to slot s when key_mask[s] and s > len-1-window (window 0: no
// window), and always to itself, as engine.attention.causal_mask builds it.
//
// One block of 128 threads per (row, head); query head h reads kv head h / (H / Hkv). Scores live in dynamic
// shared memory (len floats). Pass 1: each warp scores every 4th slot, lanes splitting Dh. Pass 2: block max,
// exp, block sum. Pass 3: each thread accumulates its output dims over all slots.
#include "common.cuh"

namespace tiermem {

constexpr int KV_THREADS = 128;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <int BITS>
__device__ __forceinline__ float kv_value(const unsigned char* codes, const __half* scale, const __half* zero,
                                          int d, int group) {
  int q;
  if (BITS == 8) {
    q = codes[d];
  } else {
    const unsigned char byte = codes[d >> 1];
    q = (d & 1) ? (byte >> 4) : (byte & 15);
  }
  const int g = d / group;
  return static_cast<float>(q) * __half2float(scale[g]) + __half2float(zero[g]);
}

__device__ __forceinline__ float block_max(float v, float* scratch32) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) scratch32[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch32[lane] : neg_inf();
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  return v;
}

template <typename T, int BITS>
__device__ void kv_attention_decode(const T* __restrict__ q, const unsigned char* __restrict__ kc,
                                    const __half* __restrict__ ks, const __half* __restrict__ kz,
                                    const unsigned char* __restrict__ vc, const __half* __restrict__ vs,
                                    const __half* __restrict__ vz, const unsigned char* __restrict__ key_mask,
                                    T* __restrict__ out, int heads, int kv_heads, int s_max, int len, int head_dim,
                                    int group, int mask_stride, int window, float softmax_scale) {
  extern __shared__ float scores[];  // [len]
  __shared__ float qs[256];
  __shared__ float scratch[32];
  const int row = blockIdx.x / heads, head = blockIdx.x % heads;
  const int kv_head = head / (heads / kv_heads);
  const int code_bytes = head_dim * BITS / 8, groups = head_dim / group;
  const long long slot0 = (static_cast<long long>(row) * kv_heads + kv_head) * s_max;  // [row, kv_head, 0]
  const T* qrow = q + (static_cast<long long>(row) * heads + head) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = to_float(qrow[d]);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int self = len - 1;
  for (int s = warp; s < len; s += nwarps) {
    const bool allowed = s == self || (key_mask[static_cast<long long>(row) * mask_stride + s] &&
                                       (window <= 0 || s > self - window));
    float partial = 0.0f;
    if (allowed) {
      const unsigned char* codes = kc + (slot0 + s) * code_bytes;
      const __half* scale = ks + (slot0 + s) * groups;
      const __half* zero = kz + (slot0 + s) * groups;
      for (int d = lane; d < head_dim; d += 32) partial += qs[d] * kv_value<BITS>(codes, scale, zero, d, group);
    }
    for (int off = 16; off > 0; off >>= 1) partial += __shfl_xor_sync(0xffffffffu, partial, off);
    if (lane == 0) scores[s] = allowed ? partial * softmax_scale : neg_inf();
  }
  __syncthreads();

  float local_max = neg_inf();
  for (int s = threadIdx.x; s < len; s += blockDim.x) local_max = fmaxf(local_max, scores[s]);
  const float m = block_max(local_max, scratch);
  float local_sum = 0.0f;
  for (int s = threadIdx.x; s < len; s += blockDim.x) {
    const float p = __expf(scores[s] - m);  // exp(-inf) = 0 for masked slots; the self slot is finite
    scores[s] = p;
    local_sum += p;
  }
  const float total = block_sum(local_sum, scratch);  // ends with every thread past __syncthreads
  __syncthreads();

  T* orow = out + (static_cast<long long>(row) * heads + head) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < len; ++s) {
      const float p = scores[s];
      if (p != 0.0f) {
        acc += p * kv_value<BITS>(vc + (slot0 + s) * code_bytes, vs + (slot0 + s) * groups,
                                  vz + (slot0 + s) * groups, d, group);
      }
    }
    orow[d] = from_float<T>(acc / total);
  }
}

}  // namespace tiermem

#define TIERMEM_KV_ATTENTION(NAME, T, BITS)                                                                  \
  extern "C" __global__ void __launch_bounds__(tiermem::KV_THREADS) NAME(                                   \
      const T* q, const unsigned char* kc, const __half* ks, const __half* kz, const unsigned char* vc,      \
      const __half* vs, const __half* vz, const unsigned char* key_mask, T* out, int heads, int kv_heads,    \
      int s_max, int len, int head_dim, int group, int mask_stride, int window, float softmax_scale) {       \
    tiermem::kv_attention_decode<T, BITS>(q, kc, ks, kz, vc, vs, vz, key_mask, out, heads, kv_heads, s_max, \
                                          len, head_dim, group, mask_stride, window, softmax_scale);        \
  }

TIERMEM_KV_ATTENTION(kv_attention_int8_f16, __half, 8)
TIERMEM_KV_ATTENTION(kv_attention_int8_bf16, __nv_bfloat16, 8)
TIERMEM_KV_ATTENTION(kv_attention_int8_f32, float, 8)
TIERMEM_KV_ATTENTION(kv_attention_int4_f16, __half, 4)
TIERMEM_KV_ATTENTION(kv_attention_int4_bf16, __nv_bfloat16, 4)
TIERMEM_KV_ATTENTION(kv_attention_int4_f32, float, 4)
