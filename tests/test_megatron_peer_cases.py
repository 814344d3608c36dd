"""NVIDIA Megatron-LM's cross-entropy tests at TP = 1, their inputs and expectations (golden numbers and tolerances
included), run on kdfast; the tensor-parallel cases are in tests/test_megatron_peer_cases_vocab_parallel.py.

What Megatron computes, and the kdfast call that expresses it:
- `vocab_parallel_cross_entropy(logits, target, label_smoothing=0.0, tp_group=None)`
  (megatron/core/tensor_parallel/cross_entropy.py) returns the per-token loss lse(x) - x[target], float32 whatever
  the logits' dtype, shaped like `target`, no reduction (the caller masks and reduces): kdfast.cross_entropy(logits,
  target, reduction="none"). Float32 logits are overwritten (the max subtracted, exp taken in place): kdfast's
  `inplace_backward=True` is the counterpart that consumes its logits.
- Targets: Megatron has no ignore_index. Each rank masks the targets outside its vocabulary range [start, stop); a
  target outside every rank's range (-100, or >= V) keeps a per-token loss of lse(x) - max(x) and a gradient of
  softmax(x), which `LanguageModule`'s loss mask then multiplies by 0. kdfast refuses such targets unless they equal
  `ignore_index`, and gives ignored rows no loss and no gradient: Megatron's masked loss is kdfast's with the masked
  targets set to ignore_index (`test_megatron_loss_mask_is_ignore_index`).
- Label smoothing (the tensor-parallel fix of pull request 5522, commit d6fc45bb): Megatron puts 1 - alpha on the
  target and alpha / (V - 1) on each other class (NeMo's definition; V the global vocabulary), computed as
  (1 - s) CE - s mean(log p) with s = alpha V / (V - 1). PyTorch's and kdfast's `label_smoothing` eps puts
  1 - eps + eps / V on the target and eps / V elsewhere: the same loss for eps = alpha V / (V - 1), which kdfast
  takes while it is at most 1 (alpha <= (V - 1) / V; Megatron accepts any alpha below 1: at V = 8 an alpha
  in (7/8, 1) has no kdfast counterpart). At TP = 1 the mirrored main branch's older code is the same formula.
- `fused_vocab_parallel_cross_entropy` (megatron/core/fusions/fused_cross_entropy.py): the same loss without label
  smoothing, its gradient cast to bf16. Its only test is the ops backends' parity test (below), where kdfast's
  backends take the place of Megatron's two.
- The fused linear cross entropy `linear_cross_entropy(hidden, weight, labels, tp_group, reduction, ignore_index,
  sequence_parallel)` (megatron/core/fusions/fused_linear_cross_entropy.py, the dev branch; Blackwell kernels only,
  Hopper ones in pull request 3345): F.cross_entropy(hidden @ weight.T, labels, reduction=, ignore_index=) with the
  logits accumulated and kept in float32 and the loss float32 ("mean" over the kept tokens):
  kdfast.linear_cross_entropy(..., fp32_logits=True) (without it kdfast rounds 16-bit logits to 16 bits, up to 2e-4
  off the peer's float32 reference, past its default tolerance).

Ported, on every backend this machine runs (conftest's BACKENDS: "torch", the C++ "cpu", Triton under its
interpreter, "cuda" with a GPU):
- tests/unit_tests/tensor_parallel/test_cross_entropy.py: test_vocab_parallel_cross_entropy (the golden per-token
  values of range(8) repeated over a vocabulary of 128, compared after torch.round as the peer does, and to float64
  within 1e-5 beyond it), at TP = 1 here (the peer's TP = 4 split is in the vocab-parallel file);
  test_vocab_parallel_cross_entropy_uses_explicit_tp_group's values (F.cross_entropy, assert_close's defaults; its
  group plumbing is in the vocab-parallel file); test_language_module_unfused_loss_passes_tp_group's [s, b] logits
  against [b, s] labels (its monkeypatched plumbing becomes the layout: labels transposed in, the loss transposed
  out); test_vocab_parallel_cross_entropy_label_smoothing (pull request 5522: the extreme +-120 row, alpha 0.2, rtol
  1e-5, atol 1e-6 on the loss and the gradient) at TP = 1, its TP = 2 in the vocab-parallel file.
- The legacy mpu test (megatron/mpu/tests/test_cross_entropy.py, later megatron/legacy/mpu/tests/): logits 1000 x
  randn(13, 17, 11) from seed 1234 (drawn on the CPU there too), the mean of the per-token losses and its gradient
  within 1e-6 of F.cross_entropy's; TP = 1 here, 2 and 4 in the vocab-parallel file. The peer draws its targets on
  the GPU; here from the same CPU generator after the logits. The peer takes `.mean()` of the per-token losses
  itself, and so does this port; kdfast's own "mean" reduction sums in another order (a float32 unit or two
  apart from torch's on the ~2000 losses of the wider vocabularies), so it is held to float64 instead.
- tests/unit_tests/fusions/test_liger_cross_entropy.py (pull request 5438):
  test_liger_ce_matches_torch_cross_entropy_tp1 ([8, 4, 32], float32 at 1e-5, bf16 at rtol 2e-2 atol 1e-2, the loss
  and the gradient); the TP = 2 test in the vocab-parallel file. The peer draws its logits unseeded on the GPU; here
  from seed 0.
- tests/unit_tests/ops/test_cross_entropy_backend.py (pull request 6762): test_every_target_matches_torch_cross_entropy
  (seed 1234, [6, 2, 16], float32 and bf16, rtol = atol = 1e-2, each backend on its own copy) with kdfast's backends
  and its consuming `inplace_backward=True` form as the targets, and test_target_accepts_a_default_tensor_parallel_group
  (process_group=None: the shape of the labels).
- tests/unit_tests/fusions/test_fused_linear_cross_entropy.py (dev branch), TestFusedLinearCrossEntropyDataParallel:
  test_correctness (bf16 and fp16, reductions none / mean / sum, ignore_index -100 and 4, the labels shifted left
  with ignore_index last; hidden and weight uniform(-0.1, 0.1); the upstream gradient uniform(-0.1, 0.1); the loss at
  assert_close's float32 defaults against the peer's float32-logits reference, the gradients at 1e-3) and
  test_kernel_launch (randn inputs, bf16, token counts 15, 26, 128, 513: finite loss and gradients). The peer's
  problems reach a vocabulary of 152064 and a hidden size of 8192 (GPU sizes); cut for the CPU (`cut_problem`): the
  tokens to at most 128, the vocabulary by 10 for the first large one (the peer's own cut in its sequence-parallel
  problems) and by 100 for the others (the odd 152063 kept odd), the hidden size to 64 (the peer's first two).
  test_correctness takes a covering set of the peer's product (`flce_rows`): each problem under two reductions, and
  under each reduction every (dtype, ignore_index) pair. The peer's 1e-3 on gradients of ~1e-2 (~1e-5 under "mean")
  says little: the loss is also held to float64 within 1e-6 relative, and the gradients within the bound of a 16-bit
  backward (`within_16bit_gemm`: d logits rounded to the dtype for the GEMMs, as kdfast's design has it, and the
  result rounded), fp16's subnormals included (d logits of ~1e-7 under "mean" are subnormal in fp16).
Under Triton's interpreter (~0.3 s a call) the legacy mpu test keeps 2 of its 13 sequences, and the fused linear
tests 8 tokens and one row a problem (test_kernel_launch: 15 and 26 tokens).

Left out: the GPT-model test of the fused linear CE (skipped by the peer itself) and its latency and memory tests
(printed, never asserted); TestFusedLinearCrossEntropyTensorParallel / SequenceParallel's torch-reference-against-
one-GPU tests (they test the peer's own reference); the liger tests of a missing package and of lazy imports, the ops
backends' identity and determinism declarations, and the MegatronLite fusion-flag tests
(experimental/lite/tests/unit/model/test_cross_entropy_fusion_unit.py): plumbing of Megatron's modules, no loss value.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import INTERPRETED, leaf

import kdfast

F64 = torch.float64
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Relative spacing of each dtype's numbers (one unit in the last place at 1.0).
UNIT = {BF16: 2.0**-7, FP16: 2.0**-10, FP32: 2.0**-23}
# The spacing of each 16-bit dtype's smallest (subnormal) numbers.
SUBNORMAL = {BF16: 2.0**-133, FP16: 2.0**-24}

# test_vocab_parallel_cross_entropy's expected values (4 decimals), the same for every tensor-parallel size.
GOLDEN = [10.2309, 8.2309, 6.2309, 4.2309] * 4

# test_vocab_parallel_cross_entropy_label_smoothing's inputs (pull request 5522).
SMOOTHING_LOGITS = [[3.0, -1.0, 0.5, 2.0, -4.0, 1.5, 0.0, 4.0],
                    [-2.0, 0.25, 5.0, -1.5, 3.5, -0.5, 1.0, 2.5],
                    [1.25, -3.0, 2.75, 0.5, -1.0, 0.75, 4.25, -2.5],
                    [120.0, -120.0, 80.0, -80.0, 60.0, -60.0, 40.0, -40.0]]
SMOOTHING_TARGET = [0, 5, 7, 6]
ALPHA = 0.2


def close(actual, expected, what="", rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
                               atol=atol, msg=lambda message: f"{what}: {message}")


def within_units(actual, expected64, dtype, what, units=1.0):
    """`actual` (in `dtype`) within `units` of its dtype's last place of float64's value, the unit taken at the
    larger of the value and a 1/128 of the tensor's largest (entries that small are sums that cancel)."""
    expected64 = expected64.detach().double().cpu()
    scale = expected64.abs().clamp_min(expected64.abs().max().item() / 128)
    error = (actual.detach().double().cpu() - expected64).abs()
    worst = (error / (scale * UNIT[dtype])).max().item()
    assert worst <= units, f"{what}: {worst:.3g} units of {dtype} from float64 (allowed {units})"


