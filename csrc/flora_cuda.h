// Plain C++ API of the CUDA kernels (csrc/flora_cuda.cu): raw pointers, sizes, element strides and a
// stream. No torch types here, so the .cu compiles with nvcc alone; the torch binding lives in
// csrc/flora_cuda_binding.cpp. Accumulation is in fp32 (fp64 when an operand is fp64); bf16/fp16
// products run on tensor cores (mma.sync m16n8k16, sm_80+).
//
// Every launcher returns cudaSuccess or the error of the launch (cudaErrorInvalidValue for
// arguments it cannot handle: a size of 2^31 elements or more along one GEMM dimension, more than
// 65535 groups).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "flora_common.h"

namespace flora {
namespace cuda {

enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Bytes of the fp32 (fp64 for F64) partial sums reconstruct needs (ws of reconstruct).
int64_t reconstruct_workspace_bytes(DType core_dt, int64_t r0, int64_t r1, int64_t T, int64_t I0);

// out[i, j, t] = base[i, j, t] + scale * sum_{a,b} u0[i, a] core[a, b, t] u1[j, b]; base may be null.
// core/u0/u1 in core_dt; base/out in out_dt. core (r0, r1, T), u0 (I0, r0), u1 (I1, r1), out (I0, I1, T),
// all contiguous. Two GEMMs: Pi = scale * u0 core (I0, r1 T) into ws, then out = base + Pi x_1 u1.
cudaError_t reconstruct(DType core_dt, DType out_dt, const void* core, const void* u0, const void* u1,
                        const void* base, void* out, void* ws, int64_t r0, int64_t r1, int64_t T, int64_t I0,
                        int64_t I1, double scale, cudaStream_t stream);

// Adjoint of reconstruct (without base): dcore, du0, du1 from grad (I0, I1, T), all in dt, contiguous.
// ws_q: I0 * r1 * T and ws_r: I1 * r0 * T accumulator elements (float; double for F64); ws_c:
// reconstruct_backward_workspace_bytes (the split partials of the long reductions; may be null
// when that is 0).
int64_t reconstruct_backward_workspace_bytes(DType dt, int64_t r0, int64_t r1, int64_t T, int64_t I0, int64_t I1);
cudaError_t reconstruct_backward(DType dt, const void* grad, const void* core, const void* u0, const void* u1,
                                 void* dcore, void* du0, void* du1, void* ws_q, void* ws_r, void* ws_c, int64_t r0,
                                 int64_t r1, int64_t T, int64_t I0, int64_t I1, double scale, cudaStream_t stream);

// out[n, g, o, p] (= or +=) bias[g * O + o] + alpha * mask_out * sum_c w[g * w_gs + o * ws_o + c * ws_c] *
// mask_in * in[n, g, c, p]. in, out: the strided views iv, ov (ov.c = O; equal n, groups, p), e.g. both
// channels_last; bias (groups * O) or null; mask_in indexes the logical element of in, mask_out the
// logical element of out (Act). ws: mix_workspace_bytes (split-k partials of a Linear-shaped
// reduction; null when that is 0).
int64_t mix_workspace_bytes(DType dt, const Act& iv, const Act& ov, const void* bias, bool accumulate,
                            const DropParams& dout);
cudaError_t mix(DType dt, const void* in, const Act& iv, const void* w, int64_t w_gs, int64_t ws_o, int64_t ws_c,
                void* out, const Act& ov, const void* bias, double alpha, bool accumulate, DropParams din,
                DropParams dout, void* ws, cudaStream_t stream);

// out[c, k] = alpha * sum_{n,g,p} mask * a[n, g, c, p] * b[n, g, k, p] (out (C, K)); per_group: out
// (groups, C, K), slice g summing only group g. a, b strided views with equal n, groups, p.
// Token reductions are split over the (n, p) axis: ws holds the fp32 (fp64) partials.
int64_t corr_workspace_bytes(DType dt, const Act& av, const Act& bv, bool per_group);
cudaError_t corr(DType dt, const void* a, const Act& av, const void* b, const Act& bv, void* out, bool per_group,
                 double alpha, DropParams da, void* ws, cudaStream_t stream);

// The two Linear gradients that read dy: ds = dy b (M, r) and db = dy^T s (O, r); dy (M, O), s (M, r),
// b (O, r) contiguous. dy is processed in chunks of chunk_rows tokens (0: about 8 MiB of dy, so a
// chunk stays in L2): ds of the chunk streams it from memory, db of the chunk re-reads it from L2;
// db's partials (per chunk and split) go to ws (linear_grad_workspace_bytes) and are summed at the end.
int64_t linear_grad_workspace_bytes(DType dt, int64_t M, int64_t O, int64_t r, int64_t chunk_rows);
cudaError_t linear_grad(DType dt, const void* dy, const void* s, const void* b, void* ds, void* db, int64_t M,
                        int64_t O, int64_t r, int64_t chunk_rows, void* ws, cudaStream_t stream);

// A 2-D conv with one group and zero padding (a 1-D conv is the case in_h = out_h = k_h = 1); pad_* is
// the low side (the high side only shows in out_*).
struct ConvShape {
  int64_t n, in_h, in_w, out_h, out_w, k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_h, pad_w;
};
// A 4-D activation (N, c, H, W) by its strides (a 1-D one: H = 1, sh unused).
struct Act4 {
  int64_t c, sn, sc, sh, sw;
};

// The most channels conv_mix's result (u / dz) may have: one 64 x 32 tile of it stays in shared memory.
constexpr int64_t kConvMixMaxRank = 32;

// The fused core conv and expansion, one kernel, one block per 64 rows of the result.
// Forward (transposed = false): mid = u = conv(src = z, k) (N, R = r_out, out_h, out_w), then out = y
//   (N, C, out_h, out_w) += alpha * f . u, f = U_out (C, R).
// Backward (transposed = true): mid = dz = the input gradient of that conv for src = du (N, r_out, out_h,
//   out_w), (N, R = r_in, in_h, in_w), then out = dx (N, C, in_h, in_w) += mask * (f . dz), f = U_in (C, R);
//   the mask (dd) indexes dx's logical elements (as mix's output mask).
// kp: the core kernel as (R, k_h, k_w, C_src) contiguous (C_src = sv.c: r_in forward, r_out backward);
// f contiguous; mid and out through their views mv / ov (groups 1; mv.c = R <= kConvMixMaxRank, ov.c = C).
// u / dz is rounded to dt once, written out and used for the expansion.
cudaError_t conv_mix(DType dt, bool transposed, const ConvShape& cs, const void* src, const Act4& sv, const void* kp,
                     void* mid, const Act& mv, const void* f, void* out, const Act& ov, double alpha, DropParams dd,
                     cudaStream_t stream);

// out[i] = the dropout multiplier of element i (0 or 1 / (1 - p)); out contiguous.
cudaError_t dropout_mask(DType dt, void* out, int64_t n, DropParams d, cudaStream_t stream);

}  // namespace cuda
}  // namespace flora
