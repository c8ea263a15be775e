// CUDA kernels of the flora ops. No torch headers: raw pointers + a stream (API in flora_cuda.h).
// Accumulation in fp32 (fp64 for fp64 tensors); 64-bit index arithmetic throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "flora_cuda.h"

namespace flora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr int64_t kSmemBytes = 48 * 1024;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

int64_t blocks_for(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)); }

// Sum over the block (blockDim.x == kThreads); the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  __syncthreads();  // a previous call may still be reading warp_sums
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : A(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ---- reconstruct -------------------------------------------------------------------------------
// Block (i, y): Pi[b, t] = scale * sum_a u0[i, a] core[a, b, t] in shared memory, then the row
// out[i, :, :] (I1 * T elements, coalesced) split over gridDim.y blocks.
template <typename core_t, typename out_t>
__global__ void reconstruct_kernel(const core_t* __restrict__ core, const core_t* __restrict__ u0,
                                   const core_t* __restrict__ u1, const out_t* __restrict__ base,
                                   out_t* __restrict__ out, int64_t r0, int64_t r1, int64_t T, int64_t I1,
                                   double scale) {
  using A = acc_of<core_t>;
  using S = typename std::conditional<std::is_same<out_t, double>::value, double, A>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* Pi = reinterpret_cast<A*>(smem_raw);
  const int64_t i = blockIdx.x, RT = r1 * T, row = I1 * T;
  for (int64_t bt = threadIdx.x; bt < RT; bt += blockDim.x) {
    A acc = 0;
    for (int64_t a = 0; a < r0; ++a) acc += to_acc(u0[i * r0 + a]) * to_acc(core[a * RT + bt]);
    Pi[bt] = acc * static_cast<A>(scale);
  }
  __syncthreads();
  for (int64_t e = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; e < row; e += (int64_t)gridDim.y * blockDim.x) {
    const int64_t j = e / T, t = e - j * T;
    A acc = 0;
    for (int64_t b = 0; b < r1; ++b) acc += to_acc(u1[j * r1 + b]) * Pi[b * T + t];
    const int64_t idx = i * row + e;
    out[idx] = base ? from_acc<out_t>(static_cast<S>(to_acc(base[idx])) + static_cast<S>(acc)) : from_acc<out_t>(acc);
  }
}

// Q[i, b, t] = sum_j g[i, j, t] u1[j, b] (grid I0): tile of RT outputs x parts of j, reduced in smem.
// With transpose = true: Rm[j, a, t] = sum_i g[i, j, t] u0[i, a] (grid I1), the same pattern.
template <typename T, bool transpose>
__global__ void contract_kernel(const T* __restrict__ g, const T* __restrict__ u, acc_of<T>* __restrict__ q,
                                int64_t n_rows, int64_t n_red, int64_t r, int64_t Tt) {
  using A = acc_of<T>;
  __shared__ A part_sums[kThreads];
  const int64_t row = blockIdx.x, RT = r * Tt;
  const int64_t tile = RT < kThreads ? RT : kThreads;
  const int64_t nparts = kThreads / tile;
  const int64_t lane = threadIdx.x % tile, part = threadIdx.x / tile;
  for (int64_t bt0 = 0; bt0 < RT; bt0 += tile) {
    const int64_t bt = bt0 + lane;
    A acc = 0;
    if (part < nparts && bt < RT) {
      const int64_t b = bt / Tt, t = bt - b * Tt;
      for (int64_t j = part; j < n_red; j += nparts) {
        // transpose: g[j, row, t] (j runs over I0); else g[row, j, t] (j runs over I1).
        const int64_t gi = transpose ? (j * n_rows + row) * Tt + t : (row * n_red + j) * Tt + t;
        acc += to_acc(g[gi]) * to_acc(u[j * r + b]);
      }
    }
    part_sums[threadIdx.x] = acc;
    __syncthreads();
    if (part == 0 && bt < RT) {
      A s = 0;
      for (int64_t p = 0; p < nparts; ++p) s += part_sums[p * tile + lane];
      q[row * RT + bt] = s;
    }
    __syncthreads();
  }
}

// dcore[a, bt] = scale * sum_i u0[i, a] Q[i, bt]: one block per output.
template <typename T>
__global__ void dcore_kernel(const T* __restrict__ u0, const acc_of<T>* __restrict__ q, T* __restrict__ dcore,
                             int64_t r0, int64_t RT, int64_t I0, double scale) {
  using A = acc_of<T>;
  const int64_t a = blockIdx.x / RT, bt = blockIdx.x % RT;
  A acc = 0;
  for (int64_t i = threadIdx.x; i < I0; i += blockDim.x) acc += to_acc(u0[i * r0 + a]) * q[i * RT + bt];
  acc = block_sum(acc);
  if (threadIdx.x == 0) dcore[blockIdx.x] = from_acc<T>(acc * static_cast<A>(scale));
}

// du0[i, a] = scale * sum_bt Q[i, bt] core[a, bt]
template <typename T>
__global__ void du0_kernel(const acc_of<T>* __restrict__ q, const T* __restrict__ core, T* __restrict__ du0,
                           int64_t I0, int64_t r0, int64_t RT, double scale) {
  using A = acc_of<T>;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < I0 * r0;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx / r0, a = idx - i * r0;
    A acc = 0;
    for (int64_t bt = 0; bt < RT; ++bt) acc += q[i * RT + bt] * to_acc(core[a * RT + bt]);
    du0[idx] = from_acc<T>(acc * static_cast<A>(scale));
  }
}

