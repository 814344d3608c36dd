"""Liger-Kernel's JSD, KL-div and TVD cases (test/transformers/test_jsd.py, test_kl_div.py, test_tvd.py) on every
kdfast backend; how Liger's settings map onto kdfast's, and the tolerances, are in tests/liger_cases.py."""

import pytest
import torch
from conftest import BACKENDS, device_for
from liger_cases import (
    BF16,
    F64,
    FP16,
    FP32,
    as_leaf,
    close,
    dev,
    ignore_some,
    kept_mean,
    leaf,
    liger_jsd_rows,
    sized,
    verify,
)

import kdfast

# test/transformers/test_jsd.py (LigerJSD)
# ----------------------------------------------------------------------------------------------------------------

JSD_LLAMA, JSD_ODD = (2, 1024, 3200), (41, 401, 1271)  # Liger's two shapes, (B, T, V)
JSD_BF16, JSD_FP32, JSD_FP16 = (BF16, 1e-7, 5e-2), (FP32, 1e-7, 1e-6), (FP16, 1e-3, 1e-3)  # dtype, atol, rtol


def jsd_inputs(backend, shape, dtype, seed=42):
    """Liger's inputs: student and teacher log_softmax(randn) in `dtype`, [B*T, V], and the generator after them."""
    B, T, V = sized(backend, *shape)
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B * T, V, generator=gen, dtype=dtype).log_softmax(dim=-1)
    teacher = torch.randn(B * T, V, generator=gen, dtype=dtype).log_softmax(dim=-1)
    return student, teacher, gen


def kdfast_jsd(student, teacher, labels, backend, beta=0.5, ignore_index=-100):
    return kdfast.distill_loss(student, teacher, labels, divergence="jsd", beta=beta, temperature=1.0,
                               t2_scale=False, ignore_index=ignore_index, backend=backend)


def jsd_reference(student, teacher, labels, beta=0.5, ignore_index=-100):
    def reference(precision):
        s = as_leaf(student, precision)
        rows = liger_jsd_rows(s.log_softmax(-1), teacher.to(precision).log_softmax(-1), beta)
        return kept_mean(rows, labels, ignore_index), [s]

    return reference


def _jsd_once(backend, shape, dtype, atol, rtol, upstream):
    device = device_for(backend)
    student, teacher, _ = jsd_inputs(backend, shape, dtype)
    x = leaf(student, device)
    out = kdfast_jsd(x, teacher.to(device), None, backend)
    # Liger's symmetry check: at beta 0.5 swapping student and teacher gives the same loss.
    close(kdfast_jsd(teacher.to(device), student.to(device), None, backend), out, atol, rtol)
    verify(out, [x], jsd_reference(student, teacher, None), dtype, atol, rtol, upstream)


# Liger crosses its two shapes with three dtypes; test_correctness and test_correctness_not_last together take all six.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, atol, rtol", [(JSD_LLAMA, *JSD_BF16), (JSD_ODD, *JSD_FP32),
                                                      (JSD_LLAMA, *JSD_FP16)])
def test_jsd_correctness(backend, shape, dtype, atol, rtol):
    _jsd_once(backend, shape, dtype, atol, rtol, upstream=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, atol, rtol", [(JSD_ODD, *JSD_BF16), (JSD_LLAMA, *JSD_FP32),
                                                      (JSD_ODD, *JSD_FP16)])
def test_jsd_correctness_not_last(backend, shape, dtype, atol, rtol):
    """Not the last layer: an upstream gradient of 2 (Liger's kernel skips the multiply when it is 1)."""
    _jsd_once(backend, shape, dtype, atol, rtol, upstream=torch.tensor(2.0, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, shape, dtype, atol, rtol", [
    (0.0, JSD_LLAMA, *JSD_FP32), (0.1, JSD_ODD, *JSD_FP32), (0.5, JSD_LLAMA, *JSD_FP32), (0.9, JSD_ODD, *JSD_FP32),
    (1.0, JSD_LLAMA, *JSD_FP32), (0.1, JSD_LLAMA, *JSD_BF16), (0.9, JSD_ODD, *JSD_FP16)])
def test_jsd_correctness_with_beta(backend, beta, shape, dtype, atol, rtol):
    device = device_for(backend)
    student, teacher, _ = jsd_inputs(backend, shape, dtype)
    x = leaf(student, device)
    out = kdfast_jsd(x, teacher.to(device), None, backend, beta=beta)
    verify(out, [x], jsd_reference(student, teacher, None, beta=beta), dtype, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index, shape, dtype, atol, rtol", [(2, JSD_LLAMA, *JSD_BF16), (42, JSD_ODD, *JSD_FP32),
                                                                    (2, JSD_ODD, *JSD_FP16)])
