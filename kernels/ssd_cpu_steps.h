// The SSD CPU kernel's inner loops (kernels/ssd_cpu.cpp) over one chunk of one (batch, head):
// the chunk's per-step scalars, and the forward, the backward's recompute and the adjoint, one
// tile of the (headdim x d_state) state at a time. The state's rows p are independent
// recurrences that share a step's decay, B_t and C_t; a tile is kRows rows x kVecs vectors of
// d_state (lanes along n), held in registers through the chunk, so B_t and C_t are loaded once
// per step for all its rows.
//
// The state is carried scaled: within a segment of steps that starts with the carried state times
// m (the decays since the last segment, then a_start), G_t = H_t / alpha_t with alpha_t the decays
// since the segment's first step, so a step is one FMA per element, G_t = G_{t-1} + (dt_t x_t /
// alpha_t) B_t, instead of a multiply and an FMA. The adjoint likewise carries Lambda_t = alpha_t
// lambda_t: Lambda_t = Lambda_{t+1} + (alpha_t dy_t) C_t. A segment ends at every chunk start,
// document start, and before alpha would leave [2^-32, 2^32], so the scaled values stay far from
// float32's range limits and round like the unscaled ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_row_io.h"
#include "cpu_scan_steps.h"
#include "cpu_vector_math.h"

