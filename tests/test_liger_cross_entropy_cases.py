"""Liger-Kernel's cross-entropy cases (test/transformers/test_cross_entropy.py) on kdfast's CE term, every backend;
how Liger's settings map onto kdfast's is in tests/liger_cases.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import BF16, F64, FP16, FP32, as_leaf, ce_with_z_loss, close, ignore_some, leaf, sized, verify

import kdfast

# test/transformers/test_cross_entropy.py (LigerCrossEntropyLoss): kdfast's CE term alone
# ----------------------------------------------------------------------------------------------------------------

CE_LLAMA, CE_ODD = (2, 4096, 32000), (3, 423, 32000)
CE_BF16, CE_FP32 = (1.0, BF16, 1e-8, 5e-2), (1.0, FP32, 1e-8, 1e-6)  # scalar, dtype, atol, rtol


def ce_inputs(backend, shape, dtype, scalar=1.0, seed=0):
    """Liger's inputs: randn(B*T, V) * scalar in `dtype`, then labels in [0, V), and the generator after them."""
    B, T, V = sized(backend, *shape, t_cap=8)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * T, V, generator=gen, dtype=dtype) * scalar
    labels = torch.randint(0, V, (B * T,), generator=gen)
    return logits, labels, gen


def kdfast_ce(x, labels, backend, softcap=None, module=False, class_weights=None, **settings):
    """kdfast's CE alone on logits x: the distillation loss's CE term, or with a softcap or per-class weights
    kdfast.cross_entropy's (Liger's own API: the cap on the logits inside the loss, its `weight`)."""
    if softcap is not None or class_weights is not None:
        if module:
            return kdfast.CrossEntropyLoss(softcap=softcap, backend=backend, class_weights=class_weights,
                                           **settings)(x, labels)
        return kdfast.cross_entropy(x, labels, softcap=softcap, backend=backend, class_weights=class_weights,
                                    **settings)
    settings = dict(kd_weight=0.0, ce_weight=1.0, backend=backend, **settings)
    if module:
        return kdfast.DistillLoss(**settings)(x, x.detach(), labels)
    return kdfast.distill_loss(x, x.detach(), labels, **settings)


def ce_reference(logits, labels, reduction="mean", ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                 softcap=None, z_only=False, weight=None):
    """Liger's references on the logits (upcast; softcapped when there is a cap, as Liger's test writes it)."""

    def reference(precision):
        x = as_leaf(logits, precision)
        z = x if softcap is None else softcap * torch.tanh(x / softcap)
        total, z_loss = ce_with_z_loss(z, labels, reduction, ignore_index, label_smoothing, lse_square_scale,
                                       weight.to(precision) if weight is not None else None)
        return (z_loss if z_only else total), [x]

    return reference


def _ce_check(backend, logits, labels, dtype, atol, rtol, reduction="mean", ignore_index=-100, label_smoothing=0.0,
              lse_square_scale=0.0, softcap=None, upstream=None, weight=None):
    device = device_for(backend)
    x = leaf(logits, device)
    out = kdfast_ce(x, labels.to(device), backend, softcap=softcap, reduction=reduction, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss_weight=lse_square_scale,
                    class_weights=weight.to(device) if weight is not None else None)
    verify(out, [x], ce_reference(logits, labels, reduction, ignore_index, label_smoothing, lse_square_scale,
                                  softcap, weight=weight), dtype, atol, rtol, upstream)


def _z_loss_check(parts, logits, labels, dtype, atol, rtol, **settings):
    """Liger's returned z-loss (weighted) against kdfast's parts.z_loss times its weight, forward only."""
    z = parts.z_loss * settings["lse_square_scale"]
    verify(z, None, ce_reference(logits, labels, z_only=True, **settings), dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, scalar, dtype, atol, rtol", [
    ("sum", CE_LLAMA, *CE_FP32), ("mean", CE_ODD, *CE_FP32), ("none", CE_LLAMA, *CE_FP32),
    ("sum", CE_ODD, *CE_BF16), ("mean", CE_LLAMA, *CE_BF16), ("none", CE_ODD, *CE_BF16)])
