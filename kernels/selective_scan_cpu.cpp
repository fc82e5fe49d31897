// Fused selective scan for CPU tensors: the same op as the CUDA kernel, the same algorithm.
//
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      y_t = <C_t, h_t> + D * u_t
//   out_t = y_t * silu(z_t) = y_t * z_t * sigmoid(z_t),   delta_t = softplus(delta_raw_t + delta_bias)
//
// Threaded over (batch, channel) rows with at::parallel_for; each row walks the sequence in
// chunks of `chunk` steps. A chunk's decays a[t][n] and states h[t][n] live in a small buffer
// (chunk x d_state floats, in L1/L2), and every loop over d_state runs in whole vectors of
// kLanes floats (cpu_vector_math.h, exp included; the loops over a chunk are in
// cpu_scan_steps.h, row input and output in cpu_row_io.h). Math and state are float32 whatever
// the input dtype.
//
// Forward saves only the state entering each chunk, (batch, channels, n_chunks, d_state), and
// with z the output before the gate. Backward walks the chunks in reverse, recomputes a chunk's
// states from its saved entering state, then runs the adjoint recurrence backwards through it.
// dB and dC sum over channels: each task owns a fixed group of channels and writes its own
// partial sums, which a second pass adds in a fixed order, so gradients are bit-identical run
// to run (no atomics, and the result does not depend on the number of threads).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>

#include "cpu_row_io.h"
#include "cpu_scan_steps.h"
#include "cpu_vector_math.h"
#include "output_pool.h"
#include "scan_inputs.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace lethe_cpu;

// One forward call's tensors; forward_row reads and writes its row's slices.
template <typename T>
struct ForwardIO {
  const T *u, *delta, *z;  // z null without a gate
  T *out, *out_pre;        // out_pre (y before the gate, which dz needs) null without z
  float *last, *saved;     // per row: d_state floats, and d_state per chunk
};

// Forward of one row; `next` is the row to prefetch for (-1: none). Only the state entering each
// chunk is kept, and with z the output before the gate (recomputing it would cost the backward a
// second C contraction).
template <typename T>
void forward_row(const Problem& p, const ForwardIO<T>& io, int64_t row, int64_t next, ForwardBuffers& buf) {
  const int64_t L = p.length, N = p.lanes, S = p.d_state;
  const int64_t b = row / p.channels, d = row % p.channels;
  float* const y = buf.y.data();
  float* const h = buf.h.data();
  load_row(p, row, io.u, io.delta, buf.u.data(), buf.delta.data(), buf.du.data(), nullptr);
  const bool at_most_one = decays_at_most_one(p, d);
  // The padding lanes start at 0 in every row: a NaN there (inf * B = 0) would reach the next
  // rows' outputs through C = 0.
  std::fill(h, h + N, 0.0f);
  if (p.initial) std::copy(p.initial + row * S, p.initial + (row + 1) * S, h);
  std::fill(y, y + L, 0.0f);
  for (int64_t k = 0; k < p.n_chunks; ++k) {
    const int64_t start = k * p.chunk, steps = std::min(p.chunk, L - start);
    if (next >= 0) {
      prefetch_row<T>({io.u, io.delta, io.z}, {io.out, io.out_pre}, next, L, start, steps);
      prefetch(io.saved + (next * p.n_chunks + k) * S, S, true);
    }
    std::copy(h, h + S, io.saved + (row * p.n_chunks + k) * S);
    for_state_blocks(N, [&](auto vecs, int64_t n0) {
      constexpr int kVecs = decltype(vecs)::value;
      auto* const scan = pick_scan_block<kVecs, false>(at_most_one, p.keep != nullptr);
      scan(p, b, d, n0, start, steps, buf.delta.data(), buf.du.data(), h + n0, y, nullptr, nullptr);
    });
  }
  std::copy(h, h + S, io.last + row * S);
  const float skip = p.D ? p.D[d] : 0.0f;
  const float* __restrict__ u = buf.u.data();
  T* __restrict__ out = io.out + row * L;
  if (io.z) {
    const T* __restrict__ z = io.z + row * L;
    T* __restrict__ pre = io.out_pre + row * L;
    for_each_step(L, [&](int64_t t, auto tag) {
      const auto y_t = load_as(y + t, tag) + skip * load_as(u + t, tag), gate = load_as(z + t, tag);
      store_as(pre + t, y_t);
      store_as(out + t, y_t * gate * sigmoid(gate));
    });
  } else {
    for_each_step(L, [&](int64_t t, auto tag) { store_as(out + t, load_as(y + t, tag) + skip * load_as(u + t, tag)); });
  }
}