// du1[j, b] = scale * sum_{a,t} Rm[j, a, t] core[a, b, t]
template <typename T>
__global__ void du1_kernel(const acc_of<T>* __restrict__ rm, const T* __restrict__ core, T* __restrict__ du1,
                           int64_t I1, int64_t r0, int64_t r1, int64_t Tt, double scale) {
  using A = acc_of<T>;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < I1 * r1;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = idx / r1, b = idx - j * r1;
    A acc = 0;
    for (int64_t a = 0; a < r0; ++a)
      for (int64_t t = 0; t < Tt; ++t) acc += rm[(j * r0 + a) * Tt + t] * to_acc(core[(a * r1 + b) * Tt + t]);
    du1[idx] = from_acc<T>(acc * static_cast<A>(scale));
  }
}

// ---- adapter pieces ----------------------------------------------------------------------------
template <typename T>
__global__ void mix_kernel(const T* __restrict__ in, const T* __restrict__ w, int64_t groups, int64_t w_gs,
                           int64_t ws_o, int64_t ws_c, T* out, int64_t R, int64_t C, int64_t O, int64_t P,
                           double alpha, bool accumulate, DropParams din, DropParams dout) {
  using A = acc_of<T>;
  const int64_t n = R * O * P;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx % P, ro = idx / P, o = ro % O, r = ro / O;
    const int64_t ibase = r * C * P + p;
    const T* wr = w + (r % groups) * w_gs + o * ws_o;
    A acc = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ii = ibase + c * P;
      acc += to_acc(wr[c * ws_c]) * to_acc(in[ii]) * drop_scale<A>(din, ii);
    }
    const A v = acc * static_cast<A>(alpha) * drop_scale<A>(dout, idx);
    out[idx] = accumulate ? from_acc<T>(to_acc(out[idx]) + v) : from_acc<T>(v);
  }
}

// Weight gradients out[(g,) c, k] = alpha * sum mask * a[r, c, p] * b[r, k, p], over the rows r of
// group g (per_group) or all rows. Each thread keeps kKC partial sums (a chunk of k) in registers,
// so `a` is read once per chunk of 16 k's and every read is coalesced.
constexpr int kKC = 16;