def test_cross_entropy_correctness(backend, reduction, shape, scalar, dtype, atol, rtol):
    logits, labels, _ = ce_inputs(backend, shape, dtype, scalar)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, scalar, dtype, atol, rtol", [((2, 2, 8), *CE_BF16), ((9, 7, 41), *CE_FP32)])
def test_cross_entropy_correctness_functional(backend, shape, scalar, dtype, atol, rtol):
    """Liger's functional CE against its autograd Function: ignore_index 0, z-loss 1e-4, label smoothing 0.1, mean,
    softcap 30, the z-loss returned, a random upstream gradient; here the function against the module, and the
    reference."""
    device = device_for(backend)
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar, seed=42)
    settings = dict(ignore_index=0, label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0)
    kd_settings = dict(ignore_index=0, z_loss_weight=1e-4, label_smoothing=0.1, reduction="mean",
                       return_components=True)
    x1, x2 = leaf(logits, device), leaf(logits, device)
    y1, parts1 = kdfast_ce(x1, labels.to(device), backend, softcap=30.0, module=True, **kd_settings)
    y2, parts2 = kdfast_ce(x2, labels.to(device), backend, softcap=30.0, **kd_settings)
    close(y1, y2, atol, rtol)
    close(parts1.z_loss, parts2.z_loss, atol, rtol)
    up = torch.randn((), generator=gen, dtype=F64)
    y1.backward(up.to(y1.dtype).to(device))
    _z_loss_check(parts2, logits, labels, dtype, atol, rtol, **settings)
    verify(y2, [x2], ce_reference(logits, labels, "mean", **settings), dtype, atol, rtol, up)
    close(x1.grad, x2.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, ignore_index, scalar, dtype, atol, rtol", [
    ("sum", CE_LLAMA, 2, *CE_BF16), ("mean", CE_ODD, -123, *CE_FP32), ("none", CE_LLAMA, 2, *CE_FP32)])
def test_cross_entropy_correctness_with_ignore_index(backend, reduction, shape, ignore_index, scalar, dtype, atol,
                                                     rtol):
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar, seed=42)
    ignore_some(labels, ignore_index, gen)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, label_smoothing, scalar, dtype, atol, rtol", [(CE_LLAMA, 0.1, *CE_FP32),
                                                                               (CE_ODD, 0.1, *CE_BF16)])
def test_cross_entropy_correctness_with_label_smoothing(backend, shape, label_smoothing, scalar, dtype, atol, rtol):
    logits, labels, _ = ce_inputs(backend, shape, dtype, scalar, seed=42)
    _ce_check(backend, logits, labels, dtype, atol, rtol, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, ignore_index, label_smoothing, scalar, dtype, atol, rtol", [
    (CE_LLAMA, 1, 0.1, *CE_BF16), (CE_ODD, -300, 0.2, *CE_FP32)])
def test_cross_entropy_correctness_with_label_smoothing_with_ignore_index(backend, shape, ignore_index,
                                                                          label_smoothing, scalar, dtype, atol, rtol):
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar, seed=42)
    ignore_some(labels, ignore_index, gen)
    _ce_check(backend, logits, labels, dtype, atol, rtol, ignore_index=ignore_index, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, softcap, scalar, dtype, atol, rtol", [
    ("sum", CE_LLAMA, 30.0, *CE_FP32), ("mean", CE_ODD, 30.0, *CE_BF16), ("none", CE_LLAMA, 30.0, *CE_BF16)])