def kdfast_smoothing(alpha, vocab):
    """kdfast's (PyTorch's) label_smoothing for Megatron's alpha over a vocabulary of `vocab`: alpha V / (V - 1)."""
    return alpha * vocab / (vocab - 1)


def golden_shard():
    """test_vocab_parallel_cross_entropy's logits on one rank: range(8) repeated over 32 columns, 16 rows (every rank
    alike: at TP = t the global row is range(8) repeated 4 t times), and its targets 0, 2, ..., 30."""
    return torch.arange(0, 8, dtype=FP32).repeat(16, 4), torch.arange(0, 32, 2)


def megatron_ce64(shard, target, label_smoothing=0.0, group=None, grad_output=None):
    """Megatron's _VocabParallelCrossEntropy (the label-smoothing fix of pull request 5522) in float64 on this rank's
    columns: its max, predicted logit (0 where the target is outside this rank's range), sums of exp and of the
    logits all-reduced over `group` (None: TP = 1); the per-token loss, and with `grad_output` its backward's gradient
    of this rank's columns."""
    x = shard.detach().double()
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    part = x.shape[-1]
    start, vocab = rank * part, part * world

    def summed(tensor, op=dist.ReduceOp.SUM):
        if group is not None:
            dist.all_reduce(tensor, op=op, group=group)
        return tensor

    x = x - summed(x.amax(-1), dist.ReduceOp.MAX).unsqueeze(-1)
    outside = (target < start) | (target >= start + part)
    local = (target - start).masked_fill(outside, 0)
    predicted = summed(x.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0))
    sum_exp = summed(x.exp().sum(-1))
    loss = sum_exp.log() - predicted
    smoothing = label_smoothing * vocab / (vocab - 1)
    if label_smoothing > 0:
        mean_log_probs = summed(x.sum(-1)) / vocab - sum_exp.log()
        loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
    if grad_output is None:
        return loss, None
    grad = x.exp() / sum_exp.unsqueeze(-1)
    on_target = torch.zeros_like(grad).scatter_(-1, local.unsqueeze(-1), 1.0) * (~outside).unsqueeze(-1)
    grad = grad - (1.0 - smoothing) * on_target - smoothing / vocab
    return loss, grad * grad_output.double().unsqueeze(-1)


