"""Every bad input is a ValueError naming the argument and what was expected."""

import pytest
import torch

import kdfast


def _inputs(rows=4, vocab=10):
    return torch.randn(rows, vocab), torch.randn(rows, vocab), torch.randint(0, vocab, (rows,))


@pytest.mark.parametrize("kwargs,teacher_shape,labels_override,match", [
    ({}, (4, 11), None, "vocab size"),
    ({}, (5, 10), None, "teacher_logits shape"),
    ({}, None, torch.zeros(3, dtype=torch.long), "labels shape"),
    ({"ce_weight": 1.0}, None, torch.tensor([0, 1, 10, 2]), r"labels must lie in \[0, 10\)"),
    ({"ce_weight": 1.0}, None, torch.tensor([0, 1, -5, 2]), r"labels must lie in \[0, 10\)"),
    ({"ce_weight": 1.0}, None, "none", "needs labels"),
    ({"temperature": 0.0}, None, None, "temperature must be"),
    ({"temperature": -1.0}, None, None, "temperature must be"),
    ({"beta": 1.5}, None, None, r"beta must be a number in \[0, 1\]"),
    ({"beta": -0.1}, None, None, r"beta must be a number in \[0, 1\]"),
    ({"beta": 1e-40, "divergence": "skew_reverse_kl"}, None, None, "beta must be 0 or at least 1e-30"),
    ({"beta": 2.0**-126, "divergence": "skew_forward_kl"}, None, None, "beta must be 0 or at least 1e-30"),
    ({"beta": 1e-39, "divergence": "jsd"}, None, None, "beta must be 0 or at least 1e-30 for divergence='jsd'"),
    ({"beta": 1.0, "divergence": "skew_forward_kl"}, None, None, "beta must be below 1"),
    ({"beta": 1.0, "divergence": "skew_reverse_kl"}, None, None, "beta must be below 1"),
    ({"divergence": "kl"}, None, None, "divergence must be one of"),
    ({"reduction": "batchmean"}, None, None, "reduction must be one of"),
    ({"backend": "tpu"}, None, None, "backend must be one of"),
    ({}, None, torch.zeros(4), "labels must be an integer tensor"),
    ({"num_items_in_batch": 0}, None, None, "num_items_in_batch must be a positive number"),
])
def test_value_errors(kwargs, teacher_shape, labels_override, match):
    student, teacher, labels = _inputs()
    if teacher_shape is not None:
        teacher = torch.randn(teacher_shape)
    if isinstance(labels_override, torch.Tensor):
        labels = labels_override
    elif labels_override == "none":
        labels = None
    with pytest.raises(ValueError, match=match):
        kdfast.distill_loss(student, teacher, labels, **kwargs)


def test_integer_logits_are_refused():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="student_logits must be float32, bfloat16 or float16"):
        kdfast.distill_loss(student.long(), teacher, labels)
    with pytest.raises(ValueError, match="teacher_logits must be float32, bfloat16 or float16"):
        kdfast.distill_loss(student, teacher.int(), labels)


def test_mismatched_devices_are_refused():
    student, teacher, labels = _inputs()
    meta_teacher = torch.empty(teacher.shape, device="meta")
    with pytest.raises(ValueError, match="same device"):
        kdfast.distill_loss(student, meta_teacher, labels)
    with pytest.raises(ValueError, match="labels are on"):
        kdfast.distill_loss(student, teacher, labels.to("meta"))


def test_teacher_requiring_grad_is_refused():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        kdfast.distill_loss(student, teacher.requires_grad_(True), labels)


def test_bad_settings_fail_when_the_module_is_built():
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdfast.DistillLoss(divergence="wasserstein")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kdfast.distill_loss(student, teacher, labels, backend="triton")


def test_one_dimensional_logits_are_refused():
    with pytest.raises(ValueError, match=r"student_logits must have shape \[tokens, vocab\]"):
        kdfast.distill_loss(torch.randn(10), torch.randn(10))


def test_cuda_backend_on_cpu_tensors_is_refused():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        kdfast.distill_loss(student, teacher, labels, backend="cuda")
