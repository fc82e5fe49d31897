// Causal depthwise conv1d for CPU tensors (Mamba's short convolution): bias and SiLU fused,
// forward and backward, an optional initial state (the width-1 inputs before the sequence:
// decoding or a carried segment) and the final state.
//
//   out[b, c, t] = act(bias[c] + sum_k w[c, k] x[b, c, t - (W - 1) + k]),  x[.., t < 0] from the state
//
// x, out: (batch, channels, length) contiguous, float32 / bfloat16 / float16 (math in float32);
// weight (channels, W) and bias (channels,) float32; states (batch, channels, W - 1) float32.
// Packed documents: tap_mask (batch, W, length) float32, 1 where tap k of step t reads the step's
// own document and 0 where it would reach into the previous one (a document's first steps see
// zeros there, as if it were alone).
// Threaded over (batch, channel) rows; each row is converted once into a float buffer padded on
// the left with its state, and every output step is a W-term dot product, vectorized over time.
// Backward recomputes the pre-activation (nothing but the inputs is saved). The weight and bias
// gradients are per-row partial sums added over the batch in a fixed order: bit-identical
// across runs and thread counts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu_row_io.h"
#include "cpu_vector_math.h"

namespace lethe_cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr int64_t kMaxWidth = 8;

struct ConvProblem {
  int64_t batch, channels, length, width;
  const float* weight;  // (channels, width)
  const float* bias;    // (channels,) or null
  const float* init;    // (batch, channels, width - 1) or null
  const float* mask;    // (batch, width, length) or null
  bool silu;
};

// Tap k's mask over row `row`'s steps, or null: every tap reads.
inline const float* tap_mask(const ConvProblem& p, int64_t row, int64_t k) {
  return p.mask ? p.mask + ((row / p.channels) * p.width + k) * p.length : nullptr;
}

// The row's inputs as float32 after its width-1 state: padded[width - 1 + t] = x[t].
template <typename T>
void load_padded(const ConvProblem& p, int64_t row, const T* x, float* padded) {
  const int64_t keep = p.width - 1;
  if (p.init) std::copy(p.init + row * keep, p.init + (row + 1) * keep, padded);
  else std::fill(padded, padded + keep, 0.0f);
  convert(x + row * p.length, p.length, padded + keep);
}

// pre[t] = bias + sum_k w[k] padded[t + k] (times tap k's mask at t): the dot product each output step takes.
template <typename V>
LETHE_INLINE V pre_activation(const ConvProblem& p, int64_t row, const float* padded, const float* w, float bias, int64_t t, V tag) {
  V acc = tag + bias;
  for (int64_t k = 0; k < p.width; ++k) {
    const float* mask = tap_mask(p, row, k);
    acc += mask ? w[k] * load_as(padded + t + k, tag) * load_as(mask + t, tag) : w[k] * load_as(padded + t + k, tag);
  }
  return acc;
}

template <typename T>
void forward_row(const ConvProblem& p, int64_t row, const T* x, T* out, float* final_state, Floats& padded) {
  load_padded(p, row, x, padded.data());
  const float* w = p.weight + (row % p.channels) * p.width;
  const float bias = p.bias ? p.bias[row % p.channels] : 0.0f;
  T* y = out + row * p.length;
  for_each_step(p.length, [&](int64_t t, auto tag) {
    auto acc = pre_activation(p, row, padded.data(), w, bias, t, tag);
    if (p.silu) acc = acc * sigmoid(acc);
    store_as(y + t, acc);
  });
  if (final_state) std::copy(padded.data() + p.length, padded.data() + p.length + p.width - 1, final_state + row * (p.width - 1));
}

struct RowGrads {
  float* weight;  // (rows, width): this row's part of d weight
  float* bias;    // (rows,)
  float* init;    // (rows, width - 1) or null
};

