"""NVIDIA NeMo RL's distillation-loss tests, their inputs and expectations, run on kdfast.

What NeMo computes (`DistillationLossFn` after `get_distillation_topk_logprobs_from_logits`): the teacher's top-k
logits are log-softmaxed over the k (renormalised, always); with zero_outside_topk False so is the student's logits
gathered at the k ids (a student restricted to the top-k and renormalised: kdfast's `distill_loss` over the gathered
[.., k] columns, every entry a column, repeats included); with zero_outside_topk True the student is its full
log-softmax at the ids, forward KL is then kdfast's sparse tail="renormalize", and reverse KL adds H_rest + 100 P_rest,
the student's mass outside the ids against a teacher of log-prob -100 at every other column: kdfast's dense
reverse KL against that row (distinct ids; with repeated ids no row holds it, and no kdfast mode: there the sparse
bucket gives its top-k part and H_all, the rest is float64's). "mixed" is w KL(P||Q) + (1 - w) KL(Q||P), not a
JSD: two kdfast calls weighed. Rows are the positions but the last; the mask is token_mask[:, 1:] * sample_mask,
the sum is divided by global_valid_toks (the peer's counts every position of the sequence, first included: 8 where
the loss has 6 rows), kdfast's num_items_in_batch. The loss is token-level only (global_valid_seqs is unused).
tests/unit/algorithms/test_loss_functions.py:
- test_distillation_loss_different_settings (3 kl types x zero_outside_topk, k = 64 ids drawn in [0, 8)): the six
  golden losses, on the peer's own inputs (drawn on its GPU; rebuilt here, below); the gradient against float64;
- ..._topk_filtering (k 1, 32, 64, 10^6): finite, 0-d, non-zero for k >= 32, and NeMo's float64 value; at
  10^6 entries the Triton kernel (a [K, K] block) failed to build: now refused by name, and run by CUDA or torch
  under "auto";
- ..._gradient_flow (a non-zero gradient): in the settings test; ..._edge_cases (student logits 0, 100, -100): finite
  and float64's; ..._invalid_k_zero: kdfast refuses K = 0 too; ..._fn_call: the loss is 0-d (settings test);
- ..._fn_initialization: left out (NeMo's config object; kdfast has no kl_type / mixed weight to hold);
- masks, sample_mask and a global token count larger than the batch's: test_nemo_masks_and_global_valid_tokens,
  the peer's formula on distinct top-k ids (its own tests keep every mask at 1);
- CrossTokenizerDistillationLossFn, gold path (exact-mapped tokens: KL, the rest: sorted L1, times T^2):
  ..._gold_loss_matches_reference (kdfast's hybrid, both weights 1; rows one to one, as the peer's chunks are after its
  next-token shift) and ..._all_samples_masked_is_zero; ..._ce_uniform_logits_equals_log_vocab and
  ..._ce_respects_sample_mask on kdfast's CE term; ..._mismatched_per_teacher_lists_raises on kdfast's weights;
  ..._normalize_teacher_by_vocab_rejected_outside_sum_mode left out (no such scaling in kdfast).
tests/unit/algorithms/x_token/test_xtoken_off_policy_distillation.py (several teachers):
- test_sum_kd_weighted_sum_of_per_teacher_kd: NeMo's sum, unnormalised, is sum(w) times kdfast's combine="average"
  (weights normalised); its same-vocabulary KD over a top-k column subset is `distill_loss` on those columns;
- test_select_teacher_picks_lowest_ce_teacher: weights="min_ce" (kdfast's is per row, NeMo's per batch: alike here);
- test_teacher_weight_score_ignores_padded_positions / _masks_dropped_samples: metric "ce" as kdfast's "confidence"
  and "min_ce" (per row); "entropy" and "max_prob", and sum_weights_metric's softmax(alpha * score) over a batch
  (test_compute_dynamic_weights_softmax_over_teachers) have no kdfast form; normalize_teacher_by_vocab neither;
- test_averaged_logits_rejects_zero_weight_sum: kdfast's weights refusal. averaged_logits itself (the teachers'
  logits averaged, then one KL) is no kdfast mode (its mixture averages probabilities): the caller averages the
  logits; the peer's tests of it check which internal path runs, left out, as are the DP / config / dispatch stubs.
tests/unit/algorithms/test_opd.py: test_student_topk_full_support_matches_exact_reverse_kl (full support: reverse KL);
its sampled-tail estimator is not a kdfast loss. Left out also: the P-KL projection-matrix path, chunk averaging
over alignments, the distributed log-prob helpers, trainer, streaming and data tests (no loss)."""

