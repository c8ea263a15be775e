// The factorized Linear as one op each way: flora::linear_factorized (+ _forward, _backward); schemas in
// flora_ops.cpp, fakes in flora_kernels/backends/ext/ops.py.
//
//   y = x W^T + bias + S B^T,   S = dropout(x) U_in (M, r_in),   B = scale U_out G (out, r_in)
//
// x (..., in) is read as its (M, in) token matrix; y has x's leading dims. The forward writes y = bias + S B^T
// (adapter_expand: one pass over y, y never read) and adds x W^T into it (addmm_, beta = 1); the backward writes
// dx = mask * (dS U_in^T) and adds dy W, with dS = dy B and dB = dy^T S from one read of dy
// (adapter_linear_grad). B is recomputed in backward rather than saved (memory PEFT's LoRA does not pay).
//
// The ops are composed of the adapter ops and ATen GEMMs through the dispatcher, so one implementation
// serves every device those ops have (registered here for CPU and CUDA). The autograd is one C++ node over
// linear_factorized_forward -> (y, S) and linear_factorized_backward: from Python, and in a torch.compile
// graph, the layer is one op forward and one backward (no Python autograd.Function to trace).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "flora_checks.h"  // check_tensor, check_like, check_dim, check_dropout

namespace flora {
namespace {

using at::Tensor;

// x (..., in), weight (out, in), bias (out,)?, core (r_out, r_in), u_out (out, r_out), u_in (in, r_in):
// one dtype and device.
void check_linear_factorized(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& core, const Tensor& u_out, const Tensor& u_in, double p) {
  check_tensor(x, "x");
  check_tensor(weight, "weight");
  check_tensor(core, "core");
  check_tensor(u_out, "u_out");
  check_tensor(u_in, "u_in");
  check_like(weight, x, "weight", "x");
  check_like(core, x, "core", "x");
  check_like(u_out, x, "u_out", "x");
  check_like(u_in, x, "u_in", "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor (..., in features), got a 0-D tensor");
  check_dim(weight, 2, "weight", "(out features, in features)");
  check_dim(core, 2, "core", "(r_out, r_in)");
  check_dim(u_out, 2, "u_out", "(out features, r_out)");
  check_dim(u_in, 2, "u_in", "(in features, r_in)");
  const int64_t in = x.size(-1), out = weight.size(0);
  TORCH_CHECK(weight.size(1) == in, "weight: expected ", in, " columns (the features of x), got shape ",
              weight.sizes());
  TORCH_CHECK(u_in.size(0) == in, "u_in: expected ", in, " rows (the features of x), got shape ", u_in.sizes());
  TORCH_CHECK(u_out.size(0) == out, "u_out: expected ", out, " rows (the rows of weight), got shape ",
              u_out.sizes());
  TORCH_CHECK(core.size(0) == u_out.size(1) && core.size(1) == u_in.size(1), "core: expected shape (",
              u_out.size(1), ", ", u_in.size(1), ") (the ranks of u_out and u_in), got ", core.sizes());
  if (bias.has_value()) {
    check_like(*bias, x, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias: expected shape (", out,
                ",) (the rows of weight), got ", bias->sizes());
  }
  check_dropout(p);
}

// The adapter ops this file composes (torch.ops.flora, any device they are registered for).
Tensor shrink(const Tensor& x, const Tensor& u_in, double p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::adapter_shrink", "")
                       .typed<Tensor(const Tensor&, const Tensor&, int64_t, double, int64_t)>();
  return op.call(x, u_in, 1, p, seed);
}

Tensor expand(const Tensor& s, const Tensor& b, const std::optional<Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::adapter_expand", "")
                       .typed<Tensor(const Tensor&, const Tensor&, int64_t, double, const std::optional<Tensor>&)>();
  return op.call(s, b, 1, 1.0, bias);
}

Tensor expand_grad_input(const Tensor& dy, const Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::adapter_expand_grad_input", "")
                       .typed<Tensor(const Tensor&, const Tensor&, int64_t, double)>();
  return op.call(dy, b, 1, 1.0);
}

Tensor shrink_grad_input(const Tensor& ds, const Tensor& u_in, double p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::adapter_shrink_grad_input", "")
                       .typed<Tensor(const Tensor&, const Tensor&, int64_t, double, int64_t)>();
  return op.call(ds, u_in, 1, p, seed);
}

Tensor factor_grad(const Tensor& a, const Tensor& b, double p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::adapter_factor_grad", "")
                       .typed<Tensor(const Tensor&, const Tensor&, int64_t, bool, double, double, int64_t)>();
  return op.call(a, b, 1, false, 1.0, p, seed);
}

std::tuple<Tensor, Tensor> linear_grad(const Tensor& dy, const Tensor& s, const Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::adapter_linear_grad", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>();
  return op.call(dy, s, b);
}

// B = scale U_out G (out, r_in).
Tensor expansion(const Tensor& u_out, const Tensor& core, double scale) {
  Tensor b = at::mm(u_out, core);
  return scale == 1.0 ? b : b.mul_(scale);
}

// x's (M, in) token matrix, contiguous (the adapter ops read it by rows).
Tensor tokens(const Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

std::tuple<Tensor, Tensor> linear_factorized_forward(const Tensor& x, const Tensor& weight,
                                                     const std::optional<Tensor>& bias, const Tensor& core,
                                                     const Tensor& u_out, const Tensor& u_in, double scale, double p,
                                                     int64_t seed) {
  check_linear_factorized(x, weight, bias, core, u_out, u_in, p);
  const Tensor x2 = tokens(x);
  Tensor s = shrink(x2, u_in, p, seed);
  Tensor y = expand(s, expansion(u_out, core, scale), bias);
  y.addmm_(x2, weight.t());
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return {y.view(shape), s};
}

Tensor linear_factorized(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& core,
                         const Tensor& u_out, const Tensor& u_in, double scale, double p, int64_t seed) {
  return std::get<0>(linear_factorized_forward(x, weight, bias, core, u_out, u_in, scale, p, seed));
}

// mask: dx, dweight, dbias, dcore, du_out, du_in; each undefined where not asked. x (the forward's input) is
// needed for dweight and du_in only.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_factorized_backward(
    const Tensor& grad, const std::optional<Tensor>& x, const Tensor& weight, const Tensor& s, const Tensor& core,
    const Tensor& u_out, const Tensor& u_in, double scale, double p, int64_t seed, std::array<bool, 6> mask) {
  const auto [need_x, need_w, need_b, need_core, need_uo, need_ui] = mask;
  TORCH_CHECK(x.has_value() || !(need_w || need_ui), "x: expected the forward's input (a weight or u_in gradient "
              "is asked), got None");
  check_tensor(grad, "grad");
  check_like(grad, weight, "grad", "weight");
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == weight.size(0), "grad: expected (..., ", weight.size(0),
              ") (the rows of weight), got shape ", grad.sizes());
  const Tensor dy = tokens(grad);
  const Tensor x2 = x.has_value() ? tokens(*x) : Tensor();
  Tensor dx, dw, db, dcore, du_out, du_in, ds, dbb;
  const bool need_ds = need_x || need_ui, need_db = need_core || need_uo;
  if (need_ds || need_db) {
    const Tensor b = expansion(u_out, core, scale);
    if (need_ds && need_db) {
      std::tie(ds, dbb) = linear_grad(dy, s, b);  // one read of dy
    } else if (need_ds) {
      ds = expand_grad_input(dy, b);
    } else {
      dbb = factor_grad(dy, s, 0.0, 0);  // (out, r_in)
    }
  }
  if (need_x) {
    dx = shrink_grad_input(ds, u_in, p, seed);
    dx.addmm_(dy, weight);
    auto shape = grad.sizes().vec();
    shape.back() = weight.size(1);
    dx = dx.view(shape);
  }
  if (need_w) dw = at::mm(dy.t(), x2);
  if (need_b) db = dy.sum(0);
  if (need_core) dcore = at::mm(u_out.t(), dbb).mul_(scale);
  if (need_uo) du_out = at::mm(dbb, core.t()).mul_(scale);
  if (need_ui) du_in = factor_grad(x2, ds, p, seed);
  return {dx, dw, db, dcore, du_out, du_in};
}

class LinearFactorizedFn : public torch::autograd::Function<LinearFactorizedFn> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& core, const Tensor& u_out,
                        const Tensor& u_in, double scale, double p, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::linear_factorized_forward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                           const Tensor&, const Tensor&, const Tensor&, double, double,
                                                           int64_t)>();
    auto [y, s] = op.call(x, weight, bias, core, u_out, u_in, scale, p, seed);
    const std::vector<bool> mask{x.requires_grad(), weight.requires_grad(), bias.has_value() && bias->requires_grad(),
                                 core.requires_grad(), u_out.requires_grad(), u_in.requires_grad()};
    // x only where a gradient reads it (the weight's, u_in's)
    ctx->save_for_backward({mask[1] || mask[5] ? x : Tensor(), weight, s, core, u_out, u_in});
    ctx->saved_data["mask"] = mask;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_first_order("flora::linear_factorized");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flora::linear_factorized_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, double, double, int64_t, std::array<bool, 6>)>();
    const auto saved = ctx->get_saved_variables();
    const auto m = ctx->saved_data["mask"].toBoolList();
    const std::array<bool, 6> mask{m[0], m[1], m[2], m[3], m[4], m[5]};
    const std::optional<Tensor> x = saved[0].defined() ? std::optional<Tensor>(saved[0]) : std::nullopt;
    auto [dx, dw, db, dcore, du_out, du_in] =
        op.call(grads[0], x, saved[1], saved[2], saved[3], saved[4], saved[5], ctx->saved_data["scale"].toDouble(),
                ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(), mask);
    // one gradient per forward argument, the non-tensor ones (scale, p, seed) last
    return {dx, dw, db, dcore, du_out, du_in, Tensor(), Tensor(), Tensor()};
  }
};

