// Fused selective scan for CUDA: the same op as the CPU kernel (selective_scan_cpu.cpp).
//
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      y_t = <C_t, h_t> + D * u_t
//   out_t = y_t * silu(z_t),   delta_t = softplus(delta_raw_t + delta_bias)
//
// Forward: one thread block per (batch, channel). The sequence is walked in chunks of kChunk
// steps; each of the kThreads threads owns kItems consecutive steps of a chunk. For every
// state n, each thread folds its steps into one affine map h -> a h + b, a block-wide scan of
// those maps (warp shuffles, then one value per warp) gives every thread the state entering
// its steps, and the running state carried across chunks sits in shared memory. Softplus, the
// discretization, the C contraction, the D skip and the gate are fused; the state never goes
// to global memory except once per chunk (saved for backward) and at the end.
//
// Backward: one thread block per (batch, group of channels), chunks in reverse. A chunk's
// states are recomputed from its saved entering state (the forward scan again), then the
// adjoint runs backwards through it with a reverse block scan:
//   lambda_t = dL/dh_t = g_t + mu_{t+1},   mu_t = a_t lambda_t,   g_t = dy_t C_t
// dA, dD, d(delta_bias) are reduced inside the block in a fixed order and written per
// (batch, channel); dB and dC (summed over channels) are accumulated by each block in its own
// slice of a partial-sum buffer, then reduce_middle adds the slices in order. No atomics:
// gradients are bit-identical run to run.
//
// Compiled as C++ with -DLETHE_CUDA_EMULATION (cuda_emulation.cpp), the same source runs on CPU
// threads for the float32 path: how the test suite checks this algorithm without a GPU.
#include "cuda_common.h"  // first: the CUDA headers or their emulation

#include <algorithm>
#include <cstdint>

#include "selective_scan_cuda.h"

namespace lethe_cuda {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

using lethe_cuda_common::As;
using lethe_cuda_common::from_float;
using lethe_cuda_common::to_float;

__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The affine map h -> a h + b. combine(first, second) applies `first`, then `second`.
struct Affine {
  float a, b;
};
__device__ __forceinline__ Affine combine(Affine first, Affine second) {
  return {first.a * second.a, second.a * first.b + second.b};
}

// Exclusive scan of one Affine per thread across the block: returns the composition of the
// maps of every thread before this one (after it, with kReverse), the identity for the first;
// `total` receives the composition of all of them. Uses `scratch` (kWarps entries); two
// barriers, so consecutive calls may reuse it.
template <bool kReverse>
__device__ Affine block_exclusive_scan(Affine value, Affine* scratch, Affine& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int position = kReverse ? 31 - lane : lane;  // order of application within the warp
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int source = kReverse ? lane + offset : lane - offset;
    const Affine earlier = {__shfl_sync(kFullMask, value.a, source & 31), __shfl_sync(kFullMask, value.b, source & 31)};
    if (position >= offset) value = combine(earlier, value);
  }
  const int previous = (kReverse ? lane + 1 : lane - 1) & 31;
  Affine exclusive = {__shfl_sync(kFullMask, value.a, previous), __shfl_sync(kFullMask, value.b, previous)};
  if (position == 0) exclusive = {1.0f, 0.0f};
  const int warp_position = kReverse ? kWarps - 1 - warp : warp;
  if (position == 31) scratch[warp_position] = value;  // the warp's inclusive total
  __syncthreads();
  Affine before = {1.0f, 0.0f}, all = {1.0f, 0.0f};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp_position) before = combine(before, scratch[w]);
    all = combine(all, scratch[w]);
  }
  __syncthreads();
  total = all;
  return combine(before, exclusive);
}

// Sum of one float per thread, the same in every thread; fixed order, two barriers.
__device__ float block_sum(float value, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += scratch[w];
  __syncthreads();
  return sum;
}

// One thread's kItems steps of one (batch, channel) row, in float32.
struct Steps {
  float u[kItems], delta_raw[kItems], delta[kItems];
  float keep[kItems];  // 0 where a document starts (p.keep), else 1
  bool valid[kItems];
};

