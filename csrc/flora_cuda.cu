// CUDA kernels of the flora ops. No torch headers: raw pointers + a stream (API in flora_cuda.h).
//
// Every op is one or two launches of one tiled GEMM kernel (gemm_kernel): a block computes a
// 64 x 32 tile of D[m, n] = alpha * sum_k A[m, k] B[n, k] over its share of k, with
//   - operands addressed through separable index maps (Idx2: x -> (x / d, x % d) with a 32-bit
//     magic-number division computed on the host), so NCHW, channels_last, (i, j, taps) weights
//     and the token axis (n, p) of a conv are all read in place;
//   - 16-byte loads and stores along whichever tile axis is contiguous in memory (chosen on the
//     host from the strides and the alignment), a scalar path for the rest (odd sizes, tails);
//   - bf16/fp16 operands multiplied on tensor cores (mma.sync m16n8k16, fp32 accumulate, sm_80+),
//     fp32/fp64 and mixed operands on CUDA cores with the same accumulator layout;
//   - dropout fused: the input mask zeroes elements as they are staged (the 1 / (1 - p) factor
//     folds into alpha), the output mask is applied in the epilogue;
//   - the token reductions (factor grads) split over k into fp32 partials, summed by reduce_kernel.
// No 64-bit division and no IEEE division in device code (the SASS has no CALL.REL).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "flora_cuda.h"

#if defined(FLORA_HOST_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FLORA_MMA 1
#else
#define FLORA_MMA 0
#endif

namespace flora {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps; warp w owns rows 16w..16w+15 of the tile
constexpr int BM = 64, BN = 32, BK = 32;
constexpr int64_t kMaxDim = 0x7fffffffLL;
constexpr int64_t kMaxGrid = 65535;

template <typename T>
constexpr bool is16 = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
template <typename A, typename B>
using acc2 = typename std::conditional<std::is_same<A, double>::value || std::is_same<B, double>::value, double,
                                       float>::type;
template <typename T>
using acc_of = acc2<T, T>;
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector (= smem row pad)

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

FLORA_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// x / d for 0 <= x < 2^31 as umulhi(x, mul) >> shift, with mul = ceil(2^(31 + l) / d), l = ceil(log2 d)
// (round-up reciprocal; the error term is below 2^(31 + l) for every such x).
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t div) : d(static_cast<uint32_t>(div)) {
    if (d <= 1) {
      d = 1;
      return;
    }
    uint32_t l = 0;
    while ((1ull << l) < d) ++l;
    const uint64_t p = 31 + l;
    mul = static_cast<uint32_t>(((1ull << p) + d - 1) / d);
    shift = static_cast<uint32_t>(p - 32);
  }
  FLORA_HD uint32_t div(uint32_t x) const { return d == 1 ? x : umulhi32(x, mul) >> shift; }
};

// Index map of one tile axis: x -> (q, r) = (x / d, x % d); memory offset q * s_hi + r * s_lo and
// logical (dropout) index q * l_hi + r * l_lo.
struct Idx2 {
  FastDiv div;
  int64_t s_hi = 0, s_lo = 0, l_hi = 0, l_lo = 0;
  Idx2() = default;
  Idx2(int64_t d, int64_t sh, int64_t sl = 0, int64_t lh = 0, int64_t ll = 0)
      : div(d), s_hi(sh), s_lo(sl), l_hi(lh), l_lo(ll) {}
  // The memory / logical stride between x and x + 1 inside one run (runs never cross a multiple of d).
  FLORA_HD int64_t run_stride() const { return div.d > 1 ? s_lo : s_hi; }
  FLORA_HD int64_t run_lstride() const { return div.d > 1 ? l_lo : l_hi; }
};

struct Pos {
  int64_t mem, log;
};

__device__ __forceinline__ Pos at(const Idx2& ix, uint32_t x) {
  const uint32_t q = ix.div.div(x), r = x - q * ix.div.d;
  return {static_cast<int64_t>(q) * ix.s_hi + static_cast<int64_t>(r) * ix.s_lo,
          static_cast<int64_t>(q) * ix.l_hi + static_cast<int64_t>(r) * ix.l_lo};
}

// Vector direction of an operand or output tile: runs of kVec elements along k (the tile's column
// axis) or along the rows, or none (every element loaded on its own).
enum Vec : int { kNone = 0, kAlongCols = 1, kAlongRows = 2 };

struct Opnd {  // an input tile source: element (row, k) of group g at p + g * gs + row(row) + col(k)
  const void* p = nullptr;
  Idx2 row, col;
  int64_t gs = 0, lgs = 0;
  int vec = kNone;
};

struct Out {  // element (m, n) of group g, split s at p + (s + g * slice_g) * slice + g * gs + row(m) + col(n)
  void* p = nullptr;            // the output mask (dd) indexes g * lgs + the logical parts of row(m), col(n)
  const void* src = nullptr;   // added to the result (same layout; may be p itself), or null
  const void* bias = nullptr;  // bias[g * bias_gs + n] added to the result, or null
  int64_t bias_gs = 0;
  Idx2 row, col;
  int64_t gs = 0, lgs = 0, slice = 0, slice_g = 0;
  int vec = kNone;
};

struct GemmArgs {
  Opnd a, b;  // a: (M, K) tile rows m; b: (N, K) tile rows n
  Out d;      // (M, N)
  uint32_t M = 0, N = 0, K = 0, kchunk = 0;
  FastDiv splits;  // blockIdx.z = g * splits + split
  double alpha = 1.0;
  DropParams da, dd;  // mask on the elements of a (keep / zero; 1 / (1 - p) is in alpha), on d
};

template <typename T>
__device__ __forceinline__ void load_vec(T (&v)[kVec<T>], const T* p) {
  *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
}