// P == 1 (Linear): block = 32 consecutive channels c (one per lane) x 8 warps splitting the rows.
template <typename T>
__global__ void corr_p1_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t R,
                               int64_t C, int64_t K, int64_t groups, bool per_group, double alpha, DropParams da) {
  using A = acc_of<T>;
  constexpr int kWarps = kThreads / 32;
  __shared__ A red[kWarps][32][kKC + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t g = blockIdx.y, c = (int64_t)blockIdx.x * 32 + lane;
  const int64_t rows = per_group ? R / groups : R;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    A acc[kKC];
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) acc[kk] = A(0);
    if (c < C) {
      for (int64_t rr = warp; rr < rows; rr += kWarps) {
        const int64_t r = per_group ? g + rr * groups : rr;
        const int64_t ia = r * C + c;
        const A av = to_acc(a[ia]) * drop_scale<A>(da, ia);
        const T* br = b + r * K + k0;
#pragma unroll
        for (int kk = 0; kk < kKC; ++kk)
          if (k0 + kk < K) acc[kk] += av * to_acc(br[kk]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) red[warp][lane][kk] = acc[kk];
    __syncthreads();
    for (int e = threadIdx.x; e < 32 * kKC; e += blockDim.x) {
      const int l = e / kKC, kk = e % kKC;
      const int64_t cc = (int64_t)blockIdx.x * 32 + l;
      if (cc < C && k0 + kk < K) {
        A sum = 0;
        for (int w = 0; w < kWarps; ++w) sum += red[w][l][kk];
        out[(g * C + cc) * K + k0 + kk] = from_acc<T>(sum * static_cast<A>(alpha));
      }
    }
    __syncthreads();
  }
}

// P > 1 (conv): one block per (c, g); threads stride over (rows x positions), coalesced over p.
template <typename T>
__global__ void corr_sp_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t R,
                               int64_t C, int64_t K, int64_t P, int64_t groups, bool per_group, double alpha,
                               DropParams da) {
  using A = acc_of<T>;
  const int64_t c = blockIdx.x, g = blockIdx.y;
  const int64_t rows = per_group ? R / groups : R, n = rows * P;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    A acc[kKC];
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) acc[kk] = A(0);
    for (int64_t m = threadIdx.x; m < n; m += blockDim.x) {
      const int64_t rr = m / P, p = m - rr * P;
      const int64_t r = per_group ? g + rr * groups : rr;
      const int64_t ia = (r * C + c) * P + p;
      const A av = to_acc(a[ia]) * drop_scale<A>(da, ia);
      const T* br = b + (r * K + k0) * P + p;
#pragma unroll
      for (int kk = 0; kk < kKC; ++kk)
        if (k0 + kk < K) acc[kk] += av * to_acc(br[kk * P]);
    }
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) {
      const A sum = block_sum(acc[kk]);
      if (threadIdx.x == 0 && k0 + kk < K) out[(g * C + c) * K + k0 + kk] = from_acc<T>(sum * static_cast<A>(alpha));
    }
  }
}

template <typename T>
__global__ void dropout_mask_kernel(T* out, int64_t n, DropParams d) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_acc<T>(drop_scale<acc_of<T>>(d, i));
}

template <typename F>
cudaError_t with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t reconstruct_max_row(DType core_dt) {
  return kSmemBytes / (core_dt == DType::F64 ? static_cast<int64_t>(sizeof(double)) : static_cast<int64_t>(sizeof(float)));
}

cudaError_t reconstruct(DType core_dt, DType out_dt, const void* core, const void* u0, const void* u1,
                        const void* base, void* out, int64_t r0, int64_t r1, int64_t T, int64_t I0, int64_t I1,
                        double scale, cudaStream_t stream) {
  if (r1 * T > reconstruct_max_row(core_dt) || I0 > 0x7fffffffLL) return cudaErrorInvalidValue;
  return with_type(core_dt, [&](auto core_tag) {
    using CT = decltype(core_tag);
    return with_type(out_dt, [&](auto out_tag) {
      using OT = decltype(out_tag);
      const int64_t row = I1 * T;
      const int64_t gy = std::max<int64_t>(1, std::min<int64_t>((row + kThreads - 1) / kThreads, 65535));
      const size_t smem = static_cast<size_t>(r1 * T) * sizeof(acc_of<CT>);
      reconstruct_kernel<CT, OT><<<dim3(static_cast<unsigned>(I0), static_cast<unsigned>(gy)), kThreads, smem, stream>>>(
          static_cast<const CT*>(core), static_cast<const CT*>(u0), static_cast<const CT*>(u1),
          static_cast<const OT*>(base), static_cast<OT*>(out), r0, r1, T, I1, scale);
      return cudaGetLastError();
    });
  });
}

