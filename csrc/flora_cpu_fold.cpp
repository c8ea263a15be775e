// The input fold of a conv adapter on CPU (flora::input_fold, flora::input_fold_backward; schemas in
// flora_ops.cpp):
//
//   A[o, c, k] = sum_{i, p} u_in[c, i] core[o, i, p] KK[k, p],   KK = K_2 (x) K_3 (x) ... (Kronecker)
//
// i.e. A = core x_1 U_in x_2 K_2 ... (flora_kernels.tucker.input_fold): the core folded with every factor
// but the output one, the kernel of the conv from the input channels to r_0 (o < r_0, i < r_1, c < I_1;
// k runs over the kernel taps, p over the kernel ranks, both row-major over the kernel dims). The
// backward gives (dcore, du_in, dK_2, ...) for an output gradient dA.
//
// These folds are tiny (a few thousand multiply-adds for a small conv) and run on every training call:
// as GEMMs, reshapes and a Kronecker product they cost ~6 ops forward and ~15 autograd nodes backward,
// far more than their arithmetic. Here each direction is one op of plain loops, accumulating in the op
// math type (float for fp16/bf16); the caller keeps them to small folds (backends/ext/cpp.py). The op's
// autograd is registered here too (a C++ node: no Python on the training path).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "flora_checks.h"  // check_tensor, check_like, check_dim

namespace flora {
namespace {

using at::Tensor;

struct FoldDims {
  int64_t r0, r1, i1, K, P;
  std::vector<int64_t> ksz, rsz;  // per kernel dim: its size I_j and rank r_j
};

FoldDims fold_dims(const Tensor& core, const Tensor& u_in, at::TensorList ks) {
  check_tensor(core, "core");
  check_tensor(u_in, "u_in");
  TORCH_CHECK(core.device().is_cpu(), "core: expected a CPU tensor for the CPU kernel, got device ", core.device());
  const int64_t d = static_cast<int64_t>(ks.size());
  TORCH_CHECK(core.dim() == 2 + d, "core: expected ", 2 + d, " dims (r_0, r_1, one per kernel factor), got shape ",
              core.sizes());
  check_dim(u_in, 2, "u_in", "(I_1, r_1)");
  check_like(u_in, core, "u_in", "core");
  TORCH_CHECK(u_in.size(1) == core.size(1), "u_in: expected shape (I_1, ", core.size(1), ") to match mode 1 of core ",
              core.sizes(), ", got ", u_in.sizes());
  FoldDims f{core.size(0), core.size(1), u_in.size(0), 1, 1, {}, {}};
  for (int64_t j = 0; j < d; ++j) {
    check_tensor(ks[j], "kernel factor");
    check_dim(ks[j], 2, "kernel factor", "(I_j, r_j)");
    check_like(ks[j], core, "kernel factor", "core");
    TORCH_CHECK(ks[j].size(1) == core.size(2 + j), "kernel factor ", j, ": expected shape (I_j, ", core.size(2 + j),
                ") to match mode ", 2 + j, " of core ", core.sizes(), ", got ", ks[j].sizes());
    f.ksz.push_back(ks[j].size(0));
    f.rsz.push_back(ks[j].size(1));
    f.K *= ks[j].size(0);
    f.P *= ks[j].size(1);
  }
  return f;
}

// Row-major digits of every flat index over the given sizes (last dim fastest): out[flat * d + j].
std::vector<int64_t> digit_table(int64_t n, const std::vector<int64_t>& sizes) {
  const int64_t d = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> out(n * d);
  for (int64_t flat = 0; flat < n; ++flat) {
    int64_t rest = flat;
    for (int64_t j = d - 1; j >= 0; --j) {
      out[flat * d + j] = rest % sizes[j];
      rest /= sizes[j];
    }
  }
  return out;
}

// The Kronecker product of the kernel factors, transposed: KKt[p * K + k] = prod_j K_j[digit_j(k), digit_j(p)]
// (P rows of K taps, so the folds below run as axpy over contiguous taps).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> kron_t(const std::vector<const scalar_t*>& kp, const FoldDims& f, const std::vector<int64_t>& ka,
                          const std::vector<int64_t>& qp) {
  const int64_t d = static_cast<int64_t>(kp.size());
  std::vector<acc_t> kk(f.P * f.K);
  for (int64_t p = 0; p < f.P; ++p)
    for (int64_t k = 0; k < f.K; ++k) {
      acc_t v = 1;
      for (int64_t j = 0; j < d; ++j) v *= static_cast<acc_t>(kp[j][ka[k * d + j] * f.rsz[j] + qp[p * d + j]]);
      kk[p * f.K + k] = v;
    }
  return kk;
}

// T[(o r1 + i) K + k] = sum_p core[(o r1 + i) P + p] KK[k, p]: the core folded with the kernel factors.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> fold_kernel(const scalar_t* core, const std::vector<acc_t>& kkt, const FoldDims& f) {
  std::vector<acc_t> t(f.r0 * f.r1 * f.K, acc_t(0));
  for (int64_t oi = 0; oi < f.r0 * f.r1; ++oi) {
    acc_t* __restrict to = t.data() + oi * f.K;
    for (int64_t p = 0; p < f.P; ++p) {
      const acc_t g = static_cast<acc_t>(core[oi * f.P + p]);
      const acc_t* __restrict kr = kkt.data() + p * f.K;
      for (int64_t k = 0; k < f.K; ++k) to[k] += g * kr[k];
    }
  }
  return t;
}

