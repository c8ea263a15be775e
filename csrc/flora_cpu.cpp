// flora ops: schemas (TORCH_LIBRARY(flora)) and CPU implementations (at::parallel_for).
//
// Op semantics (see docs/kernels/cuda.md). "Channel views": an activation of shape
// (N, groups * C, *spatial) is read as (R = N * groups, C, P = prod(spatial)), each group using
// the same small factor. A 2-D (M, features) tensor is the case N = M, P = 1.
//
//   tucker_reconstruct(core (r0, r1, T), u0 (I0, r0), u1 (I1, r1), scale, base?)
//       out[i, j, t] = base[i, j, t] + scale * sum_ab u0[i, a] core[a, b, t] u1[j, b]
//   tucker_reconstruct_backward(grad (I0, I1, T), core, u0, u1, scale) -> (dcore, du0, du1)
//   adapter_shrink(x, u_in (C, r), groups, p, seed)       z = u_in^T . dropout(x)   (per group)
//   adapter_expand_(y!, z, u_out (groups*O, r), groups, scale)
//                                                         y += scale * u_out_g . z  (group g uses rows g*O..)
//   adapter_expand_grad_input(dy, u_out, groups, scale)   dz = scale * u_out_g^T . dy
//   adapter_shrink_grad_input(dz, u_in, groups, p, seed)  dx = mask * (u_in . dz)
//   adapter_shrink_grad_input_(dx!, dz, u_in, ...)        dx += mask * (u_in . dz)
//   adapter_factor_grad(a, b, groups, per_group, scale, p, seed)
//       out[c, k] = scale * sum dropout(a)[., c, .] b[., k, .], summed over groups, or one
//       (C, K) block per group stacked to (groups * C, K) when per_group
//   dropout_mask(x, p, seed)                              the multiplier (0 or 1/(1-p)) per element of x
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "flora_checks.h"

namespace flora {
namespace {

using at::Tensor;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// out[r, o, p] (= or +=) mask_out * alpha * sum_c w_g(o, c) * mask_in * in[r, c, p], g = r % groups,
// w_g(o, c) = w[g * w_gs + o * ws_o + c * ws_c]; masks index the flat element of `in` / `out`.
template <typename scalar_t>
void mix_cpu(const scalar_t* in, const scalar_t* w, int64_t groups, int64_t w_gs, int64_t ws_o, int64_t ws_c,
             scalar_t* out, int64_t R, int64_t C, int64_t O, int64_t P, double alpha, bool accumulate,
             const DropParams& din, const DropParams& dout) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nw = w_gs == 0 ? 1 : groups;  // distinct weights
  std::vector<acc_t> wt_all(nw * C * O);      // wt[(g * C + c) * O + o] = alpha * w_g(o, c)
  for (int64_t g = 0; g < nw; ++g)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t o = 0; o < O; ++o)
        wt_all[(g * C + c) * O + o] =
            static_cast<acc_t>(alpha) * static_cast<acc_t>(w[g * w_gs + o * ws_o + c * ws_c]);
  auto store = [&](int64_t idx, acc_t v) {
    v *= drop_scale<acc_t>(dout, idx);
    out[idx] = accumulate ? static_cast<scalar_t>(static_cast<acc_t>(out[idx]) + v) : static_cast<scalar_t>(v);
  };
  if (P == 1) {
    at::parallel_for(0, R, grain_for(C * O), [&](int64_t rb, int64_t re) {
      std::vector<acc_t> acc(O);
      for (int64_t r = rb; r < re; ++r) {
        const acc_t* wt = wt_all.data() + (nw == 1 ? 0 : (r % groups) * C * O);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(in[r * C + c]) * drop_scale<acc_t>(din, r * C + c);
          if (v == acc_t(0)) continue;
          const acc_t* wr = wt + c * O;
          for (int64_t o = 0; o < O; ++o) acc[o] += wr[o] * v;
        }
        for (int64_t o = 0; o < O; ++o) store(r * O + o, acc[o]);
      }
    });
    return;
  }
  const int64_t PT = std::min<int64_t>(P, std::max<int64_t>(16, 32768 / (C + O)));
  const int64_t ntiles = (P + PT - 1) / PT;
  at::parallel_for(0, R * ntiles, grain_for(C * O * PT), [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> xin(C * PT), acc(O * PT);
    for (int64_t item = ib; item < ie; ++item) {
      const int64_t r = item / ntiles, p0 = (item % ntiles) * PT, pn = std::min(PT, P - p0);
      const acc_t* wt = wt_all.data() + (nw == 1 ? 0 : (r % groups) * C * O);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t base = (r * C + c) * P + p0;
        for (int64_t q = 0; q < pn; ++q)
          xin[c * PT + q] = static_cast<acc_t>(in[base + q]) * drop_scale<acc_t>(din, base + q);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* xr = xin.data() + c * PT;
        for (int64_t o = 0; o < O; ++o) {
          const acc_t wv = wt[c * O + o];
          acc_t* ar = acc.data() + o * PT;
          for (int64_t q = 0; q < pn; ++q) ar[q] += wv * xr[q];
        }
      }
      for (int64_t o = 0; o < O; ++o) {
        const int64_t base = (r * O + o) * P + p0;
        for (int64_t q = 0; q < pn; ++q) store(base + q, acc[o * PT + q]);
      }
    }
  });
}

