// Torch face of the CUDA selective scan: checks tensors, allocates outputs, fills ScanParams
// and launches on the stream Python passes (lethe.ops.kernel_ops.launch_on_stream: the device guard).
// Ops: torch.ops.lethe_cuda.scan_fwd / scan_bwd. Built with -DLETHE_CUDA_EMULATION the same
// code registers torch.ops.lethe_cuda_emulated for CPU tensors, running the kernels' own
// source on CPU threads (kernels/cuda_emulation.h): the test suite's check of the CUDA
// algorithm on machines without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda_binding.h"
#include "scan_inputs.h"
#include "selective_scan_cuda.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using lethe_cuda::ScanParams;
using lethe_cuda_binding::as_stream;
using lethe_cuda_binding::float_ptr;
using lethe_cuda_binding::kOnCuda;

#ifdef LETHE_CUDA_EMULATION
#define LETHE_CUDA_LIBRARY lethe_cuda_emulated
#else
#define LETHE_CUDA_LIBRARY lethe_cuda
#endif

constexpr lethe_cuda_binding::Errors kErrors{"lethe selective_scan (cuda kernel)"};

void check(bool ok, const char* message) { kErrors.check(ok, message); }

// (outer, middle, inner) -> (outer, inner), summed over `middle` in order.
Tensor sum_middle(const Tensor& parts, int64_t outer, int64_t middle, int64_t inner, int64_t stream) {
  return lethe_cuda_binding::sum_middle(lethe_cuda::reduce_middle, kErrors, parts, outer, middle, inner, stream);
}