// d pre[t], then d of every padded input: padded[t + k] fed output t through weight k (and
// tap k's mask), so grad[t + k] += w[k] dpre[t] mask_k[t] (a vector add per tap); d x is grad
// past the state, d of the initial state its first width-1 entries, and the gradient of the final
// state (padded[L .. L + width - 1)) adds where those inputs are. d w[k] = sum_t dpre[t] mask_k[t]
// padded[t + k] and d bias = sum_t dpre[t], each summed in one fixed order.
template <typename T>
void backward_row(const ConvProblem& p, int64_t row, const T* x, const T* grad_out, const float* grad_final, T* grad_x,
                  const RowGrads& grads, Floats& padded, Floats& g) {
  const int64_t keep = p.width - 1, L = p.length;
  load_padded(p, row, x, padded.data());
  const float* w = p.weight + (row % p.channels) * p.width;
  const float bias = p.bias ? p.bias[row % p.channels] : 0.0f;
  const T* dy = grad_out + row * L;
  float* dpre = g.data();            // (L)
  float* grad = g.data() + L + kLanes;  // (L + keep): the gradient of padded
  for_each_step(L, [&](int64_t t, auto tag) {
    auto d = load_as(dy + t, tag);
    if (p.silu) {  // d silu(a) / da = s (1 + a (1 - s)), s = sigmoid(a)
      const auto a = pre_activation(p, row, padded.data(), w, bias, t, tag);
      const auto s = sigmoid(a);
      d = d * s * (1.0f + a * (1.0f - s));
    }
    store_as(dpre + t, d);
  });
  std::fill(grad, grad + L + keep, 0.0f);
  if (grad_final)
    for (int64_t i = 0; i < keep; ++i) grad[L + i] += grad_final[row * keep + i];
  for (int64_t k = 0; k < p.width; ++k) {
    const float* mask = tap_mask(p, row, k);
    const float wk = w[k];
    float* __restrict__ out = grad + k;
    for_each_step(L, [&](int64_t t, auto tag) {
      auto d = wk * load_as(dpre + t, tag);
      if (mask) d = d * load_as(mask + t, tag);
      store_as(out + t, load_as(out + t, tag) + d);
    });
    Vec acc{};
    float tail = 0.0f;
    for_each_step(L, [&](int64_t t, auto tag) {
      auto d = load_as(dpre + t, tag) * load_as(padded.data() + t + k, tag);
      if (mask) d = d * load_as(mask + t, tag);
      if constexpr (std::is_same_v<decltype(tag), float>) tail += d;
      else acc += d;
    });
    grads.weight[row * p.width + k] = lane_sum(acc) + tail;
  }
  convert(grad + keep, L, grad_x + row * L);
  if (grads.init) std::copy(grad, grad + keep, grads.init + row * keep);
  Vec acc{};
  float tail = 0.0f;
  for_each_step(L, [&](int64_t t, auto tag) {
    if constexpr (std::is_same_v<decltype(tag), float>) tail += dpre[t];
    else acc += load(dpre + t);
  });
  grads.bias[row] = lane_sum(acc) + tail;
}

void check(bool ok, const char* message) { TORCH_CHECK(ok, "lethe causal_conv1d (cpu kernel): ", message); }

ConvProblem make_problem(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& init,
                         const OptTensor& mask, bool silu) {
  check(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous (batch, channels, length) CPU tensor");
  check(x.size(2) >= 1, "length must be at least 1");
  check(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
        "weight must be float32 (channels, width)");
  check(weight.size(1) >= 1 && weight.size(1) <= kMaxWidth, "width must be in 1..8");
  check(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == x.size(1) && bias->is_contiguous()),
        "bias must be float32 (channels,)");
  const int64_t keep = weight.size(1) - 1;
  check(!init || (init->scalar_type() == at::kFloat && init->dim() == 3 && init->size(0) == x.size(0) &&
                  init->size(1) == x.size(1) && init->size(2) == keep && init->is_contiguous()),
        "initial_states must be float32 (batch, channels, width - 1)");
  check(!mask || (mask->scalar_type() == at::kFloat && mask->dim() == 3 && mask->size(0) == x.size(0) &&
                  mask->size(1) == weight.size(1) && mask->size(2) == x.size(2) && mask->is_contiguous()),
        "tap_mask (the document starts) must be float32 (batch, width, length)");
  return {x.size(0), x.size(1), x.size(2), weight.size(1), weight.data_ptr<float>(),
          bias ? bias->data_ptr<float>() : nullptr, init ? init->data_ptr<float>() : nullptr,
          mask ? mask->data_ptr<float>() : nullptr, silu};
}

