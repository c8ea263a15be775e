// The folded conv form on CPU: the input fold of a conv adapter (flora::input_fold,
// flora::input_fold_backward) and the whole folded conv as one op (flora::conv_folded); schemas in
// flora_ops.cpp. The fold:
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
#include <c10/core/SymBool.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
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

// y[0..n) += a * x[0..n): the loops below are axpys over a contiguous row (vectorized by the compiler).
template <typename acc_t>
inline void axpy(int64_t n, acc_t a, const acc_t* __restrict x, acc_t* __restrict y) {
  for (int64_t e = 0; e < n; ++e) y[e] += a * x[e];
}

// out[c * rows + r] = in[r * cols + c] (cast to out_t): an (rows, cols) matrix transposed.
template <typename out_t, typename in_t>
void transpose(const in_t* __restrict in, int64_t rows, int64_t cols, out_t* __restrict out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = static_cast<out_t>(in[r * cols + c]);
}

// The fold's operands in the loops' layouts (acc_t): coreT[o][p][i] = core[o, i, p]; kkt[p][k] (kron_t);
// tt[o][k][i] = T[o, i, k] = sum_p core[o, i, p] KK[k, p] (the core folded with the kernel factors);
// ut[i][c] = u_in[c, i].
template <typename acc_t>
struct FoldOperands {
  std::vector<acc_t> coret, kkt, tt, ut;
};