// Stage rows [row0, row0 + ROWS) x k [k0, k0 + BK) of op into S (zero outside [0, nrows) x [k0, kend)).
template <int ROWS, bool kDrop, typename T>
__device__ __forceinline__ void load_tile(T (*S)[BK + kVec<T>], const Opnd& op, uint32_t row0, uint32_t nrows,
                                          uint32_t k0, uint32_t kend, uint32_t g, const DropParams& dp) {
  constexpr int V = kVec<T>;
  const T* base = static_cast<const T*>(op.p) + static_cast<int64_t>(g) * op.gs;
  const int64_t lbase = static_cast<int64_t>(g) * op.lgs;
  const bool along_rows = op.vec == kAlongRows;
  for (int e = threadIdx.x; e < ROWS * BK / V; e += kThreads) {
    // along_rows: consecutive threads take consecutive row runs of one k; else consecutive k runs of one row.
    const int rr = along_rows ? (e % (ROWS / V)) * V : e / (BK / V);
    const int kk = along_rows ? e / (ROWS / V) : (e % (BK / V)) * V;
    const uint32_t row = row0 + rr, k = k0 + kk;
    alignas(16) T v[V];
    const bool full = op.vec != kNone && (along_rows ? row + V <= nrows && k < kend : row < nrows && k + V <= kend);
    if (full) {
      const Pos pr = at(op.row, row), pk = at(op.col, k);
      load_vec(v, base + pr.mem + pk.mem);
      if (kDrop && dp.active) {
        const int64_t l0 = lbase + pr.log + pk.log, ls = along_rows ? op.row.run_lstride() : op.col.run_lstride();
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (!drop_keep(dp, l0 + i * ls)) v[i] = T{};
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const uint32_t ri = along_rows ? row + i : row, ki = along_rows ? k : k + i;
        v[i] = T{};
        if (ri < nrows && ki < kend) {
          const Pos pr = at(op.row, ri), pk = at(op.col, ki);
          if (!kDrop || drop_keep(dp, lbase + pr.log + pk.log)) v[i] = base[pr.mem + pk.mem];
        }
      }
    }
    if (along_rows) {
#pragma unroll
      for (int i = 0; i < V; ++i) S[rr + i][kk] = v[i];
    } else {
      *reinterpret_cast<uint4*>(&S[rr][kk]) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

#if FLORA_MMA
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(FLORA_HOST_EMU)
  emu::mma_m16n8k16<T>(c, a, b);
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
#endif

// Accumulators of a 64 x 32 tile in the mma.sync C layout: lane (gq, tq) of warp w holds rows
// 16w + gq (+8) and columns 8 nt + 2 tq (+1) of the tile, for nt = 0..3 (acc[nt][0..3]).
template <typename AccT>
__device__ __forceinline__ void zero_acc(AccT (&acc)[4][4]) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = AccT(0);
}

// acc += As (64 x BK) Bs^T (BK x 32) for the staged tiles: mma.sync for bf16/fp16 (kMma), else
// CUDA-core FMAs in Acc (fp32, fp64 if an operand is fp64) with the same accumulator layout.
template <bool kMma, typename TA, typename TB, typename AccT>
__device__ __forceinline__ void mma_tile(AccT (&acc)[4][4], const TA (*As)[BK + kVec<TA>], const TB (*Bs)[BK + kVec<TB>],
                                         int r_lo, int gq, int tq) {
  if constexpr (kMma) {
#if FLORA_MMA
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      const uint32_t a[4] = {ld32(&As[r_lo][kk + 2 * tq]), ld32(&As[r_lo + 8][kk + 2 * tq]),
                             ld32(&As[r_lo][kk + 2 * tq + 8]), ld32(&As[r_lo + 8][kk + 2 * tq + 8])};
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const uint32_t b[2] = {ld32(&Bs[nt * 8 + gq][kk + 2 * tq]), ld32(&Bs[nt * 8 + gq][kk + 2 * tq + 8])};
        mma16816<TA>(acc[nt], a, b);
      }
    }
#endif
  } else {
    using Acc = acc2<TA, TB>;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      const Acc a0 = static_cast<Acc>(to_acc(As[r_lo][kk])), a1 = static_cast<Acc>(to_acc(As[r_lo + 8][kk]));
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const Acc b0 = static_cast<Acc>(to_acc(Bs[nt * 8 + 2 * tq][kk]));
        const Acc b1 = static_cast<Acc>(to_acc(Bs[nt * 8 + 2 * tq + 1][kk]));
        acc[nt][0] += a0 * b0;
        acc[nt][1] += a0 * b1;
        acc[nt][2] += a1 * b0;
        acc[nt][3] += a1 * b1;
      }
    }
  }
}

// Cs = alpha * acc (the tile in shared memory, for the epilogue's 16-byte runs).
template <typename E, typename AccT>
__device__ __forceinline__ void acc_to_smem(E (*Cs)[BN + kVec<E>], const AccT (&acc)[4][4], E alpha, int r_lo, int tq) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) Cs[r_lo + (i >> 1) * 8][nt * 8 + 2 * tq + (i & 1)] = static_cast<E>(acc[nt][i]) * alpha;
}

// Epilogue: out[(m0, n0) + tile] = mask * Cs (+ src) (+ bias), written as 16-byte runs along the
// output's contiguous axis (d.vec) or element by element; out / src / bias already offset to the
// group / split, lbase the group's logical (dropout) offset.
template <typename TO, typename E>
__device__ __forceinline__ void store_tile(const E (*Cs)[BN + kVec<E>], const Out& d, TO* out, const TO* src,
                                           const TO* bias, uint32_t M, uint32_t N, uint32_t m0, uint32_t n0,
                                           int64_t lbase, const DropParams& dd) {
  constexpr int V = kVec<TO>;
  const bool along_rows = d.vec == kAlongRows;
  const E inv_keep = static_cast<E>(dd.inv_keep);
  for (int e = threadIdx.x; e < BM * BN / V; e += kThreads) {
    const int rr = along_rows ? (e % (BM / V)) * V : e / (BN / V);
    const int cc = along_rows ? e / (BM / V) : (e % (BN / V)) * V;
    const uint32_t m = m0 + rr, n = n0 + cc;
    const bool full = d.vec != kNone && (along_rows ? m + V <= M && n < N : m < M && n + V <= N);
    if (full) {
      const Pos pm = at(d.row, m), pn = at(d.col, n);
      const int64_t o = pm.mem + pn.mem;
      const int64_t l0 = lbase + pm.log + pn.log, ls = along_rows ? d.row.run_lstride() : d.col.run_lstride();
      alignas(16) TO s[V];
      if (src) load_vec(s, src + o);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        E v = along_rows ? Cs[rr + i][cc] : Cs[rr][cc + i];
        if (dd.active) v = drop_keep(dd, l0 + i * ls) ? v * inv_keep : E(0);
        if (src) v += static_cast<E>(to_acc(s[i]));
        if (bias) v += static_cast<E>(to_acc(bias[along_rows ? n : n + i]));
        s[i] = from_acc<TO>(v);
      }
      *reinterpret_cast<uint4*>(out + o) = *reinterpret_cast<const uint4*>(s);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const uint32_t mi = along_rows ? m + i : m, ni = along_rows ? n : n + i;
        if (mi < M && ni < N) {
          const Pos pm = at(d.row, mi), pn = at(d.col, ni);
          const int64_t o = pm.mem + pn.mem;
          E v = along_rows ? Cs[rr + i][cc] : Cs[rr][cc + i];
          if (dd.active) v = drop_keep(dd, lbase + pm.log + pn.log) ? v * inv_keep : E(0);
          if (src) v += static_cast<E>(to_acc(src[o]));
          if (bias) v += static_cast<E>(to_acc(bias[ni]));
          out[o] = from_acc<TO>(v);
        }
      }
    }
  }
}

