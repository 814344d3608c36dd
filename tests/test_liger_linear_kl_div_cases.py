"""Liger-Kernel's fused linear KL-div cases (test/transformers/test_fused_linear_kl_div.py,
LigerFusedLinearKLDivLoss: a student head fused with a given target distribution) on every kdfast backend, through
`kdfast.linear_student_distill_loss`; the shared mapping and tolerances are in tests/liger_cases.py.

Liger's loss is sum(q * (log max(q, eps) - log_softmax(x W^T / T))) over the kept rows (a row is dropped where its
label is ignore_index), no T^2, reduced by "sum", "batchmean" (over the kept rows) or "mean" (over the kept rows
times V). The target q is probabilities, not tempered: kdfast is given the teacher logits T * log q, whose softmax
at T is q (renormalised: a 16-bit q sums to 1 only approximately, well inside Liger's 16-bit tolerances), with
`divergence="forward_kl", t2_scale=False`, reduction "sum" or "mean" (Liger's batchmean; its "mean" is that over V).
Liger's eps clamps no target here (softmax(rand) over V > 8 columns is far above 1e-10). Not ported: `accum_dtype`
(kdfast always sums in float32) and Liger's refusal of reduction="none" (kdfast gives the rows)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import BF16, FL_LLAMA, FP16, FP32, INTERPRETED, as_leaf, close, ignore_some, leaf, rounded_head, sized

import kdfast

FLKL_ODD = (4, 423, 167, 1423)  # (B, T, H, V)
EPS = 1e-10


def flkl_inputs(backend, shape, dtype, scalar, seed=42, hidden_dtype=None):
    """Liger's order: the head rand(V, H), the hidden states randn(B*T, H) times `scalar`, the target
    softmax(rand(B*T, V)) in `dtype`; and the generator after them (for the labels)."""
    B, T, H, V = shape
    B, T, V = sized(backend, B, T, V, t_cap=2)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(V, H, generator=gen, dtype=dtype)
    hidden = torch.randn(B * T, H, generator=gen, dtype=hidden_dtype or dtype) * scalar
    target = torch.rand(B * T, V, generator=gen).softmax(dim=-1).to(hidden_dtype or dtype)
    return hidden, weight, target, gen


def kdfast_kl_div(x, w, target, labels, temperature, reduction, ignore_index, backend, device, module=False):
    teacher = (temperature * target.float().log()).to(device)
    settings = dict(divergence="forward_kl", temperature=temperature, t2_scale=False, ignore_index=ignore_index,
                    reduction="sum" if reduction == "sum" else "mean", backend=backend)
    labels = labels.to(device) if labels is not None else None
    if module:
        out = kdfast.LinearStudentDistillLoss(**settings)(x, w, teacher, labels)
    else:
        out = kdfast.linear_student_distill_loss(x, w, teacher, labels, **settings)
    return out / w.shape[0] if reduction == "mean" else out


def flkl_reference(hidden, weight, target, labels, temperature, reduction, ignore_index, dtype):
    """Liger's TorchLMHeadKLDiv: logits in `dtype`, as float32 over T, then its KL against the target."""

    def reference(precision):
        h, w = as_leaf(hidden, precision), as_leaf(weight, precision)
        log_p = (rounded_head(h, w, None, dtype) / temperature).log_softmax(-1)
        q = target.to(precision)
        rows = (q * (q.clamp_min(EPS).log() - log_p)).sum(-1)
        kept = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
        total, count = torch.where(kept, rows, 0.0).sum(), int(kept.sum())
        if reduction == "sum":
            return total, [h, w]
        if count == 0:
            return total * 0.0, [h, w]
        return total / (count if reduction == "batchmean" else count * weight.shape[0]), [h, w]

    return reference