template <typename T>
__device__ __forceinline__ void load_steps(const ScanParams& p, int64_t row, int64_t channel, int64_t first, Steps& s) {
  const T* u = static_cast<const T*>(p.u) + row * p.length;
  const T* delta = static_cast<const T*>(p.delta) + row * p.length;
  const float bias = p.delta_bias ? p.delta_bias[channel] : 0.0f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = first + i;
    s.valid[i] = t < p.length;
    s.u[i] = s.valid[i] ? to_float(u[t]) : 0.0f;
    s.delta_raw[i] = s.valid[i] ? to_float(delta[t]) + bias : 0.0f;
    s.delta[i] = !s.valid[i] ? 0.0f : (p.softplus ? softplus(s.delta_raw[i]) : s.delta_raw[i]);
    s.keep[i] = s.valid[i] && p.keep ? p.keep[(row / p.channels) * p.length + t] : 1.0f;
  }
}

// Decays and inputs of one state n over a thread's steps: a = exp(delta A_n), x = delta B_n u;
// a = 0 where a document starts (the state before it is dropped, and the adjoint stops there:
// the forward, the recompute and the backward all read these maps). Steps past the end are the
// identity map (a = 1, x = 0).
template <typename T>
__device__ __forceinline__ void load_maps(const ScanParams& p, const T* B_n, float A_n, int64_t first, const Steps& s, float* a,
                          float* x, float* B_values) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    B_values[i] = s.valid[i] ? to_float(B_n[first + i]) : 0.0f;
    a[i] = s.valid[i] ? exp2f(s.delta[i] * A_n * kLog2e) * s.keep[i] : 1.0f;
    x[i] = s.delta[i] * s.u[i] * B_values[i];
  }
}

