"""torchtune's tests of its distillation and chunked losses (pytorch/torchtune, torchtune/modules/loss), their inputs
and expectations, with kdfast's API as the thing under test.

What torchtune computes (torchtune/modules/loss/kd_losses.py), and how it maps onto kdfast:
- Every KD loss here is at temperature 1 with no T^2 factor, no CE term, the labels only a mask (a row whose label is
  ignore_index adds nothing), the sum over the kept rows divided by their count (0 when there are none): kdfast's
  `distill_loss(..., t2_scale=False)` with its defaults kd_weight=1, ce_weight=0, reduction="mean".
- ForwardKLLoss is not KL(p || q) but the soft cross-entropy -sum_j p_j log q_j = KL(p || q) + H(p) (it leaves out
  the teacher's sum_j p_j log p_j): the peer's golden 1.7209 is kdfast's forward KL 0.6293 plus the teacher's entropy
  1.0916. kdfast has no soft-CE; the port adds H(p) from kdfast's own parts: the `entropy` component (the student's
  entropy at T, reduced as the loss) of a call that is given the teacher's logits as its student. The gradient is
  the same (H(p) does not depend on the student). `test_forward_kl_is_soft_cross_entropy` shows the split.
- ReverseKLLoss is KL(q || p), kdfast's `divergence="reverse_kl"`. SymmetricKLLoss(sym_kd_ratio=r) is
  r * ForwardKLLoss + (1 - r) * ReverseKLLoss (not a JSD: no mixture distribution), so two kdfast calls weighed.
- The *WithChunkedOutputLoss forms sum each chunk's unnormalised loss and divide by the whole batch's kept rows:
  kdfast's call per chunk with `num_items_in_batch` = that count, summed (each chunk a view of the student's logits,
  so one backward reaches the whole tensor). With no kept row kdfast's plain mean gives 0, as the peer's forward form
  does (its reverse and symmetric chunked forms divide 0 by 0 there; no peer test goes there).
- Inf logits: torchtune zeroes a column's term wherever the student's logit is +-inf (forward) or either model's is
  (reverse), and keeps the rest of the row as it is. Where both models put -inf at the same columns (padding, a
  masked token) that is what the true divergence gives, and kdfast agrees, gradient included
  (`test_inf_columns_shared_by_both_models`; torchtune's own ReverseKLLoss gradient is NaN on any row where the
  teacher holds a -inf, 0 * -inf in the backward of q * log p before its mask: the float64 reference here masks the
  log-probs before the product, the same value with a finite gradient). Where only the
  student (forward) or only the teacher (reverse) is -inf at a column the other gives mass, the true KL is +inf and
  torchtune's value is a sum with that term dropped, not a divergence (nor renormalised): not expressible in kdfast,
  which returns +inf there (`test_inf_column_one_model_only_is_not_torchtunes`, so that a change is seen).

Tolerances: the peer's (rtol = atol = 1e-2) on its own comparisons; beside them kdfast against torchtune's formula in
float64 on the same (bf16-rounded) inputs: the loss within 2e-6, float32 gradients within 1e-5 relative, and bf16
gradients within one bf16 ulp (kdfast rounds its float32 gradient, 4e-7 from float64 here, to the logits' dtype).

tests/torchtune/modules/loss/test_kd_losses.py (each test on every kdfast backend):
- Test{Forward,Reverse,Symmetric}KLWithChunkedOutputLoss.test_*_kl_loss_expected (2 x 4 x 4 bf16 logits, 2 chunks):
  `test_golden_losses`, the peer's golden values at its tolerance (1e-2) for the chunked and the plain forms, and
  torchtune's formula in float64 on the same bf16 inputs within 2e-6, gradient included.
- test_forward_kl_loss / test_reverse_kl_loss / test_symmetric_kl_loss (3 x 50 x 50 bf16 randn after set_seed(42),
  a fifth of the labels ignored, 8 chunks: tensor_split for forward, chunk for the other two, as the peer splits):
  `test_chunked_matches_plain`, chunked against plain at the peer's 1e-2 and at float32's rounding, both against
  torchtune's float64 formula, gradients too. Under Triton's interpreter (off a GPU, slow) only the symmetric form,
  which makes all three kinds of call, on the first of the three sequences.
- test_forward_kl_loss_zero_masks (every label ignored): `test_forward_kl_zero_masks`, 0 from both forms, and a
  zero gradient.

tests/torchtune/modules/loss/test_ce_chunked_output_loss.py (CEWithChunkedOutputLoss: F.cross_entropy of each chunk's
upcast logits, summed, over the kept rows): kdfast's CE term alone (kd_weight=0, ce_weight=1; the teacher is then
unused, the student's own logits are passed) per chunk with num_items_in_batch: `test_ce_chunked_output_loss`, the
peer's draws and tolerance against its float32 reference, and float64 with the gradient; under the interpreter the
first of the three sequences.

tests/torchtune/modules/loss/test_cross_entropy_loss.py (LinearCrossEntropyLoss: the ignored rows dropped, the model's
output layer applied to 8 chunks of the rest, CE summed over the kept rows): `kdfast.linear_cross_entropy` with
chunk_size=2 (8 chunks of the 16 rows) in `test_linear_cross_entropy_loss`. The peer's layer is an nn.Linear with a
bias, which its loss applies, while its reference F.linear(hidden, weight) leaves the bias out: the two are 5.4e-3
apart, inside its tolerance. Both are asserted: the peer's reference at its tolerance, and the loss its module
computes (bias included) in float64 within 1e-5 with the gradients of hidden, weight and bias; an ignored row gets
a zero hidden gradient, as the peer's masking before the projection gives it.

tests/torchtune/modules/loss/test_sft_losses.py (never on main: a branch of the peer's loss refactor, commit 21601bbc4,
removed in 0cb32bef5): ChunkedCrossEntropyLoss (8 chunks along the sequence) and ChunkedCrossEntropywithAutogradLoss
(gradients computed in the forward pass, chunk_size 512, so one chunk) on the same draws, a randn head without bias:
`test_sft_chunked_cross_entropy` with chunk_size 2 and 512, the gradients against float64 too.

Left out: tests/torchtune/modules/test_early_exit_loss.py (a plain nn.CrossEntropyLoss per early layer, weighed by
torchtune's layer-scale schedules and curricula, which are what it tests; no distillation, no chunking), the rlhf
DPO/PPO losses, test_dtensor_cross_entropy.py (a branch's DTensor plumbing of LinearCrossEntropyLoss on a CUDA process
group; nothing numerical a single-process CPU run could port beyond what `test_linear_cross_entropy_loss` checks) and
test_liger_ce_loss.py (a contributor's branch wrapping Liger-Kernel's fused linear CE; Liger's own cases are
tests/test_liger_linear_cross_entropy_cases.py). The peer's SymmetricKLLoss refusal of sym_kd_ratio outside [0, 1]
checks torchtune's constructor, nothing of kdfast.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for

import kdfast

INTERPRETED = not torch.cuda.is_available()
IGNORE = -100
KINDS = ["forward", "reverse", "symmetric"]
PEER_TOL = dict(rtol=1e-2, atol=1e-2)  # every one of the peer's assert_expected calls
# kdfast's float32 loss from the same (rounded) inputs against float64, and its float32 gradients
LOSS_TOL = dict(rtol=0.0, atol=2e-6)
FP32_GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


@contextlib.contextmanager
def peer_seed():
    """The peer's autouse fixture, set_seed(42) (rank 0: torch.manual_seed(42)), without touching this process's
    generator: the draws come from the global CPU generator as the peer's (nn.Linear's init included)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        yield


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), **tol)