template <typename scalar_t, typename acc_t>
FoldOperands<acc_t> fold_operands(const scalar_t* core, const scalar_t* u, std::vector<acc_t> kkt, const FoldDims& f) {
  FoldOperands<acc_t> op{std::vector<acc_t>(f.r0 * f.P * f.r1), std::move(kkt),
                         std::vector<acc_t>(f.r0 * f.K * f.r1, acc_t(0)), std::vector<acc_t>(f.r1 * f.i1)};
  for (int64_t o = 0; o < f.r0; ++o) {
    transpose(core + o * f.r1 * f.P, f.r1, f.P, op.coret.data() + o * f.P * f.r1);
    for (int64_t k = 0; k < f.K; ++k)
      for (int64_t p = 0; p < f.P; ++p)
        axpy(f.r1, op.kkt[p * f.K + k], op.coret.data() + (o * f.P + p) * f.r1, op.tt.data() + (o * f.K + k) * f.r1);
  }
  transpose(u, f.i1, f.r1, op.ut.data());
  return op;
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
    const auto op = fold_operands<scalar_t, acc_t>(core.data_ptr<scalar_t>(), u_in.data_ptr<scalar_t>(),
                                                   kron_t<scalar_t, acc_t>(kp, f, digit_table(f.K, f.ksz),
                                                                           digit_table(f.P, f.rsz)),
                                                   f);
    // At[o][k][c] = sum_i T[o, i, k] u_in[c, i], then A[o, c, k] = At[o][k][c]
    std::vector<acc_t> at(f.K * f.i1);
    scalar_t* a = out.data_ptr<scalar_t>();
    for (int64_t o = 0; o < f.r0; ++o) {
      std::fill(at.begin(), at.end(), acc_t(0));
      for (int64_t k = 0; k < f.K; ++k) {
        const acc_t* tr = op.tt.data() + (o * f.K + k) * f.r1;
        for (int64_t i = 0; i < f.r1; ++i) axpy(f.i1, tr[i], op.ut.data() + i * f.i1, at.data() + k * f.i1);
      }
      transpose(at.data(), f.K, f.i1, a + o * f.i1 * f.K);
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
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* u = u_in.data_ptr<scalar_t>();
    const auto op = fold_operands<scalar_t, acc_t>(core.data_ptr<scalar_t>(), u, kron_t<scalar_t, acc_t>(kp, f, ka, qp), f);
    std::vector<acc_t> uc(f.i1 * f.r1);  // u_in in acc_t, (I_1, r_1)
    for (int64_t e = 0; e < f.i1 * f.r1; ++e) uc[e] = static_cast<acc_t>(u[e]);
    // With Gt[o][k][c] = grad[o, c, k]:  dTt[o][k][i] = sum_c Gt[o][k][c] u_in[c, i];
    // du[c, i] = sum_{o, k} grad[o, c, k] T[o, i, k]
    std::vector<acc_t> gt(f.K * f.i1), dtt(f.r0 * f.K * f.r1, acc_t(0)), dua(f.i1 * f.r1, acc_t(0));
    for (int64_t o = 0; o < f.r0; ++o) {
      transpose(g + o * f.i1 * f.K, f.i1, f.K, gt.data());
      for (int64_t k = 0; k < f.K; ++k) {
        const acc_t* gr = gt.data() + k * f.i1;
        const acc_t* tr = op.tt.data() + (o * f.K + k) * f.r1;
        acc_t* dr = dtt.data() + (o * f.K + k) * f.r1;
        for (int64_t c = 0; c < f.i1; ++c) {
          axpy(f.r1, gr[c], uc.data() + c * f.r1, dr);
          axpy(f.r1, gr[c], tr, dua.data() + c * f.r1);
        }
      }
    }
    scalar_t* dup = du.data_ptr<scalar_t>();
    for (int64_t e = 0; e < f.i1 * f.r1; ++e) dup[e] = static_cast<scalar_t>(dua[e]);
    // dcoreT[o][p][i] = sum_k KK[k, p] dTt[o][k][i];  dKKt[p, k] = sum_{o, i} core[o, i, p] dT[o, i, k]
    std::vector<acc_t> dct(f.P * f.r1), dkkt(f.P * f.K, acc_t(0));
    scalar_t* dc = dcore.data_ptr<scalar_t>();
    for (int64_t o = 0; o < f.r0; ++o) {
      std::fill(dct.begin(), dct.end(), acc_t(0));
      for (int64_t p = 0; p < f.P; ++p) {
        const acc_t* cr = op.coret.data() + (o * f.P + p) * f.r1;
        for (int64_t k = 0; k < f.K; ++k) {
          const acc_t* dr = dtt.data() + (o * f.K + k) * f.r1;
          axpy(f.r1, op.kkt[p * f.K + k], dr, dct.data() + p * f.r1);
          acc_t s = 0;
          for (int64_t i = 0; i < f.r1; ++i) s += cr[i] * dr[i];
          dkkt[p * f.K + k] += s;
        }
      }
      transpose(dct.data(), f.P, f.r1, dc + o * f.r1 * f.P);
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
    check_first_order("flora::input_fold");
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


// ---- flora::conv_folded -------------------------------------------------------------------------------------
//
//   out = conv(x, W) + b + s U_out . conv(xa, A),   A = input_fold(core, u_in, kernel) (r_0, C_in/g, *k),
//
// A shared by the groups, U_out (C_out, r_0) applied per group (group j's rows with group j's r_0 channels),
// xa the adapter's input (dropout applied) or absent (x itself). Without xa the base conv and the adapter's run
// as one conv of x by [W_j; A] per group (the bias on the base rows). One autograd node (ConvFoldedFn): the
// forward op (conv_folded_forward) also returns A and h = conv(xa, A) for the backward op
// (conv_folded_backward), which computes only the gradients asked for: dx through the concatenated weight (one
// conv backward), the base weight's gradient only when it trains (its adapter rows then give dA too),
// otherwise dA from the adapter's rows alone. So the whole adapted conv is one op each way from Python.

struct FoldedGeom {
  int64_t d, g, co, cg, r;
  at::MemoryFormat layout;  // x's suggested memory format: its gradients' layout
};

FoldedGeom check_folded(const Tensor& x, const std::optional<Tensor>& xa, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& core, const Tensor& u_out, const Tensor& u_in,
                        at::TensorList kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  const int64_t d = static_cast<int64_t>(kernel.size());
  check_tensor(weight, "weight");
  check_tensor(u_out, "u_out");
  TORCH_CHECK(weight.dim() == 2 + d, "weight: expected ", 2 + d, " dims (C_out, C_in/groups, one per kernel factor), ",
              "got shape ", weight.sizes());
  TORCH_CHECK(x.dim() == weight.dim(), "x: expected a batched ", d, "-D conv input of ", weight.dim(),
              " dims (N, C_in, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "groups: expected an int >= 1 dividing C_out=",
              weight.size(0), ", got ", groups);
  TORCH_CHECK(x.size(1) == weight.size(1) * groups, "x: expected ", weight.size(1) * groups, " channels (C_in/groups=",
              weight.size(1), " x groups=", groups, "), got ", x.size(1));
  check_like(x, weight, "x", "weight");
  check_like(core, weight, "core", "weight");
  check_like(u_out, weight, "u_out", "weight");
  check_dim(u_out, 2, "u_out", "(C_out, r_0)");
  TORCH_CHECK(u_out.size(0) == weight.size(0) && u_out.size(1) == core.size(0), "u_out: expected shape (",
              weight.size(0), ", ", core.size(0), ") (C_out of weight, r_0 of core), got ", u_out.sizes());
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(0) == weight.size(1), "u_in: expected shape (", weight.size(1),
              ", r_1) (C_in/groups of weight), got ", u_in.sizes());
  for (int64_t j = 0; j < d; ++j)
    TORCH_CHECK(kernel[j].dim() == 2 && kernel[j].size(0) == weight.size(2 + j), "kernel factor ", j,
                ": expected shape (", weight.size(2 + j), ", r) (kernel dim ", j, " of weight), got ", kernel[j].sizes());
  for (const auto& [v, name] : {std::pair{stride, "stride"}, {padding, "padding"}, {dilation, "dilation"}})
    TORCH_CHECK(static_cast<int64_t>(v.size()) == d, name, ": expected ", d, " values, got ", v.size());
  if (bias.has_value()) {
    check_like(*bias, weight, "bias", "weight");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape (", weight.size(0),
                "), got ", bias->sizes());
  }
  if (xa.has_value())
    TORCH_CHECK(xa->sizes() == x.sizes() && xa->scalar_type() == x.scalar_type(), "xa: expected the shape and dtype of x ",
                x.sizes(), " ", x.scalar_type(), ", got ", xa->sizes(), " ", xa->scalar_type());
  return FoldedGeom{d, groups, weight.size(0), weight.size(0) / groups, core.size(0), x.suggest_memory_format()};
}

// Whether t (N, C, *sp) (or a weight (C_out, C_in/g, *k)) keeps its channels innermost in memory (channels_last,
// or a 1-D conv's (N, L, C) order). The new activations here are channels-innermost when x or the weight is
// (torch's rule for its conv output), else contiguous; for one group the 1x1 convs by u (C_out, r_0) then run as
// GEMMs over the pixel rows.
bool channels_inner(const Tensor& t) { return t.dim() > 2 && t.stride(1) == 1 && !t.is_contiguous(); }

// t in that layout (a copy where it is not)
Tensor in_layout(const Tensor& t, bool inner) { return inner ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous(); }

// a copy of t in its own storage, in that layout
Tensor fresh_in_layout(const Tensor& t, bool inner) {
  if (!inner) return at::empty(t.sizes(), t.options()).copy_(t);
  return at::empty(t.movedim(1, -1).sizes(), t.options()).movedim(-1, 1).copy_(t);
}

// cat_j [W_j; A]: (g (C_out/g + r_0), C_in/g, *k), in the layout of W (torch's conv output follows it too)
Tensor concat_weight(const Tensor& weight, const Tensor& a, const FoldedGeom& f) {
  Tensor w;
  if (f.g == 1) {
    w = at::cat({weight, a});
  } else {
    std::vector<int64_t> per_group{f.g, f.r};
    per_group.insert(per_group.end(), a.sizes().begin() + 1, a.sizes().end());
    w = at::cat({weight.unflatten(0, {f.g, f.cg}), a.expand(per_group)}, 1).flatten(0, 1);
  }
  return channels_inner(weight) ? in_layout(w, true) : w;
}

// A repeated per group: (g r_0, C_in/g, *k)
Tensor repeat_groups(const Tensor& a, const FoldedGeom& f) {
  if (f.g == 1) return a;
  std::vector<int64_t> reps(a.dim(), 1);
  reps[0] = f.g;
  return a.repeat(reps);
}

// (base rows, adapter rows) of an activation t (N, g (C_out/g + r_0), *sp): (N, C_out, *sp), (N, g r_0, *sp)
std::pair<Tensor, Tensor> split_rows(const Tensor& t, const FoldedGeom& f) {
  if (f.g == 1) return {t.narrow(1, 0, f.cg), t.narrow(1, f.cg, f.r)};
  const Tensor parts = t.unflatten(1, {f.g, f.cg + f.r});
  return {parts.narrow(2, 0, f.cg).flatten(1, 2), parts.narrow(2, f.cg, f.r).flatten(1, 2)};
}

Tensor as_rows(const Tensor& t) { return t.movedim(1, -1).reshape({-1, t.size(1)}); }

// (N * P, channels) rows back to (N, channels, *sp) like `like` (channels-last strides)
Tensor from_rows(const Tensor& rows, const Tensor& like, int64_t channels) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape.erase(shape.begin() + 1);
  shape.push_back(channels);
  return rows.view(shape).movedim(-1, 1);
}

// y + su . h (+ bias): y (N, C_out, *sp), h (N, g r_0, *sp), su (C_out, r_0), bias (C_out); the result
// channels-innermost where `inner`, else contiguous
Tensor expand_add(const Tensor& y, const Tensor& h, const Tensor& su, const std::optional<Tensor>& bias,
                  const FoldedGeom& f, bool inner) {
  if (f.g == 1 && inner) {
    Tensor rows = at::addmm(as_rows(y), as_rows(h), su.t());
    if (bias.has_value()) rows.add_(*bias);
    return from_rows(rows, y, f.co);
  }
  Tensor out;
  if (f.g == 1 && y.size(0) == 1) {
    out = at::addmm(y.reshape({f.co, -1}), su, h.reshape({f.r, -1})).view(y.sizes());
  } else if (f.g == 1) {
    out = at::baddbmm(y.flatten(2), su.expand({y.size(0), f.co, f.r}), h.flatten(2)).view(y.sizes());
  } else {
    std::vector<int64_t> one_by_one(y.dim(), 1), ones(f.d, 1), zeros(f.d, 0);
    one_by_one[0] = f.co;
    one_by_one[1] = f.r;
    out = at::convolution(h, su.view(one_by_one), std::nullopt, ones, zeros, ones, false, zeros, f.g)
              .add_(y);
    out = in_layout(out, inner);
  }
  if (bias.has_value()) {
    std::vector<int64_t> per_channel(y.dim(), 1);
    per_channel[1] = f.co;
    out.add_(bias->view(per_channel));
  }
  return out;
}

// (dh, dsu) of expand_add for the output gradient grad (N, C_out, *sp), each where asked
std::pair<Tensor, Tensor> expand_add_backward(const Tensor& grad, const Tensor& h, const Tensor& su, const FoldedGeom& f,
                                              bool need_h, bool need_u) {
  Tensor dh, dsu;
  if (f.g == 1 && channels_inner(h)) {
    const Tensor gr = as_rows(grad);
    if (need_h) dh = from_rows(at::mm(gr, su), h, f.r);
    if (need_u) dsu = at::mm(gr.t(), as_rows(h));
  } else if (f.g == 1) {
    if (grad.size(0) == 1) {
      const Tensor g2 = grad.reshape({f.co, -1}), h2 = h.reshape({f.r, -1});
      if (need_h) dh = at::mm(su.t(), g2).view(h.sizes());
      if (need_u) dsu = at::mm(g2, h2.t());
    } else {
      const Tensor g3 = grad.flatten(2), h3 = h.flatten(2);  // (N, C_out, P), (N, r_0, P)
      if (need_h) dh = at::bmm(su.t().expand({grad.size(0), f.r, f.co}), g3).view(h.sizes());
      if (need_u) dsu = at::bmm(g3, h3.transpose(1, 2)).sum(0);
    }
  } else {
    std::vector<int64_t> one_by_one(h.dim(), 1), ones(f.d, 1), zeros(f.d, 0);
    one_by_one[0] = f.co;
    one_by_one[1] = f.r;
    auto [gh, gu, unused] = at::convolution_backward(grad, h, su.view(one_by_one), std::nullopt, ones, zeros, ones,
                                                     false, zeros, f.g, {need_h, need_u, false});
    dh = gh;
    if (need_u) dsu = gu.view({f.co, f.r});
  }
  return {dh, dsu};
}

// (out, A, h): the output (in the layout of torch's conv output) and what the backward needs (h in that
// layout where `keep`; else h may be a view of a larger buffer)
std::tuple<Tensor, Tensor, Tensor> folded_forward(
    const Tensor& x, const std::optional<Tensor>& xa, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& core, const Tensor& u_out, const Tensor& u_in, at::TensorList kernel, double scale,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool keep) {
  const FoldedGeom f =
      check_folded(x, xa, weight, bias, core, u_out, u_in, kernel, stride, padding, dilation, groups);
  const Tensor a = input_fold_cpu(core, u_in, kernel);
  const std::vector<int64_t> zeros(f.d, 0);
  Tensor y, h;
  const bool inner = channels_inner(x) || channels_inner(weight);
  if (!xa.has_value()) {
    std::tie(y, h) = split_rows(
        at::convolution(x, concat_weight(weight, a, f), std::nullopt, stride, padding, dilation, false, zeros, f.g), f);
  } else {
    y = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, zeros, f.g);
    h = at::convolution(*xa, repeat_groups(a, f), std::nullopt, stride, padding, dilation, false, zeros, f.g);
  }
  if (keep)  // its own storage (the concatenated conv's h is a view of that conv's output), in the layout
    h = h.is_contiguous() && h.storage_offset() == 0 && !inner && xa.has_value() ? h : fresh_in_layout(h, inner);
  return {expand_add(y, h, scale == 1.0 ? u_out : u_out * scale, bias, f, inner), a, h};
}