import math

import numpy as np
import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast
from kdfast.backends.triton_backend import MAX_SPARSE_TOPK

KL_TYPES = ["forward", "reverse", "mixed"]
LOG_INFINITESIMAL = -100.0  # NeMo's log-prob of the teacher outside its top-k (zero_outside_topk)


# ---------------------------------------------------------------------------------------------------------------
# The peer's inputs. setup_distillation_test_data draws them on a GPU after torch.manual_seed(42): randint ids (8),
# randn teacher top-k logits, randint top-k ids, randn student logits. For tensors of at most 512 elements torch's
# CUDA sampler gives element i words of Philox4x32-10 at counter (offset / 4, 0, i, 0) and key (seed, 0), each call
# moving the offset by 4; randint keeps word 0 modulo its range, randn the first Box-Muller output of words 0 and 1.
# Rebuilt on the CPU (log and sin in float64 where the GPU takes its fast intrinsics, ~1e-6 apart) they give the
# peer's six golden losses within its own tolerance (asserted below), which shows they are its inputs.
# ---------------------------------------------------------------------------------------------------------------

def philox_words(count, offset, seed=42):
    """Words 0 and 1 of Philox4x32-10 at counters (offset // 4, 0, i, 0), i < count, key (seed, 0)."""
    mask, shift = np.uint64(0xFFFFFFFF), np.uint64(32)
    c0, c1 = np.full(count, offset // 4, np.uint64), np.zeros(count, np.uint64)
    c2, c3 = np.arange(count, dtype=np.uint64), np.zeros(count, np.uint64)
    k0, k1 = np.uint64(seed), np.uint64(0)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1


def cuda_randint(high, shape, offset):
    return torch.from_numpy((philox_words(math.prod(shape), offset)[0] % np.uint64(high)).astype(np.int64)).view(shape)


def cuda_randn(shape, offset):
    x, y = philox_words(math.prod(shape), offset)
    scale = np.float32(2.0 ** -32)
    two_pi_scale = scale * np.float32(6.2831855)
    u = x.astype(np.float32) * scale + scale / np.float32(2)
    v = y.astype(np.float32) * two_pi_scale + two_pi_scale / np.float32(2)
    normal = np.sqrt(-2.0 * np.log(u.astype(np.float64))) * np.sin(v.astype(np.float64))
    return torch.from_numpy(normal.astype(np.float32)).view(shape)


def peer_inputs(topk=64, batch=2, seq=4, vocab=8):
    """(student logits, teacher top-k logits, top-k ids): the peer's draws; beyond 512 elements its GPU's layout
    depends on the GPU's size, so larger k draw on the CPU from seed 42 (no golden value rests on them)."""
    if batch * seq * topk <= 512:
        return (cuda_randn((batch, seq, vocab), 12), cuda_randn((batch, seq, topk), 4),
                cuda_randint(vocab, (batch, seq, topk), 8))
    generator = torch.Generator().manual_seed(42)
    teacher = torch.randn(batch, seq, topk, generator=generator)
    ids = torch.randint(0, vocab, (batch, seq, topk), generator=generator)
    return torch.randn(batch, seq, vocab, generator=generator), teacher, ids


# ---------------------------------------------------------------------------------------------------------------
# NeMo's loss in float64 (the expectation), and the same loss from kdfast's calls.
# ---------------------------------------------------------------------------------------------------------------

def nemo_loss64(student, teacher, ids, kl_type, weight, zero_outside, mask, global_valid_toks):
    """DistillationLossFn(kl_type, mixed_kl_weight=weight, zero_outside_topk) with its input preparation, float64;
    `mask` is token_mask[:, 1:] * sample_mask; differentiable in `student`."""
    if zero_outside:
        full = torch.log_softmax(student.double(), -1)
        log_q, h_all = full.gather(-1, ids)[:, :-1], (full.exp() * full).sum(-1)[:, :-1]
    else:
        log_q = torch.log_softmax(student.double().gather(-1, ids), -1)[:, :-1]
    log_p = torch.log_softmax(teacher.double(), -1)[:, :-1]
    q, p = log_q.exp(), log_p.exp()
    forward, reverse = (p * (log_p - log_q)).sum(-1), (q * (log_q - log_p)).sum(-1)
    if zero_outside:  # H_rest - log_infinitesimal * P_rest
        reverse = reverse + h_all - (q * log_q).sum(-1) - LOG_INFINITESIMAL * (1.0 - q.sum(-1))
    per_token = {"forward": forward, "reverse": reverse, "mixed": weight * forward + (1 - weight) * reverse}[kl_type]
    return (per_token * mask.double()).sum() / global_valid_toks


def labels_of(mask):
    """kdfast's rows kept where NeMo's mask is 1 (label 0: a column of every width; CE off, only the mask counts)."""
    return torch.where(mask > 0, 0, -100).long()


def kdfast_nemo_loss(student, teacher, ids, kl_type, weight, zero_outside, mask, global_valid_toks, backend):
    """NeMo's loss from kdfast calls: distinct ids for zero_outside_topk's reverse part (a dense teacher row)."""
    common = dict(reduction="mean", num_items_in_batch=global_valid_toks, backend=backend)
    labels, rows, teacher_rows, row_ids = labels_of(mask), student[:, :-1], teacher[:, :-1], ids[:, :-1]
    if zero_outside:
        forward = lambda: kdfast.sparse_distill_loss(rows, row_ids, teacher_rows, labels, tail="renormalize", **common)
        # The teacher as NeMo reads it here: its top-k log-probs at the ids, -100 at every other column (their mass,
        # (V - k) e^-100, leaves the row's normaliser 1 in float32 and float64 alike).
        full_row = torch.full_like(rows, LOG_INFINITESIMAL).scatter(-1, row_ids, torch.log_softmax(teacher_rows, -1))
        reverse = lambda: kdfast.distill_loss(rows, full_row, labels, divergence="reverse_kl", **common)
    else:
        gathered = student.gather(-1, ids)[:, :-1]
        forward = lambda: kdfast.distill_loss(gathered, teacher_rows, labels, **common)
        reverse = lambda: kdfast.distill_loss(gathered, teacher_rows, labels, divergence="reverse_kl", **common)
    if kl_type == "forward":
        return forward()
    if kl_type == "reverse":
        return reverse()
    return weight * forward() + (1 - weight) * reverse()


def peer_masks(batch=2, seq=4):
    """The peer's masks (all ones) and its global_valid_toks, sum(sample_mask * token_mask) over every position."""
    token_mask, sample_mask = torch.ones(batch, seq), torch.ones(batch)
    return token_mask[:, 1:] * sample_mask[:, None], int((sample_mask[:, None] * token_mask).sum())


# (zero_outside_topk, kl_type) -> the peer's golden loss (mixed_kl_weight 0.3)
GOLDEN = {(True, "forward"): -0.9636520743370056, (True, "reverse"): -490.5150451660156,
          (True, "mixed"): -343.6496276855469, (False, "forward"): 0.5783048868179321,
          (False, "reverse"): 0.5811167359352112, (False, "mixed"): 0.5802732110023499}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_outside", [True, False])
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_nemo_settings_golden_losses(backend, kl_type, zero_outside):
    """test_distillation_loss_different_settings: the golden loss (torch.allclose's tolerance, the peer's) and the
    gradient against NeMo's float64 loss. k = 64 ids in [0, 8) repeat within every row and cover it: under
    zero_outside_topk the student's entries sum to ~8, so P_rest ~ -7 and reverse KL is -490: no distribution's
    divergence, and no dense row (which would merge the repeats). There kdfast's sparse bucket reverse KL (every entry
    its own term; ids that cover the row leave no rest) gives sum_k q_k (log q_k - log P_k) and its entropy component
    H_all; the rest of NeMo's term, -sum_k q_k log q_k + 100 (1 - sum_k q_k), is computed here in float64."""
    device = device_for(backend)
    student, teacher, ids = peer_inputs()
    mask, global_valid_toks = peer_masks()
    weight, golden = 0.3, torch.tensor(GOLDEN[(zero_outside, kl_type)], dtype=torch.float64)
    # The port itself: these inputs under NeMo's formula give the peer's golden value.
    expected_value = nemo_loss64(student, teacher, ids, kl_type, weight, zero_outside, mask, global_valid_toks)
    assert torch.allclose(expected_value, golden)
    assert bool(torch.zeros(2, 4, 8).scatter(-1, ids, 1.0).all()), "the ids cover every row"

    s = student.clone().to(device).requires_grad_(True)
    args = (teacher.to(device), ids.to(device), kl_type, weight, zero_outside, mask.to(device), global_valid_toks)
    correction = torch.zeros((), dtype=torch.float64)
    if zero_outside and kl_type != "forward":
        share = 1 - weight if kl_type == "mixed" else 1.0
        common = dict(reduction="mean", num_items_in_batch=global_valid_toks, backend=backend)
        rows, row_ids, labels = s[:, :-1], ids[:, :-1].to(device), labels_of(mask).to(device)
        reverse, parts = kdfast.sparse_distill_loss(rows, row_ids, torch.log_softmax(teacher[:, :-1], -1).to(device),
                                                    labels, tail="bucket", divergence="reverse_kl",
                                                    return_components="per_row", **common)
        loss = share * reverse
        if kl_type == "mixed":
            loss = loss + weight * kdfast.sparse_distill_loss(rows, row_ids, teacher[:, :-1].to(device), labels,
                                                              tail="renormalize", **common)
        # The rest of NeMo's term in float64: H_all (for the value, kdfast's entropy component, checked here)
        # - sum_k q_k log q_k + 100 (1 - sum_k q_k)
        s64 = student.double().requires_grad_(True)
        full = torch.log_softmax(s64, -1)
        log_q, h_all64 = full.gather(-1, ids)[:, :-1], (full.exp() * full).sum(-1)[:, :-1]
        rest = -(log_q.exp() * log_q).sum(-1) - LOG_INFINITESIMAL * (1 - log_q.exp().sum(-1))
        torch.testing.assert_close(-parts.entropy.double().cpu(), h_all64.detach(), rtol=1e-5, atol=1e-5)
        correction = share * ((rest.detach() - parts.entropy.double().cpu()) * mask).sum() / global_valid_toks
        gradient_of_rest = torch.autograd.grad(share * ((rest + h_all64) * mask).sum() / global_valid_toks, s64)[0]
    else:
        loss = kdfast_nemo_loss(s, *args, backend)
        gradient_of_rest = torch.zeros_like(student, dtype=torch.float64)
    loss.backward()
    assert loss.dim() == 0  # test_distillation_loss_fn_call
    assert torch.allclose(loss.detach().double().cpu() + correction, golden)

    s64 = student.double().requires_grad_(True)
    nemo_loss64(s64, teacher, ids, kl_type, weight, zero_outside, mask, global_valid_toks).backward()
    assert bool(s.grad.abs().sum() > 0)  # test_distillation_loss_gradient_flow
    torch.testing.assert_close(s.grad.double().cpu() + gradient_of_rest, s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_outside", [True, False])
@pytest.mark.parametrize("k", [1, 32, 64, 1000000])
def test_nemo_topk_filtering(backend, k, zero_outside):
    """test_distillation_loss_topk_filtering (forward KL, mixed weight 0.5): a finite 0-d loss, not 0 for k >= 32, and
    NeMo's float64 value (k = 1 without zero_outside_topk: both sides one entry, exactly 0). At k = 10^6 the ids are
    10^6 entries of 8 columns: dense over the gathered 10^6 columns, and the sparse path with K = 10^6 entries per
    row. Forward only, as the peer."""
    if backend == "triton" and k == 1000000 and not zero_outside and not torch.cuda.is_available():
        # 15-20 s under the interpreter on 2 cores, half this file's budget; the same kernel runs here at k <= 64
        pytest.skip("the dense [6, 10^6] rows are run by a GPU's Triton, not its interpreter")
    device = device_for(backend)
    student, teacher, ids = peer_inputs(topk=k)
    mask, global_valid_toks = peer_masks()
    arguments = (student.to(device), teacher.to(device), ids.to(device), "forward", 0.5, zero_outside,
                 mask.to(device), global_valid_toks, backend)
    if backend == "triton" and zero_outside and k > MAX_SPARSE_TOPK:
        # The Triton kernel compares a row's ids as one [K, K] block: asked for by name, K = 10^6 is refused.
        with pytest.raises(ValueError, match="teacher_ids has 1000000 entries a row; backend='triton' takes at most"):
            kdfast_nemo_loss(*arguments)
        return
    loss = kdfast_nemo_loss(*arguments)
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    if k >= 32:
        assert loss.item() != 0.0
    expected = nemo_loss64(student, teacher, ids, "forward", 0.5, zero_outside, mask, global_valid_toks)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, 100.0, -100.0])
