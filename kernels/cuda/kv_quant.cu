// Quantize new K or V vectors straight into a quantized KV cache: one launch where the torch reference
// (tiermem/kernels/quant.py quantize, through kv_quant.quantize_kv, then three slice copies) takes ~20.
//
// x      T      [rows, Hkv, tokens, Dh] with element strides (sr, sh, st, sd)
// codes  uint8  [B, Hkv, S_max, Dh*BITS/8]  written at batch row row0 + r, slot start + t (int4: low nibble = even dim)
// start_slot  int64 [1] or null: when given, start is read from it (device memory: a CUDA graph's step replays the
//             launch with the slot it holds then); a start past S_max - tokens writes nothing
// scale  fp16   [B, Hkv, S_max, Dh/G]       (max - min) / (2^BITS - 1), rounded to fp16
// zero   fp16   [B, Hkv, S_max, Dh/G]       min, rounded to fp16
// code = clamp(round_half_even((x - zero) / scale), 0, 2^BITS - 1) in fp32 against the fp16-rounded scale and
// zero (scale 0 divides by 1), exactly as the reference. One thread per (vector, group); int4 needs an even G.
#include "common.cuh"

namespace tiermem {

template <typename T, int BITS>
__device__ void kv_quantize_write(const T* __restrict__ x, long long sr, long long sh, long long st, long long sd,
                                  unsigned char* __restrict__ codes, __half* __restrict__ scale,
                                  __half* __restrict__ zero, int rows, int kv_heads, int tokens, int head_dim,
                                  int group, int s_max, int row0, int start, const long long* start_slot) {
  const int groups = head_dim / group;
  const long long first = start_slot != nullptr ? *start_slot : start;
  if (first < 0 || first + tokens > s_max) return;
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long long>(rows) * kv_heads * tokens * groups) return;
  const int g = static_cast<int>(idx % groups);
  long long v = idx / groups;
  const int t = static_cast<int>(v % tokens);
  v /= tokens;
  const int h = static_cast<int>(v % kv_heads);
  const int r = static_cast<int>(v / kv_heads);
  const T* xv = x + r * sr + h * sh + t * st + static_cast<long long>(g) * group * sd;  // this group's first value
  float lo = to_float(xv[0]), hi = lo;
  for (int i = 1; i < group; ++i) {
    const float f = to_float(xv[i * sd]);
    lo = fminf(lo, f);
    hi = fmaxf(hi, f);
  }
  const float levels = static_cast<float>((1 << BITS) - 1);
  const __half s16 = __float2half_rn((hi - lo) / levels), z16 = __float2half_rn(lo);
  const float s32 = __half2float(s16), z32 = __half2float(z16), safe = s32 > 0.0f ? s32 : 1.0f;
  const long long slot = (static_cast<long long>(row0 + r) * kv_heads + h) * s_max + first + t;
  scale[slot * groups + g] = s16;
  zero[slot * groups + g] = z16;
  unsigned char* out = codes + slot * (head_dim * BITS / 8) + g * group * BITS / 8;
  for (int i = 0; i < group; i += 8 / BITS) {
    const float q0 = fminf(fmaxf(rintf((to_float(xv[i * sd]) - z32) / safe), 0.0f), levels);
    if (BITS == 8) {
      out[i] = static_cast<unsigned char>(q0);
    } else {
      const float q1 = fminf(fmaxf(rintf((to_float(xv[(i + 1) * sd]) - z32) / safe), 0.0f), levels);
      out[i >> 1] = static_cast<unsigned char>(q0) | static_cast<unsigned char>(static_cast<unsigned>(q1) << 4);
    }
  }
}

}  // namespace tiermem

#define TIERMEM_KV_QUANTIZE(NAME, T, BITS)                                                                   \
  extern "C" __global__ void NAME(const T* x, long long sr, long long sh, long long st, long long sd,        \
                                  unsigned char* codes, __half* scale, __half* zero, int rows, int kv_heads,  \
                                  int tokens, int head_dim, int group, int s_max, int row0, int start,        \
                                  const long long* start_slot) {                                              \
    tiermem::kv_quantize_write<T, BITS>(x, sr, sh, st, sd, codes, scale, zero, rows, kv_heads, tokens,       \
                                        head_dim, group, s_max, row0, start, start_slot);                    \
  }

TIERMEM_KV_QUANTIZE(kv_quantize_int8_f16, __half, 8)
TIERMEM_KV_QUANTIZE(kv_quantize_int8_bf16, __nv_bfloat16, 8)
TIERMEM_KV_QUANTIZE(kv_quantize_int8_f32, float, 8)
TIERMEM_KV_QUANTIZE(kv_quantize_int4_f16, __half, 4)
TIERMEM_KV_QUANTIZE(kv_quantize_int4_bf16, __nv_bfloat16, 4)
TIERMEM_KV_QUANTIZE(kv_quantize_int4_f32, float, 4)
