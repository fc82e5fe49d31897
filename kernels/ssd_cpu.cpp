// Fused SSD scan (Mamba-2) for CPU tensors: the recurrence itself, per (batch, head),
//
//   H_t = exp(dt_t A) H_{t-1} + dt_t outer(x_t, B_t)     (headdim x d_state)    y_t = H_t C_t + D x_t
//
// with B and C shared by the heads of a group. Every loop over d_state runs in whole vectors of
// kLanes floats (d_state padded with zeros); a (batch, head) walks the sequence in chunks of
// `chunk` steps, one tile of its state at a time held in registers through the chunk
// (ssd_cpu_steps.h). Math and state are float32 whatever the input dtype.
//
// Forward saves the state entering each chunk, (batch, nheads, n_chunks, headdim, d_state), and y
// before the D skip in float32 (ys, x's size). Backward walks the chunks in reverse, recomputes a
// chunk's states tile by tile from its saved entering state and runs the adjoint backwards through
// it; nothing of size batch x length x nheads x headdim x d_state is kept. dB and dC sum over the
// heads of a group and dA, dD over the batch: each task writes its own partial sums, which a second
// pass adds in a fixed order, so gradients are bit-identical run to run and for any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cpu_row_io.h"
#include "cpu_scan_steps.h"
#include "cpu_vector_math.h"
#include "output_pool.h"
#include "ssd_cpu_steps.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace lethe_cpu;

constexpr const char* kWho = "lethe ssd_scan (cpu kernel)";

void check(bool ok, const char* message) { TORCH_CHECK(ok, kWho, ": ", message); }

// Copies rows of n floats from a (rows x from_stride) buffer to a (rows x to_stride) one.
void copy_rows(const float* in, int64_t from_stride, int64_t rows, int64_t n, float* out, int64_t to_stride) {
  for (int64_t r = 0; r < rows; ++r) std::copy(in + r * from_stride, in + r * from_stride + n, out + r * to_stride);
}

// The forward of one (batch, head): chunk by chunk, the state entering each one saved, and y
// before the D skip (ys, float32) for the backward's dL/d(dt A).
template <typename T>
void forward_head(const SsdProblem& p, const T* x, T* y, float* ys, float* last, float* saved, int64_t b, int64_t h,
                  SsdForwardBuffers& buf) {
  const int64_t P = p.headdim, N = p.d_state, head = b * p.nheads + h;
  float* const state = buf.state.data();
  float* const yT = buf.yT.data();
  std::fill(buf.state.begin(), buf.state.end(), 0.0f);  // the padding lanes stay 0
  if (p.initial) copy_rows(p.initial + head * P * N, N, P, N, state, p.lanes);
  for (int64_t k = 0; k < p.n_chunks; ++k) {
    const int64_t start = k * p.chunk, steps = std::min(p.chunk, p.length - start);
    copy_rows(state, p.lanes, P, N, saved + (head * p.n_chunks + k) * P * N, N);
    const ChunkView c = load_chunk(p, x, b, h, start, steps, buf.chunk);
    std::fill(buf.yT.begin(), buf.yT.end(), 0.0f);
    for_each_tile(P, p.lanes, [&](auto rows, auto vecs, int64_t p0, int64_t n0) {
      forward_tile<decltype(rows)::value, decltype(vecs)::value>(c, p.lanes, p0, n0, state, yT);
    });
    for (int64_t row = 0; row < P; ++row) {  // the tiles summed <G_t, C_t>: H_t = alpha_t G_t
      float* __restrict__ out = yT + row * p.chunk;
      for_each_step(steps, [&](int64_t t, auto tag) { store_as(out + t, load_as(out + t, tag) * load_as(c.alpha + t, tag)); });
    }
    store_transposed(p, yT, b, h, start, steps, ys);
    if (p.D) {
      for (int64_t row = 0; row < P; ++row) {
        const float skip = p.D[h * P + row];
        float* __restrict__ out = yT + row * p.chunk;
        const float* __restrict__ in = buf.chunk.xT.data() + row * p.chunk;
        for_each_step(steps, [&](int64_t t, auto tag) { store_as(out + t, load_as(out + t, tag) + skip * load_as(in + t, tag)); });
      }
    }
    store_transposed(p, yT, b, h, start, steps, y);
  }
  copy_rows(state, p.lanes, P, N, last + head * P * N, N);
}