// D = alpha * A B^T (+ src), masks fused.
template <typename TA, typename TB, typename TO>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmArgs args) {
  using Acc = acc2<TA, TB>;
  using E = typename std::conditional<std::is_same<TO, double>::value, double, Acc>::type;
  constexpr bool kMma = FLORA_MMA && is16<TA> && std::is_same<TA, TB>::value;
  __shared__ __align__(16) TA As[BM][BK + kVec<TA>];
  __shared__ __align__(16) TB Bs[BN][BK + kVec<TB>];
  __shared__ __align__(16) E Cs[BM][BN + kVec<E>];
  const uint32_t g = args.splits.div(blockIdx.z), split = blockIdx.z - g * args.splits.d;
  const uint32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  // k range of this split: [kbeg, kend), empty (the partial is zeros) when the split lies past K.
  const uint32_t kbeg = split * args.kchunk;
  const uint32_t kend = kbeg >= args.K ? kbeg : (args.K - kbeg < args.kchunk ? args.K : kbeg + args.kchunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
  const int r_lo = warp * 16 + gq;
  using AccT = typename std::conditional<kMma, float, Acc>::type;
  AccT acc[4][4];
  zero_acc(acc);
  for (uint32_t k0 = kbeg; k0 < kend; k0 += BK) {
    load_tile<BM, true>(As, args.a, m0, args.M, k0, kend, g, args.da);
    load_tile<BN, false>(Bs, args.b, n0, args.N, k0, kend, g, args.da);
    __syncthreads();
    mma_tile<kMma>(acc, As, Bs, r_lo, gq, tq);
    __syncthreads();
  }
  acc_to_smem(Cs, acc, static_cast<E>(args.alpha), r_lo, tq);
  __syncthreads();
  const Out& d = args.d;
  const int64_t off0 = (static_cast<int64_t>(split) + static_cast<int64_t>(g) * d.slice_g) * d.slice +
                       static_cast<int64_t>(g) * d.gs;
  store_tile<TO, E>(Cs, d, static_cast<TO*>(d.p) + off0, d.src ? static_cast<const TO*>(d.src) + off0 : nullptr,
                    d.bias ? static_cast<const TO*>(d.bias) + static_cast<int64_t>(g) * d.bias_gs : nullptr, args.M,
                    args.N, m0, n0, static_cast<int64_t>(g) * d.lgs, args.dd);
}

// ---- the fused core conv + expansion (adapter_conv_expand_ / adapter_conv_shrink_grad_input_) ----
// The implicit-GEMM A operand of a 2-D conv with one group and zero padding (1-D: H = 1): row m =
// (n, rh, rw) is a position of the result, column k = (i, j, c) a tap and a source channel; the
// element is src[n, c, q_h, q_w] with q = (r * mul + i * tap + off) / sdiv per dim where that is
// an integer inside the source, else 0. Forward (u = conv(z, k)): rows the output tokens, mul =
// stride, tap = dilation, off = -pad_lo, sdiv = 1. Backward (dz = the transposed conv of du): rows
// the input positions, mul = 1, tap = -dilation, off = pad_lo, sdiv = stride.
struct Gather {
  const void* p = nullptr;
  FastDiv rows_hw, rows_w, chans, taps_w;  // m -> (n, rest) -> (rh, rw); k -> (tap, c); tap -> (i, j)
  int32_t mul[2] = {1, 1}, tap[2] = {1, 1}, off[2] = {0, 0}, src[2] = {1, 1};
  FastDiv sdiv[2];
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;  // source strides
  bool vec = false;                        // 16-byte runs along c (channels innermost, aligned)
};

struct ConvMixArgs {
  Gather a;   // (M, K = taps * C_src)
  Opnd k;     // (R, K): the core kernel, rows r = the result's channels
  Out mid;    // (M, R): u (forward) / dz (backward), written rounded
  Opnd f;     // (C, R): U_out / U_in
  Out d;      // (M, C): y / dx, accumulated in place (d.src = d.p), mask dd on dx
  uint32_t M = 0, K = 0, R = 0, C = 0;
  double alpha = 1.0;
  DropParams dd;
};

// The offset of source element (row position (rh, rw), column k) inside sample n, or false (a zero).
__device__ __forceinline__ bool gather_at(const Gather& g, uint32_t rh, uint32_t rw, uint32_t k, int64_t& o) {
  const uint32_t t = g.chans.div(k), c = k - t * g.chans.d;
  const uint32_t i = g.taps_w.div(t), j = t - i * g.taps_w.d;
  int32_t q[2] = {static_cast<int32_t>(rh) * g.mul[0] + static_cast<int32_t>(i) * g.tap[0] + g.off[0],
                  static_cast<int32_t>(rw) * g.mul[1] + static_cast<int32_t>(j) * g.tap[1] + g.off[1]};
#pragma unroll
  for (int d = 0; d < 2; ++d) {
    if (q[d] < 0) return false;
    if (g.sdiv[d].d > 1) {
      const uint32_t qq = g.sdiv[d].div(static_cast<uint32_t>(q[d]));
      if (qq * g.sdiv[d].d != static_cast<uint32_t>(q[d])) return false;
      q[d] = static_cast<int32_t>(qq);
    }
    if (q[d] >= g.src[d]) return false;
  }
  o = static_cast<int64_t>(c) * g.sc + static_cast<int64_t>(q[0]) * g.sh + static_cast<int64_t>(q[1]) * g.sw;
  return true;
}

// Stage rows [m0, m0 + BM) x k [k0, k0 + BK) of the gathered operand into S (zero outside the
// source, past M or past K): one 16-byte load per run of V channels of one tap (g.vec; C_src is
// then a multiple of V, so a run never straddles two taps), else element by element.
template <typename T>
__device__ __forceinline__ void load_gather(T (*S)[BK + kVec<T>], const Gather& g, uint32_t m0, uint32_t M,
                                            uint32_t k0, uint32_t K) {
  constexpr int V = kVec<T>;
  const T* base = static_cast<const T*>(g.p);
  for (int e = threadIdx.x; e < BM * BK / V; e += kThreads) {
    const int rr = e / (BK / V), kk = (e % (BK / V)) * V;
    const uint32_t m = m0 + rr, k = k0 + kk;
    const uint32_t n = g.rows_hw.div(m), rest = m - n * g.rows_hw.d;
    const uint32_t rh = g.rows_w.div(rest), rw = rest - rh * g.rows_w.d;
    const T* row = base + static_cast<int64_t>(n) * g.sn;
    alignas(16) T v[V];
    int64_t o;
    if (g.vec && m < M && k + V <= K) {
      if (gather_at(g, rh, rw, k, o)) {
        load_vec(v, row + o);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = T{};
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = (m < M && k + i < K && gather_at(g, rh, rw, k + i, o)) ? row[o] : T{};
    }
    *reinterpret_cast<uint4*>(&S[rr][kk]) = *reinterpret_cast<const uint4*>(v);
  }
}

// One block per 64 rows: the (64 x R) tile of u = conv(z, k) (or dz = the transposed conv of du)
// by implicit GEMM over K = taps * C_src, rounded to T, written out and kept in shared memory
// (the A tile), then for every 32 channels of the expansion's output y[tile] += alpha * u U^T
// (dx[tile] += mask * dz U^T) in place, the same mma / FMA tile code and epilogue as gemm_kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads) conv_mix_kernel(const ConvMixArgs args) {
  using E = acc_of<T>;
  constexpr bool kMma = FLORA_MMA && is16<T>;
  static_assert(BN == BK, "the u tile (BM x BN) is the expansion's A tile (BM x BK)");
  __shared__ __align__(16) T As[BM][BK + kVec<T>];
  __shared__ __align__(16) T Bs[BN][BK + kVec<T>];
  __shared__ __align__(16) E Cs[BM][BN + kVec<E>];
  const uint32_t m0 = blockIdx.x * BM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
  const int r_lo = warp * 16 + gq;
  using AccT = typename std::conditional<kMma, float, E>::type;
  AccT acc[4][4];
  zero_acc(acc);
  for (uint32_t k0 = 0; k0 < args.K; k0 += BK) {
    load_gather<T>(As, args.a, m0, args.M, k0, args.K);
    load_tile<BN, false>(Bs, args.k, 0, args.R, k0, args.K, 0, args.dd);
    __syncthreads();
    mma_tile<kMma>(acc, As, Bs, r_lo, gq, tq);
    __syncthreads();
  }
  acc_to_smem(Cs, acc, E(1), r_lo, tq);
  __syncthreads();
  // Round once (as the unfused path stores u): the A tile of the expansion and the values written out.
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const T v = from_acc<T>(Cs[r][c]);
    As[r][c] = v;
    Cs[r][c] = static_cast<E>(to_acc(v));
  }
  __syncthreads();
  store_tile<T, E>(Cs, args.mid, static_cast<T*>(args.mid.p), nullptr, nullptr, args.M, args.R, m0, 0, 0,
                   DropParams{});
  const E alpha = static_cast<E>(args.alpha);
  T* out = static_cast<T*>(args.d.p);
  for (uint32_t n0 = 0; n0 < args.C; n0 += BN) {
    load_tile<BN, false>(Bs, args.f, n0, args.C, 0, args.R, 0, args.dd);
    __syncthreads();  // Bs staged; the previous epilogue's reads of Cs are done
    zero_acc(acc);
    mma_tile<kMma>(acc, As, Bs, r_lo, gq, tq);
    acc_to_smem(Cs, acc, alpha, r_lo, tq);
    __syncthreads();
    store_tile<T, E>(Cs, args.d, out, out, nullptr, args.M, args.C, m0, n0, 0, args.dd);
    __syncthreads();  // Cs and Bs free for the next channel tile
  }
}

