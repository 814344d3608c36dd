"""tests/interpreter_patches.py under Triton's interpreter: installed by conftest, and a kernel whose helpers come from
two modules of triton.language (its own `tl`, and `triton.language.core` behind tl.zeros) computes the same in
launch after launch."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only")


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _scale_rows_kernel(x_ptr, out_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    x = tl.load(x_ptr + row * cols + offsets, mask=mask, other=0.0)
    total = tl.zeros([BLOCK], dtype=tl.float32)  # Triton's own @jit function: patches triton.language.core
    total += _scaled(x, 2.0)
    total += _scaled(x, 3.0)  # the second helper call of the launch: no walk of the language
    tl.store(out_ptr + row * cols + offsets, total, mask=mask)


def test_the_patch_is_installed_once():
    from interpreter_patches import patch_once_per_launch
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "once_per_launch", False), "conftest did not install it"
    assert patch_once_per_launch() is False, "a second install would wrap the first"


def test_helpers_of_two_language_modules_compute_alike_launch_after_launch():
    x = torch.randn(3, 10)
    for _ in range(3):
        out = torch.empty_like(x)
        _scale_rows_kernel[(3,)](x, out, 10, BLOCK=16)
        torch.testing.assert_close(out, 5 * x, rtol=0, atol=1e-6)