std::tuple<Tensor, Tensor, Tensor> conv_folded_forward_cpu(
    const Tensor& x, const std::optional<Tensor>& xa, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& core, const Tensor& u_out, const Tensor& u_in, at::TensorList kernel, double scale,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return folded_forward(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups, true);
}

Tensor conv_folded_cpu(const Tensor& x, const std::optional<Tensor>& xa, const Tensor& weight,
                       const std::optional<Tensor>& bias, const Tensor& core, const Tensor& u_out, const Tensor& u_in,
                       at::TensorList kernel, double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  return std::get<0>(
      folded_forward(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups, false));
}

// mask: dx, dxa, dweight, dbias, du_out, the fold's (dcore, du_in, dkernel...); each undefined (the fold's: an
// empty list) where not asked.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>> conv_folded_backward_cpu(
    const Tensor& grad, const Tensor& x, const std::optional<Tensor>& xa, const Tensor& weight, const Tensor& core,
    const Tensor& u_out, const Tensor& u_in, at::TensorList kernel, const Tensor& a, const Tensor& h, double scale,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 6> mask) {
  const FoldedGeom f =
      check_folded(x, xa, weight, std::nullopt, core, u_out, u_in, kernel, stride, padding, dilation, groups);
  TORCH_CHECK(grad.dim() == x.dim() && grad.size(0) == x.size(0) && grad.size(1) == f.co, "grad: expected shape (",
              x.size(0), ", ", f.co, ", *out spatial), got ", grad.sizes());
  const std::vector<int64_t> zeros(f.d, 0);
  const auto [need_x, need_xa, need_w, need_b, need_u, need_fold] = mask;
  const Tensor su = scale == 1.0 ? u_out : u_out * scale;
  auto [dh, dsu] = expand_add_backward(grad, h, su, f, need_fold || (xa.has_value() ? need_xa : need_x), need_u);
  Tensor dx, dxa, dw, da, db, du;
  if (!xa.has_value()) {
    if (need_x || need_w) {  // through [W_j; A]: the adapter rows' gradient is dh (zero when not asked)
      const Tensor dboth =
          f.g == 1 ? at::cat({grad, dh.defined() ? dh : at::zeros_like(h)}, 1)
                   : at::cat({grad.unflatten(1, {f.g, f.cg}), (dh.defined() ? dh : at::zeros_like(h)).unflatten(1, {f.g, f.r})}, 2)
                         .flatten(1, 2);
      auto [gx, gw, unused] = at::convolution_backward(dboth, x, concat_weight(weight, a, f), std::nullopt, stride,
                                                       padding, dilation, false, zeros, f.g, {need_x, need_w, false});
      dx = gx;
      if (need_w) {
        const auto rows = gw.unflatten(0, {f.g, f.cg + f.r}).split_with_sizes({f.cg, f.r}, 1);
        dw = rows[0].flatten(0, 1).contiguous();
        if (need_fold) da = rows[1].sum(0);
      }
    }
  } else if (need_x || need_w) {
    auto [gx, gw, unused] = at::convolution_backward(grad, x, weight, std::nullopt, stride, padding, dilation, false,
                                                     zeros, f.g, {need_x, need_w, false});
    dx = gx;
    dw = gw;
  }
  if ((need_fold && !da.defined()) || (xa.has_value() && need_xa)) {
    auto [gxa, ga, unused] =
        at::convolution_backward(dh, xa.has_value() ? *xa : x, repeat_groups(a, f), std::nullopt, stride, padding,
                                 dilation, false, zeros, f.g, {xa.has_value() && need_xa, need_fold, false});
    dxa = gxa;
    if (need_fold) da = f.g == 1 ? ga : ga.unflatten(0, {f.g, f.r}).sum(0);
  }
  if (need_b) {
    std::vector<int64_t> dims{0};
    for (int64_t i = 2; i < grad.dim(); ++i) dims.push_back(i);
    db = grad.sum(dims);
  }
  if (need_u) du = scale == 1.0 ? dsu : dsu * scale;
  std::vector<Tensor> dfold;
  if (need_fold) dfold = input_fold_backward_cpu(da.contiguous(), core, u_in, kernel);
  if (dx.defined()) dx = dx.contiguous(f.layout);
  if (dxa.defined()) dxa = dxa.contiguous(f.layout);
  if (dw.defined()) dw = dw.contiguous();
  return {dx, dxa, dw, db, du, dfold};
}

