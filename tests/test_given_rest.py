"""A sparse teacher whose rest is given (tail="given"): the log-probability of its mass off the K ids after each row's
K log-probs, where 1 - sum(p) of float32 log-probs would cancel. Method "mapped" takes the sparse kernels this way
wherever its one-pass kernels do not run (backend="cuda", and forward KL against a student whose every column is
matched): before, a reverse KL whose teacher rest was 4e-6 came out 6e-3 off the float64 reference on the C++ sparse
kernel. Here the sparse route is forced on every backend and held to the reference at small rests; tail="given" on
its own equals tail="bucket" where the given rest is 1 - sum(p), and a wrong width is refused."""

import math

import pytest
import torch
from conftest import BACKENDS, device_for
from test_mapped_kernels import rows, vocab_map

import kdfast
import kdfast.cross_vocab_rows as cross_vocab_rows
from kdfast.reference import cross_vocab_distill_loss_reference, sparse_distill_loss_reference

STUDENT_VOCAB, TEACHER_VOCAB, SHARED = 600, 700, 450


@pytest.fixture
def sparse_route(monkeypatch):
    """Method "mapped" on the sparse kernels, as backend="cuda" runs it, whichever backend is asked for."""
    monkeypatch.setattr(cross_vocab_rows, "fuses_mapped", lambda opts, plan: False)
    monkeypatch.setattr(cross_vocab_rows, "runs_triton_mapped", lambda opts, device: False)


def teacher_with_a_small_rest(teacher, vmap, gap: float):
    """The teacher's unmatched columns `gap` below the rest of its row: a rest of about exp(-gap) * 250 / 450."""
    off_map = torch.ones(teacher.shape[-1], dtype=torch.bool)
    off_map[vmap.teacher_ids] = False
    teacher = teacher.clone()
    teacher[:, off_map] -= gap
    return teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("gap", [8.0, 12.0])  # teacher rests of about 2e-4 and 4e-6
def test_the_sparse_route_of_mapped_holds_a_small_teacher_rest(sparse_route, backend, divergence, gap):
    vmap = vocab_map(STUDENT_VOCAB, TEACHER_VOCAB, SHARED, seed=4)
    student, teacher, labels = rows(STUDENT_VOCAB, TEACHER_VOCAB, count=6, seed=5)
    teacher = teacher_with_a_small_rest(teacher, vmap, gap)
    device = device_for(backend)
    s = student.to(device).clone().requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, teacher.to(device), labels.to(device), vocab_map=vmap, method="mapped",
                                           divergence=divergence, ce_weight=0.3, backend=backend, reduction="none")
    loss.sum().backward()
    s64 = student.detach().double().requires_grad_()
    expected = cross_vocab_distill_loss_reference(s64, teacher.double(), labels, vocab_map=vmap, method="mapped",
                                                  divergence=divergence, ce_weight=0.3, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_student_whose_every_column_is_matched_meets_the_teachers_given_rest(sparse_route, backend):
    """The student's own rest is empty: the teacher's rest adds the lone term (JSD: -beta P_r log beta) from the
    given rest."""
    vmap = vocab_map(500, 700, 500, seed=6)
    student, teacher, labels = rows(500, 700, count=4, seed=7)
    teacher = teacher_with_a_small_rest(teacher, vmap, 10.0)
    device = device_for(backend)
    loss = kdfast.cross_vocab_distill_loss(student.to(device), teacher.to(device), labels.to(device), vocab_map=vmap,
                                           method="mapped", divergence="jsd", backend=backend, reduction="none")
    expected = cross_vocab_distill_loss_reference(student.double(), teacher.double(), labels, vocab_map=vmap,
                                                  method="mapped", divergence="jsd", reduction="none")
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-7)


def sparse_rows(count=5, vocab=300, k=40, seed=8):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(count, vocab, generator=generator) * 2
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(count)])
    ids[0, -3:] = -1  # padding
    # The teacher's K probabilities hold 1 - 3e-6 of its mass: the rest is tiny.
    logits = torch.randn(count, k, generator=generator, dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=-1) + math.log1p(-3e-6)
    log_p[0, -3:] = -math.inf
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True) + math.log1p(-3e-6)
    labels = torch.randint(0, vocab, (count,), generator=generator)
    return student, ids, log_p, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "tvd"])
