// Input validation shared by the CPU implementations and the CUDA binding (torch side only).
// Every check raises a c10::Error (RuntimeError in Python) with an "expected X, got Y" message.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "flora_common.h"

namespace flora {

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

inline void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              ": expected dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, name, ": expected a non-empty tensor, got shape ", t.sizes());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ", ref_name,
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (the dtype of ",
              ref_name, "), got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* what) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor ", what, ", got shape ", t.sizes());
}

// The C++ autograd nodes' backward is first-order: under create_graph=True (grad mode on during backward)
// their backward ops, which have no autograd of their own, would give silently wrong second derivatives.
inline void check_first_order(const char* op) {
  TORCH_CHECK(!c10::GradMode::is_enabled(), op, ": expected a first-order backward, got create_graph=True: double "
              "backward through the extension's ops is not supported (backend=\"reference\" supports it)");
}

inline void check_dropout(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a dropout probability in [0, 1), got ", p);
}

// An activation-like tensor (N, groups * C, *spatial) viewed as (R = N * groups, C, P = prod(spatial)).
struct ChanView {
  int64_t R, C, P;
};

inline ChanView chan_view(const at::Tensor& t, int64_t groups, const char* name) {
  TORCH_CHECK(groups >= 1, "groups: expected an int >= 1, got ", groups);
  TORCH_CHECK(t.dim() >= 2, name, ": expected a tensor of shape (N, channels, *spatial) with at least 2 dims, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) % groups == 0, name, ": expected dim 1 (", t.size(1), ") divisible by groups=", groups,
              ", got shape ", t.sizes());
  int64_t P = 1;
  for (int64_t d = 2; d < t.dim(); ++d) P *= t.size(d);
  return ChanView{t.size(0) * groups, t.size(1) / groups, P};
}

inline std::vector<int64_t> with_channels(const at::Tensor& t, int64_t channels) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s[1] = channels;
  return s;
}

// The (n, g, c, p) view of t read in place (Act, flora_common.h) when its spatial dims collapse to one
// stride (contiguous, channels_last, ...); false otherwise. The CPU kernels and the CUDA launchers
// take the same view.
inline bool act_view(const at::Tensor& t, int64_t groups, Act& v) {
  int64_t P = 1, sp = 0;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (P == 1)
      sp = t.stride(d);  // the innermost spatial dim of size > 1
    else if (t.stride(d) != sp * P)
      return false;
    P *= t.size(d);
  }
  const int64_t C = t.size(1) / groups;
  v = Act{t.size(0), groups, C, P, t.stride(0), C * t.stride(1), t.stride(1), sp};
  return true;
}

// The view of an input read in place; a layout without one (spatial dims that do not collapse)
// replaces t by a contiguous copy first.
inline Act input_view(at::Tensor& t, int64_t groups) {
  Act v;
  if (!act_view(t, groups, v)) {
    t = t.contiguous();
    act_view(t, groups, v);
  }
  return v;
}

// The view of a tensor updated in place: dense, non-overlapping and with a view (contiguous,
// channels_last, ...), else an error.
inline Act inplace_view(const at::Tensor& t, int64_t groups, const char* name) {
  Act v;
  TORCH_CHECK(t.is_non_overlapping_and_dense() && act_view(t, groups, v), name,
              ": expected a dense tensor whose spatial dims collapse to one stride (contiguous or channels_last; "
              "it is updated in place), got shape ", t.sizes(), " and strides ", t.strides());
  return v;
}

// The memory format of a new activation computed from t: channels_last (channels_last_3d) when t is
// in that layout and not also contiguous, else contiguous. The fakes (backends/ext/ops.py) follow
// the same rule.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  if (!t.is_contiguous()) {
    if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
    if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

// A new (N, channels, *spatial) tensor with t's batch and spatial sizes, dtype, device and layout_of(t).
inline at::Tensor empty_with_channels(const at::Tensor& t, int64_t channels) {
  return at::empty(with_channels(t, channels), t.options().memory_format(layout_of(t)));
}