// ---- what the two conv nodes (ConvFoldedFn, ConvMergedFn) share ------------------------------------------------

bool requires_grad(const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); }

// whether the fold's inputs (core, u_in, the kernel factors) need gradients
bool fold_requires_grad(const Tensor& core, const Tensor& u_in, at::TensorList kernel) {
  return core.requires_grad() || u_in.requires_grad() ||
         std::any_of(kernel.begin(), kernel.end(), [](const Tensor& k) { return k.requires_grad(); });
}

// whether autograd records a call whose inputs need these gradients
bool records(std::initializer_list<bool> needs) {
  return at::GradMode::is_enabled() && std::any_of(needs.begin(), needs.end(), [](bool b) { return b; });
}

// the scale and conv geometry, kept in an autograd context for the backward
struct ConvArgs {
  double scale;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  static void save(torch::autograd::AutogradContext* ctx, double scale, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
  }

  static ConvArgs load(torch::autograd::AutogradContext* ctx) {
    return {ctx->saved_data["scale"].toDouble(), ctx->saved_data["stride"].toIntVector(),
            ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
            ctx->saved_data["groups"].toInt()};
  }
};

// appends the gradients of core, u_out, u_in and the kernel factors (the fold's from dfold = [dcore, du_in,
// dkernel...] when it was asked), then none for the five non-tensor arguments (scale ... groups)
void append_adapter_grads(torch::autograd::variable_list& out, const Tensor& du_out, const std::vector<Tensor>& dfold,
                          bool fold, size_t n_kernel) {
  out.push_back(fold ? dfold[0] : Tensor());
  out.push_back(du_out);
  for (size_t j = 0; j < 1 + n_kernel; ++j) out.push_back(fold ? dfold[1 + j] : Tensor());
  out.resize(out.size() + 5);
}

