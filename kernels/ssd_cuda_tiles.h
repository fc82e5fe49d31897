// The pieces of ssd_cuda.cu's kernels that move data: how a head's state is cut into tiles and
// spread over a block's threads, a chunk of inputs staged in shared memory, tiles between global
// memory and registers, and the sums of the threads' shares. Included by ssd_cuda.cu only, after
// cuda_common.h and ssd_cuda.h.
#pragma once

#include <cstdint>

namespace lethe_ssd_cuda {
namespace {

constexpr int kRows = kRowsPerThread, kCols = kColsPerThread;

using lethe_cuda_common::from_float;
using lethe_cuda_common::to_float;

__host__ __device__ constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ constexpr int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// How one head's (headdim, d_state) state is cut into tiles of rows and spread over a block.
struct Layout {
  int col_lanes, row_lanes;  // threads across d_state (consecutive threads) and across rows
  int rows, cols;            // the tile padded to whole lanes: kRows * row_lanes, kCols * col_lanes
  int tile, n_tiles;         // real rows per tile (the last tile may have fewer) and tiles per head
};

__host__ __device__ constexpr Layout make_layout(int64_t headdim, int64_t d_state) {
  // Enough column lanes to cover d_state, more where headdim is too small to give every row lane
  // a row, at least kRows (a tile has at most kThreads rows: the backward sums dD a thread per row).
  const int64_t cover = pow2_at_least((d_state + kCols - 1) / kCols);
  const int64_t fill = kThreads / pow2_at_least((headdim + kRows - 1) / kRows);
  Layout l{};
  l.col_lanes = static_cast<int>(imin(32, imax(kRows, imax(cover, fill))));
  l.row_lanes = kThreads / l.col_lanes;
  l.rows = kRows * l.row_lanes;
  l.cols = kCols * l.col_lanes;
  l.tile = static_cast<int>(imin(headdim, l.rows));
  l.n_tiles = static_cast<int>((headdim + l.tile - 1) / l.tile);
  return l;
}

// One chunk of Steps steps of one (batch, head, tile), staged in shared memory, zero-padded past
// the end, the tile's rows and d_state (the state's padding stays 0 and adds nothing).
template <int Steps>
struct Stage {
  float *decay, *dt, *keep;  // (Steps,): a_t (1 past the end: the state stays), dt_t, keep_t
  float *x, *grad_y;         // (Steps, rows); grad_y only in the backward
  float *B, *C;              // (Steps, cols)
};

template <int Steps>
__host__ __device__ constexpr int64_t stage_floats(const Layout& l, bool backward) {
  return Steps * (3 + (backward ? 2 : 1) * l.rows + 2 * l.cols);
}

template <int Steps>
__device__ inline Stage<Steps> carve_stage(float* shared, const Layout& l, bool backward) {
  Stage<Steps> s;
  s.decay = shared, s.dt = s.decay + Steps, s.keep = s.dt + Steps, s.x = s.keep + Steps;
  s.grad_y = backward ? s.x + Steps * l.rows : nullptr;
  s.B = s.x + (backward ? 2 : 1) * Steps * l.rows;
  s.C = s.B + Steps * l.cols;
  return s;
}

template <typename T, int Steps>
__device__ void stage_chunk(const SsdParams& p, const Layout& l, int64_t b, int64_t h, int64_t p0, int64_t t0,
                            const Stage<Steps>& s) {
  const int64_t L = p.length, H = p.nheads, P = p.headdim, N = p.d_state, G = p.ngroups;
  const int64_t g = h / (H / G), rows = imin(l.tile, P - p0);
  for (int i = threadIdx.x; i < Steps; i += kThreads) {
    const int64_t t = t0 + i;
    const bool valid = t < L;
    s.dt[i] = valid ? p.dt[(b * L + t) * H + h] : 0.0f;
    s.keep[i] = valid && p.keep ? p.keep[b * L + t] : 1.0f;
    s.decay[i] = valid ? expf(s.dt[i] * p.A[h]) * s.keep[i] : 1.0f;
  }
  const T* x = static_cast<const T*>(p.x);
  const T* grad_y = static_cast<const T*>(p.grad_y);
  for (int j = threadIdx.x; j < Steps * l.rows; j += kThreads) {
    const int64_t t = t0 + j / l.rows;
    const int r = j % l.rows;
    const bool valid = t < L && r < rows;
    const int64_t at = ((b * L + t) * H + h) * P + p0 + r;
    s.x[j] = valid ? to_float(x[at]) : 0.0f;
    if (s.grad_y) s.grad_y[j] = valid ? to_float(grad_y[at]) : 0.0f;
  }
  const T* B = static_cast<const T*>(p.B);
  const T* C = static_cast<const T*>(p.C);
  for (int j = threadIdx.x; j < Steps * l.cols; j += kThreads) {
    const int64_t t = t0 + j / l.cols;
    const int n = j % l.cols;
    const bool valid = t < L && n < N;
    const int64_t at = ((b * L + t) * G + g) * N + n;
    s.B[j] = valid ? to_float(B[at]) : 0.0f;
    s.C[j] = valid ? to_float(C[at]) : 0.0f;
  }
}

// This thread's part of a tile: rows row_lane + row_lanes * i, columns col_lane + col_lanes * k.
struct Part {
  int col_lane, row_lane;
  __device__ explicit Part(const Layout& l) : col_lane(threadIdx.x % l.col_lanes), row_lane(threadIdx.x / l.col_lanes) {}
};

// This thread's columns of B_t (and of C_t, where C_i is not null) at step `i` of a stage, into
// registers. B and C side by side: loaded one after the other, ptxas allocates registers otherwise
// than for the budgets ssd_cuda.cu states.
template <int Steps>
__device__ __forceinline__ void load_columns(const Stage<Steps>& s, const Layout& l, const Part& me, int i, float* B_i,
                                             float* C_i = nullptr) {
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
    const int at = i * l.cols + me.col_lane + l.col_lanes * k;
    B_i[k] = s.B[at];
    if (C_i) C_i[k] = s.C[at];
  }
}

using Tile = float[kRows][kCols];

// Tiles move between global memory, where a state is (headdim, d_state), and registers through a
// shared `buffer` of kTileSlots floats, thread-major: element [i][k] of thread j's part at
// (i * kCols + k) * kThreads + j. Global memory is read and written in order, and each thread's
// part sits at fixed offsets: per-element offsets and bounds checks, the same for every segment,
// would otherwise stay in registers and double the kernels' register use. Each call starts with a
// barrier (the buffer may still be read) and leaves the buffer to be read by no one after it.
constexpr int kTileSlots = kRows * kCols * kThreads;

__device__ inline int slot(const Layout& l, int r, int n) {  // where tile element (r, n) sits in the buffer
  return ((r / l.row_lanes) * kCols + n / l.col_lanes) * kThreads + (r % l.row_lanes) * l.col_lanes + n % l.col_lanes;
}

// This thread's part of the tile at `tile` (its first `rows` rows; null: zeros), zeros as padding.
__device__ inline void load_tile(const float* tile, const Layout& l, int N, int rows, float* buffer, Tile& v) {
  if (tile) {
    __syncthreads();
    for (int j = threadIdx.x; j < kTileSlots; j += kThreads) {
      const int r = j / l.cols, n = j % l.cols;
      buffer[slot(l, r, n)] = r < rows && n < N ? tile[r * N + n] : 0.0f;
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int k = 0; k < kCols; ++k) v[i][k] = tile ? buffer[(i * kCols + k) * kThreads + threadIdx.x] : 0.0f;
}

__device__ inline void tile_to_buffer(const Tile& v, float* buffer) {
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int k = 0; k < kCols; ++k) buffer[(i * kCols + k) * kThreads + threadIdx.x] = v[i][k];
  __syncthreads();
}

__device__ inline void store_tile(float* tile, const Layout& l, int N, int rows, float* buffer, const Tile& v) {
  tile_to_buffer(v, buffer);
  for (int j = threadIdx.x; j < rows * N; j += kThreads) tile[j] = buffer[slot(l, j / N, j % N)];
}

// This thread's share of the sum over the tile of v times the tile at `tile`.
__device__ inline float dot_tile(const float* tile, const Layout& l, int N, int rows, float* buffer, const Tile& v) {
  tile_to_buffer(v, buffer);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < rows * N; j += kThreads) sum += tile[j] * buffer[slot(l, j / N, j % N)];
  return sum;
}

// Shares of per-row sums: (steps, kRows, kThreads), thread-major so that a step's writes are
// consecutive; the sum over the column lanes of tile row `row` at `step`, in lane order.
__device__ inline float sum_row_shares(const float* shares, const Layout& l, int step, int row) {
  const float* in = shares + (step * kRows + row / l.row_lanes) * kThreads + (row % l.row_lanes) * l.col_lanes;
  float sum = 0.0f;
  for (int c = 0; c < l.col_lanes; ++c) sum += in[c];
  return sum;
}

// Shares of per-column sums: (steps, kCols, kThreads); the sum over the row lanes of column `col`.
__device__ inline float sum_col_shares(const float* shares, const Layout& l, int step, int col) {
  const float* in = shares + (step * kCols + col / l.col_lanes) * kThreads + col % l.col_lanes;
  float sum = 0.0f;
  for (int r = 0; r < l.row_lanes; ++r) sum += in[r * l.col_lanes];
  return sum;
}

}  // namespace
}  // namespace lethe_ssd_cuda