def test_cross_entropy_correctness_with_softcap(backend, reduction, shape, softcap, scalar, dtype, atol, rtol):
    logits, labels, _ = ce_inputs(backend, shape, dtype, scalar, seed=42)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction, softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lse_square_scale, return_z_loss, shape, scalar, dtype, atol, rtol", [
    (1e-4, True, CE_LLAMA, *CE_FP32), (1e-4, False, CE_ODD, *CE_BF16),  # PaLM's weight
    (1e-5, True, CE_ODD, *CE_BF16), (1e-5, False, CE_LLAMA, *CE_FP32)])  # Chameleon's
def test_cross_entropy_correctness_with_z_loss(backend, lse_square_scale, return_z_loss, shape, scalar, dtype, atol,
                                               rtol):
    device = device_for(backend)
    logits, labels, _ = ce_inputs(backend, shape, dtype, scalar)
    x = leaf(logits, device)
    result = kdfast_ce(x, labels.to(device), backend, z_loss_weight=lse_square_scale,
                       return_components=return_z_loss)
    out = result[0] if return_z_loss else result
    if return_z_loss:
        _z_loss_check(result[1], logits, labels, dtype, atol, rtol, lse_square_scale=lse_square_scale)
    verify(out, [x], ce_reference(logits, labels, lse_square_scale=lse_square_scale), dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing, ignore_index, reduction, return_z_loss, lse_square_scale, shape, scalar, "
                         "dtype, atol, rtol", [
                             (0.1, 42, "mean", True, 1e-4, CE_LLAMA, *CE_FP32),
                             (0.1, 42, "mean", False, 1e-5, CE_ODD, *CE_BF16),
                             (0.2, -42, "sum", True, 1e-4, CE_ODD, *CE_BF16),
                             (0.2, -42, "sum", False, 1e-5, CE_LLAMA, *CE_FP32)])
def test_cross_entropy_correctness_with_z_loss_with_other_params(backend, label_smoothing, ignore_index, reduction,
                                                                 return_z_loss, lse_square_scale, shape, scalar,
                                                                 dtype, atol, rtol):
    device = device_for(backend)
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar)
    ignore_some(labels, ignore_index, gen)
    x = leaf(logits, device)
    result = kdfast_ce(x, labels.to(device), backend, z_loss_weight=lse_square_scale, label_smoothing=label_smoothing,
                       ignore_index=ignore_index, reduction=reduction, return_components=return_z_loss)
    out = result[0] if return_z_loss else result
    settings = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    lse_square_scale=lse_square_scale)
    if return_z_loss:
        _z_loss_check(result[1], logits, labels, dtype, atol, rtol, **settings)
    verify(out, [x], ce_reference(logits, labels, **settings), dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, scalar, dtype, atol, rtol", [
    ("sum", CE_LLAMA, *CE_FP32), ("mean", CE_ODD, *CE_FP32), ("none", CE_LLAMA, *CE_FP32),
    ("sum", CE_ODD, *CE_BF16), ("mean", CE_LLAMA, *CE_BF16), ("none", CE_ODD, *CE_BF16)])
def test_cross_entropy_correctness_with_weight(backend, reduction, shape, scalar, dtype, atol, rtol):
    """Liger's per-class `weight` (rand(V) in the logits' dtype) against torch's CrossEntropyLoss(weight=)."""
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar)
    weight = torch.rand(logits.shape[-1], generator=gen, dtype=dtype)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction, weight=weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, ignore_index, lse_square_scale, label_smoothing, softcap, shape, scalar, dtype, "
                         "atol, rtol", [
                             ("sum", -100, 1e-4, 0.1, 30.0, CE_LLAMA, *CE_FP32),
                             ("mean", 42, 1e-5, 0.2, 40.0, CE_ODD, *CE_FP32),
                             ("none", -100, 1e-4, 0.1, 30.0, CE_ODD, *CE_FP32),
                             ("sum", 42, 1e-5, 0.2, 40.0, CE_ODD, *CE_BF16),
                             ("mean", -100, 1e-4, 0.1, 30.0, CE_LLAMA, *CE_BF16),
                             ("none", 42, 1e-5, 0.2, 40.0, CE_LLAMA, *CE_BF16)])