class ConvFoldedFn : public torch::autograd::Function<ConvFoldedFn> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& xa,
                        const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& core,
                        const Tensor& u_out, const Tensor& u_in, at::TensorList kernel, double scale,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::conv_folded_forward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(
                             const Tensor&, const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&,
                             const Tensor&, const Tensor&, const Tensor&, at::TensorList, double, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, int64_t)>();
    auto [out, a, h] = op.call(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups);
    std::vector<Tensor> saved{x, xa.value_or(Tensor()), weight, core, u_out, u_in, a, h};
    saved.insert(saved.end(), kernel.begin(), kernel.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["mask"] = std::vector<bool>{x.requires_grad(), requires_grad(xa), weight.requires_grad(),
                                                requires_grad(bias), u_out.requires_grad(),
                                                fold_requires_grad(core, u_in, kernel)};
    ConvArgs::save(ctx, scale, stride, padding, dilation, groups);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_first_order("flora::conv_folded");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::conv_folded_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>>(
                             const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, at::TensorList, const Tensor&, const Tensor&, double,
                             at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 6>)>();
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> kernel(saved.begin() + 8, saved.end());
    const auto m = ctx->saved_data["mask"].toBoolList();
    const std::array<bool, 6> mask{m[0], m[1], m[2], m[3], m[4], m[5]};
    const std::optional<Tensor> xa = saved[1].defined() ? std::optional<Tensor>(saved[1]) : std::nullopt;
    const ConvArgs c = ConvArgs::load(ctx);
    auto [dx, dxa, dw, db, du, dfold] = op.call(grads[0], saved[0], xa, saved[2], saved[3], saved[4], saved[5], kernel,
                                                saved[6], saved[7], c.scale, c.stride, c.padding, c.dilation,
                                                c.groups, mask);
    // one gradient per forward argument: x, xa, weight, bias, core, u_out, u_in, kernel..., scale ... groups
    torch::autograd::variable_list out{dx, dxa, dw, db};
    append_adapter_grads(out, du, dfold, mask[5], kernel.size());
    return out;
  }
};