def smoothed_reference64(logits, target, alpha):
    """The peer's label-smoothing reference over the whole vocabulary: 1 - alpha on the target, alpha / (V - 1) on
    every other class, the cross-entropy against log_softmax; float64, differentiable."""
    vocab = logits.shape[-1]
    wanted = torch.full(logits.shape, alpha / (vocab - 1), dtype=F64).scatter_(-1, target.unsqueeze(-1), 1.0 - alpha)
    return -(wanted * torch.log_softmax(logits.double(), -1)).sum(-1)


def mpu_inputs(vocab):
    """The legacy mpu test's draw: seed 1234, logits 1000 * randn(13, 17, V) (IdentityLayer's weight), then the
    targets (the peer's on the GPU; here the CPU generator's next draw)."""
    torch.manual_seed(1234)
    logits = 1000.0 * torch.randn(13, 17, vocab)
    return logits, torch.randint(0, vocab, (13, 17))


def liger_inputs(dtype, vocab, seed=0):
    """test_liger_cross_entropy's [seq 8, batch 4, vocab] randn logits in `dtype` and uniform targets."""
    torch.manual_seed(seed)
    logits = torch.randn(8, 4, vocab, dtype=dtype)
    return logits, torch.randint(0, vocab, (8, 4))


def torch_ce_rows(logits, target, precision=FP32):
    """F.cross_entropy(reduction="none") over [..., V] logits cast to `precision`, shaped like the target."""
    return F.cross_entropy(logits.to(precision).reshape(-1, logits.shape[-1]), target.reshape(-1),
                           reduction="none").view(target.shape)


