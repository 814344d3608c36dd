"""Liger-Kernel's fused linear cross-entropy cases (test/transformers/test_fused_linear_cross_entropy.py) on kdfast's
fused linear CE term, every backend (its token scaling cases on `token_scaling="dft"`); how Liger's settings map onto
kdfast's is in tests/liger_cases.py."""

import pytest
import torch
from conftest import BACKENDS, device_for
from liger_cases import (
    BF16,
    F64,
    FL_LLAMA,
    FP16,
    FP32,
    as_leaf,
    ce_with_z_loss,
    close,
    dev,
    ignore_some,
    leaf,
    rounded_head,
    sized,
    verify,
)

import kdfast

# ----------------------------------------------------------------------------------------------------------------
# test/transformers/test_fused_linear_cross_entropy.py (LigerFusedLinearCrossEntropyLoss)
# ----------------------------------------------------------------------------------------------------------------

FLCE_ODD = (4, 47, 31, 123)
FLCE_MEAN_BF16, FLCE_MEAN_FP32 = ("mean", 1.0, BF16, 5e-3, 5e-2), ("mean", 1.0, FP32, 1e-5, 5e-4)
FLCE_SUM_BF16, FLCE_SUM_FP32 = ("sum", 1.0, BF16, 5e-0, 5e1), ("sum", 1.0, FP32, 1e-3, 5e-2)
FLCE_NONE_BF16, FLCE_NONE_FP32 = ("none", 1.0, BF16, 5e-0, 5e1), ("none", 1.0, FP32, 1e-3, 5e-2)
# Liger's two rows: defaults, then every option at once, per-class CE weights (float32 rand(V)) among them.
# has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss
FLCE_PLAIN = (False, 0.0, -100, 0.0, None, False)
FLCE_ALL = (True, 0.1, 42, 1e-4, 30.0, True)


def flce_inputs(backend, shape, dtype, scalar, bias, gen):
    """Liger's order: the head rand(V, H), its bias rand(V), hidden randn(B*T, H) times `scalar`, labels."""
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V, t_cap=2)
    weight = torch.rand(V, H, generator=gen, dtype=dtype)
    bias_ = torch.rand(V, generator=gen, dtype=dtype) if bias else None
    hidden = torch.randn(B * T, H, generator=gen, dtype=dtype) * scalar
    labels = torch.randint(0, V, (B * T,), generator=gen)
    return hidden, weight, bias_, labels


def kdfast_flce(x, w, b, labels, backend, softcap=None, module=False, class_weights=None, **settings):
    """The fused linear loss's CE term alone, or with per-class weights kdfast.linear_cross_entropy (Liger's
    `ce_weight`)."""
    if class_weights is not None:
        if module:
            return kdfast.LinearCrossEntropyLoss(softcap=softcap, backend=backend, class_weights=class_weights,
                                                 **settings)(x, w, labels, bias=b)
        return kdfast.linear_cross_entropy(x, w, labels, bias=b, softcap=softcap, backend=backend,
                                           class_weights=class_weights, **settings)
    rows, vocab = x.shape[0], w.shape[0]
    unused_teacher = (torch.zeros(rows, 1, dtype=x.dtype, device=x.device),
                      torch.zeros(vocab, 1, dtype=x.dtype, device=x.device))
    settings = dict(kd_weight=0.0, ce_weight=1.0, backend=backend, **settings)
    if module:
        return kdfast.LinearDistillLoss(softcap=softcap, **settings)(x, w, *unused_teacher, labels, student_bias=b)
    return kdfast.linear_distill_loss(x, w, *unused_teacher, labels, student_bias=b, softcap=softcap, **settings)


def flce_reference(hidden, weight, bias, labels, dtype, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                   lse_square_scale=0.0, softcap=None, z_only=False, ce_weight=None):
    """Liger's TorchLMHeadCE: nn.Linear in `dtype`, then float32, the softcap, CrossEntropyWithZLoss (`ce_weight`
    its per-class weights)."""

    def reference(precision):
        h, w, b = as_leaf(hidden, precision), as_leaf(weight, precision), as_leaf(bias, precision)
        logits = rounded_head(h, w, b, dtype)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total, z_loss = ce_with_z_loss(logits, labels, reduction, ignore_index, label_smoothing, lse_square_scale,
                                       ce_weight.to(precision) if ce_weight is not None else None)
        return (z_loss if z_only else total), [h, w, b]

    return reference