// out[c, k] = alpha * sum over rows r = r0, r0 + step, ... < R and p of mask * a[r, c, p] * b[r, k, p].
template <typename scalar_t>
void corr_rows_cpu(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t R, int64_t C, int64_t K, int64_t P,
                   int64_t r0, int64_t step, double alpha, const DropParams& da) {
  using acc_t = at::opmath_type<scalar_t>;
  if (P == 1) {
    const int64_t CB = 32, nblk = (C + CB - 1) / CB;
    at::parallel_for(0, nblk, 1, [&](int64_t bb, int64_t be) {
      std::vector<acc_t> acc(CB * K), bk(K);
      for (int64_t blk = bb; blk < be; ++blk) {
        const int64_t c0 = blk * CB, cn = std::min(CB, C - c0);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t r = r0; r < R; r += step) {
          for (int64_t k = 0; k < K; ++k) bk[k] = static_cast<acc_t>(b[r * K + k]);
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t idx = r * C + c0 + c;
            const acc_t av = static_cast<acc_t>(a[idx]) * drop_scale<acc_t>(da, idx);
            if (av == acc_t(0)) continue;
            acc_t* ar = acc.data() + c * K;
            for (int64_t k = 0; k < K; ++k) ar[k] += av * bk[k];
          }
        }
        for (int64_t c = 0; c < cn; ++c)
          for (int64_t k = 0; k < K; ++k)
            out[(c0 + c) * K + k] = static_cast<scalar_t>(static_cast<acc_t>(alpha) * acc[c * K + k]);
      }
    });
    return;
  }
  // P > 1: per channel c, elementwise accumulators acc[k, q] over a tile of positions (vectorizes
  // without reassociating a reduction), summed once at the end.
  const int64_t PT = std::min<int64_t>(P, 256);
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> arow(PT), acc(K * PT);
    for (int64_t c = cb; c < ce; ++c) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t r = r0; r < R; r += step) {
        for (int64_t p0 = 0; p0 < P; p0 += PT) {
          const int64_t pn = std::min(PT, P - p0), base = (r * C + c) * P + p0;
          for (int64_t q = 0; q < pn; ++q)
            arow[q] = static_cast<acc_t>(a[base + q]) * drop_scale<acc_t>(da, base + q);
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* br = b + (r * K + k) * P + p0;
            acc_t* ak = acc.data() + k * PT;
            for (int64_t q = 0; q < pn; ++q) ak[q] += arow[q] * static_cast<acc_t>(br[q]);
          }
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        acc_t sum = 0;
        for (int64_t q = 0; q < PT; ++q) sum += acc[k * PT + q];
        out[c * K + k] = static_cast<scalar_t>(static_cast<acc_t>(alpha) * sum);
      }
    }
  });
}

