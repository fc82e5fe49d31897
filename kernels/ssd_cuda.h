// The CUDA SSD scan's launch interface: plain pointers and sizes, no torch and no CUDA headers,
// so the torch binding (ssd_cuda_binding.cpp) and the kernels (ssd_cuda.cu) compile apart (the
// test suite compile-checks both without a GPU).
#pragma once

#include <cstdint>

namespace lethe_ssd_cuda {

constexpr int kThreads = 128;                      // threads per block
constexpr int kRowsPerThread = 4;                  // headdim rows of the state tile per thread
constexpr int kColsPerThread = 8;                  // d_state columns of the state tile per thread
constexpr int kMaxDState = 32 * kColsPerThread;    // at most 32 threads share a row: d_state <= 256
constexpr int kSegment = 256;                      // steps per saved state (the forward saves the state entering each)

enum class Dtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct SsdParams {
  int64_t batch = 0, length = 0, nheads = 0, headdim = 0, ngroups = 0, d_state = 0, n_segments = 0;
  Dtype dtype = Dtype::Float32;
  // Inputs, time-major. x (batch, length, nheads, headdim), B and C (batch, length, ngroups,
  // d_state), all in `dtype`; dt (batch, length, nheads), A (nheads,), D (nheads,) or (nheads,
  // headdim) as D_per_row says, initial (batch, nheads, headdim, d_state), float32. D and
  // initial may be null.
  const void *x = nullptr, *B = nullptr, *C = nullptr;
  const float *dt = nullptr, *A = nullptr, *D = nullptr, *initial = nullptr;
  bool D_per_row = false;
  // keep (batch, length), float32: 0 at a step that starts a document (its decay is 0: the state
  // before it is dropped), 1 elsewhere; null when no document starts inside the rows.
  const float* keep = nullptr;
  // Forward outputs: y like x, in `dtype`; last (batch, nheads, headdim, d_state) and saved
  // (batch, nheads, n_segments, headdim, d_state), float32.
  void* y = nullptr;
  float *last = nullptr, *saved = nullptr;
  // Backward inputs: grad_y like x; grad_last like last, or null; saved as above.
  const void* grad_y = nullptr;
  const float* grad_last = nullptr;
  // Backward outputs. grad_x like x, in `dtype`; grad_dt like dt; per-batch partial sums dA_rows
  // (batch, nheads) and dD_rows (batch, nheads, headdim; null without D); grad_initial like
  // initial, also without one (the adjoint waits there between segments); dB_part, dC_part (batch, n_splits, length, ngroups, d_state): each thread block's own slice
  // (its heads_per_block heads of one group), summed afterwards in a fixed order (reduce_middle).
  int64_t heads_per_block = 1, n_splits = 0;
  void* grad_x = nullptr;
  float *grad_dt = nullptr, *dA_rows = nullptr, *dD_rows = nullptr, *grad_initial = nullptr;
  float *dB_part = nullptr, *dC_part = nullptr;
};

// Each returns null on success, else the CUDA error's text. `stream` is a cudaStream_t.
const char* ssd_forward(const SsdParams& params, void* stream);
const char* ssd_backward(const SsdParams& params, void* stream);
// out[o, i] = sum over k in order of in[o, k, i]: the deterministic reduction of partial sums.
const char* reduce_middle(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner, void* stream);
// Heads per backward thread block for this device: enough blocks to fill it, and dB/dC partial
// sums of at most 4 x the size of x (at least d_state / (4 headdim) heads per block).
int64_t backward_heads_per_block(int64_t batch, int64_t nheads, int64_t ngroups, int64_t headdim, int64_t d_state);

}  // namespace lethe_ssd_cuda
