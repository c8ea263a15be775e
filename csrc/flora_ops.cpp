// flora op schemas (TORCH_LIBRARY(flora)) and the importable Python module flora_kernels._C. The kernels:
// flora_cpu.cpp (TORCH_LIBRARY_IMPL CPU), flora_cuda.cu + flora_cuda_binding.cpp (CUDA); the Python
// side (fakes, autograd): flora_kernels/backends/ext/ops.py.
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
//   adapter_expand(z, u_out, groups, scale, bias?)       y = bias + scale * u_out_g . z (a new tensor)
//   adapter_expand_grad_input(dy, u_out, groups, scale)   dz = scale * u_out_g^T . dy
//   adapter_shrink_grad_input(dz, u_in, groups, p, seed)  dx = mask * (u_in . dz)
//   adapter_shrink_grad_input_(dx!, dz, u_in, ...)        dx += mask * (u_in . dz)
//   adapter_factor_grad(a, b, groups, per_group, scale, p, seed)
//       out[c, k] = scale * sum dropout(a)[., c, .] b[., k, .], summed over groups, or one
//       (C, K) block per group stacked to (groups * C, K) when per_group
//   adapter_linear_grad(dy (M, O), s (M, r), b (O, r))   (dS = dy b, dB = dy^T s): both from one read of dy
//   dropout_mask(x, p, seed)                              the multiplier (0 or 1/(1-p)) per element of x
//   adapter_conv_expand_(y!, z (N, r_in, *in), k (r_out, r_in, *kernel), u_out (C_out, r_out), stride, padding,
//                        dilation, scale) -> u
//       u = conv(z, k) (1-D / 2-D, one group, zero padding; padding = (lo, hi) per spatial dim, flattened),
//       y += scale * u_out . u; u in z's layout
//   adapter_conv_shrink_grad_input_(dx!, du (N, r_out, *out), k, u_in (C_in, r_in), stride, padding, dilation,
//                                   p, seed) -> dz
//       dz = the conv's input gradient for du (size of dx), dx += mask * (u_in . dz); dz in du's layout
//   input_fold(core (r0, r1, *rk), u_in (I1, r1), kernel [(k_j, rk_j)]) -> A (r0, I1, *k)   (CPU only)
//       A = core x_1 u_in x_2 kernel[0] ...: the core folded with every factor but the output one
//   input_fold_backward(grad (r0, I1, *k), core, u_in, kernel) -> [dcore, du_in, dkernel...]  (CPU only)
//   conv_folded(x, xa?, weight (C_out, C_in/g, *k), bias?, core, u_out (C_out, r0), u_in, kernel, scale, stride,
//               padding, dilation, groups) -> out  (CPU)
//       out = conv(x, weight) + bias + scale * u_out . conv(xa or x, input_fold(core, u_in, kernel)) (u_out per
//       group, the fold shared by the groups); its autograd is one C++ node over the two ops below
//   conv_folded_forward(same arguments) -> (out, A (r0, C_in/g, *k), h (N, g r0, *out))  (CPU)
//   conv_folded_backward(grad, x, xa?, weight, core, u_out, u_in, kernel, A, h, scale, stride, padding, dilation,
//                        groups, mask[6]) -> (dx, dxa, dweight, dbias, du_out, [dcore, du_in, dkernel...])  (CPU)
//   conv_merged(x, weight (C_out, C_in/g, *k), bias?, core, u_out (C_out, r0), u_in, kernel, scale, stride, padding,
//               dilation, groups) -> out  (CPU)
//       out = conv(x, weight + scale * u_out . input_fold(core, u_in, kernel)) + bias: the merged strategy; its
//       autograd is one C++ node over the two ops below
//   conv_merged_forward(same arguments) -> (out, A (r0, C_in/g, *k), W_eff (C_out, C_in/g, *k))  (CPU)
//   conv_merged_backward(grad, x, W_eff, core, u_out, u_in, kernel, A, scale, stride, padding, dilation, groups,
//                        mask[5]) -> (dx, dweight, dbias, du_out, [dcore, du_in, dkernel...])  (CPU)
//   linear_factorized(x (..., in), weight (out, in), bias?, core (r_out, r_in), u_out (out, r_out), u_in (in, r_in),
//                     scale, p, seed) -> y (..., out)
//       y = x W^T + bias + (dropout(x) u_in) (scale u_out core)^T (flora_linear.cpp; CPU and CUDA); its autograd
//       is one C++ node over the two ops below
//   linear_factorized_forward(same arguments) -> (y, S = dropout(x) u_in (M, r_in))
//   linear_factorized_backward(grad (..., out), x?, weight, S, core, u_out, u_in, scale, p, seed, mask[6])
//       -> (dx, dweight, dbias, dcore, du_out, du_in), each undefined where its mask entry is false
#include <Python.h>