// One backward call's tensors; backward_row reads and writes its row's slices.
template <typename T>
struct BackwardIO {
  const T *u, *delta, *z, *out_pre, *grad_out;  // z and out_pre null without z
  const float *grad_last, *saved;               // grad_last may be null
  T *grad_u, *grad_delta, *grad_z;
  float *dA, *dD, *dbias, *dinit;               // per row: d_state, 1, 1, d_state floats
};

// Gradients of one row (b, d), walking chunks in reverse; `next` is the row to prefetch for (-1:
// none). The first row of a channel group assigns the group's dB/dC partial sums, the others add.
template <typename T>
void backward_row(const Problem& p, const BackwardIO<T>& io, int64_t row, int64_t next, bool first_in_group,
                  float* dB_part, float* dC_part, BackwardBuffers& buf) {
  const int64_t L = p.length, N = p.lanes, S = p.d_state;
  const int64_t b = row / p.channels, d = row % p.channels;
  const float skip = p.D ? p.D[d] : 0.0f;
  load_row(p, row, io.u, io.delta, buf.u.data(), buf.delta.data(), buf.du.data(), buf.slope.data());
  const bool at_most_one = decays_at_most_one(p, d);
  if (io.z) {  // out = out_pre * silu(z): dL/dz goes straight out, g is the gradient of y before the gate
    const T* __restrict__ grad_out = io.grad_out + row * L;
    const T* __restrict__ z = io.z + row * L;
    const T* __restrict__ y_pre = io.out_pre + row * L;
    T* __restrict__ grad_z = io.grad_z + row * L;
    float* __restrict__ g = buf.g.data();
    for_each_step(L, [&](int64_t t, auto tag) {
      const auto gate = load_as(z + t, tag), grad = load_as(grad_out + t, tag), sig = sigmoid(gate);
      store_as(grad_z + t, grad * load_as(y_pre + t, tag) * sig * (1.0f + gate * (1.0f - sig)));
      store_as(g + t, grad * gate * sig);
    });
  } else {
    convert(io.grad_out + row * L, L, buf.g.data());
  }
  for (auto* v : {&buf.dA, &buf.mu, &buf.lambda_B, &buf.grad_log_a_A}) std::fill(v->begin(), v->end(), 0.0f);
  // mu after the last step is the gradient of the final state.
  if (io.grad_last) std::copy(io.grad_last + row * S, io.grad_last + (row + 1) * S, buf.mu.begin());
  for (int64_t k = p.n_chunks - 1; k >= 0; --k) {
    const int64_t start = k * p.chunk, steps = std::min(p.chunk, L - start);
    if (next >= 0) {
      prefetch_row<T>({io.u, io.delta, io.z, io.out_pre, io.grad_out}, {io.grad_u, io.grad_delta, io.grad_z}, next, L,
                      start, steps);
      prefetch(io.saved + (next * p.n_chunks + k) * S, S, false);
    }
    const float* enter = io.saved + (row * p.n_chunks + k) * S;
    std::copy(enter, enter + S, buf.h.begin());  // row 0 of the chunk's states; the padding stays 0
    std::copy(buf.h.begin(), buf.h.begin() + N, buf.h_work.begin());
    for_state_blocks(N, [&](auto vecs, int64_t n0) {
      constexpr int kVecs = decltype(vecs)::value;
      auto* const scan = pick_scan_block<kVecs, true>(at_most_one, p.keep != nullptr);
      scan(p, b, d, n0, start, steps, buf.delta.data(), buf.du.data(), buf.h_work.data() + n0, nullptr, buf.a.data(),
           buf.h.data() + N);
    });
    for_state_blocks(N, [&](auto vecs, int64_t n0) {
      constexpr int kVecs = decltype(vecs)::value;
      if (first_in_group) adjoint_block<kVecs, true>(p, b, d, n0, start, steps, buf, dB_part, dC_part);
      else adjoint_block<kVecs, false>(p, b, d, n0, start, steps, buf, dB_part, dC_part);
    });
  }
  // Per step: d delta (after softplus) = sum_n mu h A + (sum_n lambda B) u, times the softplus's
  // slope for d delta_raw; d u = (sum_n lambda B) delta + g D. In the same pass, dD = sum_t g u and
  // d delta_bias = sum_t d delta_raw, in kLanes partial sums and then the tail (a fixed order).
  const float* __restrict__ grad_log_a_A = buf.grad_log_a_A.data();
  const float* __restrict__ lambda_B = buf.lambda_B.data();
  const float* __restrict__ u = buf.u.data();
  const float* __restrict__ delta = buf.delta.data();
  const float* __restrict__ slope = buf.slope.data();
  const float* __restrict__ g = buf.g.data();
  T* __restrict__ grad_u = io.grad_u + row * L;
  T* __restrict__ grad_delta = io.grad_delta + row * L;
  Vec dD_parts = {}, dbias_parts = {};
  float dD_tail = 0.0f, dbias_tail = 0.0f;
  for_each_step(L, [&](int64_t t, auto tag) {
    const auto lambda_B_t = load_as(lambda_B + t, tag), u_t = load_as(u + t, tag), g_t = load_as(g + t, tag);
    const auto grad_delta_t = (load_as(grad_log_a_A + t, tag) + lambda_B_t * u_t) * load_as(slope + t, tag);
    store_as(grad_delta + t, grad_delta_t);
    store_as(grad_u + t, lambda_B_t * load_as(delta + t, tag) + g_t * skip);
    if constexpr (std::is_same_v<decltype(tag), float>) dD_tail += g_t * u_t, dbias_tail += grad_delta_t;
    else dD_parts += g_t * u_t, dbias_parts += grad_delta_t;
  });
  io.dD[row] = lane_sum(dD_parts) + dD_tail;
  io.dbias[row] = lane_sum(dbias_parts) + dbias_tail;
  std::copy(buf.dA.begin(), buf.dA.begin() + S, io.dA + row * S);
  std::copy(buf.mu.begin(), buf.mu.begin() + S, io.dinit + row * S);  // mu before the first step: dL/dh_{-1}
}

