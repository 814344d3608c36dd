"""More of the peers' own sparse-teacher cases, their inputs and expectations, run on kdfast (the first batch is
tests/test_sparse_peer_cases.py):
- axolotl (tests/integrations/test_kd_topk_forward_kl.py): its masked top-k entries are kdfast's padding ids (-1):
  its loss, its two normalisations, its temperature, masked values never read, no gradient past or at masked rows,
  and its chunked loss equal to the unchunked one (kdfast's fused linear form, chunked by rows);
- axolotl (tests/integrations/test_kd_liger.py): the fused linear top-k loss's CE reaches the hidden states and the
  head, and its weight moves the gradient by exactly that CE's;
- TRL's server trainer (TestServerReverseKLPaddingMask): top-1 plus the tail bucket at beta = 1 with the -inf
  padding sentinel at ignored rows;
- TRL's async trainer (TestNarrowTop1ActualSupport, TestPerTeacherStats): the top-1-plus-actual support (deduplicated,
  narrowed to the actual token at beta = 1, rows without teacher signal) and the per-teacher statistics of kdfast's
  `chunked_jsd_loss`;
- TRL's DOPD routing (tests/experimental/test_dopd_routing.py): each regime's top-k-plus-tail (teacher's or student's
  support) and full-vocabulary loss on its hand-built rows.
Where TRL 1.16 has the peer's function it is the float64 expectation; otherwise a float64 port of its definition."""

import math
import warnings

import pytest
import torch
from conftest import BACKENDS, device_for
from test_sparse_peer_cases import axolotl_inputs

import kdfast
from kdfast.reference import linear_sparse_distill_loss_reference, sparse_distill_loss_reference


def trl(module):
    """A TRL module, imported quietly (its experimental namespace warns); the test is skipped without TRL."""
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


# ---------------------------------------------------------------------------------------------------------------
# axolotl: tests/integrations/test_kd_topk_forward_kl.py
# ---------------------------------------------------------------------------------------------------------------

def axolotl_reference_loss(student, ids, logprobs, mask, num_items_in_batch=-1, kd_temperature=1.0):
    """axolotl's reference_loss: sum over the valid entries of p (log p - log q), q the student's full log-softmax at
    T (no T^2), over num_items_in_batch or else over the count of valid entries (not rows)."""
    log_q = torch.log_softmax(student[:, : ids.shape[1]] / kd_temperature, dim=-1).gather(-1, ids)
    valid = mask.bool()
    teacher = logprobs[valid]
    terms = teacher.exp() * (teacher - log_q[valid])
    return terms.sum() / (num_items_in_batch if num_items_in_batch > 0 else terms.numel())


def as_padding(ids, mask):
    """axolotl's target_mask as kdfast's padding: a masked entry's id is -1."""
    return torch.where(mask.bool(), ids, torch.full_like(ids, -1))