// The state entering this thread's steps, from the state entering the chunk: fold the thread's
// maps into one, scan those across the block. `total` receives the whole chunk's map.
__device__ __forceinline__ float state_entering_thread(const float* a, const float* x, float chunk_entering,
                                                       Affine* scratch, Affine& total) {
  Affine mine = {a[0], x[0]};
#pragma unroll
  for (int i = 1; i < kItems; ++i) mine = combine(mine, Affine{a[i], x[i]});
  const Affine before = block_exclusive_scan<false>(mine, scratch, total);
  return before.a * chunk_entering + before.b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ ScanParams p) {
  LETHE_DYNAMIC_SHARED(running);  // (d_state,): the state carried across chunks
  __shared__ Affine scratch[kWarps];
  const int64_t channel = blockIdx.x, b = blockIdx.y, row = b * p.channels + channel;
  const int64_t N = p.d_state, L = p.length;
  const T* B = static_cast<const T*>(p.B) + b * N * L;
  const T* C = static_cast<const T*>(p.C) + b * N * L;
  const float* A = p.A + channel * N;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) running[n] = p.initial ? p.initial[row * N + n] : 0.0f;
  __syncthreads();

  for (int64_t chunk = 0; chunk < p.n_chunks; ++chunk) {
    __syncthreads();  // thread 0's last update of `running` in the previous chunk is visible
    const int64_t first = chunk * kChunk + threadIdx.x * kItems;
    Steps s;
    load_steps<T>(p, row, channel, first, s);
    for (int64_t n = threadIdx.x; n < N; n += kThreads) p.saved[(row * p.n_chunks + chunk) * N + n] = running[n];
    float y[kItems] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float entering = running[n];  // read before the scan's barriers; thread 0 updates it after
      float a[kItems], x[kItems], B_values[kItems];
      load_maps<T>(p, B + n * L, A[n], first, s, a, x, B_values);
      Affine total;
      float h = state_entering_thread(a, x, entering, scratch, total);
      const T* C_n = C + n * L;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = a[i] * h + x[i];
        if (s.valid[i]) y[i] += to_float(C_n[first + i]) * h;
      }
      if (threadIdx.x == 0) running[n] = total.a * entering + total.b;
    }
    const float skip = p.D ? p.D[channel] : 0.0f;
    T* out = static_cast<T*>(p.out) + row * L;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!s.valid[i]) continue;
      const int64_t t = first + i;
      float value = y[i] + skip * s.u[i];
      if (p.z) {
        static_cast<T*>(p.out_pre)[row * L + t] = from_float<T>(value);
        const float gate = to_float(static_cast<const T*>(p.z)[row * L + t]);
        value *= gate * sigmoid(gate);
      }
      out[t] = from_float<T>(value);
    }
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += kThreads) p.last[row * N + n] = running[n];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const __grid_constant__ ScanParams p) {
  // Per channel of the group: the adjoint carry mu per state (entering each chunk from the
  // right), dA per state, and dD, d(delta_bias).
  LETHE_DYNAMIC_SHARED(shared);
  __shared__ Affine scratch[kWarps];
  __shared__ float sum_scratch[kWarps];
  const int64_t N = p.d_state, L = p.length, G = p.channel_group;
  float* carry = shared;             // (G, N)
  float* dA = carry + G * N;         // (G, N)
  float* dD = dA + G * N;            // (G,)
  float* dbias = dD + G;             // (G,)
  const int64_t group = blockIdx.x, b = blockIdx.y;
  const int64_t first_channel = group * G, channels = min(G, p.channels - first_channel);
  for (int64_t i = threadIdx.x; i < channels * N; i += kThreads) {
    const int64_t row = b * p.channels + first_channel + i / N;
    carry[i] = p.grad_last ? p.grad_last[row * N + i % N] : 0.0f;
    dA[i] = 0.0f;
  }
  for (int64_t i = threadIdx.x; i < channels; i += kThreads) dD[i] = dbias[i] = 0.0f;
  __syncthreads();

  const T* B = static_cast<const T*>(p.B) + b * N * L;
  const T* C = static_cast<const T*>(p.C) + b * N * L;
  float* dB_slice = p.dB_part + (b * p.n_groups + group) * N * L;
  float* dC_slice = p.dC_part + (b * p.n_groups + group) * N * L;

  for (int64_t chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const int64_t first = chunk * kChunk + threadIdx.x * kItems;
    for (int64_t k = 0; k < channels; ++k) {
      const int64_t channel = first_channel + k, row = b * p.channels + channel;
      Steps s;
      load_steps<T>(p, row, channel, first, s);
      const float skip = p.D ? p.D[channel] : 0.0f;
      // grad of y before the gate; the gate's own gradient from the y saved by the forward
      float grad_y[kItems], grad_dt[kItems] = {}, lambda_B[kItems] = {};
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = first + i;
        grad_y[i] = s.valid[i] ? to_float(static_cast<const T*>(p.grad_out)[row * L + t]) : 0.0f;
        if (p.z && s.valid[i]) {
          const float gate = to_float(static_cast<const T*>(p.z)[row * L + t]), sig = sigmoid(gate);
          const float y_pre = to_float(static_cast<const T*>(p.out_pre)[row * L + t]);
          static_cast<T*>(p.grad_z)[row * L + t] = from_float<T>(grad_y[i] * y_pre * sig * (1.0f + gate * (1.0f - sig)));
          grad_y[i] *= gate * sig;
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        const float A_n = p.A[channel * N + n];
        const float entering = p.saved[(row * p.n_chunks + chunk) * N + n];
        const float mu_after = carry[k * N + n];  // read before the barriers; thread 0 updates it after
        float a[kItems], x[kItems], B_values[kItems], h_prev[kItems], g[kItems];
        load_maps<T>(p, B + n * L, A_n, first, s, a, x, B_values);
        // recompute the states: h_prev[i] is the state before step i
        Affine total;
        float h = state_entering_thread(a, x, entering, scratch, total);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          h_prev[i] = h;
          h = a[i] * h + x[i];
        }
        // the adjoint, last step first: mu_t = a_t mu_{t+1} + a_t g_t
        const T* C_n = C + n * L;
#pragma unroll
        for (int i = 0; i < kItems; ++i) g[i] = s.valid[i] ? grad_y[i] * to_float(C_n[first + i]) : 0.0f;
        Affine mine_reverse = {a[kItems - 1], a[kItems - 1] * g[kItems - 1]};
#pragma unroll
        for (int i = kItems - 2; i >= 0; --i) mine_reverse = combine(mine_reverse, Affine{a[i], a[i] * g[i]});
        const Affine after = block_exclusive_scan<true>(mine_reverse, scratch, total);
        float mu = after.a * mu_after + after.b;
        float dA_mine = 0.0f;
        float* dB_n = dB_slice + n * L;
        float* dC_n = dC_slice + n * L;
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const float lambda = g[i] + mu;
          mu = a[i] * lambda;
          const float grad_log_a = mu * h_prev[i];  // dL/d(delta_t A_n)
          dA_mine += grad_log_a * s.delta[i];
          grad_dt[i] += grad_log_a * A_n;
          lambda_B[i] += lambda * B_values[i];
          if (s.valid[i]) {
            const int64_t t = first + i;
            const float dB_new = lambda * s.delta[i] * s.u[i], dC_new = grad_y[i] * (a[i] * h_prev[i] + x[i]);
            dB_n[t] = k == 0 ? dB_new : dB_n[t] + dB_new;
            dC_n[t] = k == 0 ? dC_new : dC_n[t] + dC_new;
          }
        }
        const float dA_chunk = block_sum(dA_mine, sum_scratch);
        if (threadIdx.x == 0) {
          carry[k * N + n] = total.a * mu_after + total.b;
          dA[k * N + n] += dA_chunk;
        }
      }
      float dD_mine = 0.0f, dbias_mine = 0.0f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (!s.valid[i]) continue;
        const int64_t t = first + i;
        const float grad_delta = grad_dt[i] + lambda_B[i] * s.u[i];
        const float grad_raw = p.softplus ? grad_delta * sigmoid(s.delta_raw[i]) : grad_delta;
        static_cast<T*>(p.grad_u)[row * L + t] = from_float<T>(lambda_B[i] * s.delta[i] + grad_y[i] * skip);
        static_cast<T*>(p.grad_delta)[row * L + t] = from_float<T>(grad_raw);
        dD_mine += grad_y[i] * s.u[i];
        dbias_mine += grad_raw;
      }
      const float dD_chunk = block_sum(dD_mine, sum_scratch), dbias_chunk = block_sum(dbias_mine, sum_scratch);
      if (threadIdx.x == 0) {
        dD[k] += dD_chunk;
        dbias[k] += dbias_chunk;
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < channels * N; i += kThreads) {
    const int64_t row = b * p.channels + first_channel + i / N;
    p.dA_rows[row * N + i % N] = dA[i];
    p.grad_initial[row * N + i % N] = carry[i];  // mu before the first step: dL/dh_{-1}
  }
  for (int64_t i = threadIdx.x; i < channels; i += kThreads) {
    const int64_t row = b * p.channels + first_channel + i;
    p.dD_rows[row] = dD[i];
    p.dbias_rows[row] = dbias[i];
  }
}