inline void check_same_batch_spatial(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  bool ok = a.dim() == b.dim() && a.size(0) == b.size(0);
  for (int64_t d = 2; ok && d < a.dim(); ++d) ok = a.size(d) == b.size(d);
  TORCH_CHECK(ok, b_name, ": expected the batch and spatial sizes of ", a_name, " (shape ", a.sizes(),
              ") with any channel count, got shape ", b.sizes());
}

// x: (N, groups*C, *sp), factor: (C, r). Returns the view of x.
inline ChanView check_in_factor(const at::Tensor& x, const at::Tensor& factor, int64_t groups, const char* x_name,
                                const char* f_name) {
  check_tensor(x, x_name);
  check_tensor(factor, f_name);
  check_like(factor, x, f_name, x_name);
  check_dim(factor, 2, f_name, "(channels per group, rank)");
  ChanView v = chan_view(x, groups, x_name);
  TORCH_CHECK(factor.size(0) == v.C, f_name, ": expected shape (", v.C, ", r) to match ", x_name, " of shape ",
              x.sizes(), " with groups=", groups, ", got ", factor.sizes());
  return v;
}

// dy: (N, groups * O, *sp), u_out: (groups * O, r) -- group g uses rows g*O .. g*O + O - 1.
inline ChanView check_out_factor(const at::Tensor& dy, const at::Tensor& u_out, int64_t groups) {
  check_tensor(dy, "dy");
  check_tensor(u_out, "u_out");
  check_like(u_out, dy, "u_out", "dy");
  check_dim(u_out, 2, "u_out", "(out channels, rank)");
  ChanView v = chan_view(dy, groups, "dy");
  TORCH_CHECK(u_out.size(0) == dy.size(1), "u_out: expected shape (", dy.size(1), ", r) to match dy of shape ",
              dy.sizes(), ", got ", u_out.sizes());
  return v;
}

struct ExpandDims {
  ChanView v;  // of z: (R, r, P)
  int64_t r, Og;
};

// y: (N, groups * O, *sp) (updated in place: see inplace_view), z: (N, groups * r, *sp), u_out: (groups * O, r).
inline ExpandDims check_expand(const at::Tensor& y, const at::Tensor& z, const at::Tensor& u_out, int64_t groups) {
  check_tensor(y, "y");
  check_tensor(z, "z");
  check_tensor(u_out, "u_out");
  check_like(z, y, "z", "y");
  check_like(u_out, y, "u_out", "y");
  check_dim(u_out, 2, "u_out", "(out channels, rank)");
  ChanView v = chan_view(z, groups, "z");
  (void)chan_view(y, groups, "y");
  check_same_batch_spatial(y, z, "y", "z");
  TORCH_CHECK(u_out.size(0) == y.size(1) && u_out.size(1) == v.C, "u_out: expected shape (", y.size(1), ", ", v.C,
              ") for y of shape ", y.sizes(), " and z of shape ", z.sizes(), " with groups=", groups, ", got ",
              u_out.sizes());
  return ExpandDims{v, v.C, y.size(1) / groups};
}

// Arguments of adapter_expand (out of place): z (N, groups * r, *sp), u_out (groups * O, r), bias
// (groups * O) or none. Returns the output's shape (N, groups * O, *sp).
inline std::vector<int64_t> check_expand_out(const at::Tensor& z, const at::Tensor& u_out,
                                             const c10::optional<at::Tensor>& bias) {
  check_tensor(z, "z");
  check_tensor(u_out, "u_out");
  check_like(u_out, z, "u_out", "z");
  check_dim(u_out, 2, "u_out", "(out channels, rank)");
  TORCH_CHECK(z.dim() >= 2, "z: expected a tensor of shape (N, channels, *spatial) with at least 2 dims, got shape ",
              z.sizes());
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias");
    check_like(*bias, z, "bias", "z");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == u_out.size(0), "bias: expected shape (", u_out.size(0),
                ",) (the rows of u_out), got ", bias->sizes());
  }
  return with_channels(z, u_out.size(0));
}