def _flce_case(backend, shape, reduction, scalar, dtype, atol, rtol, bias, case, forward_only):
    device = device_for(backend)
    has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss = case
    gen = torch.Generator().manual_seed(42)
    hidden, weight, bias_, labels = flce_inputs(backend, shape, dtype, scalar, bias, gen)
    ce_weight = torch.rand(weight.shape[0], generator=gen) if has_ce_weight else None
    ignore_some(labels, ignore_index, gen)
    settings = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    lse_square_scale=lse_square_scale, softcap=softcap, ce_weight=ce_weight)
    x, w, b = leaf(hidden, device), leaf(weight, device), leaf(bias_, device)
    with torch.set_grad_enabled(not forward_only):
        result = kdfast_flce(x, w, b, labels.to(device), backend, softcap=softcap, reduction=reduction,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             z_loss_weight=lse_square_scale, return_components=return_z_loss,
                             class_weights=dev(ce_weight, device))
    out = result[0] if return_z_loss else result
    if return_z_loss:
        z = result[1].z_loss * lse_square_scale
        verify(z, None, flce_reference(hidden, weight, bias_, labels, dtype, z_only=True, **settings), dtype, atol,
               rtol)
    verify(out, None if forward_only else [x, w, b], flce_reference(hidden, weight, bias_, labels, dtype, **settings),
           dtype, atol, rtol)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, scalar, dtype, atol, rtol, shape, bias, case", [
    (*FLCE_MEAN_BF16, FL_LLAMA, True, FLCE_PLAIN), (*FLCE_MEAN_BF16, FLCE_ODD, False, FLCE_ALL),
    (*FLCE_MEAN_FP32, FLCE_ODD, True, FLCE_PLAIN), (*FLCE_MEAN_FP32, FL_LLAMA, False, FLCE_ALL),
    (*FLCE_SUM_BF16, FLCE_ODD, True, FLCE_ALL), (*FLCE_SUM_FP32, FL_LLAMA, False, FLCE_PLAIN),
    (*FLCE_NONE_FP32, FLCE_ODD, True, FLCE_ALL), (*FLCE_NONE_BF16, FL_LLAMA, False, FLCE_ALL)])
def test_fused_linear_ce_correctness(backend, reduction, scalar, dtype, atol, rtol, shape, bias, case):
    _flce_case(backend, shape, reduction, scalar, dtype, atol, rtol, bias, case, forward_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, scalar, dtype, atol, rtol, shape, bias, case", [
    (*FLCE_MEAN_FP32, FL_LLAMA, True, FLCE_ALL), (*FLCE_SUM_BF16, FLCE_ODD, False, FLCE_PLAIN)])
def test_fused_linear_ce_correctness_with_forward_only(backend, reduction, scalar, dtype, atol, rtol, shape, bias,
                                                       case):
    out = _flce_case(backend, shape, reduction, scalar, dtype, atol, rtol, bias, case, forward_only=True)
    assert not out.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.backward(gradient=torch.ones_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, scalar, dtype, atol, rtol, bias, ce_weight", [
    ((2, 2, 8, 8), 1.0, BF16, 5e-3, 5e-2, True, False), ((9, 7, 41, 41), 1.0, FP32, 1e-5, 5e-4, False, False),
    ((2, 2, 8, 8), 1.0, BF16, 5e-3, 5e-2, False, True), ((9, 7, 41, 41), 1.0, FP32, 1e-5, 5e-4, True, True)])
def test_fused_linear_ce_correctness_functional(backend, shape, scalar, dtype, atol, rtol, bias, ce_weight):
    """Liger's functional form against its autograd Function (ignore -100, z-loss 1e-4, smoothing 0.1, mean, softcap
    30, the z-loss returned, a random upstream gradient; per-class weights randn(V), of either sign, or none); here
    the function against the module, and the reference."""
    device = device_for(backend)
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V, t_cap=2)
    gen = torch.Generator().manual_seed(42)
    hidden = torch.randn(B * T, H, generator=gen, dtype=dtype) * scalar
    labels = torch.randint(0, V, (B * T,), generator=gen)
    weight = torch.randn(V, H, generator=gen, dtype=dtype)
    bias_ = torch.randn(V, generator=gen, dtype=dtype) if bias else None
    class_weights = torch.randn(V, generator=gen) if ce_weight else None
    settings = dict(reduction="mean", ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0,
                    ce_weight=class_weights)
    kd_settings = dict(ignore_index=-100, z_loss_weight=1e-4, label_smoothing=0.1, reduction="mean",
                       return_components=True, class_weights=dev(class_weights, device))
    x1, x2 = leaf(hidden, device), leaf(hidden, device)
    w, b = weight.to(device), dev(bias_, device)
    y1, parts1 = kdfast_flce(x1, w, b, labels.to(device), backend, softcap=30.0, module=True, **kd_settings)
    y2, parts2 = kdfast_flce(x2, w, b, labels.to(device), backend, softcap=30.0, **kd_settings)
    close(y1, y2, atol, rtol)
    close(parts1.z_loss, parts2.z_loss, atol, rtol)
    verify(parts2.z_loss * 1e-4, None, flce_reference(hidden, weight, bias_, labels, dtype, z_only=True, **settings),
           dtype, atol, rtol)
    up = torch.randn((), generator=gen, dtype=F64)
    y1.backward(up.to(y1.dtype).to(device))
    verify(y2, [x2], flce_reference(hidden, weight, bias_, labels, dtype, **settings), dtype, atol, rtol, up)
    close(x1.grad, x2.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, scalar, dtype, atol, rtol, shape, bias, return_token_accuracy", [
    (*FLCE_MEAN_BF16, FL_LLAMA, True, True), (*FLCE_MEAN_FP32, FLCE_ODD, False, True),
    (*FLCE_MEAN_FP32, FL_LLAMA, True, False)])
