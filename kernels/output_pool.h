// Output tensors whose memory stays mapped between calls. A fresh multi-MB allocation is new
// pages from the OS, and the first write to each 4 KB page is a page fault: at batch 2, 256
// channels, length 1024, the kernel's five (batch, channels, length) outputs took ~1 ms of
// faults per forward+backward, a fifth of its time. Blocks of freed outputs go back to a small
// pool (at most kMaxFreeBytes) instead of to the OS, and the next call with the same shapes
// reuses them, like the CUDA caching allocator does for GPU memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace lethe_cpu {

class OutputPool {
 public:
  static constexpr size_t kMaxFreeBytes = size_t{256} << 20;

  // Never destroyed: tensors may die during interpreter shutdown, after static destructors ran.
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  // An uninitialized tensor like `like` (contiguous), from a pooled block when one fits exactly.
  at::Tensor empty_like(const at::Tensor& like) {
    const size_t bytes = ((like.numel() * like.element_size() + 63) / 64) * 64;
    if (bytes == 0) return at::empty(like.sizes(), like.options());
    void* block = take(bytes);
    if (!block) block = std::aligned_alloc(64, bytes);
    TORCH_CHECK(block, "lethe selective_scan (cpu kernel): out of memory allocating ", bytes, " bytes");
    return at::from_blob(block, like.sizes(), [this, bytes](void* p) { give(p, bytes); }, like.options());
  }

  // The same for `sizes` and `options`: a one-element tensor expanded to them stands in for `like`.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return empty_like(at::empty({}, options).expand(sizes));
  }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* block = it->second;
    free_.erase(it);
    free_bytes_ -= bytes;
    return block;
  }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_bytes_ + bytes <= kMaxFreeBytes) {
        free_.emplace(bytes, block);
        free_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // block size -> free blocks of that size
  size_t free_bytes_ = 0;
};

}  // namespace lethe_cpu
