// What the CUDA kernels of selective_scan_cuda.cu and ssd_cuda.cu share: the CUDA headers (or,
// compiled as C++ with -DLETHE_CUDA_EMULATION, their emulation on CPU threads: cuda_emulation.h),
// launches, the conversions of the input dtypes to and from float, the dispatch on the dtype, and
// reduce_middle, the fixed-order sum of per-block partial sums that keeps gradients bit-identical.
//
// Each .cu file includes it first, before its own namespace. Everything here has internal linkage
// (an unnamed namespace): the two kernels are separate libraries loaded into one process, and
// each defines its own public entry points (scan_forward, ssd_forward, reduce_middle, ...) on top.
#pragma once

#ifdef LETHE_CUDA_EMULATION
#include "cuda_emulation.h"
#define LETHE_DYNAMIC_SHARED(name) float* name = ::lethe_emulation::dynamic_shared()
#define LETHE_LAUNCH(kernel, grid, threads, shared, stream, cooperative, ...) \
  ::lethe_emulation::launch(grid, threads, shared, cooperative, [&] { kernel(__VA_ARGS__); })
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LETHE_DYNAMIC_SHARED(name) extern __shared__ float name[]
#define LETHE_LAUNCH(kernel, grid, threads, shared, stream, cooperative, ...) \
  kernel<<<grid, threads, shared, stream>>>(__VA_ARGS__)
#endif

#include <cstdint>

namespace lethe_cuda_common {
namespace {

// Loads and stores in the input dtype, math in float32. The emulation runs float32 only.
__device__ __forceinline__ float to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
#ifndef LETHE_CUDA_EMULATION
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
#endif

// Null after a good launch, else the CUDA error's text.
inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// The element type T, as a value: what dispatch hands its launcher.
template <typename T>
struct As {
  using type = T;
};

// launch(As<T>{}) for the element type T that `dtype` (a kernel's own Dtype enum: Float32,
// BFloat16, Float16) names; the launcher's result, or "unsupported dtype".
template <typename Dtype, typename Launch>
const char* dispatch(Dtype dtype, Launch&& launch) {
  switch (dtype) {
    case Dtype::Float32: return launch(As<float>{});
#ifndef LETHE_CUDA_EMULATION
    case Dtype::BFloat16: return launch(As<__nv_bfloat16>{});
    case Dtype::Float16: return launch(As<__half>{});
#endif
    default: break;
  }
  return "unsupported dtype";
}

__global__ void reduce_middle_kernel(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= outer * inner) return;
  const int64_t o = index / inner, i = index % inner;
  float sum = 0.0f;
  for (int64_t k = 0; k < middle; ++k) sum += in[(o * middle + k) * inner + i];
  out[index] = sum;
}

// out[o, i] = sum over k in order of in[o, k, i]; null on success, else the CUDA error's text.
inline const char* reduce_middle(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner, void* stream) {
  const int64_t total = outer * inner;
  if (total == 0) return nullptr;
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((total + threads - 1) / threads));
  LETHE_LAUNCH(reduce_middle_kernel, grid, threads, 0, static_cast<cudaStream_t>(stream), false, in, out, outer, middle, inner);
  return launch_error();
}

}  // namespace
}  // namespace lethe_cuda_common
