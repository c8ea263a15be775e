// Plain C++ API of the CUDA kernels (csrc/flora_cuda.cu): raw pointers, sizes and a stream.
// No torch types here, so the .cu compiles with nvcc alone; the torch binding lives in
// csrc/flora_cuda_binding.cpp. All tensors are contiguous, row-major, and (except `base`/`out`
// of reconstruct) of one dtype. Accumulation is in fp32 (fp64 for fp64 inputs).
//
// Every launcher returns cudaSuccess or the error of the launch (cudaErrorInvalidValue for
// arguments it cannot handle, e.g. a reconstruct row buffer beyond shared memory).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "flora_common.h"

namespace flora {
namespace cuda {

enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Largest r1 * T the reconstruct kernel keeps in shared memory (per row of u0).
int64_t reconstruct_max_row(DType core_dt);

// out[i, j, t] = base[i, j, t] + scale * sum_{a,b} u0[i, a] core[a, b, t] u1[j, b]; base may be null.
// core/u0/u1 in core_dt; base/out in out_dt. core (r0, r1, T), u0 (I0, r0), u1 (I1, r1), out (I0, I1, T).
cudaError_t reconstruct(DType core_dt, DType out_dt, const void* core, const void* u0, const void* u1,
                        const void* base, void* out, int64_t r0, int64_t r1, int64_t T, int64_t I0, int64_t I1,
                        double scale, cudaStream_t stream);

// Adjoint of reconstruct (without base): dcore, du0, du1 from grad (I0, I1, T), all in dt.
// ws_q: I0 * r1 * T and ws_r: I1 * r0 * T accumulator elements (float; double for F64).
cudaError_t reconstruct_backward(DType dt, const void* grad, const void* core, const void* u0, const void* u1,
                                 void* dcore, void* du0, void* du1, void* ws_q, void* ws_r, int64_t r0, int64_t r1,
                                 int64_t T, int64_t I0, int64_t I1, double scale, cudaStream_t stream);

// out[r, o, p] (= or +=) alpha * mask_out * sum_c w[g * w_gs + o * ws_o + c * ws_c] * mask_in * in[r, c, p]
// with g = r % groups; in (R, C, P), out (R, O, P); the masks index the flat element of in / out.
cudaError_t mix(DType dt, const void* in, const void* w, int64_t groups, int64_t w_gs, int64_t ws_o, int64_t ws_c,
                void* out, int64_t R, int64_t C, int64_t O, int64_t P, double alpha, bool accumulate, DropParams din,
                DropParams dout, cudaStream_t stream);

// out[c, k] = alpha * sum_{r,p} mask * a[r, c, p] * b[r, k, p]; a (R, C, P), b (R, K, P), out (C, K);
// per_group: out (groups, C, K), block g summing only the rows r with r % groups == g.
cudaError_t corr(DType dt, const void* a, const void* b, void* out, int64_t R, int64_t C, int64_t K, int64_t P,
                 int64_t groups, bool per_group, double alpha, DropParams da, cudaStream_t stream);

// out[i] = the dropout multiplier of element i (0 or 1 / (1 - p)).
cudaError_t dropout_mask(DType dt, void* out, int64_t n, DropParams d, cudaStream_t stream);

}  // namespace cuda
}  // namespace flora
