// Vector math of the CPU selective-scan kernel: fixed-width float vectors (GCC/Clang vector
// extensions, so the same code is AVX2 on x86 and NEON on ARM) and branch-free exp, softplus,
// sigmoid that work on a float or a vector: exp within 2 ulp, the decays exp(delta A) within the
// rounding of delta A itself (tests/test_cpu_vector_math.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <memory>
#include <type_traits>
#include <utility>

// Inlined everywhere, so a loop over time that calls them vectorizes.
#define LETHE_INLINE inline __attribute__((always_inline))

namespace lethe_cpu {

// d_state is padded to a multiple of kLanes (A = 0, B = C = 0, state 0 in the padding: the
// padded states stay 0 and add nothing), so every loop over it is a whole number of Vec steps.
// Vec is a GCC/Clang vector of kLanes floats, one register where the CPU has 512-bit vectors
// (AVX-512: d_state 16 is one register) and two AVX2 / four NEON registers otherwise; aligned
// like a float so it loads from any float array.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(alignof(int32_t))));
LETHE_INLINE Vec load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
LETHE_INLINE void store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
LETHE_INLINE float lane_sum(Vec v) {  // halving vector adds, then 4 scalars
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(v));
  for (int64_t width = kLanes / 2; width >= 4; width /= 2)
    for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
}

// y[i] += the sum of sums[i]'s lanes, for kLanes consecutive steps at once: a tree of
// half-vector folds (each fold adds the low and high halves of every segment of two vectors)
// leaves the kLanes totals in one vector. ~3 vector ops per step instead of a scalar reduction
// each (the same totals as lane_sum, added in another order).
namespace detail {
// Lanes I... of x's kLanes lanes followed by y's (one two-source shuffle).
template <int... I>
LETHE_INLINE Vec shuffle(Vec x, Vec y) {
#if defined(__clang__)
  return __builtin_shufflevector(x, y, I...);
#else  // GCC's own spelling: __builtin_shufflevector only exists from GCC 12
  return __builtin_shuffle(x, y, IntVec{I...});
#endif
}
// Output lane i of a fold of x and y whose segments (one step's partial sums) are S lanes wide:
// output segments (S / 2 wide) alternate between x's and y's, `high` picks each half.
constexpr int fold_index(int S, int i, bool high) {
  const int half = S / 2, segment = i / half;
  return (segment % 2) * kLanes + (segment / 2) * S + i % half + (high ? half : 0);
}
template <int S, std::size_t... I>
LETHE_INLINE Vec fold(Vec x, Vec y, std::index_sequence<I...>) {
  return shuffle<fold_index(S, I, false)...>(x, y) + shuffle<fold_index(S, I, true)...>(x, y);
}
template <int S>
LETHE_INLINE void fold_level(Vec* v, int count) {
  for (int i = 0; i < count / 2; ++i) v[i] = fold<S>(v[2 * i], v[2 * i + 1], std::make_index_sequence<kLanes>{});
  if constexpr (S > 2) fold_level<S / 2>(v, count / 2);
}
constexpr int bit_reverse(int i, int width = kLanes) {
  int out = 0;
  for (int bit = 1; bit < width; bit <<= 1) out = (out << 1) | ((i & bit) ? 1 : 0);
  return out;
}
// Lane i of [x's low half | y's low half] (high: of the high halves).
constexpr int halves_index(int i, bool high) {
  constexpr int half = kLanes / 2;
  return (i < half ? i : kLanes + i - half) + (high ? half : 0);
}
template <bool kHigh, std::size_t... I>
LETHE_INLINE Vec halves(Vec x, Vec y, std::index_sequence<I...>) {
  return shuffle<halves_index(I, kHigh)...>(x, y);
}
// Lane j of row i (kHigh: row i + S) after the round of a transpose that swaps the off-diagonal
// S x S blocks of rows i and i + S.
template <int S, bool kHigh>
constexpr int swap_index(int j) {
  if constexpr (kHigh) return (j & S) ? kLanes + j : j + S;
  else return (j & S) ? kLanes + j - S : j;
}
template <int S, bool kHigh, std::size_t... I>
LETHE_INLINE Vec swap_blocks(Vec x, Vec y, std::index_sequence<I...>) {
  return shuffle<swap_index<S, kHigh>(I)...>(x, y);
}
template <int S>
LETHE_INLINE void transpose_round(Vec* rows) {
  for (int i = 0; i < kLanes; ++i)
    if (!(i & S)) {
      const Vec low = swap_blocks<S, false>(rows[i], rows[i + S], std::make_index_sequence<kLanes>{});
      rows[i + S] = swap_blocks<S, true>(rows[i], rows[i + S], std::make_index_sequence<kLanes>{});
      rows[i] = low;
    }
  if constexpr (2 * S < kLanes) transpose_round<2 * S>(rows);
}
}  // namespace detail