// s[0..V) += the 16-byte vector at p (float4 / double2 loads: a local array would live in memory).
__device__ __forceinline__ void add_vec(float (&s)[4], const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  s[0] += v.x;
  s[1] += v.y;
  s[2] += v.z;
  s[3] += v.w;
}
__device__ __forceinline__ void add_vec(double (&s)[2], const double* p) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  s[0] += v.x;
  s[1] += v.y;
}

// out[e] = alpha * sum_s ws[s * n + e] for e < n (the split-k partials of a token reduction).
template <typename Acc, typename TO>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const Acc* __restrict__ ws, TO* __restrict__ out, int64_t n,
                                                          int64_t slices, double alpha, bool vec) {
  constexpr int V = kVec<Acc>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * V;
  // unroll 1: an unrolled grid-stride loop computes its trip count with a 64-bit division.
#pragma unroll 1
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; e < n; e += step) {
    Acc s[V] = {};
    if (vec && e + V <= n) {
#pragma unroll 1
      for (int64_t sl = 0; sl < slices; ++sl) add_vec(s, ws + sl * n + e);
    } else {
#pragma unroll 1
      for (int64_t sl = 0; sl < slices; ++sl)
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (e + i < n) s[i] += ws[sl * n + e + i];
    }
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (e + i < n) out[e + i] = from_acc<TO>(s[i] * static_cast<Acc>(alpha));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(T* out, int64_t n, DropParams d, bool vec) {
  constexpr int V = kVec<T>;
  using A = acc_of<T>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * V;
  // unroll 1: an unrolled grid-stride loop computes its trip count with a 64-bit division.
#pragma unroll 1
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; e < n; e += step) {
    alignas(16) T v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = from_acc<T>(drop_scale<A>(d, e + i));
    if (vec && e + V <= n) {
      *reinterpret_cast<uint4*>(out + e) = *reinterpret_cast<const uint4*>(v);
    } else {
      for (int i = 0; i < V && e + i < n; ++i) out[e + i] = v[i];
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------
unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>((n + 1023) / 1024, 1, 1 << 16)); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether runs of V elements along `run` are contiguous and 16-byte aligned for every run start
// (a multiple of V along `run`, any index along `other`).
bool contiguous_runs(const Idx2& run, const Idx2& other, std::initializer_list<int64_t> strides, int V) {
  if (run.run_stride() != 1) return false;
  if (run.div.d > 1 && (run.div.d % V != 0 || run.s_hi % V != 0)) return false;
  if (other.s_hi % V != 0 || (other.div.d > 1 && other.s_lo % V != 0)) return false;
  for (int64_t s : strides)
    if (s % V != 0) return false;
  return true;
}

template <typename T>
int vec_mode(const void* p, const Idx2& row, const Idx2& col, std::initializer_list<int64_t> strides) {
  if (!aligned16(p)) return kNone;
  if (contiguous_runs(col, row, strides, kVec<T>)) return kAlongCols;
  if (contiguous_runs(row, col, strides, kVec<T>)) return kAlongRows;
  return kNone;
}

// Launch D (M x N) = alpha A B^T over `groups` groups, k split into `splits` chunks of kchunk.
template <typename TA, typename TB, typename TO>
cudaError_t launch_gemm(GemmArgs a, int64_t M, int64_t N, int64_t K, int64_t groups, int64_t splits,
                        int64_t kchunk, cudaStream_t stream) {
  const int64_t gx = (M + BM - 1) / BM, gy = (N + BN - 1) / BN, gz = groups * splits;
  if (M > kMaxDim || N > kMaxDim || K > kMaxDim || gy > kMaxGrid || gz > kMaxGrid || groups < 1 || splits < 1)
    return cudaErrorInvalidValue;
  a.M = static_cast<uint32_t>(M);
  a.N = static_cast<uint32_t>(N);
  a.K = static_cast<uint32_t>(K);
  a.kchunk = static_cast<uint32_t>(kchunk);
  a.splits = FastDiv(splits);
  a.a.vec = vec_mode<TA>(a.a.p, a.a.row, a.a.col, {a.a.gs});
  a.b.vec = vec_mode<TB>(a.b.p, a.b.row, a.b.col, {a.b.gs});
  a.d.vec = (a.d.src && !aligned16(a.d.src)) ? kNone : vec_mode<TO>(a.d.p, a.d.row, a.d.col, {a.d.gs, a.d.slice});
  if (M == 0 || N == 0) return cudaSuccess;
  gemm_kernel<TA, TB, TO><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)),
                            kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename TA, typename TB, typename TO>
cudaError_t launch_gemm(const GemmArgs& a, int64_t M, int64_t N, int64_t K, int64_t groups, cudaStream_t stream) {
  return launch_gemm<TA, TB, TO>(a, M, N, K, groups, 1, std::max<int64_t>(BK, (K + BK - 1) / BK * BK), stream);
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

int64_t acc_bytes(DType dt) { return dt == DType::F64 ? 8 : 4; }

// Split of a long reduction (k) into chunks of a multiple of BK: enough blocks to fill the GPU
// (about 1024), chunks of at least 256. slices = partial sums to add (splits, times the groups
// when they are summed too); out_elems = elements of the (Gout, M, N) result.
struct SplitPlan {
  int64_t splits, kchunk, slices, out_elems;
};

SplitPlan plan_split(int64_t M, int64_t N, int64_t K, int64_t G, bool per_group) {
  const int64_t tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN) * G;
  int64_t splits = std::clamp<int64_t>((1024 + tiles - 1) / tiles, 1, std::max<int64_t>(1, K / 256));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, kMaxGrid / G));
  const int64_t kchunk = std::max<int64_t>(BK, ((K + splits - 1) / splits + BK - 1) / BK * BK);
  splits = std::max<int64_t>(1, (K + kchunk - 1) / kchunk);
  return {splits, kchunk, splits * (per_group ? 1 : G), (per_group ? G : 1) * M * N};
}