Tensor conv_folded_autograd(const Tensor& x, const std::optional<Tensor>& xa, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& core, const Tensor& u_out,
                            const Tensor& u_in, at::TensorList kernel, double scale, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (records({x.requires_grad(), requires_grad(xa), weight.requires_grad(), requires_grad(bias),
               u_out.requires_grad(), fold_requires_grad(core, u_in, kernel)}))
    return ConvFoldedFn::apply(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups);
  at::AutoDispatchBelowADInplaceOrView guard;  // no backward: the forward alone
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::conv_folded", "")
                       .typed<Tensor(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                     const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                                     at::TensorList, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                     int64_t)>();
  return op.call(x, xa, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups);
}


// ---- flora::conv_merged ------------------------------------------------------------------------------------
//
//   out = conv(x, W + s U_out . A) + b,   A = input_fold(core, u_in, kernel) (r_0, C_in/g, *k)
//
// The merged strategy on CPU: the reconstruct W + s dW as the fold and one GEMM (dW = U_out . A: the core with
// every factor, U_out last), then the conv. Backward: the conv's input and weight gradients (dW_eff; for a
// depthwise 2-D conv by flora::depthwise_conv2d_weight_grad, which beats ATen's there), the base weight's
// gradient being dW_eff itself, and the adapter's by projecting dW_eff back: dU_out = s dW_eff A^T,
// dA = s U_out^T dW_eff, then the fold's backward. One C++ autograd node (ConvMergedFn) over
// conv_merged_forward -> (out, A, W_eff) and conv_merged_backward: the whole merged conv is one op each way.

