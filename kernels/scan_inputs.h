// The input checks both kernels' torch bindings make. lethe.ops.scan_kernels hands over
// contiguous tensors on one device: u, delta, B, C, z in u's dtype; A, D, delta_bias and
// initial_state float32. A failed check names the kernel and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace lethe {

inline void check_scan_inputs(const char* kernel, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                              const std::optional<at::Tensor>& initial, const std::optional<at::Tensor>& keep) {
  auto check = [kernel](bool ok, const char* message) {
    TORCH_CHECK(ok, "lethe selective_scan (", kernel, " kernel): ", message);
  };
  check(u.dim() == 3 && u.size(2) >= 1, "u must be (batch, channels, length) with length >= 1");
  for (const at::Tensor* t : {&u, &delta, &B, &C, &A})
    check(t->is_contiguous() && t->device() == u.device(), "u, delta, A, B, C must be contiguous and on one device");
  for (const at::Tensor* t : {&delta, &B, &C}) check(t->scalar_type() == u.scalar_type(), "delta, B, C must have u's dtype");
  check(delta.sizes() == u.sizes(), "delta must have u's shape");
  check(A.scalar_type() == at::kFloat && A.dim() == 2 && A.size(0) == u.size(1), "A must be float32 (channels, d_state)");
  for (const at::Tensor* t : {&B, &C})
    check(t->dim() == 3 && t->size(0) == u.size(0) && t->size(1) == A.size(1) && t->size(2) == u.size(2),
          "B and C must be (batch, d_state, length)");
  for (const std::optional<at::Tensor>* t : {&D, &delta_bias})
    check(!*t || ((*t)->scalar_type() == at::kFloat && (*t)->numel() == u.size(1) && (*t)->is_contiguous()),
          "D and delta_bias must be float32 (channels,)");
  check(!z || (z->scalar_type() == u.scalar_type() && z->sizes() == u.sizes() && z->is_contiguous()),
        "z must have u's shape and dtype");
  check(!initial || (initial->scalar_type() == at::kFloat && initial->dim() == 3 && initial->size(0) == u.size(0) &&
                     initial->size(1) == u.size(1) && initial->size(2) == A.size(1) && initial->is_contiguous()),
        "initial_state must be float32 (batch, channels, d_state)");
  check(!keep || (keep->scalar_type() == at::kFloat && keep->dim() == 2 && keep->size(0) == u.size(0) &&
                  keep->size(1) == u.size(2) && keep->is_contiguous() && keep->device() == u.device()),
        "keep (the document starts) must be float32 (batch, length)");
}

}  // namespace lethe