// sum a * b over two (rows x lanes) states: each row in float vectors, the rows added in double.
double state_dot(const float* a, const float* b, int64_t rows, int64_t lanes) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    Vec sum = {};
    for (int64_t i = r * lanes; i < (r + 1) * lanes; i += kLanes) sum += load(a + i) * load(b + i);
    total += lane_sum(sum);
  }
  return total;
}

// One backward call's tensors, read and written per (batch, head).
template <typename T>
struct BackwardIO {
  const T *x, *grad_y;
  const float *ys, *saved, *last, *grad_last;  // grad_last may be null
  T* grad_x;
  float *grad_dt, *dA, *dD, *grad_initial;  // dA, dD: per (batch, head) and (batch, head, headdim), summed later
};

// Gradients of one (batch, head), walking the chunks in reverse. `first`: the unit's first head,
// which assigns the unit's dB/dC partial sums (the others add).
//
// dL/d(dt_t A) is gla_t = sum mu_t H_{t-1}, from a scalar recurrence instead of one more FMA per
// state element and step: sum lambda_t H_t is both gla_t + <dt_t x_t, ddtx_t> and
// <dy_t, ys_t> + gla_{t+1}, so gla_t = gla_{t+1} + <dy_t, ys_t> - <dt_t x_t, ddtx_t>; 0 where a_t
// is 0 (a document start), as sum mu_t H_{t-1} is. Its rounding errors would add up along the
// sequence (a random walk, and dA sums it), so the tiles take gla exactly every kAnchorSteps steps
// and the recurrence only fills in the steps after each (after the last step: sum grad_last H_{L-1}).
template <typename T>
void backward_head(const SsdProblem& p, const BackwardIO<T>& io, int64_t b, int64_t h, bool first, float* dB_part,
                   float* dC_part, SsdBackwardBuffers& buf) {
  const int64_t P = p.headdim, N = p.d_state, head = b * p.nheads + h, stride = p.chunk;  // of the [p][t] rows
  std::fill(buf.mu.begin(), buf.mu.end(), 0.0f);
  std::fill(buf.enter.begin(), buf.enter.end(), 0.0f);
  double dA = 0.0;
  if (io.grad_last) copy_rows(io.grad_last + head * P * N, N, P, N, buf.mu.data(), p.lanes);  // mu after the last step
  copy_rows(io.last + head * P * N, N, P, N, buf.enter.data(), p.lanes);
  double gla = state_dot(buf.mu.data(), buf.enter.data(), P, p.lanes);
  float* const dD = io.dD + head * P;
  std::fill(dD, dD + P, 0.0f);
  for (int64_t k = p.n_chunks - 1; k >= 0; --k) {
    const int64_t start = k * p.chunk, steps = std::min(p.chunk, p.length - start);
    const ChunkView c = load_chunk(p, io.x, b, h, start, steps, buf.chunk);
    load_transposed(p, io.grad_y, b, h, start, steps, buf.dyT.data());
    load_transposed(p, io.ys, b, h, start, steps, buf.ysT.data());
    for (int64_t row = 0; row < P; ++row) {
      float* __restrict__ w = buf.wT.data() + row * stride;
      const float* __restrict__ dy = buf.dyT.data() + row * stride;
      for_each_step(steps, [&](int64_t t, auto tag) { store_as(w + t, load_as(dy + t, tag) * load_as(c.alpha + t, tag)); });
    }
    copy_rows(io.saved + (head * p.n_chunks + k) * P * N, N, P, N, buf.enter.data(), p.lanes);
    std::fill(buf.ddtxT.begin(), buf.ddtxT.end(), 0.0f);
    std::fill(buf.anchors.begin(), buf.anchors.end(), 0.0f);
    float* const dB = dB_part + start * p.lanes;
    float* const dC = dC_part + start * p.lanes;
    for_each_tile(P, p.lanes, [&](auto rows, auto vecs, int64_t p0, int64_t n0) {
      constexpr int kRows = decltype(rows)::value, kVecs = decltype(vecs)::value;
      auto* const tile = first && p0 == 0 ? backward_tile<kRows, kVecs, true> : backward_tile<kRows, kVecs, false>;
      tile(c, p.lanes, p0, n0, buf.enter.data(), buf.wT.data(), buf.mu.data(), buf.hbuf.data(), dB, dC, buf.ddtxT.data(),
           buf.anchors.data());
    });

    // ddtxT holds S = alpha ddtx. Per step, rows added in order (vectors along t): q = <dy, ys> -
    // <u, S> (the gla recurrence's step), x_S = <x, S> (d dt's term from dt x, times 1 / alpha);
    // dx = S dt / alpha + D dy in S's place; dD[p] sums dy x.
    float* __restrict__ q = buf.q.data();
    float* __restrict__ x_S = buf.x_S.data();
    std::fill(q, q + steps, 0.0f);
    std::fill(x_S, x_S + steps, 0.0f);
    for (int64_t row = 0; row < P; ++row) {
      float* __restrict__ S = buf.ddtxT.data() + row * stride;
      const float* __restrict__ x = buf.chunk.xT.data() + row * stride;
      const float* __restrict__ u = buf.chunk.u.data() + row * stride;
      const float* __restrict__ dy = buf.dyT.data() + row * stride;
      const float* __restrict__ ys = buf.ysT.data() + row * stride;
      const float skip = p.D ? p.D[h * P + row] : 0.0f;
      Vec dD_parts = {};
      float dD_tail = 0.0f;
      for_each_step(steps, [&](int64_t t, auto tag) {
        const auto S_t = load_as(S + t, tag), x_t = load_as(x + t, tag), dy_t = load_as(dy + t, tag);
        store_as(q + t, load_as(q + t, tag) + (dy_t * load_as(ys + t, tag) - load_as(u + t, tag) * S_t));
        store_as(x_S + t, load_as(x_S + t, tag) + x_t * S_t);
        store_as(S + t, S_t * load_as(buf.chunk.dt_scaled.data() + t, tag) + skip * dy_t);
        if constexpr (std::is_same_v<decltype(tag), float>) dD_tail += dy_t * x_t;
        else dD_parts += dy_t * x_t;
      });
      dD[row] += lane_sum(dD_parts) + dD_tail;
    }
    const float A = p.A[h];
    const float* a = buf.chunk.a.data();
    const float* dt = buf.chunk.dt.data();
    for (int64_t t = steps - 1; t >= 0; --t) {
      if (t % kAnchorSteps == 0) gla = double{c.m[t]} * buf.anchors[t / kAnchorSteps];
      else gla = a[t] == 0.0f ? 0.0 : gla + q[t];
      io.grad_dt[(b * p.length + start + t) * p.nheads + h] = x_S[t] / c.alpha[t] + A * static_cast<float>(gla);
      dA += gla * dt[t];
    }
    store_transposed(p, buf.ddtxT.data(), b, h, start, steps, io.grad_x);
  }
  io.dA[head] = static_cast<float>(dA);
  if (io.grad_initial) copy_rows(buf.mu.data(), p.lanes, P, N, io.grad_initial + head * P * N, N);  // mu_0 = dL/dH_{-1}
}

