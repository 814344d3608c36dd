"""The sparse teacher on its peers' cases and at its edges (docs/DESIGN.md, "A sparse teacher"):
- axolotl's top-k forward-KL tests draw the ids with torch.randint, so rows hold an id twice: the loss sums every entry
  and its gradient is that sum's derivative (a column's entries add), on every backend and form;
- a near-certain teacher (its rest ~0) keeps every divergence finite: the rest as computed, floored only where reverse
  KL puts it under a logarithm's denominator, exact to float64 above the floor;
- ids that cover the row leave no rest on either side; a student whose mass outside the ids underflows is floored."""

import math

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import assert_sparse_matches_reference, make_labels

import kdfast
from kdfast.reference import linear_sparse_distill_loss_reference, sparse_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def axolotl_inputs(batch=2, student_len=48, teacher_len=40, top_k=8, vocab=256, seed=0):
    """axolotl's make_inputs: random student logits, ids from torch.randint, the teacher's log-softmax over its K."""
    torch.manual_seed(seed)
    student = torch.randn(batch, student_len, vocab)
    ids = torch.randint(0, vocab, (batch, teacher_len, top_k))
    logprobs = torch.log_softmax(torch.randn(batch, teacher_len, top_k), dim=-1)
    mask = (torch.rand(batch, teacher_len, top_k) < 0.8).to(torch.int64)
    mask[:, 0, :] = 1
    return student, ids, logprobs, mask


def axolotl_reference_sum(student, ids, logprobs, temperature=1.0):
    """axolotl's reference_loss, every entry valid, summed: sum_k p_k (log p_k - log q_k) over a full log-softmax."""
    log_q = torch.log_softmax(student[:, : ids.shape[1]] / temperature, dim=-1).gather(-1, ids)
    return (logprobs.exp() * (logprobs - log_q)).sum()