def test_fused_linear_ce_correctness_with_token_accuracy(backend, reduction, scalar, dtype, atol, rtol, shape, bias,
                                                         return_token_accuracy):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(42)
    hidden, weight, bias_, labels = flce_inputs(backend, shape, dtype, scalar, bias, gen)
    ignore_some(labels, -100, gen)
    x, w, b = leaf(hidden, device), leaf(weight, device), leaf(bias_, device)
    result = kdfast_flce(x, w, b, labels.to(device), backend, reduction=reduction,
                         return_components=return_token_accuracy)
    if return_token_accuracy:
        out, parts = result
        with torch.no_grad():  # Liger's expectation: the argmax of the logits computed in the inputs' dtype
            logits = hidden @ weight.T + (bias_ if bias else 0)
            keep = labels != -100
            expected = ((logits.argmax(dim=-1) == labels) & keep).sum().float() / keep.sum().float()
        close(parts.accuracy, expected, atol, rtol)
    else:
        out = result
        assert isinstance(out, torch.Tensor)
    verify(out, [x, w, b], flce_reference(hidden, weight, bias_, labels, dtype, reduction), dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias, cast_dtype, atol, rtol, shape", [(True, BF16, 5e-3, 5e-2, FL_LLAMA),
                                                                 (True, FP16, 5e-3, 5e-2, FLCE_ODD),
                                                                 (False, BF16, 5e-3, 5e-2, FLCE_ODD),
                                                                 (False, FP16, 5e-3, 5e-2, FL_LLAMA)])
def test_fused_linear_ce_amp(backend, bias, cast_dtype, atol, rtol, shape):
    """A float32 head and hidden states, the loss and its backward under torch.autocast (Liger's accum_dtype axis has
    no kdfast counterpart). Liger leaves the bias at nn.Linear's initialisation: the same here, drawn once."""
    device = device_for(backend)
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V)
    gen = torch.Generator().manual_seed(42)
    weight = torch.rand(V, H, generator=gen)
    bias_ = (torch.rand(V, generator=gen) * 2 - 1) / H**0.5 if bias else None
    hidden = torch.randn(B * T, H, generator=gen)
    labels = torch.randint(0, V, (B * T,), generator=gen)
    x, w, b = leaf(hidden, device), leaf(weight, device), leaf(bias_, device)
    with torch.autocast(device_type=device, dtype=cast_dtype):
        out = kdfast_flce(x, w, b, labels.to(device), backend)
        verify(out, [x, w, b], flce_reference(hidden, weight, bias_, labels, cast_dtype), cast_dtype, atol, rtol)
    assert x.grad.dtype == FP32 and w.grad.dtype == FP32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_token_accuracy", [False, True])