int64_t split_ws_bytes(const SplitPlan& pl, int64_t acc_bytes) {
  return pl.slices > 1 ? pl.slices * pl.out_elems * acc_bytes : 0;
}

// out (Gout, M, N) contiguous = alpha * sum over k (and over the G groups unless per_group) of
// A B^T: straight into out when there is one partial, else fp32 (fp64) partials in ws (at least
// split_ws_bytes) summed by reduce_kernel. g.a / g.b describe the operands; g.da the mask on a
// (its 1 / (1 - p) belongs in alpha).
template <typename TA, typename TB, typename TO>
cudaError_t launch_split(GemmArgs g, const SplitPlan& pl, int64_t M, int64_t N, int64_t K, int64_t G, bool per_group,
                         void* out, void* ws, double alpha, cudaStream_t stream) {
  using A = acc2<TA, TB>;
  g.d.row = Idx2(1, N);
  g.d.col = Idx2(1, 1);
  g.d.gs = per_group ? M * N : 0;
  if (pl.slices == 1) {
    g.d.p = out;
    g.alpha = alpha;
    return launch_gemm<TA, TB, TO>(g, M, N, K, G, pl.splits, pl.kchunk, stream);
  }
  if (ws == nullptr) return cudaErrorInvalidValue;
  g.d.p = ws;
  g.d.slice = pl.out_elems;
  g.d.slice_g = per_group ? 0 : pl.splits;
  g.alpha = 1.0;
  cudaError_t err = launch_gemm<TA, TB, A>(g, M, N, K, G, pl.splits, pl.kchunk, stream);
  if (err != cudaSuccess) return err;
  const bool vec = aligned16(ws) && pl.out_elems % kVec<A> == 0;
  reduce_kernel<A, TO><<<blocks_for(pl.out_elems), kThreads, 0, stream>>>(
      static_cast<const A*>(ws), static_cast<TO*>(out), pl.out_elems, pl.slices, alpha, vec);
  return cudaGetLastError();
}

SplitPlan corr_plan(const Act& av, const Act& bv, bool per_group) {
  return plan_split(av.c, bv.c, av.n * av.p, av.groups, per_group);
}

}  // namespace

int64_t reconstruct_workspace_bytes(DType core_dt, int64_t r0, int64_t r1, int64_t T, int64_t I0) {
  (void)r0;
  return I0 * r1 * T * acc_bytes(core_dt);
}

cudaError_t reconstruct(DType core_dt, DType out_dt, const void* core, const void* u0, const void* u1,
                        const void* base, void* out, void* ws, int64_t r0, int64_t r1, int64_t T, int64_t I0,
                        int64_t I1, double scale, cudaStream_t stream) {
  const int64_t RT = r1 * T;
  if (I0 * T > kMaxDim || I1 * T > kMaxDim) return cudaErrorInvalidValue;
  return with_type(core_dt, [&](auto core_tag) {
    using CT = decltype(core_tag);
    using A = acc_of<CT>;
    GemmArgs p;  // Pi (I0, r1 T) = scale * u0 (I0, r0) core (r0, r1 T)
    p.a.p = u0;
    p.a.row = Idx2(1, r0);
    p.a.col = Idx2(1, 1);
    p.b.p = core;
    p.b.row = Idx2(1, 1);
    p.b.col = Idx2(1, RT);
    p.d.p = ws;
    p.d.row = Idx2(1, RT);
    p.d.col = Idx2(1, 1);
    p.alpha = scale;
    cudaError_t err = launch_gemm<CT, CT, A>(p, I0, RT, r0, 1, stream);
    if (err != cudaSuccess) return err;
    return with_type(out_dt, [&](auto out_tag) {
      using OT = decltype(out_tag);
      GemmArgs q;  // out[(i, t), j] = base + sum_b Pi[i, b, t] u1[j, b]
      q.a.p = ws;
      q.a.row = Idx2(T, RT, 1);
      q.a.col = Idx2(1, T);
      q.b.p = u1;
      q.b.row = Idx2(1, r1);
      q.b.col = Idx2(1, 1);
      q.d.p = out;
      q.d.src = base;
      q.d.row = Idx2(T, I1 * T, 1);
      q.d.col = Idx2(1, T);
      return launch_gemm<A, CT, OT>(q, I0 * T, I1, r1, 1, stream);
    });
  });
}

