"""Method "mapped" on its one-pass-per-row kernels, the C++ one (csrc/cpu/mapped_rows.cpp) and the Triton one
(kernels/mapped.py; under TRITON_INTERPRET=1 on the CPU): the teacher's dense row read through the map, never the
sparse kernels (whose K ids a row no GPU holds in one block at a real map's K ~ V, and whose scalar buckets were the
CPU's cost), held to the float64 reference under every divergence, at rows wider than a block, with both
temperatures, CE, ignored rows, a student whose every column is matched, near-one-hot rows, masked columns, 16-bit
logits, rows with a stride and the gradient written over the logits; their components equal the torch backend's."""

import pytest
import torch
from conftest import device_for

import kdfast
import kdfast.backends.cpu_backend as cpu_backend
from kdfast.reference import cross_vocab_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


class Vocabulary:
    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def vocab_map(student_vocab: int, teacher_vocab: int, shared: int, seed: int = 0):
    """`shared` of the teacher's strings held by the student, in a shuffled order, beside its own."""
    generator = torch.Generator().manual_seed(seed)
    teacher = {f"t{i}": i for i in range(teacher_vocab)}
    strings = [f"t{i}" for i in torch.randperm(teacher_vocab, generator=generator)[:shared].tolist()]
    strings += [f"s{i}" for i in range(student_vocab - shared)]
    order = torch.randperm(student_vocab, generator=generator).tolist()
    return kdfast.VocabMap.from_tokenizers(Vocabulary({strings[p]: i for i, p in enumerate(order)}),
                                           Vocabulary(teacher))


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch):
    """The kernel under test; every call here must take it: the sparse kernels refuse to run."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"method='mapped' on {request.param} ran a sparse kernel")

    if request.param == "triton":
        pytest.importorskip("triton")
        import kdfast.kernels.sparse as sparse_kernel

        monkeypatch.setattr(sparse_kernel, "sparse_forward_rows", refuse)
    monkeypatch.setattr(cpu_backend, "sparse_forward_rows", refuse)
    return request.param


def rows(student_vocab, teacher_vocab, count=5, scale=2.0, seed=1):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(count, student_vocab, generator=generator) * scale
    teacher = torch.randn(count, teacher_vocab, generator=generator) * scale
    labels = torch.randint(0, student_vocab, (count,), generator=generator)
    labels[1] = -100
    return student, teacher, labels


def check_against_reference(backend, student, teacher, labels, vmap, rtol=1e-5, grad_rtol=1e-4, grad_atol=1e-6,
                            **settings):
    device = device_for(backend)
    s = student.detach().to(device).requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, teacher.to(device), labels.to(device), vocab_map=vmap, method="mapped",
                                           backend=backend, **settings)
    reduction = settings.get("reduction", "mean")
    (loss.sum() if reduction == "none" else loss).backward()
    loss, grad = loss.cpu(), s.grad.cpu()
    # The float64 reference on the CPU, whichever device the rows came on (a strided view may come on the GPU).
    s64 = student.detach().cpu().double().requires_grad_()
    expected = cross_vocab_distill_loss_reference(s64, teacher.cpu().double(), labels.cpu(), vocab_map=vmap,
                                                  method="mapped", **settings)
    (expected.sum() if reduction == "none" else expected).backward()
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=grad_rtol, atol=grad_atol)
    return loss


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (1.5, 0.7)])
def test_every_divergence_over_rows_wider_than_a_block(backend, divergence, temperatures):
    """5000 student and 6000 teacher columns: each pass walks two blocks of 4096, the second partly masked."""
    vmap = vocab_map(5000, 6000, 3500)
    student, teacher, labels = rows(5000, 6000)
    check_against_reference(backend, student, teacher, labels, vmap, divergence=divergence, beta=0.3,
                            temperature=temperatures[0], teacher_temperature=temperatures[1], ce_weight=0.3)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd", "skew_reverse_kl"])
def test_a_student_whose_every_column_is_matched(backend, divergence):
    """No rest bucket on either side: the teacher's extra mass is dropped as the sparse algebra drops it."""
    vmap = vocab_map(300, 420, 300)
    student, teacher, labels = rows(300, 420)
    check_against_reference(backend, student, teacher, labels, vmap, divergence=divergence, ce_weight=0.2,
                            reduction="none")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_near_one_hot_rows_and_masked_columns(backend, divergence):
    """Logits 30x the usual spread (the scores centred on the student's largest bucket keep the gradient), a row
    whose largest bucket is its rest, and columns at -inf on both sides, off the map (at a matched column one KL or
    the other is infinite). Reverse KL's scores log q - log p reach ~100 here, where float32 keeps ~1e-5 of them
    (the torch backend's sparse algebra errs 1.2e-4 on this case, this kernel 2.1e-5)."""
    vmap = vocab_map(500, 600, 350)
    student, teacher, labels = rows(500, 600, scale=30.0, seed=4)
    student_off_map = torch.ones(500, dtype=torch.bool)
    student_off_map[vmap.student_ids] = False
    teacher_off_map = torch.ones(600, dtype=torch.bool)
    teacher_off_map[vmap.teacher_ids] = False
    student_rest = student_off_map.nonzero().flatten()
    student[3, student_rest[0]] = 400.0
    student[0, student_rest[1:18]] = float("-inf")
    teacher[2, teacher_off_map.nonzero().flatten()[:50]] = float("-inf")
    labels[0] = int(vmap.student_ids[0])
    loss = check_against_reference(backend, student, teacher, labels, vmap, divergence=divergence, beta=0.5,
                                   ce_weight=0.4, rtol=1e-4, grad_rtol=2e-4,
                                   grad_atol=5e-5 if "reverse" in divergence else 1e-6)
    assert torch.isfinite(loss)