std::vector<Tensor> contiguous_all(at::TensorList ks) {
  std::vector<Tensor> out;
  for (const auto& k : ks) out.push_back(k.contiguous());
  return out;
}

Tensor input_fold_cpu(const Tensor& core_, const Tensor& u_in_, at::TensorList ks_) {
  const FoldDims f = fold_dims(core_, u_in_, ks_);
  const Tensor core = core_.contiguous(), u_in = u_in_.contiguous();
  const std::vector<Tensor> ks = contiguous_all(ks_);
  std::vector<int64_t> shape{f.r0, f.i1};
  shape.insert(shape.end(), f.ksz.begin(), f.ksz.end());
  Tensor out = at::empty(shape, core.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, core.scalar_type(), "input_fold", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> kp;
    for (const auto& k : ks) kp.push_back(k.data_ptr<scalar_t>());
    const std::vector<acc_t> kkt = kron_t<scalar_t, acc_t>(kp, f, digit_table(f.K, f.ksz), digit_table(f.P, f.rsz));
    const std::vector<acc_t> t = fold_kernel<scalar_t, acc_t>(core.data_ptr<scalar_t>(), kkt, f);
    const scalar_t* u = u_in.data_ptr<scalar_t>();
    scalar_t* a = out.data_ptr<scalar_t>();
    std::vector<acc_t> row(f.K);
    for (int64_t o = 0; o < f.r0; ++o) {
      for (int64_t c = 0; c < f.i1; ++c) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t i = 0; i < f.r1; ++i) {
          const acc_t w = static_cast<acc_t>(u[c * f.r1 + i]);
          const acc_t* tr = t.data() + (o * f.r1 + i) * f.K;
          for (int64_t k = 0; k < f.K; ++k) row[k] += w * tr[k];
        }
        scalar_t* ar = a + (o * f.i1 + c) * f.K;
        for (int64_t k = 0; k < f.K; ++k) ar[k] = static_cast<scalar_t>(row[k]);
      }
    }
  });
  return out;
}

