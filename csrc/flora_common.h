// Shared by the CPU (.cpp) and CUDA (.cu) sources: no torch headers here.
//
// Dropout masks are counter based: element `idx` of the (contiguous) dropped tensor is kept
// iff the top 24 bits of splitmix64(seed, idx) are >= ceil(p * 2^24). The same mask is thus
// regenerated in backward from (seed, p) instead of being stored, and it is identical on CPU
// and CUDA.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FLORA_HD __host__ __device__ __forceinline__
#else
#define FLORA_HD inline
#endif

namespace flora {

// An activation (N, groups * C, *spatial) as (n, g, c, p), p the flattened spatial index: element
// (n, g, c, p) lives at n * sn + g * sg + c * sc + p * sp. Contiguous (NCHW) and channels_last
// tensors both have this form, so neither is copied. Dropout masks index the *logical*
// contiguous element ((n * groups + g) * C + c) * P + p, whatever the strides. Shared by the CPU
// kernels and the CUDA launchers (the same view of the same tensor on both devices).
struct Act {
  int64_t n, groups, c, p;
  int64_t sn, sg, sc, sp;
};

struct DropParams {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep iff hash24 >= threshold; 0 = no dropout
  double inv_keep = 1.0;   // 1 / (1 - p)
  bool active = false;
};

inline DropParams make_drop(double p, int64_t seed) {
  DropParams d;
  if (p > 0.0) {
    d.active = true;
    d.seed = static_cast<uint64_t>(seed);
    d.threshold = static_cast<uint32_t>(std::ceil(p * 16777216.0));
    d.inv_keep = 1.0 / (1.0 - p);
  }
  return d;
}

FLORA_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Whether element idx is kept (always, when inactive).
FLORA_HD bool drop_keep(const DropParams& d, int64_t idx) {
  if (!d.active) return true;
  const uint64_t h = splitmix64(d.seed ^ splitmix64(static_cast<uint64_t>(idx)));
  return static_cast<uint32_t>(h >> 40) >= d.threshold;
}

// The multiplier of element idx: 0 (dropped) or 1 / (1 - p) (kept); 1 when inactive.
template <typename acc_t>
FLORA_HD acc_t drop_scale(const DropParams& d, int64_t idx) {
  if (!d.active) return acc_t(1);
  return drop_keep(d, idx) ? static_cast<acc_t>(d.inv_keep) : acc_t(0);
}

}  // namespace flora
