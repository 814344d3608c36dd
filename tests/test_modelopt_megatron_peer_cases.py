"""The Megatron plugin of NVIDIA ModelOpt (NVIDIA/Model-Optimizer, modelopt/torch/distill/plugins/megatron.py): its
KL losses at TP = 1, their inputs and expectations, run on kdfast. The tensor-parallel cases are in
tests/test_modelopt_megatron_peer_cases_vocab_parallel.py, ModelOpt's other losses in tests/test_modelopt_peer_cases.py.

What the plugin computes, and the kdfast call that expresses it:
- The Megatron plugin's `LogitsKLLoss(temperature, reverse)` (plugins/megatron.py): per token sum over the vocabulary
  of KL(teacher || student) at T, both log-softmaxed over the global vocabulary, with no T^2 and no reduction
  (returned [b, s] from [s, b] logits); reverse=True swaps the two, KL(student || teacher): kdfast's forward_kl /
  reverse_kl with t2_scale=False, reduction="none", transposed. `TopKLogitsKLLoss(top_k, top_p, top_p_min_k)` as of
  commit df93c400 (the ghost-token form): the teacher's top-k columns under both models' full-vocabulary log-probs,
  the entries outside the top-p prefix (with at least min_k kept) dropped, plus one "ghost" bucket holding each
  model's remaining mass: kdfast's `sparse_distill_loss(tail="bucket")` with the teacher's log-probs at its top-k ids
  and the dropped entries' ids -1 (padding: their mass joins the rest bucket); under reverse KL the teacher's ghost
  enters as log(rest), which float32 log-probs give only to ~6e-8 absolute (the peer's own float32 arithmetic too), so
  there kdfast is given the rest (tail="given") from the teacher's logits. Before that change (commit a2fbac7b, the
  mirrored snapshot) the top-k loss log-softmaxed both models over the k columns alone: kdfast's dense loss over the
  gathered columns.

Ported (every backend that runs on the CPU: "torch", the C++ kernel "cpu", and Triton under its interpreter; the
shapes are the peer's own):
tests/gpu_megatron/torch/distill/plugins/test_distill_megatron.py (commit df93c400): its numerical tests at TP = 1,
the dense KL and the ghost-token top-k at T = 0.5, 2, 3.7, top-k over the whole vocabulary equal to the dense loss,
and the top-p mask with its min_k floor, on the peer's `_make_loss_inputs` (seed 1234, [4, 3, 16], the teacher
randn * 3): `test_megatron_*`. reverse=True, which the peer's tests never set, is run against the peer's formula (and
`test_megatron_topk_reverse_bucket` holds kdfast's float32 rest to the peer's own float32 accuracy there); the earlier
renormalised top-k (its tests only run it) against its formula; the gradients (the peer only checks them finite) are
held to float64.

Left out: the GPU tests that build GPT models (no loss value asserted beyond what the vocab-parallel file checks),
the config / MTP tests and the intermediate-layer losses (MSE, cosine).
"""

import math

import pytest
import torch
from conftest import BACKENDS, device_for
from liger_cases import leaf
from test_modelopt_peer_cases import SEED, close

import kdfast


def megatron_inputs(seq=4, batch=3, vocab=16):
    """The peer's _make_loss_inputs: [s, b, V] student randn, teacher randn * 3 ("peaky"), seed 1234."""
    torch.manual_seed(SEED)
    student = torch.randn(seq, batch, vocab)
    return student, torch.randn(seq, batch, vocab) * 3


def megatron_kl64(student, teacher, temperature=1.0, reverse=False):
    """LogitsKLLoss in float64: per token KL(teacher || student) at T (reverse: KL(student || teacher)), no T^2;
    [s, b, V] in, [b, s] out."""
    p = torch.log_softmax(student.double() / temperature, -1)
    q = torch.log_softmax(teacher.double() / temperature, -1)
    if reverse:
        p, q = q, p
    return (q.exp() * (q - p)).sum(-1).transpose(0, 1)


def megatron_keep(teacher_logp_k, top_p, min_k):
    """TopKLogitsKLLoss's top-p mask over the teacher-sorted top-k: keep entry i iff the mass before it is below
    top_p, and the first min_k entries always."""
    probs = teacher_logp_k.exp()
    keep = (probs.cumsum(-1) - probs) < top_p
    return keep | (torch.arange(keep.shape[-1]) < min(min_k, keep.shape[-1]))


def megatron_topk(student, teacher, k, temperature=1.0, reverse=False, top_p=None, min_k=1,
                 precision=torch.float64):
    """TopKLogitsKLLoss in `precision` (float32: the peer's own arithmetic): the teacher's top-k ids, both models'
    full-vocabulary log-probs there, the kept entries (top-p) and one ghost bucket, log(1 - kept mass) with the kept
    log-mass clamped to at most -1e-7; the KL over the kept buckets and the ghost; [b, s] out."""
    q_full = torch.log_softmax(teacher.to(precision) / temperature, -1)
    p_full = torch.log_softmax(student.to(precision) / temperature, -1)
    q_k, ids = q_full.topk(k, dim=-1)
    p_k = p_full.gather(-1, ids)
    keep = torch.ones_like(q_k, dtype=torch.bool) if top_p is None else megatron_keep(q_k, top_p, min_k)
    p, q = megatron_with_ghost(p_k, keep), megatron_with_ghost(q_k, keep)
    if reverse:
        p, q = q, p
    mask = torch.cat([keep, torch.ones_like(keep[..., :1])], -1)
    return (mask * q.exp() * (q - p)).sum(-1).transpose(0, 1)


