// CPU implementations of the flora ops (TORCH_LIBRARY_IMPL(flora, CPU); schemas in flora_ops.cpp):
// the GEMM-shaped work through ATen (at::mm / at::addmm_out on views, BLAS-backed), dropout / casts /
// base adds fused around it in at::parallel_for work items (staged per block, in cache).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "flora_checks.h"

namespace flora {
namespace {

using at::Tensor;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// The dtype the GEMMs run in: float for half/bfloat16 (one rounding at the end), else the dtype.
c10::ScalarType acc_type(c10::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// A (rows, cols) matrix view of raw memory with the given element strides (no copy, not owned).
Tensor mat(const void* p, int64_t rows, int64_t cols, int64_t rs, int64_t cs, c10::ScalarType t) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {rs, cs}, at::TensorOptions().dtype(t));
}

// out = a @ b (accumulate: out += a @ b), a BLAS GEMM through ATen.
void gemm(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (accumulate)
    at::addmm_out(out, out, a, b, 1, 1);
  else
    at::mm_out(out, a, b);
}

// The offset of element (n, g, c, p) of view v, and its logical (dropout) index.
inline int64_t off(const Act& v, int64_t n, int64_t g, int64_t c, int64_t p) {
  return n * v.sn + g * v.sg + c * v.sc + p * v.sp;
}
inline int64_t logical(const Act& v, int64_t n, int64_t g, int64_t c, int64_t p) {
  return ((n * v.groups + g) * v.c + c) * v.p + p;
}

// out[n, g, o, p] (= or +=) mask_out * alpha * sum_c w_g(o, c) * mask_in * in[n, g, c, p], with
// w_g(o, c) = w[g * w_gs + o * ws_o + c * ws_c]; in / out read and written through their views iv / ov
// (ov.c = O; contiguous, channels_last, ...); masks index the logical elements (Act).
// Work items are GEMMs on strided views (BLAS through ATen); the input is staged into an acc_t buffer
// only when it needs a dropout mask or a cast, the output only when it needs a mask or a cast.
template <typename scalar_t>
void mix_cpu(const scalar_t* in, const Act& iv, const scalar_t* w, int64_t w_gs, int64_t ws_o, int64_t ws_c,
             scalar_t* out, const Act& ov, double alpha, bool accumulate, const DropParams& din,
             const DropParams& dout) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same<acc_t, scalar_t>::value;
  const auto st = c10::CppTypeToScalarType<scalar_t>::value, at_ = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t groups = iv.groups, N = iv.n, C = iv.c, O = ov.c, P = iv.p;
  const int64_t nw = w_gs == 0 ? 1 : groups;  // distinct weights
  std::vector<acc_t> wt_all(nw * O * C);      // wt[(g * O + o) * C + c] = alpha * w_g(o, c)
  for (int64_t g = 0; g < nw; ++g)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t c = 0; c < C; ++c)
        wt_all[(g * O + o) * C + c] = static_cast<acc_t>(alpha) * static_cast<acc_t>(w[g * w_gs + o * ws_o + c * ws_c]);
  auto wg_of = [&](int64_t g) { return wt_all.data() + (nw == 1 ? 0 : g * O * C); };
  const bool stage_in = !same || din.active, stage_out = !same || dout.active;
  if (P == 1) {
    // An item is (group g, a block of n): out_rows (nb, O) = in_rows (nb, C) @ W_g^T.
    // Without staging one GEMM per group covers every row (BLAS blocks and threads it itself).
    const int64_t NB = (stage_in || stage_out) ? std::max<int64_t>(16, std::min<int64_t>(512, 65536 / std::max<int64_t>(C + O, 1))) : N;
    const int64_t nblk = (N + NB - 1) / NB;
    at::parallel_for(0, groups * nblk, grain_for(NB * C * O / 16), [&](int64_t ib, int64_t ie) {
      std::vector<acc_t> xin(stage_in ? NB * C : 0), acc(stage_out ? NB * O : 0);
      for (int64_t item = ib; item < ie; ++item) {
        const int64_t g = item / nblk, n0 = (item % nblk) * NB, nb = std::min(NB, N - n0);
        const Tensor wT = mat(wg_of(g), C, O, 1, C, at_);
        Tensor a;
        if (stage_in) {
          for (int64_t n = 0; n < nb; ++n)
            for (int64_t c = 0; c < C; ++c)
              xin[n * C + c] = static_cast<acc_t>(in[off(iv, n0 + n, g, c, 0)]) *
                               drop_scale<acc_t>(din, logical(iv, n0 + n, g, c, 0));
          a = mat(xin.data(), nb, C, C, 1, at_);
        } else {
          a = mat(in + off(iv, n0, g, 0, 0), nb, C, iv.sn, iv.sc, st);
        }
        if (!stage_out) {
          Tensor o = mat(out + off(ov, n0, g, 0, 0), nb, O, ov.sn, ov.sc, st);
          gemm(o, a, wT, accumulate);
        } else {
          Tensor o = mat(acc.data(), nb, O, O, 1, at_);
          gemm(o, a, wT, false);
          for (int64_t n = 0; n < nb; ++n)
            for (int64_t q = 0; q < O; ++q) {
              scalar_t& dst = out[off(ov, n0 + n, g, q, 0)];
              const acc_t v = acc[n * O + q] * drop_scale<acc_t>(dout, logical(ov, n0 + n, g, q, 0));
              dst = accumulate ? static_cast<scalar_t>(static_cast<acc_t>(dst) + v) : static_cast<scalar_t>(v);
            }
        }
      }
    });
    return;
  }
  if (!stage_in && !stage_out) {
    // P > 1, nothing to stage: per group one batched GEMM over the N samples (BLAS threads it),
    // out_g[n] (O, P) = W_g (O, C) @ in_g[n] (C, P) on strided views.
    const auto opt = at::TensorOptions().dtype(st);
    for (int64_t g = 0; g < groups; ++g) {
      const Tensor wg = at::from_blob(wg_of(g), {1, O, C}, at::TensorOptions().dtype(at_)).expand({N, O, C});
      const Tensor in3 = at::from_blob(const_cast<scalar_t*>(in) + off(iv, 0, g, 0, 0), {N, C, P}, {iv.sn, iv.sc, iv.sp}, opt);
      Tensor out3 = at::from_blob(out + off(ov, 0, g, 0, 0), {N, O, P}, {ov.sn, ov.sc, ov.sp}, opt);
      if (accumulate)
        out3.baddbmm_(wg, in3);
      else
        at::bmm_out(out3, wg, in3);
    }
    return;
  }
  // P > 1: an item is (sample n, group g, a tile of positions): out (O, pn) = W_g (O, C) @ in (C, pn).
  const int64_t PT = std::min<int64_t>(P, std::max<int64_t>(64, 65536 / (C + O)));
  const int64_t ntiles = (P + PT - 1) / PT;
  at::parallel_for(0, N * groups * ntiles, grain_for(C * O * PT / 16), [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> xin(stage_in ? C * PT : 0), acc(stage_out ? O * PT : 0);
    for (int64_t item = ib; item < ie; ++item) {
      const int64_t r = item / ntiles, n = r / groups, g = r % groups, p0 = (item % ntiles) * PT;
      const int64_t pn = std::min(PT, P - p0);
      const Tensor wg = mat(wg_of(g), O, C, C, 1, at_);
      Tensor b;
      if (stage_in) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t q = 0; q < pn; ++q)
            xin[c * pn + q] = static_cast<acc_t>(in[off(iv, n, g, c, p0 + q)]) *
                              drop_scale<acc_t>(din, logical(iv, n, g, c, p0 + q));
        b = mat(xin.data(), C, pn, pn, 1, at_);
      } else {
        b = mat(in + off(iv, n, g, 0, p0), C, pn, iv.sc, iv.sp, st);
      }
      if (!stage_out) {
        Tensor o = mat(out + off(ov, n, g, 0, p0), O, pn, ov.sc, ov.sp, st);
        gemm(o, wg, b, accumulate);
      } else {
        Tensor o = mat(acc.data(), O, pn, pn, 1, at_);
        gemm(o, wg, b, false);
        for (int64_t oo = 0; oo < O; ++oo)
          for (int64_t q = 0; q < pn; ++q) {
            scalar_t& dst = out[off(ov, n, g, oo, p0 + q)];
            const acc_t v = acc[oo * pn + q] * drop_scale<acc_t>(dout, logical(ov, n, g, oo, p0 + q));
            dst = accumulate ? static_cast<scalar_t>(static_cast<acc_t>(dst) + v) : static_cast<scalar_t>(v);
          }
      }
    }
  });
}

