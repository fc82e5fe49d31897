// Fused SSD scan (Mamba-2) for CUDA: the recurrence of ssd_reference.py, per head h,
//
//   H_t = a_t H_{t-1} + dt_t x_t B_t^T   (headdim x d_state),  a_t = exp(dt_t A_h) (0 where a document starts)
//   y_t = H_t C_t + D x_t
//
// It is Mamba-1's recurrence (selective_scan_cuda.cu) with a channel per (head, row p), one decay
// for a whole head and B, C shared by a group of heads; so here the state, not time, is spread
// over the threads. Forward: one thread block per (batch, head, tile of rows); the tile's state
// lives in registers, each thread holding kRowsPerThread rows x kColsPerThread columns of it (a
// column lane fastest: consecutive threads read consecutive B and C entries). The sequence is
// walked in chunks: a chunk's decays, x, B and C are staged in shared memory, every thread runs
// its part of the state through the chunk's steps and writes its share of each y_t[p] (a sum over
// its columns); the shares are added across the column lanes once per chunk. The state goes to
// global memory only at every kSegment-th step (saved for backward) and at the end.
//
// Backward: one thread block per (batch, a few heads of one group); per (head, tile), segments in
// reverse. Each segment is walked twice, from its saved entering state: forward to recompute H_t
// (dC_t = H_t^T dy_t), then backward with the adjoint, in registers like the state,
//   lambda_t = dy_t C_t^T + mu_{t+1},   mu_t = a_t lambda_t   (mu after the last step: grad_last)
// (dx_t = dt_t lambda_t B_t, dB_t = lambda_t^T x_t dt_t, grad_initial = mu_0). The decay's
// gradient r_t = dL/d(dt_t A) = a_t <lambda_t, H_{t-1}> needs H and lambda at the same step; it
// comes instead from a scalar recurrence over the per-step sums both walks make:
//   r_t = keep_t (dy_t . H_t C_t + r_{t+1} - dt_t x_t . lambda_t B_t),   r after the end = <grad_last, H_last>
// (from a_t H_{t-1} = H_t - dt_t x_t B_t^T, and <lambda_t, H_t> = dy_t . H_t C_t + r_{t+1}; keep_t
// makes r exactly 0 at a document start, where the sum is 0 only up to rounding), started at
// each segment's end from <mu, H> there, so rounding does not build up over a long document; and
// nothing of size length x headdim x d_state is kept. dB, dC are summed over the heads of a group:
// each block writes its own slice of a partial-sum buffer, reduce_middle adds the slices in order;
// dA, dD are written per batch row and reduced the same way. No atomics: gradients are
// bit-identical run to run.
//
// Compiled as C++ with -DLETHE_CUDA_EMULATION (ssd_cuda_emulation.cpp), the same source runs on
// CPU threads for the float32 path: how the test suite checks this algorithm without a GPU.
#include "cuda_common.h"  // first: the CUDA headers or their emulation

#include <algorithm>
#include <cstdint>

#include "ssd_cuda.h"
#include "ssd_cuda_tiles.h"