// out[c, k] = alpha * sum_{r, p} mask * a[r, c, p] * b[r, k, p]   (G = 1), or with G = groups
// one (C, K) block per group: out[g, c, k] sums only the rows r with r % groups == g.
template <typename scalar_t>
void corr_cpu(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t R, int64_t C, int64_t K, int64_t P,
              int64_t groups, bool per_group, double alpha, const DropParams& da) {
  if (per_group && groups > 1) {
    // Each group is an independent reduction over the rows g, g + groups, ...
    for (int64_t g = 0; g < groups; ++g)
      corr_rows_cpu<scalar_t>(a, b, out + g * C * K, R, C, K, P, g, groups, alpha, da);
    return;
  }
  corr_rows_cpu<scalar_t>(a, b, out, R, C, K, P, 0, 1, alpha, da);
}

template <typename T>
std::vector<at::opmath_type<T>> to_acc(const T* p, int64_t n, double mul = 1.0) {
  std::vector<at::opmath_type<T>> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<at::opmath_type<T>>(mul) * static_cast<at::opmath_type<T>>(p[i]);
  return v;
}

template <typename core_t, typename out_t>
void reconstruct_cpu_kernel(const Tensor& core, const Tensor& u0, const Tensor& u1, double scale, const Tensor* base,
                            Tensor& out, const ReconDims& d) {
  using acc_t = at::opmath_type<core_t>;
  const auto K = to_acc(core.data_ptr<core_t>(), d.r0 * d.r1 * d.T, scale);
  const auto U1 = to_acc(u1.data_ptr<core_t>(), d.I1 * d.r1);
  std::vector<acc_t> U1t(d.r1 * d.I1);  // (r1, I1)
  for (int64_t j = 0; j < d.I1; ++j)
    for (int64_t b = 0; b < d.r1; ++b) U1t[b * d.I1 + j] = U1[j * d.r1 + b];
  const core_t* U0 = u0.data_ptr<core_t>();
  const out_t* B = base ? base->data_ptr<out_t>() : nullptr;
  out_t* Y = out.data_ptr<out_t>();
  const int64_t RT = d.r1 * d.T, row = d.I1 * d.T;
  using add_t = decltype(acc_t() + at::opmath_type<out_t>());
  at::parallel_for(0, d.I0, grain_for(row * d.r1), [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> Pi(RT), acc(row);
    for (int64_t i = ib; i < ie; ++i) {
      std::fill(Pi.begin(), Pi.end(), acc_t(0));  // Pi[b, t] = sum_a u0[i, a] K[a, b, t]
      for (int64_t a = 0; a < d.r0; ++a) {
        const acc_t ua = static_cast<acc_t>(U0[i * d.r0 + a]);
        const acc_t* ka = K.data() + a * RT;
        for (int64_t bt = 0; bt < RT; ++bt) Pi[bt] += ua * ka[bt];
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));  // acc[j, t] = sum_b u1[j, b] Pi[b, t]
      for (int64_t b = 0; b < d.r1; ++b) {
        const acc_t* ub = U1t.data() + b * d.I1;
        const acc_t* pb = Pi.data() + b * d.T;
        if (d.T == 1) {
          const acc_t pv = pb[0];
          for (int64_t j = 0; j < d.I1; ++j) acc[j] += ub[j] * pv;
        } else {
          for (int64_t j = 0; j < d.I1; ++j)
            for (int64_t t = 0; t < d.T; ++t) acc[j * d.T + t] += ub[j] * pb[t];
        }
      }
      // Add in the wider of the two accumulation types, round once.
      out_t* y = Y + i * row;
      if (B) {
        const out_t* bi = B + i * row;
        for (int64_t e = 0; e < row; ++e) y[e] = static_cast<out_t>(static_cast<add_t>(bi[e]) + static_cast<add_t>(acc[e]));
      } else {
        for (int64_t e = 0; e < row; ++e) y[e] = static_cast<out_t>(acc[e]);
      }
    }
  });
}

