"""Several teachers mixed inside the CUDA row kernel (csrc/cuda/mixed_teachers.cuh), on a GPU: held to the torch
backend and the float64 reference for every divergence, M in {1, 2, 3, 5}, zero weights in some rows, -inf columns,
T in {0.5, 1, 2}, the CE with ignored rows, float32 and bf16; rows that are not 16-byte aligned, a real vocabulary
against the Triton kernel's mixture, the gradient written over the logits, the fused linear form, and teachers of
another dtype than the student's (mixed with torch)."""

from types import SimpleNamespace

import pytest
import torch
from mixture_cases import mixture_inputs

import kdfast
from kdfast.reference import multi_teacher_distill_loss_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
# (rtol, atol) of the loss and of the gradient against the float64 reference of the same (rounded) inputs: the
# gradient is stored in the student's dtype.
TOLERANCES = {torch.float32: ((1e-5, 1e-6), (1e-4, 2e-6)), torch.bfloat16: ((1e-5, 1e-6), (2e-2, 1e-3))}


def make_inputs(teachers: int, divergence: str, dtype, rows=6, vocab=45, seed=0):
    """mixture_cases.mixture_inputs on the GPU, the student and the teachers in `dtype`."""
    student, stacked, weights, labels = mixture_inputs(teachers, divergence, rows, vocab, seed)
    return student.to(dtype).cuda(), stacked.to(dtype).cuda(), weights.cuda(), labels.cuda()


def loss_and_gradient(student, teachers, labels, backend, **settings):
    s = student.clone().requires_grad_()
    loss = kdfast.multi_teacher_distill_loss(s, teachers, labels, backend=backend, **settings)
    loss.backward()
    return loss.detach(), s.grad


def assert_matches(student, stacked, labels, case, **settings):
    loss, grad = loss_and_gradient(student, list(stacked), labels, "cuda", **settings)
    torch_loss, torch_grad = loss_and_gradient(student, list(stacked), labels, "torch", **settings)
    s64 = student.double().requires_grad_()
    expected = multi_teacher_distill_loss_reference(s64, stacked.double(), labels, **settings)
    expected.backward()
    (loss_rtol, loss_atol), (grad_rtol, grad_atol) = TOLERANCES[student.dtype]
    assert bool(torch.isfinite(loss)), case
    assert grad.dtype == student.dtype, case
    torch.testing.assert_close(loss, torch_loss, rtol=loss_rtol, atol=loss_atol, msg=case)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=loss_rtol, atol=loss_atol, msg=case)
    torch.testing.assert_close(grad.double(), torch_grad.double(), rtol=grad_rtol, atol=grad_atol, msg=case)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=grad_rtol, atol=grad_atol, msg=case)