namespace lethe_ssd_cuda {
namespace {

using lethe_cuda_common::As;

constexpr int kForwardSteps = 8;   // steps per staged chunk
constexpr int kBackwardSteps = 4;  // fewer: the backward keeps two sets of shares per step (fits 48 KB)
// Register budgets (ptxas' own choice spilled more): forward <= 128 registers, backward <= 168,
// without spills on sm_90 (sm_80: 20 bytes in the 16-bit backward); shared memory allows as many blocks.
constexpr int kForwardBlocksPerSM = 4, kBackwardBlocksPerSM = 3;
static_assert(kSegment % kForwardSteps == 0 && kSegment % kBackwardSteps == 0, "a segment is whole chunks");
static_assert(kForwardSteps * kRows >= kRows * kCols && kBackwardSteps * kCols >= kRows * kCols,
              "the shares buffers (forward: of y, backward: of dB and dC) also carry tiles");

__device__ inline float skip_weight(const SsdParams& p, int64_t h, int64_t row) {
  return p.D ? p.D[p.D_per_row ? h * p.headdim + row : h] : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM) forward_kernel(const __grid_constant__ SsdParams p) {
  constexpr int S = kForwardSteps;
  LETHE_DYNAMIC_SHARED(shared);
  const Layout l = make_layout(p.headdim, p.d_state);
  const Stage<S> s = carve_stage<S>(shared, l, false);
  float* y_shares = s.C + S * l.cols;  // (S, kRows, kThreads)
  const int64_t L = p.length, H = p.nheads, P = p.headdim;
  const int N = static_cast<int>(p.d_state);
  const int64_t h = blockIdx.x / l.n_tiles, b = blockIdx.y, p0 = (blockIdx.x % l.n_tiles) * l.tile;
  const int rows = static_cast<int>(imin(l.tile, P - p0));
  const int64_t tile = ((b * H + h) * P + p0) * N;  // the tile's first element in (batch, nheads, headdim, d_state)
  const int64_t segment_stride = P * N;              // saved: (batch, nheads, n_segments, headdim, d_state)
  float* saved = p.saved + ((b * H + h) * p.n_segments * P + p0) * N;
  const Part me(l);
  Tile state;
  load_tile(p.initial ? p.initial + tile : nullptr, l, N, rows, y_shares, state);

  for (int64_t t0 = 0; t0 < L; t0 += S) {
    if (t0 % kSegment == 0) store_tile(saved + t0 / kSegment * segment_stride, l, N, rows, y_shares, state);
    __syncthreads();  // the previous chunk's stage and shares are read
    stage_chunk<T, S>(p, l, b, h, p0, t0, s);
    __syncthreads();
#pragma unroll 1  // a step at a time: unrolled, the steps' operands stay live together
    for (int i = 0; i < S; ++i) {
      const float decay = s.decay[i];
      float B_i[kCols], C_i[kCols];
      load_columns(s, l, me, i, B_i, C_i);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float xdt = s.dt[i] * s.x[i * l.rows + me.row_lane + l.row_lanes * r];
        float y = 0.0f;
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          state[r][k] = decay * state[r][k] + xdt * B_i[k];
          y += state[r][k] * C_i[k];
        }
        y_shares[(i * kRows + r) * kThreads + threadIdx.x] = y;
      }
    }
    __syncthreads();
    T* out = static_cast<T*>(p.y);
    for (int j = threadIdx.x; j < S * rows; j += kThreads) {
      const int i = j / rows, r = j % rows;
      const int64_t t = t0 + i;
      if (t >= L) continue;
      const float y = sum_row_shares(y_shares, l, i, r) + s.x[i * l.rows + r] * skip_weight(p, h, p0 + r);
      out[((b * L + t) * H + h) * P + p0 + r] = from_float<T>(y);
    }
  }
  store_tile(p.last + tile, l, N, rows, y_shares, state);
}

// The backward's shared memory: a stage, the shares of per-row and per-column sums, and per-step sums.
struct BackwardShared {
  Stage<kBackwardSteps> s;
  float *row_shares, *col_shares;  // (steps, kRows, kThreads), (steps, kCols, kThreads)
  float* step_shares;              // (steps, kThreads): each thread's share of a per-step scalar
  float* dot_y;                    // (kSegment,): dy_t . H_t C_t over the tile, from the recompute
  float* dot_x;                    // (steps,): x_t . lambda_t B_t over the tile
};

__host__ __device__ constexpr int64_t backward_floats(const Layout& l) {
  return stage_floats<kBackwardSteps>(l, true) + kBackwardSteps * (kRows + kCols + 2) * kThreads + kSegment;
}

__host__ __device__ constexpr int64_t forward_floats(const Layout& l) {
  return stage_floats<kForwardSteps>(l, false) + kForwardSteps * kRows * kThreads;
}

// Within the 48 KB a block gets without opting in, at both ends of the layouts: most rows
// (d_state 1, column lanes kRows) and most columns (d_state 256, 32 column lanes).
constexpr bool fits_default_shared(const Layout& l) {
  return sizeof(float) * imax(forward_floats(l), backward_floats(l)) <= 48 * 1024;
}
static_assert(fits_default_shared(make_layout(kThreads, 1)) && fits_default_shared(make_layout(1, kMaxDState)),
              "shared memory over 48 KB");

