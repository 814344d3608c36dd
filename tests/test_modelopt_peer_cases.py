"""NVIDIA ModelOpt's distillation-loss tests (NVIDIA/Model-Optimizer, modelopt/torch/distill), their inputs and
expectations, run on kdfast: LogitsDistillationLoss, MFTLoss and the Hugging Face trainer's KD loss. The Megatron
plugin's KL losses are in tests/test_modelopt_megatron_peer_cases.py (one rank) and ..._vocab_parallel.py (four).

What ModelOpt computes, and the kdfast call that expresses it:
- `LogitsDistillationLoss(temperature, reduction)` (losses.py): F.kl_div(log_softmax(s / T), softmax(t / T),
  reduction) * T^2, "none" summed over the classes: kdfast's forward KL with t2_scale=True. F.kl_div's "mean" divides
  by every element, rows x classes, so it is kdfast's mean with num_items_in_batch = numel; "batchmean" divides by the
  first dimension (num_items_in_batch = shape[0]); "sum" and "none" (per row) are kdfast's own.
- `MFTLoss(temperature, threshold)` (Minifinetuning): the same KL, "batchmean" over the flattened rows, against a
  teacher corrected towards the label (`_prepare_corrected_distributions`: mixed with the label's one-hot so that the
  label leads the former argmax by `threshold`). kdfast has no such correction: it is a teacher-side constant, written
  here (`mft_corrected64`, float64, the peer's formula with its 1e-7 guards) and handed to kdfast as the teacher
  logits T * log(corrected), whose softmax at T is the corrected distribution itself; kdfast then computes the KL, its
  T^2 and the mean over rows.
- `KDTrainer._standard_kd_loss` (plugins/huggingface.py): LogitsDistillationLoss(reduction="none") on the logits but
  the last position, summed where the shifted label is not -100, divided by that count clamped to 1, or the plain
  mean without labels: kdfast's "mean" with the shifted labels and ignore_index -100 (0 when none is kept, as the
  clamp gives), or with labels=None.

Ported (every backend that runs on the CPU: "torch", the C++ kernel "cpu", and Triton under its interpreter; the
shapes are the peer's own and a few hundred elements, so nothing is cut):
tests/unit/torch/distill/test_losses.py (a contributor's suite for the peer's coverage drive #1902, commit ea3fc485
and its later form 2f8c3b77, reachable only as pull-request refs, not in the snapshot's branches),
TestLogitsDistillationLoss: the hand-computed values (mean, batchmean, T = 2, none), the exact T^2 ratio,
identical logits, the 3-D "none" shape, the masked mean, mean = sum / numel, a positive batchmean, the teacher not
receiving a gradient (kdfast refuses a teacher that requires grad and leaves a detached one without one):
`test_logits_*`. TestMFTLoss: the hand-computed corrected distributions (correct argmax, incorrect argmax and its
threshold separation, the confident-correct near one-hot) and `apply_threshold_to_all=False` (commit 2f8c3b77, the
suite's later form), normalisation, threshold 0 with matched logits, the loss against the peer's manual KL at T = 2,
3-D logits flattened, the T^2 factor: `test_mft_*`, each corrected teacher also run through kdfast against float64
(its detached-teacher twin is the LogitsDistillationLoss one: the same kdfast call).
tests/unit/torch/distill/plugins/test_huggingface_kd.py: the trainer's KD loss in training and in evaluation (with
the student's CE, kdfast's CE component) and without labels, on the peer's tiny causal LMs rebuilt here (an embedding
and a bias-free head, seeded 0 as the peer): `test_hf_*`. The peer's tests run T = 1; T = 2 (the plugin's temperature
argument) is added, and a batch whose labels are all -100 (the peer's clamp).

Left out: the float64 dtype test (kdfast's loss is float32 and it refuses float64 logits, by name, as
`test_logits_float64_refused` checks); MFTLoss's argument-shape errors (they test the peer's correction helper, which
is this file's own code here); MGDLoss (a convolutional feature loss with its own modules, no logits KD) and the loss
balancers (StaticLossBalancer, LogitsAndIntermediatesLossBalancer: weighting scalars already computed); the
intermediate-layer losses of the Megatron plugin (MSE, cosine); tests/unit/torch/distill/test_distill.py (mtd.convert
on image models: it asserts the loss is a 1-element tensor, never its value); the trainer's call order, metric names
and the Liger path (LigerFusedLinearJSD: no peer test sets `use_liger_kernel`); the Megatron GPU tests that build
GPT models and its config / MTP tests (see the Megatron file)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import leaf

import kdfast

SEED = 1234  # the peer's: test_losses.py's autouse fixture and test_distill_megatron.py's _make_loss_inputs
LN3 = math.log(3.0)
QUARTER_LN_4_3 = 0.25 * math.log(4.0 / 3.0)


def close(actual, expected, atol, rtol=1e-5):
    """torch.isclose / allclose at the peer's tolerance (rtol 1e-5 its default), in float64, on the CPU."""
    torch.testing.assert_close(actual.detach().double().cpu(), torch.as_tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------
# LogitsDistillationLoss (losses.py)
# ---------------------------------------------------------------------------------------------------------------

def modelopt_kd64(logits_s, logits_t, temperature=1.0, reduction="mean"):
    """LogitsDistillationLoss in float64: F.kl_div(log_softmax(s / T), softmax(t / T)) * T^2 (0 log 0 = 0)."""
    log_q = torch.log_softmax(logits_s.double() / temperature, -1)
    p = torch.softmax(logits_t.double() / temperature, -1)
    pointwise = (torch.special.xlogy(p, p) - p * log_q) * temperature**2
    if reduction == "none":
        return pointwise.sum(-1)
    total = pointwise.sum()
    return {"sum": total, "mean": total / pointwise.numel(), "batchmean": total / pointwise.shape[0]}[reduction]


def kdfast_modelopt_kd(logits_s, logits_t, temperature=1.0, reduction="mean", backend="auto", labels=None):
    """The same loss, one kdfast call: forward KL times T^2 per row, F.kl_div's reductions as kdfast's (module
    docstring)."""
    items = {"mean": logits_s.numel(), "batchmean": logits_s.shape[0]}.get(reduction)
    return kdfast.distill_loss(logits_s, logits_t, labels, temperature=temperature, t2_scale=True,
                               reduction="mean" if items else reduction, num_items_in_batch=items, backend=backend)


def seeded_randn(*shapes):
    """The peer's draws: torch.manual_seed(SEED), then one torch.randn per shape."""
    torch.manual_seed(SEED)
    return [torch.randn(shape) for shape in shapes]


# name -> (student, teacher, T, the peer's reduction, the peer's hand-computed value)
HAND_CASES = {
    # softmax [1/4, 3/4] against [1/2, 1/2]: KL 0.5 ln(4/3), "mean" over its 2 elements
    "mean": ([[0.0, LN3]], [[0.0, 0.0]], 1.0, "mean", QUARTER_LN_4_3),
    # two mirrored rows, each KL 0.5 ln(4/3), the total over the batch of 2
    "batchmean": ([[0.0, LN3], [LN3, 0.0]], [[0.0, 0.0], [0.0, 0.0]], 1.0, "batchmean", 2 * QUARTER_LN_4_3),
    # [0, 2 ln 3] / 2 is the first case's row; times T^2 = 4
    "temperature_2": ([[0.0, 2 * LN3]], [[0.0, 0.0]], 2.0, "mean", 4 * QUARTER_LN_4_3),
    # per row, each 0.5 ln(4/3)
    "none": ([[0.0, LN3], [LN3, 0.0]], [[0.0, 0.0], [0.0, 0.0]], 1.0, "none", [2 * QUARTER_LN_4_3] * 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HAND_CASES))
def test_logits_hand_computed_values(backend, case):
    """test_hand_computed_value_mean_reduction / _batchmean_reduction, test_temperature_softening_and_rescaling,
    test_none_reduction_shape_and_values: the peer's values, atol 1e-6."""
    student, teacher, temperature, reduction, expected = HAND_CASES[case]
    device = device_for(backend)
    loss = kdfast_modelopt_kd(torch.tensor(student, device=device), torch.tensor(teacher, device=device),
                              temperature, reduction, backend)
    assert loss.shape == torch.as_tensor(expected).shape
    close(loss, expected, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_temperature_squared_factor_exact_ratio(backend):
    """test_temperature_squared_factor_exact_ratio: logits times 3 at T = 3 soften to the T = 1 distributions, so the
    loss is exactly 9 times (atol 1e-6)."""
    device = device_for(backend)
    student, teacher = torch.tensor([[0.0, LN3]], device=device), torch.tensor([[0.0, 0.0]], device=device)
    loss_t1 = kdfast_modelopt_kd(student, teacher, 1.0, "mean", backend)
    loss_t3 = kdfast_modelopt_kd(student * 3.0, teacher * 3.0, 3.0, "mean", backend)
    close(loss_t3, 9.0 * loss_t1.detach().double().cpu(), atol=1e-6)
    close(loss_t1, QUARTER_LN_4_3, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_identical_logits_zero_loss(backend):
    """test_identical_logits_zero_loss: randn(4, 10) against itself, "mean": 0 within atol 1e-7."""
    (logits,) = seeded_randn((4, 10))
    logits = logits.to(device_for(backend))
    close(kdfast_modelopt_kd(logits, logits.clone(), backend=backend), 0.0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_none_reduction_3d(backend, temperature):
    """test_none_reduction_3d_keeps_batch_and_seq_dims: [2, 5, 7] logits give a [2, 5] loss, non-negative; held here
    also to float64 in loss and gradient (the peer checks the shape and the sign), at the peer's T = 1 and at 2."""
    student, teacher = seeded_randn((2, 5, 7), (2, 5, 7))
    device = device_for(backend)
    s = leaf(student, device)
    loss = kdfast_modelopt_kd(s, teacher.to(device), temperature, "none", backend)
    assert loss.shape == (2, 5) and bool((loss >= 0).all())
    weights = torch.linspace(0.5, 1.5, 10).view(2, 5)
    (loss * weights.to(device)).sum().backward()
    s64 = student.double().requires_grad_(True)
    expected = modelopt_kd64(s64, teacher, temperature, "none")
    (expected * weights.double()).sum().backward()
    close(loss, expected.detach(), atol=1e-6)
    close(s.grad, s64.grad, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_none_reduction_supports_masking(backend):
    """test_none_reduction_supports_masking: the per-token loss masked and averaged over the 3 kept tokens. kdfast
    masks by label: ignore_index where the mask is 0, and its "mean" is the peer's masked mean; its "none" masked by
    hand gives the same."""
    student, teacher = seeded_randn((2, 4, 6), (2, 4, 6))
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    device = device_for(backend)
    per_token = kdfast_modelopt_kd(student.to(device), teacher.to(device), reduction="none", backend=backend).cpu()
    masked_mean = (per_token * mask).sum() / mask.sum()
    close(masked_mean, (per_token[0, :2].sum() + per_token[1, :1].sum()) / 3.0, atol=1e-6)  # the peer's assertion
    labels = torch.where(mask > 0, 0, -100)
    loss = kdfast.distill_loss(student.to(device), teacher.to(device), labels.to(device), backend=backend)
    close(loss, masked_mean, atol=1e-6)
    close(loss, (modelopt_kd64(student, teacher, reduction="none") * mask).sum() / mask.sum(), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_mean_equals_sum_over_numel(backend):
    """test_mean_equals_sum_over_numel: F.kl_div's "mean" is the sum over rows x classes (3 x 8), as the peer
    documents; and both equal float64."""
    student, teacher = seeded_randn((3, 8), (3, 8))
    device = device_for(backend)
    loss_mean = kdfast_modelopt_kd(student.to(device), teacher.to(device), reduction="mean", backend=backend)
    loss_sum = kdfast_modelopt_kd(student.to(device), teacher.to(device), reduction="sum", backend=backend)
    close(loss_mean, loss_sum.detach().double().cpu() / student.numel(), atol=1e-6)
    close(loss_mean, modelopt_kd64(student, teacher, reduction="mean"), atol=1e-6)
    close(loss_sum, modelopt_kd64(student, teacher, reduction="sum"), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_loss_positive_for_differing_distributions(backend):
    """test_loss_positive_for_differing_distributions: teacher = student + noise, "batchmean" > 0 (and float64's)."""
    torch.manual_seed(SEED)
    student = torch.randn(4, 10)
    teacher = student + torch.randn(4, 10)
    device = device_for(backend)
    loss = kdfast_modelopt_kd(student.to(device), teacher.to(device), reduction="batchmean", backend=backend)
    assert loss.item() > 0.0
    close(loss, modelopt_kd64(student, teacher, reduction="batchmean"), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_teacher_gets_no_gradient(backend):
    """test_teacher_logits_detached_from_graph (the peer detaches the soft targets): kdfast refuses a teacher that
    requires grad, naming it; with the teacher detached the student gets a gradient and the teacher none."""
    student, teacher = seeded_randn((2, 5), (2, 5))
    device = device_for(backend)
    logits_s, logits_t = leaf(student, device), leaf(teacher, device)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        kdfast_modelopt_kd(logits_s, logits_t, backend=backend)
    kdfast_modelopt_kd(logits_s, logits_t.detach(), backend=backend).backward()
    assert logits_s.grad is not None and bool(logits_s.grad.abs().sum() > 0)
    assert logits_t.grad is None


def test_logits_float64_refused():
    """test_float64_dtype_preserved: ModelOpt keeps float64 logits in float64; kdfast computes in float32 and refuses
    float64 logits by name rather than round them silently."""
    student, teacher = seeded_randn((2, 5), (2, 5))
    with pytest.raises(ValueError, match="student_logits must be float32"):
        kdfast_modelopt_kd(student.double(), teacher.double())


# ---------------------------------------------------------------------------------------------------------------
# MFTLoss (losses.py)
# ---------------------------------------------------------------------------------------------------------------

def mft_corrected64(logits, labels, threshold, apply_threshold_to_all=True):
    """MFT's corrected teacher distribution, float64, [rows, classes]: softmax(logits) mixed with the label's one-hot,
    p (1 - m) + m onehot. Where the argmax is not the label, m = (p_argmax - p_label + threshold) /
    (1 + p_argmax - p_label + 1e-7), which leaves the label `threshold` ahead of the former argmax. Where it is (and
    `apply_threshold_to_all`), m = (cap - p_argmax) / (1 - p_argmax + 1e-7) with cap = 1 if p_label > 1 - threshold
    else p_label + threshold; otherwise those rows are left as they are."""
    p = torch.softmax(logits.double(), -1)
    p_label = p.gather(-1, labels[:, None])
    p_argmax, argmax = p.max(-1, keepdim=True)
    onehot = F.one_hot(labels, p.shape[-1]).double()
    wrong = (p_argmax - p_label + threshold) / (1 + p_argmax - p_label + 1e-7)
    cap = torch.where(p_label > 1 - threshold, torch.ones_like(p_label), p_label + threshold)
    right = (cap - p_argmax) / (1 - p_argmax + 1e-7) if apply_threshold_to_all else torch.zeros_like(p_label)
    mix = torch.where(argmax != labels[:, None], wrong, right)
    return p * (1 - mix) + mix * onehot


def mft_loss64(logits_s, logits_t, labels, temperature=1.0, threshold=0.2):
    """MFTLoss in float64: KL(corrected || softmax(s / T)) over the flattened rows, "batchmean", times T^2."""
    classes = logits_s.shape[-1]
    target = mft_corrected64(logits_t.reshape(-1, classes).double() / temperature, labels, threshold)
    log_q = torch.log_softmax(logits_s.reshape(-1, classes).double() / temperature, -1)
    return (torch.special.xlogy(target, target) - target * log_q).sum() / target.shape[0] * temperature**2


def kdfast_mft(logits_s, corrected, temperature=1.0, backend="auto"):
    """MFTLoss from kdfast, given the corrected teacher [rows, classes]: its logits T * log(corrected), whose softmax
    at T is `corrected`; forward KL times T^2, the mean over the (flattened) rows, the peer's "batchmean"."""
    teacher = (temperature * corrected.log()).float().view(logits_s.shape).to(logits_s.device)
    return kdfast.distill_loss(logits_s, teacher, temperature=temperature, t2_scale=True, backend=backend)


# name -> (teacher probabilities, labels, threshold, apply_threshold_to_all, the peer's corrected distribution)
MFT_HAND_CASES = {
    # label = argmax, p_label 0.7 <= 0.8: cap 0.9, m = 0.2 / 0.3
    "correct_argmax": ([[0.7, 0.2, 0.1]], [0], 0.2, True, [[0.9, 0.2 / 3.0, 0.1 / 3.0]]),
    # argmax 0, label 1: m = 0.5 / 1.3
    "incorrect_argmax": ([[0.6, 0.3, 0.1]], [1], 0.2, True, [[4.8 / 13.0, 7.4 / 13.0, 0.8 / 13.0]]),
    # p_label 0.85 > 0.8: cap 1, m = 1 (the 1e-7 guard leaves ~1e-7 off the one-hot)
    "confident_correct": ([[0.85, 0.1, 0.05]], [0], 0.2, True, [[1.0, 0.0, 0.0]]),
    # apply_threshold_to_all=False: the correct row as it was, the wrong one corrected
    "threshold_not_applied_to_correct_rows": ([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]], [0, 1], 0.2, False,
                                              [[0.7, 0.2, 0.1], [4.8 / 13.0, 7.4 / 13.0, 0.8 / 13.0]]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MFT_HAND_CASES))
def test_mft_hand_computed_corrected_distributions(backend, case):
    """test_corrected_distribution_correct_argmax_hand_computed / _incorrect_argmax_ / _confident_correct_becomes_
    one_hot / _enforces_threshold_separation and test_threshold_not_applied_to_correct_argmax_rows: the correction
    (this file's, from log p as the peer feeds it) gives the peer's distributions (atol 1e-5); then kdfast's KL of a
    student (randn, seed 1234) against each, at T = 1 and 2, equals float64."""
    probs, labels, threshold, apply_all, expected = MFT_HAND_CASES[case]
    labels = torch.tensor(labels)
    corrected = mft_corrected64(torch.tensor(probs).log(), labels, threshold, apply_all)
    close(corrected, expected, atol=1e-5, rtol=0)
    if case == "incorrect_argmax":  # the label now leads the former argmax by the threshold
        close(corrected[0, 1] - corrected[0, 0], threshold, atol=1e-5, rtol=0)
    (student,) = seeded_randn(corrected.shape)
    for temperature in (1.0, 2.0):
        loss = kdfast_mft(student.to(device_for(backend)), corrected, temperature, backend)
        log_q = torch.log_softmax(student.double() / temperature, -1)
        kl = (torch.special.xlogy(corrected, corrected) - corrected * log_q).sum(-1).mean() * temperature**2
        close(loss, kl, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mft_corrected_distributions_remain_normalized(backend):
    """test_corrected_distributions_remain_normalized (threshold 0.3, randn(16, 11), random labels): the corrected
    rows sum to 1 and are non-negative; kdfast's MFT loss of a student drawn after them equals float64 at T = 1."""
    torch.manual_seed(SEED)
    logits = torch.randn(16, 11)
    labels = torch.randint(0, 11, (16,))
    student = torch.randn(16, 11)
    corrected = mft_corrected64(logits, labels, 0.3)
    close(corrected.sum(-1), torch.ones(16), atol=1e-5, rtol=0)
    assert bool((corrected >= 0).all())
    loss = kdfast_mft(student.to(device_for(backend)), corrected, 1.0, backend)
    close(loss, mft_loss64(student, logits, labels, 1.0, 0.3), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mft_zero_threshold_matched_logits_zero_loss(backend):
    """test_zero_threshold_matched_logits_zero_loss: threshold 0 and labels at the teacher's argmax leave the teacher
    as it is, so identical logits give 0 (atol 1e-6)."""
    (logits,) = seeded_randn((4, 6))
    corrected = mft_corrected64(logits, logits.argmax(-1), 0.0)
    close(corrected, torch.softmax(logits.double(), -1), atol=1e-6, rtol=0)
    close(kdfast_mft(logits.clone().to(device_for(backend)), corrected, 1.0, backend), 0.0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mft_forward_matches_manual_kl(backend):
    """test_forward_matches_manual_kl_on_corrected_targets (T = 2, threshold 0.2, [5, 7]): the loss is
    kl_div(log_softmax(s / T), corrected(t / T), batchmean) * T^2, atol 1e-6; the gradient equals float64's."""
    temperature = 2.0
    torch.manual_seed(SEED)
    logits_s, logits_t = torch.randn(5, 7), torch.randn(5, 7)
    labels = torch.randint(0, 7, (5,))
    corrected = mft_corrected64(logits_t / temperature, labels, 0.2)
    s = leaf(logits_s, device_for(backend))
    loss = kdfast_mft(s, corrected, temperature, backend)
    loss.backward()
    manual = F.kl_div(F.log_softmax(logits_s / temperature, dim=-1), corrected.float(), reduction="batchmean")
    close(loss, manual * temperature**2, atol=1e-6)  # the peer's own float32 expression
    s64 = logits_s.double().requires_grad_(True)
    expected = mft_loss64(s64, logits_t, labels, temperature, 0.2)
    expected.backward()
    close(loss, expected.detach(), atol=1e-6)
    close(s.grad, s64.grad, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mft_forward_flattens_3d_logits(backend):
    """test_forward_flattens_3d_logits: [2, 3, 5] logits with 6 labels give a 0-d loss equal to the flattened
    [6, 5] one (atol 1e-6): kdfast's mean runs over every leading position."""
    torch.manual_seed(SEED)
    logits_s, logits_t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (6,))
    corrected = mft_corrected64(logits_t.reshape(6, 5), labels, 0.2)
    device = device_for(backend)
    loss = kdfast_mft(logits_s.to(device), corrected, 1.0, backend)
    flat = kdfast_mft(logits_s.reshape(6, 5).to(device), corrected, 1.0, backend)
    assert loss.ndim == 0
    close(loss, flat.detach().double().cpu(), atol=1e-6)
    close(loss, mft_loss64(logits_s, logits_t, labels), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mft_temperature_squared_factor(backend):
    """test_temperature_squared_factor: logits times 2 at T = 2 soften to the T = 1 distributions (the correction
    included), so the loss is 4 times (atol 1e-5)."""
    torch.manual_seed(SEED)
    logits_s, logits_t = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.randint(0, 6, (4,))
    device = device_for(backend)
    loss_t1 = kdfast_mft(logits_s.to(device), mft_corrected64(logits_t, labels, 0.2), 1.0, backend)
    loss_t2 = kdfast_mft((logits_s * 2.0).to(device), mft_corrected64(logits_t * 2.0 / 2.0, labels, 0.2), 2.0,
                         backend)
    close(loss_t2, 4.0 * loss_t1.detach().double().cpu(), atol=1e-5)
    close(loss_t1, mft_loss64(logits_s, logits_t, labels, 1.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# KDTrainer's KD loss (plugins/huggingface.py; tests/unit/torch/distill/plugins/test_huggingface_kd.py)
# ---------------------------------------------------------------------------------------------------------------

HF_INPUT_IDS = torch.tensor([[1, 2, 3, 4], [2, 3, 4, 5]])
HF_LABELS = torch.tensor([[1, 2, 3, 4], [2, -100, 4, 5]])  # the peer's _ToyDataset, collated


def hf_tiny_logits():
    """The logits of the peer's _TinyCausalLM pair (`_make_models`): seeded 0, each model an Embedding(8, 6) then a
    bias-free Linear(6, 8) head, created student first; the teacher's head weight plus 0.25."""
    torch.manual_seed(0)
    models = [(nn.Embedding(8, 6), nn.Linear(6, 8, bias=False)) for _ in ("student", "teacher")]
    with torch.no_grad():
        models[1][1].weight.add_(0.25)
        return [head(embed(HF_INPUT_IDS)) for embed, head in models]


def hf_kd64(student_logits, teacher_logits, labels, temperature):
    """KDTrainer._standard_kd_loss in float64: the per-token loss on the positions but the last, summed where the
    shifted label is kept, over that count clamped to 1; the plain mean without labels."""
    per_token = modelopt_kd64(student_logits[:, :-1], teacher_logits[:, :-1], temperature, "none")
    if labels is None:
        return per_token.mean()
    mask = labels[:, 1:] != -100
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("labels", ["peer", "all_ignored"])
def test_hf_training_loss_is_kd(backend, temperature, labels):
    """test_training_loss_is_kd_and_skips_ce: the training loss is the masked KD mean (pytest.approx, rel 1e-6);
    here from kdfast with the shifted labels. T = 2 and a batch without a kept label (the peer's clamp: 0) added."""
    student_logits, teacher_logits = hf_tiny_logits()
    labels = HF_LABELS if labels == "peer" else torch.full_like(HF_LABELS, -100)
    device = device_for(backend)
    loss = kdfast.distill_loss(student_logits[:, :-1].to(device), teacher_logits[:, :-1].to(device),
                               labels[:, 1:].to(device), temperature=temperature, backend=backend)
    expected = hf_kd64(student_logits, teacher_logits, labels, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_eval_kd_loss_and_ce_metric(backend):
    """test_eval_loss_is_kd_and_ce_is_secondary_metric: the eval loss is the KD loss and the CE metric the student's
    own shifted cross-entropy (the model's loss); one kdfast call gives both, its kd and ce components."""
    student_logits, teacher_logits = hf_tiny_logits()
    device = device_for(backend)
    _, parts = kdfast.distill_loss(student_logits[:, :-1].to(device), teacher_logits[:, :-1].to(device),
                                   HF_LABELS[:, 1:].to(device), ce_weight=1.0, backend=backend,
                                   return_components=True)
    ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, 8), HF_LABELS[:, 1:].reshape(-1), ignore_index=-100)
    assert parts.kd.item() == pytest.approx(hf_kd64(student_logits, teacher_logits, HF_LABELS, 1.0).item(), rel=1e-6)
    assert parts.ce.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_kd_loss_without_labels_uses_mean(backend):
    """test_standard_kd_loss_without_labels_uses_mean: no labels, the mean over every shifted position."""
    student_logits, teacher_logits = hf_tiny_logits()
    device = device_for(backend)
    loss = kdfast.distill_loss(student_logits[:, :-1].to(device), teacher_logits[:, :-1].to(device), None,
                               backend=backend)
    assert loss.item() == pytest.approx(hf_kd64(student_logits, teacher_logits, None, 1.0).item(), rel=1e-6)