def test_jsd_correctness_with_ignore_index(backend, ignore_index, shape, dtype, atol, rtol):
    device = device_for(backend)
    student, teacher, gen = jsd_inputs(backend, shape, dtype)
    # Labels in [0, V), then some set to ignore_index (2 and 42 are token ids too: such rows are ignored as well).
    labels = ignore_some(torch.randint(0, student.shape[-1], (student.shape[0],), generator=gen), ignore_index, gen)
    x = leaf(student, device)
    out = kdfast_jsd(x, teacher.to(device), labels.to(device), backend, ignore_index=ignore_index)
    verify(out, [x], jsd_reference(student, teacher, labels, ignore_index=ignore_index), dtype, atol, rtol)
    assert (x.grad[(labels == ignore_index).to(device)] == 0).all(), "an ignored row gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, ignore_index, is_last_layer, shape, dtype, atol, rtol", [
    (0.5, 2, False, JSD_LLAMA, *JSD_FP32), (0.1, 42, True, JSD_ODD, *JSD_BF16)])
def test_jsd_correctness_functional(backend, beta, ignore_index, is_last_layer, shape, dtype, atol, rtol):
    """Liger checks its autograd Function against its functional form; here kdfast's `DistillLoss` module against
    `distill_loss`, and both against the reference."""
    device = device_for(backend)
    student, teacher, gen = jsd_inputs(backend, shape, dtype)
    labels = ignore_some(torch.randint(0, student.shape[-1], (student.shape[0],), generator=gen), ignore_index, gen)
    up = torch.tensor(1.0 if is_last_layer else 2.0, dtype=F64)
    x1, x2 = leaf(student, device), leaf(student, device)
    module = kdfast.DistillLoss(divergence="jsd", beta=beta, temperature=1.0, t2_scale=False,
                                ignore_index=ignore_index, backend=backend)
    out1 = module(x1, teacher.to(device), labels.to(device))
    out2 = kdfast_jsd(x2, teacher.to(device), labels.to(device), backend, beta=beta, ignore_index=ignore_index)
    close(out1, out2, atol, rtol)
    out1.backward(up.to(out1.dtype).to(device))
    verify(out2, [x2], jsd_reference(student, teacher, labels, beta, ignore_index), dtype, atol, rtol, up)
    close(x1.grad, x2.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_correctness_with_all_indices_ignored(backend):
    device = device_for(backend)
    B, T, V, dtype, atol, rtol = 2, 10, 32, BF16, 1e-3, 1e-3  # Liger's own small case, kept
    gen = torch.Generator().manual_seed(42)
    student = torch.randn(B * T, V, generator=gen, dtype=dtype).log_softmax(dim=-1)
    teacher = torch.randn(B * T, V, generator=gen, dtype=dtype).log_softmax(dim=-1)
    labels = torch.full((B * T,), -100)
    x = leaf(student, device)
    out = kdfast_jsd(x, teacher.to(device), labels.to(device), backend)
    verify(out, [x], jsd_reference(student, teacher, labels), dtype, atol, rtol)
    assert torch.isfinite(out) and out.item() == 0.0, "no kept row: the mean is 0, never NaN"
    assert (x.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# test/transformers/test_kl_div.py (LigerKLDIVLoss, log_target=False): forward KL of a probability target
# ----------------------------------------------------------------------------------------------------------------

KL_LLAMA, KL_ODD = (1, 4096, 32000), (41, 401, 1271)
KL_BF16, KL_FP32, KL_FP16 = (BF16, 1e-8, 5e-2), (FP32, 1e-8, 1e-6), (FP16, 1e-3, 1e-3)
# KLDivLoss's reductions -> kdfast's: "batchmean" is the mean over rows, "mean" over every element (kdfast's sum
# divided by B*T*V), "none" element-wise (compared per row: kdfast's rows are the elements' sums).
KL_REDUCTION = {"batchmean": "mean", "sum": "sum", "mean": "sum", "none": "none"}


def _kl_div_once(backend, shape, reduction, dtype, atol, rtol, upstream):
    device = device_for(backend)
    B, T, V = sized(backend, *shape)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(B * T, V, generator=gen, dtype=dtype).log_softmax(dim=-1)
    target = torch.randn(B * T, V, generator=gen).softmax(dim=-1)  # float32 probabilities, as Liger's
    x = leaf(student, device)
    # A probability target is the teacher whose logits are its logs.
    out = kdfast.distill_loss(x, target.log().to(device), divergence="forward_kl", temperature=1.0, t2_scale=False,
                              reduction=KL_REDUCTION[reduction], backend=backend)
    if reduction == "mean":
        out = out / (B * T * V)

    def reference(precision):
        s = as_leaf(student, precision)
        log_p = target.to(precision).log().log_softmax(-1)
        rows = (log_p.exp() * (log_p - s.log_softmax(-1))).sum(-1)
        return {"batchmean": rows.sum() / (B * T), "sum": rows.sum(), "mean": rows.sum() / (B * T * V),
                "none": rows}[reduction], [s]

    # Liger runs no backward for "none".
    verify(out, [x] if reduction != "none" else None, reference, dtype, atol, rtol, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, dtype, atol, rtol", [
    ("batchmean", KL_LLAMA, *KL_FP32), ("sum", KL_ODD, *KL_FP32), ("mean", KL_LLAMA, *KL_FP16),
    ("none", KL_LLAMA, *KL_FP32), ("none", KL_ODD, *KL_BF16), ("batchmean", KL_ODD, *KL_FP16)])
def test_kl_div_correctness(backend, reduction, shape, dtype, atol, rtol):
    _kl_div_once(backend, shape, reduction, dtype, atol, rtol, upstream=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape, dtype, atol, rtol", [
    ("batchmean", KL_ODD, *KL_BF16), ("sum", KL_LLAMA, *KL_BF16), ("mean", KL_ODD, *KL_FP32)])
