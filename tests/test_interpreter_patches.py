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


def test_numpy_dtypes_are_the_interpreters_own():
    from triton.runtime import interpreter

    memoized = interpreter._get_np_dtype
    assert getattr(memoized, "memoized", False), "conftest did not install it"
    element_types = [tl.int1, tl.int8, tl.int16, tl.int32, tl.int64, tl.uint8, tl.uint32, tl.float16, tl.bfloat16,
                     tl.float32, tl.float64, tl.pointer_type(tl.float32)]
    for element in element_types:
        for tt_dtype in (element, tl.block_type(element, [4, 8])):
            for _ in range(2):  # the first call fills the table, the second reads it
                assert memoized(tt_dtype) == memoized.original(tt_dtype), tt_dtype


def test_a_tuple_is_typed_and_named_when_read_as_triton_would():
    from triton.language import core

    shape = core.tuple([core.constexpr(4), core.constexpr(8)])
    assert "_type" not in shape.__dict__, "typed at construction"
    expected = core._type_for_tuple_values(shape.values)
    assert shape.type == expected
    assert shape.type.name == "[" + ",".join(f":{member}" for member in expected.types) + "]" == str(shape.type)
    named = core.tuple_type([tl.float32, tl.int32], ["x", "y"])
    assert named.name == "[x:fp32,y:int32]"
    given = core.tuple([core.constexpr(1)], [core.constexpr_type(1)])  # a list of types, as deserialize passes
    assert isinstance(given.type, core.tuple_type) and given.type.types == [core.constexpr_type(1)]


def test_helpers_of_two_language_modules_compute_alike_launch_after_launch():
    x = torch.randn(3, 10)
    for _ in range(3):
        out = torch.empty_like(x)
        _scale_rows_kernel[(3,)](x, out, 10, BLOCK=16)
        torch.testing.assert_close(out, 5 * x, rtol=0, atol=1e-6)
