"""Teacher and student padded to different vocabulary widths: `vocab_size` leaves the padding columns (head rows) out
of both softmaxes, without copying the logits, and gives them no gradient; on every backend and in every form."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels

import kdfast
from kdfast.reference import (
    distill_loss_reference,
    linear_distill_loss_reference,
    linear_sparse_distill_loss_reference,
    sparse_distill_loss_reference,
)

SHARED, STUDENT_WIDTH, TEACHER_WIDTH = 61, 64, 72
SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def padded_logits(device, padding_value=None):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, STUDENT_WIDTH, generator=generator) * 3
    teacher = torch.randn(2, 5, TEACHER_WIDTH, generator=generator) * 3
    if padding_value is not None:
        student[..., SHARED:] = padding_value
        teacher[..., SHARED:] = padding_value
    return student.to(device), teacher.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_of_different_widths_match_the_reference(backend, inplace):
    device = device_for(backend)
    student, teacher = padded_logits(device)
    labels = make_labels((2, 5), SHARED, "some", device=device)
    s = student.clone().requires_grad_(True)
    loss = kdfast.distill_loss(s * 1.0 if inplace else s, teacher, labels, vocab_size=SHARED, backend=backend,
                               inplace_backward=inplace, **SETTINGS)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    ref = distill_loss_reference(s64, teacher.double(), labels, vocab_size=SHARED, **SETTINGS)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-5, atol=2e-6)
    assert (s.grad[..., SHARED:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_columns_are_masked_not_zero_padded(backend):
    """Whatever the padding columns hold (a zero-padded logit would give its token real probability), the loss is
    that of the shared columns alone."""
    device = device_for(backend)
    labels = make_labels((2, 5), SHARED, "some", device=device)
    losses = []
    for padding in (0.0, 1e3, -1e3):
        student, teacher = padded_logits(device, padding)
        losses.append(kdfast.distill_loss(student, teacher, labels, vocab_size=SHARED, backend=backend, **SETTINGS))
    alone = kdfast.distill_loss(student[..., :SHARED], teacher[..., :SHARED], labels, backend=backend, **SETTINGS)
    for loss in losses:
        torch.testing.assert_close(loss, alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_student_wider_than_the_shared_vocabulary(backend):
    device = device_for(backend)
    student, teacher = padded_logits(device)
    top = teacher[..., :SHARED].log_softmax(-1).topk(8, dim=-1)
    labels = make_labels((2, 5), SHARED, "some", device=device)
    s = student.clone().requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, top.indices, top.values, labels, vocab_size=SHARED, backend=backend,
                                      **SETTINGS)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    ref = sparse_distill_loss_reference(s64, top.indices, top.values.double(), labels, vocab_size=SHARED, **SETTINGS)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_heads_of_different_sizes(backend):
    device = device_for(backend)
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(10, 12, generator=generator).to(device)
    teacher_hidden = torch.randn(10, 20, generator=generator).to(device)
    weight = (torch.randn(STUDENT_WIDTH, 12, generator=generator) * 0.5).to(device)
    teacher_weight = (torch.randn(TEACHER_WIDTH, 20, generator=generator) * 0.5).to(device)
    bias = torch.randn(STUDENT_WIDTH, generator=generator).to(device)
    labels = make_labels((10,), SHARED, "some", device=device)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    loss = kdfast.linear_distill_loss(hidden, w, teacher_hidden, teacher_weight, labels, student_bias=b,
                                      vocab_size=SHARED, chunk_size=4, backend=backend, **SETTINGS)
    loss.backward()
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    ref = linear_distill_loss_reference(hidden.double(), w64[:SHARED], teacher_hidden.double(),
                                        teacher_weight[:SHARED].double(), labels, student_bias=b64[:SHARED],
                                        **SETTINGS)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=2e-5, atol=2e-6)
    assert (w.grad[SHARED:] == 0).all() and (b.grad[SHARED:] == 0).all()
    top = (teacher_hidden @ teacher_weight[:SHARED].T / 2.0).log_softmax(-1).topk(6, dim=-1)
    loss = kdfast.linear_sparse_distill_loss(hidden, weight, top.indices, top.values, labels, vocab_size=SHARED,
                                             backend=backend, **SETTINGS)
    ref = linear_sparse_distill_loss_reference(hidden.double(), weight[:SHARED].double(), top.indices,
                                               top.values.double(), labels, **SETTINGS)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)


def test_mismatches_are_clear_errors():
    student, teacher = padded_logits("cpu")
    with pytest.raises(ValueError, match="pass vocab_size="):
        kdfast.distill_loss(student, teacher)
    with pytest.raises(ValueError, match="student_logits covers only 64 tokens"):
        kdfast.distill_loss(student, teacher, vocab_size=70)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 61\)"):
        kdfast.distill_loss(student, teacher, torch.full((2, 5), 62), vocab_size=SHARED, ce_weight=1.0)
    with pytest.raises(ValueError, match="vocab_size must be None or a positive int"):
        kdfast.distill_loss(student, teacher, vocab_size=0)
    with pytest.raises(ValueError, match="teacher_weight covers only 72 tokens"):
        kdfast.linear_distill_loss(torch.randn(3, 4), torch.randn(80, 4), torch.randn(3, 4), torch.randn(72, 4),
                                   vocab_size=75)
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, 61\)"):
        kdfast.sparse_distill_loss(student, torch.full((2, 5, 1), 62), torch.zeros(2, 5, 1), vocab_size=SHARED)
    with pytest.raises(ValueError, match="vocab_size is for a single device"):
        kdfast.distill_loss(student, teacher, vocab_size=SHARED, process_group=object())
