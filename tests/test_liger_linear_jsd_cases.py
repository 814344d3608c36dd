"""Liger-Kernel's fused linear JSD cases (test/transformers/test_fused_linear_jsd.py, test/chunked_loss/
test_jsd_loss.py) on every kdfast backend; how Liger's settings map onto kdfast's is in tests/liger_cases.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import (
    BF16,
    FL_LLAMA,
    FP16,
    FP32,
    INTERPRETED,
    as_leaf,
    close,
    dev,
    ignore_some,
    kept_mean,
    leaf,
    liger_jsd_rows,
    rounded_head,
    sized,
    verify,
)

import kdfast

# test/transformers/test_fused_linear_jsd.py (LigerFusedLinearJSD): the student head H // 2 wide, the teacher's H
# ----------------------------------------------------------------------------------------------------------------

FLJSD_ODD = (4, 423, 167, 1423)  # (B, T, H, V)
FLJSD_BF16, FLJSD_FP32 = (1.0, BF16, 5e-3, 5e-2), (1.0, FP32, 1e-5, 5e-4)  # scalar, dtype, atol, rtol


def fljsd_inputs(backend, shape, dtype, scalar, seed=42):
    """Liger's order: the heads rand(V, H // 2) and rand(V, H), then rand hidden states times `scalar`."""
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V, t_cap=2)
    gen = torch.Generator().manual_seed(seed)
    student_weight = torch.rand(V, H // 2, generator=gen, dtype=dtype)
    teacher_weight = torch.rand(V, H, generator=gen, dtype=dtype)
    student_hidden = torch.rand(B * T, H // 2, generator=gen, dtype=dtype) * scalar
    teacher_hidden = torch.rand(B * T, H, generator=gen, dtype=dtype) * scalar
    return student_hidden, student_weight, teacher_hidden, teacher_weight, gen


def fljsd_reference(hs, ws, ht, wt, labels, beta, temperature, ignore_index, dtype):
    """Liger's TorchLMHeadJSD: logits in `dtype`, then log_softmax(logits / T) and its torch JSD (no T^2)."""

    def reference(precision):
        h, w = as_leaf(hs, precision), as_leaf(ws, precision)
        student = rounded_head(h, w, None, dtype)
        teacher = rounded_head(ht.to(precision), wt.to(precision), None, dtype).detach()
        rows = liger_jsd_rows((student / temperature).log_softmax(-1), (teacher / temperature).log_softmax(-1),
                              beta)
        return kept_mean(rows, labels, ignore_index), [h, w]

    return reference


def _fljsd_case(backend, shape, scalar, dtype, atol, rtol, beta, temperature, ignore_index, labels_kind):
    device = device_for(backend)
    hs, ws, ht, wt, gen = fljsd_inputs(backend, shape, dtype, scalar)
    rows, vocab = hs.shape[0], ws.shape[0]
    labels = None
    if labels_kind == "some":
        labels = ignore_some(torch.randint(0, vocab, (rows,), generator=gen), ignore_index, gen)
    elif labels_kind == "all":
        labels = torch.full((rows,), ignore_index)
    x, w = leaf(hs, device), leaf(ws, device)
    out = kdfast.linear_distill_loss(x, w, ht.to(device), wt.to(device), dev(labels, device), divergence="jsd",
                                     beta=beta, temperature=temperature, t2_scale=False, ignore_index=ignore_index,
                                     backend=backend)
    verify(out, [x, w], fljsd_reference(hs, ws, ht, wt, labels, beta, temperature, ignore_index, dtype), dtype, atol,
           rtol)
    return out, x, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, beta, shape, scalar, dtype, atol, rtol", [
    (1.0, 0.5, FL_LLAMA, *FLJSD_BF16), (2.0, 0.1, FLJSD_ODD, *FLJSD_FP32), (1.0, 0.0, FL_LLAMA, *FLJSD_FP32),
    (1.0, 1.0, FLJSD_ODD, *FLJSD_BF16)])