void check(bool ok, const char* message) { TORCH_CHECK(ok, "lethe selective_scan (cpu kernel): ", message); }

// A, B and C in the kernel's layout: float32, d_state padded with zeros to a multiple of kLanes,
// B and C time-major (batch, length, lanes) so one step's state is contiguous.
struct StateOperands {
  Tensor A, B, C;
  StateOperands(const Tensor& A_in, const Tensor& B_in, const Tensor& C_in) {
    const int64_t d_state = A_in.size(1), lanes = (d_state + kLanes - 1) / kLanes * kLanes;
    A = lanes == d_state ? A_in : at::constant_pad_nd(A_in, {0, lanes - d_state});  // checked contiguous float32
    B = time_major(B_in, lanes);
    C = time_major(C_in, lanes);
  }
  // (batch, d_state, length) in any float dtype -> (batch, length, lanes) float32.
  static Tensor time_major(const Tensor& x, int64_t lanes) {
    const int64_t batch = x.size(0), d_state = x.size(1), length = x.size(2);
    Tensor out = at::empty({batch, length, lanes}, x.options().dtype(at::kFloat));
    LETHE_DISPATCH_ROW_TYPES(x.scalar_type(), "lethe selective_scan (cpu kernel)", "inputs", [&] {
      for (int64_t b = 0; b < batch; ++b)
        to_time_major(x.data_ptr<scalar_t>() + b * d_state * length, d_state, length, lanes, out.data_ptr<float>() + b * length * lanes);
    });
    return out;
  }
};

