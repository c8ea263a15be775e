// TORCH_LIBRARY_IMPL(flora, CUDA): validates with the same checks as the CPU kernels, then calls
// the raw-pointer launchers of csrc/flora_cuda.cu on the current stream. Built only where torch
// has CUDA (setup.py / the JIT path in flora_kernels/backends/cuda.py).
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "flora_checks.h"
#include "flora_cuda.h"

namespace flora {
namespace {

using at::Tensor;

cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kDouble: return cuda::DType::F64;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK(false, "expected dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), name, ": expected a CUDA tensor for the CUDA kernel, got device ", t.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "flora::", what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

Tensor tucker_reconstruct_cuda(const Tensor& core_, const Tensor& u0_, const Tensor& u1_, double scale,
                               const c10::optional<Tensor>& base_) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cuda(core_, "core");
  c10::cuda::CUDAGuard guard(core_.device());
  const auto limit = cuda::reconstruct_max_row(dtype_of(core_));
  TORCH_CHECK(d.r1 * d.T <= limit, "tucker_reconstruct (CUDA): expected r_1 * taps <= ", limit,
              " (the shared-memory row buffer), got ", d.r1, " * ", d.T);
  Tensor core = core_.contiguous(), u0 = u0_.contiguous(), u1 = u1_.contiguous();
  Tensor base;
  if (base_.has_value() && base_->defined()) {
    check_full_shape(*base_, d, core_, "base");
    base = base_->contiguous();
  }
  Tensor out = at::empty({d.I0, d.I1, d.T}, core.options().dtype(base.defined() ? base.scalar_type() : core.scalar_type()));
  check_launch(cuda::reconstruct(dtype_of(core), dtype_of(out), core.data_ptr(), u0.data_ptr(), u1.data_ptr(),
                                 base.defined() ? base.data_ptr() : nullptr, out.data_ptr(), d.r0, d.r1, d.T, d.I0,
                                 d.I1, scale, c10::cuda::getCurrentCUDAStream().stream()),
               "tucker_reconstruct");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> tucker_reconstruct_backward_cuda(const Tensor& grad_, const Tensor& core_,
                                                                    const Tensor& u0_, const Tensor& u1_,
                                                                    double scale) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cuda(core_, "core");
  check_full_shape(grad_, d, core_, "grad");
  c10::cuda::CUDAGuard guard(core_.device());
  Tensor core = core_.contiguous(), u0 = u0_.contiguous(), u1 = u1_.contiguous();
  Tensor grad = grad_.to(core.scalar_type()).contiguous();
  Tensor dcore = at::empty_like(core), du0 = at::empty_like(u0), du1 = at::empty_like(u1);
  const auto acc = core.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor q = at::empty({d.I0, d.r1, d.T}, core.options().dtype(acc));
  Tensor rm = at::empty({d.I1, d.r0, d.T}, core.options().dtype(acc));
  check_launch(cuda::reconstruct_backward(dtype_of(core), grad.data_ptr(), core.data_ptr(), u0.data_ptr(),
                                          u1.data_ptr(), dcore.data_ptr(), du0.data_ptr(), du1.data_ptr(),
                                          q.data_ptr(), rm.data_ptr(), d.r0, d.r1, d.T, d.I0, d.I1, scale,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "tucker_reconstruct_backward");
  return {dcore, du0, du1};
}

Tensor adapter_shrink_cuda(const Tensor& x_, const Tensor& u_in_, int64_t groups, double p, int64_t seed) {
  const ChanView v = check_in_factor(x_, u_in_, groups, "x", "u_in");
  check_cuda(x_, "x");
  check_dropout(p);
  c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous(), u = u_in_.contiguous();
  const int64_t r = u.size(1);
  Tensor z = at::empty(with_channels(x, groups * r), x.options());
  check_launch(cuda::mix(dtype_of(x), x.data_ptr(), u.data_ptr(), groups, 0, 1, r, z.data_ptr(), v.R, v.C, r, v.P, 1.0, false,
                         make_drop(p, seed), DropParams{}, c10::cuda::getCurrentCUDAStream().stream()),
               "adapter_shrink");
  return z;
}

void adapter_expand_cuda(Tensor& y, const Tensor& z_, const Tensor& u_out_, int64_t groups, double scale) {
  const ExpandDims e = check_expand(y, z_, u_out_, groups);
  check_cuda(y, "y");
  c10::cuda::CUDAGuard guard(y.device());
  Tensor z = z_.contiguous(), u = u_out_.contiguous();
  check_launch(cuda::mix(dtype_of(y), z.data_ptr(), u.data_ptr(), groups, e.Og * e.r, e.r, 1, y.data_ptr(), e.v.R, e.r,
                         e.Og, e.v.P, scale, true, DropParams{}, DropParams{}, c10::cuda::getCurrentCUDAStream().stream()),
               "adapter_expand_");
}

Tensor adapter_expand_grad_input_cuda(const Tensor& dy_, const Tensor& u_out_, int64_t groups, double scale) {
  const ChanView v = check_out_factor(dy_, u_out_, groups);
  check_cuda(dy_, "dy");
  c10::cuda::CUDAGuard guard(dy_.device());
  Tensor dy = dy_.contiguous(), u = u_out_.contiguous();
  const int64_t r = u.size(1);
  Tensor dz = at::empty(with_channels(dy, groups * r), dy.options());
  check_launch(cuda::mix(dtype_of(dy), dy.data_ptr(), u.data_ptr(), groups, v.C * r, 1, r, dz.data_ptr(), v.R, v.C, r, v.P, scale,
                         false, DropParams{}, DropParams{}, c10::cuda::getCurrentCUDAStream().stream()),
               "adapter_expand_grad_input");
  return dz;
}

void shrink_grad_input_impl(Tensor& dx, const Tensor& dz_, const Tensor& u_in_, int64_t groups, double p, int64_t seed,
                            bool accumulate) {
  const ChanView v = check_in_factor(dz_, u_in_.t(), groups, "dz", "u_in^T");
  check_cuda(dz_, "dz");
  check_dropout(p);
  c10::cuda::CUDAGuard guard(dz_.device());
  Tensor dz = dz_.contiguous(), u = u_in_.contiguous();
  const int64_t C = u.size(0);
  check_launch(cuda::mix(dtype_of(dz), dz.data_ptr(), u.data_ptr(), groups, 0, v.C, 1, dx.data_ptr(), v.R, v.C, C, v.P, 1.0,
                         accumulate, DropParams{}, make_drop(p, seed), c10::cuda::getCurrentCUDAStream().stream()),
               "adapter_shrink_grad_input");
}

Tensor adapter_shrink_grad_input_cuda(const Tensor& dz, const Tensor& u_in, int64_t groups, double p, int64_t seed) {
  check_shrink_grad_input(dz, u_in, groups);
  Tensor dx = at::empty(with_channels(dz, groups * u_in.size(0)), dz.options());
  shrink_grad_input_impl(dx, dz, u_in, groups, p, seed, false);
  return dx;
}

void adapter_shrink_grad_input_inplace_cuda(Tensor& dx, const Tensor& dz, const Tensor& u_in, int64_t groups,
                                            double p, int64_t seed) {
  check_shrink_grad_input_inplace(dx, dz, u_in, groups);
  shrink_grad_input_impl(dx, dz, u_in, groups, p, seed, true);
}

Tensor adapter_factor_grad_cuda(const Tensor& a_, const Tensor& b_, int64_t groups, bool per_group, double scale,
                                double p, int64_t seed) {
  const auto [va, vb] = check_factor_grad(a_, b_, groups, p);
  check_cuda(a_, "a");
  c10::cuda::CUDAGuard guard(a_.device());
  Tensor a = a_.contiguous(), b = b_.contiguous();
  Tensor out = at::empty({(per_group ? groups : 1) * va.C, vb.C}, a.options());
  check_launch(cuda::corr(dtype_of(a), a.data_ptr(), b.data_ptr(), out.data_ptr(), va.R, va.C, vb.C, va.P, groups,
                          per_group, scale,
                          make_drop(p, seed), c10::cuda::getCurrentCUDAStream().stream()),
               "adapter_factor_grad");
  return out;
}

Tensor dropout_mask_cuda(const Tensor& x, double p, int64_t seed) {
  check_tensor(x, "x");
  check_cuda(x, "x");
  check_dropout(p);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(cuda::dropout_mask(dtype_of(out), out.data_ptr(), out.numel(), make_drop(p, seed),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "dropout_mask");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("tucker_reconstruct", &tucker_reconstruct_cuda);
  m.impl("tucker_reconstruct_backward", &tucker_reconstruct_backward_cuda);
  m.impl("adapter_shrink", &adapter_shrink_cuda);
  m.impl("adapter_expand_", &adapter_expand_cuda);
  m.impl("adapter_expand_grad_input", &adapter_expand_grad_input_cuda);
  m.impl("adapter_shrink_grad_input", &adapter_shrink_grad_input_cuda);
  m.impl("adapter_shrink_grad_input_", &adapter_shrink_grad_input_inplace_cuda);
  m.impl("adapter_factor_grad", &adapter_factor_grad_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace flora
