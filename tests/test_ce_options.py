"""Label smoothing on the CE term (PyTorch's definition) and PaLM's z-loss, on every backend and in every form, against
the float64 reference; the reference itself against torch.nn.functional.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from helpers import make_labels, make_logits

import kdfast
from kdfast.reference import (
    distill_loss_reference,
    linear_distill_loss_reference,
    linear_sparse_distill_loss_reference,
    sparse_distill_loss_reference,
)

CASES = [dict(label_smoothing=0.1), dict(z_loss_weight=1e-2), dict(label_smoothing=0.2, z_loss_weight=1e-3),
         dict(kd_weight=0.0, label_smoothing=0.3), dict(ce_weight=0.0, z_loss_weight=1e-2)]


def _settings(case, temperature=2.0):
    return {"divergence": "jsd", "beta": 0.3, "temperature": temperature, "kd_weight": 0.7, "ce_weight": 0.4, **case}


def _labels_for(settings, shape, vocab, device):
    # The z-loss alone needs no labels.
    return make_labels(shape, vocab, "some", device=device) if settings["ce_weight"] else None


def test_the_reference_is_pytorchs_label_smoothing_and_palms_z_loss():
    student, teacher = make_logits((7, 40), torch.float64)
    labels = make_labels((7,), 40, "some")
    ce = distill_loss_reference(student, teacher, labels, kd_weight=0.0, ce_weight=1.0, label_smoothing=0.15)
    torch.testing.assert_close(ce, F.cross_entropy(student, labels, label_smoothing=0.15, ignore_index=-100))
    z = distill_loss_reference(student, teacher, kd_weight=0.0, z_loss_weight=1.0, reduction="none")
    torch.testing.assert_close(z, torch.logsumexp(student, dim=-1) ** 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_logits_match_the_reference(backend, case, temperature):
    device = device_for(backend)
    settings = _settings(case, temperature)
    student, teacher = make_logits((2, 5, 131), torch.float32, device=device)
    labels = _labels_for(settings, (2, 5), 131, device)
    s = student.clone().requires_grad_(True)
    loss, parts = kdfast.distill_loss(s, teacher, labels, backend=backend, return_components=True, **settings)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    ref = distill_loss_reference(s64, teacher.double(), labels, **settings)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-5, atol=2e-6)
    if settings.get("z_loss_weight"):
        z = distill_loss_reference(student.double(), teacher.double(), labels, kd_weight=0.0, ce_weight=0.0,
                                   z_loss_weight=1.0)
        torch.testing.assert_close(parts.z_loss.double(), z, rtol=2e-5, atol=2e-6)
    else:
        assert parts.z_loss is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_sparse_and_fused_linear_forms_match_the_reference(backend, case):
    device = device_for(backend)
    settings = _settings(case)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 16, generator=generator).to(device)
    weight = (torch.randn(90, 16, generator=generator) * 0.5).to(device)
    teacher_hidden = torch.randn(12, 24, generator=generator).to(device)
    teacher_weight = (torch.randn(90, 24, generator=generator) * 0.5).to(device)
    labels = _labels_for(settings, (12,), 90, device)
    w = weight.clone().requires_grad_(True)
    loss = kdfast.linear_distill_loss(hidden, w, teacher_hidden, teacher_weight, labels, chunk_size=5,
                                      backend=backend, **settings)
    loss.backward()
    w64 = weight.double().requires_grad_(True)
    ref = linear_distill_loss_reference(hidden.double(), w64, teacher_hidden.double(), teacher_weight.double(),
                                        labels, **settings)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-5, atol=2e-6)

    top = (teacher_hidden @ teacher_weight.T / settings["temperature"]).log_softmax(-1).topk(8, dim=-1)
    student_logits = (hidden @ weight.T).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(student_logits, top.indices, top.values, labels, backend=backend, **settings)
    loss.backward()
    s64 = (hidden @ weight.T).double().requires_grad_(True)
    ref = sparse_distill_loss_reference(s64, top.indices, top.values.double(), labels, **settings)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(student_logits.grad.double(), s64.grad, rtol=2e-5, atol=2e-6)
    loss = kdfast.linear_sparse_distill_loss(hidden, weight, top.indices, top.values, labels, chunk_size=5,
                                             backend=backend, **settings)
    ref = linear_sparse_distill_loss_reference(hidden.double(), weight.double(), top.indices, top.values.double(),
                                               labels, **settings)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)


def test_bad_settings_are_clear_errors():
    student, teacher = make_logits((3, 10), torch.float32)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        kdfast.distill_loss(student, teacher, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss_weight must be a finite number"):
        kdfast.distill_loss(student, teacher, z_loss_weight=float("nan"))
    with pytest.raises(ValueError, match="ce_weight=0.5 needs labels"):
        kdfast.distill_loss(student, teacher, ce_weight=0.5, label_smoothing=0.1)
