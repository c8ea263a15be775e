// TORCH_LIBRARY_IMPL(flora, CUDA): validates with the same checks as the CPU kernels, then calls
// the raw-pointer launchers of csrc/flora_cuda.cu on the current stream. Activations are read and
// written in place through their strides (contiguous or channels_last: flora_checks.h act_view); new
// activations take the input's layout (layout_of), in-place targets keep theirs.
// Built only where torch has CUDA (setup.py / the JIT build of flora_kernels/backends/ext/build.py).
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
using cuda::DType;

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

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// cuda::mix with its split-k workspace (if any) from torch's caching allocator; out (view ov) is written.
void run_mix(const Tensor& in, const Act& v, const Tensor& w, int64_t w_gs, int64_t ws_o, int64_t ws_c,
             Tensor& out, const Act& ov, const void* bias, double alpha, bool accumulate, DropParams din,
             DropParams dout, const char* what) {
  const DType dt = dtype_of(in);
  const int64_t bytes = cuda::mix_workspace_bytes(dt, v, ov, bias, accumulate, dout);
  Tensor ws = at::empty({bytes}, in.options().dtype(at::kByte));
  check_launch(cuda::mix(dt, in.data_ptr(), v, w.data_ptr(), w_gs, ws_o, ws_c, out.data_ptr(), ov, bias, alpha,
                         accumulate, din, dout, bytes ? ws.data_ptr() : nullptr, stream()),
               what);
}