def test_components_equal_the_torch_backend_and_in_place_writes_the_same_gradient(backend):
    vmap = vocab_map(700, 900, 500)
    student, teacher, labels = (x.to(device_for(backend)) for x in rows(700, 900, seed=7))
    settings = dict(vocab_map=vmap, method="mapped", divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5,
                    return_components=True)
    found = {}
    for name in (backend, "torch"):
        s = student.clone().requires_grad_()
        loss, parts = kdfast.cross_vocab_distill_loss(s, teacher, labels, backend=name, **settings)
        loss.backward()
        found[name] = (loss, parts, s.grad)
    (loss, parts, grad), (torch_loss, torch_parts, torch_grad) = found[backend], found["torch"]
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=1e-6)
    for name in ("kd", "ce", "entropy", "accuracy"):
        torch.testing.assert_close(getattr(parts, name), getattr(torch_parts, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-4, atol=1e-7)
    work = student.clone()
    leaf = work.detach().requires_grad_()
    in_place, _ = kdfast.cross_vocab_distill_loss(leaf, teacher, labels, backend=backend, inplace_backward=True,
                                                  **settings)
    (written,) = torch.autograd.grad(in_place, leaf)
    assert written.data_ptr() == work.data_ptr()
    torch.testing.assert_close(written, grad, rtol=0, atol=0)


def test_sixteen_bit_logits_and_rows_with_a_stride(backend):
    device = device_for(backend)
    vmap = vocab_map(400, 500, 300)
    student, teacher, labels = rows(400, 500, seed=9)
    wide = torch.randn(5, 460, device=device)
    wide[:, :400] = student.to(device)
    strided = wide[:, :400]  # rows 460 apart: check_against_reference hands the kernel this view as it is
    assert strided.stride(0) == 460
    check_against_reference(backend, strided, teacher, labels, vmap, divergence="reverse_kl", ce_weight=0.3)
    half_student, half_teacher = student.bfloat16(), teacher.bfloat16()
    s = half_student.detach().to(device).requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, half_teacher.to(device), labels.to(device), vocab_map=vmap,
                                           method="mapped", backend=backend, divergence="forward_kl", ce_weight=0.3)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    loss, grad = loss.cpu(), s.grad.cpu()
    s32 = half_student.float().requires_grad_()
    expected = cross_vocab_distill_loss_reference(s32.double(), half_teacher.double(), labels, vocab_map=vmap,
                                                  method="mapped", ce_weight=0.3)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), s32.grad.double(), rtol=1e-2, atol=1e-5)


def test_a_dominant_matched_bucket_keeps_its_small_gradient(backend):
    """The student's mass on one matched column (1 - 1e-6) where the teacher's is e^-30: reverse KL's scores there
    are ~30, and the gradient at that column (~1e-5) is the difference of two such numbers unless the scores are
    centred on the largest bucket, as the sparse kernel centres them."""
    vmap = vocab_map(600, 700, 400)
    student, teacher, labels = rows(600, 700, scale=1.0, seed=11)
    for row in range(student.shape[0]):
        column = int(vmap.student_ids[row * 7])
        student[row, column] = 22.0
        teacher[row, int(vmap.teacher_ids[row * 7])] = -30.0
    check_against_reference(backend, student, teacher, labels, vmap, divergence="reverse_kl", ce_weight=0.0,
                            grad_rtol=1e-3, grad_atol=1e-8)