std::vector<Tensor> input_fold_backward_cpu(const Tensor& grad_, const Tensor& core_, const Tensor& u_in_,
                                            at::TensorList ks_) {
  const FoldDims f = fold_dims(core_, u_in_, ks_);
  check_tensor(grad_, "grad");
  check_like(grad_, core_, "grad", "core");
  TORCH_CHECK(grad_.numel() == f.r0 * f.i1 * f.K && grad_.size(0) == f.r0 && grad_.size(1) == f.i1, "grad: expected ",
              "shape (", f.r0, ", ", f.i1, ", *kernel) (the fold's output), got ", grad_.sizes());
  const Tensor grad = grad_.contiguous(), core = core_.contiguous(), u_in = u_in_.contiguous();
  const std::vector<Tensor> ks = contiguous_all(ks_);
  Tensor dcore = at::empty(core.sizes(), core.options()), du = at::empty(u_in.sizes(), u_in.options());
  std::vector<Tensor> dks;
  for (const auto& k : ks) dks.push_back(at::empty(k.sizes(), k.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, core.scalar_type(), "input_fold_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> kp;
    for (const auto& k : ks) kp.push_back(k.data_ptr<scalar_t>());
    const std::vector<int64_t> ka = digit_table(f.K, f.ksz), qp = digit_table(f.P, f.rsz);
    const std::vector<acc_t> kkt = kron_t<scalar_t, acc_t>(kp, f, ka, qp);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* cr = core.data_ptr<scalar_t>();
    const scalar_t* u = u_in.data_ptr<scalar_t>();
    const std::vector<acc_t> t = fold_kernel<scalar_t, acc_t>(cr, kkt, f);
    // dT[o, i, k] = sum_c u[c, i] g[o, c, k];  du[c, i] = sum_{o, k} g[o, c, k] T[o, i, k]
    std::vector<acc_t> dt(f.r0 * f.r1 * f.K, acc_t(0)), dua(f.i1 * f.r1, acc_t(0));
    for (int64_t o = 0; o < f.r0; ++o) {
      for (int64_t c = 0; c < f.i1; ++c) {
        const scalar_t* gr = g + (o * f.i1 + c) * f.K;
        for (int64_t i = 0; i < f.r1; ++i) {
          const acc_t w = static_cast<acc_t>(u[c * f.r1 + i]);
          acc_t* dtr = dt.data() + (o * f.r1 + i) * f.K;
          const acc_t* tr = t.data() + (o * f.r1 + i) * f.K;
          acc_t s = 0;
          for (int64_t k = 0; k < f.K; ++k) {
            const acc_t gv = static_cast<acc_t>(gr[k]);
            dtr[k] += w * gv;
            s += gv * tr[k];
          }
          dua[c * f.r1 + i] += s;
        }
      }
    }
    scalar_t* dup = du.data_ptr<scalar_t>();
    for (int64_t e = 0; e < f.i1 * f.r1; ++e) dup[e] = static_cast<scalar_t>(dua[e]);
    // dcore[o, i, p] = sum_k dT[o, i, k] KK[k, p];  dKKt[p, k] = sum_{o, i} core[o, i, p] dT[o, i, k]
    std::vector<acc_t> dkkt(f.P * f.K, acc_t(0));
    scalar_t* dc = dcore.data_ptr<scalar_t>();
    for (int64_t oi = 0; oi < f.r0 * f.r1; ++oi) {
      const acc_t* __restrict dtr = dt.data() + oi * f.K;
      for (int64_t p = 0; p < f.P; ++p) {
        const acc_t* __restrict kr = kkt.data() + p * f.K;
        acc_t* __restrict dr = dkkt.data() + p * f.K;
        const acc_t gc = static_cast<acc_t>(cr[oi * f.P + p]);
        acc_t s = 0;
        for (int64_t k = 0; k < f.K; ++k) {
          s += dtr[k] * kr[k];
          dr[k] += gc * dtr[k];
        }
        dc[oi * f.P + p] = static_cast<scalar_t>(s);
      }
    }
    // dK_j[a, q] = sum over (k, p) with digit_j(k) = a, digit_j(p) = q of dKK[k, p] prod_{m != j} K_m[.., ..]
    const int64_t d = static_cast<int64_t>(ks.size());
    std::vector<std::vector<acc_t>> dka(d);
    for (int64_t j = 0; j < d; ++j) dka[j].assign(f.ksz[j] * f.rsz[j], acc_t(0));
    for (int64_t p = 0; p < f.P; ++p) {
      const int64_t* q = qp.data() + p * d;
      for (int64_t k = 0; k < f.K; ++k) {
        const int64_t* a = ka.data() + k * d;
        const acc_t v = dkkt[p * f.K + k];
        for (int64_t j = 0; j < d; ++j) {
          acc_t prod = v;
          for (int64_t m = 0; m < d; ++m)
            if (m != j) prod *= static_cast<acc_t>(kp[m][a[m] * f.rsz[m] + q[m]]);
          dka[j][a[j] * f.rsz[j] + q[j]] += prod;
        }
      }
    }
    for (int64_t j = 0; j < d; ++j) {
      scalar_t* o = dks[j].data_ptr<scalar_t>();
      for (int64_t e = 0; e < f.ksz[j] * f.rsz[j]; ++e) o[e] = static_cast<scalar_t>(dka[j][e]);
    }
  });
  std::vector<Tensor> out{dcore, du};
  out.insert(out.end(), dks.begin(), dks.end());
  return out;
}

// d(input_fold) as a C++ autograd node: saves core, u_in and the kernel factors (all small), and
// calls input_fold_backward through the dispatcher (so torch.compile traces it by its fake).
class InputFoldFn : public torch::autograd::Function<InputFoldFn> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& core, const Tensor& u_in,
                        at::TensorList kernel) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::input_fold", "")
                         .typed<Tensor(const Tensor&, const Tensor&, at::TensorList)>();
    std::vector<Tensor> saved{core, u_in};
    saved.insert(saved.end(), kernel.begin(), kernel.end());
    ctx->save_for_backward(saved);
    return op.call(core, u_in, kernel);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::input_fold_backward", "")
                         .typed<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, at::TensorList)>();
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> kernel(saved.begin() + 2, saved.end());
    return op.call(grads[0], saved[0], saved[1], kernel);
  }
};

Tensor input_fold_autograd(const Tensor& core, const Tensor& u_in, at::TensorList kernel) {
  return InputFoldFn::apply(core, u_in, kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("input_fold", &input_fold_cpu);
  m.impl("input_fold_backward", &input_fold_backward_cpu);
}

TORCH_LIBRARY_IMPL(flora, Autograd, m) { m.impl("input_fold", &input_fold_autograd); }

}  // namespace flora