namespace {
// Split partials of the backward's long reductions, packed in one workspace (16-byte aligned parts):
// dcore's over I0, and for T = 1 (a Linear's dW) Q's over I1 and Rm's over I0.
struct BackwardWs {
  SplitPlan c, q, r;
  int64_t c_bytes, q_bytes, r_bytes;
};

int64_t round16(int64_t b) { return (b + 15) / 16 * 16; }

BackwardWs backward_ws(DType dt, int64_t r0, int64_t r1, int64_t T, int64_t I0, int64_t I1) {
  const int64_t ab = acc_bytes(dt);
  BackwardWs w{plan_split(r0, r1 * T, I0, 1, true), plan_split(I0, r1, I1, 1, true), plan_split(I1, r0, I0, 1, true),
               0, 0, 0};
  w.c_bytes = round16(split_ws_bytes(w.c, ab));
  w.q_bytes = T == 1 ? round16(split_ws_bytes(w.q, ab)) : 0;
  w.r_bytes = T == 1 ? round16(split_ws_bytes(w.r, ab)) : 0;
  return w;
}
}  // namespace

int64_t reconstruct_backward_workspace_bytes(DType dt, int64_t r0, int64_t r1, int64_t T, int64_t I0, int64_t I1) {
  const BackwardWs w = backward_ws(dt, r0, r1, T, I0, I1);
  return w.c_bytes + w.q_bytes + w.r_bytes;
}

cudaError_t reconstruct_backward(DType dt, const void* grad, const void* core, const void* u0, const void* u1,
                                 void* dcore, void* du0, void* du1, void* ws_q, void* ws_r, void* ws_c, int64_t r0,
                                 int64_t r1, int64_t T, int64_t I0, int64_t I1, double scale, cudaStream_t stream) {
  if (I0 * T > kMaxDim || I1 * T > kMaxDim || r0 * r1 * T > kMaxDim) return cudaErrorInvalidValue;
  const int64_t RT = r1 * T;
  const BackwardWs w = backward_ws(dt, r0, r1, T, I0, I1);
  if (w.c_bytes + w.q_bytes + w.r_bytes > 0 && ws_c == nullptr) return cudaErrorInvalidValue;
  char* wsp = static_cast<char*>(ws_c);
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    using A = acc_of<TT>;
    GemmArgs q;  // Q[(i, t), b] = sum_j grad[i, j, t] u1[j, b]  -> ws_q (I0, r1, T)
    q.a.p = grad;
    q.a.row = Idx2(T, I1 * T, 1);
    q.a.col = Idx2(1, T);
    q.b.p = u1;
    q.b.row = Idx2(1, 1);
    q.b.col = Idx2(1, r1);
    q.d.p = ws_q;
    q.d.row = Idx2(T, RT, 1);
    q.d.col = Idx2(1, T);
    cudaError_t err = T == 1 ? launch_split<TT, TT, A>(q, w.q, I0, r1, I1, 1, true, ws_q, wsp + w.c_bytes, 1.0, stream)
                             : launch_gemm<TT, TT, A>(q, I0 * T, r1, I1, 1, stream);
    if (err != cudaSuccess) return err;
    GemmArgs r;  // Rm[(j, t), a] = sum_i grad[i, j, t] u0[i, a]  -> ws_r (I1, r0, T)
    r.a.p = grad;
    r.a.row = Idx2(T, T, 1);
    r.a.col = Idx2(1, I1 * T);
    r.b.p = u0;
    r.b.row = Idx2(1, 1);
    r.b.col = Idx2(1, r0);
    r.d.p = ws_r;
    r.d.row = Idx2(T, r0 * T, 1);
    r.d.col = Idx2(1, T);
    err = T == 1 ? launch_split<TT, TT, A>(r, w.r, I1, r0, I0, 1, true, ws_r, wsp + w.c_bytes + w.q_bytes, 1.0, stream)
                 : launch_gemm<TT, TT, A>(r, I1 * T, r0, I0, 1, stream);
    if (err != cudaSuccess) return err;
    GemmArgs c;  // dcore[a, bt] = scale * sum_i u0[i, a] Q[i, bt]: a reduction over I0, split
    c.a.p = u0;
    c.a.row = Idx2(1, 1);
    c.a.col = Idx2(1, r0);
    c.b.p = ws_q;
    c.b.row = Idx2(1, 1);
    c.b.col = Idx2(1, RT);
    err = launch_split<TT, A, TT>(c, w.c, r0, RT, I0, 1, true, dcore, wsp, scale, stream);
    if (err != cudaSuccess) return err;
    GemmArgs u;  // du0[i, a] = scale * sum_bt Q[i, bt] core[a, bt]
    u.a.p = ws_q;
    u.a.row = Idx2(1, RT);
    u.a.col = Idx2(1, 1);
    u.b.p = core;
    u.b.row = Idx2(1, RT);
    u.b.col = Idx2(1, 1);
    u.d.p = du0;
    u.d.row = Idx2(1, r0);
    u.d.col = Idx2(1, 1);
    u.alpha = scale;
    if ((err = launch_gemm<A, TT, TT>(u, I0, r0, RT, 1, stream)) != cudaSuccess) return err;
    GemmArgs v;  // du1[j, b] = scale * sum_{a,t} Rm[j, a, t] core[a, b, t]; k = (a, t)
    v.a.p = ws_r;
    v.a.row = Idx2(1, r0 * T);
    v.a.col = Idx2(1, 1);
    v.b.p = core;
    v.b.row = Idx2(1, T);
    v.b.col = Idx2(T, RT, 1);
    v.d.p = du1;
    v.d.row = Idx2(1, r1);
    v.d.col = Idx2(1, 1);
    v.alpha = scale;
    return launch_gemm<A, TT, TT>(v, I1, r1, r0 * T, 1, stream);
  });
}

namespace {
// A Linear-shaped mix (P = 1, one group) with a plain (row-major) output and a long reduction over few
// output tiles (the shrink x U_in, dS = dy B: M tokens x r, K = features) splits k to fill the GPU.
bool mix_splits(const Act& iv, const Act& ov, const void* bias, bool accumulate, const DropParams& dout) {
  return iv.p == 1 && iv.groups == 1 && ov.sn == ov.c && ov.sc == 1 && bias == nullptr && !accumulate &&
         !dout.active && plan_split(iv.n, ov.c, iv.c, 1, true).slices > 1;
}
}  // namespace