# ---------------------------------------------------------------------------------------------------------------
# tests/unit_tests/tensor_parallel/test_cross_entropy.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_cross_entropy_golden(backend):
    """test_vocab_parallel_cross_entropy at TP = 1: the whole row, range(8) repeated 16 times (the peer's 4 ranks'
    shards side by side), targets 0, 2, ..., 30: the peer's rounded golden values, and float64 within 1e-5 (the golden
    values themselves are 10.23093 rounded). The gradient (the peer has none) against float64."""
    device = device_for(backend)
    shard, target = golden_shard()
    logits = shard.repeat(1, 4)
    x = leaf(logits, device)
    loss = kdfast.cross_entropy(x, target.to(device), reduction="none", backend=backend)
    assert loss.shape == target.shape and loss.dtype == FP32
    golden = torch.tensor(GOLDEN)
    assert torch.equal(torch.round(golden), torch.round(loss.detach().cpu())), loss
    close(loss, golden, "golden values", rtol=0, atol=5e-5 + 1e-6)
    upstream = torch.linspace(0.5, 1.5, 16)
    expected, grad = megatron_ce64(logits, target, grad_output=upstream)
    close(loss, expected, "float64", rtol=1e-6, atol=1e-5)
    (loss * upstream.to(device)).sum().backward()
    close(x.grad, grad, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_cross_entropy_explicit_group_values(backend):
    """test_vocab_parallel_cross_entropy_uses_explicit_tp_group's values: [[1, 2, 3], [0.5, -0.5, 1]], targets
    [2, 0], equal to F.cross_entropy(reduction="none") at assert_close's defaults (its group plumbing: the
    vocab-parallel file)."""
    device = device_for(backend)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -0.5, 1.0]])
    target = torch.tensor([2, 0])
    expected = F.cross_entropy(logits.clone(), target, reduction="none")
    output = kdfast.cross_entropy(logits.to(device), target.to(device), reduction="none", backend=backend)
    torch.testing.assert_close(output.cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_module_loss_layout(backend):
    """test_language_module_unfused_loss_passes_tp_group's layout: logits [s, b, V] = randn(3, 2, 4), labels [b, s];
    the loss takes the labels transposed to [s, b] and comes back [b, s], the labels' shape, no label smoothing;
    values against float64."""
    device = device_for(backend)
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4)
    loss = kdfast.cross_entropy(logits.to(device), labels.transpose(0, 1).contiguous().to(device),
                                reduction="none", backend=backend).transpose(0, 1)
    assert loss.shape == labels.shape
    close(loss, torch_ce_rows(logits, labels.transpose(0, 1), F64).transpose(0, 1), "per-token loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_cross_entropy_label_smoothing(backend):
    """test_vocab_parallel_cross_entropy_label_smoothing (pull request 5522) at TP = 1: alpha 0.2 over V = 8 is
    kdfast's label_smoothing 0.2 * 8 / 7; the loss (finite, the +-120 row included) and the gradient of the summed
    loss against the peer's reference (1 - alpha on the target, alpha / 7 elsewhere) at its rtol 1e-5, atol 1e-6.
    Megatron's own arithmetic (`megatron_ce64`) is checked to be that reference: the port."""
    device = device_for(backend)
    logits = torch.tensor(SMOOTHING_LOGITS)
    target = torch.tensor(SMOOTHING_TARGET)
    reference_logits = logits.double().requires_grad_(True)
    reference = smoothed_reference64(reference_logits, target, ALPHA)
    reference.sum().backward()
    megatron, megatron_grad = megatron_ce64(logits, target, ALPHA, grad_output=torch.ones(4))
    close(megatron, reference, "Megatron's arithmetic vs the peer's reference", rtol=1e-12, atol=1e-12)
    close(megatron_grad, reference_logits.grad, "Megatron's backward vs the reference", rtol=1e-12, atol=1e-12)

    x = leaf(logits, device)
    loss = kdfast.cross_entropy(x + 0.0, target.to(device), reduction="none", backend=backend,
                                label_smoothing=kdfast_smoothing(ALPHA, logits.shape[-1]))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    close(loss, reference, "loss")
    close(x.grad, reference_logits.grad, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, ALPHA])