Tensor linear_factorized_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                  const Tensor& core, const Tensor& u_out, const Tensor& u_in, double scale, double p,
                                  int64_t seed) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || weight.requires_grad() || core.requires_grad() || u_out.requires_grad() ||
                     u_in.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (grad) return LinearFactorizedFn::apply(x, weight, bias, core, u_out, u_in, scale, p, seed);
  at::AutoDispatchBelowADInplaceOrView guard;  // no backward: the forward alone
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flora::linear_factorized", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                     const Tensor&, const Tensor&, double, double, int64_t)>();
  return op.call(x, weight, bias, core, u_out, u_in, scale, p, seed);
}

}  // namespace

// The compositions run on any device the adapter ops have; CPU and CUDA register them.
TORCH_LIBRARY_IMPL(flora, CPU, m) {
  m.impl("linear_factorized", &linear_factorized);
  m.impl("linear_factorized_forward", &linear_factorized_forward);
  m.impl("linear_factorized_backward", &linear_factorized_backward);
}

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("linear_factorized", &linear_factorized);
  m.impl("linear_factorized_forward", &linear_factorized_forward);
  m.impl("linear_factorized_backward", &linear_factorized_backward);
}

TORCH_LIBRARY_IMPL(flora, Autograd, m) { m.impl("linear_factorized", &linear_factorized_autograd); }

}  // namespace flora