def test_kl_div_correctness_not_last(backend, reduction, shape, dtype, atol, rtol):
    _kl_div_once(backend, shape, reduction, dtype, atol, rtol, upstream=torch.tensor(2.0, dtype=F64))


# ----------------------------------------------------------------------------------------------------------------
# test/transformers/test_tvd.py (LigerTVDLoss): 0.5 * sum |p - q|, float32 (see the test's docstring)
# ----------------------------------------------------------------------------------------------------------------

TVD_FP32 = (FP32, 1e-8, 1e-6)
# Liger's "mean" is over every element (kdfast's mean over the kept rows divided by V); "none" element-wise (compared
# per row, kdfast's rows being the elements' sums).
TVD_REDUCTION = {"batchmean": "mean", "sum": "sum", "mean": "mean", "none": "none"}


def _tvd_once(backend, shape, reduction, dtype, atol, rtol, ignore_index=None, upstream=None):
    """Liger feeds randn(B*T, V) as its first "distribution" and softmax(randn) as the second. kdfast's student is
    the softmax of its logits: Liger's randn input is passed as the student's logits and the reference takes its
    softmax (a raw randn row is no distribution, and kdfast has no probability-space input). Liger's bf16 rows
    (atol 1e-8, rtol 1e-6) compare two bf16 computations alike to the bit; against float64 a bf16 gradient's own
    rounding (2^-9) cannot meet them, so float32 only."""
    device = device_for(backend)
    B, T, V = sized(backend, *shape)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(B * T, V, generator=gen, dtype=dtype)
    target = torch.randn(B * T, V, generator=gen).softmax(dim=-1)
    labels = None
    if ignore_index is not None:
        labels = ignore_some(torch.randint(0, V, (B * T,), generator=gen), ignore_index, gen)
    x = leaf(student, device)
    out = kdfast.distill_loss(x, target.log().to(device), dev(labels, device), divergence="tvd", temperature=1.0,
                              t2_scale=False, ignore_index=-100 if ignore_index is None else ignore_index,
                              reduction=TVD_REDUCTION[reduction], backend=backend)
    if reduction == "mean":
        out = out / V

    def reference(precision):
        s = as_leaf(student, precision)
        tvd = (s.softmax(-1) - target.to(precision).log().softmax(-1)).abs().sum(-1) / 2
        keep = labels != ignore_index if labels is not None else torch.ones(B * T, dtype=torch.bool)
        tvd = torch.where(keep, tvd, torch.zeros_like(tvd))
        kept = keep.sum().clamp(min=1)
        return {"batchmean": tvd.sum() / kept, "sum": tvd.sum(), "mean": tvd.sum() / (kept * V),
                "none": tvd}[reduction], [s]

    verify(out, [x] if reduction != "none" else None, reference, dtype, atol, rtol, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape", [("batchmean", (1, 4096, 32000)), ("sum", (32, 4096, 1024)),
                                              ("mean", (41, 401, 1271)), ("none", (3, 423, 32000)),
                                              ("batchmean", (1, 4096, 128256))])
def test_tvd_correctness(backend, reduction, shape):
    _tvd_once(backend, shape, reduction, *TVD_FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, shape", [("batchmean", (41, 401, 1271)), ("sum", (3, 423, 32000)),
                                              ("mean", (32, 4096, 1024))])
def test_tvd_correctness_not_last(backend, reduction, shape):
    _tvd_once(backend, shape, reduction, *TVD_FP32, upstream=torch.tensor(2.0, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index, reduction, shape", [(-100, "batchmean", (32, 4096, 1024)),
                                                            (0, "mean", (3, 423, 32000)),
                                                            (1, "none", (41, 401, 1271)),
                                                            (0, "sum", (1, 4096, 32000))])
def test_tvd_correctness_with_ignore_index(backend, ignore_index, reduction, shape):
    _tvd_once(backend, shape, reduction, *TVD_FP32, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------------
