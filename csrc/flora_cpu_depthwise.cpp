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
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "flora_checks.h"  // is_supported_float

namespace flora {
namespace {

struct DwGeom {
  int64_t N, C, M, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Channels per block: a block's partial sums for one tap stay in registers (two AVX2 vectors of floats).
constexpr int64_t kVec = 16;

// acc[j * kVec + q] += sum_{wo < Wo} y[wo, q] x[wo * sw + j * dw, q] for each tap column j < kw: one output row
// of dy (y: kVec channels, consecutive wo `ystep` apart) against one input row of x (padded by pw both sides:
// every column it reads exists, `xstep` apart).
template <typename A>
void row_taps(const A* y, const A* x, A* acc, int64_t Wo, int64_t kw, int64_t sw, int64_t dw, int64_t ystep,
              int64_t xstep) {
  for (int64_t j = 0; j < kw; ++j) {
    A r[kVec] = {};
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const A* yv = y + wo * ystep;
      const A* xv = x + (wo * sw + j * dw) * xstep;
      for (int64_t q = 0; q < kVec; ++q) r[q] += yv[q] * xv[q];
    }
    for (int64_t q = 0; q < kVec; ++q) acc[j * kVec + q] += r[q];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// row_taps for float with AVX2 + FMA (the file is built for baseline x86-64; this function is compiled for
// AVX2 and called only where the CPU has it)
__attribute__((target("avx2,fma"))) void row_taps_avx2(const float* y, const float* x, float* acc, int64_t Wo,
                                                        int64_t kw, int64_t sw, int64_t dw, int64_t ystep,
                                                        int64_t xstep) {
  for (int64_t j = 0; j < kw; ++j) {
    __m256 r0 = _mm256_setzero_ps(), r1 = _mm256_setzero_ps();
    const float* xj = x + j * dw * xstep;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const float* yv = y + wo * ystep;
      const float* xv = xj + wo * sw * xstep;
      r0 = _mm256_fmadd_ps(_mm256_loadu_ps(yv), _mm256_loadu_ps(xv), r0);
      r1 = _mm256_fmadd_ps(_mm256_loadu_ps(yv + 8), _mm256_loadu_ps(xv + 8), r1);
    }
    _mm256_storeu_ps(acc + j * kVec, _mm256_add_ps(_mm256_loadu_ps(acc + j * kVec), r0));
    _mm256_storeu_ps(acc + j * kVec + 8, _mm256_add_ps(_mm256_loadu_ps(acc + j * kVec + 8), r1));
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// xp (N, H, W + 2 pw, Cp), yp (N, Ho, Wo, Cp): x and dy channels innermost in the op math type A, x
// widened to C_out channels (channel co reads x's co / M), W padded with zeros, channels with zeros up to
// Cp (a multiple of kVec): every block of kVec channels takes the same unmasked loop. out: (C_out, taps).
template <typename A, typename T>
void dw_blocks(const A* xp, const A* yp, T* out, const DwGeom& g, int64_t Cp) {
  const int64_t taps = g.kh * g.kw, C_out = g.C * g.M, Wp = g.W + 2 * g.pw;
  auto row = &row_taps<A>;  // AVX2 + FMA for float where the CPU has it
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<A, float>) {
    if (has_avx2()) row = &row_taps_avx2;
  }
#endif
  at::parallel_for(0, Cp / kVec, 1, [&](int64_t bb, int64_t be) {
    std::vector<A> acc(taps * kVec);
    std::vector<double> total(taps * kVec);
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t c0 = blk * kVec, nc = std::min(kVec, C_out - c0);
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          std::fill(acc.begin(), acc.end(), A(0));  // one output row in A, then into double
          const A* y = yp + ((n * g.Ho + ho) * g.Wo) * Cp + c0;
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t hi = ho * g.sh - g.ph + i * g.dh;
            if (hi < 0 || hi >= g.H) continue;
            const A* x = xp + ((n * g.H + hi) * Wp) * Cp + c0;
            row(y, x, acc.data() + i * g.kw * kVec, g.Wo, g.kw, g.sw, g.dw, Cp, Cp);
          }
          for (int64_t e = 0; e < taps * kVec; ++e) total[e] += static_cast<double>(acc[e]);
        }
      }
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t t = 0; t < taps; ++t) out[(c0 + c) * taps + t] = static_cast<T>(total[t * kVec + c]);
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
  // The kernel walks channels innermost over zero-padded copies in the op math type (one pass over x and dy)
  const int64_t Cp = (C_out + kVec - 1) / kVec * kVec;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xw = g.M == 1 ? x : x.repeat_interleave(g.M, 1);
  at::Tensor xp = at::zeros({N, g.H, g.W + 2 * g.pw, Cp}, x.options().dtype(acc_type));
  xp.narrow(2, g.pw, g.W).narrow(3, 0, C_out).copy_(xw.permute({0, 2, 3, 1}));
  at::Tensor yp = at::zeros({N, g.Ho, g.Wo, Cp}, x.options().dtype(acc_type));
  yp.narrow(3, 0, C_out).copy_(dy.permute({0, 2, 3, 1}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dw_blocks<acc_t, scalar_t>(xp.const_data_ptr<acc_t>(), yp.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
                               g, Cp);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, CPU, m) { m.impl("depthwise_conv2d_weight_grad", &depthwise_conv2d_weight_grad_cpu); }

}  // namespace flora