def megatron_with_ghost(logp, keep):
    """The kept log-probs and the ghost bucket after them, log(1 - kept mass), the kept log-mass clamped below 0."""
    kept = torch.logsumexp(logp.masked_fill(~keep, -math.inf), -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logp, torch.log(-torch.expm1(kept))], -1)


def kdfast_megatron_kl(student, teacher, temperature=1.0, reverse=False, backend="auto", **group):
    """LogitsKLLoss from kdfast: per row, no T^2, [b, s] as the peer returns it."""
    loss = kdfast.distill_loss(student, teacher, divergence="reverse_kl" if reverse else "forward_kl",
                               temperature=temperature, t2_scale=False, reduction="none", backend=backend, **group)
    return loss.transpose(0, 1)


def megatron_sparse_teacher(teacher, k, temperature=1.0, top_p=None, min_k=1, given_rest=False):
    """The sparse teacher kdfast takes for TopKLogitsKLLoss: its top-k ids (-1 where top-p drops the entry: its mass
    joins the rest bucket) and its full-vocabulary log-probs at T there; with `given_rest`, the ghost's log-prob
    after them, from the teacher's logits in float64 (kdfast's tail="given")."""
    logprobs, ids = torch.log_softmax(teacher / temperature, -1).topk(k, dim=-1)
    keep = torch.ones_like(ids, dtype=torch.bool) if top_p is None else megatron_keep(logprobs, top_p, min_k)
    if given_rest:
        logprobs64 = torch.log_softmax(teacher.double() / temperature, -1).gather(-1, ids)
        logprobs = torch.cat([logprobs, megatron_with_ghost(logprobs64, keep)[..., -1:].float()], -1)
    return ids.masked_fill(~keep, -1), logprobs


def kdfast_megatron_topk(student, ids, logprobs, temperature=1.0, reverse=False, backend="auto", **group):
    """TopKLogitsKLLoss from kdfast: the sparse loss over the K + 1 buckets, per row, no T^2, [b, s]; the rest
    bucket given when the teacher's log-probs carry it (K + 1 of them)."""
    tail = "given" if logprobs.shape[-1] == ids.shape[-1] + 1 else "bucket"
    loss = kdfast.sparse_distill_loss(student, ids, logprobs, divergence="reverse_kl" if reverse else "forward_kl",
                                      temperature=temperature, tail=tail, t2_scale=False, reduction="none",
                                      backend=backend, **group)
    return loss.transpose(0, 1)


def backward_against_float64(loss, s, expected, s64):
    """Both per-token losses summed with the same weights (the peer sums them after its mask); gradient vs float64."""
    weights = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).view(expected.shape)
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    (expected * weights).sum().backward()
    close(s.grad, s64.grad, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 3.7])
def test_megatron_dense_kl(backend, temperature, reverse):
    """test_logits_kl_losses_temperature_scaling, the dense half (T 0.5, 2, 3.7, atol 1e-5) and T = 1: LogitsKLLoss
    against log_softmax(x / T), no T^2; reverse (not in the peer's tests) against its formula. Loss [b, s] and the
    gradient against float64."""
    student, teacher = megatron_inputs()
    device = device_for(backend)
    s = leaf(student, device)
    loss = kdfast_megatron_kl(s, teacher.to(device), temperature, reverse, backend)
    assert loss.shape == (3, 4)
    s64 = student.double().requires_grad_(True)
    expected = megatron_kl64(s64, teacher, temperature, reverse)
    close(loss, expected.detach(), atol=1e-5)
    backward_against_float64(loss, s, expected, s64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_megatron_topk_full_vocab_matches_dense(backend):
    """test_topk_logits_kl_loss_numerics_full_vocab_matches_dense: top-k over the whole vocabulary (K = 16, the ghost
    ~0) equals the dense loss within atol 1e-6: kdfast's sparse form with every column against its dense form."""
    student, teacher = megatron_inputs()
    device = device_for(backend)
    ids, logprobs = megatron_sparse_teacher(teacher, 16)
    dense = kdfast_megatron_kl(student.to(device), teacher.to(device), backend=backend)
    topk = kdfast_megatron_topk(student.to(device), ids.to(device), logprobs.to(device), backend=backend)
    close(topk, dense.detach().double().cpu(), atol=1e-6)
    close(topk, megatron_topk(student, teacher, 16), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 3.7])