def test_megatron_loss_mask_is_ignore_index(backend, alpha):
    """Megatron masks by target range, not by an ignore index: a target outside the vocabulary (-100, and 8 = V here)
    keeps the loss lse - max and the gradient softmax, which the loss mask zeroes. kdfast's ignore_index at the
    masked tokens gives the masked per-token loss, its sum and its gradient (Megatron's backward with the mask as
    upstream gradient). Inputs: the label-smoothing test's logits and targets, the second and fourth masked."""
    device = device_for(backend)
    logits = torch.tensor(SMOOTHING_LOGITS)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    megatron_target = torch.tensor([0, -100, 7, 8])  # what reaches Megatron: the masked targets out of range
    loss, grad = megatron_ce64(logits, megatron_target, alpha, grad_output=mask)
    if alpha == 0.0:  # the masked tokens' loss is lse - max, as Megatron's masking by range leaves it
        close(loss[1::2], torch.logsumexp(logits.double(), -1)[1::2] - logits.double().amax(-1)[1::2], "lse - max")
    labels = torch.tensor([0, -100, 7, -100])
    settings = dict(label_smoothing=kdfast_smoothing(alpha, 8), backend=backend)
    rows = kdfast.cross_entropy(logits.to(device), labels.to(device), reduction="none", **settings)
    close(rows, loss * mask, "masked per-token loss")
    x = leaf(logits, device)
    total = kdfast.cross_entropy(x, labels.to(device), reduction="sum", **settings)
    total.backward()
    close(total, (loss * mask).sum(), "masked sum")
    close(x.grad, grad, "gradient")


# ---------------------------------------------------------------------------------------------------------------
# The legacy mpu test (megatron/mpu/tests/test_cross_entropy.py)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpu_cross_entropy(backend):
    """test_cross_entropy at TP = 1 (13 x 17 tokens, 11 classes, logits scale 1000; under Triton's interpreter 2 x 17):
    the mean of kdfast's per-token losses and its gradient within 1e-6 of F.cross_entropy's (the peer's `error <
    1.0e-6`); kdfast's own "mean" within a float32 unit of float64, and its gradient within 1e-6 (the peer's
    bound)."""
    device = device_for(backend)
    logits, target = mpu_inputs(11)
    if backend == "triton" and INTERPRETED:  # the interpreter's cut: the first 2 of the 13 sequences
        logits, target = logits[:2], target[:2]
    torch_logits = logits.clone().requires_grad_(True)
    loss_torch = torch_ce_rows(torch_logits, target).mean()
    loss_torch.backward()
    x = leaf(logits, device)
    loss = kdfast.cross_entropy(x, target.to(device), reduction="none", backend=backend).mean()
    loss.backward()
    assert (loss.detach().cpu() - loss_torch).abs().max().item() < 1.0e-6
    assert (x.grad.cpu() - torch_logits.grad).abs().max().item() < 1.0e-6

    logits64 = logits.double().requires_grad_(True)
    loss64 = torch_ce_rows(logits64, target, F64).mean()
    loss64.backward()
    y = leaf(logits, device)
    mean = kdfast.cross_entropy(y, target.to(device), backend=backend)
    mean.backward()
    close(mean, loss64, "kdfast's mean vs float64", rtol=UNIT[FP32], atol=0)
    assert (y.grad.cpu().double() - logits64.grad).abs().max().item() < 1.0e-6


