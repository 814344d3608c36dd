"""The backward's device-side rescale (kernels/rescale.py): multiplies, and leaves data alone at 1."""

import pytest
import torch
from conftest import device_for

pytest.importorskip("triton")

from kdfast.kernels.rescale import BLOCK, scale_unless_one_  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.5, -3.0])
def test_scale_unless_one(dtype, scale):
    device = device_for("triton")
    data = torch.randn(2 * BLOCK + 5, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    expected = (data.float() * scale).to(dtype)
    scale_unless_one_(data, torch.tensor([scale], device=device))
    if scale == 1.0:
        assert torch.equal(data, expected)
    else:  # one rounding of the product into the dtype (the interpreter may round bf16 differently)
        torch.testing.assert_close(data, expected)