// W + s U_out . A: (C_out, C_in/g, *k), contiguous
Tensor merged_weight(const Tensor& weight, const Tensor& u_out, const Tensor& a, double scale) {
  return at::addmm(weight.reshape({weight.size(0), -1}), u_out, a.reshape({a.size(0), -1}), 1.0, scale)
      .view(weight.sizes());
}

// a 2-D conv with one input channel per group: its weight gradient by the extension's depthwise kernel
bool depthwise(const Tensor& x, const Tensor& weight, const FoldedGeom& f) {
  return f.d == 2 && weight.size(1) == 1 && f.g == x.size(1) && f.g > 1;
}

std::tuple<Tensor, Tensor, Tensor> conv_merged_forward_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& core, const Tensor& u_out,
    const Tensor& u_in, at::TensorList kernel, double scale, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const FoldedGeom f =
      check_folded(x, std::nullopt, weight, bias, core, u_out, u_in, kernel, stride, padding, dilation, groups);
  const Tensor a = input_fold_cpu(core, u_in, kernel);
  const Tensor w = merged_weight(weight, u_out, a, scale);
  const std::vector<int64_t> zeros(f.d, 0);
  const Tensor out = at::convolution(x, w, bias, stride, padding, dilation, false, zeros, f.g);
  return {in_layout(out, channels_inner(x) || channels_inner(weight)), a, w};
}

Tensor conv_merged_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& core,
                       const Tensor& u_out, const Tensor& u_in, at::TensorList kernel, double scale,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return std::get<0>(
      conv_merged_forward_cpu(x, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups));
}

// mask: dx, dweight, dbias, du_out, the fold's (dcore, du_in, dkernel...); each undefined (the fold's: an empty
// list) where not asked. w is the forward's W_eff, a its fold.
std::tuple<Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>> conv_merged_backward_cpu(
    const Tensor& grad, const Tensor& x, const Tensor& w, const Tensor& core, const Tensor& u_out, const Tensor& u_in,
    at::TensorList kernel, const Tensor& a, double scale, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 5> mask) {
  const FoldedGeom f =
      check_folded(x, std::nullopt, w, std::nullopt, core, u_out, u_in, kernel, stride, padding, dilation, groups);
  check_tensor(grad, "grad");
  check_like(grad, x, "grad", "x");
  TORCH_CHECK(grad.dim() == x.dim() && grad.size(0) == x.size(0) && grad.size(1) == f.co, "grad: expected shape (",
              x.size(0), ", ", f.co, ", *out spatial), got ", grad.sizes());
  TORCH_CHECK(a.dim() == w.dim() && a.size(0) == f.r && a.sizes().slice(1) == w.sizes().slice(1),
              "a: expected the forward's fold of shape (", f.r, ", ", w.sizes().slice(1), "), got ", a.sizes());
  const std::vector<int64_t> zeros(f.d, 0);
  const auto [need_x, need_w, need_b, need_u, need_fold] = mask;
  const bool need_gw = need_w || need_u || need_fold;
  Tensor dx, gw, db, du;
  if (need_gw && depthwise(x, w, f)) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::depthwise_conv2d_weight_grad", "")
                         .typed<Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                       at::IntArrayRef)>();
    if (need_x)
      dx = std::get<0>(at::convolution_backward(grad, x, w, std::nullopt, stride, padding, dilation, false, zeros,
                                                f.g, {true, false, false}));
    gw = op.call(x, grad, w.sizes().slice(2), stride, padding, dilation);
  } else if (need_x || need_gw) {
    std::tie(dx, gw, std::ignore) = at::convolution_backward(grad, x, w, std::nullopt, stride, padding, dilation, false,
                                                             zeros, f.g, {need_x, need_gw, false});
  }
  if (need_b) {
    std::vector<int64_t> dims{0};
    for (int64_t i = 2; i < grad.dim(); ++i) dims.push_back(i);
    db = grad.sum(dims);
  }
  std::vector<Tensor> dfold;
  if (need_u || need_fold) {
    const Tensor g2 = gw.reshape({f.co, -1}), a2 = a.reshape({f.r, -1});
    if (need_u) du = at::mm(g2, a2.t()).mul_(scale);
    if (need_fold) dfold = input_fold_backward_cpu(at::mm(u_out.t(), g2).mul_(scale).view(a.sizes()), core, u_in, kernel);
  }
  if (dx.defined()) dx = dx.contiguous(f.layout);
  return {dx, need_w ? gw.contiguous() : Tensor(), db, du, dfold};
}