template <typename scalar_t>
void reconstruct_backward_cpu_kernel(const Tensor& g, const Tensor& core, const Tensor& u0, const Tensor& u1,
                                     double scale, Tensor& dcore, Tensor& du0, Tensor& du1, const ReconDims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* G = g.data_ptr<scalar_t>();
  const auto K = to_acc(core.data_ptr<scalar_t>(), d.r0 * d.r1 * d.T);
  const auto U0 = to_acc(u0.data_ptr<scalar_t>(), d.I0 * d.r0);
  const auto U1 = to_acc(u1.data_ptr<scalar_t>(), d.I1 * d.r1);
  const int64_t T = d.T, r0T = d.r0 * T, r1T = d.r1 * T;
  // Q[i, b, t] = sum_j g[i, j, t] u1[j, b]   (I0 x r1 x T <= grad)
  std::vector<acc_t> Q(d.I0 * r1T, acc_t(0));
  at::parallel_for(0, d.I0, grain_for(d.I1 * r1T), [&](int64_t ib, int64_t ie) {
    for (int64_t i = ib; i < ie; ++i) {
      acc_t* q = Q.data() + i * r1T;
      for (int64_t j = 0; j < d.I1; ++j) {
        const scalar_t* gr = G + (i * d.I1 + j) * T;
        const acc_t* uj = U1.data() + j * d.r1;
        if (T == 1) {
          const acc_t gv = static_cast<acc_t>(gr[0]);
          for (int64_t b = 0; b < d.r1; ++b) q[b] += uj[b] * gv;
        } else {
          for (int64_t b = 0; b < d.r1; ++b)
            for (int64_t t = 0; t < T; ++t) q[b * T + t] += uj[b] * static_cast<acc_t>(gr[t]);
        }
      }
    }
  });
  // Rm[j, a, t] = sum_i g[i, j, t] u0[i, a]   (I1 x r0 x T <= grad), blocks of j.
  std::vector<acc_t> Rm(d.I1 * r0T, acc_t(0));
  const int64_t JB = 16, njb = (d.I1 + JB - 1) / JB;
  at::parallel_for(0, njb, grain_for(JB * d.I0 * r0T), [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t j0 = blk * JB, j1 = std::min(d.I1, j0 + JB);
      for (int64_t i = 0; i < d.I0; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t* gr = G + (i * d.I1 + j) * T;
          acc_t* rr = Rm.data() + j * r0T;
          const acc_t* ui = U0.data() + i * d.r0;
          if (T == 1) {
            const acc_t gv = static_cast<acc_t>(gr[0]);
            for (int64_t a = 0; a < d.r0; ++a) rr[a] += ui[a] * gv;
          } else {
            for (int64_t a = 0; a < d.r0; ++a)
              for (int64_t t = 0; t < T; ++t) rr[a * T + t] += ui[a] * static_cast<acc_t>(gr[t]);
          }
        }
      }
    }
  });
  const acc_t s = static_cast<acc_t>(scale);
  scalar_t* DK = dcore.data_ptr<scalar_t>();
  scalar_t* DU0 = du0.data_ptr<scalar_t>();
  scalar_t* DU1 = du1.data_ptr<scalar_t>();
  // dcore[a, b, t] = s * sum_i u0[i, a] Q[i, b, t]
  at::parallel_for(0, d.r0, 1, [&](int64_t ab, int64_t ae) {
    std::vector<acc_t> acc(r1T);
    for (int64_t a = ab; a < ae; ++a) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < d.I0; ++i) {
        const acc_t ua = U0[i * d.r0 + a];
        const acc_t* q = Q.data() + i * r1T;
        for (int64_t bt = 0; bt < r1T; ++bt) acc[bt] += ua * q[bt];
      }
      for (int64_t bt = 0; bt < r1T; ++bt) DK[a * r1T + bt] = static_cast<scalar_t>(s * acc[bt]);
    }
  });
  // du0[i, a] = s * sum_{b,t} Q[i, b, t] K[a, b, t]
  at::parallel_for(0, d.I0, grain_for(d.r0 * r1T), [&](int64_t ib, int64_t ie) {
    for (int64_t i = ib; i < ie; ++i)
      for (int64_t a = 0; a < d.r0; ++a) {
        acc_t acc = 0;
        for (int64_t bt = 0; bt < r1T; ++bt) acc += Q[i * r1T + bt] * K[a * r1T + bt];
        DU0[i * d.r0 + a] = static_cast<scalar_t>(s * acc);
      }
  });
  // du1[j, b] = s * sum_{a,t} Rm[j, a, t] K[a, b, t]
  at::parallel_for(0, d.I1, grain_for(d.r1 * r0T), [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j)
      for (int64_t b = 0; b < d.r1; ++b) {
        acc_t acc = 0;
        for (int64_t a = 0; a < d.r0; ++a)
          for (int64_t t = 0; t < T; ++t) acc += Rm[j * r0T + a * T + t] * K[(a * d.r1 + b) * T + t];
        DU1[j * d.r1 + b] = static_cast<scalar_t>(s * acc);
      }
  });
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor for the CPU kernel, got device ", t.device());
}