def test_fused_linear_jsd_correctness(backend, temperature, beta, shape, scalar, dtype, atol, rtol):
    _fljsd_case(backend, shape, scalar, dtype, atol, rtol, beta, temperature, -100, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, beta, ignore_index, shape, scalar, dtype, atol, rtol", [
    (1.0, 0.5, 2, FLJSD_ODD, *FLJSD_FP32), (1.0, 0.0, 2, FL_LLAMA, *FLJSD_BF16),
    (2.0, 0.1, 42, FL_LLAMA, *FLJSD_FP32), (1.0, 1.0, 2, FLJSD_ODD, *FLJSD_BF16)])
def test_fused_linear_jsd_correctness_with_ignore_index(backend, temperature, beta, ignore_index, shape, scalar,
                                                        dtype, atol, rtol):
    _fljsd_case(backend, shape, scalar, dtype, atol, rtol, beta, temperature, ignore_index, "some")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, beta, ignore_index, shape, scalar, dtype, atol, rtol", [
    (1.0, 0.5, -100, (2, 2, 8, 8), 0.5, BF16, 5e-3, 5e-2), (2.0, 0.1, 42, (9, 7, 41, 41), 0.5, FP32, 1e-5, 5e-4)])
def test_fused_linear_jsd_correctness_functional(backend, temperature, beta, ignore_index, shape, scalar, dtype, atol,
                                                 rtol):
    """Liger's functional form against its autograd Function (accum_dtype None / float32: kdfast has no such
    switch); here `linear_distill_loss` against the `LinearDistillLoss` module, and against the reference."""
    device = device_for(backend)
    hs, ws, ht, wt, gen = fljsd_inputs(backend, shape, dtype, scalar)
    labels = ignore_some(torch.randint(0, ws.shape[0], (hs.shape[0],), generator=gen), ignore_index, gen)
    settings = dict(divergence="jsd", beta=beta, temperature=temperature, t2_scale=False, ignore_index=ignore_index,
                    backend=backend)
    x1, w1, x2, w2 = leaf(hs, device), leaf(ws, device), leaf(hs, device), leaf(ws, device)
    out1 = kdfast.LinearDistillLoss(**settings)(x1, w1, ht.to(device), wt.to(device), labels.to(device))
    out2 = kdfast.linear_distill_loss(x2, w2, ht.to(device), wt.to(device), labels.to(device), **settings)
    close(out1, out2, atol, rtol)
    out1.backward()
    verify(out2, [x2, w2], fljsd_reference(hs, ws, ht, wt, labels, beta, temperature, ignore_index, dtype), dtype,
           atol, rtol)
    close(x1.grad, x2.grad, atol, rtol)
    close(w1.grad, w2.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, beta, ignore_index, shape, scalar, dtype, atol, rtol", [
    (1.0, 0.5, 2, FL_LLAMA, *FLJSD_FP32), (2.0, 0.1, 42, FLJSD_ODD, *FLJSD_BF16)])