ScanParams make_params(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                       const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& initial,
                       const OptTensor& keep, bool delta_softplus, int64_t chunk) {
  lethe::check_scan_inputs("cuda", u, delta, A, B, C, D, z, delta_bias, initial, keep);
  check(u.is_cuda() == kOnCuda, kOnCuda ? "tensors must be on a CUDA device" : "the emulation takes CPU tensors");
  check(chunk == lethe_cuda::kChunk, "chunk does not match the kernel's (lethe_cuda::kChunk)");
  check(u.size(0) <= 65535, "batch must be <= 65535 (the grid's y dimension)");
  check(A.size(1) <= 2048, "d_state must be <= 2048 (the carried states live in shared memory)");

  ScanParams p;
  p.batch = u.size(0), p.channels = u.size(1), p.length = u.size(2), p.d_state = A.size(1);
  p.n_chunks = (p.length + chunk - 1) / chunk;
  p.dtype = lethe_cuda_binding::dtype_of<lethe_cuda::Dtype>(u, kErrors, "inputs");
  p.softplus = delta_softplus;
  p.u = u.data_ptr(), p.delta = delta.data_ptr(), p.B = B.data_ptr(), p.C = C.data_ptr();
  p.z = z ? z->data_ptr() : nullptr;
  p.A = A.data_ptr<float>(), p.D = float_ptr(D), p.delta_bias = float_ptr(delta_bias), p.initial = float_ptr(initial);
  p.keep = float_ptr(keep);
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                                    const Tensor& C, const OptTensor& D, const OptTensor& z,
                                                    const OptTensor& delta_bias, const OptTensor& initial_state,
                                                    const OptTensor& keep, bool delta_softplus, int64_t chunk,
                                                    int64_t stream) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus, chunk);
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor out = at::empty_like(u);
  Tensor out_pre = z ? at::empty_like(u) : at::empty({0}, u.options());
  Tensor last = at::empty({p.batch, p.channels, p.d_state}, f32);
  Tensor saved = at::empty({p.batch, p.channels, p.n_chunks, p.d_state}, f32);
  p.out = out.data_ptr(), p.out_pre = z ? out_pre.data_ptr() : nullptr;
  p.last = last.data_ptr<float>(), p.saved = saved.data_ptr<float>();
  kErrors.check_launch(lethe_cuda::scan_forward(p, as_stream(stream)));
  return {out, last, saved, out_pre};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> scan_bwd(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
    const OptTensor& z, const OptTensor& delta_bias, const OptTensor& initial_state, const OptTensor& keep,
    bool delta_softplus, int64_t chunk, const Tensor& saved, const Tensor& out_pre, const Tensor& grad_out,
    const OptTensor& grad_last, int64_t stream) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus, chunk);
  check(saved.scalar_type() == at::kFloat && saved.is_contiguous() && saved.numel() == p.batch * p.channels * p.n_chunks * p.d_state, "saved chunk states do not match the inputs");
  check(!z || (out_pre.sizes() == u.sizes() && out_pre.scalar_type() == u.scalar_type() && out_pre.is_contiguous()), "the saved output before the gate does not match u");
  check(grad_out.scalar_type() == u.scalar_type() && grad_out.sizes() == u.sizes() && grad_out.is_contiguous(), "grad_out must have u's shape and dtype");
  check(!grad_last || (grad_last->scalar_type() == at::kFloat && grad_last->is_contiguous() && grad_last->numel() == p.batch * p.channels * p.d_state), "grad of the last state must be float32 (batch, channels, d_state)");

  p.channel_group = lethe_cuda::backward_channel_group(p.batch, p.channels, p.d_state);
  p.n_groups = (p.channels + p.channel_group - 1) / p.channel_group;
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t N = p.d_state, L = p.length;
  Tensor grad_u = at::empty_like(u), grad_delta = at::empty_like(u);
  Tensor grad_z = z ? at::empty_like(u) : at::empty({0}, u.options());
  Tensor dA_rows = at::empty({p.batch, p.channels, N}, f32);
  Tensor dD_rows = at::empty({p.batch, p.channels}, f32), dbias_rows = at::empty({p.batch, p.channels}, f32);
  Tensor grad_initial = at::empty({p.batch, p.channels, N}, f32);
  Tensor dB_part = at::empty({p.batch, p.n_groups, N, L}, f32), dC_part = at::empty_like(dB_part);
  p.saved = saved.data_ptr<float>();
  p.out_pre = z ? out_pre.data_ptr() : nullptr;
  p.grad_out = grad_out.data_ptr(), p.grad_last = float_ptr(grad_last);
  p.grad_u = grad_u.data_ptr(), p.grad_delta = grad_delta.data_ptr(), p.grad_z = z ? grad_z.data_ptr() : nullptr;
  p.dA_rows = dA_rows.data_ptr<float>(), p.dD_rows = dD_rows.data_ptr<float>(), p.dbias_rows = dbias_rows.data_ptr<float>();
  p.grad_initial = grad_initial.data_ptr<float>();
  p.dB_part = dB_part.data_ptr<float>(), p.dC_part = dC_part.data_ptr<float>();
  kErrors.check_launch(lethe_cuda::scan_backward(p, as_stream(stream)));

  // Partial sums, reduced in a fixed order: over channel groups (dB, dC), over the batch (the rest).
  Tensor grad_B = sum_middle(dB_part, p.batch, p.n_groups, N * L, stream).view({p.batch, N, L});
  Tensor grad_C = sum_middle(dC_part, p.batch, p.n_groups, N * L, stream).view({p.batch, N, L});
  Tensor grad_A = sum_middle(dA_rows, 1, p.batch, p.channels * N, stream).view({p.channels, N});
  Tensor grad_D = D ? sum_middle(dD_rows, 1, p.batch, p.channels, stream).view({p.channels}) : at::empty({0}, f32);
  Tensor grad_bias = delta_bias ? sum_middle(dbias_rows, 1, p.batch, p.channels, stream).view({p.channels}) : at::empty({0}, f32);
  if (!initial_state) grad_initial = at::empty({0}, f32);
  return {grad_u, grad_delta, grad_A, grad_B.to(B.scalar_type()), grad_C.to(C.scalar_type()), grad_D, grad_z, grad_bias, grad_initial};
}

}  // namespace

TORCH_LIBRARY(LETHE_CUDA_LIBRARY, m) {
  m.def("scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "Tensor? initial_state, Tensor? keep, bool delta_softplus, int chunk, int stream) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "Tensor? initial_state, Tensor? keep, bool delta_softplus, int chunk, Tensor saved, Tensor out_pre, Tensor grad_out, "
        "Tensor? grad_last, int stream) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(LETHE_CUDA_LIBRARY, LETHE_CUDA_DISPATCH_KEY, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
}