@pytest.mark.parametrize("backend", BACKENDS)
# The peer's three settings in two cases: test_loss_matches_reference's num_items_in_batch 7 at T = 1, and its -1 (the
# count of valid entries) at test_loss_temperature's T = 2.
@pytest.mark.parametrize("num_items_in_batch, kd_temperature", [(7, 1.0), (-1, 2.0)])
def test_axolotl_masked_loss_and_its_normalisations(backend, num_items_in_batch, kd_temperature):
    """test_loss_matches_reference (num_items_in_batch -1 and 7) and test_loss_temperature on axolotl's inputs (ids
    repeated within rows, ~20% of entries masked). axolotl sums p (log p - log q) over a row's valid entries, whose p
    sum to s <= 1; kdfast's tail="renormalize" on the same row (masked ids as padding) is L = sum P (log P - log q)
    with P = p / s, so axolotl's row is exactly s * L + s log s. The loss and its gradient (rows weighted by s)
    must be axolotl's float64 reference; the student's rows past the teacher's get no gradient."""
    device = device_for(backend)
    student, ids, logprobs, mask = axolotl_inputs()
    assert bool((mask == 0).any()) and bool((mask.sum(-1) < mask.shape[-1]).any())
    rows = ids.shape[1]
    s = student.clone().to(device).requires_grad_(True)
    settings = dict(tail="renormalize", temperature=kd_temperature, t2_scale=False, reduction="none",
                    backend=backend)
    per_row = kdfast.sparse_distill_loss(s[:, :rows], as_padding(ids, mask).to(device), logprobs.to(device),
                                         **settings)
    held = (logprobs.double().exp() * mask).sum(-1)  # s per row, > 0 here
    assert bool((held > 0).all())
    denominator = num_items_in_batch if num_items_in_batch > 0 else int(mask.sum())
    weights = (held / denominator).to(device)
    loss = (per_row.double() * weights).sum() + (held * held.log()).sum() / denominator
    (per_row * weights.float()).sum().backward()

    s64 = student.double().requires_grad_(True)
    expected = axolotl_reference_loss(s64, ids, logprobs.double(), mask, num_items_in_batch, kd_temperature)
    expected.backward()
    torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-7)
    assert bool((s.grad[:, rows:] == 0).all())
    if kd_temperature != 1.0:  # the peer's own check that the temperature reaches the loss: not the loss at T = 1
        at_one = axolotl_reference_loss(student.double(), ids, logprobs.double(), mask, num_items_in_batch, 1.0)
        assert not torch.allclose(loss.detach().cpu(), at_one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_axolotl_masked_entries_do_not_affect_loss(backend, tail="bucket"):
    """test_masked_entries_do_not_affect_loss: 123.0 written at every masked entry's log-prob (p = e^123, which
    the bucket tail would refuse as a sum above 1, and count in its rest, were it read) changes neither the loss nor
    the gradient: both are the float64 loss of the clean inputs (the peer's baseline, computed once, in float64).
    (Under tail="renormalize" the masked loss test above already holds kdfast to axolotl's loss, which never reads
    them.)"""
    device = device_for(backend)
    student, ids, logprobs, mask = axolotl_inputs()
    rows = ids.shape[1]
    corrupted = logprobs.clone()
    corrupted[mask == 0] = 123.0
    s = student[:, :rows].clone().to(device).requires_grad_(True)
    perturbed = kdfast.sparse_distill_loss(s, as_padding(ids, mask).to(device), corrupted.to(device), tail=tail,
                                           backend=backend)
    perturbed.backward()
    s64 = student[:, :rows].double().requires_grad_(True)
    baseline = sparse_distill_loss_reference(s64, as_padding(ids, mask), logprobs, tail=tail)
    baseline.backward()
    assert torch.isfinite(perturbed) and baseline.item() > 0
    torch.testing.assert_close(perturbed.double().cpu(), baseline.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_axolotl_grad_flow_and_sparsity(backend, tail):
    """test_grad_flow_and_sparsity: the last 3 teacher positions fully masked (every id padding) and the student 8
    positions longer than the teacher: the gradient is finite, exactly 0 at the masked positions and past the
    teacher, and not 0 at the first position."""
    device = device_for(backend)
    student, ids, logprobs, mask = axolotl_inputs()
    mask[:, -3:, :] = 0
    rows = ids.shape[1]
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s[:, :rows], as_padding(ids, mask).to(device), logprobs.to(device), tail=tail,
                                      backend=backend)
    loss.backward()
    grad = s.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert bool((grad[:, rows:] == 0).all()), "positions beyond the teacher sequence never enter the loss"
    assert bool((grad[:, rows - 3: rows] == 0).all()), "fully masked positions get no gradient"
    assert grad[:, 0].abs().sum().item() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items_in_batch", [None, 11])
def test_axolotl_chunked_matches_unchunked(backend, num_items_in_batch):
    """test_chunked_matches_unchunked (4 chunks; num_items_in_batch -1 and 11) on kdfast's chunked form, the fused
    linear loss: axolotl's teacher rows (teacher_len = student_len = 40, masked entries as padding) against a student
    head; the ignored labels fall unevenly over the 4 chunks of 20 rows, so a per-chunk mean would not be the mean.
    Chunked equals unchunked (1e-5 / 1e-6, the peer's tolerance) and both equal the float64 reference."""
    device = device_for(backend)
    _, ids, logprobs, mask = axolotl_inputs(student_len=40, teacher_len=40)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 40, 16, generator=generator)
    weight = torch.randn(256, 16, generator=generator) * 0.5
    labels = torch.randint(0, 256, (2, 40), generator=generator)
    labels[0, :15] = -100  # chunk 1 keeps 5 of its 20 rows
    labels[1, 30:] = -100  # chunk 4 keeps 10
    options = dict(tail="renormalize", temperature=1.0, num_items_in_batch=num_items_in_batch)
    results = []
    for chunk_size in (20, 80):
        h, w = hidden.clone().to(device).requires_grad_(True), weight.clone().to(device).requires_grad_(True)
        loss = kdfast.linear_sparse_distill_loss(h, w, as_padding(ids, mask).to(device), logprobs.to(device),
                                                 labels.to(device), chunk_size=chunk_size, backend=backend, **options)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (chunked, chunked_h, chunked_w), (whole, whole_h, whole_w) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_h, whole_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_w, whole_w, rtol=1e-5, atol=1e-6)
    expected = linear_sparse_distill_loss_reference(hidden.double(), weight.double(), as_padding(ids, mask), logprobs,
                                                    labels, **options)
    torch.testing.assert_close(whole.double().cpu(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# axolotl: tests/integrations/test_kd_liger.py (LigerFusedLinearKLTopKLogprobLoss)
# ---------------------------------------------------------------------------------------------------------------

def liger_inputs(seed):
    """The peer's make_inputs (B 1, S 4, V 16, H 8, K 4, an ignored label at [0, 2]), in its RNG order. Its loss shifts
    the labels itself (pad with ignore_index, drop the first): kdfast takes them shifted."""
    torch.manual_seed(seed)
    hidden = torch.randn(1, 4, 8)
    weight = torch.randn(16, 8)
    ids = torch.randint(0, 16, (1, 4, 4))
    logprobs = torch.log_softmax(torch.randn(1, 4, 4), dim=-1)
    labels = torch.randint(0, 16, (1, 4))
    labels[0, 2] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    return hidden, weight, ids, logprobs, shifted


def ce_sum_gradients(hidden, weight, labels):
    """The hard loss as Liger's kernel computes it (F.cross_entropy, reduction sum), its value and gradients in
    float64."""
    h, w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy((h @ w.t()).view(-1, w.shape[0]), labels.view(-1), reduction="sum",
                                           ignore_index=-100)
    ce.backward()
    return ce.detach(), h.grad, w.grad


def linear_top_k_step(backend, inputs, **weights):
    device = device_for(backend)
    hidden, weight, ids, logprobs, labels = (t.to(device) for t in inputs)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = kdfast.linear_sparse_distill_loss(h, w, ids, logprobs, labels, tail="renormalize", temperature=1.0,
                                             chunk_size=2, reduction="sum", backend=backend, **weights)
    loss.backward()
    return loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_liger_ce_only_gradient_flows_to_student_hidden_states(backend):
    """test_ce_only_gradient_flows_to_student_hidden_states: the soft loss off, the hard loss on, chunks of 2 rows:
    the CE's gradient reaches the hidden states and the head (finite, not 0), and is the CE's in float64."""
    inputs = liger_inputs(seed=0)
    loss, grad_h, grad_w = linear_top_k_step(backend, inputs, kd_weight=0.0, ce_weight=1.0)
    ce, ce_h, ce_w = ce_sum_gradients(inputs[0], inputs[1], inputs[4])
    for grad in (grad_h, grad_w):
        assert torch.isfinite(grad).all() and grad.abs().sum().item() > 0
    torch.testing.assert_close(loss.double(), ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_h.double(), ce_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ce_w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_liger_kd_mix_gradient_changes_when_ce_weight_changes(backend):
    """test_kd_mix_gradient_changes_when_ce_weight_changes: soft weight 0.5, hard weight 0 then 0.5, same inputs: the
    gradients differ (by more than 1e-4 in sum, the peer's bound), and by exactly 0.5 times the CE's gradient."""
    inputs = liger_inputs(seed=42)
    _, a_h, a_w = linear_top_k_step(backend, inputs, kd_weight=0.5, ce_weight=0.0)
    _, b_h, b_w = linear_top_k_step(backend, inputs, kd_weight=0.5, ce_weight=0.5)
    _, ce_h, ce_w = ce_sum_gradients(inputs[0], inputs[1], inputs[4])
    for a, b, ce in ((a_h, b_h, ce_h), (a_w, b_w, ce_w)):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert not torch.allclose(a, b, atol=1e-6, rtol=1e-5)
        assert (b - a).abs().sum().item() > 1e-4
        torch.testing.assert_close((b - a).double(), 0.5 * ce, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# TRL: tests/experimental/test_server_distillation_trainer.py (TestServerReverseKLPaddingMask)
# ---------------------------------------------------------------------------------------------------------------

def trl_tail_bucket_divergence(tail_bucket, jsd_divergence, student_logits, ids, teacher_logprobs, held, beta):
    """Per row, TRL's sparse divergence in float64: the student's full log-softmax at the ids, both sides given the
    tail bucket by TRL's `_add_tail_bucket`, then TRL's `_jsd_divergence` over the support, summed."""
    student = torch.log_softmax(student_logits, dim=-1).gather(-1, ids.clamp_min(0))
    minus_inf = torch.full((), -math.inf, dtype=student.dtype)
    student = torch.where(held, student, minus_inf)
    teacher = torch.where(held, teacher_logprobs, minus_inf)
    student_full, support = tail_bucket(student, held)
    teacher_full, _ = tail_bucket(teacher, held)
    return jsd_divergence(student_full, teacher_full, beta=beta, support_mask=support).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_server_top1_padding_sentinel_with_the_tail_keeps_reverse_kl_finite(backend):
    """TestServerReverseKLPaddingMask.test_mask_keeps_forward_and_backward_finite: the server getter's top-1 answer
    for a ragged batch (sample 0 one completion token long, its two padded positions -inf; ids and labels the peer's
    90 / 9217 / 100), beta = 1 with the tail bucket. TRL neutralises the -inf where labels are -100 before its math;
    kdfast is handed the sentinel as is (it does not read ignored rows). Finite loss and gradient, 0 at the ignored
    rows, and TRL's own `_add_tail_bucket` + `_jsd_divergence` in float64 on the kept ones."""
    server = trl("trl.experimental.server_distillation.server_distillation_trainer")
    device = device_for(backend)
    teacher_topk = torch.tensor([[[-2.3], [-math.inf], [-math.inf]], [[-1.1], [-0.4], [-3.0]]])
    ids = torch.tensor([[[90], [0], [0]], [[90], [9217], [100]]])
    labels = torch.tensor([[90, -100, -100], [90, 9217, 100]])
    vocab = 9218
    student = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(0)) * 2
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, ids.to(device), teacher_topk.to(device), labels.to(device),
                                      divergence="jsd", beta=1.0, tail="bucket", reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    ignored = labels == -100
    assert bool((loss.cpu()[ignored] == 0).all()) and bool((s.grad.cpu()[ignored] == 0).all())

    s64 = student.double().requires_grad_(True)
    neutralised = torch.where(ignored[..., None], torch.zeros((), dtype=torch.float64), teacher_topk.double())
    per_row = trl_tail_bucket_divergence(server._add_tail_bucket, server._jsd_divergence, s64, ids, neutralised,
                                         torch.ones_like(ids, dtype=torch.bool), beta=1.0)
    expected = torch.where(ignored, torch.zeros_like(per_row), per_row)
    expected.sum().backward()
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# TRL: tests/experimental/test_async_distillation_trainer.py (TestNarrowTop1ActualSupport, TestPerTeacherStats)
# ---------------------------------------------------------------------------------------------------------------

INF = math.inf
# (ids, log-probs, actual tokens, beta) of the peer's cases, [rows..., K = 4] with -1 / -inf padding.
NARROW_CASES = {
    "top1_and_actual_distinct": ([[[5, 3, 9, -1]]], [[[-0.1, -1.0, -2.0, -INF]]], [[9]], 0.5),
    "actual_same_as_top1_deduplicated": ([[[5, 3, 9, -1]]], [[[-0.1, -1.0, -2.0, -INF]]], [[5]], 0.5),
    "actual_missing_from_candidates": ([[[5, 3, -1, -1]]], [[[-0.1, -1.0, -INF, -INF]]], [[42]], 0.5),
    "top1_missing_actual_present": ([[[-1, 9, -1, -1]]], [[[-INF, -2.0, -INF, -INF]]], [[9]], 0.5),
    "beta_one_drops_top1": ([[[5, 3, 9, -1]]], [[[-0.1, -1.0, -2.0, -INF]]], [[9]], 1.0),
    "beta_one_actual_missing": ([[[5, 3, -1, -1]]], [[[-0.1, -1.0, -INF, -INF]]], [[42]], 1.0),
    "feeds_tail_bucket_and_jsd": ([[[5, 3, 9, -1], [7, -1, -1, -1]]],
                                  [[[-0.1, -1.0, -2.0, -INF], [-0.05, -INF, -INF, -INF]]], [[9, 7]], 0.5),
    "feeds_tail_bucket_and_jsd_beta_one": ([[[5, 3, 9, -1], [7, -1, -1, -1]]],
                                           [[[-0.1, -1.0, -2.0, -INF], [-0.05, -INF, -INF, -INF]]], [[9, 7]], 1.0),
    "padded_positions": ([[[5, 3, 9, -1], [-1, -1, -1, -1]], [[5, 3, 9, -1], [7, 2, 4, -1]]],
                         [[[-0.1, -1.0, -2.0, -INF], [-INF] * 4],
                          [[-0.1, -1.0, -2.0, -INF], [-0.05, -1.2, -2.5, -INF]]],
                         [[9, 0], [9, 7]], 0.5),
    "padded_positions_beta_one": ([[[5, 3, 9, -1], [-1, -1, -1, -1]], [[5, 3, 9, -1], [7, 2, 4, -1]]],
                                  [[[-0.1, -1.0, -2.0, -INF], [-INF] * 4],
                                   [[-0.1, -1.0, -2.0, -INF], [-0.05, -1.2, -2.5, -INF]]],
                                  [[9, 0], [9, 7]], 1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(NARROW_CASES))
def test_trl_top1_plus_actual_support_with_the_tail(backend, case):
    """TestNarrowTop1ActualSupport: each of the peer's candidate sets narrowed by TRL's own
    `_narrow_top1_actual_support` (beta in (0, 1): the teacher's top-1 and the actual token, the second masked where
    they are one token or where the actual token was not reported; beta = 1: the actual token alone), its mask made
    kdfast's padding, into kdfast's generalized JSD with the tail bucket. Per row: finite, >= 0, TRL's own
    `_add_tail_bucket` + `_jsd_divergence` in float64 where the row has teacher signal and exactly 0 where it has
    none (TRL drops those rows); the gradient finite and the float64 one, 0 at rows without signal."""
    trl_async = trl("trl.experimental.async_distillation.async_distillation_trainer")
    wide_ids, wide_logprobs, actual, beta = NARROW_CASES[case]
    wide_ids, wide_logprobs, actual = torch.tensor(wide_ids), torch.tensor(wide_logprobs), torch.tensor(actual)
    narrow_ids, narrow_logprobs, held = trl_async._narrow_top1_actual_support(
        wide_ids, wide_logprobs, actual, wide_ids != -1, beta=beta)
    device = device_for(backend)
    student = torch.randn(*actual.shape, 64, generator=torch.Generator().manual_seed(1)) * 2  # the peer's id 42 held
    ids = torch.where(held, narrow_ids, torch.full_like(narrow_ids, -1))
    mass = torch.where(held, narrow_logprobs.double().exp(), 0.0).sum(-1, keepdim=True)
    if bool((mass > 1).any()):
        # The peer's top-1 log-prob -0.1 beside the actual token's -2.0 holds 1.04 of the teacher's mass: TRL caps its
        # tail at 1e-7 and goes on; kdfast refuses a teacher over 1 (where it checks: CPU tensors). Scaled to 0.95
        # (their ratio kept), the same support is a distribution both take.
        if device == "cpu":
            with pytest.raises(ValueError, match="held probabilities sum to 1.04 > 1"):
                kdfast.sparse_distill_loss(student, ids, torch.where(held, narrow_logprobs, 0.0), divergence="jsd",
                                           beta=beta, tail="bucket", backend=backend)
        narrow_logprobs = narrow_logprobs - torch.where(mass > 1, mass.log() - math.log(0.95), 0.0).float()
    s = student.clone().to(device).requires_grad_(True)
    logprobs = torch.where(held, narrow_logprobs, torch.zeros_like(narrow_logprobs))
    loss = kdfast.sparse_distill_loss(s, ids.to(device), logprobs.to(device), divergence="jsd", beta=beta,
                                      tail="bucket", reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    assert bool((loss >= -1e-6).all())
    signal = held.any(-1)
    assert bool((loss.cpu()[~signal] == 0).all()) and bool((s.grad.cpu()[~signal] == 0).all())

    s64 = student.double().requires_grad_(True)
    per_row = trl_tail_bucket_divergence(trl_async._add_tail_bucket, trl_async._jsd_divergence, s64, narrow_ids,
                                         narrow_logprobs.double(), held, beta)
    per_row[signal].sum().backward()
    expected = torch.where(signal, per_row.detach(), torch.zeros_like(per_row))
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_duplicated_actual_token_is_never_counted_twice(backend):
    """test_actual_token_same_as_top1_is_deduplicated, kdfast's side: the narrowed support [5, 5] with its second slot
    masked is the top-1 alone, and the support left undeduplicated (two buckets of p = e^-0.1, summing to 1.81) is
    refused where kdfast checks log-probs (CPU tensors), never trained on as a teacher counted twice."""
    device = device_for(backend)
    s = torch.randn(1, 32, generator=torch.Generator().manual_seed(2)).to(device)
    settings = dict(divergence="jsd", beta=0.5, tail="bucket", backend=backend)
    deduplicated = kdfast.sparse_distill_loss(s, torch.tensor([[5, -1]], device=device),
                                              torch.tensor([[-0.1, 0.0]], device=device), **settings)
    top1 = kdfast.sparse_distill_loss(s, torch.tensor([[5]], device=device), torch.tensor([[-0.1]], device=device),
                                      **settings)
    torch.testing.assert_close(deduplicated, top1, rtol=1e-6, atol=1e-7)
    assert top1.item() > 0
    if device == "cpu":
        with pytest.raises(ValueError, match="sum to"):
            kdfast.sparse_distill_loss(s, torch.tensor([[5, 5]]), torch.tensor([[-0.1, -0.1]]), **settings)


def make_teacher_topk(vocab_size, actual_token_ids, top_k, seed):
    """The peer's `_make_teacher_topk`: per position a random teacher's top-k, the actual token put in the last slot
    where it is not among them (one generator for all positions)."""
    generator = torch.Generator().manual_seed(seed)
    ids, logprobs = [], []
    for actual_id in actual_token_ids:
        log_probs = torch.log_softmax(torch.randn(vocab_size, generator=generator), dim=-1)
        top_logprobs, top_ids = log_probs.topk(top_k)
        top_ids, top_logprobs = top_ids.tolist(), top_logprobs.tolist()
        if actual_id not in top_ids:
            top_ids[-1], top_logprobs[-1] = actual_id, log_probs[actual_id].item()
        ids.append(top_ids)
        logprobs.append(top_logprobs)
    return ids, logprobs


def per_teacher_run(teacher_id_idx, chunk_size, positions=10, hidden_size=8, vocab=32, teachers=2):
    """TestPerTeacherStats._run on kdfast's `chunked_jsd_loss`: forward KL (beta 0), T 1, the tail bucket, every
    candidate valid. Returns the inputs too, for the float64 check."""
    kdfast_async = trl("kdfast.integrations.trl_async")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    actual = torch.randint(vocab, (positions,), generator=generator).tolist()
    ids, logprobs = make_teacher_topk(vocab, actual, 4, seed=0)
    ids, logprobs = torch.tensor(ids), torch.tensor(logprobs)
    out = kdfast_async.chunked_jsd_loss(hidden, weight, None, 1.0, None, ids, logprobs,
                                        torch.ones_like(ids, dtype=torch.bool), 0.0, 1.0, True, teacher_id_idx,
                                        teachers, chunk_size)
    return out, (hidden, weight, ids, logprobs)


ROUTING = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 0])


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_trl_per_teacher_stats_partition_the_batch_by_teacher(chunk_size):
    """test_stats_partition_the_batch_by_teacher: (count, divergence sum, teacher-entropy sum) per teacher; the counts
    are the routing's, the sums add up to the batch's. And each teacher's divergence sum is TRL's float64 forward KL
    with the tail (`_add_tail_bucket` + `_jsd_divergence`) over its own rows."""
    trl_async = trl("trl.experimental.async_distillation.async_distillation_trainer")
    (loss, jsd_sum, _, teacher_entropy_sum, stats), (hidden, weight, ids, logprobs) = per_teacher_run(ROUTING,
                                                                                                     chunk_size)
    counts, jsd_sums, entropy_sums = stats.view(2, 3).T
    torch.testing.assert_close(counts, torch.bincount(ROUTING).float())
    torch.testing.assert_close(jsd_sums.sum(), jsd_sum)
    torch.testing.assert_close(entropy_sums.sum(), teacher_entropy_sum)
    per_row = trl_tail_bucket_divergence(trl_async._add_tail_bucket, trl_async._jsd_divergence,
                                         hidden.double() @ weight.double().t(), ids, logprobs.double(),
                                         torch.ones_like(ids, dtype=torch.bool), beta=0.0)
    for teacher in range(2):
        torch.testing.assert_close(jsd_sums[teacher].double(), per_row[ROUTING.eq(teacher)].sum(), rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(loss.double(), per_row.sum(), rtol=1e-5, atol=1e-6)


def test_trl_per_teacher_chunking_does_not_move_tokens_and_one_teacher_reports_none():
    """test_chunking_does_not_move_tokens_between_teachers (chunks of 3 against one chunk of all 10) and
    test_single_teacher_reports_no_breakdown (no routing: the per-teacher stats are all 0)."""
    chunked = per_teacher_run(ROUTING, 3)[0][-1]
    whole = per_teacher_run(ROUTING, 10)[0][-1]
    torch.testing.assert_close(chunked, whole)
    assert bool(chunked.any())
    single = per_teacher_run(None, 3)[0][-1]
    assert not single.any()


# ---------------------------------------------------------------------------------------------------------------
# TRL: tests/experimental/test_dopd_routing.py (each regime's loss on the peer's rows)
# ---------------------------------------------------------------------------------------------------------------

LIGHT_TOPK, SELF_REG_WEIGHT, STUDENT_CONSISTENCY_WEIGHT = 2, 0.01, 0.1


def dopd_rows():
    """The peer's _build_batch: five single-token rows over V = 4 given as probabilities (logits log p); student,
    privileged student, teacher. Row r is routed to regime 1, 3, 4, 2, 2."""
    student = [[0.85, 0.05, 0.05, 0.05], [0.20, 0.30, 0.30, 0.20], [0.90, 0.05, 0.03, 0.02],
               [0.30, 0.30, 0.20, 0.20], [0.02, 0.35, 0.33, 0.30]]
    privileged = [[0.80, 0.10, 0.05, 0.05], [0.25, 0.35, 0.25, 0.15], [0.88, 0.05, 0.04, 0.03],
                  [0.31, 0.29, 0.21, 0.19], [0.03, 0.34, 0.33, 0.30]]
    teacher = [[0.80, 0.10, 0.05, 0.05], [0.90, 0.05, 0.03, 0.02], [0.20, 0.30, 0.30, 0.20],
               [0.28, 0.30, 0.22, 0.20], [0.45, 0.30, 0.15, 0.10]]
    return [torch.tensor(rows).log().unsqueeze(1) for rows in (student, privileged, teacher)]


def teacher_support_reference(loss_utils, student, teacher, k):
    """DOPD's regime-1 loss (the newer TRL's compute_topk_self_distillation_loss with topk_support="teacher", absent
    from TRL 1.16): the teacher's top-k ids, both sides' full log-softmax there, TRL 1.16's own add_tail_bucket on
    each, TRL 1.16's compute_divergence with alpha 1 (reverse KL)."""
    ids = teacher.topk(k, dim=-1).indices
    log_s = torch.log_softmax(student, dim=-1).gather(-1, ids)
    log_t = torch.log_softmax(teacher, dim=-1).gather(-1, ids)
    return loss_utils.compute_divergence(loss_utils.add_tail_bucket(log_s), loss_utils.add_tail_bucket(log_t), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dopd_regime_losses_on_its_rows(backend):
    """test_each_row_routes_to_its_expected_regime and test_all_regimes_produce_nonzero_gradient_through_student_logits,
    each regime's loss on all five rows (the peer checks the row routed to it):
    regime 1, reverse KL over the teacher's top-2 plus the tail: kdfast's sparse loss at the teacher's ids;
    regimes 2 and 4, reverse KL over the student's top-2 plus the tail against the privileged student, weighted 0.01
    and 0.1: kdfast's sparse loss at the student's ids with kd_weight, against TRL 1.16's
    compute_topk_self_distillation_loss; regime 3, the full-vocabulary JSD at 0.5: kdfast's dense loss against
    TRL 1.16's compute_full_logit_self_distillation_loss. Loss and gradient within float64's; every row's gradient
    under the regime it is routed to is not 0."""
    loss_utils = trl("trl.experimental.sdft.loss_utils")
    device = device_for(backend)
    student, privileged, teacher = dopd_rows()
    log_teacher, log_privileged = torch.log_softmax(teacher, -1), torch.log_softmax(privileged, -1)
    teacher_ids = teacher.topk(LIGHT_TOPK, dim=-1).indices
    student_ids = student.topk(LIGHT_TOPK, dim=-1).indices
    sparse = dict(divergence="reverse_kl", tail="bucket", reduction="none", backend=backend)

    def student_support(weight):
        """kdfast and TRL on the privileged student's top-k ids with the tail, weighted as the regime weighs them."""
        return (lambda s: kdfast.sparse_distill_loss(s, student_ids.to(device),
                                                     log_privileged.gather(-1, student_ids).to(device),
                                                     kd_weight=weight, **sparse),
                lambda s: weight * loss_utils.compute_topk_self_distillation_loss(
                    s, privileged.double(), distillation_topk=LIGHT_TOPK, distillation_alpha=1.0,
                    distillation_add_tail=True))

    regimes = {
        "regime1": (lambda s: kdfast.sparse_distill_loss(s, teacher_ids.to(device),
                                                         log_teacher.gather(-1, teacher_ids).to(device), **sparse),
                    lambda s: teacher_support_reference(loss_utils, s, teacher.double(), LIGHT_TOPK)),
        "regime2": student_support(SELF_REG_WEIGHT),
        "regime3": (lambda s: kdfast.distill_loss(s, teacher.to(device), divergence="jsd", beta=0.5,
                                                  reduction="none", backend=backend),
                    lambda s: loss_utils.compute_full_logit_self_distillation_loss(s, teacher.double(),
                                                                                   distillation_alpha=0.5)),
        "regime4": student_support(STUDENT_CONSISTENCY_WEIGHT),
    }
    routed_to = ["regime1", "regime3", "regime4", "regime2", "regime2"]
    for name, (ours, theirs) in regimes.items():
        s = student.clone().to(device).requires_grad_(True)
        loss = ours(s)
        loss.sum().backward()
        s64 = student.double().requires_grad_(True)
        expected = theirs(s64)
        expected.sum().backward()
        torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-7, msg=name)
        for row, regime in enumerate(routed_to):
            if regime == name:
                assert s.grad[row].abs().max().item() > 0, f"row {row} ({name}) got a zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dopd_self_reg_anchor_on_the_bare_student_is_zero(backend):
    """test_self_reg_regime_anchors_on_privileged_student_not_bare: regime 2 against the student's own (detached)
    distribution is KL(p || p), 0 in value and gradient (kdfast forms its own softmax: within 1e-6 of it); against a
    privileged student that differs it is TRL 1.16's loss and its gradient is not 0."""
    loss_utils = trl("trl.experimental.sdft.loss_utils")
    device = device_for(backend)
    student = torch.tensor([[0.30, 0.30, 0.20, 0.20]]).log()
    ids = student.topk(LIGHT_TOPK, dim=-1).indices
    settings = dict(divergence="reverse_kl", tail="bucket", kd_weight=SELF_REG_WEIGHT, reduction="none",
                    backend=backend)
    s = student.clone().to(device).requires_grad_(True)
    degenerate = kdfast.sparse_distill_loss(s, ids.to(device),
                                            torch.log_softmax(student, -1).gather(-1, ids).to(device), **settings)
    degenerate.sum().backward()
    assert degenerate.abs().max().item() <= 1e-6 and s.grad.abs().max().item() <= 1e-6

    privileged = torch.tensor([[0.35, 0.25, 0.20, 0.20]]).log()
    s = student.clone().to(device).requires_grad_(True)
    live = kdfast.sparse_distill_loss(s, ids.to(device),
                                      torch.log_softmax(privileged, -1).gather(-1, ids).to(device), **settings)
    live.sum().backward()
    expected = SELF_REG_WEIGHT * loss_utils.compute_topk_self_distillation_loss(
        student.double(), privileged.double(), distillation_topk=LIGHT_TOPK, distillation_alpha=1.0,
        distillation_add_tail=True)
    assert live.abs().max().item() > 1e-5 and s.grad.abs().max().item() > 0
    torch.testing.assert_close(live.double().cpu(), expected, rtol=1e-5, atol=1e-8)
