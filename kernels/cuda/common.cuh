// Shared helpers for tiermem's CUDA kernels: scalar type conversions and packed loads.
// Included by the .cu files (NVRTC gets -I<this directory>).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace tiermem {

typedef unsigned int u32;

// std::is_same without <type_traits> (not every NVRTC has the standard headers).
template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

// Round a float to T and back: emulates torch computing one op in fp32 and storing it as T.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// Two floats -> one 32-bit word holding two T values (low half = a).
template <typename T> __device__ __forceinline__ u32 pack2(float a, float b);
template <> __device__ __forceinline__ u32 pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<u32*>(&h);
}
template <> __device__ __forceinline__ u32 pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<u32*>(&h);
}

// One 32-bit word holding two T values -> the floats (low half first).
template <typename T> __device__ __forceinline__ float2 unpack2(u32 w);
template <> __device__ __forceinline__ float2 unpack2<__half>(u32 w) {
  return __half22float2(*reinterpret_cast<__half2*>(&w));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(u32 w) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&w));
}

// 16-byte load of data read once (weights): bypass L1, hint a 256-byte L2 prefetch.
__device__ __forceinline__ uint4 load_stream16(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v, float* scratch32) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) scratch32[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch32[lane] : 0.0f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace tiermem