// (batch, length, ngroups, d_state) in any float dtype -> float32 (batch, length, ngroups, lanes),
// zeros in the padding; float32 inputs that need no padding as they are.
Tensor padded_states(const Tensor& t, int64_t lanes) {
  const int64_t rows = t.numel() / std::max<int64_t>(t.size(3), 1), n = t.size(3);
  if (t.scalar_type() == at::kFloat && n == lanes) return t;
  Tensor out = OutputPool::instance().empty({t.size(0), t.size(1), t.size(2), lanes}, t.options().dtype(at::kFloat));
  LETHE_DISPATCH_ROW_TYPES(t.scalar_type(), kWho, "B and C", [&] {
    const scalar_t* in = t.data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        convert(in + i * n, n, o + i * lanes);
        std::fill(o + i * lanes + n, o + (i + 1) * lanes, 0.0f);
      }
    });
  });
  return out;
}

// The checked inputs in the kernel's layout, and the problem that points into them.
struct Inputs {
  Tensor B, C, D;
  SsdProblem p;
  Inputs(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B_in, const Tensor& C_in, const OptTensor& D_in,
         const OptTensor& initial, const OptTensor& keep, int64_t chunk) {
    check(x.device().is_cpu(), "tensors must be on the CPU");
    check(x.dim() == 4 && x.is_contiguous(), "x must be a contiguous (batch, length, nheads, headdim) tensor");
    const int64_t batch = x.size(0), length = x.size(1), nheads = x.size(2), headdim = x.size(3);
    check(B_in.dim() == 4 && B_in.is_contiguous() && C_in.sizes() == B_in.sizes() && C_in.is_contiguous() &&
              B_in.size(0) == batch && B_in.size(1) == length, "B and C must be contiguous (batch, length, ngroups, d_state)");
    const int64_t ngroups = B_in.size(2), d_state = B_in.size(3);
    check(ngroups >= 1 && nheads % ngroups == 0, "ngroups must divide nheads");
    auto is_f32 = [](const Tensor& t, at::IntArrayRef sizes) {
      return t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == sizes;
    };
    check(is_f32(dt, {batch, length, nheads}), "dt must be float32 (batch, length, nheads), contiguous");
    check(is_f32(A, {nheads}), "A must be float32 (nheads,)");
    check(!D_in || (D_in->scalar_type() == at::kFloat && D_in->is_contiguous() && D_in->size(0) == nheads &&
                    (D_in->dim() == 1 || (D_in->dim() == 2 && D_in->size(1) == headdim))), "D must be float32 (nheads,) or (nheads, headdim)");
    check(!initial || is_f32(*initial, {batch, nheads, headdim, d_state}), "initial_state must be float32 (batch, nheads, headdim, d_state)");
    check(!keep || is_f32(*keep, {batch, length}), "keep must be float32 (batch, length)");
    check(chunk >= 1 && chunk <= kMaxChunk, "chunk must be in [1, 256]");
    const int64_t lanes = (d_state + kLanes - 1) / kLanes * kLanes;
    B = padded_states(B_in, lanes);
    C = padded_states(C_in, lanes);
    if (D_in) D = D_in->dim() == 1 ? D_in->unsqueeze(1).expand({nheads, headdim}).contiguous() : *D_in;
    p = {batch, length, nheads, headdim, ngroups, d_state, lanes, chunk, (length + chunk - 1) / chunk,
         A.data_ptr<float>(), B.data_ptr<float>(), C.data_ptr<float>(), D_in ? D.data_ptr<float>() : nullptr,
         dt.data_ptr<float>(), initial ? initial->data_ptr<float>() : nullptr, keep ? keep->data_ptr<float>() : nullptr};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> ssd_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                                                   const Tensor& C, const OptTensor& D, const OptTensor& initial_state,
                                                   const OptTensor& keep, int64_t chunk) {
  const Inputs in(x, dt, A, B, C, D, initial_state, keep, chunk);
  const SsdProblem& p = in.p;
  OutputPool& pool = OutputPool::instance();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = pool.empty_like(x), ys = pool.empty(x.sizes(), f32);
  Tensor last = at::empty({p.batch, p.nheads, p.headdim, p.d_state}, f32);
  Tensor saved = pool.empty({p.batch, p.nheads, p.n_chunks, p.headdim, p.d_state}, f32);
  LETHE_DISPATCH_ROW_TYPES(x.scalar_type(), kWho, "x", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    for_each_unit(p.batch * p.nheads, [&] { return SsdForwardBuffers(p); },
                  [&](SsdForwardBuffers& buffers, int64_t unit, int64_t) {
                    forward_head(p, x_ptr, y_ptr, ys.data_ptr<float>(), last.data_ptr<float>(), saved.data_ptr<float>(),
                                 unit / p.nheads, unit % p.nheads, buffers);
                  });
  });
  return {y, last, saved, ys};
}