// Arguments of adapter_linear_grad: dy (M, O), s (M, r), b (O, r), one dtype and device.
inline void check_linear_grad(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& b) {
  check_tensor(dy, "dy");
  check_tensor(s, "s");
  check_tensor(b, "b");
  check_like(s, dy, "s", "dy");
  check_like(b, dy, "b", "dy");
  check_dim(dy, 2, "dy", "(tokens, out features)");
  check_dim(s, 2, "s", "(tokens, rank)");
  check_dim(b, 2, "b", "(out features, rank)");
  TORCH_CHECK(s.size(0) == dy.size(0), "s: expected ", dy.size(0), " rows (the tokens of dy), got shape ", s.sizes());
  TORCH_CHECK(b.size(0) == dy.size(1) && b.size(1) == s.size(1), "b: expected shape (", dy.size(1), ", ", s.size(1),
              ") for dy of shape ", dy.sizes(), " and s of shape ", s.sizes(), ", got ", b.sizes());
}

struct ReconDims {
  int64_t r0, r1, T, I0, I1;
};

inline ReconDims check_reconstruct(const at::Tensor& core, const at::Tensor& u0, const at::Tensor& u1) {
  check_tensor(core, "core");
  check_tensor(u0, "u0");
  check_tensor(u1, "u1");
  check_dim(core, 3, "core", "(r_0, r_1, taps) (spatial modes folded into taps)");
  check_dim(u0, 2, "u0", "(I_0, r_0)");
  check_dim(u1, 2, "u1", "(I_1, r_1)");
  check_like(u0, core, "u0", "core");
  check_like(u1, core, "u1", "core");
  TORCH_CHECK(u0.size(1) == core.size(0), "u0: expected shape (I_0, ", core.size(0), ") to match core of shape ",
              core.sizes(), ", got ", u0.sizes());
  TORCH_CHECK(u1.size(1) == core.size(1), "u1: expected shape (I_1, ", core.size(1), ") to match core of shape ",
              core.sizes(), ", got ", u1.sizes());
  return ReconDims{core.size(0), core.size(1), core.size(2), u0.size(0), u1.size(0)};
}

inline void check_full_shape(const at::Tensor& t, const ReconDims& d, const at::Tensor& core, const char* name) {
  check_tensor(t, name);
  TORCH_CHECK(t.device() == core.device(), name, ": expected device ", core.device(), " (the device of core), got ",
              t.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == d.I0 && t.size(1) == d.I1 && t.size(2) == d.T, name, ": expected shape (",
              d.I0, ", ", d.I1, ", ", d.T, "), got ", t.sizes());
}

// Arguments of adapter_shrink_grad_input (out of place): shared by the CPU and CUDA bindings.
inline void check_shrink_grad_input(const at::Tensor& dz, const at::Tensor& u_in, int64_t groups) {
  check_tensor(dz, "dz");
  check_tensor(u_in, "u_in");
  check_dim(u_in, 2, "u_in", "(channels per group, rank)");
  TORCH_CHECK(dz.dim() >= 2, "dz: expected at least 2 dims, got shape ", dz.sizes());
  TORCH_CHECK(groups >= 1, "groups: expected an int >= 1, got ", groups);
}

// Arguments of adapter_shrink_grad_input_ (accumulates into dx in place).
inline void check_shrink_grad_input_inplace(const at::Tensor& dx, const at::Tensor& dz, const at::Tensor& u_in,
                                            int64_t groups) {
  check_tensor(dx, "dx");
  check_tensor(dz, "dz");
  check_tensor(u_in, "u_in");
  check_like(dx, dz, "dx", "dz");
  check_dim(u_in, 2, "u_in", "(channels per group, rank)");
  TORCH_CHECK(dz.dim() >= 2, "dz: expected at least 2 dims, got shape ", dz.sizes());
  check_same_batch_spatial(dz, dx, "dz", "dx");
  TORCH_CHECK(groups >= 1 && dx.size(1) == groups * u_in.size(0), "dx: expected ", groups * u_in.size(0),
              " channels (groups * u_in.shape[0]), got shape ", dx.sizes());
}