def check(out, x, w, reference, dtype, atol, rtol):
    """Liger compares the loss and both gradients with its float32 reference; here with the reference in float64
    (and float32 for float32 inputs, its distance from float64 added: liger_cases.verify's rule)."""
    out.backward()
    results = []
    for precision in (torch.float64, FP32) if dtype == FP32 else (torch.float64,):
        loss, leaves = reference(precision)
        loss.backward()
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    (loss64, grads64), slack = results[0], [0.0, 0.0, 0.0]
    if len(results) > 1:
        slack = [(a.double() - b).abs().max().item() for a, b in zip([results[1][0], *results[1][1]],
                                                                    [loss64, *grads64])]
    close(out, loss64, atol + slack[0], rtol)
    close(x.grad, grads64[0], atol + slack[1], rtol)
    close(w.grad, grads64[1], atol + slack[2], rtol)


def _case(backend, shape, temperature, reduction, ignore_index, scalar, dtype, atol, rtol, labels_kind):
    device = device_for(backend)
    hidden, weight, target, gen = flkl_inputs(backend, shape, dtype, scalar)
    labels = None
    if labels_kind == "some":
        labels = ignore_some(torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=gen), ignore_index, gen)
    elif labels_kind == "all":
        labels = torch.full((hidden.shape[0],), ignore_index)
    x, w = leaf(hidden, device), leaf(weight, device)
    out = kdfast_kl_div(x, w, target, labels, temperature, reduction, ignore_index, backend, device)
    check(out, x, w, flkl_reference(hidden, weight, target, labels, temperature, reduction, ignore_index, dtype),
          dtype, atol, rtol)
    return out, x, w


# Liger's rows (temperature, reduction, scalar, dtype, atol, rtol), each with one of its two shapes.
CORRECTNESS = [(1.0, "batchmean", 1.0, BF16, 5e-3, 5e-2, FL_LLAMA), (1.0, "batchmean", 1.0, FP32, 1e-5, 5e-4, FLKL_ODD),
               (1.0, "batchmean", 1.0, FP16, 5e-3, 5e-2, FL_LLAMA), (2.0, "sum", 1.0, BF16, 5e0, 5e1, FLKL_ODD),
               (2.0, "sum", 1.0, FP32, 1e-3, 5e-2, FL_LLAMA), (2.0, "sum", 1.0, FP16, 5e-3, 5e-2, FLKL_ODD),
               (1.0, "mean", 1.0, BF16, 5e-3, 5e-2, FL_LLAMA), (1.0, "mean", 1.0, FP32, 1e-5, 5e-4, FLKL_ODD),
               (1.0, "mean", 1.0, FP16, 5e-3, 5e-2, FL_LLAMA)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, reduction, scalar, dtype, atol, rtol, shape", CORRECTNESS)
def test_fused_linear_kl_div_correctness(backend, temperature, reduction, scalar, dtype, atol, rtol, shape):
    _case(backend, shape, temperature, reduction, -100, scalar, dtype, atol, rtol, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, reduction, ignore_index, scalar, dtype, atol, rtol, shape", [
    (1.0, "batchmean", 2, 1.0, BF16, 5e-3, 5e-2, FLKL_ODD), (1.0, "batchmean", 2, 1.0, FP32, 1e-5, 5e-4, FL_LLAMA),
    (1.0, "batchmean", 2, 1.0, FP16, 5e-3, 5e-2, FLKL_ODD), (2.0, "sum", 42, 1.0, BF16, 5e0, 5e1, FL_LLAMA),
    (2.0, "sum", 42, 1.0, FP32, 1e-3, 5e-2, FLKL_ODD), (2.0, "sum", 42, 1.0, FP16, 5e-3, 5e-2, FL_LLAMA),
    (1.0, "mean", -100, 1.0, BF16, 5e-3, 5e-2, FLKL_ODD), (1.0, "mean", -100, 1.0, FP32, 1e-5, 5e-4, FL_LLAMA),
    (1.0, "mean", -100, 1.0, FP16, 5e-3, 5e-2, FLKL_ODD)])
def test_fused_linear_kl_div_correctness_with_ignore_index(backend, temperature, reduction, ignore_index, scalar,
                                                          dtype, atol, rtol, shape):
    _case(backend, shape, temperature, reduction, ignore_index, scalar, dtype, atol, rtol, "some")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, atol, rtol, temperature, reduction, ignore_index", [
    ((2, 2, 8, 8), BF16, 5e-3, 5e-2, 1.0, "batchmean", -100), ((9, 7, 41, 41), FP32, 1e-5, 5e-4, 2.0, "sum", 42),
    ((2, 2, 8, 8), FP16, 5e-3, 5e-2, 2.0, "sum", 42), ((9, 7, 41, 41), FP32, 1e-5, 5e-4, 1.0, "batchmean", -100)])