#define FLORA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

Tensor tucker_reconstruct_cpu(const Tensor& core_, const Tensor& u0_, const Tensor& u1_, double scale,
                              const c10::optional<Tensor>& base_) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cpu(core_, "core");
  Tensor core = core_.contiguous(), u0 = u0_.contiguous(), u1 = u1_.contiguous();
  Tensor base;
  if (base_.has_value() && base_->defined()) {
    check_full_shape(*base_, d, core_, "base");
    base = base_->contiguous();
  }
  const auto out_type = base.defined() ? base.scalar_type() : core.scalar_type();
  Tensor out = at::empty({d.I0, d.I1, d.T}, core.options().dtype(out_type));
  FLORA_DISPATCH(core.scalar_type(), "tucker_reconstruct", [&] {
    using core_t = scalar_t;
    FLORA_DISPATCH(out_type, "tucker_reconstruct_out", [&] {
      reconstruct_cpu_kernel<core_t, scalar_t>(core, u0, u1, scale, base.defined() ? &base : nullptr, out, d);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> tucker_reconstruct_backward_cpu(const Tensor& grad_, const Tensor& core_,
                                                                   const Tensor& u0_, const Tensor& u1_, double scale) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cpu(core_, "core");
  check_full_shape(grad_, d, core_, "grad");
  Tensor core = core_.contiguous(), u0 = u0_.contiguous(), u1 = u1_.contiguous();
  Tensor grad = grad_.to(core.scalar_type()).contiguous();
  Tensor dcore = at::empty_like(core), du0 = at::empty_like(u0), du1 = at::empty_like(u1);
  FLORA_DISPATCH(core.scalar_type(), "tucker_reconstruct_backward", [&] {
    reconstruct_backward_cpu_kernel<scalar_t>(grad, core, u0, u1, scale, dcore, du0, du1, d);
  });
  return {dcore, du0, du1};
}

Tensor adapter_shrink_cpu(const Tensor& x_, const Tensor& u_in_, int64_t groups, double p, int64_t seed) {
  const ChanView v = check_in_factor(x_, u_in_, groups, "x", "u_in");
  check_cpu(x_, "x");
  check_dropout(p);
  Tensor x = x_.contiguous(), u = u_in_.contiguous();
  const int64_t r = u.size(1);
  Tensor z = at::empty(with_channels(x, groups * r), x.options());
  FLORA_DISPATCH(x.scalar_type(), "adapter_shrink", [&] {
    mix_cpu<scalar_t>(x.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), groups, 0, 1, r, z.data_ptr<scalar_t>(), v.R, v.C, r, v.P,
                      1.0, false, make_drop(p, seed), DropParams{});
  });
  return z;
}

void adapter_expand_cpu(Tensor& y, const Tensor& z_, const Tensor& u_out_, int64_t groups, double scale) {
  const ExpandDims e = check_expand(y, z_, u_out_, groups);
  check_cpu(z_, "z");
  Tensor z = z_.contiguous(), u = u_out_.contiguous();
  FLORA_DISPATCH(y.scalar_type(), "adapter_expand_", [&] {
    mix_cpu<scalar_t>(z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), groups, e.Og * e.r, e.r, 1,
                      y.data_ptr<scalar_t>(), e.v.R, e.r, e.Og, e.v.P, scale, true, DropParams{}, DropParams{});
  });
}

Tensor adapter_expand_grad_input_cpu(const Tensor& dy_, const Tensor& u_out_, int64_t groups, double scale) {
  const ChanView v = check_out_factor(dy_, u_out_, groups);
  check_cpu(dy_, "dy");
  Tensor dy = dy_.contiguous(), u = u_out_.contiguous();
  const int64_t r = u.size(1);
  Tensor dz = at::empty(with_channels(dy, groups * r), dy.options());
  FLORA_DISPATCH(dy.scalar_type(), "adapter_expand_grad_input", [&] {
    mix_cpu<scalar_t>(dy.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), groups, v.C * r, 1, r, dz.data_ptr<scalar_t>(),
                      v.R, v.C, r, v.P, scale, false, DropParams{}, DropParams{});
  });
  return dz;
}

