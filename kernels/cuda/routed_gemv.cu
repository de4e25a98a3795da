// quant_gemv (gemv.cuh) over a mixture's experts, the experts read on the GPU (no host sync, the same launch for
// every routing: a CUDA graph can capture it).
//
//   y[m, p, r, o] = sum_i x[p / x_div, r, i] * W[m, e][o, i],  e = experts[p],  p < picks,  r < rows,  m < gridDim.z
//
// Pick p is one expert's share of the launch: a (token, expert) pair of the router's top_k (rows = 1), or one expert
// taking every row of the step (engine.moe.all_experts: experts = 0..E-1, rows = the step's rows). blockIdx.y = p *
// chunks + c, c a chunk of 8 * NT of the pick's rows (chunks = ceil(rows / (8 * NT))); m (blockIdx.z) is one of the
// expert's matrices taken in the launch (gate and up, which read the same x; or down alone); blockIdx.x is a block of
// output rows, as in gemv.cu. tables: int64 [M][3][E], the addresses of W[m, e]'s codes, scales and zeros (the
// layout of kernels/quant.py; every W[m, e] of one launch has the shape [O, I]). x [picks / x_div, rows, I] (x_div
// picks per block of rows: top_k for the picks' gate and up, whose x is the token's; E for all_experts' gate and
// up; 1 for down, whose x is the pick's own), y [M, picks, rows, O]; fp16 or bf16.
#include "gemv.cuh"

#define TM_ROUTED_GEMV(NAME, BITS, T, GENERAL, U, MT, NT, MINB)                                                   \
  extern "C" __global__ void __launch_bounds__(256, MINB)                                                         \
      NAME(const long long* __restrict__ tables, const long long* __restrict__ experts, int num_experts,          \
           const T* __restrict__ x, T* __restrict__ y, int O, int I, int gs, int picks, int x_div, int rows,      \
           int cpg_shift) {                                                                                       \
    const int chunks = (rows + 8 * NT - 1) / (8 * NT);                                                            \
    const int p = blockIdx.y / chunks, c = blockIdx.y % chunks, m = blockIdx.z;                                   \
    const long long e = experts[p];                                                                               \
    const long long* w = tables + static_cast<size_t>(m) * 3 * num_experts + e;                                   \
    tiermem::quant_gemv<BITS, T, GENERAL, U, MT, NT>(                                                             \
        reinterpret_cast<const uint4*>(w[0]), reinterpret_cast<const __half*>(w[num_experts]),                    \
        reinterpret_cast<const __half*>(w[2 * num_experts]), x + static_cast<size_t>(p / x_div) * rows * I,       \
        nullptr, y + (static_cast<size_t>(m) * picks + p) * rows * O, O, I, gs, rows, cpg_shift, 8 * NT * c);     \
  }

// gemv.cu's variants and register caps, but int8 bf16 u2m1 one block lower (its table reads spilled at 4).
TM_GEMV_VARIANTS(TM_ROUTED_GEMV, routed_gemv, 4, f16, __half, 4)
TM_GEMV_VARIANTS(TM_ROUTED_GEMV, routed_gemv, 4, bf16, __nv_bfloat16, 3)
TM_GEMV_VARIANTS(TM_ROUTED_GEMV, routed_gemv, 8, f16, __half, 4)
TM_GEMV_VARIANTS(TM_ROUTED_GEMV, routed_gemv, 8, bf16, __nv_bfloat16, 3)
