"""Several teachers mixed inside the Triton row kernel (kernels/mixture.py), held to the torch backend and the float64
reference: every divergence, M in {1, 2, 3, 5}, zero weights in some rows, -inf columns, bf16 teachers, T in
{0.5, 1, 2}, the CE with ignored rows; loss and the student's gradient. Under the interpreter on a CPU."""


import pytest
import torch
from conftest import device_for
from mixture_cases import mixture_inputs

import kdfast
from kdfast.kernel_abi import FUSED, MixedTeachers, Phase, PhaseCall
from kdfast.options import LossOptions
from kdfast.reference import multi_teacher_distill_loss_reference

pytest.importorskip("triton")

from kdfast.backends import triton_backend  # noqa: E402

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
ROWS, VOCAB = 6, 45
DEVICE = device_for("triton")


def make_inputs(teachers: int, divergence: str, teacher_dtype=torch.float32, seed: int = 0):
    """mixture_cases.mixture_inputs on the Triton backend's device, the teachers in `teacher_dtype`."""
    student, stacked, weights, labels = mixture_inputs(teachers, divergence, ROWS, VOCAB, seed)
    return student.to(DEVICE), stacked.to(teacher_dtype).to(DEVICE), weights.to(DEVICE), labels.to(DEVICE)


def loss_and_gradient(student, teachers, labels, backend, **settings):
    s = student.clone().requires_grad_()
    loss = kdfast.multi_teacher_distill_loss(s, teachers, labels, backend=backend, **settings)
    loss.backward()
    return loss.detach(), s.grad


def reference_loss_and_gradient(student, teachers, labels, **settings):
    s64 = student.double().requires_grad_()
    expected = multi_teacher_distill_loss_reference(s64, torch.stack(list(teachers)).double(), labels, **settings)
    expected.backward()
    return expected.detach(), s64.grad


@pytest.mark.parametrize("reads", ["twice", "once"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teachers", [1, 2, 3, 5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_kernel_mixture_equals_torch_and_the_float64_reference(monkeypatch, divergence, teachers, teacher_dtype,
                                                                   reads):
    """Both forms of the mixing kernel's reads (KDFAST_TRITON_MIX_READS). One temperature a case, by the number of
    teachers (the interpreter's calls are this file's minutes): each divergence, dtype and form of reads meets all
    three."""
    monkeypatch.setenv("KDFAST_TRITON_MIX_READS", reads)
    student, stacked, weights, labels = make_inputs(teachers, divergence, teacher_dtype, seed=teachers)
    temperature = {1: 0.5, 2: 1.0, 3: 2.0, 5: 0.5}[teachers]
    settings = dict(divergence=divergence, beta=0.3, temperature=temperature, ce_weight=0.5, weights=weights,
                    combine="mixture")
    loss, grad = loss_and_gradient(student, list(stacked), labels, "triton", **settings)
    torch_loss, torch_grad = loss_and_gradient(student, list(stacked), labels, "torch", **settings)
    expected, expected_grad = reference_loss_and_gradient(student, stacked, labels, **settings)
    case = f"{divergence}, M={teachers}, {teacher_dtype}, T={temperature}"
    assert bool(torch.isfinite(loss)), case
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=1e-6, msg=case)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-4, atol=1e-6, msg=case)
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-6, msg=case)
    torch.testing.assert_close(grad.double().cpu(), expected_grad.cpu(), rtol=1e-4, atol=2e-6, msg=case)


def test_the_fused_path_is_taken(monkeypatch):
    """No chunk of rows is mixed by torch: the backend has its own entry, with and without the KD term."""
    import kdfast.teacher_mixture

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton backend mixed a chunk with torch")

    monkeypatch.setattr(kdfast.teacher_mixture, "mixture_rows_by_chunks", refuse)
    student, stacked, weights, labels = make_inputs(3, "jsd", seed=7)
    for kd_weight in (1.0, 0.0):
        settings = dict(divergence="jsd", temperature=2.0, ce_weight=0.5, kd_weight=kd_weight, weights=weights)
        loss, grad = loss_and_gradient(student, list(stacked), labels, "triton", **settings)
        expected, expected_grad = reference_loss_and_gradient(student, stacked, labels, **settings)
        torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double().cpu(), expected_grad.cpu(), rtol=1e-4, atol=2e-6)


def test_teachers_apart_in_memory_and_of_two_dtypes():
    """Teachers in allocations of their own (offsets from teacher 0 either way), then of two dtypes (widened to one,
    as the C++ backend does), and the same weights in every row (a row stride of 0)."""
    student, stacked, _, labels = make_inputs(3, "forward_kl", seed=3)
    apart = [teacher.clone() for teacher in stacked]
    settings = dict(temperature=1.0, ce_weight=0.5, weights=[1.0, 0.0, 2.0])
    expected, expected_grad = reference_loss_and_gradient(student, stacked, labels, **settings)
    for teachers in (apart, [apart[0], apart[1].bfloat16(), apart[2]]):
        loss, grad = loss_and_gradient(student, teachers, labels, "triton", **settings)
        torch.testing.assert_close(loss, loss_and_gradient(student, teachers, labels, "torch", **settings)[0],
                                   rtol=1e-5, atol=1e-6)
        if teachers is apart:
            torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad.double().cpu(), expected_grad.cpu(), rtol=1e-4, atol=2e-6)