void shrink_grad_input_impl(Tensor& dx, const Tensor& dz_, const Tensor& u_in_, int64_t groups, double p, int64_t seed,
                            bool accumulate) {
  const ChanView v = check_in_factor(dz_, u_in_.t(), groups, "dz", "u_in^T");
  check_cpu(dz_, "dz");
  check_dropout(p);
  Tensor dz = dz_.contiguous(), u = u_in_.contiguous();
  const int64_t C = u.size(0);
  FLORA_DISPATCH(dz.scalar_type(), "adapter_shrink_grad_input", [&] {
    mix_cpu<scalar_t>(dz.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), groups, 0, v.C, 1, dx.data_ptr<scalar_t>(), v.R, v.C, C,
                      v.P, 1.0, accumulate, DropParams{}, make_drop(p, seed));
  });
}

Tensor adapter_shrink_grad_input_cpu(const Tensor& dz, const Tensor& u_in, int64_t groups, double p, int64_t seed) {
  check_tensor(dz, "dz");
  check_tensor(u_in, "u_in");
  check_dim(u_in, 2, "u_in", "(channels per group, rank)");
  TORCH_CHECK(dz.dim() >= 2, "dz: expected at least 2 dims, got shape ", dz.sizes());
  TORCH_CHECK(groups >= 1, "groups: expected an int >= 1, got ", groups);
  Tensor dx = at::empty(with_channels(dz, groups * u_in.size(0)), dz.options());
  shrink_grad_input_impl(dx, dz, u_in, groups, p, seed, false);
  return dx;
}

void adapter_shrink_grad_input_inplace_cpu(Tensor& dx, const Tensor& dz, const Tensor& u_in, int64_t groups, double p,
                                           int64_t seed) {
  check_tensor(dx, "dx");
  check_tensor(dz, "dz");
  check_tensor(u_in, "u_in");
  check_like(dx, dz, "dx", "dz");
  check_dim(u_in, 2, "u_in", "(channels per group, rank)");
  TORCH_CHECK(dx.is_contiguous(), "dx: expected a contiguous tensor (it is updated in place), got strides ",
              dx.strides());
  TORCH_CHECK(dz.dim() >= 2, "dz: expected at least 2 dims, got shape ", dz.sizes());
  check_same_batch_spatial(dz, dx, "dz", "dx");
  TORCH_CHECK(groups >= 1 && dx.size(1) == groups * u_in.size(0), "dx: expected ", groups * u_in.size(0),
              " channels (groups * u_in.shape[0]), got shape ", dx.sizes());
  shrink_grad_input_impl(dx, dz, u_in, groups, p, seed, true);
}