# ---------------------------------------------------------------------------------------------------------------
# tests/unit_tests/fusions/test_liger_cross_entropy.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_liger_ce_matches_torch_cross_entropy_tp1(backend, dtype):
    """test_liger_ce_matches_torch_cross_entropy_tp1: [8, 4, 32] logits, the per-token loss against
    F.cross_entropy(logits.float(), reduction="none"), the gradient of its sum against torch's (cast to the logits'
    dtype, as autograd casts it); float32 at 1e-5, bf16 at rtol 2e-2, atol 1e-2. Beyond the peer: both against
    float64 (the bf16 gradient within a bf16 unit)."""
    device = device_for(backend)
    logits, target = liger_inputs(dtype, 32)
    x = leaf(logits, device)
    loss = kdfast.cross_entropy(x, target.to(device), reduction="none", backend=backend)
    assert loss.shape == target.shape
    expected = torch_ce_rows(logits, target)
    tols = dict(rtol=1e-5, atol=1e-5) if dtype is FP32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(loss.float().cpu(), expected, **tols)
    loss.sum().backward()
    reference = logits.clone().requires_grad_(True)
    torch_ce_rows(reference, target).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float().cpu(), reference.grad.float(), **tols)

    logits64 = logits.double().requires_grad_(True)
    loss64 = torch_ce_rows(logits64, target, F64)
    loss64.sum().backward()
    close(loss, loss64, "loss vs float64", rtol=1e-6, atol=1e-6)
    within_units(x.grad, logits64.grad, dtype, "gradient vs float64", units=1.0 if dtype is BF16 else 8.0)


# ---------------------------------------------------------------------------------------------------------------
# tests/unit_tests/ops/test_cross_entropy_backend.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_every_backend_matches_torch_cross_entropy(dtype):
    """test_every_target_matches_torch_cross_entropy: seed 1234, [6, 2, 16] logits, every backend (kdfast's, each in
    its copying and its consuming `inplace_backward=True` form, on its own copy of the logits) within rtol = atol =
    1e-2 of F.cross_entropy over the float logits; beyond the peer, within 1e-6 of float64. And
    test_target_accepts_a_default_tensor_parallel_group: process_group=None gives the labels' shape."""
    torch.manual_seed(1234)
    logits = torch.randn(6, 2, 16).to(dtype)
    labels = torch.randint(0, 16, (6, 2))
    expected = torch_ce_rows(logits, labels)
    expected64 = torch_ce_rows(logits, labels, F64)
    for backend in BACKENDS:
        device = device_for(backend)
        for inplace in (False, True):
            what = f"{backend}, inplace_backward={inplace}"
            loss = kdfast.cross_entropy(logits.clone().to(device), labels.to(device), reduction="none",
                                        inplace_backward=inplace, backend=backend, process_group=None)
            assert loss.shape == labels.shape, what
            torch.testing.assert_close(loss.float().cpu(), expected, rtol=1e-2, atol=1e-2,
                                       msg=lambda message, what=what: f"{what}: {message}")
            close(loss, expected64, what)


# ---------------------------------------------------------------------------------------------------------------
# tests/unit_tests/fusions/test_fused_linear_cross_entropy.py, TestFusedLinearCrossEntropyDataParallel
# ---------------------------------------------------------------------------------------------------------------

# The peer's (num_tokens, vocab, dim) problems, and the CPU's cut of each (module docstring).
FLCE_PROBLEMS = [(80, 125, 64), (80, 152064, 64), (1024, 152064, 4096), (4096, 152063, 8192),
                 ((1, 4096), 152064, 8192), ((2, 4096), 152064, 8192)]
CPU_CUTS = {(80, 125, 64): (80, 125, 64), (80, 152064, 64): (80, 15206, 64), (1024, 152064, 4096): (128, 1520, 64),
            (4096, 152063, 8192): (128, 1521, 64), ((1, 4096), 152064, 8192): ((1, 128), 1520, 64),
            ((2, 4096), 152064, 8192): ((2, 64), 1520, 64)}
FLCE_DTYPES = [BF16, FP16]
FLCE_REDUCTIONS = ["none", "mean", "sum"]
FLCE_IGNORES = [-100, 4]