// out[g', c, k] = alpha * sum over samples n, groups g (all: G = 1, g' = 0; or g == g': G = groups) and
// positions p of mask * a[n, g, c, p] * b[n, g, k, p]; a, b read through their views av, bv (av.c = C,
// bv.c = K). Items are GEMMs into per-thread acc_t partial sums, reduced in a fixed order.
template <typename scalar_t>
void corr_cpu(const scalar_t* a, const Act& av, const scalar_t* b, const Act& bv, scalar_t* out, bool per_group,
              double alpha, const DropParams& da) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same<acc_t, scalar_t>::value;
  const auto st = c10::CppTypeToScalarType<scalar_t>::value, at_ = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t groups = av.groups, N = av.n, C = av.c, K = bv.c, P = av.p;
  const int64_t G = per_group ? groups : 1, CK = C * K;
  const bool stage_a = !same || da.active, stage_b = !same;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<acc_t> part(nthreads * G * CK, acc_t(0));
  std::vector<char> used(nthreads, 0);
  if (P == 1) {
    // Item (g, block of n): part_g (C, K) += a_rows^T (C, nb) @ b_rows (nb, K).
    const int64_t NB = (stage_a || stage_b) ? std::max<int64_t>(64, std::min<int64_t>(2048, 262144 / std::max<int64_t>(C + K, 1))) : N;
    const int64_t nblk = (N + NB - 1) / NB;
    at::parallel_for(0, groups * nblk, 1, [&](int64_t ib, int64_t ie) {
      const int64_t tid = at::get_thread_num();
      used[tid] = 1;
      std::vector<acc_t> abuf(stage_a ? NB * C : 0), bbuf(stage_b ? NB * K : 0);
      for (int64_t item = ib; item < ie; ++item) {
        const int64_t g = item / nblk, n0 = (item % nblk) * NB, nb = std::min(NB, N - n0);
        Tensor am, bm;
        if (stage_a) {
          for (int64_t n = 0; n < nb; ++n)
            for (int64_t c = 0; c < C; ++c)
              abuf[n * C + c] = static_cast<acc_t>(a[off(av, n0 + n, g, c, 0)]) *
                                drop_scale<acc_t>(da, logical(av, n0 + n, g, c, 0));
          am = mat(abuf.data(), C, nb, 1, C, at_);
        } else {
          am = mat(a + off(av, n0, g, 0, 0), C, nb, av.sc, av.sn, st);
        }
        if (stage_b) {
          for (int64_t n = 0; n < nb; ++n)
            for (int64_t k = 0; k < K; ++k) bbuf[n * K + k] = static_cast<acc_t>(b[off(bv, n0 + n, g, k, 0)]);
          bm = mat(bbuf.data(), nb, K, K, 1, at_);
        } else {
          bm = mat(b + off(bv, n0, g, 0, 0), nb, K, bv.sn, bv.sc, st);
        }
        Tensor o = mat(part.data() + (tid * G + (per_group ? g : 0)) * CK, C, K, K, 1, at_);
        gemm(o, am, bm, true);
      }
    });
  } else {
    // Item (sample n, group g, tile of positions): part (C, K) += a (C, pn) @ b^T (pn, K).
    const int64_t PT = (stage_a || stage_b) ? std::min<int64_t>(P, std::max<int64_t>(64, 65536 / (C + K))) : P;
    const int64_t ntiles = (P + PT - 1) / PT;
    at::parallel_for(0, N * groups * ntiles, 1, [&](int64_t ib, int64_t ie) {
      const int64_t tid = at::get_thread_num();
      used[tid] = 1;
      std::vector<acc_t> abuf(stage_a ? C * PT : 0), bbuf(stage_b ? K * PT : 0);
      for (int64_t item = ib; item < ie; ++item) {
        const int64_t r = item / ntiles, n = r / groups, g = r % groups, p0 = (item % ntiles) * PT;
        const int64_t pn = std::min(PT, P - p0);
        Tensor am, bm;
        if (stage_a) {
          for (int64_t c = 0; c < C; ++c)
            for (int64_t q = 0; q < pn; ++q)
              abuf[c * pn + q] = static_cast<acc_t>(a[off(av, n, g, c, p0 + q)]) *
                                 drop_scale<acc_t>(da, logical(av, n, g, c, p0 + q));
          am = mat(abuf.data(), C, pn, pn, 1, at_);
        } else {
          am = mat(a + off(av, n, g, 0, p0), C, pn, av.sc, av.sp, st);
        }
        if (stage_b) {
          for (int64_t k = 0; k < K; ++k)
            for (int64_t q = 0; q < pn; ++q) bbuf[k * pn + q] = static_cast<acc_t>(b[off(bv, n, g, k, p0 + q)]);
          bm = mat(bbuf.data(), pn, K, 1, pn, at_);
        } else {
          bm = mat(b + off(bv, n, g, 0, p0), pn, K, bv.sp, bv.sc, st);
        }
        Tensor o = mat(part.data() + (tid * G + (per_group ? g : 0)) * CK, C, K, K, 1, at_);
        gemm(o, am, bm, true);
      }
    });
  }
  const acc_t s = static_cast<acc_t>(alpha);
  for (int64_t e = 0; e < G * CK; ++e) {
    acc_t sum = 0;
    for (int64_t t = 0; t < nthreads; ++t)
      if (used[t]) sum += part[t * G * CK + e];
    out[e] = static_cast<scalar_t>(s * sum);
  }
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor for the CPU kernel, got device ", t.device());
}

