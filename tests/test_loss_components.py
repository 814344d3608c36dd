"""`return_components=True`: the divergence, the CE (each reduced as the loss is, before its weight) and the token
accuracy, from the same pass, on every backend and in every form, against the float64 reference; the loss and its
gradient are those of the call without them."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels, make_logits

import kdfast
from kdfast.dispatch import DeviceRows
from kdfast.kernel_abi import PART_CORRECT, SparseTargets
from kdfast.options import LossOptions
from kdfast.reduction import weighted_total
from kdfast.reference import (
    distill_loss_reference,
    linear_distill_loss_reference,
    linear_sparse_distill_loss_reference,
    sparse_distill_loss_reference,
)
from kdfast.sparse_options import SparseOptions

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def expected_components(reference, labels, student_logits, reduction, **settings):
    """(kd, ce, accuracy) from the reference: each term alone with weight 1 and no T^2, and the argmax's hits."""
    kd = reference(**{**settings, "kd_weight": 1.0, "ce_weight": 0.0, "t2_scale": False, "reduction": reduction})
    ce = reference(**{**settings, "kd_weight": 0.0, "ce_weight": 1.0, "reduction": reduction})
    kept = labels != -100
    hits = (student_logits.argmax(-1) == labels) & kept
    accuracy = hits.double() if reduction == "none" else hits.sum() / kept.sum().clamp(min=1)
    return kd, ce, accuracy


def assert_components(parts, expected):
    for name, value, want in zip(("kd", "ce", "accuracy"), (parts.kd, parts.ce, parts.accuracy), expected):
        assert not value.requires_grad, name
        torch.testing.assert_close(value.double().cpu(), want.double().cpu(), rtol=2e-5, atol=2e-5, msg=name)


def with_argmax_hits(student, labels):
    """Labels that the student's argmax hits on some rows, so that accuracy is neither 0 nor 1."""
    labels = labels.clone()
    flat, argmax = labels.view(-1), student.argmax(-1).view(-1)
    flat[1::4] = argmax[1::4]
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_components_match_the_reference(backend, reduction):
    device = device_for(backend)
    student, teacher = make_logits((2, 6, 97), torch.float32, device=device)
    labels = with_argmax_hits(student, make_labels((2, 6), 97, "some", device=device))
    s = student.clone().requires_grad_(True)
    loss, parts = kdfast.distill_loss(s, teacher, labels, reduction=reduction, backend=backend, return_components=True,
                                      **SETTINGS)
    loss.sum().backward()
    s_plain = student.clone().requires_grad_(True)
    plain = kdfast.distill_loss(s_plain, teacher, labels, reduction=reduction, backend=backend, **SETTINGS)
    plain.sum().backward()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(s.grad, s_plain.grad)

    def reference(**settings):
        return distill_loss_reference(student.double(), teacher.double(), labels, **settings)

    assert_components(parts, expected_components(reference, labels, student, reduction, **SETTINGS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_components_match_the_reference(backend, tail):
    device = device_for(backend)
    student, teacher = make_logits((2, 6, 97), torch.float32, device=device)
    labels = with_argmax_hits(student, make_labels((2, 6), 97, "some", device=device))
    top = torch.log_softmax(teacher / 2.0, dim=-1).topk(12, dim=-1)
    settings = dict(SETTINGS, divergence="jsd" if tail == "bucket" else "forward_kl", tail=tail)
    loss, parts = kdfast.sparse_distill_loss(student, top.indices, top.values, labels, backend=backend,
                                             return_components=True, **settings)

    def reference(**options):
        return sparse_distill_loss_reference(student.double(), top.indices, top.values.double(), labels, **options)

    assert_components(parts, expected_components(reference, labels, student, "mean", **settings))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_components_match_the_reference(backend, reduction):
    device = device_for(backend)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=generator).to(device)
    weight = torch.randn(101, 16, generator=generator).to(device) * 0.5
    teacher_hidden = torch.randn(2, 9, 24, generator=generator).to(device)
    teacher_weight = torch.randn(101, 24, generator=generator).to(device) * 0.5
    labels = with_argmax_hits(hidden @ weight.T, make_labels((2, 9), 101, "some", device=device))
    loss, parts = kdfast.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=5,
                                             reduction=reduction, backend=backend, return_components=True, **SETTINGS)

    def reference(**options):
        return linear_distill_loss_reference(hidden.double(), weight.double(), teacher_hidden.double(),
                                             teacher_weight.double(), labels, **options)

    assert_components(parts, expected_components(reference, labels, hidden @ weight.T, reduction, **SETTINGS))
    top = torch.log_softmax(teacher_hidden @ teacher_weight.T / 2.0, dim=-1).topk(10, dim=-1)
    loss, parts = kdfast.linear_sparse_distill_loss(hidden, weight, top.indices, top.values, labels, chunk_size=5,
                                                    reduction=reduction, backend=backend, return_components=True,
                                                    **SETTINGS)

    def sparse_reference(**options):
        return linear_sparse_distill_loss_reference(hidden.double(), weight.double(), top.indices,
                                                    top.values.double(), labels, **options)

    assert_components(parts, expected_components(sparse_reference, labels, hidden @ weight.T, reduction, **SETTINGS))