def close_bf16_grad(grad, expected):
    """A bf16 gradient within one bf16 ulp (2^-7 relative) of float64's, and of its largest entry: kdfast rounds its
    float32 gradient to bf16 (measured on the peer's draws: the C++ kernel within half an ulp, the PyTorch backend
    0.93), and a gradient summed from two calls (the symmetric form) is rounded again where its terms cancel.
    kdfast's float32 gradients of these losses are within 4e-7 of float64's."""
    ulp = 2.0**-7
    close(grad, expected, rtol=ulp, atol=ulp * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# torchtune's losses in float64 (the expectation), and the same losses from kdfast's calls.
# ---------------------------------------------------------------------------------------------------------------

def torchtune_rows64(kind, student, teacher, ratio=0.5):
    """Each row's ForwardKLLoss / ReverseKLLoss / SymmetricKLLoss term as kd_losses.py writes it (its inf masks
    included), in float64; differentiable in `student`."""
    log_q, log_p = torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1)
    # The peer masks each product; masking the log-probs before it gives the same value, and a gradient that is not
    # 0 * -inf (the peer's own ReverseKLLoss has a NaN gradient on any row where the teacher holds a -inf logit).
    forward = -(log_p.exp() * log_q.masked_fill(torch.isinf(student), 0)).sum(-1)
    either_inf = torch.isinf(student) | torch.isinf(teacher)
    reverse = -(log_q.exp() * (log_p - log_q).masked_fill(either_inf, 0)).sum(-1)
    return {"forward": forward, "reverse": reverse, "symmetric": ratio * forward + (1 - ratio) * reverse}[kind]