// A kLanes x kLanes block in registers transposed: rows[i][j] becomes rows[j][i] (log2(kLanes)
// rounds of pairwise shuffles).
LETHE_INLINE void transpose(Vec* rows) { detail::transpose_round<1>(rows); }

LETHE_INLINE void add_lane_sums(const Vec* sums, float* y) {
  Vec v[kLanes];
  // The folds interleave segments, which leaves step j in lane bit_reverse(j): feeding the
  // steps in bit-reversed order puts every total in its own lane.
  for (int j = 0; j < kLanes; ++j) v[j] = sums[detail::bit_reverse(j)];
  detail::fold_level<kLanes>(v, kLanes);
  store(y, load(y) + v[0]);
}

// y[t] += lane_sum(sums[t]) for t < steps.
LETHE_INLINE void add_all_lane_sums(const Vec* sums, int64_t steps, float* y) {
  int64_t t = 0;
  for (; t + kLanes <= steps; t += kLanes) add_lane_sums(sums + t, y + t);
  for (; t < steps; ++t) y[t] += lane_sum(sums[t]);
}

// Two per-step partial sums in one vector: pack_pair(a, b) holds a[i] + a[i + kLanes / 2] in its
// low half and the same of b in its high half (one fold), so a loop that needs both totals of
// every step stores one vector per step instead of two (stores bound the adjoint loop).
LETHE_INLINE Vec pack_pair(Vec a, Vec b) { return detail::fold<kLanes>(a, b, std::make_index_sequence<kLanes>{}); }

// ya[t] += total of a, yb[t] += total of b, for kLanes steps of packed pairs.
LETHE_INLINE void add_pair_sums(const Vec* packed, float* ya, float* yb) {
  constexpr int kHalf = kLanes / 2;
  Vec v[kLanes];
  // Bit-reversed order within each half of the steps leaves v[0] = [a | b of steps 0..kHalf-1]
  // and v[1] = [a | b of steps kHalf..kLanes-1], each step in its own lane.
  for (int j = 0; j < kLanes; ++j) v[j] = packed[j / kHalf * kHalf + detail::bit_reverse(j % kHalf, kHalf)];
  detail::fold_level<kHalf>(v, kLanes);
  store(ya, load(ya) + detail::halves<false>(v[0], v[1], std::make_index_sequence<kLanes>{}));
  store(yb, load(yb) + detail::halves<true>(v[0], v[1], std::make_index_sequence<kLanes>{}));
}

// The same for t < steps.
LETHE_INLINE void add_all_pair_sums(const Vec* packed, int64_t steps, float* ya, float* yb) {
  int64_t t = 0;
  for (; t + kLanes <= steps; t += kLanes) add_pair_sums(packed + t, ya + t, yb + t);
  for (; t < steps; ++t) {
    float lanes[kLanes], a = 0.0f, b = 0.0f;
    std::memcpy(lanes, &packed[t], sizeof(Vec));
    for (int i = 0; i < kLanes / 2; ++i) a += lanes[i], b += lanes[i + kLanes / 2];
    ya[t] += a, yb[t] += b;
  }
}