def test_fused_linear_kl_div_correctness_functional(backend, shape, dtype, atol, rtol, temperature, reduction,
                                                    ignore_index):
    """Liger's functional form against its autograd Function (scalar 0.5); here the module against the function,
    and the function against the reference."""
    device = device_for(backend)
    hidden, weight, target, gen = flkl_inputs(backend, shape, dtype, 0.5)
    labels = ignore_some(torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=gen), ignore_index, gen)
    x1, w1, x2, w2 = leaf(hidden, device), leaf(weight, device), leaf(hidden, device), leaf(weight, device)
    out1 = kdfast_kl_div(x1, w1, target, labels, temperature, reduction, ignore_index, backend, device, module=True)
    out2 = kdfast_kl_div(x2, w2, target, labels, temperature, reduction, ignore_index, backend, device)
    close(out1, out2, atol, rtol)
    out1.backward()
    check(out2, x2, w2, flkl_reference(hidden, weight, target, labels, temperature, reduction, ignore_index, dtype),
          dtype, atol, rtol)
    close(x1.grad, x2.grad, atol, rtol)
    close(w1.grad, w2.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, reduction, ignore_index, dtype, atol, rtol, shape", [
    (1.0, "batchmean", 2, BF16, 5e-3, 5e-2, FL_LLAMA), (2.0, "sum", 42, FP32, 1e-5, 5e-4, FLKL_ODD),
    (1.0, "batchmean", 2, FP16, 5e-3, 5e-2, FLKL_ODD), (2.0, "sum", 42, BF16, 5e-3, 5e-2, FL_LLAMA)])
def test_fused_linear_kl_div_correctness_all_ignored(backend, temperature, reduction, ignore_index, dtype, atol, rtol,
                                                     shape):
    out, x, w = _case(backend, shape, temperature, reduction, ignore_index, 1.0, dtype, atol, rtol, "all")
    assert out.item() == 0.0
    assert (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype, atol, rtol", [(BF16, 5e-3, 5e-2), (FP16, 5e-3, 5e-2)])
def test_fused_linear_kl_div_amp(backend, autocast_dtype, atol, rtol):
    """A float32 head, hidden states and target in the autocast dtype, the loss and its backward under
    torch.autocast (whose GEMM, in Liger's reference too, rounds the logits to the autocast dtype)."""
    device = device_for(backend)
    shape = (2, 2 if backend == "triton" and INTERPRETED else 4, 2048, 3200)  # Liger's B, T, H, V
    hidden, weight, target, gen = flkl_inputs(backend, shape, FP32, 1.0, hidden_dtype=autocast_dtype)
    labels = ignore_some(torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=gen), -100, gen)
    x, w = leaf(hidden, device), leaf(weight, device)
    with torch.autocast(device_type=device, dtype=autocast_dtype):
        out = kdfast_kl_div(x, w, target, labels, 1.0, "batchmean", -100, backend, device)
    check(out, x, w, flkl_reference(hidden, weight, target, labels, 1.0, "batchmean", -100, autocast_dtype),
          autocast_dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_kl_div_parity(backend):
    """Liger's cross-check against torch.nn.functional.kl_div (batchmean, float32, no labels)."""
    device = device_for(backend)
    torch.manual_seed(0)
    hidden = torch.randn(2 * 8, 128)
    weight = torch.randn(1024, 128)
    target = torch.rand(2 * 8, 1024).softmax(dim=-1)
    expected = F.kl_div(torch.log_softmax(hidden @ weight.t(), dim=-1), target, reduction="batchmean")
    got = kdfast_kl_div(hidden.to(device), weight.to(device), target, None, 1.0, "batchmean", -100, backend, device)
    close(got, expected, 1e-6, 1e-5)