def test_a_given_rest_is_the_buckets_rest(backend, divergence):
    """tail="given" with the rest log(3e-6) after the K log-probs: the float64 reference's "bucket" loss on those
    log-probs, whose 1 - sum(p) is that rest, and the reference's own "given" form agrees."""
    student, ids, log_p, labels = sparse_rows()
    rest = torch.full((student.shape[0], 1), math.log(3e-6), dtype=torch.float64)
    device = device_for(backend)
    s = student.to(device).clone().requires_grad_()
    with_rest = torch.cat([log_p, rest], dim=-1)
    loss = kdfast.sparse_distill_loss(s, ids.to(device), with_rest.float().to(device), labels.to(device), tail="given",
                                      divergence=divergence, backend=backend, reduction="none")
    loss.sum().backward()
    s64 = student.detach().double().requires_grad_()
    expected = sparse_distill_loss_reference(s64, ids, log_p, labels, divergence=divergence, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4, atol=1e-6)
    given = sparse_distill_loss_reference(student.double(), ids, with_rest, labels, tail="given",
                                          divergence=divergence, reduction="none")
    torch.testing.assert_close(given, expected.detach(), rtol=1e-9, atol=1e-12)


def test_a_given_rest_needs_one_more_log_prob_than_ids():
    student, ids, log_p, labels = sparse_rows()
    with pytest.raises(ValueError, match="plus one column"):
        kdfast.sparse_distill_loss(student, ids, log_p.float(), labels, tail="given")
    with pytest.raises(ValueError, match="must equal teacher_ids shape \\(5, 40\\)$"):
        kdfast.sparse_distill_loss(student, ids, torch.cat([log_p, log_p[:, :1]], -1).float(), labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_linear_form_takes_a_given_rest(backend):
    """linear_sparse_distill_loss with tail="given" (its chunks slice the K + 1 log-probs by rows) equals the logits
    form on the same head's logits."""
    generator = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(5, 16, generator=generator), torch.randn(300, 16, generator=generator) * 0.5
    _, ids, log_p, labels = sparse_rows()
    with_rest = torch.cat([log_p, torch.full((5, 1), math.log(3e-6), dtype=torch.float64)], dim=-1).float()
    device = device_for(backend)
    h = hidden.to(device).clone().requires_grad_()
    loss = kdfast.linear_sparse_distill_loss(h, weight.to(device), ids.to(device), with_rest.to(device),
                                             labels.to(device), tail="given", divergence="reverse_kl",
                                             backend=backend, chunk_size=2)
    loss.backward()
    z = (hidden @ weight.T).requires_grad_()
    expected = kdfast.sparse_distill_loss(z, ids, with_rest, labels, tail="given", divergence="reverse_kl",
                                          backend="torch")
    expected.backward()
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.cpu(), z.grad @ weight, rtol=1e-4, atol=1e-5)


def test_the_trainers_refuse_a_given_rest_their_teachers_do_not_hold():
    from kdfast.integrations.sparse_teacher import sparse_options

    settings = dict(divergence="forward_kl", beta=0.5, temperature=1.0, teacher_temperature=None, kd_weight=1.0,
                    ce_weight=0.0, t2_scale=True, backend="auto")
    with pytest.raises(ValueError, match="tail='given' needs each row's rest.*teacher cache does not hold"):
        sparse_options(1.0, tail="given", **settings)
    with pytest.raises(ValueError, match="a dataset's teacher columns does not hold"):
        sparse_options(None, tail="given", source=None, **settings)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_given_rest_at_its_edges(backend, divergence):
    """Rows whose given rest is -inf (no mass off the ids; reverse KL floors it), rows of padding alone (the rest is
    the whole teacher), and rows whose ids hold every column (no rest on either side, whatever is given): the
    reference's values on every backend."""
    vocab, k = 40, 40
    generator = torch.Generator().manual_seed(10)
    student = torch.randn(4, vocab, generator=generator) * 2
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(4)])
    log_p = torch.log_softmax(torch.randn(4, k, generator=generator, dtype=torch.float64), dim=-1)
    ids[0, 30:] = -1  # row 0: ten ids short, its rest given as -inf
    log_p[0, :30] = torch.log_softmax(log_p[0, :30], dim=-1)
    log_p[0, 30:] = -math.inf
    ids[1, :] = -1  # row 1: padding alone, the teacher's whole mass in its rest
    log_p[1, :] = -math.inf
    rest = torch.tensor([[-math.inf], [0.0], [math.log(0.25)], [-math.inf]], dtype=torch.float64)
    # rows 2 and 3 hold every column: their given rest meets no student bucket
    labels = torch.tensor([3, 5, -100, 7])
    with_rest = torch.cat([log_p, rest], dim=-1)
    device = device_for(backend)
    s = student.to(device).clone().requires_grad_()
    loss = kdfast.sparse_distill_loss(s, ids.to(device), with_rest.float().to(device), labels.to(device), tail="given",
                                      divergence=divergence, ce_weight=0.2, backend=backend, reduction="none")
    loss.sum().backward()
    s64 = student.detach().double().requires_grad_()
    expected = sparse_distill_loss_reference(s64, ids, with_rest, labels, tail="given", divergence=divergence,
                                             ce_weight=0.2, reduction="none")
    expected.sum().backward()
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.detach().cpu().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4, atol=1e-6)