def torchtune_loss64(kind, student, teacher, labels):
    """The normalised loss: the kept rows' sum over their count, 0 without any (chunked or not: the same value)."""
    rows, kept = torchtune_rows64(kind, student, teacher).reshape(-1), (labels != IGNORE).reshape(-1)
    count = int(kept.sum())
    return (rows * kept).sum() / count if count else rows.sum() * 0


def kdfast_torchtune(kind, student, teacher, labels, backend, ratio=0.5, **options):
    """torchtune's `kind` loss from kdfast calls (module docstring): T = 1, no T^2, labels a mask; forward KL plus the
    teacher's entropy, kdfast's entropy component of a call given the teacher as its student."""
    common = dict(t2_scale=False, backend=backend, **options)
    if kind == "reverse":
        return kdfast.distill_loss(student, teacher, labels, divergence="reverse_kl", **common)
    _, teacher_parts = kdfast.distill_loss(teacher, teacher, labels, return_components=True, **common)
    forward = kdfast.distill_loss(student, teacher, labels, divergence="forward_kl", **common) + teacher_parts.entropy
    if kind == "forward":
        return forward
    return ratio * forward + (1 - ratio) * kdfast_torchtune("reverse", student, teacher, labels, backend, **options)


def split(kind, tensor, chunks):
    """The peer's split along the sequence: tensor_split in its forward KL test and chunked forward loss, chunk in the
    reverse and symmetric ones (50 tokens in 8: 7, 7, 6 x 6 against 7 x 7, 1)."""
    return tensor.tensor_split(chunks, dim=1) if kind == "forward" else tensor.chunk(chunks, dim=1)


def kdfast_chunked(kind, student, teacher, labels, chunks, backend):
    """*WithChunkedOutputLoss: each chunk (a view of `student`) with the batch's kept-row count, summed."""
    count = int((labels != IGNORE).sum())
    return sum(kdfast_torchtune(kind, s, t, lab, backend, num_items_in_batch=count or None)
               for s, t, lab in zip(*(split(kind, x, chunks) for x in (student, teacher, labels))))