namespace lethe_cpu {

constexpr float kMinScale = 0x1p-32f, kMaxScale = 0x1p32f;  // alpha's range within a segment
// Every kAnchorSteps-th step of a chunk, the backward takes dL/d(dt_t A) = sum mu_t H_{t-1} exactly
// (ssd_cpu.cpp: backward_head); the steps between come from a scalar recurrence.
constexpr int64_t kAnchorSteps = 8;

// A Vec store to a multiple of kLanes floats in a cache-line-aligned buffer. Vec itself is aligned
// like a float, and with -mtune=znver1 GCC splits each such 256-bit store in two, one of them an
// extra shuffle on the FP pipes the adjoint is bound by (-4% of the backward).
typedef float AlignedVec __attribute__((vector_size(kLanes * sizeof(float))));
LETHE_INLINE void store_aligned(float* p, Vec v) { *reinterpret_cast<AlignedVec*>(p) = v; }

// Everything one call needs, in float32 where the kernel reads it per element.
struct SsdProblem {
  int64_t batch, length, nheads, headdim, ngroups, d_state, lanes, chunk, n_chunks;  // lanes: d_state padded
  const float* A;        // (nheads,)
  const float* B;        // (batch, length, ngroups, lanes), zeros in the padding
  const float* C;        // (batch, length, ngroups, lanes)
  const float* D;        // (nheads, headdim) or null
  const float* dt;       // (batch, length, nheads), already prepared (softplus, bias, clamp)
  const float* initial;  // (batch, nheads, headdim, d_state) or null
  const float* keep;     // (batch, length): 0 where a document starts, else 1; or null
  int64_t group(int64_t h) const { return h / (nheads / ngroups); }
};

// A chunk's per-step scalars and x, for one head. The [p][t] buffers (here and in the forward and
// backward buffers) hold a row of `chunk` floats per head channel p: vectors along t for the
// elementwise passes, one scalar per step for the tiles.
struct ChunkBuffers {
  Floats dt, a, alpha, m, dt_scaled, xT, u;  // a: exp(dt A) keep; dt_scaled: dt / alpha; u: [p][t] x dt / alpha
  std::vector<int64_t> starts;              // the segments' first steps, then the chunk's length
  explicit ChunkBuffers(const SsdProblem& p)
      : dt(p.chunk), a(p.chunk), alpha(p.chunk), m(p.chunk), dt_scaled(p.chunk), xT(p.headdim * p.chunk),
        u(p.headdim * p.chunk), starts(p.chunk + 1) {}
};

// What the tiles read of one chunk.
struct ChunkView {
  const float *B, *C;  // at the chunk's first step, n = 0; one step on is `stride` floats on
  int64_t stride, chunk, steps, n_segments;
  const float *alpha, *m, *u;
  const int64_t* starts;
};

struct SsdForwardBuffers {
  ChunkBuffers chunk;
  Floats yT, state;  // yT: [p][t] <G_t, C_t>, then y; state: the head's, headdim x lanes
  explicit SsdForwardBuffers(const SsdProblem& p) : chunk(p), yT(p.headdim * p.chunk), state(p.headdim * p.lanes) {}
};

struct SsdBackwardBuffers {
  ChunkBuffers chunk;
  Floats dyT, wT, ysT, ddtxT, q, x_S, anchors, enter, mu, hbuf;  // wT: [p][t] alpha dy; hbuf: one tile's states
  explicit SsdBackwardBuffers(const SsdProblem& p)
      : chunk(p), dyT(p.headdim * p.chunk), wT(p.headdim * p.chunk), ysT(p.headdim * p.chunk),
        ddtxT(p.headdim * p.chunk), q(p.chunk), x_S(p.chunk), anchors(p.chunk / kAnchorSteps + 1),
        enter(p.headdim * p.lanes), mu(p.headdim * p.lanes), hbuf(p.chunk * 2 * 4 * kLanes) {}
};

// (steps x headdim) rows of one head of a (batch, length, nheads, headdim) tensor, from step
// `start`, to float32 [p][t], through register transposes.
template <typename T>
void load_transposed(const SsdProblem& p, const T* in, int64_t b, int64_t h, int64_t start, int64_t steps, float* out) {
  transpose_copy(in + ((b * p.length + start) * p.nheads + h) * p.headdim, p.nheads * p.headdim, steps, p.headdim, out,
                 p.chunk);
}

// The inverse: [p][t] float32 to the head's rows of a (batch, length, nheads, headdim) T tensor.
template <typename T>
void store_transposed(const SsdProblem& p, const float* in, int64_t b, int64_t h, int64_t start, int64_t steps, T* out) {
  transpose_copy(in, p.chunk, p.headdim, steps, out + ((b * p.length + start) * p.nheads + h) * p.headdim,
                 p.nheads * p.headdim);
}

// A chunk's scalars: dt, the decays exp(dt A) times keep (0 at a document start: the state before
// it is dropped, and in the adjoint the gradient stops there), the segments, and u = x dt / alpha.
template <typename T>
ChunkView load_chunk(const SsdProblem& p, const T* x, int64_t b, int64_t h, int64_t start, int64_t steps,
                     ChunkBuffers& buf) {
  float *const dt = buf.dt.data(), *const a = buf.a.data();
  for (int64_t t = 0; t < steps; ++t) dt[t] = p.dt[(b * p.length + start + t) * p.nheads + h];
  const float A = p.A[h];
  const float* keep = p.keep ? p.keep + b * p.length + start : nullptr;
  for_each_step(steps, [&](int64_t t, auto tag) {
    auto decay = exp_approx(load_as(dt + t, tag) * A);
    if (keep) decay = decay * load_as(keep + t, tag);
    store_as(a + t, decay);
  });
  int64_t n_segments = 0;
  float alpha = 1.0f;  // the chunk enters with the true state
  for (int64_t t = 0; t < steps; ++t) {
    const float carried = alpha * a[t];
    const bool starts = t == 0 || !(carried >= kMinScale && carried <= kMaxScale);  // NaN too: it propagates via m
    if (starts) buf.starts[n_segments++] = t;
    buf.m[t] = starts ? carried : 1.0f;
    alpha = starts ? 1.0f : carried;
    buf.alpha[t] = alpha;
    buf.dt_scaled[t] = dt[t] / alpha;
  }
  buf.starts[n_segments] = steps;
  load_transposed(p, x, b, h, start, steps, buf.xT.data());
  for (int64_t row = 0; row < p.headdim; ++row) {
    float* __restrict__ out = buf.u.data() + row * p.chunk;
    const float* __restrict__ in = buf.xT.data() + row * p.chunk;
    for_each_step(steps, [&](int64_t t, auto tag) { store_as(out + t, load_as(in + t, tag) * load_as(buf.dt_scaled.data() + t, tag)); });
  }
  const int64_t offset = ((b * p.length + start) * p.ngroups + p.group(h)) * p.lanes;
  return {p.B + offset, p.C + offset, p.ngroups * p.lanes, p.chunk, steps, n_segments, buf.alpha.data(), buf.m.data(),
          buf.u.data(), buf.starts.data()};
}

// Calls fn(rows, vecs, p0, n0) for the tiles of a head's state, kRows (2, the last 1) rows by
// kVecs vectors (for_state_blocks): d_state blocks outer, so one block of the chunk's B and C
// stays in L1 while every row pair walks through it.
template <typename Fn>
void for_each_tile(int64_t headdim, int64_t lanes, Fn&& fn) {
  for_state_blocks(lanes, [&](auto vecs, int64_t n0) {
    int64_t p0 = 0;
    for (; p0 + 2 <= headdim; p0 += 2) fn(std::integral_constant<int, 2>{}, vecs, p0, n0);
    if (p0 < headdim) fn(std::integral_constant<int, 1>{}, vecs, p0, n0);
  });
}

// out[r * stride + t] += the lane sum of sums[r][t], for t < steps. With 8 lanes a tree of folds
// gives 8 steps' totals in one vector, adding within 128-bit halves first and across them once
// (a cross-half shuffle costs several in-half ones where 256-bit vectors run as two halves, as on
// Zen 1); other widths take add_all_lane_sums.
template <int kRows>
LETHE_INLINE void add_row_sums(const Vec (&sums)[kRows][kMaxChunk], int64_t steps, float* out, int64_t stride) {
#if defined(__AVX512F__)
  for (int r = 0; r < kRows; ++r) add_all_lane_sums(sums[r], steps, out + r * stride);
#else
  // [x0+x1, x2+x3, y0+y1, y2+y3 | the same of lanes 4..7]
  const auto pairs = [](Vec x, Vec y) {
    return detail::shuffle<0, 2, 8, 10, 4, 6, 12, 14>(x, y) + detail::shuffle<1, 3, 9, 11, 5, 7, 13, 15>(x, y);
  };
  const auto halves = [](Vec x, Vec y) {
    return detail::shuffle<0, 1, 2, 3, 8, 9, 10, 11>(x, y) + detail::shuffle<4, 5, 6, 7, 12, 13, 14, 15>(x, y);
  };
  for (int r = 0; r < kRows; ++r) {
    const Vec* v = sums[r];
    float* const y = out + r * stride;
    int64_t t = 0;
    for (; t + 8 <= steps; t += 8) {
      const Vec low = pairs(pairs(v[t], v[t + 1]), pairs(v[t + 2], v[t + 3]));
      const Vec high = pairs(pairs(v[t + 4], v[t + 5]), pairs(v[t + 6], v[t + 7]));
      store(y + t, load(y + t) + halves(low, high));
    }
    for (; t < steps; ++t) y[t] += lane_sum(v[t]);
  }
#endif
}

// The chunk's steps in order for one tile: the state update (G = m G + u B at a segment's first
// step, G += u B after), then after_step(t).
template <int kRows, int kVecs, typename Fn>
LETHE_INLINE void walk_chunk(Vec (&h)[kRows][kVecs], const ChunkView& c, int64_t p0, int64_t n0, Fn&& after_step) {
  const float* __restrict__ u = c.u + p0 * c.chunk;
  const auto step = [&](int64_t t, auto first) {
    const float* __restrict__ B = c.B + t * c.stride + n0;
    for (int v = 0; v < kVecs; ++v) {
      const Vec B_t = load(B + v * kLanes);
      for (int r = 0; r < kRows; ++r) {
        if constexpr (decltype(first)::value) h[r][v] = c.m[t] * h[r][v] + u[r * c.chunk + t] * B_t;
        else h[r][v] += u[r * c.chunk + t] * B_t;
      }
    }
    after_step(t);
  };
  for (int64_t s = 0; s < c.n_segments; ++s) {
    step(c.starts[s], std::true_type{});
    for (int64_t t = c.starts[s] + 1; t < c.starts[s + 1]; ++t) step(t, std::false_type{});
  }
}

// The forward through a chunk for one tile: rows [p0, p0 + kRows), states [n0, n0 + kVecs
// kLanes), from and back to `state` (the head's, headdim x lanes, unscaled). Each row's <G_t, C_t>
// over the tile is added to yT[p][t] (the other d_state blocks add theirs; the caller scales by alpha).
template <int kRows, int kVecs>
void forward_tile(const ChunkView& c, int64_t lanes, int64_t p0, int64_t n0, float* __restrict__ state,
                  float* __restrict__ yT) {
  Vec h[kRows][kVecs];
  alignas(64) Vec sums[kRows][kMaxChunk];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) h[r][v] = load(state + (p0 + r) * lanes + n0 + v * kLanes);
  walk_chunk(h, c, p0, n0, [&](int64_t t) {
    const float* __restrict__ C = c.C + t * c.stride + n0;
    Vec sum[kRows];  // started from a product, not from 0: 0 + a b is no FMA (signed zeros) and costs a copy
    for (int v = 0; v < kVecs; ++v)
      for (int r = 0; r < kRows; ++r) sum[r] = v == 0 ? load(C) * h[r][0] : sum[r] + load(C + v * kLanes) * h[r][v];
    for (int r = 0; r < kRows; ++r) sums[r][t] = sum[r];
  });
  add_row_sums(sums, c.steps, yT + p0 * c.chunk, c.chunk);
  const float alpha = c.alpha[c.steps - 1];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) store(state + (p0 + r) * lanes + n0 + v * kLanes, alpha * h[r][v]);
}