__device__ inline BackwardShared carve_backward(float* shared, const Layout& l) {
  BackwardShared sh;
  sh.s = carve_stage<kBackwardSteps>(shared, l, true);
  sh.row_shares = sh.s.C + kBackwardSteps * l.cols;
  sh.col_shares = sh.row_shares + kBackwardSteps * kRows * kThreads;
  sh.step_shares = sh.col_shares + kBackwardSteps * kCols * kThreads;
  sh.dot_y = sh.step_shares + kBackwardSteps * kThreads;
  sh.dot_x = sh.dot_y + kSegment;
  return sh;
}

// Sums of the per-step shares, by the first threads (after a barrier: every share is written).
__device__ inline void sum_step_shares(const BackwardShared& sh, float* out) {
  __syncthreads();
  if (threadIdx.x < kBackwardSteps) {
    float sum = 0.0f;
    for (int j = 0; j < kThreads; ++j) sum += sh.step_shares[threadIdx.x * kThreads + j];
    out[threadIdx.x] = sum;
  }
}

// One (batch, head, tile) of a backward block. `first`: the block's first unit writes its slices
// of the dB/dC partial sums, and `first_tile`, tile 0 of a head, its grad_dt; the others add.
struct Unit {
  int64_t b, h, p0;
  int rows;
  bool first, first_tile;
  float *dB, *dC;  // the block's slices: (t, n) at t * ngroups * d_state + n
};

__device__ inline void accumulate(float* at, float value, bool first) { *at = first ? value : *at + value; }

template <typename T>
__device__ void recompute_segment(const SsdParams& p, const Layout& l, const Unit& u, int64_t seg_t0, int64_t seg_end,
                                  const BackwardShared& sh, Tile& state) {
  constexpr int S = kBackwardSteps;
  const Stage<S>& s = sh.s;
  const int64_t L = p.length, GN = p.ngroups * p.d_state;
  const int N = static_cast<int>(p.d_state);
  const Part me(l);
  for (int64_t t0 = seg_t0; t0 < seg_end; t0 += S) {
    __syncthreads();  // the previous chunk's stage and shares are read
    stage_chunk<T, S>(p, l, u.b, u.h, u.p0, t0, s);
    for (int i = 0; i < S; ++i) sh.step_shares[i * kThreads + threadIdx.x] = 0.0f;
    __syncthreads();
#pragma unroll 1
    for (int i = 0; i < S; ++i) {
      const float decay = s.decay[i];
      float B_i[kCols], dC[kCols] = {};
      load_columns(s, l, me, i, B_i);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = me.row_lane + l.row_lanes * r;
        const float xdt = s.dt[i] * s.x[i * l.rows + row], gy = s.grad_y[i * l.rows + row];
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          state[r][k] = decay * state[r][k] + xdt * B_i[k];
          dC[k] += gy * state[r][k];
        }
      }
#pragma unroll
      for (int k = 0; k < kCols; ++k) sh.col_shares[(i * kCols + k) * kThreads + threadIdx.x] = dC[k];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < S * N; j += kThreads) {
      const int i = j / N, n = j % N;
      const int64_t t = t0 + i;
      if (t >= L) continue;
      const float dC = sum_col_shares(sh.col_shares, l, i, n);
      accumulate(u.dC + t * GN + n, dC, u.first);
      sh.step_shares[i * kThreads + threadIdx.x] += s.C[i * l.cols + n] * dC;
    }
    sum_step_shares(sh, sh.dot_y + (t0 - seg_t0));
  }
}