def test_fused_linear_jsd_correctness_all_ignored(backend, temperature, beta, ignore_index, shape, scalar, dtype,
                                                  atol, rtol):
    out, x, w = _fljsd_case(backend, shape, scalar, dtype, atol, rtol, beta, temperature, ignore_index, "all")
    assert out.item() == 0.0
    assert (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype, atol, rtol", [(BF16, 5e-3, 5e-2), (FP16, 5e-3, 5e-2)])
def test_fused_linear_jsd_amp(backend, autocast_dtype, atol, rtol):
    """float32 heads, hidden states in the autocast dtype, the loss and its backward under torch.autocast (whose
    GEMMs, in Liger's reference too, round the logits to the autocast dtype)."""
    device = device_for(backend)
    B, T, H, V = 2, 4, 2048, 3200  # Liger's
    if backend == "triton" and INTERPRETED:
        T = 2
    beta, temperature, ignore_index = 0.5, 1.0, -100
    gen = torch.Generator().manual_seed(42)
    ws = torch.rand(V, H // 2, generator=gen)
    wt = torch.rand(V, H, generator=gen)
    hs = torch.rand(B * T, H // 2, generator=gen).to(autocast_dtype)
    ht = torch.rand(B * T, H, generator=gen).to(autocast_dtype)
    labels = ignore_some(torch.randint(0, V, (B * T,), generator=gen), ignore_index, gen)
    x, w = leaf(hs, device), leaf(ws, device)
    with torch.autocast(device_type=device, dtype=autocast_dtype):
        out = kdfast.linear_distill_loss(x, w, ht.to(device), wt.to(device), labels.to(device), divergence="jsd",
                                         beta=beta, temperature=temperature, t2_scale=False, backend=backend)
        verify(out, [x, w], fljsd_reference(hs, ws, ht, wt, labels, beta, temperature, ignore_index, autocast_dtype),
               autocast_dtype, atol, rtol)
    assert x.grad.dtype == autocast_dtype and w.grad.dtype == FP32


# ----------------------------------------------------------------------------------------------------------------
# test/chunked_loss/test_jsd_loss.py (LigerFusedLinearJSDLoss: weight_hard_loss * CE + weight_soft_loss * JSD)
# ----------------------------------------------------------------------------------------------------------------

CJSD_ODD = (3, 47, 31, 123)
CJSD_BF16, CJSD_FP32 = (1.0, BF16, 5e-2, 5e-1), (1.0, FP32, 1e-5, 5e-4)


def chunked_jsd_inputs(backend, shape, dtype, scalar, bias, gen):
    """Liger's order: the heads, their biases (rand), then the hidden states rand() times `scalar`."""
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V, t_cap=2)
    ws = torch.rand(V, H // 2, generator=gen, dtype=dtype)
    wt = torch.rand(V, H, generator=gen, dtype=dtype)
    bs = torch.rand(V, generator=gen, dtype=dtype) if bias else None
    bt = torch.rand(V, generator=gen, dtype=dtype) if bias else None
    hs = torch.rand(B * T, H // 2, generator=gen, dtype=dtype) * scalar
    ht = torch.rand(B * T, H, generator=gen, dtype=dtype) * scalar
    return hs, ws, bs, ht, wt, bt


def chunked_jsd_reference(hs, ws, bs, ht, wt, bt, labels, weight_hard, weight_soft, beta, ignore_index, temperature,
                          dtype):
    """HF's distillation reference (Liger's test/utils.py HFDistillationLoss with HFJSDLoss): logits `x @ W.T + b`
    in `dtype`, then float32; CE on the labels at T = 1 and the JSD of the logits divided by T, each a mean over the
    kept rows (no T^2)."""

    def reference(precision):
        h, w, b = as_leaf(hs, precision), as_leaf(ws, precision), as_leaf(bs, precision)
        student = rounded_head(h, w, b, dtype, two_roundings=True)
        teacher = rounded_head(ht.to(precision), wt.to(precision), bt.to(precision) if bt is not None else None,
                               dtype, two_roundings=True).detach()
        hard = F.cross_entropy(student, labels, ignore_index=ignore_index)
        rows = liger_jsd_rows((student / temperature).log_softmax(-1), (teacher / temperature).log_softmax(-1),
                              beta)
        return weight_hard * hard + weight_soft * kept_mean(rows, labels, ignore_index), [h, w, b]

    return reference


def chunked_jsd_kdfast(x, w, b, ht, wt, bt, labels, weight_hard, weight_soft, beta, ignore_index, temperature,
                       backend, module=False):
    device = x.device
    settings = dict(divergence="jsd", beta=beta, temperature=temperature, t2_scale=False, kd_weight=weight_soft,
                    ce_weight=weight_hard, ignore_index=ignore_index, backend=backend)
    args = (x, w, ht.to(device), wt.to(device), labels.to(device))
    if module:
        return kdfast.LinearDistillLoss(**settings)(*args, student_bias=b, teacher_bias=dev(bt, device))
    return kdfast.linear_distill_loss(*args, student_bias=b, teacher_bias=dev(bt, device), **settings)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, weight_hard_loss, weight_soft_loss, beta, ignore_index, shape, bias, scalar, "
                         "dtype, atol, rtol", [
                             (1.0, 0.5, 0.5, 0.5, -100, FL_LLAMA, True, *CJSD_BF16),
                             (1.0, 0.5, 0.5, 0.5, 42, CJSD_ODD, False, *CJSD_FP32),
                             (2.0, 0.0, 1.0, 0.8, -100, CJSD_ODD, True, *CJSD_FP32),
                             (2.0, 0.0, 1.0, 0.8, 42, FL_LLAMA, False, *CJSD_BF16),
                             (0.5, 1.0, 0.0, 0.2, -100, FL_LLAMA, False, *CJSD_FP32),
                             (0.5, 1.0, 0.0, 0.2, 42, CJSD_ODD, True, *CJSD_BF16)])
def test_chunked_jsd_loss_correctness(backend, temperature, weight_hard_loss, weight_soft_loss, beta, ignore_index,
                                      shape, bias, scalar, dtype, atol, rtol):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(42)
    hs, ws, bs, ht, wt, bt = chunked_jsd_inputs(backend, shape, dtype, scalar, bias, gen)
    labels = ignore_some(torch.randint(0, ws.shape[0], (hs.shape[0],), generator=gen), ignore_index, gen)
    x, w, b = leaf(hs, device), leaf(ws, device), leaf(bs, device)
    out = chunked_jsd_kdfast(x, w, b, ht, wt, bt, labels, weight_hard_loss, weight_soft_loss, beta, ignore_index,
                             temperature, backend)
    verify(out, [x, w, b], chunked_jsd_reference(hs, ws, bs, ht, wt, bt, labels, weight_hard_loss, weight_soft_loss,
                                                 beta, ignore_index, temperature, dtype), dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, weight_hard_loss, weight_soft_loss, beta, ignore_index, shape, bias, scalar, "
                         "dtype, atol, rtol", [
                             (1.0, 0.5, 0.5, 0.5, -100, (2, 2, 8, 8), True, 1.0, BF16, 5e-2, 5e-2),
                             (2.0, 0.1, 0.9, 0.5, 42, (9, 7, 41, 41), False, 1.0, FP32, 1e-4, 5e-3)])
def test_chunked_jsd_loss_correctness_functional(backend, temperature, weight_hard_loss, weight_soft_loss, beta,
                                                 ignore_index, shape, bias, scalar, dtype, atol, rtol):
    """Liger's functional form against its autograd Function; here the function against the module, and the
    reference. Liger places no ignore_index here (42 is outside these vocabularies): every row is kept."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(42)
    hs, ws, bs, ht, wt, bt = chunked_jsd_inputs(backend, shape, dtype, scalar, bias, gen)
    labels = torch.randint(0, ws.shape[0], (hs.shape[0],), generator=gen)
    args = (ht, wt, bt, labels, weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, backend)
    x1, w1, b1 = leaf(hs, device), leaf(ws, device), leaf(bs, device)
    x2, w2, b2 = leaf(hs, device), leaf(ws, device), leaf(bs, device)
    out1 = chunked_jsd_kdfast(x1, w1, b1, *args, module=True)
    out2 = chunked_jsd_kdfast(x2, w2, b2, *args)
    close(out1, out2, atol, rtol)
    out1.backward()
    verify(out2, [x2, w2, b2], chunked_jsd_reference(hs, ws, bs, ht, wt, bt, labels, weight_hard_loss,
                                                     weight_soft_loss, beta, ignore_index, temperature, dtype),
           dtype, atol, rtol)
    for first, second in ((x1, x2), (w1, w2), (b1, b2)):
        if first is not None:
            close(first.grad, second.grad, atol, rtol)


# ----------------------------------------------------------------------------------------------------------------