// The backward through a chunk for one tile, last step first: the tile's scaled states G_t are
// recomputed from the chunk's entering state into hbuf, then the scaled adjoint runs, from and back
// to the head's mu (headdim x lanes; mu = a_t lambda_t = dL/dH_{t-1}, unscaled between chunks):
//   Lambda_t = Lambda_{t+1} + w_t[p] C_t,  w = alpha dy   (times m at a segment's first step, going back)
//   ddtx_t[p] alpha_t = <Lambda_t[p], B_t>    dB_t += Lambda_t[p] u_t[p]    dC_t += w_t[p] G_t[p]
// dB/dC rows of the unit's partial sums are assigned (kFirst: the unit's first head, first rows)
// or added; alpha ddtx goes to ddtxT (added) for the caller, and at every kAnchorSteps-th step
// sum Lambda_t G_{t-1} (G_{-1}: the entering state) to anchors (added; gla_t is that times m_t).
template <int kRows, int kVecs, bool kFirst>
void backward_tile(const ChunkView& c, int64_t lanes, int64_t p0, int64_t n0, const float* __restrict__ enter,
                   const float* __restrict__ wT, float* __restrict__ mu_state, float* __restrict__ hbuf,
                   float* __restrict__ dB_part, float* __restrict__ dC_part, float* __restrict__ ddtxT,
                   float* __restrict__ anchors) {
  constexpr int64_t kTile = kRows * kVecs * kLanes;
  Vec h[kRows][kVecs];
  alignas(64) Vec sums[kRows][kMaxChunk], anchor_sums[kMaxChunk / kAnchorSteps];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) h[r][v] = load(enter + (p0 + r) * lanes + n0 + v * kLanes);
  walk_chunk(h, c, p0, n0, [&](int64_t t) {
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < kVecs; ++v) store_aligned(hbuf + t * kTile + (r * kVecs + v) * kLanes, h[r][v]);
  });
  Vec lambda[kRows][kVecs];
  const float alpha_last = c.alpha[c.steps - 1];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) lambda[r][v] = alpha_last * load(mu_state + (p0 + r) * lanes + n0 + v * kLanes);
  const float* __restrict__ u = c.u + p0 * c.chunk;
  const float* __restrict__ w = wT + p0 * c.chunk;
  for (int64_t s = c.n_segments - 1; s >= 0; --s) {
    for (int64_t t = c.starts[s + 1] - 1; t >= c.starts[s]; --t) {
      const float* __restrict__ B = c.B + t * c.stride + n0;
      const float* __restrict__ C = c.C + t * c.stride + n0;
      const float* __restrict__ G = hbuf + t * kTile;
      Vec ddtx[kRows], dB, dC;
      for (int v = 0; v < kVecs; ++v) {
        const Vec B_t = load(B + v * kLanes), C_t = load(C + v * kLanes);
        for (int r = 0; r < kRows; ++r) {
          const float w_t = w[r * c.chunk + t];
          const Vec G_t = load(G + (r * kVecs + v) * kLanes);
          lambda[r][v] += w_t * C_t;
          ddtx[r] = v == 0 ? lambda[r][0] * B_t : ddtx[r] + lambda[r][v] * B_t;
          dB = r == 0 ? lambda[0][v] * u[t] : dB + lambda[r][v] * u[r * c.chunk + t];
          dC = r == 0 ? w[t] * G_t : dC + w_t * G_t;
        }
        float* const dB_row = dB_part + t * lanes + n0 + v * kLanes;
        float* const dC_row = dC_part + t * lanes + n0 + v * kLanes;
        store_aligned(dB_row, kFirst ? dB : load(dB_row) + dB);
        store_aligned(dC_row, kFirst ? dC : load(dC_row) + dC);
      }
      for (int r = 0; r < kRows; ++r) sums[r][t] = ddtx[r];
      if (t % kAnchorSteps == 0) {
        Vec anchor = {};
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < kVecs; ++v) {
            const int64_t i = (r * kVecs + v) * kLanes;
            anchor += lambda[r][v] * (t == 0 ? load(enter + (p0 + r) * lanes + n0 + v * kLanes) : load(G - kTile + i));
          }
        anchor_sums[t / kAnchorSteps] = anchor;
      }
    }
    const float m = c.m[c.starts[s]];  // into the previous segment's scale (before the chunk: unscaled mu)
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < kVecs; ++v) lambda[r][v] *= m;
  }
  add_row_sums(sums, c.steps, ddtxT + p0 * c.chunk, c.chunk);
  add_all_lane_sums(anchor_sums, (c.steps + kAnchorSteps - 1) / kAnchorSteps, anchors);
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) store(mu_state + (p0 + r) * lanes + n0 + v * kLanes, lambda[r][v]);
}

}  // namespace lethe_cpu