def test_fused_linear_ce_structured_output(backend, return_token_accuracy):
    """Liger's 3-token case: the loss equals torch's CE within 1e-6, from the function and from the module, and the
    token accuracy when asked for (Liger's z-loss field: kdfast reports the z-loss only when its weight is set)."""
    device = device_for(backend)
    hidden = torch.tensor([[0.2, -0.1], [1.0, 0.5], [-0.3, 0.7]])
    weight = torch.tensor([[0.5, -0.4], [-0.2, 0.3], [0.1, 0.6]])
    bias = torch.tensor([0.1, -0.2, 0.05])
    labels = torch.tensor([0, 1, 2])
    logits = hidden @ weight.T + bias
    for module in (False, True):
        x = leaf(hidden, device)
        result = kdfast_flce(x, weight.to(device), bias.to(device), labels.to(device), backend, module=module,
                             return_components=return_token_accuracy)
        loss = result[0] if return_token_accuracy else result
        assert isinstance(loss, torch.Tensor) and loss.shape == ()
        if return_token_accuracy:
            close(result[1].accuracy, (logits.argmax(dim=-1) == labels).float().mean(), 1e-6, 0)
        verify(loss, [x], flce_reference(hidden, weight, bias, labels, FP32), FP32, 1e-6, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, bias", [((2, 16, 32, 64), True), ((1, 32, 64, 128), False)])
def test_fused_linear_ce_reduction_none_per_token_grad_output(backend, shape, bias):
    """reduction="none" with a non-uniform per-token upstream gradient: each row's weight must reach the hidden,
    weight and bias gradients before they are summed (a uniform one would hide a scalar upstream gradient)."""
    device = device_for(backend)
    atol = rtol = 1e-4
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V)
    gen = torch.Generator().manual_seed(42)
    hidden = torch.randn(B * T, H, generator=gen) * 0.1
    weight = torch.randn(V, H, generator=gen) * 0.1
    bias_ = torch.randn(V, generator=gen) * 0.1 if bias else None
    labels = torch.randint(0, V, (B * T,), generator=gen)
    up = (torch.rand(B * T, generator=gen) + 0.5).double()
    x, w, b = leaf(hidden, device), leaf(weight, device), leaf(bias_, device)
    out = kdfast_flce(x, w, b, labels.to(device), backend, reduction="none")
    verify(out, [x, w, b], flce_reference(hidden, weight, bias_, labels, FP32, reduction="none"), FP32, atol, rtol,
           up)


# Liger's token scaling cases (`use_token_scaling=True`: kdfast's token_scaling="dft"), B, T, H, V = 2, 4, 8, 16, a
# randn head and bias, no ignored labels; its expectation written as it writes it: the CE of x @ W.T + b times the
# detached softmax probability of the target.
def _token_scaling_inputs(gen):
    B, T, H, V = 2, 4, 8, 16
    hidden = torch.randn(B * T, H, generator=gen)
    labels = torch.randint(0, V, (B * T,), generator=gen)
    return hidden, labels, torch.randn(V, H, generator=gen), torch.randn(V, generator=gen)


def _liger_token_scaled(x, weight, bias, labels):
    logits = x @ weight.t() + bias
    ce_loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    pred_probs = torch.softmax(logits, dim=-1).gather(1, labels.unsqueeze(-1)).squeeze(-1).detach()
    return ce_loss * pred_probs


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_ce_correctness_token_scaling(backend):
    """Per-token losses (reduction="none") and the gradient of their sum, within Liger's 1e-4."""
    device = device_for(backend)
    hidden, labels, weight, bias = (t.to(device) for t in _token_scaling_inputs(torch.Generator().manual_seed(0)))
    x1, x2 = leaf(hidden, device), leaf(hidden, device)
    scaled = kdfast.linear_cross_entropy(x1, weight, labels, bias=bias, reduction="none", token_scaling="dft",
                                         backend=backend)
    expected = _liger_token_scaled(x2, weight, bias, labels)
    assert torch.allclose(scaled, expected, atol=1e-4, rtol=1e-4)
    scaled.sum().backward()
    expected.sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_ce_correctness_token_scaling_consistency(backend):
    """The function and the module agree within 1e-6 (reduction="sum"), loss and gradient."""
    device = device_for(backend)
    hidden, labels, weight, bias = (t.to(device) for t in _token_scaling_inputs(torch.Generator().manual_seed(1)))
    x1, x2 = leaf(hidden, device), leaf(hidden, device)
    functional = kdfast.linear_cross_entropy(x1, weight, labels, bias=bias, reduction="sum", token_scaling="dft",
                                             backend=backend)
    module = kdfast.LinearCrossEntropyLoss(reduction="sum", token_scaling="dft", backend=backend)(x2, weight, labels,
                                                                                                 bias=bias)
    assert torch.allclose(functional, module, atol=1e-6, rtol=1e-6)
    functional.backward()
    module.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", [False, True])
def test_fused_linear_ce_correctness_token_scaling_functional_and_module(backend, module):
    """Liger's `_functional` and `_module` cases: the summed scaled loss and its gradient within 1e-5."""
    device = device_for(backend)
    hidden, labels, weight, bias = (t.to(device) for t in _token_scaling_inputs(torch.Generator().manual_seed(2)))
    x1, x2 = leaf(hidden, device), leaf(hidden, device)
    settings = dict(reduction="sum", token_scaling="dft", backend=backend)
    if module:
        y1 = kdfast.LinearCrossEntropyLoss(**settings)(x1, weight, labels, bias=bias)
    else:
        y1 = kdfast.linear_cross_entropy(x1, weight, labels, bias=bias, ignore_index=-100, label_smoothing=0.0,
                                         z_loss_weight=0.0, softcap=None, **settings)
    y2 = _liger_token_scaled(x2, weight, bias, labels).sum()
    assert torch.allclose(y1, y2, atol=1e-5, rtol=1e-5)
    y1.backward()
    y2.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