Problem make_problem(const Tensor& u, const StateOperands& ops, int64_t d_state, const OptTensor& D,
                     const OptTensor& delta_bias, const OptTensor& initial, const OptTensor& keep, bool delta_softplus,
                     int64_t chunk) {
  TORCH_CHECK(chunk >= 1 && chunk <= kMaxChunk, "lethe selective_scan (cpu kernel): chunk must be in [1, ", kMaxChunk, "]");
  Problem p;
  p.batch = u.size(0), p.channels = u.size(1), p.length = u.size(2), p.d_state = d_state, p.lanes = ops.A.size(1);
  p.chunk = chunk, p.n_chunks = (p.length + chunk - 1) / chunk;
  p.A = ops.A.data_ptr<float>(), p.B = ops.B.data_ptr<float>(), p.C = ops.C.data_ptr<float>();
  p.D = D ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias ? delta_bias->data_ptr<float>() : nullptr;
  p.initial = initial ? initial->data_ptr<float>() : nullptr;
  p.keep = keep ? keep->data_ptr<float>() : nullptr;
  p.softplus = delta_softplus;
  return p;
}

void check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                  const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& initial,
                  const OptTensor& keep) {
  lethe::check_scan_inputs("cpu", u, delta, A, B, C, D, z, delta_bias, initial, keep);
  check(u.device().is_cpu(), "tensors must be on the CPU");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                            const Tensor& C, const OptTensor& D, const OptTensor& z,
                                            const OptTensor& delta_bias, const OptTensor& initial_state,
                                            const OptTensor& keep, bool delta_softplus, int64_t chunk) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, keep);
  const StateOperands operands(A, B, C);
  const Problem p = make_problem(u, operands, A.size(1), D, delta_bias, initial_state, keep, delta_softplus, chunk);
  OutputPool& pool = OutputPool::instance();
  Tensor out = pool.empty_like(u);
  Tensor last = at::empty({p.batch, p.channels, p.d_state}, u.options().dtype(at::kFloat));
  Tensor saved = at::empty({p.batch, p.channels, p.n_chunks, p.d_state}, u.options().dtype(at::kFloat));
  Tensor out_pre = z ? pool.empty_like(u) : at::empty({0}, u.options());
  LETHE_DISPATCH_ROW_TYPES(u.scalar_type(), "lethe selective_scan (cpu kernel)", "inputs", [&] {
    const ForwardIO<scalar_t> io{u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), z ? z->data_ptr<scalar_t>() : nullptr,
                                 out.data_ptr<scalar_t>(), z ? out_pre.data_ptr<scalar_t>() : nullptr,
                                 last.data_ptr<float>(), saved.data_ptr<float>()};
    constexpr int64_t kRowsPerUnit = 4;
    const int64_t rows = p.batch * p.channels;
    for_each_unit((rows + kRowsPerUnit - 1) / kRowsPerUnit, [&] { return ForwardBuffers(p); },
                  [&](ForwardBuffers& buffers, int64_t unit, int64_t next_unit) {
                    const int64_t end = std::min(rows, (unit + 1) * kRowsPerUnit);
                    for (int64_t row = unit * kRowsPerUnit; row < end; ++row)
                      forward_row(p, io, row, row + 1 < end ? row + 1 : next_unit >= 0 ? next_unit * kRowsPerUnit : -1, buffers);
                  });
  });
  return {out, last, saved, out_pre};
}