def has_repeated_ids(ids):
    return bool((ids.sort(-1).values.diff(dim=-1) == 0).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_id_gets_both_entries_gradient(backend):
    """The reproducer: id 3 listed twice with 0.5 and 0.3 is one column with P = 0.8 in the gradient."""
    device = device_for(backend)
    student = torch.tensor([[0.1, -0.4, 0.3, 1.2, -1.0, 0.5, 0.0, 0.7]], device=device, requires_grad=True)
    ids, logprobs = torch.tensor([[3, 3, 5]], device=device), torch.tensor([[0.5, 0.3, 0.2]], device=device).log()
    loss = kdfast.sparse_distill_loss(student, ids, logprobs, tail="renormalize", reduction="sum", backend=backend)
    loss.backward()
    q = torch.softmax(student.detach(), dim=-1)[0]
    expected = q.clone()
    expected[3] -= 0.8
    expected[5] -= 0.2
    assert abs(loss.item() - 0.350589) < 1e-6
    torch.testing.assert_close(student.grad[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_axolotl_inputs_equal_axolotls_loss_and_its_gradient(backend, temperature):
    """axolotl's inputs and its own reference (float64 autograd): equal loss, equal gradient, repeated ids included.
    Its log-probs are a log-softmax over the K entries, so with every entry valid renormalising changes nothing."""
    device = device_for(backend)
    student, ids, logprobs, _ = axolotl_inputs()
    assert has_repeated_ids(ids)
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s[:, : ids.shape[1]], ids.to(device), logprobs.to(device), tail="renormalize",
                                      temperature=temperature, t2_scale=False, reduction="sum", backend=backend)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    expected = axolotl_reference_sum(s64, ids, logprobs.double(), temperature)
    expected.backward()
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-5, atol=1e-6)


def _repeated_ids(shape, vocab, seed):
    """Random ids with repeats in most rows, some padding (-1), and log-probs summing below 1."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=generator)
    ids[..., 1] = ids[..., 0]  # every row repeats its first id
    ids[..., -1] = torch.where(torch.rand(shape[:-1], generator=generator) < 0.5, ids[..., 2], -1)
    logprobs = torch.log_softmax(torch.randn(shape, generator=generator), dim=-1) + math.log(0.9)
    return ids, logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,tail", [(d, "bucket") for d in DIVERGENCES] + [("forward_kl", "renormalize")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_ids_match_the_reference(backend, divergence, tail, dtype):
    device = device_for(backend)
    generator = torch.Generator().manual_seed(1)
    student = (torch.randn(2, 5, 64, generator=generator) * 3).to(dtype).to(device)
    ids, logprobs = _repeated_ids((2, 5, 6), 64, seed=2)
    labels = make_labels((2, 5), 64, "some", device=device)
    assert_sparse_matches_reference(student, ids.to(device), logprobs.to(device), labels, backend,
                                    divergence=divergence, tail=tail, temperature=1.5, ce_weight=0.5, beta=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_repeated_ids_in_the_fused_linear_form(backend, divergence):
    device = device_for(backend)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=generator).to(device)
    weight = (torch.randn(48, 16, generator=generator) * 0.5).to(device)
    ids, logprobs = _repeated_ids((2, 5, 5), 48, seed=4)
    ids, logprobs = ids.to(device), logprobs.to(device)
    options = dict(divergence=divergence, temperature=2.0, beta=0.5)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = kdfast.linear_sparse_distill_loss(h, w, ids, logprobs, backend=backend, chunk_size=4, **options)
    loss.backward()
    h64, w64 = hidden.double().cpu().requires_grad_(True), weight.double().cpu().requires_grad_(True)
    ref = linear_sparse_distill_loss_reference(h64, w64, ids.cpu(), logprobs.cpu(), **options)
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("rest", [0.0, 1e-9, 5e-7, 2e-6, 0.3])
def test_near_certain_teacher_is_finite_and_exact_above_the_floor(backend, divergence, rest):
    """One row, one id holding 1 - rest of the teacher's mass (log1p keeps the rest exact in float32)."""
    device = device_for(backend)
    torch.manual_seed(0)
    student = torch.randn(1, 32)
    ids, logprobs = torch.tensor([[3]]), torch.tensor([[math.log1p(-rest)]])
    options = dict(divergence=divergence, tail="bucket", beta=0.5)
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, ids.to(device), logprobs.to(device), backend=backend, **options)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    s64 = student.double().requires_grad_(True)
    ref = sparse_distill_loss_reference(s64, ids, logprobs, **options)
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-5, atol=1e-6)
    if rest >= 5e-7:  # above the floor: the plain bucket divergence in float64, computed here on its own
        q = torch.softmax(student.double()[0], dim=-1)
        buckets_q = torch.stack([q[3], 1 - q[3]])
        buckets_p = torch.tensor([math.exp(logprobs.item()), -math.expm1(logprobs.double().item())],
                                 dtype=torch.float64)
        exact = {"forward_kl": (buckets_p * (buckets_p / buckets_q).log()).sum(),
                 "reverse_kl": (buckets_q * (buckets_q / buckets_p).log()).sum()}.get(divergence)
        if exact is not None:
            assert abs(loss.item() - exact.item()) <= 1e-5 * max(1.0, exact.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_teacher_reproducer(backend):
    """The reproducer: reverse KL against p = 1 - 5e-7 is 14.2527 (float64), not +inf, and its step is not NaN."""
    device = device_for(backend)
    torch.manual_seed(0)
    s = torch.randn(1, 32).to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, torch.tensor([[3]], device=device),
                                      torch.tensor([[math.log1p(-5e-7)]], device=device),
                                      divergence="reverse_kl", tail="bucket", backend=backend)
    loss.backward()
    assert abs(loss.item() - 14.2527) < 1e-4 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_teacher_in_the_fused_linear_form(backend):
    """Rows with rests 1e-9, 0 and (an id twice) ~1e-13 under reverse KL, from hidden states."""
    device = device_for(backend)
    generator = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(3, 8, generator=generator), torch.randn(20, 8, generator=generator)
    ids = torch.tensor([[3, -1], [5, 6], [7, 7]])
    logprobs = torch.tensor([[math.log1p(-1e-9), 0.0], [math.log(0.6), math.log(0.4)], [math.log(0.5), -30.0]])
    h = hidden.clone().to(device).requires_grad_(True)
    loss = kdfast.linear_sparse_distill_loss(h, weight.to(device), ids.to(device), logprobs.to(device),
                                             divergence="reverse_kl", backend=backend)
    loss.backward()
    h64 = hidden.double().requires_grad_(True)
    ref = linear_sparse_distill_loss_reference(h64, weight.double(), ids, logprobs, divergence="reverse_kl")
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ids_that_cover_the_row_leave_no_rest(backend, divergence):
    """Every column an id (one of them twice), and log-probs whose sum falls 1e-3 short of 1: that shortfall has no
    student bucket to meet, so it adds nothing (finite for every divergence)."""
    device = device_for(backend)
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 12), torch.randn(2, 12)
    ids = torch.cat([torch.arange(12).expand(2, 12), torch.tensor([[4], [7]])], dim=-1)
    logprobs = torch.log_softmax(teacher, dim=-1).gather(-1, ids) + math.log(1 - 1e-3) - math.log(1.5)
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, ids.to(device), logprobs.to(device), divergence=divergence, beta=0.5,
                                      reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    ref = sparse_distill_loss_reference(student.double(), ids, logprobs, divergence=divergence, beta=0.5,
                                        reduction="none")
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_rest_below_float32s_exps_is_floored(backend):
    """The ids hold the student's top logits and every other column sits 1e4 below: its float32 exps there vanish,
    and forward KL against a teacher rest of 0.3 is finite, with the rest counted at the documented floor."""
    device = device_for(backend)
    student = torch.full((1, 40), -1e4)
    student[0, :3] = torch.tensor([2.0, 1.0, 0.5])
    ids, logprobs = torch.tensor([[0, 1, 2]]), torch.tensor([[0.4, 0.2, 0.1]]).log()
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, ids.to(device), logprobs.to(device), tail="bucket", backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    ref = sparse_distill_loss_reference(student.double(), ids, logprobs, tail="bucket")
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-5)