#define FLORA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// W[a, j, t] = sum_b u1[j, b] K[a, b, t] as one GEMM u1 @ K' (K' = K permuted to (r1, r0 * T)), returned
// as (r0, I1 * T). (A batched GEMM over a with T-wide blocks is several times slower for small T.)
Tensor core_times_u1(const Tensor& K, const Tensor& U1, const ReconDims& d) {
  if (d.T == 1) return at::mm(K.reshape({d.r0, d.r1}), U1.t());
  const Tensor Wp = at::mm(U1, K.permute({1, 0, 2}).reshape({d.r1, d.r0 * d.T}));  // (I1, r0 * T)
  return Wp.view({d.I1, d.r0, d.T}).permute({1, 0, 2}).reshape({d.r0, d.I1 * d.T});
}

// out = base + scale * u0 K u1^T per tap, as GEMMs (ATen/BLAS) in the wider of the two accumulation
// types (of core and of out), rounded once into out.
//   Order A (the usual one): N = scale * u1 K[a] (r0, I1 * T), then out (I0, I1 * T) = base + u0 @ N: one
//     addmm, which adds the base in the same pass (direct), or per block of rows through a ct buffer.
//   Order B (when much cheaper, e.g. a projection: big "core", small factors): M = scale * u0 @ K
//     (I0, r1, T), then u1 @ M' (I1, I0 * T) and one fused pass out = base + permute(that) (add + cast).
Tensor tucker_reconstruct_cpu(const Tensor& core_, const Tensor& u0_, const Tensor& u1_, double scale,
                              const c10::optional<Tensor>& base_) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cpu(core_, "core");
  Tensor base;
  if (base_.has_value() && base_->defined()) {
    check_full_shape(*base_, d, core_, "base");
    base = *base_;
  }
  const auto out_type = base.defined() ? base.scalar_type() : core_.scalar_type();
  const auto ct = c10::promoteTypes(acc_type(core_.scalar_type()), acc_type(out_type));
  const Tensor K = core_.to(ct).reshape({d.r0, d.r1, d.T}), U0 = u0_.to(ct), U1 = u1_.to(ct);
  Tensor out = at::empty({d.I0, d.I1, d.T}, core_.options().dtype(out_type));
  const bool direct = out_type == ct;
  // Multiply-adds of each order plus its copies (weighted 4: memory bound): order A permutes K, order
  // B (T > 1) permutes M and makes one more pass over an output-sized buffer.
  const double costA = double(d.r0) * d.I1 * d.T * (d.r1 + d.I0) + (d.T > 1 ? 4.0 * d.r0 * d.r1 * d.T : 0.0);
  const double costB = double(d.I0) * d.r1 * d.T * (d.r0 + d.I1) +
                       (d.T > 1 ? 4.0 * d.I0 * d.T * (d.r1 + d.I1) : 0.0);
  const bool orderA = costA <= costB;
  const int64_t row = d.I1 * d.T;
  Tensor out2 = out.view({d.I0, row});
  const Tensor base2 = base.defined() ? base.reshape({d.I0, row}) : Tensor();
  // Both orders end in out2 = base2 + A @ B (A: rows of out, B: (k, I1 * T)) when T == 1 or in order A.
  auto final_gemm = [&](const Tensor& A, const Tensor& B) {
    if (direct) {
      if (base.defined())
        at::addmm_out(out2, base2, A, B, 1, 1);
      else
        at::mm_out(out2, A, B);
      return;
    }
    // Through a ct buffer of a block of rows: base cast in, one rounding on the way out.
    const int64_t IB = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row));
    for (int64_t i0 = 0; i0 < d.I0; i0 += IB) {
      const int64_t n = std::min(IB, d.I0 - i0);
      Tensor tmp;
      if (base.defined()) {
        tmp = base2.narrow(0, i0, n).to(ct);
        tmp.addmm_(A.narrow(0, i0, n), B);
      } else {
        tmp = at::mm(A.narrow(0, i0, n), B);
      }
      out2.narrow(0, i0, n).copy_(tmp);
    }
  };
  if (orderA) {
    final_gemm(U0, core_times_u1(K, U1, d).mul_(scale));
  } else {
    const Tensor M = at::mm(U0, K.reshape({d.r0, d.r1 * d.T})).mul_(scale);  // (I0, r1 * T)
    if (d.T == 1) {
      final_gemm(M, U1.t());
    } else {
      const Tensor Mp = M.view({d.I0, d.r1, d.T}).permute({1, 0, 2}).reshape({d.r1, d.I0 * d.T});
      const Tensor prod = at::mm(U1, Mp).view({d.I1, d.I0, d.T}).permute({1, 0, 2});  // (I0, I1, T) view
      if (base.defined())
        at::add_out(out, base, prod);  // computed in ct, rounded once into out's dtype
      else
        out.copy_(prod);
    }
  }
  return out;
}