template <typename T>
const char* launch(As<T>, const ScanParams& p, cudaStream_t stream, bool forward) {
  if (forward) {
    const size_t shared = p.d_state * sizeof(float);
    LETHE_LAUNCH(forward_kernel<T>, dim3(p.channels, p.batch), kThreads, shared, stream, true, p);
  } else {
    const size_t shared = (2 * p.channel_group * p.d_state + 2 * p.channel_group) * sizeof(float);
    LETHE_LAUNCH(backward_kernel<T>, dim3(p.n_groups, p.batch), kThreads, shared, stream, true, p);
  }
  return lethe_cuda_common::launch_error();
}

const char* dispatch(const ScanParams& p, void* stream, bool forward) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return lethe_cuda_common::dispatch(p.dtype, [&](auto as) { return launch(as, p, s, forward); });
}

}  // namespace

const char* scan_forward(const ScanParams& params, void* stream) { return dispatch(params, stream, true); }
const char* scan_backward(const ScanParams& params, void* stream) { return dispatch(params, stream, false); }

const char* reduce_middle(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner, void* stream) {
  return lethe_cuda_common::reduce_middle(in, out, outer, middle, inner, stream);
}

int64_t backward_channel_group(int64_t batch, int64_t channels, int64_t d_state) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Aim at ~4 blocks per SM, with at least d_state / 4 channels per block so the dB/dC partial
  // sums stay within 4 x batch x channels x length floats each.
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  int64_t group = std::max<int64_t>({1, (batch * channels) / target_blocks, (d_state + 3) / 4});
  group = std::min<int64_t>(group, std::max<int64_t>(1, kMaxGroupStates / (d_state + 1)));
  return std::min<int64_t>(group, channels);
}

}  // namespace lethe_cuda