def kd_peer_draws(ignore_all_tokens=False):
    """setup_forward_kl_loss and the reverse / symmetric tests: [3, 50, 50] bf16 student and teacher, labels, and a
    fifth of them (randint(0, 50) < 10) ignored, or all of them."""
    batch, tokens, vocab = 3, 50, 50
    with peer_seed():
        student = torch.randn(batch, tokens, vocab, dtype=torch.bfloat16)
        teacher = torch.randn(batch, tokens, vocab, dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (batch, tokens), dtype=torch.long)
        random_indices = torch.randint(0, tokens, (batch, tokens))
    if ignore_all_tokens:
        labels[:] = IGNORE
    else:
        labels[random_indices < tokens // 5] = IGNORE
    return student, teacher, labels


def interpreter_cut(backend, *tensors):
    """Under Triton's interpreter (about 15 ms a row) the first of the peer's sequences only."""
    return tuple(t[:1] for t in tensors) if backend == "triton" and INTERPRETED else tensors


# The peer's *_expected tests: [2, 4, 4] bf16 logits (written out in the peer), labels, golden losses.
GOLDEN_STUDENT = [[[1.1250, -0.4102, -0.0879, -2.5000], [0.2676, 0.3535, 0.8711, -1.4688],
                   [-0.1084, 1.6641, 0.0084, 0.1196], [0.5000, -0.6406, -0.2236, -1.5938]],
                  [[-1.5312, -1.9219, 0.0000, -0.5039], [-1.5391, 1.5312, 0.5820, 0.2695],
                   [-0.3887, 1.2188, 0.0000, 0.6055], [0.5000, 1.3828, 0.1309, -1.0312]]]
GOLDEN_TEACHER = [[[-0.0381, -1.2578, -1.2031, 0.0947], [-0.7852, 0.4492, 1.5547, 0.0972],
                   [0.8203, 0.0012, 0.7656, 0.3477], [-1.5781, 0.4297, 0.5977, 0.3926]],
                  [[1.5156, 0.1641, 2.0781, -0.7734], [-0.5898, 0.4453, -0.7969, 0.6328],
                   [0.6289, -0.8359, 0.9258, 0.2109], [0.0006, 0.5195, 3.2344, -1.5781]]]
GOLDEN_LABELS = [[0, 3, 3, 1], [1, 1, 1, 1]]
GOLDEN = {"forward": 1.7209, "reverse": 0.6775, "symmetric": 1.1992}


# ---------------------------------------------------------------------------------------------------------------
# test_kd_losses.py
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_golden_losses(kind, backend):
    """test_{forward,reverse,symmetric}_kl_loss_expected: the chunked (2 chunks) and plain forms give the peer's
    golden loss; both are torchtune's float64 formula on these bf16 inputs, and so is the gradient."""
    device = device_for(backend)
    student = torch.tensor(GOLDEN_STUDENT, dtype=torch.bfloat16)
    teacher = torch.tensor(GOLDEN_TEACHER, dtype=torch.bfloat16)
    labels = torch.tensor(GOLDEN_LABELS)
    s64 = student.double().requires_grad_(True)
    expected = torchtune_loss64(kind, s64, teacher, labels)
    expected.backward()
    close(expected, torch.tensor(GOLDEN[kind]), **PEER_TOL)  # the port's formula and inputs are the peer's

    args = (teacher.to(device), labels.to(device))
    for form in ("chunked", "plain"):
        s = student.clone().to(device).requires_grad_(True)
        loss = kdfast_chunked(kind, s, *args, 2, backend) if form == "chunked" else \
            kdfast_torchtune(kind, s, *args, backend)
        loss.backward()
        assert loss.shape == () and loss.dtype == torch.float32
        close(loss, torch.tensor(GOLDEN[kind]), **PEER_TOL)
        close(loss, expected, **LOSS_TOL)
        assert s.grad.dtype == torch.bfloat16
        close_bf16_grad(s.grad, s64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_is_soft_cross_entropy(backend):
    """Why the port adds the teacher's entropy: kdfast's forward KL alone is the peer's golden 1.7209 less H(p)
    (0.6293 + 1.0916), far outside the peer's tolerance."""
    device = device_for(backend)
    student, teacher = (torch.tensor(x, dtype=torch.bfloat16).to(device) for x in (GOLDEN_STUDENT, GOLDEN_TEACHER))
    labels = torch.tensor(GOLDEN_LABELS).to(device)
    kl = kdfast.distill_loss(student, teacher, labels, t2_scale=False, backend=backend)
    _, teacher_parts = kdfast.distill_loss(teacher, teacher, labels, t2_scale=False, backend=backend,
                                           return_components=True)
    log_p = torch.log_softmax(teacher.cpu().double(), -1)
    teacher_entropy = -(log_p.exp() * log_p).sum(-1).mean()
    close(teacher_parts.entropy, teacher_entropy, **LOSS_TOL)
    close(kl + teacher_entropy, torchtune_loss64("forward", student.cpu(), teacher.cpu(), labels.cpu()), **LOSS_TOL)
    assert abs(kl.item() - GOLDEN["forward"]) > 1.0


# Under Triton's interpreter (slow) the symmetric form alone: it makes every kind of call the other two make.
CHUNKED_CASES = [(kind, backend) for backend in BACKENDS for kind in KINDS
                 if not (backend == "triton" and INTERPRETED and kind != "symmetric")]


@pytest.mark.parametrize(("kind", "backend"), CHUNKED_CASES)
def test_chunked_matches_plain(kind, backend):
    """test_forward_kl_loss / test_reverse_kl_loss / test_symmetric_kl_loss: 8 chunks against the plain loss over the
    flattened rows at the peer's tolerance, and each at float32's rounding of torchtune's float64 formula, gradients
    too (the peer's draws; under the interpreter only the symmetric form on the first sequence)."""
    device = device_for(backend)
    student, teacher, labels = interpreter_cut(backend, *kd_peer_draws())
    assert 0 < int((labels == IGNORE).sum()) < labels.numel() // 2  # some rows ignored, most kept
    s64 = student.double().requires_grad_(True)
    expected = torchtune_loss64(kind, s64, teacher, labels)
    expected.backward()

    teacher, labels = teacher.to(device), labels.to(device)
    s_chunked, s_plain = (student.clone().to(device).requires_grad_(True) for _ in range(2))
    chunked = kdfast_chunked(kind, s_chunked, teacher, labels, 8, backend)
    vocab = student.shape[-1]
    plain = kdfast_torchtune(kind, s_plain.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1),
                             backend)
    (chunked + plain).backward()
    close(chunked, plain, **PEER_TOL)
    close(chunked, plain, rtol=0.0, atol=1e-6)  # the same sums in another order
    for loss, grad in ((chunked, s_chunked.grad), (plain, s_plain.grad)):
        close(loss, expected, **LOSS_TOL)
        close_bf16_grad(grad, s64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_zero_masks(backend):
    """test_forward_kl_loss_zero_masks: every label ignored, the chunked form 0 (the peer's guard) and equal to the
    plain one; kdfast's mean over no row is 0, and no row gets a gradient."""
    device = device_for(backend)
    student, teacher, labels = interpreter_cut(backend, *kd_peer_draws(ignore_all_tokens=True))
    assert bool((labels == IGNORE).all())
    assert torchtune_loss64("forward", student, teacher, labels).item() == 0.0
    teacher, labels = teacher.to(device), labels.to(device)
    s = student.clone().to(device).requires_grad_(True)
    chunked = kdfast_chunked("forward", s, teacher, labels, 8, backend)
    plain = kdfast_torchtune("forward", s.reshape(-1, s.shape[-1]), teacher.reshape(-1, s.shape[-1]),
                             labels.reshape(-1), backend)
    (chunked + plain).backward()
    close(chunked, torch.tensor(0.0), **PEER_TOL)
    close(chunked, plain, **PEER_TOL)
    assert chunked.item() == 0.0 and plain.item() == 0.0
    assert not s.grad.any()


# Not the peer's cases: what kd_losses.py's inf masks give against kdfast (module docstring).
def inf_inputs(columns_of):
    """Four rows of 8 float32 logits (randn * 2); columns_of(row) -> {"student": [...], "teacher": [...]} set -inf."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(4, 8, generator=generator) * 2 for _ in range(2))
    for row in range(4):
        for name, tensor in (("student", student), ("teacher", teacher)):
            tensor[row, columns_of(row).get(name, [])] = -math.inf
    return student, teacher, torch.tensor([0, 1, 2, IGNORE])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_inf_columns_shared_by_both_models(kind, backend):
    """Both models -inf at the same columns (a padded vocabulary, a banned token; 1 to 3 a row): torchtune's masked
    terms are the divergence's own zeros, and kdfast gives its loss, with a zero gradient at those columns."""
    shared = lambda row: {"student": list(range(5, 5 + row % 3 + 1)), "teacher": list(range(5, 5 + row % 3 + 1))}
    student, teacher, labels = inf_inputs(shared)
    device = device_for(backend)
    s64 = student.double().requires_grad_(True)
    expected = torchtune_loss64(kind, s64, teacher, labels)
    expected.backward()
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast_torchtune(kind, s, teacher.to(device), labels.to(device), backend)
    loss.backward()
    assert torch.isfinite(expected) and torch.isfinite(s.grad).all()
    close(loss, expected, rtol=0.0, atol=4e-6)
    close(s.grad, s64.grad, **FP32_GRAD_TOL)
    assert not s.grad.cpu()[torch.isinf(student)].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_column_one_model_only_is_not_torchtunes(backend):
    """The student -inf where the teacher has mass (row 0), the teacher -inf where the student has (row 1): the true
    forward, respectively reverse, KL is +inf and kdfast returns it; torchtune drops the term and stays finite.
    Rows 2 and 3 (no inf; row 3 ignored) agree per row."""
    columns = {0: {"student": [3]}, 1: {"teacher": [4]}}
    student, teacher, labels = inf_inputs(lambda row: columns.get(row, {}))
    device = device_for(backend)
    for kind, inf_row in (("forward", 0), ("reverse", 1)):
        ours = kdfast_torchtune(kind, student.to(device), teacher.to(device), labels.to(device), backend,
                                reduction="none").cpu()
        theirs = torchtune_rows64(kind, student, teacher)
        assert torch.isfinite(theirs).all()
        assert ours[inf_row].item() == math.inf
        close(ours[2], theirs[2], rtol=0.0, atol=4e-6)
        assert ours[3].item() == 0.0  # ignored
        if kind == "forward":  # the teacher -inf alone, row 1: p = 0 there, an agreed 0 * log q = 0
            close(ours[1], theirs[1], rtol=0.0, atol=4e-6)
        else:  # the student -inf alone, row 0: q = 0 there, an agreed 0 * log(q / p) = 0
            close(ours[0], theirs[0], rtol=0.0, atol=4e-6)


# ---------------------------------------------------------------------------------------------------------------
# test_ce_chunked_output_loss.py, test_cross_entropy_loss.py, test_sft_losses.py
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_chunked_output_loss(backend):
    """test_chunked_cross_entropy_loss: CEWithChunkedOutputLoss over 8 tensor_split chunks of [3, 50, 50] bf16
    logits against F.cross_entropy of the upcast logits (the peer's tolerance), and float64 with the gradient."""
    batch, tokens, vocab = 3, 50, 50
    with peer_seed():
        logits = torch.randn(batch, tokens, vocab, dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (batch, tokens), dtype=torch.long)
        random_indices = torch.randint(0, tokens, (batch, tokens))
    labels[random_indices < tokens // 5] = IGNORE
    logits, labels = interpreter_cut(backend, logits, labels)
    peer_reference = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE)
    l64 = logits.double().requires_grad_(True)
    expected = F.cross_entropy(l64.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE)
    expected.backward()

    device, count = device_for(backend), int((labels != IGNORE).sum())
    x = logits.clone().to(device).requires_grad_(True)
    # CE alone: kd_weight=0 leaves the teacher unread; the student's own logits stand in for it.
    loss = sum(kdfast.distill_loss(chunk, chunk.detach(), lab, kd_weight=0.0, ce_weight=1.0, backend=backend,
                                   num_items_in_batch=count)
               for chunk, lab in zip(x.tensor_split(8, dim=1), labels.to(device).tensor_split(8, dim=1)))
    loss.backward()
    close(loss, peer_reference, **PEER_TOL)
    close(loss, expected, rtol=0.0, atol=4e-6)
    close_bf16_grad(x.grad, l64.grad)


def linear_peer_draws(head):
    """test_linear_chunked_cross_entropy_loss / the branch's test_sft_losses: hidden [2, 8, 16] float32, targets in
    [0, 100) with rand < 0.2 ignored, then the head: `Model(100, 16)`'s nn.Linear (weight and bias, "linear") or a
    randn weight ("randn", no bias)."""
    batch, seq, embed, vocab = 2, 8, 16, 100
    with peer_seed():
        hidden = torch.randn(batch, seq, embed, dtype=torch.float32)
        targets = torch.randint(0, vocab, (batch, seq), dtype=torch.long)
        targets[torch.rand(batch, seq) < 0.2] = IGNORE
        if head == "linear":
            layer = torch.nn.Linear(embed, vocab)
            weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
        else:
            weight, bias = torch.randn(vocab, embed, dtype=torch.float32), None
    return hidden, targets, weight, bias


def linear_ce64(hidden, targets, weight, bias):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    return F.cross_entropy(logits if bias is None else logits + bias, targets.reshape(-1), ignore_index=IGNORE)


def check_linear_ce(backend, hidden, targets, weight, bias, chunk_size):
    """kdfast.linear_cross_entropy in `chunk_size` rows against float64, loss and every gradient; returns the loss
    and hidden's gradient."""
    device = device_for(backend)
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    leaves64 = [t.double().requires_grad_(True) for t in inputs]
    expected = linear_ce64(leaves64[0], targets, leaves64[1], leaves64[2] if bias is not None else None)
    expected.backward()
    leaves = [t.clone().to(device).requires_grad_(True) for t in inputs]
    loss = kdfast.linear_cross_entropy(leaves[0], leaves[1], targets.to(device), bias=leaves[2] if bias is not None
                                       else None, ignore_index=IGNORE, chunk_size=chunk_size, backend=backend)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    close(loss, expected, rtol=1e-6, atol=1e-5)
    for leaf, leaf64 in zip(leaves, leaves64):
        close(leaf.grad, leaf64.grad, **FP32_GRAD_TOL)
    return loss, leaves[0].grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_loss(backend):
    """test_linear_chunked_cross_entropy_loss: LinearCrossEntropyLoss(num_output_chunks=8) with the model's nn.Linear
    (bias included) is kdfast.linear_cross_entropy with that bias, 8 chunks of 2 rows; the peer's reference (the same
    logits without the bias) holds at its tolerance. Ignored rows (dropped before the projection in the peer) get
    no gradient."""
    hidden, targets, weight, bias = linear_peer_draws("linear")
    ignored = targets == IGNORE
    assert 0 < int(ignored.sum()) < targets.numel() and bias.abs().max() > 0.1  # the peer's draws: 3 ignored rows
    loss, hidden_grad = check_linear_ce(backend, hidden, targets, weight, bias, chunk_size=2)
    peer_reference = F.cross_entropy(F.linear(hidden, weight).reshape(-1, weight.shape[0]), targets.reshape(-1),
                                     ignore_index=IGNORE)
    close(loss, peer_reference, **PEER_TOL)
    assert not hidden_grad.cpu()[ignored].any() and hidden_grad.cpu()[~ignored].abs().sum(-1).min() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [2, 512], ids=["ChunkedCrossEntropyLoss", "ChunkedCrossEntropywithAutograd"])
def test_sft_chunked_cross_entropy(chunk_size, backend):
    """The branch's test_sft_losses: ChunkedCrossEntropyLoss (8 chunks of the sequence: 2 rows each) and
    ChunkedCrossEntropywithAutogradLoss (chunk_size 512: one chunk, its gradients made in the forward as kdfast's
    are) against F.cross_entropy of hidden @ weight.T (the peer's tolerance), float64 with the gradients."""
    hidden, targets, weight, _ = linear_peer_draws("randn")
    loss, _ = check_linear_ce(backend, hidden, targets, weight, None, chunk_size=chunk_size)
    peer_reference = F.cross_entropy(F.linear(hidden, weight).reshape(-1, weight.shape[0]), targets.reshape(-1),
                                     ignore_index=IGNORE)
    close(loss, peer_reference, **PEER_TOL)