def test_nemo_edge_cases(backend, value):
    """test_distillation_loss_edge_cases: student logits all 0, all 100, all -100 (forward KL on the renormalised
    top-k): finite, and NeMo's float64 value."""
    device = device_for(backend)
    _, teacher, ids = peer_inputs()
    student = torch.full((2, 4, 8), value)
    mask, global_valid_toks = peer_masks()
    loss = kdfast_nemo_loss(student.to(device), teacher.to(device), ids.to(device), "forward", 0.5, False,
                            mask.to(device), global_valid_toks, backend)
    assert bool(torch.isfinite(loss))
    expected = nemo_loss64(student, teacher, ids, "forward", 0.5, False, mask, global_valid_toks)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_k_zero_refused(backend):
    """test_distillation_loss_invalid_k_zero: NeMo raises ValueError("topk must be positive"); so do both kdfast
    forms, each naming its argument."""
    device = device_for(backend)
    student = torch.randn(2, 3, 8, device=device)
    with pytest.raises(ValueError, match="teacher_ids"):
        kdfast.sparse_distill_loss(student, torch.zeros(2, 3, 0, dtype=torch.long, device=device),
                                   torch.zeros(2, 3, 0, device=device), tail="renormalize", backend=backend)
    with pytest.raises(ValueError, match="student_logits"):
        kdfast.distill_loss(student[..., :0], torch.zeros(2, 3, 0, device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_outside", [True, False])
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_nemo_masks_and_global_valid_tokens(backend, kl_type, zero_outside):
    """NeMo's masking and normalisation, which its tests hold at 1: a teacher's real top-5 (distinct ids) of 16
    columns, prompt and padding positions off in token_mask, the middle sample off in sample_mask, and
    global_valid_toks 7 above the batch's own count (other micro-batches' tokens). Loss and gradient equal NeMo's
    float64; masked positions and the masked sample get no gradient."""
    device = device_for(backend)
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(3, 6, 16, generator=generator) * 2
    teacher, ids = (torch.randn(3, 6, 16, generator=generator) * 2).topk(5, dim=-1)
    token_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    sample_mask = torch.tensor([1.0, 0.0, 1.0])
    mask = token_mask[:, 1:] * sample_mask[:, None]
    global_valid_toks = int(mask.sum()) + 7
    s = student.clone().to(device).requires_grad_(True)
    loss = kdfast_nemo_loss(s, teacher.to(device), ids.to(device), kl_type, 0.3, zero_outside, mask.to(device),
                            global_valid_toks, backend)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    expected = nemo_loss64(s64, teacher, ids, kl_type, 0.3, zero_outside, mask, global_valid_toks)
    expected.backward()
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)
    assert bool((s.grad[:, :-1][mask.to(device) == 0] == 0).all()) and bool((s.grad[1] == 0).all())


# ---------------------------------------------------------------------------------------------------------------
# CrossTokenizerDistillationLossFn (tests/unit/algorithms/test_loss_functions.py)
# ---------------------------------------------------------------------------------------------------------------

# The peer's projection: student 0 -> teacher 0 and student 5 -> teacher 4 exact, the middle four fuzzy (uncommon).
GOLD_MAP = dict(vocab_map=kdfast.VocabMap(torch.tensor([0, 5]), torch.tensor([0, 4]), 6, 5), method="hybrid",
                matched_weight=1.0, unmatched_weight=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_gold_loss_matches_reference(backend):
    """test_cross_tokenizer_gold_loss_matches_reference (seed 0, student [1, 3, 6], teacher [1, 3, 5], T = 2): after
    NeMo's next-token shift its two chunks are rows 0 and 1 of both, one to one. Its KL on the common tokens is
    sum_c p_c (log p_c - log q_c) over the exact-mapped columns, neither renormalised: kdfast's hybrid matched part
    (forward KL, GOLD's); held to the peer's recomputation (atol 1e-5), and loss = (kl + l1) T^2 (atol 1e-6). The
    sorted L1 differs: NeMo truncates both sorted sides to the shorter (3 teacher columns against the student's 4),
    kdfast zero-pads the shorter (GOLD's convention, no truncating mode), so kdfast's L1 is NeMo's plus each row's
    smallest uncommon student probability, which is taken off here in float64."""
    device = device_for(backend)
    generator = torch.Generator().manual_seed(0)
    logits, teacher_logits = torch.randn(1, 3, 6, generator=generator), torch.randn(1, 3, 5, generator=generator)
    temperature = 2.0
    student_rows, teacher_rows = logits[0, :2], teacher_logits[0, :2]
    loss, parts = kdfast.cross_vocab_distill_loss(student_rows.to(device), teacher_rows.to(device), **GOLD_MAP,
                                                  temperature=temperature, backend=backend, return_components=True)
    log_q = torch.log_softmax(student_rows.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_rows.double() / temperature, -1)
    kl_common = (log_p[:, [0, 4]].exp() * (log_p[:, [0, 4]] - log_q[:, [0, 5]])).sum(-1).mean()
    q_sorted = log_q[:, 1:5].exp().sort(-1, descending=True).values
    p_sorted = log_p[:, 1:4].exp().sort(-1, descending=True).values
    l1_uncommon = (q_sorted[:, :3] - p_sorted).abs().sum(-1).mean()
    assert parts.matched.item() >= 0 and parts.unmatched.item() >= 0
    torch.testing.assert_close(parts.matched.double().cpu(), kl_common, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, (parts.matched + parts.unmatched).to(loss.device) * temperature ** 2,
                               rtol=0, atol=1e-6)
    padded_tail = q_sorted[:, 3].mean()
    torch.testing.assert_close(parts.unmatched.double().cpu() - padded_tail, l1_uncommon, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.double().cpu() - padded_tail * temperature ** 2,
                               (kl_common + l1_uncommon) * temperature ** 2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_gold_loss_all_samples_masked_is_zero(backend):
    """test_cross_tokenizer_gold_loss_all_samples_masked_is_zero: sample_mask 0 everywhere (every row ignored):
    the loss is exactly 0, and so is its gradient."""
    device = device_for(backend)
    student = torch.randn(2, 6, device=device, requires_grad=True)
    loss = kdfast.cross_vocab_distill_loss(student, torch.randn(2, 5, device=device),
                                           torch.full((2,), -100, device=device), **GOLD_MAP, temperature=2.0,
                                           backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and bool((student.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_cross_tokenizer_ce(backend):
    """test_cross_tokenizer_ce_uniform_logits_equals_log_vocab (zero logits: CE = log 6 within 1e-5) and
    test_cross_tokenizer_ce_respects_sample_mask (seed 0, [2, 5, 6]: the second sample masked gives the CE of the
    first alone, 1e-6): NeMo's next-token CE over global_valid_toks is kdfast's CE term (kd_weight 0) with
    num_items_in_batch."""
    device = device_for(backend)
    options = dict(**GOLD_MAP, kd_weight=0.0, ce_weight=1.0, backend=backend)
    teacher = torch.zeros(4, 5, device=device)
    uniform = kdfast.cross_vocab_distill_loss(torch.zeros(4, 6, device=device), teacher,
                                              torch.tensor([1, 2, 3, 4], device=device), **options,
                                              num_items_in_batch=4)
    torch.testing.assert_close(uniform.cpu(), torch.tensor(math.log(6.0)), rtol=0, atol=1e-5)

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, generator=generator).to(device)
    labels = torch.randint(0, 6, (2, 5), generator=generator)[:, 1:].to(device)
    masked = kdfast.cross_vocab_distill_loss(logits[:, :-1], teacher.expand(2, 4, 5),
                                             torch.stack([labels[0], torch.full_like(labels[1], -100)]), **options,
                                             num_items_in_batch=4)
    single = kdfast.cross_vocab_distill_loss(logits[:1, :-1], teacher[None], labels[:1], **options,
                                             num_items_in_batch=4)
    torch.testing.assert_close(masked, single, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Several teachers (tests/unit/algorithms/x_token/test_xtoken_off_policy_distillation.py)
# ---------------------------------------------------------------------------------------------------------------

def same_vocab_kd64(student, teacher, mask, global_valid_toks, temperature, vocab_topk):
    """NeMo's KD of a same-tokenizer teacher (_direct_topk_kl): the microbatch's top vocab_topk columns by the
    teacher's largest logit, both sides renormalised over them at T, forward KL, masked sum / tokens * T^2."""
    columns = teacher.reshape(-1, teacher.shape[-1]).max(0).values.topk(vocab_topk).indices.sort().values
    log_q = torch.log_softmax(student.double()[..., columns] / temperature, -1)[:, :-1]
    log_p = torch.log_softmax(teacher.double()[..., columns] / temperature, -1)[:, :-1]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kl * mask).sum() / global_valid_toks * temperature ** 2, columns


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab_topk", [8, 4])
def test_nemo_sum_mode_weighs_each_teacher_kd(backend, vocab_topk):
    """test_sum_kd_weighted_sum_of_per_teacher_kd: total = sum_i w_i KD_i with weights 2 and 3, unnormalised (the
    peer stubs KD_i as 1 and 2; here each is a real same-vocabulary KD at T = 2 over a padded batch). Over the whole
    vocabulary (vocab_topk 8) that is 5 x kdfast's combine="average" with weights [2, 3], whose components are each
    KD_i; over a top-4 subset (each teacher its own columns) KD_i is `distill_loss` on the gathered columns."""
    device = device_for(backend)
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 8, generator=generator)
    teachers = [torch.randn(2, 5, 8, generator=generator) * 2 for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    tokens, labels = int(mask.sum()), labels_of(mask).to(device)
    common = dict(temperature=2.0, num_items_in_batch=tokens, backend=backend)
    expected = [same_vocab_kd64(student, t, mask, tokens, 2.0, vocab_topk) for t in teachers]
    total64 = 2 * expected[0][0] + 3 * expected[1][0]
    rows = student[:, :-1].to(device)
    if vocab_topk == 8:
        loss, parts = kdfast.multi_teacher_distill_loss(rows, [t[:, :-1].to(device) for t in teachers], labels,
                                                        weights=[2.0, 3.0], combine="average", **common,
                                                        return_components=True)
        torch.testing.assert_close(loss.double().cpu() * 5, total64, rtol=1e-5, atol=1e-6)
        # the components are before T^2
        torch.testing.assert_close(parts.teachers.double().cpu() * 4, torch.stack([e[0] for e in expected]),
                                   rtol=1e-5, atol=1e-6)
    else:
        kds = [kdfast.distill_loss(rows[..., columns], t[:, :-1].to(device)[..., columns], labels, **common)
               for t, (_, columns) in zip(teachers, expected)]
        torch.testing.assert_close((2 * kds[0] + 3 * kds[1]).double().cpu(), total64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("better", [0, 1])
def test_nemo_select_teacher_picks_lowest_ce(backend, better):
    """test_select_teacher_picks_lowest_ce_teacher: ids [1, 2, 3, 0], V = 8; one teacher -10 everywhere but 10 at
    each next token, the other uniform; the student 0. weights="min_ce" trains on the confident teacher alone, at
    either index: loss and gradient are distill_loss's with it. (NeMo picks one teacher per batch, kdfast per row:
    here every row's lowest CE is the confident teacher's.)"""
    device = device_for(backend)
    input_ids = torch.tensor([[1, 2, 3, 0]])
    confident = torch.full((1, 4, 8), -10.0)
    for position in range(3):
        confident[0, position, input_ids[0, position + 1]] = 10.0
    teachers = [None, None]
    teachers[better], teachers[1 - better] = confident[:, :-1], torch.zeros(1, 3, 8)
    labels = input_ids[:, 1:].to(device)
    student = torch.zeros(1, 3, 8, device=device, requires_grad=True)
    loss = kdfast.multi_teacher_distill_loss(student, [t.to(device) for t in teachers], labels, weights="min_ce",
                                             temperature=2.0, backend=backend)
    loss.backward()
    alone = torch.zeros(1, 3, 8, device=device, requires_grad=True)
    reference = kdfast.distill_loss(alone, confident[:, :-1].to(device), labels, temperature=2.0, backend=backend)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student.grad, alone.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["confidence", "min_ce"])
def test_nemo_teacher_weights_ignore_masked_positions(backend, weights):
    """test_teacher_weight_score_ignores_padded_positions (metric "ce"; seed 0, [2, 5, 8], the last two positions
    padding, set to 1e4 with their ids to 0) and test_teacher_weight_score_masks_dropped_samples (sample_mask
    [1, 0], the dropped sample's logits 1e4): kdfast's per-row weights read only kept rows, so neither corruption
    moves the loss or the gradient (the peer's 1e-5)."""
    device = device_for(backend)
    generator = torch.Generator().manual_seed(0)
    scored, ids = torch.randn(2, 5, 8, generator=generator), torch.randint(0, 8, (2, 5), generator=generator)
    other, student = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)

    def loss_and_grad(teacher, ids, mask):
        labels = torch.where(mask > 0, ids[:, 1:], -100).to(device)
        s = student[:, :-1].clone().to(device).requires_grad_(True)
        loss = kdfast.multi_teacher_distill_loss(s, [teacher[:, :-1].to(device), other[:, :-1].to(device)], labels,
                                                 weights=weights, backend=backend)
        loss.backward()
        return loss.detach(), s.grad

    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)[:, 1:]
    corrupt, corrupt_ids = scored.clone(), ids.clone()
    corrupt[:, 3:], corrupt_ids[:, 3:] = 1e4, 0
    dropped = torch.tensor([[1.0], [0.0]]).expand(2, 4)
    corrupt_sample = scored.clone()
    corrupt_sample[1] = 1e4
    for (clean, dirty) in [((scored, ids, padded), (corrupt, corrupt_ids, padded)),
                           ((scored, ids, dropped), (corrupt_sample, ids, dropped))]:
        for got, want in zip(loss_and_grad(*dirty), loss_and_grad(*clean)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_nemo_teacher_weights_refused():
    """test_averaged_logits_rejects_zero_weight_sum ([0, 0] and [1, -1]) and
    test_cross_tokenizer_mismatched_per_teacher_lists_raises (two weights, one teacher): ValueErrors naming weights."""
    student, teachers, labels = torch.randn(3, 8), [torch.randn(3, 8), torch.randn(3, 8)], torch.tensor([1, 2, 3])
    for weights in ([0.0, 0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="weights"):
            kdfast.multi_teacher_distill_loss(student, teachers, labels, weights=weights, combine="average")
    with pytest.raises(ValueError, match="weights"):
        kdfast.multi_teacher_distill_loss(student, teachers[:1], labels, weights=[1.0, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemo_opd_full_support_is_reverse_kl(backend):
    """test_opd.py's test_student_topk_full_support_matches_exact_reverse_kl: student [0.1, 0.7, -0.4] and teacher
    [0.5, -0.2, 0.3] over the full support: the exact reverse KL (assert_close's defaults), a finite gradient."""
    device = device_for(backend)
    student = torch.tensor([[0.1, 0.7, -0.4]], device=device, requires_grad=True)
    teacher = torch.tensor([[0.5, -0.2, 0.3]])
    loss = kdfast.distill_loss(student, teacher.to(device), divergence="reverse_kl", reduction="sum", backend=backend)
    loss.backward()
    log_q, log_p = torch.log_softmax(student.detach().double().cpu(), -1), torch.log_softmax(teacher.double(), -1)
    torch.testing.assert_close(loss.double().cpu(), (log_q.exp() * (log_q - log_p)).sum())
    assert bool(torch.isfinite(student.grad).all())
