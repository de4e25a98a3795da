// Group-wise int4/int8 dequantization to a dense T[O, I] matrix (T = fp16, bf16 or fp32), for batches
// too large for the fused GEMV (the product then goes to cuBLAS).
//
//   out[o, i] = T(q[o, i] * scale[o, i / gs] + zero[o, i / gs])   computed in fp32 (fmaf: q * s is exact)
//
// which is bit-identical to kernels/reference.py::dequantize. Layout in kernels/quant.py.
#include "common.cuh"

namespace tiermem {

// Code of column i within an 8-byte unit (int4: byte i / 2, low nibble = even column).
template <int BITS>
__device__ __forceinline__ float unit_code(uint2 q, int i) {
  const unsigned int word = (BITS == 4 ? i / 8 : i / 4) == 0 ? q.x : q.y;
  const int shift = BITS == 4 ? 4 * (i % 8) : 8 * (i % 4);
  return static_cast<float>((word >> shift) & ((1u << BITS) - 1u));
}

// Vector path: one thread per 8 bytes of qdata (16 int4 or 8 int8 columns of one row); the row length
// in bytes is a multiple of 8 and `out` 16-byte aligned. Stores are 16-byte wide.
template <int BITS, typename T>
__device__ __forceinline__ void dequant_vec(const uint2* __restrict__ qdata, const __half* __restrict__ scale,
                                            const __half* __restrict__ zero, T* __restrict__ out, int I,
                                            int gs, unsigned int units_per_row, unsigned int total_units) {
  constexpr int COLS = 64 / BITS;  // columns per unit
  const int groups = I / gs;
  const bool one_group = gs % COLS == 0;  // the unit's columns share a group
  const unsigned int stride = gridDim.x * blockDim.x;
  for (unsigned int u = blockIdx.x * blockDim.x + threadIdx.x; u < total_units; u += stride) {
    const unsigned int row = u / units_per_row;
    const int col0 = static_cast<int>(u - row * units_per_row) * COLS;
    const uint2 q = qdata[u];
    const __half* srow = scale + static_cast<size_t>(row) * groups;
    const __half* zrow = zero + static_cast<size_t>(row) * groups;
    float v[COLS];
    if (one_group) {
      const float s = __half2float(srow[col0 / gs]), z = __half2float(zrow[col0 / gs]);
#pragma unroll
      for (int i = 0; i < COLS; ++i) v[i] = fmaf(unit_code<BITS>(q, i), s, z);
    } else {
#pragma unroll
      for (int i = 0; i < COLS; ++i) {
        const int grp = (col0 + i) / gs;
        v[i] = fmaf(unit_code<BITS>(q, i), __half2float(srow[grp]), __half2float(zrow[grp]));
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(out + static_cast<size_t>(row) * I + col0);
    constexpr int PER_VEC = 16 / sizeof(T);  // elements per 16-byte store
#pragma unroll
    for (int k = 0; k < COLS / PER_VEC; ++k) {
      uint4 w;
      if constexpr (sizeof(T) == 4) {
        w = make_uint4(__float_as_uint(v[4 * k]), __float_as_uint(v[4 * k + 1]), __float_as_uint(v[4 * k + 2]),
                       __float_as_uint(v[4 * k + 3]));
      } else {
        w = make_uint4(pack2<T>(v[8 * k], v[8 * k + 1]), pack2<T>(v[8 * k + 2], v[8 * k + 3]),
                       pack2<T>(v[8 * k + 4], v[8 * k + 5]), pack2<T>(v[8 * k + 6], v[8 * k + 7]));
      }
      dst[k] = w;
    }
  }
}

// Scalar path, any shape: one thread per qdata byte (2 int4 columns or 1 int8 column).
template <int BITS, typename T>
__device__ __forceinline__ void dequant_scalar(const unsigned char* __restrict__ qdata,
                                               const __half* __restrict__ scale, const __half* __restrict__ zero,
                                               T* __restrict__ out, int I, int gs, unsigned int row_bytes,
                                               unsigned int total_bytes) {
  constexpr int COLS = 8 / BITS;
  const int groups = I / gs;
  const unsigned int stride = gridDim.x * blockDim.x;
  for (unsigned int b = blockIdx.x * blockDim.x + threadIdx.x; b < total_bytes; b += stride) {
    const unsigned int row = b / row_bytes;
    const int col0 = static_cast<int>(b - row * row_bytes) * COLS;
    const unsigned int byte = qdata[b];
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
      const int col = col0 + i;
      const size_t g = static_cast<size_t>(row) * groups + col / gs;
      const float code = static_cast<float>((byte >> (BITS * i)) & ((1u << BITS) - 1u));
      out[static_cast<size_t>(row) * I + col] =
          from_float<T>(fmaf(code, __half2float(scale[g]), __half2float(zero[g])));
    }
  }
}

}  // namespace tiermem

#define TM_DEQUANT(BITS, TN, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                                          \
      dequant_int##BITS##_##TN##_vec(const uint2* __restrict__ qdata, const __half* __restrict__ scale,      \
                                     const __half* __restrict__ zero, T* __restrict__ out, int I, int gs,    \
                                     unsigned int units_per_row, unsigned int total_units) {                 \
    tiermem::dequant_vec<BITS, T>(qdata, scale, zero, out, I, gs, units_per_row, total_units);              \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) dequant_int##BITS##_##TN##_scalar(                      \
      const unsigned char* __restrict__ qdata, const __half* __restrict__ scale,                             \
      const __half* __restrict__ zero, T* __restrict__ out, int I, int gs, unsigned int row_bytes,           \
      unsigned int total_bytes) {                                                                            \
    tiermem::dequant_scalar<BITS, T>(qdata, scale, zero, out, I, gs, row_bytes, total_bytes);               \
  }

TM_DEQUANT(4, f16, __half)
TM_DEQUANT(4, bf16, __nv_bfloat16)
TM_DEQUANT(4, f32, float)
TM_DEQUANT(8, f16, __half)
TM_DEQUANT(8, bf16, __nv_bfloat16)
TM_DEQUANT(8, f32, float)
