"""The CUDA kernels' own paths, on a GPU: rows split over several blocks, teacher dtypes other than the
student's, the loss without a gradient, and the automatic choice. (The shared grid of test_distill_loss.py
and test_numerics.py covers the one-block-per-row path.)"""

import pytest
import torch
from helpers import assert_matches_reference, make_labels, make_logits

import kdfast
from kdfast.reference import distill_loss_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_split_rows_match_reference(monkeypatch, splits, divergence, dtype, inplace):
    monkeypatch.setenv("KDFAST_CUDA_SPLITS", str(splits))
    student, teacher = make_logits((3, 5000), dtype, device="cuda")  # ragged last range; label in any range
    labels = make_labels((3,), 5000, "some", device="cuda")
    for temperature in (1.0, 2.0, 0.7):
        assert_matches_reference(student, teacher, labels, "cuda", divergence=divergence, temperature=temperature,
                                 ce_weight=0.5, beta=0.3, inplace_backward=inplace)


@pytest.mark.parametrize("splits", [0, 4])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_without_gradient(monkeypatch, splits, divergence):
    monkeypatch.setenv("KDFAST_CUDA_SPLITS", str(splits))
    student, teacher = make_logits((4, 3001), torch.float32, device="cuda")
    labels = make_labels((4,), 3001, "some", device="cuda")
    loss = kdfast.distill_loss(student, teacher, labels, divergence=divergence, ce_weight=0.5, temperature=2.0,
                               reduction="none", backend="cuda")
    ref = distill_loss_reference(student.double(), teacher.double(), labels, divergence=divergence,
                                 ce_weight=0.5, temperature=2.0, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                         (torch.float16, torch.float32),
                                                         (torch.bfloat16, torch.float16)])
def test_teacher_dtype_differs(student_dtype, teacher_dtype):
    student, _ = make_logits((4, 1024), student_dtype, device="cuda")
    _, teacher = make_logits((4, 1024), teacher_dtype, device="cuda")
    labels = make_labels((4,), 1024, "none", device="cuda")
    for divergence in DIVERGENCES:
        assert_matches_reference(student, teacher, labels, "cuda", divergence=divergence, ce_weight=0.5)


def test_misaligned_rows_take_the_scalar_path():
    student, teacher = make_logits((4, 1025), torch.bfloat16, device="cuda")  # odd rows: 2-byte aligned only
    for divergence in DIVERGENCES:
        assert_matches_reference(student[:, 1:], teacher[:, 1:], None, "cuda", divergence=divergence)


def test_cuda_matches_triton_at_a_real_vocab():
    student, teacher = make_logits((64, 128_256), torch.bfloat16, device="cuda")
    labels = make_labels((64,), 128_256, "some", device="cuda")
    results = []
    for backend in ("cuda", "triton"):
        s = student.clone().requires_grad_(True)
        loss = kdfast.distill_loss(s, teacher, labels, temperature=2.0, ce_weight=0.5, backend=backend)
        loss.backward()
        results.append((loss, s.grad.float()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-2, atol=1e-6)


def test_auto_picks_the_cuda_kernels():
    from kdfast.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "cuda"  # they built: conftest checks it
