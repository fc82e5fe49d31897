// Row input and output of the CPU kernels (scan and conv): one (batch, channel) row's length
// of each (batch, channels, length) tensor, converted to and from float32.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cpu_vector_math.h"

namespace lethe_cpu {

// Runs the lambda with scalar_t the C++ type of `dtype`, one of the row types converted here;
// any other dtype fails naming the kernel (`who`) and the tensor (`what`).
#define LETHE_DISPATCH_ROW_TYPES(dtype, who, what, ...)                                            \
  switch (dtype) {                                                                                 \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                              \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }                    \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }                            \
    default: TORCH_CHECK(false, who, ": ", what, " must be float32, bfloat16 or float16");          \
  }

// Elementwise passes over a row run fn(t, tag) for t in [0, n): whole Vecs first (tag Vec{}),
// then the rest one float at a time (tag 0.0f). load_as / store_as read and write a T row at t
// as the tag's type, so one generic lambda serves both (and the Vec exp serves the gates).
template <typename Fn>
LETHE_INLINE void for_each_step(int64_t n, Fn&& fn) {
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) fn(t, Vec{});
  for (; t < n; ++t) fn(t, 0.0f);
}

#if defined(__AVX512F__)
// bfloat16 and float16 rows in whole vectors (an element at a time, the conversions took a third
// of the kernel's time with bfloat16 inputs). A bfloat16 is the top half of a float: widening is
// a shift, narrowing rounds to nearest even as c10::BFloat16 does (NaN -> 0x7fc0).
LETHE_INLINE Vec load_vec(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<Vec>(_mm512_slli_epi32(wide, 16));
}
LETHE_INLINE void store_vec(c10::BFloat16* p, Vec v) {
  const __m512i bits = reinterpret_cast<__m512i>(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), reinterpret_cast<__m512>(v), _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
LETHE_INLINE Vec load_vec(const c10::Half* p) {
  return reinterpret_cast<Vec>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
LETHE_INLINE void store_vec(c10::Half* p, Vec v) {
  const __m256i half = _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half);
}
#endif

template <typename T, typename V>
LETHE_INLINE V load_as(const T* p, V) {
  if constexpr (std::is_same_v<V, float>) {
    return static_cast<float>(*p);
  } else if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else {
#if defined(__AVX512F__)
    return load_vec(p);
#else
    Vec v;
    for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
    return v;
#endif
  }
}

template <typename T, typename V>
LETHE_INLINE void store_as(T* p, V v) {
  if constexpr (std::is_same_v<V, float>) {
    *p = static_cast<T>(v);
  } else if constexpr (std::is_same_v<T, float>) {
    store(p, v);
  } else {
#if defined(__AVX512F__)
    store_vec(p, v);
#else
    for (int i = 0; i < kLanes; ++i) p[i] = static_cast<T>(v[i]);
#endif
  }
}

// One (batch, channel) row converted to float32 in one pass: u, delta after bias and softplus,
// delta * u, and (slope not null, for the backward) d delta / d delta_raw, the sigmoid, from the
// softplus's own exp; without softplus the slope is left as it is (the backward's buffer holds 1).
template <typename T>
void load_row(const Problem& p, int64_t row, const T* u_in, const T* delta_in, float* __restrict__ u,
               float* __restrict__ delta, float* __restrict__ du, float* __restrict__ slope) {
  const T* __restrict__ u_row = u_in + row * p.length;
  const T* __restrict__ delta_row = delta_in + row * p.length;
  const float bias = p.delta_bias ? p.delta_bias[row % p.channels] : 0.0f;
  const auto pass = [&](auto softplus_on, auto want_slope) {
    for_each_step(p.length, [&](int64_t t, auto tag) {
      const auto u_t = load_as(u_row + t, tag), raw = load_as(delta_row + t, tag) + bias;
      auto delta_t = raw;
      if constexpr (decltype(softplus_on)::value) {
        const auto [value, slope_t] = softplus_and_slope(raw);
        delta_t = value;
        if constexpr (decltype(want_slope)::value) store_as(slope + t, slope_t);
      }
      store_as(u + t, u_t);
      store_as(delta + t, delta_t);
      store_as(du + t, delta_t * u_t);
    });
  };
  if (!p.softplus) pass(std::false_type{}, std::false_type{});
  else if (slope) pass(std::true_type{}, std::true_type{});
  else pass(std::true_type{}, std::false_type{});
}

// n values from one float type to another (a row to float32 and back).
template <typename From, typename To>
void convert(const From* in, int64_t n, To* out) {
  for_each_step(n, [&](int64_t t, auto tag) { store_as(out + t, load_as(in + t, tag)); });
}

// out[j * out_stride + i] = in[i * in_stride + j] for i < rows, j < cols, converting the type:
// whole kLanes x kLanes blocks through registers (at::copy_ of a transposed view took ~17 us for
// a 2 x 16 x 1024 tensor, and element loops with a strided side were slower still), the edges one
// element at a time.
template <typename From, typename To>
void transpose_copy(const From* __restrict__ in, int64_t in_stride, int64_t rows, int64_t cols, To* __restrict__ out,
                    int64_t out_stride) {
  const auto elements = [&](int64_t i_begin, int64_t i_end, int64_t j_begin) {
    for (int64_t i = i_begin; i < i_end; ++i)
      for (int64_t j = j_begin; j < cols; ++j) out[j * out_stride + i] = static_cast<To>(static_cast<float>(in[i * in_stride + j]));
  };
  int64_t i0 = 0;
  for (; i0 + kLanes <= rows; i0 += kLanes) {
    int64_t j0 = 0;
    for (; j0 + kLanes <= cols; j0 += kLanes) {
      Vec block[kLanes];
      for (int i = 0; i < kLanes; ++i) block[i] = load_as(in + (i0 + i) * in_stride + j0, Vec{});
      transpose(block);
      for (int j = 0; j < kLanes; ++j) store_as(out + (j0 + j) * out_stride + i0, block[j]);
    }
    elements(i0, i0 + kLanes, j0);  // the columns past the last whole block
  }
  elements(i0, rows, 0);  // the rows past the last whole block
}

// B or C of one batch, (d_state, length) in any float type, to the kernel's float32 (length,
// lanes) with zeros in the padding lanes.
template <typename T>
void to_time_major(const T* in, int64_t d_state, int64_t length, int64_t lanes, float* out) {
  transpose_copy(in, length, d_state, length, out, lanes);
  for (int64_t t = 0; t < length; ++t) std::fill(out + t * lanes + d_state, out + (t + 1) * lanes, 0.0f);
}

// Steps [t0, t1) of one batch's float32 (length, lanes) dB or dC to (d_state, length) in T.
template <typename T>
void to_state_major(const float* in, int64_t d_state, int64_t length, int64_t lanes, int64_t t0, int64_t t1, T* out) {
  transpose_copy(in + t0 * lanes, lanes, t1 - t0, d_state, out + t0, length);
}

// Rows are a page (4 KB) or so of each input, and the hardware prefetcher stops at page
// boundaries: each row would start with a run of cache misses. While one row computes, each
// chunk asks for the same steps of the next row's inputs, output lines (to write) and saved
// chunk state, so they are in L2 when that row starts. The backward's per-chunk load of the
// saved state was the costliest miss: prefetching it took 10% off the backward.
template <typename T>
LETHE_INLINE void prefetch(const T* begin, int64_t count, bool write) {
  if (!begin) return;
  const uintptr_t end = reinterpret_cast<uintptr_t>(begin + count);
  for (uintptr_t line = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63}; line < end; line += 64) {
    if (write) __builtin_prefetch(reinterpret_cast<const void*>(line), 1, 2);
    else __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
  }
}

// Steps [start, start + steps) of row `row` of (..., length) tensors: inputs to read, outputs to
// write (null ones skipped).
template <typename T>
LETHE_INLINE void prefetch_row(std::initializer_list<const T*> inputs, std::initializer_list<T*> outputs, int64_t row,
                               int64_t length, int64_t start, int64_t steps) {
  for (const T* in : inputs) prefetch(in ? in + row * length + start : nullptr, steps, false);
  for (T* out : outputs) prefetch(out ? out + row * length + start : nullptr, steps, true);
}

}  // namespace lethe_cpu