int64_t mix_workspace_bytes(DType dt, const Act& iv, const Act& ov, const void* bias, bool accumulate,
                            const DropParams& dout) {
  return mix_splits(iv, ov, bias, accumulate, dout)
             ? split_ws_bytes(plan_split(iv.n, ov.c, iv.c, 1, true), acc_bytes(dt))
             : 0;
}

cudaError_t mix(DType dt, const void* in, const Act& iv, const void* w, int64_t w_gs, int64_t ws_o, int64_t ws_c,
                void* out, const Act& ov, const void* bias, double alpha, bool accumulate, DropParams din,
                DropParams dout, void* ws, cudaStream_t stream) {
  const int64_t G = iv.groups, C = iv.c, P = iv.p, O = ov.c;
  if (iv.p > kMaxDim || G < 1 || ov.groups != G || ov.n != iv.n || ov.p != P) return cudaErrorInvalidValue;
  const bool split = mix_splits(iv, ov, bias, accumulate, dout);
  if (split && ws == nullptr) return cudaErrorInvalidValue;
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    GemmArgs a;  // rows m = (n, p), k = c, columns o; in and out read / written through their strides
    a.a.p = in;
    a.a.row = Idx2(P, iv.sn, iv.sp, G * C * P, 1);
    a.a.col = Idx2(1, iv.sc, 0, P);
    a.a.gs = iv.sg;
    a.a.lgs = C * P;
    a.b.p = w;
    a.b.row = Idx2(1, ws_o);
    a.b.col = Idx2(1, ws_c);
    a.b.gs = w_gs;
    a.d.p = out;
    a.d.src = accumulate ? out : nullptr;
    a.d.bias = bias;
    a.d.bias_gs = O;
    a.d.row = Idx2(P, ov.sn, ov.sp, G * O * P, 1);
    a.d.col = Idx2(1, ov.sc, 0, P);
    a.d.gs = ov.sg;
    a.d.lgs = O * P;
    a.alpha = alpha * (din.active ? din.inv_keep : 1.0);
    a.da = din;
    a.dd = dout;
    if (split)
      return launch_split<TT, TT, TT>(a, plan_split(iv.n, O, C, 1, true), iv.n, O, C, 1, true, out, ws, a.alpha,
                                      stream);
    return launch_gemm<TT, TT, TT>(a, iv.n * P, O, C, G, stream);
  });
}

int64_t corr_workspace_bytes(DType dt, const Act& av, const Act& bv, bool per_group) {
  return split_ws_bytes(corr_plan(av, bv, per_group), acc_bytes(dt));
}

cudaError_t corr(DType dt, const void* a, const Act& av, const void* b, const Act& bv, void* out, bool per_group,
                 double alpha, DropParams da, void* ws, cudaStream_t stream) {
  const int64_t G = av.groups, C = av.c, P = av.p;
  if (G < 1 || bv.groups != G || bv.n != av.n || bv.p != P || av.n * P > kMaxDim) return cudaErrorInvalidValue;
  const SplitPlan pl = corr_plan(av, bv, per_group);
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    GemmArgs g;  // rows c, columns k, reduction over q = (n, p)
    g.a.p = a;
    g.a.row = Idx2(1, av.sc, 0, P);
    g.a.col = Idx2(P, av.sn, av.sp, G * C * P, 1);
    g.a.gs = av.sg;
    g.a.lgs = C * P;
    g.b.p = b;
    g.b.row = Idx2(1, bv.sc);
    g.b.col = Idx2(P, bv.sn, bv.sp);
    g.b.gs = bv.sg;
    g.da = da;
    return launch_split<TT, TT, TT>(g, pl, C, bv.c, av.n * P, G, per_group, out, ws,
                                    alpha * (da.active ? da.inv_keep : 1.0), stream);
  });
}

namespace {
constexpr int64_t kL2ChunkBytes = 8 << 20;

struct LinearGradPlan {
  int64_t chunk, nchunks;
  SplitPlan per_chunk;  // db's split of one chunk
  int64_t slices;           // db partials over all chunks
  int64_t db_bytes, ds_bytes;
};

LinearGradPlan linear_grad_plan(DType dt, int64_t M, int64_t O, int64_t r, int64_t chunk_rows) {
  const int64_t esize = dt == DType::F64 ? 8 : (dt == DType::F32 ? 4 : 2);
  int64_t chunk = chunk_rows > 0 ? chunk_rows : std::max<int64_t>(256, kL2ChunkBytes / std::max<int64_t>(1, O * esize));
  chunk = std::min(chunk, M);
  const int64_t nchunks = (M + chunk - 1) / chunk;
  const SplitPlan pc = plan_split(O, r, chunk, 1, true), pd = plan_split(chunk, r, O, 1, true);  // db, ds
  const int64_t slices = nchunks * pc.splits, last = M - (nchunks - 1) * chunk;
  const int64_t db_bytes = slices > 1 ? slices * O * r * acc_bytes(dt) : 0;
  const int64_t ds_bytes = std::max(split_ws_bytes(pd, acc_bytes(dt)),
                                    split_ws_bytes(plan_split(last, r, O, 1, true), acc_bytes(dt)));
  return {chunk, nchunks, pc, slices, (db_bytes + 15) / 16 * 16, ds_bytes};
}
}  // namespace

int64_t linear_grad_workspace_bytes(DType dt, int64_t M, int64_t O, int64_t r, int64_t chunk_rows) {
  const LinearGradPlan pl = linear_grad_plan(dt, M, O, r, chunk_rows);
  return pl.db_bytes + pl.ds_bytes;
}

