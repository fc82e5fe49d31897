// What the torch bindings of the CUDA kernels (selective_scan_cuda_binding.cpp,
// ssd_cuda_binding.cpp) share: where their tensors live, errors that name the kernel, the input
// dtype for the kernel's launch interface, and the fixed-order sum of partial sums on the
// caller's stream. Each binding's own input checks stay with it (scan_inputs.h for the scan's).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

// Built with -DLETHE_CUDA_EMULATION a binding registers its ops for CPU tensors, running the
// kernels' own source on CPU threads (cuda_emulation.h).
#ifdef LETHE_CUDA_EMULATION
#define LETHE_CUDA_DISPATCH_KEY CPU
#else
#define LETHE_CUDA_DISPATCH_KEY CUDA
#endif

namespace lethe_cuda_binding {

#ifdef LETHE_CUDA_EMULATION
constexpr bool kOnCuda = false;
#else
constexpr bool kOnCuda = true;
#endif

// A kernel's failed checks and launches, named: "<kernel>: <message>".
struct Errors {
  const char* kernel;  // e.g. "lethe ssd_scan (cuda kernel)"
  void check(bool ok, const char* message) const { TORCH_CHECK(ok, kernel, ": ", message); }
  void check_launch(const char* error) const { TORCH_CHECK(error == nullptr, kernel, " launch failed: ", error); }
};

// t's dtype as the kernel's Dtype enum (Float32, BFloat16, Float16); `inputs` names them in the error.
template <typename Dtype>
Dtype dtype_of(const at::Tensor& t, const Errors& errors, const char* inputs) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::Float32;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Float16;
    default: TORCH_CHECK(false, errors.kernel, ": ", inputs, " must be float32, bfloat16 or float16");
  }
}

inline const float* float_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

inline void* as_stream(int64_t stream) { return reinterpret_cast<void*>(stream); }

// A kernel library's reduce_middle: out[o, i] = sum over k in order of in[o, k, i].
using ReduceMiddle = const char* (*)(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner, void* stream);

// (outer, middle, inner) -> (outer, inner), summed over `middle` in order.
inline at::Tensor sum_middle(ReduceMiddle reduce, const Errors& errors, const at::Tensor& parts, int64_t outer, int64_t middle,
                             int64_t inner, int64_t stream) {
  at::Tensor out = at::empty({outer, inner}, parts.options());
  errors.check_launch(reduce(parts.data_ptr<float>(), out.data_ptr<float>(), outer, middle, inner, as_stream(stream)));
  return out;
}

}  // namespace lethe_cuda_binding
