// Host emulation of the CUDA execution model (threads per block as std::threads, __syncthreads as a
// std::barrier, __shfl_down_sync through a per-warp buffer), to run csrc/flora_cuda.cu on a CPU in
// tests when no GPU is available (tests/test_ext_cuda_emu.py). Not part of the built extension.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
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
inline int n_threads = 0;
alignas(16) inline unsigned char dyn_smem[48 * 1024];
template <class F>
void launch(dim3 g, dim3 b, size_t smem, F&& f) {
  if (smem > sizeof(dyn_smem)) throw 1;
  bDim = b; gDim = g;
  const int nt = b.x * b.y * b.z;
  n_threads = nt;
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
template <class T>
T __shfl_down_sync(unsigned, T v, int off) {
  static T buf[1024];
  const int t = threadIdx.x, lane = t & 31, w = t >> 5;
  buf[t] = v;
  emu::warp_barriers[w]->arrive_and_wait();
  const T r = (lane + off < 32 && t + off < emu::n_threads) ? buf[t + off] : v;
  emu::warp_barriers[w]->arrive_and_wait();
  return r;
}