cudaError_t linear_grad(DType dt, const void* dy, const void* s, const void* b, void* ds, void* db, int64_t M,
                        int64_t O, int64_t r, int64_t chunk_rows, void* ws, cudaStream_t stream) {
  const LinearGradPlan pl = linear_grad_plan(dt, M, O, r, chunk_rows);
  if (pl.db_bytes + pl.ds_bytes > 0 && ws == nullptr) return cudaErrorInvalidValue;
  void* ws_ds = static_cast<char*>(ws) + pl.db_bytes;  // ds partials, reused by every chunk (stream order)
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    using A = acc_of<TT>;
    const int64_t out_elems = O * r;
    for (int64_t c = 0; c < pl.nchunks; ++c) {
      const int64_t c0 = c * pl.chunk, rows = std::min(pl.chunk, M - c0);
      const TT* dyc = static_cast<const TT*>(dy) + c0 * O;
      GemmArgs d;  // ds[m, k] = sum_o dy[m, o] b[o, k] over the chunk's rows (k split): dy from memory
      d.a.p = dyc;
      d.a.row = Idx2(1, O);
      d.a.col = Idx2(1, 1);
      d.b.p = b;
      d.b.row = Idx2(1, 1);
      d.b.col = Idx2(1, r);
      cudaError_t err = launch_split<TT, TT, TT>(d, plan_split(rows, r, O, 1, true), rows, r, O, 1, true,
                                                 static_cast<TT*>(ds) + c0 * r, ws_ds, 1.0, stream);
      if (err != cudaSuccess) return err;
      GemmArgs g;  // db[o, k] (+)= sum_m dy[m, o] s[m, k] over the same rows: dy from L2
      g.a.p = dyc;
      g.a.row = Idx2(1, 1);
      g.a.col = Idx2(1, O);
      g.b.p = static_cast<const TT*>(s) + c0 * r;
      g.b.row = Idx2(1, 1);
      g.b.col = Idx2(1, r);
      g.d.row = Idx2(1, r);
      g.d.col = Idx2(1, 1);
      if (pl.slices == 1) {
        g.d.p = db;
        err = launch_gemm<TT, TT, TT>(g, O, r, rows, 1, 1, pl.per_chunk.kchunk, stream);
      } else {
        g.d.p = static_cast<A*>(ws) + c * pl.per_chunk.splits * out_elems;
        g.d.slice = out_elems;
        err = launch_gemm<TT, TT, A>(g, O, r, rows, 1, pl.per_chunk.splits, pl.per_chunk.kchunk, stream);
      }
      if (err != cudaSuccess) return err;
    }
    if (pl.slices == 1) return cudaSuccess;
    const bool vec = aligned16(ws) && out_elems % kVec<A> == 0;
    reduce_kernel<A, TT><<<blocks_for(out_elems), kThreads, 0, stream>>>(
        static_cast<const A*>(ws), static_cast<TT*>(db), out_elems, pl.slices, 1.0, vec);
    return cudaGetLastError();
  });
}

cudaError_t conv_mix(DType dt, bool transposed, const ConvShape& cs, const void* src, const Act4& sv, const void* kp,
                     void* mid, const Act& mv, const void* f, void* out, const Act& ov, double alpha, DropParams dd,
                     cudaStream_t stream) {
  // Rows: the positions of the result (output tokens forward, input positions backward); source: the other side.
  const int64_t rh = transposed ? cs.in_h : cs.out_h, rw = transposed ? cs.in_w : cs.out_w;
  const int64_t src_h = transposed ? cs.out_h : cs.in_h, src_w = transposed ? cs.out_w : cs.in_w;
  const int64_t P = rh * rw, M = cs.n * P, R = mv.c, C = ov.c, K = cs.k_h * cs.k_w * sv.c;
  const int64_t st[2] = {cs.stride_h, cs.stride_w}, dl[2] = {cs.dil_h, cs.dil_w}, pd[2] = {cs.pad_h, cs.pad_w};
  const int64_t kk[2] = {cs.k_h, cs.k_w}, rr[2] = {rh, rw};
  for (int d = 0; d < 2; ++d)  // every position q of the gather fits an int32
    if (rr[d] * st[d] + kk[d] * dl[d] + pd[d] > (int64_t(1) << 30) || st[d] < 1 || dl[d] < 1 || pd[d] < 0)
      return cudaErrorInvalidValue;
  if (R < 1 || R > kConvMixMaxRank || C < 1 || M > kMaxDim || K > kMaxDim || C > kMaxDim || mv.p != P || ov.p != P ||
      mv.n != cs.n || ov.n != cs.n || mv.groups != 1 || ov.groups != 1)
    return cudaErrorInvalidValue;
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    constexpr int V = kVec<TT>;
    ConvMixArgs a;
    Gather& g = a.a;
    g.p = src;
    g.rows_hw = FastDiv(P);
    g.rows_w = FastDiv(rw);
    g.chans = FastDiv(sv.c);
    g.taps_w = FastDiv(cs.k_w);
    for (int d = 0; d < 2; ++d) {
      g.mul[d] = static_cast<int32_t>(transposed ? 1 : st[d]);
      g.tap[d] = static_cast<int32_t>(transposed ? -dl[d] : dl[d]);
      g.off[d] = static_cast<int32_t>(transposed ? pd[d] : -pd[d]);
      g.sdiv[d] = FastDiv(transposed ? st[d] : 1);
    }
    g.src[0] = static_cast<int32_t>(src_h);
    g.src[1] = static_cast<int32_t>(src_w);
    g.sn = sv.sn;
    g.sc = sv.sc;
    g.sh = sv.sh;
    g.sw = sv.sw;
    g.vec = aligned16(src) && sv.sc == 1 && sv.c % V == 0 && sv.sn % V == 0 && (src_h == 1 || sv.sh % V == 0) &&
            sv.sw % V == 0;
    if (src_h == 1) g.sh = 0;
    a.k.p = kp;
    a.k.row = Idx2(1, K);
    a.k.col = Idx2(1, 1);
    a.k.vec = vec_mode<TT>(kp, a.k.row, a.k.col, {0});
    a.mid.p = mid;
    a.mid.row = Idx2(P, mv.sn, mv.sp);
    a.mid.col = Idx2(1, mv.sc);
    a.mid.vec = vec_mode<TT>(mid, a.mid.row, a.mid.col, {0});
    a.f.p = f;
    a.f.row = Idx2(1, R);
    a.f.col = Idx2(1, 1);
    a.f.vec = vec_mode<TT>(f, a.f.row, a.f.col, {0});
    a.d.p = out;
    a.d.src = out;
    a.d.row = Idx2(P, ov.sn, ov.sp, C * P, 1);  // logical (dropout) index ((n * C) + c) * P + p
    a.d.col = Idx2(1, ov.sc, 0, P);
    a.d.vec = vec_mode<TT>(out, a.d.row, a.d.col, {0});
    a.M = static_cast<uint32_t>(M);
    a.K = static_cast<uint32_t>(K);
    a.R = static_cast<uint32_t>(R);
    a.C = static_cast<uint32_t>(C);
    a.alpha = alpha;
    a.dd = dd;
    conv_mix_kernel<TT><<<static_cast<unsigned>((M + BM - 1) / BM), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t dropout_mask(DType dt, void* out, int64_t n, DropParams d, cudaStream_t stream) {
  return with_type(dt, [&](auto tag) {
    using TT = decltype(tag);
    dropout_mask_kernel<TT><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<TT*>(out), n, d, aligned16(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace flora