def test_cross_entropy_correctness_with_weight_with_other_params(backend, reduction, ignore_index, lse_square_scale,
                                                                 label_smoothing, softcap, shape, scalar, dtype,
                                                                 atol, rtol):
    """Every option with the weights (float32 rand(V)): Liger's CrossEntropyWithZLoss of the softcapped logits, its
    z-loss unweighted over the kept rows."""
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar)
    weight = torch.rand(logits.shape[-1], generator=gen, dtype=FP32)
    ignore_some(labels, ignore_index, gen)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction, ignore_index=ignore_index,
              label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap, weight=weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, scalar, dtype, atol, rtol", [("sum", CE_LLAMA, *CE_BF16),
                                                                         ("mean", CE_ODD, *CE_FP32)])
def test_cross_entropy_correctness_not_last_layer(backend, reduction, shape, scalar, dtype, atol, rtol):
    """The loss times 3, then a random upstream gradient."""
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar, seed=42)
    up = 3 * torch.rand((), generator=gen, dtype=F64)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction, upstream=up)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index, lse_square_scale, label_smoothing, softcap, reduction, shape, scalar, dtype, "
                         "atol, rtol", [
                             (-100, 1e-4, 0.1, 30.0, "sum", (2, 1024, 32000), 1.0, BF16, 1e-8, 5e-2),
                             (-100, 1e-4, 0.1, 30.0, "mean", CE_ODD, 1.0, FP32, 1e-8, 1e-5),
                             (42, 1e-5, 0.2, 40.0, "mean", (2, 1024, 32000), 1.0, BF16, 1e-8, 5e-2),
                             (42, 1e-5, 0.2, 40.0, "sum", CE_ODD, 1.0, FP32, 1e-8, 1e-5)])
def test_cross_entropy_correctness_not_last_layer_with_other_params(backend, ignore_index, lse_square_scale,
                                                                    label_smoothing, softcap, reduction, shape,
                                                                    scalar, dtype, atol, rtol):
    logits, labels, gen = ce_inputs(backend, shape, dtype, scalar, seed=42)
    ignore_some(labels, ignore_index, gen)
    up = 3 * torch.rand((), generator=gen, dtype=F64)
    _ce_check(backend, logits, labels, dtype, atol, rtol, reduction=reduction, ignore_index=ignore_index,
              label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap, upstream=up)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, ignore_index", [(CE_LLAMA, 2), (CE_ODD, -123)])
