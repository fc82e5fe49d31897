// The CUDA selective scan's launch interface: plain pointers and sizes, no torch and no CUDA
// headers, so the torch binding (selective_scan_cuda_binding.cpp) and the kernels
// (selective_scan_cuda.cu) compile apart (the test suite compile-checks both without a GPU).
#pragma once

#include <cstdint>

namespace lethe_cuda {

constexpr int kThreads = 128;                // threads per block
constexpr int kItems = 8;                    // consecutive time steps per thread
constexpr int kChunk = kThreads * kItems;    // steps per chunk: one saved state per chunk
constexpr int kMaxGroupStates = 4096;        // bound on channel group x (d_state + 1): 32 KB of shared memory

enum class Dtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct ScanParams {
  int64_t batch = 0, channels = 0, length = 0, d_state = 0, n_chunks = 0;
  Dtype dtype = Dtype::Float32;
  bool softplus = true;
  // Inputs. u, delta, z: (batch, channels, length); B, C: (batch, d_state, length), all in
  // `dtype`. A: (channels, d_state); D, delta_bias: (channels,); initial: (batch, channels,
  // d_state), float32. z, D, delta_bias, initial may be null.
  const void *u = nullptr, *delta = nullptr, *B = nullptr, *C = nullptr, *z = nullptr;
  const float *A = nullptr, *D = nullptr, *delta_bias = nullptr, *initial = nullptr;
  // keep (batch, length), float32: 0 at a step that starts a document (its decay is 0: the state
  // before it is dropped), 1 elsewhere; null when no document starts inside the rows.
  const float* keep = nullptr;
  // Forward outputs: out in `dtype`; out_pre (y before the gate, only with z) in `dtype`;
  // last (batch, channels, d_state) and saved (batch, channels, n_chunks, d_state) float32.
  void *out = nullptr, *out_pre = nullptr;
  float *last = nullptr, *saved = nullptr;
  // Backward inputs: grad_out in `dtype`; grad_last float32 or null; saved and out_pre as above.
  const void* grad_out = nullptr;
  const float* grad_last = nullptr;
  // Backward outputs. grad_u, grad_delta, grad_z in `dtype`; per-(batch, channel) partial sums
  // dA_rows (batch, channels, d_state), dD_rows and dbias_rows (batch, channels); grad_initial
  // (batch, channels, d_state); dB_part, dC_part (batch, n_groups, d_state, length): each
  // thread block's own slice, summed afterwards in a fixed order (reduce_middle).
  int64_t channel_group = 1, n_groups = 0;
  void *grad_u = nullptr, *grad_delta = nullptr, *grad_z = nullptr;
  float *dA_rows = nullptr, *dD_rows = nullptr, *dbias_rows = nullptr, *grad_initial = nullptr;
  float *dB_part = nullptr, *dC_part = nullptr;
};

// Each returns null on success, else the CUDA error's text. `stream` is a cudaStream_t.
const char* scan_forward(const ScanParams& params, void* stream);
const char* scan_backward(const ScanParams& params, void* stream);
// out[o, i] = sum over k in order of in[o, k, i]: the deterministic reduction of partial sums.
const char* reduce_middle(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner, void* stream);
// Channels per backward thread block for this device: enough blocks to fill it, few enough
// partial sums, and group x (d_state + 1) <= kMaxGroupStates.
int64_t backward_channel_group(int64_t batch, int64_t channels, int64_t d_state);

}  // namespace lethe_cuda