// The adjoint, as GEMMs in the core's accumulation type; g (I0, I1*T) is read by two GEMMs and
// nothing larger than max(r0, r1) * I1 * T is materialized:
//   P = u0^T g (r0, I1, T), P' its (I1, r0 * T) permutation;  dcore[a] = s u1^T P[a];
//   du1 = s P' K'' (K'' = K as (r0 * T, r1));  W[a] = u1 K[a] (r0, I1 * T);  du0 = s g W^T.
std::tuple<Tensor, Tensor, Tensor> tucker_reconstruct_backward_cpu(const Tensor& grad_, const Tensor& core_,
                                                                   const Tensor& u0_, const Tensor& u1_, double scale) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cpu(core_, "core");
  check_full_shape(grad_, d, core_, "grad");
  const auto ct = acc_type(core_.scalar_type());
  const int64_t row = d.I1 * d.T;
  // grad is rounded to the core's dtype first (as the op always did), then computed in ct.
  Tensor g = grad_.scalar_type() == core_.scalar_type() ? grad_ : grad_.to(core_.scalar_type());
  g = g.to(ct).reshape({d.I0, row});
  const Tensor K = core_.to(ct).reshape({d.r0, d.r1, d.T}), U0 = u0_.to(ct), U1 = u1_.to(ct);
  const Tensor P = at::mm(U0.t(), g);  // (r0, I1 * T)
  Tensor dcore, du1;
  if (d.T == 1) {
    dcore = at::mm(P, U1);                           // (r0, r1)
    du1 = at::mm(P.t(), K.reshape({d.r0, d.r1}));    // (I1, r1)
  } else {
    const Tensor Pp = P.view({d.r0, d.I1, d.T}).permute({1, 0, 2}).reshape({d.I1, d.r0 * d.T});
    dcore = at::mm(U1.t(), Pp).view({d.r1, d.r0, d.T}).permute({1, 0, 2});  // (r0, r1, T) view
    du1 = at::mm(Pp, K.permute({0, 2, 1}).reshape({d.r0 * d.T, d.r1}));     // (I1, r1)
  }
  const Tensor du0 = at::mm(g, core_times_u1(K, U1, d).t());  // (I0, r0)
  const auto t = core_.scalar_type();
  auto fin = [&](const Tensor& x) { return (x * scale).to(t).contiguous(); };
  return {fin(dcore).view({d.r0, d.r1, d.T}), fin(du0), fin(du1)};
}

