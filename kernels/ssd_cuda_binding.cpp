// Torch face of the CUDA SSD scan: checks tensors, allocates outputs, fills SsdParams and
// launches on the stream Python passes (lethe.ops.kernel_ops.launch_on_stream: the device guard).
// Ops: torch.ops.lethe_ssd_cuda::ssd_fwd / ssd_bwd. Built with -DLETHE_CUDA_EMULATION the same
// code registers torch.ops.lethe_ssd_cuda_emulated for CPU tensors, running the kernels' own
// source on CPU threads (kernels/cuda_emulation.h): the test suite's check of the CUDA
// algorithm on machines without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda_binding.h"
#include "ssd_cuda.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using lethe_cuda_binding::as_stream;
using lethe_cuda_binding::float_ptr;
using lethe_cuda_binding::kOnCuda;
using lethe_ssd_cuda::SsdParams;

#ifdef LETHE_CUDA_EMULATION
#define LETHE_SSD_LIBRARY lethe_ssd_cuda_emulated
#else
#define LETHE_SSD_LIBRARY lethe_ssd_cuda
#endif

constexpr lethe_cuda_binding::Errors kErrors{"lethe ssd_scan (cuda kernel)"};

void check(bool ok, const char* message) { kErrors.check(ok, message); }

// (outer, middle, inner) -> (outer, inner), summed over `middle` in order.
Tensor sum_middle(const Tensor& parts, int64_t outer, int64_t middle, int64_t inner, int64_t stream) {
  return lethe_cuda_binding::sum_middle(lethe_ssd_cuda::reduce_middle, kErrors, parts, outer, middle, inner, stream);
}

// Contiguous, on x's device, float32 where `f32`, with these sizes.
bool fits(const Tensor& t, const Tensor& x, at::IntArrayRef sizes, bool f32) {
  return t.is_contiguous() && t.device() == x.device() && t.sizes() == sizes && (f32 ? t.scalar_type() == at::kFloat : t.scalar_type() == x.scalar_type());
}

SsdParams make_params(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
                      const OptTensor& initial, const OptTensor& keep, int64_t segment) {
  check(x.dim() == 4 && x.size(1) >= 1 && x.is_contiguous(), "x must be contiguous (batch, length, nheads, headdim), length >= 1");
  check(x.is_cuda() == kOnCuda, kOnCuda ? "tensors must be on a CUDA device" : "the emulation takes CPU tensors");
  check(segment == lethe_ssd_cuda::kSegment, "segment does not match the kernel's (lethe_ssd_cuda::kSegment)");
  const int64_t batch = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  check(B.dim() == 4 && B.size(2) >= 1 && H % B.size(2) == 0, "B must be (batch, length, ngroups, d_state), ngroups dividing nheads");
  const int64_t G = B.size(2), N = B.size(3);
  check(fits(B, x, {batch, L, G, N}, false) && fits(C, x, {batch, L, G, N}, false), "B and C must be contiguous (batch, length, ngroups, d_state) in x's dtype");
  check(fits(dt, x, {batch, L, H}, true), "dt must be float32 (batch, length, nheads)");
  check(fits(A, x, {H}, true), "A must be float32 (nheads,)");
  check(!D || fits(*D, x, {H}, true) || fits(*D, x, {H, P}, true), "D must be float32 (nheads,) or (nheads, headdim)");
  check(!initial || fits(*initial, x, {batch, H, P, N}, true), "initial_state must be float32 (batch, nheads, headdim, d_state)");
  check(!keep || fits(*keep, x, {batch, L}, true), "keep (the document starts) must be float32 (batch, length)");
  check(N >= 1 && N <= lethe_ssd_cuda::kMaxDState, "d_state must be in 1..256 (a state row spans at most 32 threads)");
  check(P >= 1 && batch <= 65535, "headdim must be >= 1 and batch <= 65535 (the grid's y dimension)");

  SsdParams p;
  p.batch = batch, p.length = L, p.nheads = H, p.headdim = P, p.ngroups = G, p.d_state = N;
  p.n_segments = (L + segment - 1) / segment;
  p.dtype = lethe_cuda_binding::dtype_of<lethe_ssd_cuda::Dtype>(x, kErrors, "x, B, C");
  p.x = x.data_ptr(), p.B = B.data_ptr(), p.C = C.data_ptr();
  p.dt = dt.data_ptr<float>(), p.A = A.data_ptr<float>(), p.D = float_ptr(D), p.initial = float_ptr(initial);
  p.D_per_row = D && D->dim() == 2;
  p.keep = float_ptr(keep);
  return p;
}

