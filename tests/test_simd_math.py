"""The CPU kernel's AVX-512 exp and log (csrc/cpu/simd_math.h: vscalefps, vgetmantps / vgetexpps) give the generic
vector forms' values bit for bit: a small program built with the kernel's AVX-512 flags compares the two over every
61st vector of float bit patterns (every float <= 88 for the centred exp, with -inf, NaN and the underflow bound;
every positive normal float for the log), and reports the lanes that differ."""

import shutil
import subprocess

import pytest
import torch

from kdfast.native_build import _SIMD_FLAGS, package_folder

CHECK = r"""
#include <cstdio>
#include "cpu/simd_math.h"
using namespace kdfast_cpu;

static bool same(float a, float b) {
  return (a != a && b != b) || float_as_bits(a) == float_as_bits(b);
}

int main() {
  long long checked = 0, differ = 0;
  auto compare = [&](VFloat x, VFloat fast, VFloat generic) {
    for (int lane = 0; lane < kLanes; ++lane, ++checked) {
      if (!same(fast[lane], generic[lane])) {
        if (differ++ < 5) std::printf("x = %a: %a against %a\n", x[lane], fast[lane], generic[lane]);
      }
    }
  };
  const uint64_t stride = 61 * kLanes;
  for (uint64_t base = 0; base < (1ull << 32); base += stride) {  // every sign: floats <= 88 and NaNs
    VInt bits;
    for (int lane = 0; lane < kLanes; ++lane) bits[lane] = static_cast<int32_t>(static_cast<uint32_t>(base + lane));
    VFloat x = bits_as_float(bits);
    x = x > 88.0f ? splat<VFloat>(-0.0f) : x;
    compare(x, fast_exp_centred(x), fast_exp_centred_generic(x));
  }
  const float edges[kLanes] = {-INFINITY, -87.3365f, -87.33651f, -87.3364f, -88.7f, -103.9f, -104.0f, 0.0f,
                               -0.0f, NAN, -1e-30f, -0.5f, -20.0f, -86.0f, -87.0f, 88.0f};
  VFloat edge;
  for (int lane = 0; lane < kLanes; ++lane) edge[lane] = edges[lane % 16];
  compare(edge, fast_exp_centred(edge), fast_exp_centred_generic(edge));
  for (uint64_t base = 0x00800000; base < 0x7f800000; base += stride) {  // positive normal floats
    VInt bits;
    for (int lane = 0; lane < kLanes; ++lane) bits[lane] = static_cast<int32_t>(base + lane);
    const VFloat x = bits_as_float(bits);
    compare(x, fast_log_ge1(x), fast_log_ge1_generic(x));
  }
  std::printf("checked %lld differ %lld\n", checked, differ);
  return differ == 0 ? 0 : 1;
}
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU with AVX-512")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++, as the CPU kernel's build does")
def test_avx512_exp_and_log_equal_the_generic_forms_bit_for_bit(tmp_path):
    source = tmp_path / "check.cpp"
    source.write_text(CHECK)
    program = tmp_path / "check"
    include = str(package_folder("csrc"))
    subprocess.run(["g++", "-O3", "-std=c++17", *_SIMD_FLAGS["AVX512"], "-I", include, str(source), "-o",
                    str(program)], check=True, capture_output=True, text=True)
    result = subprocess.run([str(program)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    checked = int(result.stdout.split()[1])
    assert checked > 50_000_000, result.stdout