cudaError_t reconstruct_backward(DType dt, const void* grad, const void* core, const void* u0, const void* u1,
                                 void* dcore, void* du0, void* du1, void* ws_q, void* ws_r, int64_t r0, int64_t r1,
                                 int64_t T, int64_t I0, int64_t I1, double scale, cudaStream_t stream) {
  if (I0 > 0x7fffffffLL || I1 > 0x7fffffffLL || r0 * r1 * T > 0x7fffffffLL) return cudaErrorInvalidValue;
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    using A = acc_of<TT>;
    const TT* g = static_cast<const TT*>(grad);
    A* q = static_cast<A*>(ws_q);
    A* rm = static_cast<A*>(ws_r);
    contract_kernel<TT, false><<<static_cast<unsigned>(I0), kThreads, 0, stream>>>(g, static_cast<const TT*>(u1), q,
                                                                                    I0, I1, r1, T);
    contract_kernel<TT, true><<<static_cast<unsigned>(I1), kThreads, 0, stream>>>(g, static_cast<const TT*>(u0), rm,
                                                                                   I1, I0, r0, T);
    dcore_kernel<TT><<<static_cast<unsigned>(r0 * r1 * T), kThreads, 0, stream>>>(
        static_cast<const TT*>(u0), q, static_cast<TT*>(dcore), r0, r1 * T, I0, scale);
    du0_kernel<TT><<<static_cast<unsigned>(blocks_for(I0 * r0)), kThreads, 0, stream>>>(
        q, static_cast<const TT*>(core), static_cast<TT*>(du0), I0, r0, r1 * T, scale);
    du1_kernel<TT><<<static_cast<unsigned>(blocks_for(I1 * r1)), kThreads, 0, stream>>>(
        rm, static_cast<const TT*>(core), static_cast<TT*>(du1), I1, r0, r1, T, scale);
    return cudaGetLastError();
  });
}

cudaError_t mix(DType dt, const void* in, const void* w, int64_t groups, int64_t w_gs, int64_t ws_o, int64_t ws_c,
                void* out, int64_t R, int64_t C, int64_t O, int64_t P, double alpha, bool accumulate, DropParams din,
                DropParams dout, cudaStream_t stream) {
  if (groups < 1) return cudaErrorInvalidValue;
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    mix_kernel<TT><<<static_cast<unsigned>(blocks_for(R * O * P)), kThreads, 0, stream>>>(
        static_cast<const TT*>(in), static_cast<const TT*>(w), groups, w_gs, ws_o, ws_c, static_cast<TT*>(out), R, C,
        O, P, alpha, accumulate, din, dout);
    return cudaGetLastError();
  });
}

cudaError_t corr(DType dt, const void* a, const void* b, void* out, int64_t R, int64_t C, int64_t K, int64_t P,
                 int64_t groups, bool per_group, double alpha, DropParams da, cudaStream_t stream) {
  const int64_t gy = per_group ? groups : 1;
  if (groups < 1 || R % groups != 0 || gy > 65535 || C > 0x7fffffffLL) return cudaErrorInvalidValue;
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    if (P == 1) {
      const dim3 grid(static_cast<unsigned>((C + 31) / 32), static_cast<unsigned>(gy));
      corr_p1_kernel<TT><<<grid, kThreads, 0, stream>>>(static_cast<const TT*>(a), static_cast<const TT*>(b),
                                                          static_cast<TT*>(out), R, C, K, groups, per_group, alpha, da);
    } else {
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(gy));
      corr_sp_kernel<TT><<<grid, kThreads, 0, stream>>>(static_cast<const TT*>(a), static_cast<const TT*>(b),
                                                          static_cast<TT*>(out), R, C, K, P, groups, per_group, alpha,
                                                          da);
    }
    return cudaGetLastError();
  });
}

cudaError_t dropout_mask(DType dt, void* out, int64_t n, DropParams d, cudaStream_t stream) {
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    dropout_mask_kernel<TT><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(static_cast<TT*>(out), n, d);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace flora
