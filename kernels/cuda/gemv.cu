// quant_gemv (gemv.cuh) over one weight: blockIdx.x = a block of output rows, blockIdx.y = a chunk of 8 * NT rows of
// the batch.
#include "gemv.cuh"

// MINB (blocks of 256 threads per SM) caps the registers so that no variant spills (ptxas -v). NT = 2 variants
// carry the suffix n2.
#define TM_GEMV(NAME, BITS, T, GENERAL, U, MT, NT, MINB)                                                          \
  extern "C" __global__ void __launch_bounds__(256, MINB)                                                         \
      NAME(const uint4* __restrict__ qdata, const __half* __restrict__ scale,                                     \
           const __half* __restrict__ zero, const T* __restrict__ x, const T* __restrict__ bias,                  \
           T* __restrict__ y, int O, int I, int gs, int batch, int cpg_shift) {                                   \
    tiermem::quant_gemv<BITS, T, GENERAL, U, MT, NT>(qdata, scale, zero, x, bias, y, O, I, gs, batch, cpg_shift,  \
                                                     8 * NT * blockIdx.y);                                        \
  }

// U2_MINB: blocks per SM for the u2m1 variant (int4 bf16 needs more registers for its split constants).
#define TM_GEMV_ALL(BITS, TN, T, U2_MINB)                                            \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u1m1, BITS, T, false, 1, 1, 1, 4)            \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u2m1, BITS, T, false, 2, 1, 1, U2_MINB)      \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u4m1, BITS, T, false, 4, 1, 1, 2)            \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u2m2, BITS, T, false, 2, 2, 1, 2)            \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_general, BITS, T, true, 1, 1, 1, 2)          \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u1m1n2, BITS, T, false, 1, 1, 2, 2)          \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u2m1n2, BITS, T, false, 2, 1, 2, 2)          \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u4m1n2, BITS, T, false, 4, 1, 2, 1)          \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_u2m2n2, BITS, T, false, 2, 2, 2, 1)          \
  TM_GEMV(quant_gemv_int##BITS##_##TN##_generaln2, BITS, T, true, 1, 1, 2, 1)

TM_GEMV_ALL(4, f16, __half, 4)
TM_GEMV_ALL(4, bf16, __nv_bfloat16, 3)
TM_GEMV_ALL(8, f16, __half, 4)
TM_GEMV_ALL(8, bf16, __nv_bfloat16, 4)