// exp(x) to ~1 ulp for x in [-87, 88], for a float or a Vec: exp(x) = 2^k * exp(r) with
// k = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (error < 6e-9).
// Inputs below -87 return ~1e-38 instead of 0 or a denormal: a decay that small is 0 to
// every float32 sum it enters. With AVX-512, Vecs take exp_table below instead.
template <typename V>
LETHE_INLINE V exp_series(V x) {
  if constexpr (std::is_same_v<V, float>) {
    x = std::min(std::max(x, -87.0f), 88.0f);  // min/max, not ?:, so loops over floats vectorize
  } else {
    x = x < -87.0f ? V{} - 87.0f : x;
    x = x > 88.0f ? V{} + 88.0f : x;
  }
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V k = (x * 1.44269504088896341f + kRound) - kRound;
  const V r = x - k * 0.693145751953125f - k * 1.42860682030941723212e-6f;  // ln2 in two parts
  V p = V{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  V scale;  // 2^k, built in the exponent bits
  if constexpr (std::is_same_v<V, float>) {
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    std::memcpy(&scale, &bits, sizeof(scale));
  } else {
    const IntVec bits = (__builtin_convertvector(k, IntVec) + 127) << 23;
    std::memcpy(&scale, &bits, sizeof(scale));
  }
  return p * scale;
}

#if defined(__AVX512F__)
// 2^(j / 32) for j = 0..31, rounded to float.
alignas(64) inline constexpr float kExp2Fractions[32] = {
    1.0f,        1.0218972f,  1.04427373f, 1.06714046f, 1.09050775f, 1.1143868f,  1.13878858f, 1.1637249f,
    1.18920708f, 1.21524739f, 1.24185777f, 1.26905096f, 1.29683959f, 1.32523668f, 1.35425556f, 1.38390994f,
    1.41421354f, 1.44518077f, 1.47682619f, 1.50916445f, 1.54221082f, 1.5759809f,  1.61049032f, 1.64575553f,
    1.68179286f, 1.71861935f, 1.75625217f, 1.79470909f, 1.8340081f,  1.87416768f, 1.91520655f, 1.95714414f};

// 2^(y + y_low) = 2^m * 2^(i / 32) * 2^f, with y rounded to a multiple of 1/32, m + i / 32 (i =
// 0..31), and |f| <= 1/64 (plus y_low, a correction below y's last bit, or none): 2^(i / 32)
// from a 32-entry table held in two registers (one permute), 2^f by a quadratic, and 2^m applied
// by scalef, which also takes care of underflow. Adding 1.5 * 2^18 does the rounding: the sum's
// ulp is 1/32, and its low 5 mantissa bits are i, the permute's index, so the range reduction
// has no multiply and no conversion. 1.7 ulp at worst. The decays exp(delta A) are
// 2^(delta (A / ln2)) with A / ln2 taken once per row (decay_rate): the kernel's most frequent
// operation, in about half the vector operations of exp(x) by round(32 x / ln2) and a cubic.
template <bool kLow, bool kClampLow, bool kClampHigh>
LETHE_INLINE Vec exp2_table(Vec y_in, Vec y_low = Vec{}) {
  // The clamps are for infinite y, where f = inf - inf would be NaN: -150 and 128 already give 0
  // and inf (scalef saturates), and min and max return their second operand for NaN, so NaN stays
  // NaN. A caller that leaves out a clamp guarantees y never is that infinity.
  constexpr float kRound = 393216.0f;  // 1.5 * 2^18
  __m512 y = reinterpret_cast<__m512>(y_in);
  if constexpr (kClampLow) y = _mm512_max_ps(_mm512_set1_ps(-150.0f), y);
  if constexpr (kClampHigh) y = _mm512_min_ps(_mm512_set1_ps(128.0f), y);
  const __m512 shifted = _mm512_add_ps(y, _mm512_set1_ps(kRound));
  const __m512 k = _mm512_sub_ps(shifted, _mm512_set1_ps(kRound));  // y rounded to a multiple of 1/32
  __m512 f = _mm512_sub_ps(y, k);                                     // exact
  if constexpr (kLow) f = _mm512_add_ps(f, reinterpret_cast<__m512>(y_low));
  const __m512 fraction = _mm512_permutex2var_ps(_mm512_load_ps(kExp2Fractions), _mm512_castps_si512(shifted),
                                                 _mm512_load_ps(kExp2Fractions + 16));
  // 2^f = 1 + f q(f) with q the minimax line on |f| <= 1/64 (relative error 5.4e-8; Taylor needs
  // one more FMA, +8% of the forward), added to the table value as a correction, rounded once.
  const __m512 q = _mm512_fmadd_ps(f, _mm512_set1_ps(0.24022474587f), _mm512_set1_ps(0.69315734362f));
  const __m512 scaled = _mm512_fmadd_ps(_mm512_mul_ps(fraction, f), q, fraction);
  return reinterpret_cast<Vec>(_mm512_scalef_ps(scaled, k));  // scalef: times 2^floor(k)
}

// exp(x) = 2^(x / ln2), x / ln2 in two parts (the product's rounding error by an FMA, and the
// rest of 1 / ln2) so the result stays within 1.7 ulp for large |x| too.
LETHE_INLINE Vec exp_table(Vec x_in) {
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), reinterpret_cast<__m512>(x_in)));
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 y = _mm512_mul_ps(x, log2e);
  const __m512 low = _mm512_fmadd_ps(x, _mm512_set1_ps(1.9259629911e-8f), _mm512_fmsub_ps(x, log2e, y));  // 1 / ln2 - log2e
  return exp2_table<true, false, false>(reinterpret_cast<Vec>(y), reinterpret_cast<Vec>(low));  // |y| <= 151: no clamps
}
#endif

