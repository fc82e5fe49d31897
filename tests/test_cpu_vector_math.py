"""The CPU kernel's vector exp, softplus (and its slope) and sigmoid (kernels/cpu_vector_math.h) against double
precision, compiled on their own: the decays exp(delta A) are most of the kernel's arithmetic, and
the scan tests' tolerances would hide a few-ulp regression there."""

import shutil
import subprocess

import pytest

from helpers import ROOT

CHECK = r"""
#include "cpu_vector_math.h"
#include <cmath>
#include <cstdio>
using namespace lethe_cpu;

static double ulps(float got, double want) {  // error in units of float's last place at `want`
  const double unit = std::ldexp(1.0, std::max(std::ilogb(static_cast<float>(want)), -126) - 23);
  return std::fabs(got - want) / unit;
}

static Vec splat(float x) { return Vec{} + x; }

int main() {
  double exp_ulps = 0, decay_error = 0, sigmoid_error = 0, softplus_error = 0, slope_error = 0;
  for (double x = -87.0; x < 88.0; x += 0.000731) {  // every lane: the vector path
    const float f = static_cast<float>(x);
    exp_ulps = std::max(exp_ulps, ulps(exp_approx(splat(f))[kLanes - 1], std::exp(static_cast<double>(f))));
  }
  for (float A = -16.0f; A < 0.0f; A += 0.37f)  // relative: delta A itself is rounded to float
    for (float delta = 1e-4f; delta < 10.0f / -A; delta *= 1.013f) {
      const double want = std::exp(static_cast<double>(delta) * A);
      for (const float got : {decay<false>(delta, decay_rate(splat(A)))[0], decay<true>(delta, decay_rate(splat(A)))[0]})
        decay_error = std::max(decay_error, std::fabs(got - want) / want);
    }
  for (double x = -30.0; x < 30.0; x += 0.00123) {
    const float f = static_cast<float>(x);
    const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(f))), sp = std::log1p(std::exp(static_cast<double>(f)));
    sigmoid_error = std::max(sigmoid_error, std::fabs(sigmoid(splat(f))[1] - s) / s);
    const auto [softplus, slope] = softplus_and_slope(splat(f));
    softplus_error = std::max(softplus_error, std::fabs(softplus[2] - sp) / sp);
    slope_error = std::max(slope_error, std::fabs(slope[3] - s) / s);
  }
  const Vec special = exp_approx(splat(-INFINITY));
  const Vec nan = exp_approx(splat(NAN)), huge = exp_approx(splat(-1e30f));
  std::printf("%g %g %g %g %g %g %d %g\n", exp_ulps, decay_error, sigmoid_error, softplus_error, slope_error, special[0],
              std::isnan(nan[0]) ? 1 : 0, huge[0]);
}
"""


@pytest.mark.parametrize("flags", [["-march=native"], ["-march=native", "-mno-avx512f"]], ids=["native", "no-avx512"])
def test_vector_exp_softplus_sigmoid_match_double_precision(tmp_path, flags):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    source, binary = tmp_path / "check.cpp", tmp_path / "check"
    source.write_text(CHECK)
    build = subprocess.run([cxx, "-std=c++17", "-O2", *flags, "-Wno-ignored-attributes", f"-I{ROOT / 'kernels'}",
                            str(source), "-o", str(binary)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    exp_ulps, decay_error, sigmoid_error, softplus_error, slope_error, exp_of_minus_inf, nan_stays_nan, exp_of_minus_huge = (
        float(v) for v in subprocess.run([str(binary)], capture_output=True, text=True, timeout=60, check=True).stdout.split())
    assert exp_ulps < 2.0  # 1.72 ulp measured for the table exp, 0.88 for the series exp
    assert decay_error < 1.5e-6  # |delta A| <= 10: rounding delta (A / ln2) costs up to ~1.2e-6 (8.6e-7 measured)
    assert sigmoid_error < 1e-6 and softplus_error < 1e-6 and slope_error < 1e-6  # slope: softplus' = sigmoid
    # 0 from the table exp, ~1e-38 from the series exp: 0 to every float sum a decay enters
    assert 0.0 <= exp_of_minus_inf < 1e-37 and 0.0 <= exp_of_minus_huge < 1e-37 and nan_stays_nan == 1.0