#include <torch/library.h>

#include <string>
#include <vector>

namespace flora {

TORCH_LIBRARY(flora, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("tucker_reconstruct(Tensor core, Tensor u0, Tensor u1, float scale, Tensor? base) -> Tensor", tags);
  m.def("tucker_reconstruct_backward(Tensor grad, Tensor core, Tensor u0, Tensor u1, float scale)"
        " -> (Tensor, Tensor, Tensor)", tags);
  m.def("adapter_shrink(Tensor x, Tensor u_in, int groups, float p, int seed) -> Tensor", tags);
  m.def("adapter_expand_(Tensor(a!) y, Tensor z, Tensor u_out, int groups, float scale) -> ()", tags);
  m.def("adapter_expand(Tensor z, Tensor u_out, int groups, float scale, Tensor? bias) -> Tensor", tags);
  m.def("adapter_expand_grad_input(Tensor dy, Tensor u_out, int groups, float scale) -> Tensor", tags);
  m.def("adapter_shrink_grad_input(Tensor dz, Tensor u_in, int groups, float p, int seed) -> Tensor", tags);
  m.def("adapter_shrink_grad_input_(Tensor(a!) dx, Tensor dz, Tensor u_in, int groups, float p, int seed) -> ()", tags);
  m.def("adapter_factor_grad(Tensor a, Tensor b, int groups, bool per_group, float scale, float p, int seed) -> Tensor", tags);
  m.def("adapter_linear_grad(Tensor dy, Tensor s, Tensor b) -> (Tensor, Tensor)", tags);
  m.def("dropout_mask(Tensor x, float p, int seed) -> Tensor", tags);
  m.def("adapter_conv_expand_(Tensor(a!) y, Tensor z, Tensor k, Tensor u_out, int[] stride, int[] padding, "
        "int[] dilation, float scale) -> Tensor", tags);
  m.def("adapter_conv_shrink_grad_input_(Tensor(a!) dx, Tensor du, Tensor k, Tensor u_in, int[] stride, "
        "int[] padding, int[] dilation, float p, int seed) -> Tensor", tags);
  m.def("input_fold(Tensor core, Tensor u_in, Tensor[] kernel) -> Tensor", tags);
  m.def("input_fold_backward(Tensor grad, Tensor core, Tensor u_in, Tensor[] kernel) -> Tensor[]", tags);
  const std::string folded_args =
      "Tensor x, Tensor? xa, Tensor weight, Tensor? bias, Tensor core, Tensor u_out, Tensor u_in, Tensor[] kernel, "
      "float scale, int[] stride, int[] padding, int[] dilation, int groups";
  m.def(("conv_folded(" + folded_args + ") -> Tensor").c_str(), tags);
  m.def(("conv_folded_forward(" + folded_args + ") -> (Tensor, Tensor, Tensor)").c_str(), tags);
  m.def("conv_folded_backward(Tensor grad, Tensor x, Tensor? xa, Tensor weight, Tensor core, Tensor u_out, "
        "Tensor u_in, Tensor[] kernel, Tensor a, Tensor h, float scale, int[] stride, int[] padding, int[] dilation, "
        "int groups, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])", tags);
  const std::string merged_args =
      "Tensor x, Tensor weight, Tensor? bias, Tensor core, Tensor u_out, Tensor u_in, Tensor[] kernel, float scale, "
      "int[] stride, int[] padding, int[] dilation, int groups";
  m.def(("conv_merged(" + merged_args + ") -> Tensor").c_str(), tags);
  m.def(("conv_merged_forward(" + merged_args + ") -> (Tensor, Tensor, Tensor)").c_str(), tags);
  m.def("conv_merged_backward(Tensor grad, Tensor x, Tensor weight, Tensor core, Tensor u_out, Tensor u_in, "
        "Tensor[] kernel, Tensor a, float scale, int[] stride, int[] padding, int[] dilation, int groups, "
        "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor[])", tags);
  const std::string linear_args =
      "Tensor x, Tensor weight, Tensor? bias, Tensor core, Tensor u_out, Tensor u_in, float scale, float p, int seed";
  m.def(("linear_factorized(" + linear_args + ") -> Tensor").c_str(), tags);
  m.def(("linear_factorized_forward(" + linear_args + ") -> (Tensor, Tensor)").c_str(), tags);
  m.def("linear_factorized_backward(Tensor grad, Tensor? x, Tensor weight, Tensor s, Tensor core, Tensor u_out, "
        "Tensor u_in, float scale, float p, int seed, bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", tags);
  m.def("depthwise_conv2d_weight_grad(Tensor x, Tensor dy, int[] kernel, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor", tags);
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
