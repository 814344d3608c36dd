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