// Channels per backward task: the largest of 64, 32, 16 that leaves at least 8 tasks, and at least
// lanes. dB/dC partial sums take batch x ceil(channels / group) x length x lanes floats (no more
// than batch x channels x length when the channels fill the groups); the larger the group, the
// fewer to add up (64 took 10% off the backward at batch 2 x 256 channels, against 16). Fixed by
// the shape alone, so the summation order (and the bits) never depend on the thread count.
int64_t channel_group(int64_t batch, int64_t channels, int64_t lanes) {
  int64_t group = 64;
  while (group > 16 && batch * ((channels + group - 1) / group) < 8) group /= 2;
  return std::max(group, lanes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> scan_bwd(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
    const OptTensor& z, const OptTensor& delta_bias, const OptTensor& initial_state, const OptTensor& keep,
    bool delta_softplus, int64_t chunk, const Tensor& saved, const Tensor& out_pre, const Tensor& grad_out,
    const OptTensor& grad_last) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, keep);
  const StateOperands operands(A, B, C);
  const Problem p = make_problem(u, operands, A.size(1), D, delta_bias, initial_state, keep, delta_softplus, chunk);
  check(saved.scalar_type() == at::kFloat && saved.is_contiguous() && saved.dim() == 4 && saved.size(2) == p.n_chunks, "saved chunk states do not match the inputs");
  check(!z || (out_pre.sizes() == u.sizes() && out_pre.scalar_type() == u.scalar_type() && out_pre.is_contiguous()), "the saved output before the gate does not match u");
  check(grad_out.scalar_type() == u.scalar_type() && grad_out.sizes() == u.sizes() && grad_out.is_contiguous(), "grad_out must have u's shape and dtype");
  check(!grad_last || (grad_last->scalar_type() == at::kFloat && grad_last->is_contiguous() && grad_last->numel() == p.batch * p.channels * p.d_state), "grad of the last state must be float32 (batch, channels, d_state)");

  const int64_t group = channel_group(p.batch, p.channels, p.lanes), n_groups = (p.channels + group - 1) / group;
  const auto f32 = u.options().dtype(at::kFloat);
  OutputPool& pool = OutputPool::instance();
  Tensor grad_u = pool.empty_like(u), grad_delta = pool.empty_like(u);
  Tensor grad_z = z ? pool.empty_like(u) : at::empty({0}, u.options());
  Tensor dA_rows = at::empty({p.batch, p.channels, p.d_state}, f32);
  Tensor dD_rows = at::empty({p.batch, p.channels}, f32), dbias_rows = at::empty({p.batch, p.channels}, f32);
  Tensor grad_initial = at::empty({p.batch, p.channels, p.d_state}, f32);
  Tensor grad_B = at::empty(B.sizes(), B.options()), grad_C = at::empty(C.sizes(), C.options());
  // dB and dC partial sums, (batch, n_groups, length, lanes) each, in a buffer kept across calls
  // up to 64 MB (a fresh multi-MB allocation costs a page fault per 4 KB on its first write).
  const int64_t part_size = p.batch * n_groups * p.length * p.lanes;
  constexpr int64_t kCachedFloats = int64_t{16} << 20;
  thread_local std::unique_ptr<Floats> part_cache;
  std::unique_ptr<Floats> part_once;
  std::unique_ptr<Floats>& part = 2 * part_size <= kCachedFloats ? part_cache : part_once;
  if (!part || part->size() < 2 * part_size) part = std::make_unique<Floats>(2 * part_size);
  float* const dB_part = part->data();
  float* const dC_part = dB_part + part_size;

  LETHE_DISPATCH_ROW_TYPES(u.scalar_type(), "lethe selective_scan (cpu kernel)", "inputs", [&] {
    const scalar_t* z_ptr = z ? z->data_ptr<scalar_t>() : nullptr;
    const scalar_t* out_pre_ptr = z ? out_pre.data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_z_ptr = z ? grad_z.data_ptr<scalar_t>() : nullptr;
    const float* grad_last_ptr = grad_last ? grad_last->data_ptr<float>() : nullptr;
    const BackwardIO<scalar_t> io{u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), z_ptr, out_pre_ptr,
                                  grad_out.data_ptr<scalar_t>(), grad_last_ptr, saved.data_ptr<float>(),
                                  grad_u.data_ptr<scalar_t>(), grad_delta.data_ptr<scalar_t>(), grad_z_ptr,
                                  dA_rows.data_ptr<float>(), dD_rows.data_ptr<float>(), dbias_rows.data_ptr<float>(),
                                  grad_initial.data_ptr<float>()};
    // One unit per (batch, channel group): its rows run in order, the first assigning the group's
    // dB/dC partial sums and the others adding to them.
    for_each_unit(p.batch * n_groups, [&] { return BackwardBuffers(p); },
                  [&](BackwardBuffers& buffers, int64_t task, int64_t next_task) {
                    const int64_t b = task / n_groups, first = (task % n_groups) * group;
                    const int64_t end = std::min(first + group, p.channels), offset = task * p.length * p.lanes;
                    const int64_t next_first_row = next_task / n_groups * p.channels + (next_task % n_groups) * group;
                    for (int64_t d = first; d < end; ++d) {
                      const int64_t row = b * p.channels + d;
                      backward_row(p, io, row, d + 1 < end ? row + 1 : next_task >= 0 ? next_first_row : -1, d == first,
                                   dB_part + offset, dC_part + offset, buffers);
                    }
                  });

    // Reduce the partial sums in a fixed order over channel groups (group 0 += group 1, += group
    // 2, ...: contiguous, vectorized), a block of steps per task, and write that block of dB and
    // dC out as (batch, d_state, length) in B's dtype while it is in L1.
    const int64_t slice = p.length * p.lanes, steps = 256, blocks = (p.length + steps - 1) / steps;
    at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, t0 = (task % blocks) * steps, t1 = std::min(t0 + steps, p.length);
        for (auto [part, out] : {std::pair{dB_part, &grad_B}, std::pair{dC_part, &grad_C}}) {
          float* __restrict__ total = part + b * n_groups * slice;
          for (int64_t g = 1; g < n_groups; ++g) {
            const float* __restrict__ group = total + g * slice;
            for (int64_t i = t0 * p.lanes; i < t1 * p.lanes; ++i) total[i] += group[i];
          }
          to_state_major(total, p.d_state, p.length, p.lanes, t0, t1, out->data_ptr<scalar_t>() + b * p.d_state * p.length);
        }
      }
    });
  });

  // The per-channel parameters' gradients sum over the batch.
  auto sum_over_batch = [&](const Tensor& rows) {  // (batch, k...) -> (k...), batch 0 first: fixed order
    const int64_t k = p.batch ? rows.numel() / p.batch : 0;
    Tensor total = at::zeros(rows.sizes().slice(1), f32);  // an empty batch sums to 0
    if (p.batch == 0) return total;
    const float* in = rows.data_ptr<float>();
    float* out = total.data_ptr<float>();
    std::copy(in, in + k, out);
    for (int64_t b = 1; b < p.batch; ++b)
      for (int64_t i = 0; i < k; ++i) out[i] += in[b * k + i];
    return total;
  };
  Tensor grad_D = D ? sum_over_batch(dD_rows) : at::empty({0}, f32);
  Tensor grad_bias = delta_bias ? sum_over_batch(dbias_rows) : at::empty({0}, f32);
  if (!initial_state) grad_initial = at::empty({0}, f32);
  return {grad_u, grad_delta, sum_over_batch(dA_rows), grad_B, grad_C, grad_D, grad_z, grad_bias, grad_initial};
}

}  // namespace

TORCH_LIBRARY(lethe_cpu, m) {
  m.def("scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "Tensor? initial_state, Tensor? keep, bool delta_softplus, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "Tensor? initial_state, Tensor? keep, bool delta_softplus, int chunk, Tensor saved, Tensor out_pre, Tensor grad_out, "
        "Tensor? grad_last) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lethe_cpu, CPU, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
}