// Arguments of adapter_factor_grad: returns the channel views of a and b (device checked by the caller).
inline std::pair<ChanView, ChanView> check_factor_grad(const at::Tensor& a, const at::Tensor& b, int64_t groups,
                                                       double p) {
  check_tensor(a, "a");
  check_tensor(b, "b");
  check_like(b, a, "b", "a");
  check_dropout(p);
  const ChanView va = chan_view(a, groups, "a");
  const ChanView vb = chan_view(b, groups, "b");
  check_same_batch_spatial(a, b, "a", "b");
  return {va, vb};
}

// Geometry of the fused core-conv ops (adapter_conv_expand_, adapter_conv_shrink_grad_input_): a 1-D or
// 2-D conv with one group and zero padding, held as 2-D (a 1-D conv is the case H = 1: index 0 is the
// height, 1 the width). `padding` is (lo, hi) per spatial dim in dim order, flattened:
// [lo_0, hi_0, lo_1, hi_1] (asymmetric pads allowed).
struct CoreConvGeom {
  int64_t dims, N;
  int64_t in[2], out[2], kern[2], stride[2], dil[2], plo[2], phi[2];
  int64_t taps() const { return kern[0] * kern[1]; }
};

inline CoreConvGeom core_conv_geom(int64_t dims, int64_t N, c10::IntArrayRef in_sp, c10::IntArrayRef k_sp,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(dims == 1 || dims == 2, "expected a 1-D or 2-D conv (tensors of 3 or 4 dims), got ", dims,
              " spatial dims");
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == dims, "stride: expected ", dims, " ints, got ", stride);
  TORCH_CHECK(static_cast<int64_t>(dilation.size()) == dims, "dilation: expected ", dims, " ints, got ", dilation);
  TORCH_CHECK(static_cast<int64_t>(padding.size()) == 2 * dims, "padding: expected ", 2 * dims,
              " ints ((lo, hi) per spatial dim), got ", padding);
  CoreConvGeom g{dims, N, {1, 1}, {1, 1}, {1, 1}, {1, 1}, {1, 1}, {0, 0}, {0, 0}};
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t j = d + 2 - dims;  // 1-D: its only dim is the width
    TORCH_CHECK(stride[d] >= 1 && dilation[d] >= 1, "stride and dilation: expected ints >= 1, got stride ", stride,
                " and dilation ", dilation);
    TORCH_CHECK(padding[2 * d] >= 0 && padding[2 * d + 1] >= 0, "padding: expected ints >= 0, got ", padding);
    g.in[j] = in_sp[d];
    g.kern[j] = k_sp[d];
    g.stride[j] = stride[d];
    g.dil[j] = dilation[d];
    g.plo[j] = padding[2 * d];
    g.phi[j] = padding[2 * d + 1];
    g.out[j] = (g.in[j] + g.plo[j] + g.phi[j] - g.dil[j] * (g.kern[j] - 1) - 1) / g.stride[j] + 1;
    TORCH_CHECK(g.in[j] + g.plo[j] + g.phi[j] - g.dil[j] * (g.kern[j] - 1) - 1 >= 0, "expected a kernel (size ", k_sp,
                ", dilation ", dilation, ") that fits the padded input (size ", in_sp, ", padding ", padding,
                "), got an empty output");
  }
  return g;
}

// The core kernel k (r_out, r_in, *kernel) against the small activation `a` (N, channels, *spatial)
// whose channels are k's dim `kdim` (1: the conv's input z, 0: its output gradient du).
inline void check_core_kernel(const at::Tensor& a, const at::Tensor& k, int64_t kdim, const char* a_name) {
  check_tensor(a, a_name);
  check_tensor(k, "k");
  check_like(k, a, "k", a_name);
  TORCH_CHECK(a.dim() == 3 || a.dim() == 4, a_name, ": expected a 3-D or 4-D tensor (N, channels, *spatial) of a 1-D "
              "or 2-D conv, got shape ", a.sizes());
  TORCH_CHECK(k.dim() == a.dim() && k.size(kdim) == a.size(1), "k: expected shape (r_out, r_in, *kernel) with ",
              a.dim() - 2, " kernel dims and ", kdim == 1 ? "r_in" : "r_out", " = ", a.size(1), " (the channels of ",
              a_name, "), got ", k.sizes());
}

