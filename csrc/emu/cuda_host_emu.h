// Host emulation of the CUDA execution model (threads per block as std::threads, __syncthreads as a
// std::barrier, warp-level operations through a per-warp buffer and barrier), to run
// csrc/flora_cuda.cu on a CPU in tests when no GPU is available (tests/test_ext_cuda_emu.py). Not
// part of the built extension.
//
// mma.sync m16n8k16 (row.col, f32 accumulate) is emulated from its PTX fragment layout: every lane
// publishes its A (4 x 32-bit) and B (2 x 32-bit) registers, then computes its four C elements
// from the whole warp's fragments. A kernel that puts an element in the wrong register or lane
// thus gets a wrong product here, as it would on the GPU.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define cudaGetLastError() cudaSuccess
namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
alignas(16) inline unsigned char dyn_smem[48 * 1024];
template <class F>
void launch(dim3 g, dim3 b, size_t smem, F&& f) {
  if (smem > sizeof(dyn_smem)) throw 1;
  bDim = b; gDim = g;
  const int nt = b.x * b.y * b.z;
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        std::barrier<> bar(nt);
        block_barrier = &bar;
        warp_barriers.clear();
        for (int w = 0; w * 32 < nt; ++w) warp_barriers.emplace_back(new std::barrier<>(std::min(32, nt - w * 32)));
        std::vector<std::thread> ths;
        for (int t = 0; t < nt; ++t)
          ths.emplace_back([&, t, bx, by, bz] {
            tIdx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
            bIdx = dim3(bx, by, bz);
            f();
          });
        for (auto& th : ths) th.join();
      }
}
}  // namespace emu
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
namespace emu {
inline float half_bits_to_float(uint16_t h, __nv_bfloat16*) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_bits_to_float(uint16_t h, __half*) {
  __half v;
  std::memcpy(&v, &h, 2);
  return __half2float(v);
}
// c += A (16 x 16, row) B (16 x 8, col) for the warp of the calling thread (all 32 lanes call it).
template <class T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static uint32_t abuf[1024][4], bbuf[1024][2];
  const int t = threadIdx.x, w = t >> 5, lane = t & 31, base = w * 32;
  for (int i = 0; i < 4; ++i) abuf[t][i] = a[i];
  for (int i = 0; i < 2; ++i) bbuf[t][i] = b[i];
  warp_barriers[w]->arrive_and_wait();
  auto half_of = [](uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu); };
  auto A = [&](int row, int k) {  // a0..a7: (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
    const uint32_t reg = abuf[base + (row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
    return half_bits_to_float(half_of(reg, k & 1), static_cast<T*>(nullptr));
  };
  auto B = [&](int k, int col) {  // b0..b3: (2t.., g), (2t+8.., g)
    const uint32_t reg = bbuf[base + col * 4 + (k % 8) / 2][k >= 8];
    return half_bits_to_float(half_of(reg, k & 1), static_cast<T*>(nullptr));
  };
  const int gq = lane >> 2, tq = lane & 3;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = gq + (i >> 1) * 8, col = 2 * tq + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  warp_barriers[w]->arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}
}  // namespace emu