Tensor tucker_reconstruct_cuda(const Tensor& core_, const Tensor& u0_, const Tensor& u1_, double scale,
                               const c10::optional<Tensor>& base_) {
  const ReconDims d = check_reconstruct(core_, u0_, u1_);
  check_cuda(core_, "core");
  c10::cuda::CUDAGuard guard(core_.device());
  Tensor core = core_.contiguous(), u0 = u0_.contiguous(), u1 = u1_.contiguous();
  Tensor base;
  if (base_.has_value() && base_->defined()) {
    check_full_shape(*base_, d, core_, "base");
    base = base_->contiguous();
  }
  Tensor out = at::empty({d.I0, d.I1, d.T}, core.options().dtype(base.defined() ? base.scalar_type() : core.scalar_type()));
  Tensor ws = at::empty({cuda::reconstruct_workspace_bytes(dtype_of(core), d.r0, d.r1, d.T, d.I0)},
                        core.options().dtype(at::kByte));
  check_launch(cuda::reconstruct(dtype_of(core), dtype_of(out), core.data_ptr(), u0.data_ptr(), u1.data_ptr(),
                                 base.defined() ? base.data_ptr() : nullptr, out.data_ptr(), ws.data_ptr(), d.r0, d.r1,
                                 d.T, d.I0, d.I1, scale, stream()),
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
  Tensor wc = at::empty({cuda::reconstruct_backward_workspace_bytes(dtype_of(core), d.r0, d.r1, d.T, d.I0, d.I1)},
                        core.options().dtype(at::kByte));
  check_launch(cuda::reconstruct_backward(dtype_of(core), grad.data_ptr(), core.data_ptr(), u0.data_ptr(),
                                          u1.data_ptr(), dcore.data_ptr(), du0.data_ptr(), du1.data_ptr(),
                                          q.data_ptr(), rm.data_ptr(), wc.numel() ? wc.data_ptr() : nullptr, d.r0,
                                          d.r1, d.T, d.I0, d.I1, scale, stream()),
               "tucker_reconstruct_backward");
  return {dcore, du0, du1};
}

Tensor adapter_shrink_cuda(const Tensor& x_, const Tensor& u_in_, int64_t groups, double p, int64_t seed) {
  check_in_factor(x_, u_in_, groups, "x", "u_in");
  check_cuda(x_, "x");
  check_dropout(p);
  c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_, u = u_in_.contiguous();
  const Act v = input_view(x, groups);
  const int64_t r = u.size(1);
  Tensor z = empty_with_channels(x_, groups * r);
  run_mix(x, v, u, 0, 1, r, z, inplace_view(z, groups, "z"), nullptr, 1.0, false, make_drop(p, seed), DropParams{},
          "adapter_shrink");
  return z;
}

void adapter_expand_cuda(Tensor& y, const Tensor& z_, const Tensor& u_out_, int64_t groups, double scale) {
  const ExpandDims e = check_expand(y, z_, u_out_, groups);
  check_cuda(y, "y");
  const Act ov = inplace_view(y, groups, "y");
  c10::cuda::CUDAGuard guard(y.device());
  Tensor z = z_, u = u_out_.contiguous();
  const Act v = input_view(z, groups);
  run_mix(z, v, u, e.Og * e.r, e.r, 1, y, ov, nullptr, scale, true, DropParams{}, DropParams{}, "adapter_expand_");
}

Tensor adapter_expand_out_cuda(const Tensor& z_, const Tensor& u_out_, int64_t groups, double scale,
                               const c10::optional<Tensor>& bias_) {
  check_expand_out(z_, u_out_, bias_);
  check_cuda(z_, "z");
  c10::cuda::CUDAGuard guard(z_.device());
  Tensor y = empty_with_channels(z_, u_out_.size(0));
  const ExpandDims e = check_expand(y, z_, u_out_, groups);
  Tensor z = z_, u = u_out_.contiguous();
  Tensor bias = bias_.has_value() && bias_->defined() ? bias_->contiguous() : Tensor();
  const Act v = input_view(z, groups);
  run_mix(z, v, u, e.Og * e.r, e.r, 1, y, inplace_view(y, groups, "y"), bias.defined() ? bias.data_ptr() : nullptr,
          scale, false, DropParams{}, DropParams{}, "adapter_expand");
  return y;
}

Tensor adapter_expand_grad_input_cuda(const Tensor& dy_, const Tensor& u_out_, int64_t groups, double scale) {
  const ChanView cv = check_out_factor(dy_, u_out_, groups);
  check_cuda(dy_, "dy");
  c10::cuda::CUDAGuard guard(dy_.device());
  Tensor dy = dy_, u = u_out_.contiguous();
  const Act v = input_view(dy, groups);
  const int64_t r = u.size(1);
  Tensor dz = empty_with_channels(dy_, groups * r);
  run_mix(dy, v, u, cv.C * r, 1, r, dz, inplace_view(dz, groups, "dz"), nullptr, scale, false, DropParams{},
          DropParams{}, "adapter_expand_grad_input");
  return dz;
}

void shrink_grad_input_impl(Tensor& dx, const Tensor& dz_, const Tensor& u_in_, int64_t groups, double p, int64_t seed,
                            bool accumulate) {
  check_in_factor(dz_, u_in_.t(), groups, "dz", "u_in^T");
  check_cuda(dz_, "dz");
  check_dropout(p);
  const Act ov = inplace_view(dx, groups, "dx");
  c10::cuda::CUDAGuard guard(dz_.device());
  Tensor dz = dz_, u = u_in_.contiguous();
  const Act v = input_view(dz, groups);
  run_mix(dz, v, u, 0, v.c, 1, dx, ov, nullptr, 1.0, accumulate, DropParams{}, make_drop(p, seed),
          "adapter_shrink_grad_input");
}

Tensor adapter_shrink_grad_input_cuda(const Tensor& dz, const Tensor& u_in, int64_t groups, double p, int64_t seed) {
  check_shrink_grad_input(dz, u_in, groups);
  Tensor dx = empty_with_channels(dz, groups * u_in.size(0));
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
  check_factor_grad(a_, b_, groups, p);
  check_cuda(a_, "a");
  c10::cuda::CUDAGuard guard(a_.device());
  Tensor a = a_, b = b_;
  const Act va = input_view(a, groups), vb = input_view(b, groups);
  Tensor out = at::empty({(per_group ? groups : 1) * va.c, vb.c}, a.options().memory_format(at::MemoryFormat::Contiguous));
  const DType dt = dtype_of(a);
  Tensor ws = at::empty({cuda::corr_workspace_bytes(dt, va, vb, per_group)}, a.options().dtype(at::kByte));
  check_launch(cuda::corr(dt, a.data_ptr(), va, b.data_ptr(), vb, out.data_ptr(), per_group, scale, make_drop(p, seed),
                          ws.numel() ? ws.data_ptr() : nullptr, stream()),
               "adapter_factor_grad");
  return out;
}

std::tuple<Tensor, Tensor> adapter_linear_grad_cuda(const Tensor& dy_, const Tensor& s_, const Tensor& b_) {
  check_linear_grad(dy_, s_, b_);
  check_cuda(dy_, "dy");
  c10::cuda::CUDAGuard guard(dy_.device());
  Tensor dy = dy_.contiguous(), s = s_.contiguous(), b = b_.contiguous();
  const int64_t M = dy.size(0), O = dy.size(1), r = s.size(1);
  Tensor ds = at::empty({M, r}, dy.options()), db = at::empty({O, r}, dy.options());
  const DType dt = dtype_of(dy);
  Tensor ws = at::empty({cuda::linear_grad_workspace_bytes(dt, M, O, r, 0)}, dy.options().dtype(at::kByte));
  check_launch(cuda::linear_grad(dt, dy.data_ptr(), s.data_ptr(), b.data_ptr(), ds.data_ptr(), db.data_ptr(), M, O, r, 0,
                                 ws.numel() ? ws.data_ptr() : nullptr, stream()),
               "adapter_linear_grad");
  return {ds, db};
}

// The core conv's shape for conv_mix (geometry as 2-D: a 1-D conv has H = 1).
cuda::ConvShape conv_shape(const CoreConvGeom& g) {
  return cuda::ConvShape{g.N,         g.in[0],     g.in[1],  g.out[0], g.out[1], g.kern[0], g.kern[1],
                         g.stride[0], g.stride[1], g.dil[0], g.dil[1], g.plo[0], g.plo[1]};
}

cuda::Act4 act4(const Tensor& t) {
  const bool one_d = t.dim() == 3;
  return cuda::Act4{t.size(1), t.stride(0), t.stride(1), one_d ? 0 : t.stride(2), t.stride(one_d ? 2 : 3)};
}

// k (r_out, r_in, *kernel) as (R, *kernel, C_src) contiguous: R = r_out (forward) or r_in (backward).
Tensor kernel_rows(const Tensor& k, bool transposed) {
  const int64_t R = transposed ? 1 : 0, S = transposed ? 0 : 1;
  return (k.dim() == 3 ? k.permute({R, 2, S}) : k.permute({R, 2, 3, S})).contiguous();
}

void check_rank(int64_t r, const char* what) {
  TORCH_CHECK(r <= cuda::kConvMixMaxRank, what, ": expected at most ", cuda::kConvMixMaxRank,
              " (the CUDA kernel keeps a 64 x ", cuda::kConvMixMaxRank, " tile of its result in shared memory), got ", r);
}

Tensor adapter_conv_expand_cuda(Tensor& y, const Tensor& z, const Tensor& k, const Tensor& u_out_,
                                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                double scale) {
  const CoreConvGeom g = check_conv_expand(y, z, k, u_out_, stride, padding, dilation);
  check_cuda(z, "z");
  check_rank(k.size(0), "r_out (k.shape[0])");
  const Act ov = inplace_view(y, 1, "y");
  c10::cuda::CUDAGuard guard(z.device());
  Tensor u = at::empty(with_channels(y, k.size(0)), z.options().memory_format(layout_of(z)));
  const Tensor kp = kernel_rows(k, false), f = u_out_.contiguous();
  check_launch(cuda::conv_mix(dtype_of(z), false, conv_shape(g), z.data_ptr(), act4(z), kp.data_ptr(), u.data_ptr(),
                              inplace_view(u, 1, "u"), f.data_ptr(), y.data_ptr(), ov, scale, DropParams{}, stream()),
               "adapter_conv_expand_");
  return u;
}

Tensor adapter_conv_shrink_grad_input_cuda(Tensor& dx, const Tensor& du, const Tensor& k, const Tensor& u_in_,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation, double p, int64_t seed) {
  const CoreConvGeom g = check_conv_shrink_grad(dx, du, k, u_in_, stride, padding, dilation, p);
  check_cuda(du, "du");
  check_rank(k.size(1), "r_in (k.shape[1])");
  const Act ov = inplace_view(dx, 1, "dx");
  c10::cuda::CUDAGuard guard(du.device());
  Tensor dz = at::empty(with_channels(dx, k.size(1)), du.options().memory_format(layout_of(du)));
  const Tensor kp = kernel_rows(k, true), f = u_in_.contiguous();
  check_launch(cuda::conv_mix(dtype_of(du), true, conv_shape(g), du.data_ptr(), act4(du), kp.data_ptr(),
                              dz.data_ptr(), inplace_view(dz, 1, "dz"), f.data_ptr(), dx.data_ptr(), ov, 1.0,
                              make_drop(p, seed), stream()),
               "adapter_conv_shrink_grad_input_");
  return dz;
}

Tensor dropout_mask_cuda(const Tensor& x, double p, int64_t seed) {
  check_tensor(x, "x");
  check_cuda(x, "x");
  check_dropout(p);
  c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(cuda::dropout_mask(dtype_of(out), out.data_ptr(), out.numel(), make_drop(p, seed), stream()),
               "dropout_mask");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CUDA, m) {
  m.impl("tucker_reconstruct", &tucker_reconstruct_cuda);
  m.impl("tucker_reconstruct_backward", &tucker_reconstruct_backward_cuda);
  m.impl("adapter_shrink", &adapter_shrink_cuda);
  m.impl("adapter_expand_", &adapter_expand_cuda);
  m.impl("adapter_expand", &adapter_expand_out_cuda);
  m.impl("adapter_expand_grad_input", &adapter_expand_grad_input_cuda);
  m.impl("adapter_shrink_grad_input", &adapter_shrink_grad_input_cuda);
  m.impl("adapter_shrink_grad_input_", &adapter_shrink_grad_input_inplace_cuda);
  m.impl("adapter_factor_grad", &adapter_factor_grad_cuda);
  m.impl("adapter_linear_grad", &adapter_linear_grad_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
  m.impl("adapter_conv_expand_", &adapter_conv_expand_cuda);
  m.impl("adapter_conv_shrink_grad_input_", &adapter_conv_shrink_grad_input_cuda);
}

}  // namespace flora