Tensor adapter_shrink_cpu(const Tensor& x_, const Tensor& u_in_, int64_t groups, double p, int64_t seed) {
  check_in_factor(x_, u_in_, groups, "x", "u_in");
  check_cpu(x_, "x");
  check_dropout(p);
  Tensor x = x_, u = u_in_.contiguous();
  const Act v = input_view(x, groups);
  const int64_t r = u.size(1);
  Tensor z = empty_with_channels(x_, groups * r);
  const Act zv = inplace_view(z, groups, "z");
  FLORA_DISPATCH(x.scalar_type(), "adapter_shrink", [&] {
    mix_cpu<scalar_t>(x.data_ptr<scalar_t>(), v, u.data_ptr<scalar_t>(), 0, 1, r, z.data_ptr<scalar_t>(), zv, 1.0,
                      false, make_drop(p, seed), DropParams{});
  });
  return z;
}

// y (+)= scale * u_out_g . z, written through y's strides (with accumulate, y may hold the bias).
void expand_into(Tensor& y, const Tensor& z_, const Tensor& u_out_, int64_t groups, double scale, bool accumulate) {
  const ExpandDims e = check_expand(y, z_, u_out_, groups);
  check_cpu(z_, "z");
  const Act yv = inplace_view(y, groups, "y");
  Tensor z = z_, u = u_out_.contiguous();
  const Act zv = input_view(z, groups);
  FLORA_DISPATCH(y.scalar_type(), "adapter_expand", [&] {
    mix_cpu<scalar_t>(z.data_ptr<scalar_t>(), zv, u.data_ptr<scalar_t>(), e.Og * e.r, e.r, 1, y.data_ptr<scalar_t>(),
                      yv, scale, accumulate, DropParams{}, DropParams{});
  });
}