// Rows of the problem in parallel, with per-thread row buffers.
template <typename Fn>
void for_each_row(const ConvProblem& p, int64_t extra, Fn&& fn) {
  at::parallel_for(0, p.batch * p.channels, 16, [&](int64_t begin, int64_t end) {
    Floats padded(p.length + p.width - 1 + kLanes), g(2 * (p.length + kLanes) + p.width + extra);
    for (int64_t row = begin; row < end; ++row) fn(row, padded, g);
  });
}

std::tuple<Tensor, Tensor> conv_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& init,
                                    const OptTensor& mask, bool silu, bool return_final) {
  const ConvProblem p = make_problem(x, weight, bias, init, mask, silu);
  Tensor out = at::empty_like(x);
  Tensor final_state = return_final ? at::empty({p.batch, p.channels, p.width - 1}, x.options().dtype(at::kFloat))
                                    : at::empty({0}, x.options().dtype(at::kFloat));
  LETHE_DISPATCH_ROW_TYPES(x.scalar_type(), "lethe causal_conv1d (cpu kernel)", "x", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    float* fs = return_final ? final_state.data_ptr<float>() : nullptr;
    for_each_row(p, 0, [&](int64_t row, Floats& padded, Floats&) { forward_row(p, row, in, y, fs, padded); });
  });
  return {out, final_state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                    const OptTensor& init, const OptTensor& mask, bool silu,
                                                    const Tensor& grad_out, const OptTensor& grad_final) {
  const ConvProblem p = make_problem(x, weight, bias, init, mask, silu);
  check(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() && grad_out.is_contiguous(),
        "grad_out must have x's shape and dtype");
  const int64_t keep = p.width - 1, rows = p.batch * p.channels;
  check(!grad_final || (grad_final->scalar_type() == at::kFloat && grad_final->numel() == rows * keep &&
                        grad_final->is_contiguous()),
        "grad of the final states must be float32 (batch, channels, width - 1)");
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_x = at::empty_like(x);
  Tensor weight_rows = at::empty({p.batch, p.channels, p.width}, f32), bias_rows = at::empty({p.batch, p.channels}, f32);
  Tensor grad_init = init ? at::empty({p.batch, p.channels, keep}, f32) : at::empty({0}, f32);
  const RowGrads grads{weight_rows.data_ptr<float>(), bias_rows.data_ptr<float>(), init ? grad_init.data_ptr<float>() : nullptr};
  LETHE_DISPATCH_ROW_TYPES(x.scalar_type(), "lethe causal_conv1d (cpu kernel)", "x", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* dy = grad_out.data_ptr<scalar_t>();
    scalar_t* dx = grad_x.data_ptr<scalar_t>();
    const float* df = grad_final ? grad_final->data_ptr<float>() : nullptr;
    for_each_row(p, 0, [&](int64_t row, Floats& padded, Floats& g) { backward_row(p, row, in, dy, df, dx, grads, padded, g); });
  });
  // the per-channel parameters' gradients: the rows' partial sums over the batch, batch 0 first
  auto sum_over_batch = [&](const Tensor& parts) {
    Tensor total = at::zeros(parts.sizes().slice(1), f32);
    const int64_t k = total.numel();
    const float* in = parts.data_ptr<float>();
    float* out = total.data_ptr<float>();
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t i = 0; i < k; ++i) out[i] += in[b * k + i];
    return total;
  };
  Tensor grad_bias = bias ? sum_over_batch(bias_rows) : at::empty({0}, f32);
  return {grad_x, sum_over_batch(weight_rows), grad_bias, grad_init};
}

}  // namespace
}  // namespace lethe_cpu

TORCH_LIBRARY(lethe_conv_cpu, m) {
  m.def("conv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, Tensor? tap_mask, bool silu, "
        "bool return_final) -> (Tensor, Tensor)");
  m.def("conv_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, Tensor? tap_mask, bool silu, "
        "Tensor grad_out, Tensor? grad_final) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lethe_conv_cpu, CPU, m) {
  m.impl("conv_fwd", &lethe_cpu::conv_fwd);
  m.impl("conv_bwd", &lethe_cpu::conv_bwd);
}