@pytest.fixture
def mixed_in_the_kernel(monkeypatch):
    """Fails a test whose CUDA call mixes a chunk with torch instead of in the kernel (the torch backend's calls, which
    the tests compare with, still do)."""
    from kdfast import teacher_mixture
    from kdfast.backends import cuda_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA backend mixed a chunk with torch")

    monkeypatch.setattr(cuda_backend, "teacher_mixture",
                        SimpleNamespace(kernel_teachers=teacher_mixture.kernel_teachers, mixture_rows_by_chunks=refuse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teachers", [1, 2, 3, 5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_kernel_mixture_equals_torch_and_the_float64_reference(mixed_in_the_kernel, divergence, teachers, dtype):
    student, stacked, weights, labels = make_inputs(teachers, divergence, dtype, seed=teachers)
    for temperature in (0.5, 1.0, 2.0):
        settings = dict(divergence=divergence, beta=0.3, temperature=temperature, ce_weight=0.5, weights=weights)
        assert_matches(student, stacked, labels, f"{divergence}, M={teachers}, {dtype}, T={temperature}", **settings)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_rows_off_16_bytes_take_the_scalar_path(mixed_in_the_kernel, divergence):
    student, stacked, weights, labels = make_inputs(3, divergence, torch.bfloat16, rows=7, vocab=1025, seed=4)
    # Columns 1.. of odd rows of bf16: 2-byte aligned only.
    assert_matches(student[:, 1:], stacked[:, :, 1:], labels.clamp(max=1023), divergence, divergence=divergence,
                   temperature=2.0, ce_weight=0.5, weights=weights)


def test_label_smoothing_and_the_z_loss(mixed_in_the_kernel):
    student, stacked, weights, labels = make_inputs(3, "jsd", torch.float32, seed=5)
    assert_matches(student, stacked, labels, "extras", divergence="jsd", temperature=2.0, ce_weight=0.5,
                   label_smoothing=0.1, z_loss_weight=1e-3, weights=weights)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_real_vocabulary_matches_the_triton_kernels_mixture(mixed_in_the_kernel, divergence):
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(11)
    student = (torch.randn(64, 32000, generator=generator) * 3).bfloat16().cuda()
    stacked = (torch.randn(3, 64, 32000, generator=generator) * 3).bfloat16().cuda()
    labels = torch.randint(0, 32000, (64,), generator=generator).cuda()
    settings = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, weights=[0.5, 0.3, 0.2])
    cuda_loss, cuda_grad = loss_and_gradient(student, list(stacked), labels, "cuda", **settings)
    triton_loss, triton_grad = loss_and_gradient(student, list(stacked), labels, "triton", **settings)
    torch.testing.assert_close(cuda_loss, triton_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cuda_grad.float(), triton_grad.float(), rtol=2e-2, atol=1e-6)


def test_the_gradient_over_the_logits(mixed_in_the_kernel):
    student, stacked, weights, labels = make_inputs(3, "forward_kl", torch.float32, seed=6)
    settings = dict(temperature=2.0, ce_weight=0.5, weights=weights)
    expected, expected_grad = loss_and_gradient(student, list(stacked), labels, "cuda", **settings)
    logits = student.clone().requires_grad_()
    loss = kdfast.multi_teacher_distill_loss(logits * 1.0, list(stacked), labels, backend="cuda",
                                             inplace_backward=True, **settings)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(logits.grad, expected_grad)


def test_the_fused_linear_form(mixed_in_the_kernel):
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(40, 32, generator=generator).cuda()
    weight = (torch.randn(300, 32, generator=generator) * 0.3).cuda()
    teacher_hidden = [torch.randn(40, size, generator=generator).cuda() for size in (32, 48)]
    teacher_weight = [(torch.randn(300, size, generator=generator) * 0.3).cuda() for size in (32, 48)]
    labels = torch.randint(0, 300, (40,), generator=generator).cuda()
    results = {}
    for backend in ("cuda", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = kdfast.linear_multi_teacher_distill_loss(h, w, teacher_hidden, teacher_weight, labels, chunk_size=16,
                                                        temperature=2.0, ce_weight=0.5, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), h.grad, w.grad)
    for ours, theirs in zip(results["cuda"], results["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_teachers_of_another_dtype_are_mixed_with_torch(monkeypatch):
    from kdfast import teacher_mixture
    from kdfast.backends import cuda_backend

    calls = []
    monkeypatch.setattr(cuda_backend, "teacher_mixture", SimpleNamespace(
        kernel_teachers=teacher_mixture.kernel_teachers,
        mixture_rows_by_chunks=lambda *args, **kwargs: calls.append(1) or teacher_mixture.mixture_rows_by_chunks(
            *args, **kwargs)))
    student, stacked, weights, labels = make_inputs(2, "forward_kl", torch.bfloat16, seed=9)
    settings = dict(temperature=2.0, ce_weight=0.5, weights=weights)
    loss, _ = loss_and_gradient(student, list(stacked.float()), labels, "cuda", **settings)
    assert calls, "float32 teachers of a bf16 student go to the torch mixture"
    expected = multi_teacher_distill_loss_reference(student.double(), stacked.double(), labels, **settings)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
