// quant_gemv (gemv.cuh) over one weight: blockIdx.x = a block of output rows, blockIdx.y = a chunk of 8 * NT rows of
// the batch.
#include "gemv.cuh"

#define TM_GEMV(NAME, BITS, T, GENERAL, U, MT, NT, MINB)                                                          \
  extern "C" __global__ void __launch_bounds__(256, MINB)                                                         \
      NAME(const uint4* __restrict__ qdata, const __half* __restrict__ scale,                                     \
           const __half* __restrict__ zero, const T* __restrict__ x, const T* __restrict__ bias,                  \
           T* __restrict__ y, int O, int I, int gs, int batch, int cpg_shift) {                                   \
    tiermem::quant_gemv<BITS, T, GENERAL, U, MT, NT>(qdata, scale, zero, x, bias, y, O, I, gs, batch, cpg_shift,  \
                                                     8 * NT * blockIdx.y);                                        \
  }

TM_GEMV_VARIANTS(TM_GEMV, quant_gemv, 4, f16, __half, 4)
TM_GEMV_VARIANTS(TM_GEMV, quant_gemv, 4, bf16, __nv_bfloat16, 3)
TM_GEMV_VARIANTS(TM_GEMV, quant_gemv, 8, f16, __half, 4)
TM_GEMV_VARIANTS(TM_GEMV, quant_gemv, 8, bf16, __nv_bfloat16, 4)