def test_offsets_refuse_teachers_of_another_layout_and_phases_other_than_fused():
    student, stacked, weights, labels = make_inputs(2, "forward_kl")
    first = stacked[0].unsqueeze(0)
    other = stacked[1].t().contiguous().t().unsqueeze(0)  # the same values, columns apart
    with pytest.raises(ValueError, match="teacher 1 .*: the teachers of one mixture must share dtype, layout"):
        triton_backend.teacher_offsets([first, other])
    assert triton_backend.teacher_offsets([first, stacked[1].unsqueeze(0)]).tolist() == [0, ROWS * VOCAB]
    mixed = MixedTeachers((first, stacked[1].unsqueeze(0)), weights.log())
    grad_scale = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="fused calls only"):
        triton_backend.mixture_forward_rows(student.unsqueeze(0), mixed, labels, grad_scale, None, LossOptions(),
                                            PhaseCall(Phase.STATS))
    parts = triton_backend.mixture_forward_rows(student.unsqueeze(0), mixed, labels, grad_scale, None, LossOptions(),
                                                FUSED)
    assert parts.shape == (ROWS, 5) and bool(torch.isfinite(parts).all())


# Forward and reverse KL (their own branches of the loss pass) on the whole grid; the other divergences share one
# branch: 5 bf16 teachers each.
OWN_CASES = [(divergence, teachers, dtype) for divergence in ("forward_kl", "reverse_kl") for teachers in (1, 2, 5)
             for dtype in (torch.float32, torch.bfloat16)]
OWN_CASES += [(divergence, 5, torch.bfloat16) for divergence in DIVERGENCES[2:]]


@pytest.mark.parametrize("reads", ["twice", "once"])
@pytest.mark.parametrize("divergence, teachers, teacher_dtype", OWN_CASES)
def test_each_teachers_divergence_comes_from_the_mixing_call(monkeypatch, teachers, teacher_dtype, divergence, reads):
    """return_components under every divergence: each teacher's own divergence is accumulated in the kernel's loss
    pass (no single-teacher call runs), equal to the float64 reference per teacher in every row: a routed-away teacher
    (weight 0 there) included, -inf columns (reverse KL: infinite), ignored rows 0; then the fused linear form."""
    from kdfast.reference import distill_loss_reference

    monkeypatch.setenv("KDFAST_TRITON_MIX_READS", reads)

    def refuse(*args, **kwargs):
        raise AssertionError("a single-teacher call ran for a teacher's own divergence")

    monkeypatch.setattr(triton_backend, "forward_rows", refuse)
    student, stacked, weights, labels = make_inputs(teachers, divergence, teacher_dtype, seed=20 + teachers)
    for temperature in (1.0, 2.0):
        _, parts = kdfast.multi_teacher_distill_loss(student, list(stacked), labels, weights=weights, ce_weight=0.5,
                                                     temperature=temperature, divergence=divergence,
                                                     reduction="none", backend="triton", return_components=True)
        for index in range(teachers):
            own = distill_loss_reference(student.double(), stacked[index].double(), labels, temperature=temperature,
                                         divergence=divergence, t2_scale=False, reduction="none")
            torch.testing.assert_close(parts.teachers[..., index].double().cpu(), own.cpu(), rtol=1e-5, atol=2e-5)
        assert bool((parts.teachers[[2, 5]] == 0).all()), "ignored rows have no divergence"
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(ROWS, 8, generator=generator), torch.randn(VOCAB, 8, generator=generator)
    heads = [torch.randn(VOCAB, 8, generator=generator) for _ in range(teachers)]
    _, parts = kdfast.linear_multi_teacher_distill_loss(hidden.to(DEVICE), weight.to(DEVICE),
                                                        [hidden.to(DEVICE)] * teachers, [h.to(DEVICE) for h in heads],
                                                        labels, chunk_size=4, reduction="sum", divergence=divergence,
                                                        backend="triton", return_components=True)
    for index, head in enumerate(heads):
        own = distill_loss_reference((hidden @ weight.t()).double(), (hidden @ head.t()).double(), labels.cpu(),
                                     divergence=divergence, t2_scale=False, reduction="sum")
        torch.testing.assert_close(parts.teachers[index].double().cpu(), own, rtol=1e-5, atol=2e-5)


def test_own_divergences_are_refused_without_a_divergence_or_of_another_shape():
    from kdfast.kernels.distill import distill_forward_rows

    student, stacked, weights, labels = make_inputs(2, "jsd")
    teachers = [teacher.unsqueeze(0) for teacher in stacked]
    mixture = (triton_backend.teacher_offsets(teachers), weights.log())
    for opts, shape in ((LossOptions(kd_weight=0.0, ce_weight=1.0), (ROWS, 2)), (LossOptions(divergence="jsd"),
                                                                                 (ROWS, 3))):
        with pytest.raises(ValueError, match=r"own_divergences: .*\[6, 2\].* in a call with a divergence only"):
            distill_forward_rows(student.unsqueeze(0), teachers[0], labels, torch.ones(1, device=DEVICE), None, opts,
                                 FUSED, mixture, torch.zeros(*shape, device=DEVICE))


def test_the_reads_setting_is_named_when_wrong(monkeypatch):
    monkeypatch.setenv("KDFAST_TRITON_MIX_READS", "thrice")
    student, stacked, weights, labels = make_inputs(2, "forward_kl")
    with pytest.raises(ValueError, match="KDFAST_TRITON_MIX_READS must be 'once' or 'twice', got 'thrice'"):
        kdfast.multi_teacher_distill_loss(student, list(stacked), labels, weights=weights, backend="triton")