// Arguments of adapter_conv_expand_: y (N, C_out, *out) updated in place, z (N, r_in, *in), k (r_out, r_in,
// *kernel), u_out (C_out, r_out). Returns the geometry (out = the conv's output size, checked against y).
inline CoreConvGeom check_conv_expand(const at::Tensor& y, const at::Tensor& z, const at::Tensor& k,
                                      const at::Tensor& u_out, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                      c10::IntArrayRef dilation) {
  check_core_kernel(z, k, 1, "z");
  check_tensor(y, "y");
  check_tensor(u_out, "u_out");
  check_like(y, z, "y", "z");
  check_like(u_out, z, "u_out", "z");
  check_dim(u_out, 2, "u_out", "(out channels, r_out)");
  const int64_t dims = z.dim() - 2;
  const CoreConvGeom g = core_conv_geom(dims, z.size(0), z.sizes().slice(2), k.sizes().slice(2), stride, padding,
                                        dilation);
  std::vector<int64_t> ys{z.size(0), u_out.size(0)};
  for (int64_t d = 0; d < dims; ++d) ys.push_back(g.out[d + 2 - dims]);
  TORCH_CHECK(y.sizes() == c10::IntArrayRef(ys), "y: expected shape ", c10::IntArrayRef(ys),
              " (N, u_out.shape[0], the conv's output size), got ", y.sizes());
  TORCH_CHECK(u_out.size(1) == k.size(0), "u_out: expected shape (", u_out.size(0), ", ", k.size(0),
              ") (r_out = k.shape[0]), got ", u_out.sizes());
  return g;
}

// Arguments of adapter_conv_shrink_grad_input_: dx (N, C_in, *in) updated in place, du (N, r_out, *out),
// k (r_out, r_in, *kernel), u_in (C_in, r_in). Returns the geometry of the forward conv (in = dx's size).
inline CoreConvGeom check_conv_shrink_grad(const at::Tensor& dx, const at::Tensor& du, const at::Tensor& k,
                                           const at::Tensor& u_in, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation, double p) {
  check_core_kernel(du, k, 0, "du");
  check_tensor(dx, "dx");
  check_tensor(u_in, "u_in");
  check_like(dx, du, "dx", "du");
  check_like(u_in, du, "u_in", "du");
  check_dim(u_in, 2, "u_in", "(in channels, r_in)");
  check_dropout(p);
  TORCH_CHECK(dx.dim() == du.dim() && dx.size(0) == du.size(0), "dx: expected a ", du.dim(), "-D tensor with batch ",
              du.size(0), " (that of du), got shape ", dx.sizes());
  TORCH_CHECK(u_in.size(0) == dx.size(1) && u_in.size(1) == k.size(1), "u_in: expected shape (", dx.size(1), ", ",
              k.size(1), ") (dx's channels, r_in = k.shape[1]), got ", u_in.sizes());
  const int64_t dims = du.dim() - 2;
  const CoreConvGeom g = core_conv_geom(dims, du.size(0), dx.sizes().slice(2), k.sizes().slice(2), stride, padding,
                                        dilation);
  for (int64_t d = 0; d < dims; ++d)
    TORCH_CHECK(g.out[d + 2 - dims] == du.size(2 + d), "du: expected spatial size ", du.size(2 + d), " in dim ", 2 + d,
                " to be the conv's output size ", g.out[d + 2 - dims], " for dx of shape ", dx.sizes(), ", got shape ",
                du.sizes());
  return g;
}

}  // namespace flora