def cut_problem(problem, backend):
    """The CPU's cut of a peer problem; under Triton's interpreter 8 tokens."""
    tokens, vocab, dim = CPU_CUTS[problem]
    if backend == "triton" and INTERPRETED:
        tokens = 8 if isinstance(tokens, int) else (tokens[0], 8 // tokens[0])
    return tokens, vocab, dim


def flce_rows(backend):
    """A covering set of the peer's dtype x problem x reduction x ignore_index: each problem under two reductions,
    each reduction under four problems, there with the four (dtype, ignore_index) pairs in turn; under Triton's
    interpreter one row a problem."""
    rows = []
    for r, reduction in enumerate(FLCE_REDUCTIONS):
        problems = [p for p in range(len(FLCE_PROBLEMS)) if r in (p % 3, (p + 1) % 3)]
        for i, p in enumerate(problems):
            if backend == "triton" and INTERPRETED and r != p % 3:
                continue
            rows.append((FLCE_DTYPES[i % 2], FLCE_PROBLEMS[p], reduction, FLCE_IGNORES[i // 2]))
    return rows


def flce_inputs(problem, dtype, ignore_index, generator):
    """The peer's draw: hidden and weight uniform(-0.1, 0.1) in the dtype, labels uniform over the vocabulary; an
    ignore_index inside the vocabulary is placed as the peer places it (labels shifted left, it fills the last)."""
    tokens, vocab, dim = problem
    shape = (tokens,) if isinstance(tokens, int) else tokens
    hidden = torch.empty(*shape, dim, dtype=dtype).uniform_(-0.1, 0.1, generator=generator)
    weight = torch.empty(vocab, dim, dtype=dtype).uniform_(-0.1, 0.1, generator=generator)
    labels = torch.randint(0, vocab, shape, generator=generator)
    if 0 <= ignore_index < vocab:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return hidden, weight, labels


def linear_ce_reference(hidden, weight, labels, reduction, ignore_index=-100, precision=FP32):
    """The peer's torch_linear_cross_entropy: logits = hidden @ weight.T in `precision` (float32: the peer's), then
    F.cross_entropy over them flattened."""
    logits = hidden.to(precision) @ weight.to(precision).T
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction,
                           ignore_index=ignore_index)


def d_logits64(hidden, weight, labels, reduction, ignore_index, upstream):
    """float64's loss and d logits (flattened to [N, V]) of F.cross_entropy(hidden @ weight.T) under `upstream`."""
    logits = (hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T).requires_grad_(True)
    loss = F.cross_entropy(logits, labels.reshape(-1), reduction=reduction, ignore_index=ignore_index)
    (grad,) = torch.autograd.grad(loss, logits, upstream.double().view(loss.shape))
    return loss.detach().view(upstream.shape), grad


def within_16bit_gemm(actual, d_logits, other, dtype, what):
    """A gradient `actual` = d_logits @ other (d hidden: other the head; d weight: d_logits.T, other the hidden
    states), computed from float32 d logits rounded to the 16-bit dtype (kdfast's fused linear backward, docs/DESIGN.md:
    "the gradient is then rounded once for the 16-bit backward GEMMs") and rounded once more at the end: within a unit
    of the dtype of |d logits| @ |other| plus the result, and fp16's subnormal spacing at each rounding (a d logit of
    1e-7 is a subnormal in fp16, as in any fp16 backward without loss scaling)."""
    other = other.double().reshape(-1, other.shape[-1])
    expected = d_logits @ other
    bound = UNIT[dtype] * (d_logits.abs() @ other.abs() + expected.abs())
    bound += SUBNORMAL[dtype] * (1.0 + other.abs().sum(0))  # each row: the sum over the d logits' roundings
    error = (actual.detach().double().cpu().reshape(expected.shape) - expected).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"{what}: {worst:.3g} of the 16-bit bound from float64"


def check_linear_ce(hidden, weight, labels, reduction, ignore_index, upstream, loss, d_hidden, d_weight, dtype,
                    weight_atol=1e-3):
    """The peer's checks (the loss at assert_close's float32 defaults against its float32 reference, the gradients
    at 1e-3, d weight at `weight_atol`), then float64's: the loss within 1e-6 relative, the gradients within the
    bound of a 16-bit backward (`within_16bit_gemm`)."""
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = linear_ce_reference(h32, w32, labels, reduction, ignore_index)
    torch.testing.assert_close(loss.detach().cpu().view(expected.shape), expected.detach())
    g_h, g_w = torch.autograd.grad(expected, (h32, w32), upstream.view(expected.shape))
    torch.testing.assert_close(d_hidden.cpu(), g_h, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(d_weight.cpu(), g_w, atol=weight_atol, rtol=weight_atol)

    expected64, grad64 = d_logits64(hidden, weight, labels, reduction, ignore_index, upstream)
    close(loss.view(expected64.shape), expected64, "loss vs float64", rtol=1e-6, atol=1e-6)
    within_16bit_gemm(d_hidden, grad64, weight, dtype, "d hidden vs float64")
    within_16bit_gemm(d_weight, grad64.T, hidden, dtype, "d weight vs float64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_cross_entropy_correctness(backend):
    """TestFusedLinearCrossEntropyDataParallel.test_correctness over the covering set (module docstring):
    kdfast.linear_cross_entropy(fp32_logits=True) against the peer's float32 reference and float64."""
    device = device_for(backend)
    for dtype, problem, reduction, ignore_index in flce_rows(backend):
        what = f"{problem} {dtype} {reduction} ignore_index={ignore_index}"
        generator = torch.Generator().manual_seed(0)
        hidden, weight, labels = flce_inputs(cut_problem(problem, backend), dtype, ignore_index, generator)
        h, w = leaf(hidden, device), leaf(weight, device)
        loss = kdfast.linear_cross_entropy(h, w, labels.to(device), reduction=reduction, ignore_index=ignore_index,
                                           fp32_logits=True, backend=backend)
        assert loss.dtype == FP32, what
        assert loss.shape == (labels.shape if reduction == "none" else ()), what
        upstream = torch.empty(loss.shape).uniform_(-0.1, 0.1, generator=generator)
        d_hidden, d_weight = torch.autograd.grad(loss, (h, w), upstream.to(device))
        try:
            check_linear_ce(hidden, weight, labels, reduction, ignore_index, upstream, loss, d_hidden, d_weight,
                            dtype)
        except AssertionError as error:
            raise AssertionError(f"{what}: {error}") from error


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_cross_entropy_kernel_launch(backend):
    """TestFusedLinearCrossEntropyDataParallel.test_kernel_launch: one randn head, randn hidden states of several
    token counts (the peer's 15, 26, 128, 513; 2048 and 8192 cut; under Triton's interpreter 15 and 26), bf16, "mean":
    no NaN in the loss or in d hidden, d weight under a randn upstream gradient. Vocabulary 152064 and hidden size
    4096 cut to 1520 and 64. Beyond the peer: the loss against float64 (float32 logits: within 1e-5 relative), the
    gradients within the bound of a 16-bit backward."""
    device = device_for(backend)
    generator = torch.Generator().manual_seed(0)
    vocab, dim = 1520, 64
    weight = torch.randn(vocab, dim, generator=generator).to(BF16)
    w = leaf(weight, device)
    counts = [15, 26] if backend == "triton" and INTERPRETED else [15, 26, 128, 513]
    for count in counts:
        hidden = torch.randn(count, dim, generator=generator).to(BF16)
        labels = torch.randint(0, vocab, (count,), generator=generator)
        h = leaf(hidden, device)
        loss = kdfast.linear_cross_entropy(h, w, labels.to(device), reduction="mean", ignore_index=-100,
                                           fp32_logits=True, backend=backend)
        assert not torch.isnan(loss).any(), count
        upstream = torch.randn(loss.shape, generator=generator)
        d_hidden, d_weight = torch.autograd.grad(loss, (h, w), upstream.to(device))
        assert not torch.isnan(d_hidden).any() and not torch.isnan(d_weight).any(), count
        expected64, grad64 = d_logits64(hidden, weight, labels, "mean", -100, upstream)
        close(loss, expected64, f"{count} tokens: loss", rtol=1e-5)
        within_16bit_gemm(d_hidden, grad64, weight, BF16, f"{count} tokens: d hidden")
        within_16bit_gemm(d_weight, grad64.T, hidden, BF16, f"{count} tokens: d weight")
