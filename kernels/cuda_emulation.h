// Runs the CUDA kernels' own source on the CPU, for testing on machines without a GPU.
//
// cuda_common.h (the CUDA kernels' first include) includes this instead of the CUDA headers when
// compiled as C++ with -DLETHE_CUDA_EMULATION (see cuda_emulation.cpp, ssd_cuda_emulation.cpp).
// Each thread block runs as real std::threads, one per CUDA thread, so __syncthreads is a real
// barrier and the block scans' warp shuffles exchange values between threads; blocks run one
// after another. Dynamic shared memory starts
// as NaN so a read before a write shows up in the results. It checks the algorithm (indexing,
// scans, carries, reductions), not timing, occupancy or the memory model of a GPU.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <limits>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // (max threads[, min blocks per SM])
#define __grid_constant__
#define __shared__ static  // one block at a time: a function-static array is that block's shared memory

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) { *value = 2; return cudaSuccess; }

namespace lethe_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  explicit Block(int threads, std::size_t shared_floats)
      : barrier(threads), exchange(threads), dynamic(shared_floats, std::numeric_limits<float>::quiet_NaN()) {}
  std::barrier<> barrier;
  std::vector<float> exchange;  // one slot per thread, for shuffles
  std::vector<float> dynamic;   // extern __shared__
};

inline thread_local Index thread_index, block_index;
inline thread_local dim3 block_dim;
inline Block* block = nullptr;

inline void sync() { block->barrier.arrive_and_wait(); }

// Every thread of the block calls shuffles in the same order (the kernels never shuffle under
// divergent control flow), so a block-wide exchange stands in for the warp's.
inline float shuffle(float value, int source_lane) {
  const unsigned me = thread_index.x;
  block->exchange[me] = value;
  sync();
  const float result = block->exchange[(me / 32) * 32 + (source_lane & 31)];
  sync();
  return result;
}

inline float* dynamic_shared() { return block->dynamic.data(); }

// kernel(): the body of one CUDA thread. Cooperative kernels (barriers, shuffles) get a thread
// each; the others run their threads in a loop.
template <typename Kernel>
void launch(dim3 grid, unsigned threads, std::size_t shared_bytes, bool cooperative, Kernel kernel) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block current(static_cast<int>(threads), shared_bytes / sizeof(float) + 1);
      block = &current;
      auto run = [&](unsigned tx) {
        thread_index = Index{tx, 0, 0};
        block_index = Index{bx, by, 0};
        block_dim = dim3(threads);
        kernel();
      };
      if (cooperative) {
        std::vector<std::thread> workers;
        for (unsigned tx = 0; tx < threads; ++tx) workers.emplace_back(run, tx);
        for (auto& worker : workers) worker.join();
      } else {
        for (unsigned tx = 0; tx < threads; ++tx) run(tx);
      }
      block = nullptr;
    }
}

}  // namespace lethe_emulation

#define threadIdx (::lethe_emulation::thread_index)
#define blockIdx (::lethe_emulation::block_index)
#define blockDim (::lethe_emulation::block_dim)
inline void __syncthreads() { ::lethe_emulation::sync(); }
inline float __shfl_sync(unsigned, float value, int source_lane) { return ::lethe_emulation::shuffle(value, source_lane); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  return ::lethe_emulation::shuffle(value, static_cast<int>(threadIdx.x % 32) ^ lane_mask);
}