// The adjoint through one segment, last chunk first. `mu` enters as mu after the segment and
// leaves as mu at its first step. Thread 0 runs the recurrence of r_t (`grad_log_a`, entering as
// r after the segment) and sums dA; thread `row` sums dD for that row.
template <typename T>
__device__ void adjoint_segment(const SsdParams& p, const Layout& l, const Unit& u, int64_t seg_t0, int64_t seg_end,
                                const BackwardShared& sh, Tile& mu, float& dD, float& grad_log_a, float& dA) {
  constexpr int S = kBackwardSteps;
  const Stage<S>& s = sh.s;
  const int64_t L = p.length, H = p.nheads, P = p.headdim, GN = p.ngroups * p.d_state;
  const int N = static_cast<int>(p.d_state);
  const Part me(l);
  for (int64_t t0 = seg_t0 + (seg_end - 1 - seg_t0) / S * S; t0 >= seg_t0; t0 -= S) {
    __syncthreads();  // the previous chunk's stage, shares and sums are read
    stage_chunk<T, S>(p, l, u.b, u.h, u.p0, t0, s);
    for (int i = 0; i < S; ++i) sh.step_shares[i * kThreads + threadIdx.x] = 0.0f;
    __syncthreads();
    if (threadIdx.x < l.rows)
      for (int i = 0; i < S; ++i) dD += s.grad_y[i * l.rows + threadIdx.x] * s.x[i * l.rows + threadIdx.x];
#pragma unroll 1
    for (int i = S - 1; i >= 0; --i) {
      const float decay = s.decay[i];
      float B_i[kCols], C_i[kCols], dB[kCols] = {};
      load_columns(s, l, me, i, B_i, C_i);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = me.row_lane + l.row_lanes * r;
        const float xdt = s.dt[i] * s.x[i * l.rows + row], gy = s.grad_y[i * l.rows + row];
        float lambda_B = 0.0f;
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          const float lambda = gy * C_i[k] + mu[r][k];
          lambda_B += lambda * B_i[k];
          dB[k] += xdt * lambda;
          mu[r][k] = decay * lambda;
        }
        sh.row_shares[(i * kRows + r) * kThreads + threadIdx.x] = lambda_B;
      }
#pragma unroll
      for (int k = 0; k < kCols; ++k) sh.col_shares[(i * kCols + k) * kThreads + threadIdx.x] = dB[k];
    }
    __syncthreads();
    T* grad_x = static_cast<T*>(p.grad_x);
    for (int j = threadIdx.x; j < S * u.rows; j += kThreads) {
      const int i = j / u.rows, row = j % u.rows;
      const int64_t t = t0 + i;
      if (t >= L) continue;
      const float lambda_B = sum_row_shares(sh.row_shares, l, i, row), gy = s.grad_y[i * l.rows + row];
      grad_x[((u.b * L + t) * H + u.h) * P + u.p0 + row] = from_float<T>(s.dt[i] * lambda_B + gy * skip_weight(p, u.h, u.p0 + row));
      sh.step_shares[i * kThreads + threadIdx.x] += s.x[i * l.rows + row] * lambda_B;
    }
    for (int j = threadIdx.x; j < S * N; j += kThreads) {
      const int i = j / N, n = j % N;
      const int64_t t = t0 + i;
      if (t < L) accumulate(u.dB + t * GN + n, sum_col_shares(sh.col_shares, l, i, n), u.first);
    }
    sum_step_shares(sh, sh.dot_x);
    __syncthreads();
    if (threadIdx.x == 0)
      for (int i = S - 1; i >= 0; --i) {
        const int64_t t = t0 + i;
        if (t >= L) continue;
        grad_log_a = s.keep[i] * (sh.dot_y[t - seg_t0] + grad_log_a - s.dt[i] * sh.dot_x[i]);
        accumulate(p.grad_dt + (u.b * L + t) * H + u.h, sh.dot_x[i] + grad_log_a * p.A[u.h], u.first_tile);
        dA += grad_log_a * s.dt[i];
      }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM) backward_kernel(const __grid_constant__ SsdParams p) {
  LETHE_DYNAMIC_SHARED(shared);
  const Layout l = make_layout(p.headdim, p.d_state);
  const BackwardShared sh = carve_backward(shared, l);
  const int64_t L = p.length, H = p.nheads, P = p.headdim, per_group = H / p.ngroups;
  const int N = static_cast<int>(p.d_state);
  const int64_t split = blockIdx.x % p.n_splits, g = blockIdx.x / p.n_splits, b = blockIdx.y;
  const int64_t first_head = g * per_group + split * p.heads_per_block;
  const int64_t heads = imin(p.heads_per_block, (g + 1) * per_group - first_head);
  const int64_t slice = ((b * p.n_splits + split) * L * p.ngroups + g) * N;
  for (int64_t j = 0; j < heads; ++j) {
    const int64_t h = first_head + j;
    float dA = 0.0f;
    for (int64_t tile_index = 0; tile_index < l.n_tiles; ++tile_index) {
      const int64_t p0 = tile_index * l.tile, tile = ((b * H + h) * P + p0) * N;
      const Unit u{b, h, p0, static_cast<int>(imin(l.tile, P - p0)), j == 0 && tile_index == 0, tile_index == 0,
                   p.dB_part + slice, p.dC_part + slice};
      const float* saved = p.saved + ((b * H + h) * p.n_segments * P + p0) * N;
      // The adjoint waits in grad_initial while a segment is recomputed (one tile in registers at
      // a time, not two), and is left there as mu_0 = dL/dH_{-1}.
      float* parked = p.grad_initial + tile;
      float dD = 0.0f;
      for (int64_t seg = p.n_segments - 1; seg >= 0; --seg) {
        const int64_t seg_t0 = seg * kSegment, seg_end = imin(L, seg_t0 + kSegment);
        Tile regs;  // this thread's part of the state, then of the adjoint
        load_tile(saved + seg * P * N, l, N, u.rows, sh.col_shares, regs);
        recompute_segment<T>(p, l, u, seg_t0, seg_end, sh, regs);
        // r after the segment, exactly: <mu, H> there (mu from the next segment, or grad_last).
        // Anchored every segment, the recurrence's rounding does not build up over a document.
        const float* mu_after = seg < p.n_segments - 1 ? parked : p.grad_last ? p.grad_last + tile : nullptr;
        float grad_log_a = 0.0f;
        if (mu_after) {
          sh.step_shares[threadIdx.x] = dot_tile(mu_after, l, N, u.rows, sh.col_shares, regs);  // after its barriers
          __syncthreads();
          if (threadIdx.x == 0)
            for (int t = 0; t < kThreads; ++t) grad_log_a += sh.step_shares[t];
        }
        load_tile(mu_after, l, N, u.rows, sh.col_shares, regs);
        adjoint_segment<T>(p, l, u, seg_t0, seg_end, sh, regs, dD, grad_log_a, dA);
        store_tile(parked, l, N, u.rows, sh.col_shares, regs);
      }
      if (p.dD_rows && threadIdx.x < u.rows) p.dD_rows[(b * H + h) * P + p0 + threadIdx.x] = dD;
    }
    if (threadIdx.x == 0) p.dA_rows[b * H + h] = dA;
  }
}