template <typename V>
LETHE_INLINE V exp_approx(V x) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<V, Vec>) return exp_table(x);
  else return exp_series(x);
#else
  return exp_series(x);
#endif
}

// The decays exp(delta A): decay(delta, decay_rate(A)), the rate taken once per row (A / ln2 for
// exp2_table on AVX-512, A itself for exp_series). kAtMostOne: the caller checked delta A <= 0 for
// the whole row (decays_at_most_one), so exp2_table skips its overflow clamp: -6% of the forward.
LETHE_INLINE Vec decay_rate(Vec A) {
#if defined(__AVX512F__)
  return A * 1.44269504088896341f;
#else
  return A;
#endif
}
template <bool kAtMostOne>
LETHE_INLINE Vec decay(float delta, Vec rate) {
#if defined(__AVX512F__)
  return exp2_table<false, true, !kAtMostOne>(delta * rate);  // no low part: delta * A's own rounding is the same size
#else
  return exp_series(delta * rate);
#endif
}

// log(1 + e) for e in [0, 1], a float or a Vec: 2 atanh(s) with s = e / (2 + e) <= 1/3, and
// atanh(s) / s = 1 + s^2 / 3 + s^4 / 5 + ... by its minimax quartic in s^2 on [0, 1/9] (relative
// error 8e-9; the series needs 8 terms for that).
template <typename V>
LETHE_INLINE V log1p_unit(V e) {
  const V s = e / (2.0f + e), s2 = s * s;
  V p = V{} + 0.14089167f;
  p = p * s2 + 0.139803f;
  p = p * s2 + 0.20012455f;
  p = p * s2 + 0.33333158f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// softplus(x) = max(x, 0) + log(1 + e) with e = exp(-|x|): exact in form for every x, no
// overflow; and from the same exp its slope, sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e)
// below (the backward's d softplus; unused, the compiler drops it). On a Vec it uses the Vec exp
// (the table on AVX-512).
template <typename V>
LETHE_INLINE std::pair<V, V> softplus_and_slope(V x) {
  if constexpr (std::is_same_v<V, float>) {
    const float e = exp_approx(-std::fabs(x)), q = 1.0f / (1.0f + e);
    return {std::max(x, 0.0f) + log1p_unit(e), x >= 0.0f ? q : e * q};
  } else {
    const V e = exp_approx(x < 0.0f ? x : -x), q = 1.0f / (1.0f + e);
    return {(x > 0.0f ? x : V{}) + log1p_unit(e), x >= 0.0f ? q : e * q};
  }
}
// sigmoid of a float or a Vec. exp(-x) is taken at 88 at most, where it still fits a float:
// below x = -88 the sigmoid is 0 to float precision.
template <typename V>
LETHE_INLINE V sigmoid(V x) {
  if constexpr (std::is_same_v<V, float>) return 1.0f / (1.0f + exp_approx(std::min(-x, 88.0f)));
  else return 1.0f / (1.0f + exp_approx(x < -88.0f ? V{} + 88.0f : -x));
}

// Everything one call needs, in float32 where the kernel reads it per element.
struct Problem {
  int64_t batch, channels, length, d_state, lanes, chunk, n_chunks;  // lanes: d_state padded
  const float* A;            // (channels, lanes)
  const float* B;            // (batch, length, lanes): time-major so the state is contiguous
  const float* C;            // (batch, length, lanes)
  const float* D;            // (channels,) or null
  const float* delta_bias;   // (channels,) or null
  const float* initial;      // (batch, channels, d_state) or null
  const float* keep;         // (batch, length): 0 at a step that starts a document (its decay is 0), else 1; or null
  bool softplus;
};

// A float buffer aligned to a cache line, so a Vec load at a multiple of kLanes never straddles
// two lines (std::vector's 16-byte alignment made the kernel's speed vary from run to run).
class Floats {
 public:
  explicit Floats(int64_t size, float value = 0.0f)
      : size_(size), data_(static_cast<float*>(std::aligned_alloc(64, ((size * sizeof(float) + 63) / 64 + 1) * 64))) {
    std::fill(begin(), end(), value);
  }
  int64_t size() const { return size_; }
  float* data() { return data_.get(); }
  float* begin() { return data_.get(); }
  float* end() { return data_.get() + size_; }
  float& operator[](int64_t i) { return data_[i]; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  int64_t size_;
  std::unique_ptr<float[], Free> data_;
};

}  // namespace lethe_cpu