def test_megatron_topk_ghost_token(backend, temperature, reverse):
    """test_topk_logits_kl_loss_numerics_ghost_token_reference (K = 4, T = 1) and the top-k half of
    test_logits_kl_losses_temperature_scaling (T 0.5, 2, 3.7): the KL over the 4 + 1 buckets, atol 1e-6, and the
    gradient, against float64. reverse (not in the peer's tests) against its formula: there the teacher's ghost
    enters as log(rest), which 1 - sum p of float32 log-probs (kdfast's "bucket") or the peer's own float32
    log(-expm1(logsumexp)) hold only to ~6e-8 absolute: at T = 0.5 a rest of 2.9e-7 is 4% off, 0.07 in the loss
    (0.9 in the peer's own float32 arithmetic). The reverse cases therefore give kdfast the rest from the teacher's
    logits (tail="given", kdfast's form for a teacher that can sum it exactly); `test_megatron_topk_reverse_bucket`
    holds "bucket" there to the peer's own float32 accuracy."""
    student, teacher = megatron_inputs()
    device = device_for(backend)
    ids, logprobs = megatron_sparse_teacher(teacher, 4, temperature, given_rest=reverse)
    s = leaf(student, device)
    loss = kdfast_megatron_topk(s, ids.to(device), logprobs.to(device), temperature, reverse, backend)
    s64 = student.double().requires_grad_(True)
    expected = megatron_topk(s64, teacher, 4, temperature, reverse)
    close(loss, expected.detach(), atol=1e-6)
    q_k = torch.log_softmax(teacher.double() / temperature, -1).topk(4, dim=-1).values.exp()
    assert bool((q_k.sum(-1) < 1).all())  # a ghost bucket with mass: the rest is not empty
    backward_against_float64(loss, s, expected, s64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 3.7])
def test_megatron_topk_reverse_bucket(backend, temperature):
    """Reverse top-k KL from the teacher's float32 top-k log-probs alone (tail="bucket"): no further from float64
    than the peer's own float32 arithmetic on the same logits (module docstring of the conditioning: 0.07 against
    the peer's 0.9 at T = 0.5), and within 1e-6 where the teacher's rest is not tiny (T >= 2: rest >= 0.09)."""
    student, teacher = megatron_inputs()
    device = device_for(backend)
    ids, logprobs = megatron_sparse_teacher(teacher, 4, temperature)
    loss = kdfast_megatron_topk(student.to(device), ids.to(device), logprobs.to(device), temperature, True, backend)
    expected = megatron_topk(student, teacher, 4, temperature, True)
    peer_error = (megatron_topk(student, teacher, 4, temperature, True, precision=torch.float32).double()
                  - expected).abs().max().item()
    error = (loss.detach().double().cpu() - expected).abs().max().item()
    assert error <= max(peer_error, 1e-6), f"kdfast {error:.3g} vs the peer's float32 {peer_error:.3g}"
    if temperature >= 2.0:
        close(loss, expected, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("top_p", "min_k"), [(0.5, 1), (1e-6, 3)])
def test_megatron_topk_top_p_masks_tail(backend, top_p, min_k):
    """test_topk_logits_kl_loss_top_p_masks_tail (K = 8): top-p 0.5 truncates some rows (asserted, as the peer) and
    the dropped entries' mass joins the ghost; top-p 1e-6 with min_k 3 keeps exactly the first 3. Loss [b, s], atol
    1e-6; the gradient (the peer: finite) against float64."""
    student, teacher = megatron_inputs()
    ids, logprobs = megatron_sparse_teacher(teacher, 8, top_p=top_p, min_k=min_k)
    kept = ids >= 0
    if min_k == 3:
        assert bool((kept.sum(-1) == 3).all())
    else:
        assert not bool(kept.all()), "test inputs should produce some truncation"
    device = device_for(backend)
    s = leaf(student, device)
    loss = kdfast_megatron_topk(s, ids.to(device), logprobs.to(device), backend=backend)
    assert loss.shape == (student.size(1), student.size(0))
    s64 = student.double().requires_grad_(True)
    expected = megatron_topk(s64, teacher, 8, top_p=top_p, min_k=min_k)
    close(loss, expected.detach(), atol=1e-6)
    backward_against_float64(loss, s, expected, s64)
    assert bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_megatron_topk_renormalized_earlier_form(backend, temperature, reverse):
    """TopKLogitsKLLoss before the ghost token (commit a2fbac7b; its tests only run it): log_softmax over the
    teacher's top-k columns of both models, the KL between those renormalised distributions. kdfast: the dense loss
    over the gathered k columns (its sparse tail="renormalize" renormalises the teacher only, the student staying
    over the whole vocabulary: another loss). The peer's inputs, top_k 5 (its TP test's)."""
    student, teacher = megatron_inputs()
    ids = teacher.topk(5, dim=-1).indices
    device = device_for(backend)
    s = leaf(student, device)
    loss = kdfast_megatron_kl(s.gather(-1, ids.to(device)), teacher.gather(-1, ids).to(device), temperature, reverse,
                              backend)
    s64 = student.double().requires_grad_(True)
    expected = megatron_kl64(s64.gather(-1, ids), teacher.gather(-1, ids), temperature, reverse)
    close(loss, expected.detach(), atol=1e-6)
    backward_against_float64(loss, s, expected, s64)