std::tuple<Tensor, Tensor, Tensor> ssd_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                                           const OptTensor& D, const OptTensor& initial_state, const OptTensor& keep, int64_t segment,
                                           int64_t stream) {
  SsdParams p = make_params(x, dt, A, B, C, D, initial_state, keep, segment);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor last = at::empty({p.batch, p.nheads, p.headdim, p.d_state}, f32);
  Tensor saved = at::empty({p.batch, p.nheads, p.n_segments, p.headdim, p.d_state}, f32);
  p.y = y.data_ptr(), p.last = last.data_ptr<float>(), p.saved = saved.data_ptr<float>();
  kErrors.check_launch(lethe_ssd_cuda::ssd_forward(p, as_stream(stream)));
  return {y, last, saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ssd_bwd(
    const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
    const OptTensor& initial_state, const OptTensor& keep, int64_t segment, const Tensor& saved, const Tensor& grad_y,
    const OptTensor& grad_last, int64_t stream) {
  SsdParams p = make_params(x, dt, A, B, C, D, initial_state, keep, segment);
  const int64_t batch = p.batch, L = p.length, H = p.nheads, P = p.headdim, G = p.ngroups, N = p.d_state;
  check(fits(saved, x, {batch, H, p.n_segments, P, N}, true), "saved states do not match the inputs");
  check(fits(grad_y, x, x.sizes(), false), "grad_y must have x's shape and dtype");
  check(!grad_last || fits(*grad_last, x, {batch, H, P, N}, true), "grad of the last state must be float32 (batch, nheads, headdim, d_state)");

  p.heads_per_block = lethe_ssd_cuda::backward_heads_per_block(batch, H, G, P, N);
  p.n_splits = (H / G + p.heads_per_block - 1) / p.heads_per_block;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_x = at::empty_like(x), grad_dt = at::empty_like(dt);
  Tensor dA_rows = at::empty({batch, H}, f32);
  Tensor dD_rows = D ? at::empty({batch, H * P}, f32) : at::empty({0}, f32);
  Tensor grad_initial = at::empty({batch, H, P, N}, f32);  // also the kernel's workspace
  Tensor dB_part = at::empty({batch, p.n_splits, L, G, N}, f32), dC_part = at::empty_like(dB_part);
  p.saved = saved.data_ptr<float>();
  p.grad_y = grad_y.data_ptr(), p.grad_last = float_ptr(grad_last);
  p.grad_x = grad_x.data_ptr(), p.grad_dt = grad_dt.data_ptr<float>(), p.dA_rows = dA_rows.data_ptr<float>();
  p.dD_rows = D ? dD_rows.data_ptr<float>() : nullptr;
  p.grad_initial = grad_initial.data_ptr<float>();
  p.dB_part = dB_part.data_ptr<float>(), p.dC_part = dC_part.data_ptr<float>();
  kErrors.check_launch(lethe_ssd_cuda::ssd_backward(p, as_stream(stream)));

  // Partial sums, reduced in a fixed order: over the blocks of a group (dB, dC), over the batch
  // (dA, dD), then over headdim for a per-head D.
  Tensor grad_B = sum_middle(dB_part, batch, p.n_splits, L * G * N, stream).view({batch, L, G, N});
  Tensor grad_C = sum_middle(dC_part, batch, p.n_splits, L * G * N, stream).view({batch, L, G, N});
  Tensor grad_A = sum_middle(dA_rows, 1, batch, H, stream).view({H});
  Tensor grad_D = at::empty({0}, f32);
  if (D) {
    grad_D = sum_middle(dD_rows, 1, batch, H * P, stream);
    grad_D = p.D_per_row ? grad_D.view({H, P}) : sum_middle(grad_D, H, P, 1, stream).view({H});
  }
  if (!initial_state) grad_initial = at::empty({0}, f32);
  return {grad_x, grad_dt, grad_A, grad_B.to(B.scalar_type()), grad_C.to(C.scalar_type()), grad_D, grad_initial};
}

}  // namespace

TORCH_LIBRARY(LETHE_SSD_LIBRARY, m) {
  m.def("ssd_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state, Tensor? keep, "
        "int segment, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("ssd_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state, Tensor? keep, "
        "int segment, Tensor saved, Tensor grad_y, Tensor? grad_last, int stream) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(LETHE_SSD_LIBRARY, LETHE_CUDA_DISPATCH_KEY, m) {
  m.impl("ssd_fwd", &ssd_fwd);
  m.impl("ssd_bwd", &ssd_bwd);
}
