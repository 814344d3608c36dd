"""OpenRLHF's tests of its vocab-sharded losses (its FSDP2 tensor-parallel "loss parallel" helpers,
openrlhf/utils/fsdp2/tp/loss_parallel.py, tests/loss_parallel/, pull request 1176) and of its actor's temperature,
their inputs and expectations, run on kdfast's vocab-parallel `distill_loss` (`process_group` + `vocab_range`) and on
`linear_token_logprobs`.

The peer's sharded cases: 2 ranks on gloo, the vocabulary of 5 split unevenly (3, 2) as DTensor shards, its fixed [2, 3,
5] logits (`REFERENCE` below) moved by an offset per test, float32, `assert_close(rtol=1e-5, atol=1e-6)` on the
loss and on this rank's slice of the gradient against a dense float32 torch reference. Here the same 2 ranks (gloo,
CPU) and shards, each rank's shard passed with `vocab_range`; the expectations are the peer's formulas in float64,
at the peer's tolerances, on kdfast's PyTorch and C++ backends (the Triton interpreter on the KD case that has a
gradient: a second or so a call on each rank).

- test_loss_parallel_compute_kd_loss_sharded: OpenRLHF's KD loss (`KDLoss`, removed from openrlhf/models/loss.py in
  March 2026; the sharded form remains) is the soft cross-entropy -sum_v p log q averaged over the rows whose label
  is not -100: kdfast's forward KL (T = 1, no CE) plus the teacher's entropy H(p), a constant of the teacher's
  logits that the test adds in float64 (the gradient is the same). The peer's three modes: "both_dtensor" (student
  and teacher sharded), "student_dtensor" (the teacher dense: kdfast is given the teacher's shard as a strided view
  of it) and "teacher_dtensor" (the student dense: each rank passes its columns of the dense student, a view, and
  backward fills only those). In that last mode the peer's rank-local gradient also spreads the rank's partial
  log-sum-exp term over every column, so its ranks' gradients differ from kdfast's column by column; both sum over
  the ranks to the full gradient, which is what is asserted (all-reduced), with kdfast's zeros outside the shard.
  The peer's teacher is the student's logits + 0.55, the same softmax: the loss is H(p) and the gradient 0 (asserted
  as the peer does, at 1e-6). kdfast's addition: the same cases with the teacher's logits reversed along the
  vocabulary, so that the loss and gradient are not trivial (`-distinct` cases). Left out: its TypeError when
  neither input is a DTensor (kdfast's call without a group is its ordinary dense form).
- test_loss_parallel_compute_token_log_probs_sharded (T = 0.7, an ignored row whose log-prob is 0, upstream
  linspace(0.3, 1.3)): log q(label) is -CE with `kd_weight=0, ce_weight=1, reduction="none"`; kdfast's CE is at T =
  1, so the shard is divided by T before the call (autograd carries the 1 / T); an ignored row's CE and gradient are
  0 as the peer's. Its second check (against `compute_token_log_probs` of openrlhf/models/utils.py, dense) has the
  same expectation. It and the entropy test below also run on `linear_token_logprobs(process_group=...)`, the fused
  per-token form (an identity head's shard; T and the ignore index its own), in
  tests/test_token_logprobs_vocab_parallel_peer_cases.py.
- test_loss_parallel_compute_entropy_sharded (value and gradient, upstream linspace(0.1, 1.1)): H(q) = log V -
  KL(q || uniform), kdfast's reverse KL against a teacher of zero logits, differentiable; the value also as kdfast's
  `return_components` entropy (a metric, no gradient).
- test_loss_parallel_sharded_logsumexp (upstream linspace(0.2, 1.2); its two `mean_grad` settings are the peer's
  all-reduce backward and have one expectation): kdfast's z-loss is log(Z)^2 per row (`z_loss_weight=1`, nothing
  else), so log Z = sqrt(z) (every row's log Z is positive here, asserted), and the upstream u of log Z is u / (2 log
  Z) on z.
- test_compute_argmax_sharded and ..._cross_rank_tie_break: kdfast returns no argmax; its `accuracy` component is
  whether the student's largest logit is the label's, a tie counting as a hit. The peer's argmax as labels (its mask's
  rows kept, the others -100) are hits, a shifted label a miss. At a tie across ranks the peer picks the later rank's
  column; kdfast counts both tied columns as hits (asserted) and any other as a miss.
- Left out: test_loss_parallel_allreduce_sum, ..._gather_token_logits_sharded, ..._unpack_sharded_logits and
  test_fsdp2_tp_loss_parallel_strategy (the peer's collective and DTensor plumbing and its trainer strategy: no loss).

tests/test_actor_entropy_temperature.py (test_entropy_matches_temperature_scaled_policy, T 0.5 and 1.5): a "table"
LM whose logits are row input_id of a seeded randn(11, 11) table; the actor's log-probs of the next tokens and the
entropy at T, atol 1e-5. In kdfast that LM is a linear head on one-hot hidden states (the head's weight the table
transposed): `linear_token_logprobs(..., temperature=T, return_entropy=True)` on every backend.

Not ported: tests/test_kl_estimator_gradient.py and the policy/value/DPO losses (they take per-token log-probs, no
logits: no kdfast counterpart)."""