void adapter_expand_cpu(Tensor& y, const Tensor& z, const Tensor& u_out, int64_t groups, double scale) {
  expand_into(y, z, u_out, groups, scale, true);
}

Tensor adapter_expand_out_cpu(const Tensor& z, const Tensor& u_out, int64_t groups, double scale,
                              const c10::optional<Tensor>& bias) {
  check_expand_out(z, u_out, bias);
  check_cpu(z, "z");
  Tensor y = empty_with_channels(z, u_out.size(0));
  const bool with_bias = bias.has_value() && bias->defined();
  if (with_bias) {
    std::vector<int64_t> bshape(y.dim(), 1);
    bshape[1] = y.size(1);
    y.copy_(bias->view(bshape).expand_as(y));
  }
  expand_into(y, z, u_out, groups, scale, with_bias);
  return y;
}

Tensor adapter_expand_grad_input_cpu(const Tensor& dy_, const Tensor& u_out_, int64_t groups, double scale) {
  const ChanView cv = check_out_factor(dy_, u_out_, groups);
  check_cpu(dy_, "dy");
  Tensor dy = dy_, u = u_out_.contiguous();
  const Act v = input_view(dy, groups);
  const int64_t r = u.size(1);
  Tensor dz = empty_with_channels(dy_, groups * r);
  const Act zv = inplace_view(dz, groups, "dz");
  FLORA_DISPATCH(dy.scalar_type(), "adapter_expand_grad_input", [&] {
    mix_cpu<scalar_t>(dy.data_ptr<scalar_t>(), v, u.data_ptr<scalar_t>(), cv.C * r, 1, r, dz.data_ptr<scalar_t>(), zv,
                      scale, false, DropParams{}, DropParams{});
  });
  return dz;
}