// Heads per backward unit: the heads of a group split into the fewest blocks (1, 2, 4, ...) that
// give at least 8 units. Each block has its own dB/dC partial sums (length x lanes floats each);
// fixed by the shape alone, so the summation order (and the bits) never depend on the thread count.
int64_t heads_per_unit(const SsdProblem& p) {
  const int64_t per_group = p.nheads / p.ngroups;
  int64_t blocks = 1;
  while (p.batch * p.ngroups * blocks < 8 && blocks < per_group) blocks *= 2;
  return (per_group + std::min(blocks, per_group) - 1) / std::min(blocks, per_group);
}

// (batch, k...) float32 -> (k...), batch 0 first: a fixed order.
Tensor sum_over_batch(const Tensor& rows) {
  const int64_t batch = rows.size(0), k = batch ? rows.numel() / batch : 0;
  Tensor total = at::zeros(rows.sizes().slice(1), rows.options());
  const float* in = rows.data_ptr<float>();
  float* out = total.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < k; ++i) out[i] += in[b * k + i];
  return total;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ssd_bwd(
    const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
    const OptTensor& initial_state, const OptTensor& keep, int64_t chunk, const Tensor& saved, const Tensor& ys,
    const Tensor& last, const Tensor& grad_y, const OptTensor& grad_last) {
  const Inputs in(x, dt, A, B, C, D, initial_state, keep, chunk);
  const SsdProblem& p = in.p;
  const int64_t P = p.headdim, N = p.d_state;
  check(saved.scalar_type() == at::kFloat && saved.is_contiguous() &&
            saved.sizes() == at::IntArrayRef({p.batch, p.nheads, p.n_chunks, P, N}), "saved chunk states do not match the inputs");
  check(ys.scalar_type() == at::kFloat && ys.sizes() == x.sizes() && ys.is_contiguous(), "saved ys does not match x");
  check(last.scalar_type() == at::kFloat && last.is_contiguous() && last.numel() == p.batch * p.nheads * P * N, "saved last state does not match the inputs");
  check(grad_y.scalar_type() == x.scalar_type() && grad_y.sizes() == x.sizes() && grad_y.is_contiguous(), "grad_y must have x's shape and dtype");
  check(!grad_last || (grad_last->scalar_type() == at::kFloat && grad_last->is_contiguous() &&
                       grad_last->numel() == p.batch * p.nheads * P * N), "grad of the last state must be float32 (batch, nheads, headdim, d_state)");
  const auto f32 = x.options().dtype(at::kFloat);
  OutputPool& pool = OutputPool::instance();
  Tensor grad_x = pool.empty_like(x), grad_dt = at::empty(dt.sizes(), f32);
  Tensor dA_rows = at::empty({p.batch, p.nheads}, f32), dD_rows = at::empty({p.batch, p.nheads, P}, f32);
  Tensor grad_initial = initial_state ? at::empty(initial_state->sizes(), f32) : at::empty({0}, f32);
  Tensor grad_B = at::empty(B.sizes(), B.options()), grad_C = at::empty(C.sizes(), C.options());
  const int64_t per_group = p.nheads / p.ngroups, per_unit = heads_per_unit(p);
  const int64_t blocks = (per_group + per_unit - 1) / per_unit, slice = p.length * p.lanes;
  // dB and dC partial sums, (batch, ngroups, blocks, length, lanes) each: one slice per unit
  Tensor parts = pool.empty({2, p.batch * p.ngroups * blocks, slice}, f32);
  float* const dB_parts = parts.data_ptr<float>();
  float* const dC_parts = dB_parts + p.batch * p.ngroups * blocks * slice;

  LETHE_DISPATCH_ROW_TYPES(x.scalar_type(), kWho, "x", [&] {
    const BackwardIO<scalar_t> io{x.data_ptr<scalar_t>(), grad_y.data_ptr<scalar_t>(), ys.data_ptr<float>(),
                                  saved.data_ptr<float>(), last.data_ptr<float>(),
                                  grad_last ? grad_last->data_ptr<float>() : nullptr,
                                  grad_x.data_ptr<scalar_t>(), grad_dt.data_ptr<float>(), dA_rows.data_ptr<float>(),
                                  dD_rows.data_ptr<float>(), initial_state ? grad_initial.data_ptr<float>() : nullptr};
    for_each_unit(p.batch * p.ngroups * blocks, [&] { return SsdBackwardBuffers(p); },
                  [&](SsdBackwardBuffers& buffers, int64_t unit, int64_t) {
                    const int64_t b = unit / (p.ngroups * blocks), g = unit / blocks % p.ngroups;
                    const int64_t h0 = g * per_group + unit % blocks * per_unit;
                    const int64_t h1 = std::min(h0 + per_unit, (g + 1) * per_group);
                    for (int64_t h = h0; h < h1; ++h)
                      backward_head(p, io, b, h, h == h0, dB_parts + unit * slice, dC_parts + unit * slice, buffers);
                  });
  });

  // Add each (batch, group)'s partial sums in block order (block 0 += block 1, += block 2, ...),
  // a run of steps per task, and write that run of dB and dC out in B's and C's dtype while it is in L1.
  const int64_t steps = 256, runs = (p.length + steps - 1) / steps;
  at::parallel_for(0, p.batch * p.ngroups * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bg = task / runs, t0 = task % runs * steps, t1 = std::min(t0 + steps, p.length);
      for (auto [part, out] : {std::pair{dB_parts, &grad_B}, std::pair{dC_parts, &grad_C}}) {
        float* __restrict__ total = part + bg * blocks * slice;
        for (int64_t j = 1; j < blocks; ++j) {
          const float* __restrict__ block = total + j * slice;
          for (int64_t i = t0 * p.lanes; i < t1 * p.lanes; ++i) total[i] += block[i];
        }
        LETHE_DISPATCH_ROW_TYPES(out->scalar_type(), kWho, "B and C", [&] {
          scalar_t* o = out->data_ptr<scalar_t>() + ((bg / p.ngroups * p.length) * p.ngroups + bg % p.ngroups) * N;
          for (int64_t t = t0; t < t1; ++t) convert(total + t * p.lanes, N, o + t * p.ngroups * N);
        });
      }
    }
  });

  Tensor grad_D = at::empty({0}, f32);
  if (D) {
    grad_D = sum_over_batch(dD_rows);  // (nheads, headdim)
    if (D->dim() == 1) grad_D = sum_over_batch(grad_D.t().contiguous());  // headdim in order, for each head
  }
  return {grad_x, grad_dt, sum_over_batch(dA_rows), grad_B, grad_C, grad_D, grad_initial};
}

}  // namespace

TORCH_LIBRARY(lethe_ssd_cpu, m) {
  m.def("ssd_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state, Tensor? keep, "
        "int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ssd_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state, Tensor? keep, "
        "int chunk, Tensor saved, Tensor ys, Tensor last, Tensor grad_y, Tensor? grad_last) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lethe_ssd_cpu, CPU, m) {
  m.impl("ssd_fwd", &ssd_fwd);
  m.impl("ssd_bwd", &ssd_bwd);
}