def test_components_follow_num_items_in_batch():
    student, teacher = make_logits((8, 33), torch.float32)
    labels = make_labels((8,), 33, "some")
    loss, parts = kdfast.distill_loss(student, teacher, labels, num_items_in_batch=20, return_components=True,
                                      **SETTINGS)
    _, whole = kdfast.distill_loss(student, teacher, labels, reduction="sum", return_components=True, **SETTINGS)
    torch.testing.assert_close(parts.kd, whole.kd / 20)
    torch.testing.assert_close(parts.ce, whole.ce / 20)
    torch.testing.assert_close(parts.accuracy, whole.accuracy)  # over this call's kept rows, not num_items


def test_a_part_with_no_weight_or_no_labels_is_none():
    student, teacher = make_logits((5, 33), torch.float32)
    labels = make_labels((5,), 33, "none")
    _, parts = kdfast.distill_loss(student, teacher, labels, kd_weight=0.0, ce_weight=1.0, return_components=True)
    assert parts.kd is None and parts.ce is not None and parts.accuracy is not None
    _, parts = kdfast.distill_loss(student, teacher, return_components=True)
    assert parts.kd is not None and parts.ce is None and parts.accuracy is None


def test_accuracy_counts_ties_and_skips_ignored_rows():
    student = torch.zeros(4, 10)
    student[0, 3] = 5.0  # row 0: argmax 3, label 3 -> hit
    student[1, 7] = 5.0  # row 1: argmax 7, label 2 -> miss
    labels = torch.tensor([3, 2, 4, -100])  # row 2: all equal, a tie at the label -> hit; row 3 ignored
    _, parts = kdfast.distill_loss(student, torch.zeros(4, 10), labels, ce_weight=1.0, return_components=True,
                                   backend="cpu")
    assert parts.accuracy.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # CUDA stops the step: test_cuda_step.py
@pytest.mark.parametrize("sparse", [False, True])
def test_a_label_out_of_range_poisons_its_row(backend, sparse):
    """What Triton on a GPU does without the host check (which would sync): the kernels' parts carry NaN into the
    total."""
    device = device_for(backend)
    student, teacher = make_logits((1, 3, 17), torch.float32, device=device)
    if sparse:
        top = teacher.log_softmax(-1).topk(4, dim=-1)
        teacher = SparseTargets(top.indices, top.values.contiguous())
        opts = SparseOptions(ce_weight=1.0, backend=backend)
    else:
        opts = LossOptions(ce_weight=1.0, backend=backend)
    labels = torch.tensor([1, 99, 2], device=device)
    parts = DeviceRows(backend)(student, teacher, labels, torch.ones((), device=device), None, opts)
    total = weighted_total(parts, opts)
    assert torch.isnan(total[1]) and not torch.isnan(total[[0, 2]]).any()
    assert parts[1, PART_CORRECT] == 0.0  # no hit
