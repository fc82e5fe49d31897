// The CPU kernel's inner loops over one chunk of one (batch, channel) row: the recurrence (the
// forward, and the backward's recompute) and the adjoint; and around them, the per-thread
// buffers and how rows are handed out to threads. Every loop over d_state runs in whole
// Vecs that stay in registers from one time step to the next.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cpu_vector_math.h"

namespace lethe_cpu {

constexpr int64_t kMaxChunk = 256;  // steps per chunk at most: the per-step sums below live on the stack

// Calls fn(std::integral_constant<int, kVecs>{}, n0) for consecutive blocks of the padded state,
// [n0, n0 + kVecs * kLanes) with kVecs <= 4: within a block the state, decays and adjoints stay
// in registers from one time step to the next (loops over a compile-time kVecs unroll).
template <typename Fn>
void for_state_blocks(int64_t lanes, Fn&& fn) {
  constexpr int kMaxVecs = 4;
  int64_t n0 = 0;
  for (; lanes - n0 >= kMaxVecs * kLanes; n0 += kMaxVecs * kLanes) fn(std::integral_constant<int, kMaxVecs>{}, n0);
  switch ((lanes - n0) / kLanes) {
    case 1: fn(std::integral_constant<int, 1>{}, n0); break;
    case 2: fn(std::integral_constant<int, 2>{}, n0); break;
    case 3: fn(std::integral_constant<int, 3>{}, n0); break;
    default: break;
  }
}

// Steps [start, start + steps) of row (b, d) for the states of one block, starting from `state`
// (kVecs vectors; left holding the state after the last step). The forward (kKeep false) adds
// each step's <C_t, h_t> over the block to y[t]; the backward's recompute (kKeep true) needs no
// outputs (the forward saved y before the gate) and stores the decays and states in the chunk
// buffers a[t][n], h[t][n] (t counted from `start`) instead, which the adjoint walks.
// kAtMostOne: decays_at_most_one holds for this row. kResets: p.keep marks document starts, where
// the decay is 0 (the state before it is dropped; the adjoint then stops there too).
template <int kVecs, bool kKeep, bool kAtMostOne, bool kResets>
void scan_block(const Problem& p, int64_t b, int64_t d, int64_t n0, int64_t start, int64_t steps,
                const float* __restrict__ delta, const float* __restrict__ du, float* __restrict__ state,
                float* __restrict__ y, float* __restrict__ a_keep, float* __restrict__ h_keep) {
  const int64_t N = p.lanes;
  const float* __restrict__ B = p.B + (b * p.length + start) * N + n0;
  const float* __restrict__ C = p.C + (b * p.length + start) * N + n0;
  Vec rate[kVecs], h[kVecs];
  Vec sums[kKeep ? 1 : kMaxChunk];  // per step, summed across lanes after the recurrence loop
  for (int v = 0; v < kVecs; ++v) rate[v] = decay_rate(load(p.A + d * N + n0 + v * kLanes)), h[v] = load(state + v * kLanes);
  const float* __restrict__ keep = kResets ? p.keep + b * p.length + start : nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    const float step = delta[start + t], input = du[start + t];
    Vec sum = {};
    for (int v = 0; v < kVecs; ++v) {
      const int64_t i = t * N + v * kLanes;
      Vec a = decay<kAtMostOne>(step, rate[v]);
      if constexpr (kResets) a *= keep[t];
      h[v] = a * h[v] + input * load(B + i);
      if constexpr (kKeep) store(a_keep + i + n0, a), store(h_keep + i + n0, h[v]);
      else sum += load(C + i) * h[v];
    }
    if constexpr (!kKeep) sums[t] = sum;
  }
  if constexpr (!kKeep) add_all_lane_sums(sums, steps, y + start);
  for (int v = 0; v < kVecs; ++v) store(state + v * kLanes, h[v]);
}

// Whether every delta_t A_n of row d is <= 0 (or NaN), so the decays' exp needs no overflow
// clamp: softplus makes delta >= 0, and in a Mamba layer A = -exp(A_log) < 0. Other rows take the
// clamped exp.
inline bool decays_at_most_one(const Problem& p, int64_t d) {
  if (!p.softplus) return false;
  for (int64_t n = 0; n < p.lanes; ++n)
    if (!(p.A[d * p.lanes + n] <= 0.0f)) return false;
  return true;
}

// The scan_block for a row: its decays' bound (decays_at_most_one) and whether documents start in it.
template <int kVecs, bool kKeep>
auto* pick_scan_block(bool at_most_one, bool resets) {
  if (resets) return at_most_one ? scan_block<kVecs, kKeep, true, true> : scan_block<kVecs, kKeep, false, true>;
  return at_most_one ? scan_block<kVecs, kKeep, true, false> : scan_block<kVecs, kKeep, false, false>;
}

