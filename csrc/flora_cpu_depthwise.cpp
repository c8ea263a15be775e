// Depthwise 2-D convolution weight gradient on CPU (flora::depthwise_conv2d_weight_grad; schema in
// flora_ops.cpp).
//
// For a conv with C_in/groups == 1 (each output channel co reads input channel co / m, m =
// C_out / C_in):
//   dW[co, 0, i, j] = sum_{n, ho, wo} dy[n, co, ho, wo] * x[n, co / m, ho*sh - ph + i*dh, wo*sw - pw + j*dw]
// (zero outside x). The merged strategy needs exactly this tensor (dW_eff), and ATen's CPU
// depthwise backward-weight is slow at the shapes of ConvNeXt-style 7x7 convs (measured in
// docs/kernels/cuda.md, "CPU kernels"). Work items: blocks of 16-64 output channels (at least one
// per thread where channels allow; each owns its outputs, so no reduction across threads). Per
// (n, ho, tap) and 16 channels, the products over the row's valid wo accumulate in registers,
// reading x and dy channels_last (other layouts are copied once). One output row accumulates in
// the op math type (float for fp32/fp16/bf16), rows add up in double.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "flora_checks.h"  // is_supported_float

namespace flora {
namespace {

struct DwGeom {
  int64_t N, C, M, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// [lo, hi) of the output positions o whose input position o*s - p + off lies in [0, size).
inline void valid_range(int64_t size, int64_t out, int64_t s, int64_t p, int64_t off, int64_t& lo, int64_t& hi) {
  const int64_t a = p - off;  // o*s >= a
  lo = a <= 0 ? 0 : (a + s - 1) / s;
  const int64_t b = size - 1 + p - off;  // o*s <= b
  hi = b < 0 ? 0 : std::min<int64_t>(out, b / s + 1);
  hi = std::max(hi, lo);
}

template <typename T>
void dw_channels(const T* x, const T* dy, T* out, const DwGeom& g, const int64_t* xs, const int64_t* ys) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t kVec = 16;
  const int64_t taps = g.kh * g.kw, C_out = g.C * g.M;
  // blocks of 16 to 64 channels, enough of them for every thread (ConvNeXt's 40 channels: 3)
  const int64_t per_thread = (C_out + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t kBlock = std::clamp<int64_t>((per_thread + kVec - 1) / kVec * kVec, kVec, 64);
  const int64_t nblk = (C_out + kBlock - 1) / kBlock;
  at::parallel_for(0, nblk, 1, [&](int64_t bb, int64_t be) {
    std::vector<acc_t> acc(taps * kBlock);
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t c0 = blk * kBlock, nc = std::min(kBlock, C_out - c0);
      std::vector<double> total(taps * nc, 0.0);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          std::fill(acc.begin(), acc.end(), acc_t(0));  // one output row in acc_t, then into double
          const T* yrow = dy + n * ys[0] + ho * ys[2] + c0;
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t hi = ho * g.sh - g.ph + i * g.dh;
            if (hi < 0 || hi >= g.H) continue;
            const T* xrow = x + n * xs[0] + hi * xs[2];
            for (int64_t j = 0; j < g.kw; ++j) {
              int64_t lo, up;
              valid_range(g.W, g.Wo, g.sw, g.pw, j * g.dw, lo, up);
              acc_t* a = acc.data() + (i * g.kw + j) * kBlock;
              for (int64_t c = 0; c < nc; c += kVec) {
                const int64_t w = std::min(kVec, nc - c);
                acc_t r[kVec] = {};  // kVec channels over the row: stays in registers
                for (int64_t wo = lo; wo < up; ++wo) {
                  const T* yv = yrow + wo * ys[3] + c;
                  const T* xv = xrow + (wo * g.sw - g.pw + j * g.dw) * xs[3];
                  if (g.M == 1 && w == kVec) {
                    xv += c0 + c;
                    for (int64_t q = 0; q < kVec; ++q) r[q] += static_cast<acc_t>(yv[q]) * static_cast<acc_t>(xv[q]);
                  } else {
                    for (int64_t q = 0; q < w; ++q)
                      r[q] += static_cast<acc_t>(yv[q]) * static_cast<acc_t>(xv[(c0 + c + q) / g.M]);
                  }
                }
                for (int64_t q = 0; q < w; ++q) a[c + q] += r[q];
              }
            }
          }
          for (int64_t t = 0; t < taps; ++t)
            for (int64_t c = 0; c < nc; ++c) total[t * nc + c] += static_cast<double>(acc[t * kBlock + c]);
        }
      }
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t t = 0; t < taps; ++t) out[(c0 + c) * taps + t] = static_cast<T>(total[t * nc + c]);
    }
  });
}

at::Tensor depthwise_conv2d_weight_grad_cpu(const at::Tensor& x, const at::Tensor& dy, at::IntArrayRef kernel,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4, "depthwise_conv2d_weight_grad: expected 4-D x (N, C, H, W) and dy "
              "(N, C_out, H_out, W_out), got ", x.sizes(), " and ", dy.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_conv2d_weight_grad: expected kernel, stride, padding and dilation of 2 values each");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "depthwise_conv2d_weight_grad: expected x and dy of one dtype, "
              "got ", x.scalar_type(), " and ", dy.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && dy.device().is_cpu(), "depthwise_conv2d_weight_grad: expected CPU tensors");
  TORCH_CHECK(is_supported_float(x.scalar_type()), "depthwise_conv2d_weight_grad: expected float32/float64/float16/"
              "bfloat16 tensors, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), C_out = dy.size(1);
  TORCH_CHECK(dy.size(0) == N && C_out % C == 0, "depthwise_conv2d_weight_grad: expected dy of shape (", N,
              ", a multiple of ", C, ", H_out, W_out), got ", dy.sizes());
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel[d] > 0 && stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0,
                "depthwise_conv2d_weight_grad: expected positive kernel, stride and dilation and padding >= 0");
  DwGeom g{N, C, C_out / C, x.size(2), x.size(3), dy.size(2), dy.size(3), kernel[0], kernel[1], stride[0], stride[1],
           padding[0], padding[1], dilation[0], dilation[1]};
  for (int d = 0; d < 2; ++d) {
    const int64_t in = x.size(2 + d), k = kernel[d];
    const int64_t expect = (in + 2 * padding[d] - dilation[d] * (k - 1) - 1) / stride[d] + 1;
    TORCH_CHECK(dy.size(2 + d) == expect, "depthwise_conv2d_weight_grad: expected dy's spatial dim ", d, " = ",
                expect, " for this geometry, got ", dy.size(2 + d));
  }
  auto out = at::empty({C_out, 1, kernel[0], kernel[1]}, x.options());
  if (out.numel() == 0) return out;
  if (N == 0 || g.Ho == 0 || g.Wo == 0) return out.zero_();
  // The kernel walks channels innermost: x and dy channels_last (other layouts are copied once).
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor yc = dy.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t xs[4] = {xc.stride(0), xc.stride(1), xc.stride(2), xc.stride(3)};
  const int64_t ys[4] = {yc.stride(0), yc.stride(1), yc.stride(2), yc.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_weight_grad", [&] {
    dw_channels<scalar_t>(xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                          g, xs, ys);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CPU, m) { m.impl("depthwise_conv2d_weight_grad", &depthwise_conv2d_weight_grad_cpu); }

}  // namespace flora