Tensor adapter_factor_grad_cpu(const Tensor& a_, const Tensor& b_, int64_t groups, bool per_group, double scale,
                               double p, int64_t seed) {
  check_tensor(a_, "a");
  check_tensor(b_, "b");
  check_like(b_, a_, "b", "a");
  check_cpu(a_, "a");
  check_dropout(p);
  const ChanView va = chan_view(a_, groups, "a");
  const ChanView vb = chan_view(b_, groups, "b");
  check_same_batch_spatial(a_, b_, "a", "b");
  Tensor a = a_.contiguous(), b = b_.contiguous();
  Tensor out = at::empty({(per_group ? groups : 1) * va.C, vb.C}, a.options());
  FLORA_DISPATCH(a.scalar_type(), "adapter_factor_grad", [&] {
    corr_cpu<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), va.R, va.C, vb.C,
                       va.P, groups, per_group, scale, make_drop(p, seed));
  });
  return out;
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

TORCH_LIBRARY(flora, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("tucker_reconstruct(Tensor core, Tensor u0, Tensor u1, float scale, Tensor? base) -> Tensor", tags);
  m.def("tucker_reconstruct_backward(Tensor grad, Tensor core, Tensor u0, Tensor u1, float scale)"
        " -> (Tensor, Tensor, Tensor)", tags);
  m.def("adapter_shrink(Tensor x, Tensor u_in, int groups, float p, int seed) -> Tensor", tags);
  m.def("adapter_expand_(Tensor(a!) y, Tensor z, Tensor u_out, int groups, float scale) -> ()", tags);
  m.def("adapter_expand_grad_input(Tensor dy, Tensor u_out, int groups, float scale) -> Tensor", tags);
  m.def("adapter_shrink_grad_input(Tensor dz, Tensor u_in, int groups, float p, int seed) -> Tensor", tags);
  m.def("adapter_shrink_grad_input_(Tensor(a!) dx, Tensor dz, Tensor u_in, int groups, float p, int seed) -> ()", tags);
  m.def("adapter_factor_grad(Tensor a, Tensor b, int groups, bool per_group, float scale, float p, int seed) -> Tensor", tags);
  m.def("dropout_mask(Tensor x, float p, int seed) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("tucker_reconstruct", &tucker_reconstruct_cpu);
  m.impl("tucker_reconstruct_backward", &tucker_reconstruct_backward_cpu);
  m.impl("adapter_shrink", &adapter_shrink_cpu);
  m.impl("adapter_expand_", &adapter_expand_cpu);
  m.impl("adapter_expand_grad_input", &adapter_expand_grad_input_cpu);
  m.impl("adapter_shrink_grad_input", &adapter_shrink_grad_input_cpu);
  m.impl("adapter_shrink_grad_input_", &adapter_shrink_grad_input_inplace_cpu);
  m.impl("adapter_factor_grad", &adapter_factor_grad_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace flora

// An importable (empty) Python module, so `import flora_kernels._C` registers torch.ops.flora.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define FLORA_CONCAT_(a, b) a##b
#define FLORA_CONCAT(a, b) FLORA_CONCAT_(a, b)
#define FLORA_STR_(a) #a
#define FLORA_STR(a) FLORA_STR_(a)

extern "C" PyMODINIT_FUNC FLORA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, FLORA_STR(TORCH_EXTENSION_NAME),
                                   "FLoRA kernels, registered as torch.ops.flora", -1, nullptr};
  return PyModule_Create(&def);
}