template <typename T>
const char* launch(As<T>, const SsdParams& p, cudaStream_t stream, bool forward) {
  const Layout l = make_layout(p.headdim, p.d_state);
  const size_t bytes = sizeof(float) * (forward ? forward_floats(l) : backward_floats(l));
  if (forward) {
    const dim3 grid(static_cast<unsigned>(l.n_tiles * p.nheads), static_cast<unsigned>(p.batch));
    LETHE_LAUNCH(forward_kernel<T>, grid, kThreads, bytes, stream, true, p);
  } else {
    const dim3 grid(static_cast<unsigned>(p.n_splits * p.ngroups), static_cast<unsigned>(p.batch));
    LETHE_LAUNCH(backward_kernel<T>, grid, kThreads, bytes, stream, true, p);
  }
  return lethe_cuda_common::launch_error();
}

const char* dispatch(const SsdParams& p, void* stream, bool forward) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return lethe_cuda_common::dispatch(p.dtype, [&](auto as) { return launch(as, p, s, forward); });
}

}  // namespace

const char* ssd_forward(const SsdParams& params, void* stream) { return dispatch(params, stream, true); }
const char* ssd_backward(const SsdParams& params, void* stream) { return dispatch(params, stream, false); }

const char* reduce_middle(const float* in, float* out, int64_t outer, int64_t middle, int64_t inner, void* stream) {
  return lethe_cuda_common::reduce_middle(in, out, outer, middle, inner, stream);
}

int64_t backward_heads_per_block(int64_t batch, int64_t nheads, int64_t ngroups, int64_t headdim, int64_t d_state) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // No more blocks than ~4 per SM, and each slice of dB/dC (length x d_state per group) shared by
  // at least d_state / (4 headdim) heads, so the partial sums stay within 4 x the size of x.
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  const int64_t heads = std::max<int64_t>({1, batch * nheads / target_blocks, (d_state + 4 * headdim - 1) / (4 * headdim)});
  return std::min<int64_t>(heads, nheads / ngroups);
}

}  // namespace lethe_ssd_cuda