// Units [0, n_units) of work, handed out one at a time to at::parallel_for's threads instead of a
// fixed share each: on a busy or shared machine a thread that loses its core for a while holds up
// one unit, not half the rows. fn(state, unit, next) runs each unit with its thread's state (from
// make_state()); `next` is the unit that thread runs after it (-1: none), claimed before the
// current one starts, so a unit's last row can prefetch the next unit's first. Which thread runs a
// unit never changes a result.
template <typename MakeState, typename Fn>
void for_each_unit(int64_t n_units, MakeState&& make_state, Fn&& fn) {
  std::atomic<int64_t> counter{0};
  const auto claim = [&] {
    const int64_t unit = counter.fetch_add(1, std::memory_order_relaxed);
    return unit < n_units ? unit : int64_t{-1};
  };
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_units), 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t unit = claim(), next; unit >= 0; unit = next) {
      next = claim();
      fn(state, unit, next);
    }
  });
}

// Per-thread buffers of the forward pass, sized for one row.
struct ForwardBuffers {
  Floats u, delta, du, y, h;
  explicit ForwardBuffers(const Problem& p) : u(p.length), delta(p.length), du(p.length), y(p.length), h(p.lanes) {}
};

// Per-thread buffers of the backward pass, sized for one row.
struct BackwardBuffers {
  Floats u, delta, slope, du, g, lambda_B, grad_log_a_A, a, h, h_work, mu, dA;  // slope: d delta / d delta_raw
  explicit BackwardBuffers(const Problem& p)
      : u(p.length), delta(p.length), slope(p.length, 1.0f), du(p.length), g(p.length), lambda_B(p.length),
        grad_log_a_A(p.length), a(p.chunk * p.lanes), h((p.chunk + 1) * p.lanes), h_work(p.lanes), mu(p.lanes), dA(p.lanes) {}
};

// The adjoint recurrence through one chunk for the states of one block, last step first:
//   lambda_t = dL/dh_t = g_t C_t + mu_{t+1},   mu_t = a_t lambda_t
// mu enters from the step after the chunk and leaves for the step before it. Per step it adds
// sum_n mu_t h_{t-1} A_n (the d delta term of the decays) and sum_n lambda_t B_t (the d(delta u)
// term) over the block, its two sums packed in one vector per step (the loop is bound by its
// stores, not its arithmetic); dB/dC rows of this task's partial sums are assigned (first
// channel of the group) or added.
template <int kVecs, bool kFirstInGroup>
void adjoint_block(const Problem& p, int64_t b, int64_t d, int64_t n0, int64_t start, int64_t steps,
                   BackwardBuffers& buf, float* __restrict__ dB_part, float* __restrict__ dC_part) {
  const int64_t N = p.lanes;
  const float* __restrict__ B = p.B + (b * p.length + start) * N + n0;
  const float* __restrict__ C = p.C + (b * p.length + start) * N + n0;
  const float* __restrict__ a = buf.a.data() + n0;
  const float* __restrict__ h = buf.h.data() + n0;
  float* __restrict__ dB = dB_part + start * N + n0;
  float* __restrict__ dC = dC_part + start * N + n0;
  Vec A[kVecs], mu[kVecs], dA[kVecs], sums[kMaxChunk];
  for (int v = 0; v < kVecs; ++v) {
    A[v] = load(p.A + d * N + n0 + v * kLanes), mu[v] = load(buf.mu.data() + n0 + v * kLanes);
    dA[v] = load(buf.dA.data() + n0 + v * kLanes);
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t step = start + t;
    const float grad_y = buf.g[step], input = buf.du[step], dt = buf.delta[step];
    Vec grad_log_a_A = {}, lambda_B = {};
    for (int v = 0; v < kVecs; ++v) {
      const int64_t i = t * N + v * kLanes;
      const Vec h_prev = load(h + i);  // buf.h: the entering state, then the state after each step
      const Vec decay = load(a + i), grad_C = grad_y * load(C + i);
      const Vec lambda = grad_C + mu[v];                 // dL/dh_t
      mu[v] = decay * mu[v] + decay * grad_C;            // mu for step t-1: one FMA on the chain
      const Vec grad_log_a = mu[v] * h_prev;             // dL/d(delta_t A_n)
      dA[v] += grad_log_a * dt;
      grad_log_a_A += grad_log_a * A[v];
      lambda_B += lambda * load(B + i);
      const Vec dB_new = lambda * input, dC_new = grad_y * load(h + i + N);
      store(dB + i, kFirstInGroup ? dB_new : load(dB + i) + dB_new);
      store(dC + i, kFirstInGroup ? dC_new : load(dC + i) + dC_new);
    }
    sums[t] = pack_pair(grad_log_a_A, lambda_B);
  }
  add_all_pair_sums(sums, steps, buf.grad_log_a_A.data() + start, buf.lambda_B.data() + start);
  for (int v = 0; v < kVecs; ++v) {
    store(buf.mu.data() + n0 + v * kLanes, mu[v]);
    store(buf.dA.data() + n0 + v * kLanes, dA[v]);
  }
}

}  // namespace lethe_cpu