class ConvMergedFn : public torch::autograd::Function<ConvMergedFn> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& core, const Tensor& u_out,
                        const Tensor& u_in, at::TensorList kernel, double scale, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::conv_merged_forward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                             const Tensor&, at::TensorList, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                             int64_t)>();
    auto [out, a, w] = op.call(x, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups);
    std::vector<Tensor> saved{x, w, core, u_out, u_in, a};
    saved.insert(saved.end(), kernel.begin(), kernel.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["mask"] = std::vector<bool>{x.requires_grad(), weight.requires_grad(), requires_grad(bias),
                                                u_out.requires_grad(), fold_requires_grad(core, u_in, kernel)};
    ConvArgs::save(ctx, scale, stride, padding, dilation, groups);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_first_order("flora::conv_merged");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::conv_merged_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             at::TensorList, const Tensor&, double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                             int64_t, std::array<bool, 5>)>();
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> kernel(saved.begin() + 6, saved.end());
    const auto m = ctx->saved_data["mask"].toBoolList();
    const std::array<bool, 5> mask{m[0], m[1], m[2], m[3], m[4]};
    const ConvArgs c = ConvArgs::load(ctx);
    auto [dx, dw, db, du, dfold] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], kernel, saved[5],
                                           c.scale, c.stride, c.padding, c.dilation, c.groups, mask);
    // one gradient per forward argument: x, weight, bias, core, u_out, u_in, kernel..., scale ... groups
    torch::autograd::variable_list out{dx, dw, db};
    append_adapter_grads(out, du, dfold, mask[4], kernel.size());
    return out;
  }
};

Tensor conv_merged_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& core, const Tensor& u_out, const Tensor& u_in, at::TensorList kernel,
                            double scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
  if (records({x.requires_grad(), weight.requires_grad(), requires_grad(bias), u_out.requires_grad(),
               fold_requires_grad(core, u_in, kernel)}))
    return ConvMergedFn::apply(x, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups);
  at::AutoDispatchBelowADInplaceOrView guard;  // no backward: the forward alone
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::conv_merged", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                     const Tensor&, const Tensor&, at::TensorList, double, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(x, weight, bias, core, u_out, u_in, kernel, scale, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("input_fold", &input_fold_cpu);
  m.impl("input_fold_backward", &input_fold_backward_cpu);
  m.impl("conv_folded", &conv_folded_cpu);
  m.impl("conv_folded_forward", &conv_folded_forward_cpu);
  m.impl("conv_folded_backward", &conv_folded_backward_cpu);
  m.impl("conv_merged", &conv_merged_cpu);
  m.impl("conv_merged_forward", &conv_merged_forward_cpu);
  m.impl("conv_merged_backward", &conv_merged_backward_cpu);
}

TORCH_LIBRARY_IMPL(flora, Autograd, m) {
  m.impl("input_fold", &input_fold_autograd);
  m.impl("conv_folded", &conv_folded_autograd);
  m.impl("conv_merged", &conv_merged_autograd);
}

}  // namespace flora
