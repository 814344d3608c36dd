"""The fused linear forms' float32 CPU products on oneDNN (kdfast.cpu_gemm): the same results as torch's own
products, the setting's bad values refused."""

import pytest
import torch

import kdfast
from kdfast import cpu_gemm

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"),
    reason="this torch has no oneDNN linear")


def test_an_unknown_setting_is_refused(gemm_library):
    gemm_library("mkl")
    with pytest.raises(ValueError, match="KDFAST_CPU_GEMM must be one of auto, onednn, blas, got 'mkl'"):
        cpu_gemm.onednn_products()


def test_blas_keeps_torch_products(gemm_library):
    gemm_library("blas")
    assert not cpu_gemm.onednn_products()
    assert not cpu_gemm.on_onednn(torch.ones(2, 2))


@needs_onednn
def test_onednn_products_equal_torch_products(gemm_library):
    gemm_library("onednn")
    assert cpu_gemm.onednn_products()
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 24, generator=generator), torch.randn(1000, 24, generator=generator)
    grad = torch.randn(37, 1000, generator=generator)
    torch.testing.assert_close(cpu_gemm.logits(hidden, weight), hidden @ weight.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_gemm.product(grad, weight), grad @ weight, rtol=1e-5, atol=1e-4)
    out = torch.empty(37, 24)
    assert cpu_gemm.product_into(out, grad, weight) is out
    torch.testing.assert_close(out, grad @ weight, rtol=1e-5, atol=1e-4)
    # 16-bit tensors are not its: torch's products
    assert not cpu_gemm.on_onednn(hidden.bfloat16(), weight.bfloat16())


def _heads(generator, rows=300, vocab=700):
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    return dict(hidden=randn(rows, 32), weight=randn(vocab, 32, scale=0.3),
                teacher_hidden=[randn(rows, 48), randn(rows, 32)],
                teacher_weight=[randn(vocab, 48, scale=0.3), randn(vocab, 32, scale=0.3)],
                bias=randn(vocab, scale=0.1), labels=torch.randint(0, vocab, (rows,), generator=generator))


def _single(h, w, heads):
    return kdfast.linear_distill_loss(h, w, heads["teacher_hidden"][0], heads["teacher_weight"][0], heads["labels"],
                                      student_bias=heads["bias"], teacher_bias=heads["bias"], ce_weight=0.5,
                                      temperature=2.0, chunk_size=64)


def _capped(h, w, heads):
    return kdfast.linear_distill_loss(h, w, heads["teacher_hidden"][0], heads["teacher_weight"][0], heads["labels"],
                                      divergence="jsd", softcap=30.0, chunk_size=64)


def _several(h, w, heads):
    return kdfast.linear_multi_teacher_distill_loss(h, w, heads["teacher_hidden"], heads["teacher_weight"],
                                                    heads["labels"], ce_weight=0.5, chunk_size=64)


def _log_probs(h, w, heads):
    return kdfast.linear_token_logprobs(h, w, heads["labels"], bias=heads["bias"], chunk_size=64).sum()


@needs_onednn
@pytest.mark.parametrize("loss", [_single, _capped, _several, _log_probs], ids=lambda f: f.__name__.strip("_"))
def test_fused_linear_losses_are_the_same_on_either_library(gemm_library, loss):
    heads = _heads(torch.Generator().manual_seed(1))
    results = {}
    for setting in ("blas", "onednn"):
        gemm_library(setting)
        h, w = heads["hidden"].clone().requires_grad_(True), heads["weight"].clone().requires_grad_(True)
        value = loss(h, w, heads)
        results[setting] = (value.detach(), *torch.autograd.grad(value, (h, w)))
    assert cpu_gemm.onednn_products()
    for ours, theirs in zip(results["onednn"], results["blas"]):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# 16-bit products through float32 where torch has no 16-bit GEMM of its own (kdfast.cpu_gemm's docstring)
# ---------------------------------------------------------------------------------------------------------------