@pytest.mark.parametrize("divergence, empty", [("reverse_kl", "teacher"), ("forward_kl", "student"),
                                               ("jsd", "student")])
def test_an_empty_rest_is_floored_as_the_sparse_algebra_floors_it(backend, divergence, empty):
    """A rest whose every column is -inf: the teacher's under reverse KL (floored at 1e-7), the student's (its log
    floored at -87.3 against its largest exp): finite, and the torch backend's sparse algebra's value and gradient."""
    vmap = vocab_map(400, 500, 300)
    device = device_for(backend)
    student, teacher, labels = (x.to(device) for x in rows(400, 500, seed=13))
    side, ids, width = (teacher, vmap.teacher_ids, 500) if empty == "teacher" else (student, vmap.student_ids, 400)
    off_map = torch.ones(width, dtype=torch.bool, device=device)
    off_map[ids.to(device)] = False
    side[:, off_map] = float("-inf")
    labels[labels >= 0] = vmap.student_ids[:4].to(device)  # a label at a -inf logit would make the CE infinite
    found = []
    for name in (backend, "torch"):
        s = student.clone().requires_grad_()
        loss = kdfast.cross_vocab_distill_loss(s, teacher, labels, vocab_map=vmap, method="mapped", backend=name,
                                               divergence=divergence, ce_weight=0.2)
        loss.backward()
        found.append((loss, s.grad))
    assert torch.isfinite(found[0][0])
    torch.testing.assert_close(found[0][0], found[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found[0][1], found[1][1], rtol=1e-4, atol=1e-7)
    # And the floored algebra in float64 on the dense teacher's exact log-probs: a rest that is exactly 0 is the
    # floor's, not the float32 rounding of 1 - sum(p) (which is of the floor's size, and moved the torch backend's
    # reverse KL by 0.1 in a row between two builds of torch's CPU kernels).
    from kdfast.reference import sparse_distill_loss_reference

    rows_count = student.shape[0]
    s64 = student.detach().cpu().double().requires_grad_()
    log_p = torch.log_softmax(teacher.cpu().double(), dim=-1)[:, vmap.teacher_ids]
    expected = sparse_distill_loss_reference(s64, vmap.student_ids.expand(rows_count, -1), log_p, labels.cpu(),
                                             divergence=divergence, ce_weight=0.2)
    expected.backward()
    torch.testing.assert_close(found[0][0].cpu().double(), expected, rtol=1e-5, atol=1e-6)
    if empty == "teacher":  # (the reference differentiates the student's floor through its largest logit; not so
        # the kernels, for which the floor is a constant of the row)
        torch.testing.assert_close(found[0][1].cpu().double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_a_student_wider_than_its_teacher_and_tied_largest_logits(backend):
    """700 student columns beside 500 teacher ones (each pass takes the other side's max on the way: over the
    shorter row, then the longer one's rest), an ignored row between kept ones, and rows whose largest logit is tied:
    the accuracy counts a label at any of the tied columns, as `LossComponents.accuracy` says and the other kernels
    count it (the C++ kernel had counted only the first, torch.argmax's)."""
    vmap = vocab_map(700, 500, 300)
    student, teacher, labels = rows(700, 500, count=7, seed=15)
    labels[4] = -100
    top = student.max(dim=1).values
    for row, tied, label in ((0, [5, 650], 5), (2, [40, 600], 600), (3, [699], 699), (5, [10, 20], 30)):
        student[row, tied] = top[row] + 1.0
        labels[row] = label
    check_against_reference(backend, student, teacher, labels, vmap, divergence="jsd", ce_weight=0.3,
                            temperature=1.5)
    check_against_reference(backend, student, teacher, labels, vmap, divergence="forward_kl", ce_weight=0.3)
    device = device_for(backend)
    _, parts = kdfast.cross_vocab_distill_loss(student.to(device), teacher.to(device), labels.to(device),
                                               vocab_map=vmap, method="mapped", backend=backend, ce_weight=0.3,
                                               temperature=1.5, reduction="none", return_components=True)
    assert labels[1] == -100 and student[6, labels[6]] < top[6]  # rows 1 and 4 ignored, row 6 a plain miss
    torch.testing.assert_close(parts.accuracy.cpu(), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
