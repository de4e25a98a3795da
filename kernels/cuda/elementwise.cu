// Fused elementwise kernels: RMSNorm, RoPE, SiLU * mul. Each follows kernels/reference.py, op by op:
// where torch stores an intermediate in T, the kernel rounds it to T too (round_to<T>), so results
// match the reference to within the last-bit differences of reduction order and exp/rsqrt.
#include "common.cuh"

namespace tiermem {

// Eight consecutive elements as floats (p 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = unpack2<T>(words[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(p) =
      make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
}

// out = x / rms(x) * w over the last dimension D, one block per row. The mean of squares is in fp32;
// when w has x's dtype the normalized value is rounded to T before the product (as the reference).
// VEC = 8 needs D % 8 == 0 and 16-byte aligned x, out and w.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void rms_norm(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ out,
                                         int D, float eps) {
  __shared__ float scratch[32];
  constexpr bool ROUND_FIRST = same_type<T, W>::value;
  const T* xr = x + static_cast<size_t>(blockIdx.x) * D;
  T* orow = out + static_cast<size_t>(blockIdx.x) * D;
  float sum = 0.0f;
  if constexpr (VEC == 8) {
    for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
      float v[8];
      load8(xr + i, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) sum = fmaf(v[k], v[k], sum);
    }
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = to_float(xr[i]);
      sum = fmaf(v, v, sum);
    }
  }
  const float r = rsqrtf(block_sum(sum, scratch) / static_cast<float>(D) + eps);
  if constexpr (VEC == 8) {
    for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
      float v[8], wv[8];
      load8(xr + i, v);
      load8(w + i, wv);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = wv[k] * (ROUND_FIRST ? round_to<T>(v[k] * r) : v[k] * r);
      store8(orow + i, v);
    }
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = to_float(xr[i]) * r;
      orow[i] = from_float<T>(to_float(w[i]) * (ROUND_FIRST ? round_to<T>(v) : v));
    }
  }
}

// out[b, h, t, :] = x * cos + rotate_half(x) * sin with cos/sin[b, t, :] rounded to T first, each
// product and the sum rounded to T (the reference's op order). One thread per (b, h, t, d < Dh / 2)
// computes out[d] and out[d + Dh / 2]. x and cos/sin take element strides; out is contiguous.
template <typename T, typename C>
__device__ __forceinline__ void rope(const T* __restrict__ x, const C* __restrict__ cos, const C* __restrict__ sin,
                                     T* __restrict__ out, int H, int S, int half, long long xsb, long long xsh,
                                     long long xst, long long csb, long long cst, long long ssb, long long sst,
                                     unsigned int total) {
  const unsigned int stride = gridDim.x * blockDim.x;
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const unsigned int d = i % half, r = i / half;  // r = (b * H + h) * S + t
    const unsigned int t = r % S, bh = r / S;
    const unsigned int h = bh % H, b = bh / H;
    const T* xp = x + b * xsb + h * xsh + t * xst;
    const C* cp = cos + b * csb + t * cst;
    const C* sp = sin + b * ssb + t * sst;
    const float x1 = to_float(xp[d]), x2 = to_float(xp[d + half]);
    const float c1 = round_to<T>(to_float(cp[d])), c2 = round_to<T>(to_float(cp[d + half]));
    const float s1 = round_to<T>(to_float(sp[d])), s2 = round_to<T>(to_float(sp[d + half]));
    T* op = out + static_cast<size_t>(r) * (2 * half);
    op[d] = from_float<T>(round_to<T>(x1 * c1) + round_to<T>(-x2 * s1));
    op[d + half] = from_float<T>(round_to<T>(x2 * c2) + round_to<T>(x1 * s2));
  }
}

// out = silu(gate) * up with silu rounded to T first (F.silu(gate) is a T tensor in the reference).
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

template <typename T, int VEC>
__device__ __forceinline__ void silu_mul(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                         unsigned long long n) {
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  const unsigned long long first = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned long long done = 0;
  if constexpr (VEC == 8) {
    const unsigned long long nvec = n / 8;
    for (unsigned long long v = first; v < nvec; v += stride) {
      float g[8], u[8];
      load8(gate + 8 * v, g);
      load8(up + 8 * v, u);
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = round_to<T>(silu(g[k])) * u[k];
      store8(out + 8 * v, g);
    }
    done = nvec * 8;
  }
  for (unsigned long long i = done + first; i < n; i += stride) {
    out[i] = from_float<T>(round_to<T>(silu(to_float(gate[i]))) * to_float(up[i]));
  }
}

}  // namespace tiermem

#define TM_RMS(TN, T, WN, W)                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_##TN##_w##WN##_vec8(                          \
      const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ out, int D, float eps) {             \
    tiermem::rms_norm<T, W, 8>(x, w, out, D, eps);                                                           \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_##TN##_w##WN##_vec1(                          \
      const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ out, int D, float eps) {             \
    tiermem::rms_norm<T, W, 1>(x, w, out, D, eps);                                                           \
  }

#define TM_ROPE(TN, T, CN, C)                                                                                 \
  extern "C" __global__ void __launch_bounds__(256) rope_##TN##_c##CN(                                      \
      const T* __restrict__ x, const C* __restrict__ cos, const C* __restrict__ sin, T* __restrict__ out,    \
      int H, int S, int half, long long xsb, long long xsh, long long xst, long long csb, long long cst,      \
      long long ssb, long long sst, unsigned int total) {                                                   \
    tiermem::rope<T, C>(x, cos, sin, out, H, S, half, xsb, xsh, xst, csb, cst, ssb, sst, total);            \
  }

#define TM_SILU(TN, T)                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) silu_mul_##TN##_vec8(                                   \
      const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, unsigned long long n) {     \
    tiermem::silu_mul<T, 8>(gate, up, out, n);                                                               \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) silu_mul_##TN##_vec1(                                   \
      const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, unsigned long long n) {     \
    tiermem::silu_mul<T, 1>(gate, up, out, n);                                                               \
  }

TM_RMS(f16, __half, f16, __half)
TM_RMS(f16, __half, bf16, __nv_bfloat16)
TM_RMS(f16, __half, f32, float)
TM_RMS(bf16, __nv_bfloat16, f16, __half)
TM_RMS(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
TM_RMS(bf16, __nv_bfloat16, f32, float)
TM_ROPE(f16, __half, f16, __half)
TM_ROPE(f16, __half, bf16, __nv_bfloat16)
TM_ROPE(f16, __half, f32, float)
TM_ROPE(bf16, __nv_bfloat16, f16, __half)
TM_ROPE(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
TM_ROPE(bf16, __nv_bfloat16, f32, float)
TM_SILU(f16, __half)
TM_SILU(bf16, __nv_bfloat16)