def test_cross_entropy_correctness_with_out_of_bounds_target(backend, shape, ignore_index):
    """Labels in [V, 2V) beside ignored ones: Liger asserts "out of bounds"; kdfast refuses them with a ValueError
    that names the labels (on the host here; on a GPU CUDA asserts on the device and Triton returns NaN rows)."""
    if device_for(backend) == "cuda":
        pytest.skip("on a GPU an out-of-range label is a device-side assert or NaN rows (README), not a host error")
    logits, labels, gen = ce_inputs(backend, shape, BF16)
    V = logits.shape[-1]
    ignore_some(labels, ignore_index, gen)
    count = int(torch.randint(1, labels.numel() // 2, (1,), generator=gen))
    labels[torch.randperm(labels.numel(), generator=gen)[:count]] = torch.randint(V, 2 * V, (count,), generator=gen)
    with pytest.raises(ValueError, match="labels"):
        kdfast_ce(logits.clone().requires_grad_(True), labels, backend, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, ignore_index, dtype, scalar, atol, rtol", [
    ("mean", CE_LLAMA, -100, FP32, 1.0, 1e-4, 1e-4), ("sum", CE_ODD, 2, FP16, 1.0, 1e-2, 1e-2),
    ("none", CE_LLAMA, -100, BF16, 1.0, 1e-2, 1e-2)])
def test_cross_entropy_correctness_with_forward_only(backend, reduction, shape, ignore_index, dtype, scalar, atol,
                                                     rtol):
    """Under no_grad, inputs that need no gradient: the loss, and nothing to run backward on. (Liger's reference
    here keeps torch's default ignore_index while its loss gets `ignore_index`; both sides use it here.)"""
    device = device_for(backend)
    logits, labels, _ = ce_inputs(backend, shape, dtype, scalar)
    with torch.no_grad():
        out = kdfast_ce(logits.to(device), labels.to(device), backend, ignore_index=ignore_index, reduction=reduction)
    verify(out, None, ce_reference(logits, labels, reduction, ignore_index), dtype, atol, rtol)
    assert not out.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.backward(gradient=torch.ones_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_token_accuracy", [False, True])
def test_cross_entropy_structured_output(backend, return_token_accuracy):
    """Liger's 3 x 3 case: the loss, and the token accuracy when asked for (`return_components`). Liger's predicted
    tokens have no kdfast counterpart."""
    device = device_for(backend)
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.7, -0.2, 0.9]])
    labels = torch.tensor([0, 1, 2])
    x = leaf(logits, device)
    result = kdfast_ce(x, labels.to(device), backend, return_components=return_token_accuracy)
    loss = result[0] if return_token_accuracy else result
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    if return_token_accuracy:
        close(result[1].accuracy, (logits.argmax(dim=-1) == labels).float().mean(), 1e-6, 0)
    verify(loss, [x], ce_reference(logits, labels), FP32, 1e-6, 0)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, label_smoothing, reduction", [(BF16, 0.0, "sum"), (BF16, 0.1, "mean"),
                                                               (FP16, 0.0, "mean"), (FP16, 0.1, "sum")])
def test_cross_entropy_true_class_grad_confident_predictions(backend, dtype, label_smoothing, reduction):
    """Confident rows (the label's logit 10 over the row's largest): the label's gradient (softmax - (1 - eps)) / N is
    a small difference of large terms. kdfast's error there, against float32 on the same 16-bit logits, must be at
    most 4 times that of torch's own 16-bit backward (Liger's bound)."""
    device = device_for(backend)
    B, T, V = sized(backend, 2, 64, 4096)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B * T, V, generator=gen)
    labels = torch.randint(0, V, (B * T,), generator=gen)
    rows = torch.arange(B * T)
    logits[rows, labels] = logits.max(dim=-1).values + 10.0
    low = logits.to(dtype)
    grads = {}
    for name, tensor in (("torch", low), ("fp32", low.float())):
        tensor = tensor.clone().requires_grad_(True)
        F.cross_entropy(tensor, labels, reduction=reduction, label_smoothing=label_smoothing).backward()
        grads[name] = tensor.grad[rows, labels].double()
    x = leaf(low, device)
    kdfast_ce(x, labels.to(device), backend, reduction=reduction, label_smoothing=label_smoothing).backward()
    torch_err = (grads["torch"] - grads["fp32"]).abs().max().item()
    kdfast_err = (x.grad.cpu()[rows, labels].double() - grads["fp32"]).abs().max().item()
    assert kdfast_err <= max(4 * torch_err, torch.finfo(dtype).tiny), (kdfast_err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_float32_internal(backend):
    """Liger runs its kernel on bf16 logits and on their float32 copy (and asserts nothing); the point it makes, here
    asserted: bf16 logits give the loss of their exact float32 values (the softmax is computed in float32)."""
    device = device_for(backend)
    _, _, V = sized(backend, 4, 1, 128256)
    gen = torch.Generator().manual_seed(42)
    logits = torch.randn(4, V, generator=gen, dtype=BF16)
    labels = torch.randint(0, V, (4,), generator=gen)
    with torch.no_grad():
        low = kdfast_ce(logits.to(device), labels.to(device), backend)
        high = kdfast_ce(logits.float().to(device), labels.to(device), backend)
    close(low, high, 1e-6, 1e-6)
    verify(low, None, ce_reference(logits, labels), FP32, 1e-6, 1e-6)