void shrink_grad_input_impl(Tensor& dx, const Tensor& dz_, const Tensor& u_in_, int64_t groups, double p, int64_t seed,
                            bool accumulate) {
  check_in_factor(dz_, u_in_.t(), groups, "dz", "u_in^T");
  check_cpu(dz_, "dz");
  check_dropout(p);
  const Act xv = inplace_view(dx, groups, "dx");
  Tensor dz = dz_, u = u_in_.contiguous();
  const Act v = input_view(dz, groups);
  FLORA_DISPATCH(dz.scalar_type(), "adapter_shrink_grad_input", [&] {
    mix_cpu<scalar_t>(dz.data_ptr<scalar_t>(), v, u.data_ptr<scalar_t>(), 0, v.c, 1, dx.data_ptr<scalar_t>(), xv, 1.0,
                      accumulate, DropParams{}, make_drop(p, seed));
  });
}

Tensor adapter_shrink_grad_input_cpu(const Tensor& dz, const Tensor& u_in, int64_t groups, double p, int64_t seed) {
  check_shrink_grad_input(dz, u_in, groups);
  Tensor dx = empty_with_channels(dz, groups * u_in.size(0));
  shrink_grad_input_impl(dx, dz, u_in, groups, p, seed, false);
  return dx;
}

void adapter_shrink_grad_input_inplace_cpu(Tensor& dx, const Tensor& dz, const Tensor& u_in, int64_t groups, double p,
                                           int64_t seed) {
  check_shrink_grad_input_inplace(dx, dz, u_in, groups);
  shrink_grad_input_impl(dx, dz, u_in, groups, p, seed, true);
}

// The core conv's geometry as ATen's conv arguments (per spatial dim, in dim order).
struct AtenConvArgs {
  std::vector<int64_t> stride, dilation, sym, zeros, pad_nd;  // pad_nd: constant_pad_nd's (last dim first)
  bool symmetric = true;
};

AtenConvArgs aten_conv_args(c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  AtenConvArgs a{stride.vec(), dilation.vec(), {}, std::vector<int64_t>(stride.size(), 0), {}, true};
  for (size_t d = 0; d < stride.size(); ++d) {
    a.sym.push_back(padding[2 * d]);
    a.symmetric = a.symmetric && padding[2 * d] == padding[2 * d + 1];
  }
  for (size_t d = stride.size(); d-- > 0;) {
    a.pad_nd.push_back(padding[2 * d]);
    a.pad_nd.push_back(padding[2 * d + 1]);
  }
  return a;
}

// A copy of t in a new tensor of layout_of(like) (the strides the fakes give it).
Tensor in_layout_of(const Tensor& t, const Tensor& like) {
  Tensor out = at::empty(t.sizes(), t.options().memory_format(layout_of(like)));
  out.copy_(t);
  return out;
}

// u = conv(z, k) (zero padding, asymmetric allowed; ATen's conv on the small tensors), in z's layout,
// then y += scale * u_out . u in place (the expand kernel). Returns u.
Tensor adapter_conv_expand_cpu(Tensor& y, const Tensor& z, const Tensor& k, const Tensor& u_out,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               double scale) {
  (void)check_conv_expand(y, z, k, u_out, stride, padding, dilation);
  check_cpu(z, "z");
  const AtenConvArgs a = aten_conv_args(stride, padding, dilation);
  const Tensor zp = a.symmetric ? z : at::constant_pad_nd(z, a.pad_nd, 0);
  const Tensor u = in_layout_of(at::convolution(zp, k, c10::nullopt, a.stride, a.symmetric ? a.sym : a.zeros,
                                                a.dilation, false, a.zeros, 1),
                                z);
  expand_into(y, u, u_out, 1, scale, true);
  return u;
}