SIXTEEN_BIT = [torch.bfloat16, torch.float16]


@pytest.fixture
def sixteen_bit_gemms(monkeypatch):
    """Chooses, for the rest of the test, whether this CPU's torch has 16-bit GEMMs of its own (False: kdfast
    widens the products to float32)."""
    def choose(native: bool) -> None:
        monkeypatch.setattr(cpu_gemm, "native_sixteen_bit", lambda dtype: native)
    return choose


def _rounded_once(found, truth, dtype):
    """found within one unit of `dtype` (relative; a rounding is half of one) of the float64 `truth`, plus float32's
    sums."""
    unit = torch.finfo(dtype).eps
    error = (found.double() - truth).abs()
    assert bool((error <= unit * truth.abs() + 1e-6 * truth.abs().max()).all()), f"{error.max():.3g} off"


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_widened_products_are_rounded_once(sixteen_bit_gemms, dtype, monkeypatch):
    sixteen_bit_gemms(False)
    monkeypatch.setattr(cpu_gemm, "WIDENED_SLICE_BYTES", 4 * 37 * 100)  # several slices of every operand
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 24, generator=generator).to(dtype), torch.randn(1000, 24, generator=generator)
    weight, bias = weight.to(dtype), torch.randn(1000, generator=generator).to(dtype)
    grad = torch.randn(37, 1000, generator=generator).to(dtype)
    assert cpu_gemm.widened(hidden, weight)
    out = torch.empty(37, 24, dtype=dtype)
    assert cpu_gemm.product_into(out, grad, weight) is out
    _rounded_once(out, grad.double() @ weight.double(), dtype)
    _rounded_once(cpu_gemm.product(grad, weight), grad.double() @ weight.double(), dtype)
    logits = torch.empty(37, 1000, dtype=dtype)
    cpu_gemm.widened_logits_into(logits, hidden, weight, bias, 0.5)
    _rounded_once(logits, 0.5 * (hidden.double() @ weight.double().t() + bias.double()), dtype)
    acc = torch.ones(1000, 24)
    cpu_gemm.accumulate_transposed_product(acc, grad, hidden)
    torch.testing.assert_close(acc.double(), 1 + grad.double().t() @ hidden.double(), rtol=1e-5, atol=1e-5)


def _cast(heads: dict, dtype) -> dict:
    """`_heads`' floating tensors (and lists of them) in `dtype`."""
    def cast(value):
        return [cast(t) for t in value] if isinstance(value, list) else (
            value.to(dtype) if value.is_floating_point() else value)
    return {key: cast(value) for key, value in heads.items()}


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
@pytest.mark.parametrize("loss", [_single, _capped, _several, _log_probs], ids=lambda f: f.__name__.strip("_"))
def test_widened_losses_are_as_close_to_float32_as_torchs_own(sixteen_bit_gemms, gemm_library, dtype, loss):
    """Each fused linear form on 16-bit heads, its products widened and torch's own: both against the same form in
    float32 on the same (rounded) values, the widened no further off than torch's own 16-bit products."""
    gemm_library("blas")
    rounded = _cast(_heads(torch.Generator().manual_seed(1)), dtype)
    results = {}
    for name, native in (("float32", None), ("widened", False), ("torch", True)):
        values = _cast(rounded, torch.float32) if native is None else rounded  # float32 on the rounded values
        if native is not None:
            sixteen_bit_gemms(native)
        h, w = values["hidden"].clone().requires_grad_(True), values["weight"].clone().requires_grad_(True)
        value = loss(h, w, values)
        results[name] = [value.detach(), *torch.autograd.grad(value, (h, w))]
    for what, reference, widened, own in zip(("loss", "d hidden", "d weight"), *results.values()):
        def off(found, reference=reference):
            return ((found.double() - reference.double()).norm() / reference.double().norm()).item()
        assert off(widened) <= 1.5 * off(own) + 1e-6, f"{what}: widened {off(widened):.2e}, torch's {off(own):.2e}"