import math

import pytest
import torch
import torch.distributed as dist
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases

import kdfast

WORLD = 2
IGNORE = -100
SHARDS = ((0, 3), (3, 5))  # the peer's LOCAL_VOCAB_SIZES (3, 2)
VOCAB = 5
ATOL, RTOL = 1e-6, 1e-5  # the peer's
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors

# The peer's _build_reference_full_logits, before its offset.
REFERENCE = torch.tensor([[[3.00, -1.00, 0.50, 2.00, 1.00],
                           [0.10, 0.20, 0.30, 0.40, 0.00],
                           [-2.00, -1.50, -0.10, -0.20, -0.30]],
                          [[1.00, 2.50, 2.40, 2.60, 2.70],
                           [4.00, 3.00, 2.00, 1.00, 0.00],
                           [0.00, 1.00, 5.00, 4.00, 3.00]]])
KD_LABELS = torch.tensor([[0, IGNORE, 4], [2, 3, 1]])


def close(what, found, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(found.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda message: f"{what}: {message}")


def shard_of(full, rank):
    start, stop = SHARDS[rank]
    return full[..., start:stop]


def group_settings(rank, backend):
    return dict(process_group=dist.group.WORLD, vocab_range=SHARDS[rank], backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# The peer's expectations, float64.
# ---------------------------------------------------------------------------------------------------------------

def soft_cross_entropy64(student, teacher, labels):
    """OpenRLHF's KDLoss: -sum_v p log q per row, averaged over the rows whose label is kept."""
    p = torch.softmax(teacher.double(), -1)
    per_row = -(p * torch.log_softmax(student, -1)).sum(-1)
    kept = (labels != IGNORE).double()
    return (per_row * kept).sum() / kept.sum()


def teacher_entropy64(teacher, labels):
    """H(p) averaged as the loss is: what the soft cross-entropy adds to forward KL."""
    log_p = torch.log_softmax(teacher.double(), -1)
    kept = (labels != IGNORE).double()
    return (-(log_p.exp() * log_p).sum(-1) * kept).sum() / kept.sum()


def entropy64(logits):
    log_q = torch.log_softmax(logits, -1)
    return -(log_q.exp() * log_q).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# The cases each rank runs.
# ---------------------------------------------------------------------------------------------------------------

def kd_case(mode, teacher_kind, backend):
    """test_compute_kd_loss_sharded's three modes; `teacher_kind` "peer" (student + 0.55: the same softmax) or
    "distinct" (kdfast's addition: the teacher's logits reversed along the vocabulary)."""
    rank = dist.get_rank()
    student = REFERENCE - 0.1
    teacher = REFERENCE + 0.45 if teacher_kind == "peer" else REFERENCE.flip(-1) + 0.45
    if mode == "student_full":  # the peer's "teacher_dtensor": the dense student's columns, a view
        dense = student.clone().requires_grad_(True)
        given, grad_of = shard_of(dense, rank), dense
    else:
        given = shard_of(student, rank).clone().requires_grad_(True)
        grad_of = given
    # "teacher_full" (the peer's "student_dtensor") slices the dense teacher: a strided view, as kdfast is given it.
    teacher_given = shard_of(teacher, rank) if mode == "teacher_full" else shard_of(teacher, rank).clone()
    loss = kdfast.distill_loss(given, teacher_given, KD_LABELS, divergence="forward_kl",
                               **group_settings(rank, backend))
    loss.backward()

    reference = student.double().requires_grad_(True)
    expected = soft_cross_entropy64(reference, teacher, KD_LABELS)
    expected.backward()
    close("loss (forward KL + H(teacher))", loss.detach() + teacher_entropy64(teacher, KD_LABELS), expected.detach())
    if teacher_kind == "peer":  # same softmax: the peer's gradient is 0, and kdfast's
        close("gradient", grad_of.grad, torch.zeros_like(grad_of.grad))
    if mode == "student_full":
        outside = torch.ones(VOCAB, dtype=torch.bool)
        outside[slice(*SHARDS[rank])] = False
        assert bool((grad_of.grad[..., outside] == 0).all()), "kdfast fills only this rank's columns"
        summed = grad_of.grad.clone()
        dist.all_reduce(summed)
        close("gradient summed over the ranks", summed, reference.grad)
    else:
        close("gradient shard", grad_of.grad, shard_of(reference.grad, rank))


def token_log_probs_case(backend):
    """test_compute_token_log_probs_sharded: T = 0.7, log q(label), 0 at the ignored row."""
    rank, temperature = dist.get_rank(), 0.7
    full = REFERENCE - 0.25
    labels = torch.tensor([[0, 3, IGNORE], [4, 1, 2]])
    upstream = torch.linspace(0.3, 1.3, steps=labels.numel()).view_as(labels)
    local = shard_of(full, rank).clone().requires_grad_(True)
    scaled = local / temperature  # kdfast's CE is at T = 1: the shard carries the temperature
    ce = kdfast.distill_loss(scaled, scaled.detach(), labels, kd_weight=0.0, ce_weight=1.0, reduction="none",
                             **group_settings(rank, backend))
    log_probs = -ce
    (log_probs * upstream).sum().backward()

    reference = full.double().requires_grad_(True)
    log_q = torch.log_softmax(reference / temperature, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = torch.where(labels != IGNORE, log_q, torch.zeros_like(log_q))
    (expected * upstream.double()).sum().backward()
    close("log-probs", log_probs.detach(), expected.detach())
    assert log_probs[0, 2].item() == 0.0, "the ignored row's log-prob is 0"
    close("gradient shard", local.grad, shard_of(reference.grad, rank))


def entropy_case(backend):
    """test_compute_entropy_sharded: H(q) = log V - KL(q || uniform), value and gradient."""
    rank = dist.get_rank()
    full = REFERENCE + 0.4
    upstream = torch.linspace(0.1, 1.1, steps=6).view(2, 3)
    local = shard_of(full, rank).clone().requires_grad_(True)
    uniform = torch.zeros_like(local)
    kl, parts = kdfast.distill_loss(local, uniform, None, divergence="reverse_kl", reduction="none",
                                    return_components=True, **group_settings(rank, backend))
    entropy = math.log(VOCAB) - kl
    (entropy * upstream).sum().backward()

    reference = full.double().requires_grad_(True)
    expected = entropy64(reference)
    (expected * upstream.double()).sum().backward()
    close("entropy", entropy.detach(), expected.detach())
    close("entropy component", parts.entropy, expected.detach())
    close("gradient shard", local.grad, shard_of(reference.grad, rank))


def logsumexp_case(backend):
    """test_sharded_logsumexp: log Z from kdfast's per-row z-loss log(Z)^2, its gradient through it."""
    rank = dist.get_rank()
    full = REFERENCE + 0.35
    upstream = torch.linspace(0.2, 1.2, steps=6).view(2, 3)
    local = shard_of(full, rank).clone().requires_grad_(True)
    z_loss = kdfast.distill_loss(local, local.detach(), None, kd_weight=0.0, z_loss_weight=1.0, reduction="none",
                                 **group_settings(rank, backend))
    reference = full.double().requires_grad_(True)
    expected = torch.logsumexp(reference, -1)
    assert bool((expected > 0).all()), "log Z > 0 on every row: sqrt(log(Z)^2) is log Z"
    log_z = z_loss.sqrt()
    # d z / d x = 2 log Z q: the upstream u of log Z is u / (2 log Z) on z.
    (z_loss * upstream / (2 * log_z.detach())).sum().backward()
    (expected * upstream.double()).sum().backward()
    close("log-sum-exp", log_z.detach(), expected.detach())
    close("gradient shard", local.grad, shard_of(reference.grad, rank))


def accuracy(full, labels, backend):
    rank = dist.get_rank()
    local = shard_of(full, rank)
    _, parts = kdfast.distill_loss(local, local, labels, kd_weight=0.0, ce_weight=1.0, reduction="none",
                                   return_components=True, **group_settings(rank, backend))
    return parts.accuracy


def argmax_case(backend):
    """test_compute_argmax_sharded: the peer's argmax over the masked rows are hits, the next column misses."""
    full = REFERENCE + 0.05
    mask = torch.tensor([[True, False, True], [True, True, False]])
    argmax = full.argmax(-1)
    expected = torch.where(mask, 1.0, 0.0)
    close("accuracy at the argmax", accuracy(full, torch.where(mask, argmax, IGNORE), backend), expected, 0, 0)
    shifted = torch.where(mask, (argmax + 1) % VOCAB, IGNORE)
    close("accuracy elsewhere", accuracy(full, shifted, backend), torch.zeros(2, 3), 0, 0)


def argmax_tie_case(backend):
    """test_compute_argmax_sharded_cross_rank_tie_break: rows tied across the ranks' shards (columns 2 and 4, 2 and
    3); the peer's answer [4, 3] and the other tied column [2, 2] are hits in kdfast, column 0 a miss."""
    full = torch.tensor([[[1.0, 2.0, 5.0, 0.0, 5.0], [0.0, -1.0, 1.0, 1.0, 0.5]]])
    for labels, hits in (([4, 3], [1.0, 1.0]), ([2, 2], [1.0, 1.0]), ([0, 0], [0.0, 0.0])):
        close(f"accuracy at {labels}", accuracy(full, torch.tensor([labels]), backend), torch.tensor([hits]), 0, 0)


def cases() -> dict:
    listed = {}
    for backend in VP_BACKENDS:
        for mode in ("both_sharded", "teacher_full", "student_full"):
            for teacher_kind in ("peer", "distinct"):
                if backend == "triton" and teacher_kind == "peer":
                    continue  # the interpreter runs the cases with a gradient
                listed[f"kd_loss-{mode}-{teacher_kind}-{backend}"] = (kd_case, mode, teacher_kind, backend)
        if backend == "triton":
            continue
        listed[f"token_log_probs-{backend}"] = (token_log_probs_case, backend)
        listed[f"entropy-{backend}"] = (entropy_case, backend)
        listed[f"logsumexp-{backend}"] = (logsumexp_case, backend)
        listed[f"argmax-{backend}"] = (argmax_case, backend)
        listed[f"argmax_cross_rank_tie-{backend}"] = (argmax_tie_case, backend)
    return listed


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases, WORLD, tmp_path_factory.mktemp("openrlhf_loss_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_loss_parallel(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed


# ---------------------------------------------------------------------------------------------------------------
# tests/test_actor_entropy_temperature.py
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_entropy_matches_temperature_scaled_policy(temperature, backend):
    """The peer's _TableLM (randn(11, 11) from seed 0) on sequences randint(0, 11, (2, 6)) from seed 1: log q of each
    next token and the entropy of q at T, within the peer's 1e-5 of float64."""
    vocab, device = 11, device_for(backend)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    sequences = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    inputs, next_tokens = sequences[:, :-1], sequences[:, 1:]
    # logits = table[input_id] = onehot(input_id) @ table: a head whose weight [V, H] is the table transposed.
    hidden = torch.nn.functional.one_hot(inputs, vocab).float()
    log_probs, entropy = kdfast.linear_token_logprobs(hidden.to(device), table.T.contiguous().to(device),
                                                     next_tokens.to(device), temperature=temperature,
                                                     return_entropy=True, backend=backend)
    logits = table.double()[inputs] / temperature
    expected_log_probs = torch.log_softmax(logits, -1).gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
    assert log_probs.shape == entropy.shape == (2, 5)
    close("log-probs", log_probs.cpu(), expected_log_probs, atol=1e-5, rtol=0)
    close("entropy", entropy.cpu(), entropy64(logits), atol=1e-5, rtol=0)