// dz = the core conv's input gradient for du (ATen's convolution backward on the small tensors, through
// the adjoint of the padding), in du's layout, then dx += mask * (u_in . dz) in place. Returns dz.
Tensor adapter_conv_shrink_grad_input_cpu(Tensor& dx, const Tensor& du, const Tensor& k, const Tensor& u_in,
                                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                                          c10::IntArrayRef dilation, double p, int64_t seed) {
  (void)check_conv_shrink_grad(dx, du, k, u_in, stride, padding, dilation, p);
  check_cpu(du, "du");
  const AtenConvArgs a = aten_conv_args(stride, padding, dilation);
  std::vector<int64_t> zshape{du.size(0), k.size(1)};
  for (int64_t d = 0; d < du.dim() - 2; ++d)
    zshape.push_back(dx.size(2 + d) + (a.symmetric ? 0 : padding[2 * d] + padding[2 * d + 1]));
  // Only its shape and options are read (input gradient only).
  const Tensor zp = at::empty(zshape, du.options().memory_format(layout_of(du)));
  Tensor g = std::get<0>(at::convolution_backward(du, zp, k, c10::nullopt, a.stride, a.symmetric ? a.sym : a.zeros,
                                                  a.dilation, false, a.zeros, 1, {true, false, false}));
  if (!a.symmetric)
    for (int64_t d = 0; d < du.dim() - 2; ++d) g = g.narrow(2 + d, padding[2 * d], dx.size(2 + d));
  const Tensor dz = in_layout_of(g, du);
  shrink_grad_input_impl(dx, dz, u_in, 1, p, seed, true);
  return dz;
}

Tensor adapter_factor_grad_cpu(const Tensor& a_, const Tensor& b_, int64_t groups, bool per_group, double scale,
                               double p, int64_t seed) {
  const auto [va, vb] = check_factor_grad(a_, b_, groups, p);
  check_cpu(a_, "a");
  Tensor a = a_, b = b_;
  const Act av = input_view(a, groups), bv = input_view(b, groups);
  Tensor out = at::empty({(per_group ? groups : 1) * va.C, vb.C}, a.options().memory_format(at::MemoryFormat::Contiguous));
  FLORA_DISPATCH(a.scalar_type(), "adapter_factor_grad", [&] {
    corr_cpu<scalar_t>(a.data_ptr<scalar_t>(), av, b.data_ptr<scalar_t>(), bv, out.data_ptr<scalar_t>(), per_group,
                       scale, make_drop(p, seed));
  });
  return out;
}

std::tuple<Tensor, Tensor> adapter_linear_grad_cpu(const Tensor& dy, const Tensor& s, const Tensor& b) {
  check_linear_grad(dy, s, b);
  check_cpu(dy, "dy");
  return {adapter_expand_grad_input_cpu(dy, b, 1, 1.0), adapter_factor_grad_cpu(dy, s, 1, false, 1.0, 0.0, 0)};
}

Tensor dropout_mask_cpu(const Tensor& x, double p, int64_t seed) {
  check_tensor(x, "x");
  check_cpu(x, "x");
  check_dropout(p);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const DropParams dp = make_drop(p, seed);
  FLORA_DISPATCH(x.scalar_type(), "dropout_mask", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = static_cast<scalar_t>(drop_scale<double>(dp, i));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("tucker_reconstruct", &tucker_reconstruct_cpu);
  m.impl("tucker_reconstruct_backward", &tucker_reconstruct_backward_cpu);
  m.impl("adapter_shrink", &adapter_shrink_cpu);
  m.impl("adapter_expand_", &adapter_expand_cpu);
  m.impl("adapter_expand", &adapter_expand_out_cpu);
  m.impl("adapter_expand_grad_input", &adapter_expand_grad_input_cpu);
  m.impl("adapter_shrink_grad_input", &adapter_shrink_grad_input_cpu);
  m.impl("adapter_shrink_grad_input_", &adapter_shrink_grad_input_inplace_cpu);
  m.impl("adapter_factor_grad", &adapter_factor_grad_cpu);
  m.impl("adapter_linear_grad", &adapter_linear_grad_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
  m.impl("adapter_conv_expand_", &adapter_conv_expand_cpu);
  m.impl("adapter_conv_shrink_grad_input_", &adapter_conv_shrink_grad_input_cpu);
}

}  // namespace flora
