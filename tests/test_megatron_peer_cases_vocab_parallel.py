"""NVIDIA Megatron-LM's tensor-parallel cross-entropy tests on kdfast's vocab-parallel cross-entropy, over
torch.distributed (gloo, CPU, 4 ranks); the TP = 1 cases are in tests/test_megatron_peer_cases.py, whose module
docstring says how Megatron's losses map onto kdfast.

Megatron's vocabulary split: rank r of a TP group of size t holds the contiguous columns [r V / t, (r + 1) V / t)
of the logits (the rows of the output layer's weight), labels are global ids, every rank returns the same per-token
loss and the gradient of its own columns. kdfast: `process_group` = the TP group, `vocab_range` left to its default
(equal contiguous shards in rank order: Megatron's); the same loss on every rank, the gradient of this rank's shard.
Megatron runs its TP groups inside a larger world (`Utils.initialize_model_parallel(tp, pp)` on 8 GPUs); here a TP
of 2 is two groups of the 4 ranks, {0, 1} and {2, 3}, each running the case, and a TP of 4 the whole world.

Ported (every backend that runs on the CPU: "torch", the C++ "cpu", Triton under its interpreter on the smaller
cases):
- tests/unit_tests/tensor_parallel/test_cross_entropy.py: test_vocab_parallel_cross_entropy at the peer's TP = 4:
  each rank's logits range(8) repeated over 32 columns, 16 rows, targets 0, 2, ..., 30 (all in rank 0's range): the
  golden values after torch.round as the peer, within their 4 decimals, and the float64 port of Megatron's TP
  arithmetic (`megatron_ce64`, its all-reduces over the group), with the gradient shards (the peer has none);
  test_vocab_parallel_cross_entropy_uses_explicit_tp_group: the peer counts the all-reduces made on the group it
  passes (its size 1) and forbids the default group; here every rank passes a group of its own (size 1) and its own
  logits, and gets F.cross_entropy of them at assert_close's defaults, which a collective over the default group
  (all 4 ranks) would not give; test_vocab_parallel_cross_entropy_label_smoothing (pull request 5522) at its TP = 2:
  alpha 0.2 as kdfast's label_smoothing 0.2 * 8 / 7, the loss and the gradient shard against the dense reference at
  rtol 1e-5, atol 1e-6.
- The legacy mpu test (megatron/mpu/tests/test_cross_entropy.py) at TP = 2 and 4: 11 columns a rank, logits 1000 x
  randn(13, 17, 11 t) from seed 1234, each rank its columns (the peer's scatter to the TP region), the mean of the
  per-token losses and the whole gradient (the shards all-gathered, as the scatter's backward gathers them) within
  1e-6 of F.cross_entropy's. Not under Triton's interpreter: the peer's 13 x 17 tokens take about ten seconds a case
  there, and fewer tokens would change the peer's bound (on the gradient of the mean: 1/N of a token's).
- tests/unit_tests/fusions/test_liger_cross_entropy.py (pull request 5438):
  test_liger_ce_matches_unfused_vocab_parallel_tp2 (seed 0, [8, 4, 32], float32 at 1e-4, bf16 at rtol 2e-2, atol
  1e-2, the loss and the gradient shard) against Megatron's unfused vocab_parallel_cross_entropy, here its arithmetic
  in float64 over the same group; beyond the peer, within 1e-6 and a bf16 unit of it. Under Triton's interpreter the
  first 2 of the 8 positions.
- tests/unit_tests/fusions/test_fused_linear_cross_entropy.py (dev branch), TestFusedLinearCrossEntropyTensorParallel
  .test_correctness (`linear_cross_entropy(hidden, weight, labels, tp_group=, reduction=)`, each rank a head of
  `vocabsize` rows, the hidden states and labels alike on every rank; bf16 and fp16; none / mean / sum; the loss at
  assert_close's float32 defaults, d hidden at 1e-3, d weight at 1e-4) on 4 ranks: kdfast.linear_cross_entropy(...,
  process_group, fp32_logits=True) with its default `reduce_hidden_grad=True` (every rank the whole d hidden, as the
  peer's). The peer's labels are drawn below the per-rank `vocabsize`, so every target lies in rank 0's rows; kept,
  and one case more with labels over the whole vocabulary. ...SequenceParallel.test_correctness (each rank its own
  tokens, the labels of all of them on every rank; d hidden of its own tokens; 1e-3 on both gradients): kdfast has
  no sequence-parallel switch; the caller all-gathers the hidden states, calls the TP form with
  `reduce_hidden_grad=False`, and reduce-scatters d hidden (in float32) back to the ranks' tokens, Megatron's own
  communication. The expectation in both is the full-vocabulary float32 computation (which the peer's
  test_torch_tp_vs_single_gpu / _sp_ equates with its TP torch reference at the same tolerances), and float64
  within the bound of a 16-bit backward. The peer's problems are cut further than in the TP = 1 file, for 4 ranks
  sharing 2 cores (`VP_CUTS`): 32 tokens a rank in TP, 16 in SP (the shapes' leading dimensions kept), the hidden
  size to 64, a rank's vocabulary of 125 kept, of 152064 cut to 3801 in the first large problem (the TP = 1 file's
  15206, over 4 ranks) and to 380 in the others (381 for the odd 152063; the SP problems' 15206 to 380 as well).
  Each problem under two reductions, every (dtype, reduction) pair met; under Triton's interpreter the first three
  problems, one reduction each, 8 tokens (SP: 2 a rank).

Left out: test_language_module_unfused_loss_passes_tp_group (the TP = 1 file ports its layout); the fused linear
CE's GPT-model, latency and memory tests and its torch-reference-against-one-GPU tests (they test the peer's
reference; its equality with the full-vocabulary computation is what the expectations here rest on).
"""

import itertools

import pytest
import torch
import torch.distributed as dist
from conftest import BACKENDS, device_for
from liger_cases import INTERPRETED
from rank_cases import failures, spawn_gloo_cases
from test_megatron_peer_cases import (
    ALPHA,
    BF16,
    FP16,
    FP32,
    GOLDEN,
    SMOOTHING_LOGITS,
    SMOOTHING_TARGET,
    close,
    d_logits64,
    golden_shard,
    kdfast_smoothing,
    liger_inputs,
    linear_ce_reference,
    megatron_ce64,
    mpu_inputs,
    smoothed_reference64,
    torch_ce_rows,
    within_16bit_gemm,
    within_units,
)

import kdfast

WORLD = 4
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors
SLOW = "triton" if INTERPRETED else None  # the interpreter's backend: its smaller share of the cases
GROUPS = {}  # this rank's groups by size, made once on every rank before the cases run (new_group is collective)

# The fused linear CE's (tokens a rank, vocabulary a rank, dim): the peer's TP problems and SP problems, cut.
TP_CUTS = {(80, 125, 64): (32, 125, 64), (80, 152064, 64): (32, 3801, 64), (1024, 152064, 4096): (32, 380, 64),
           (4096, 152063, 8192): (32, 381, 64), ((1, 4096), 152064, 8192): ((1, 32), 380, 64),
           ((2, 4096), 152064, 8192): ((2, 16), 380, 64)}
SP_CUTS = {(80, 125, 64): (16, 125, 64), (80, 152064, 64): (16, 3801, 64), (1024, 152064, 4096): (16, 380, 64),
           (4096, 15206, 1024): (16, 380, 64), ((1, 4096), 15206, 1024): ((1, 16), 380, 64),
           ((4, 1024), 15206, 1024): ((4, 4), 380, 64)}
VP_CUTS = {"tp": TP_CUTS, "sp": SP_CUTS}
REDUCTIONS = ["none", "mean", "sum"]


def make_groups():
    """Every rank makes every group, in the same order: size 1 (each rank alone), 2 ({0, 1}, {2, 3}), 4 (WORLD)."""
    rank = dist.get_rank()
    for size in (1, 2):
        made = [dist.new_group(list(range(start, start + size))) for start in range(0, WORLD, size)]
        GROUPS[size] = made[rank // size]
    GROUPS[WORLD] = dist.group.WORLD


def shard_of(tensor, group):
    """This rank's equal contiguous share of the last dimension (Megatron's vocabulary split), and its range."""
    part = tensor.shape[-1] // dist.get_world_size(group)
    start = dist.get_rank(group) * part
    return tensor[..., start:start + part], (start, start + part)


def golden_case(backend):
    """test_vocab_parallel_cross_entropy at the peer's TP = 4."""
    group = GROUPS[4]
    shard, target = golden_shard()
    x = shard.clone().requires_grad_(True)
    loss = kdfast.cross_entropy(x, target, reduction="none", backend=backend, process_group=group)
    golden = torch.tensor(GOLDEN)
    assert torch.equal(torch.round(golden), torch.round(loss.detach())), loss
    close(loss, golden, "golden values", rtol=0, atol=5e-5 + 1e-6)
    upstream = torch.linspace(0.5, 1.5, 16)
    expected, grad = megatron_ce64(shard, target, group=group, grad_output=upstream)
    close(loss, expected, "Megatron's TP arithmetic in float64", rtol=1e-6, atol=1e-5)
    (loss * upstream).sum().backward()
    close(x.grad, grad, "gradient shard")


def explicit_group_case(backend):
    """test_vocab_parallel_cross_entropy_uses_explicit_tp_group: the group passed, not the default one, is used."""
    group, rank = GROUPS[1], dist.get_rank()
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -0.5, 1.0]]) * (rank + 1)  # each rank its own logits
    target = torch.tensor([2, 0])
    expected = torch.nn.functional.cross_entropy(logits.clone(), target, reduction="none")
    output = kdfast.cross_entropy(logits, target, reduction="none", backend=backend, process_group=group)
    torch.testing.assert_close(output, expected)


def label_smoothing_case(backend):
    """test_vocab_parallel_cross_entropy_label_smoothing at the peer's TP = 2."""
    group = GROUPS[2]
    full = torch.tensor(SMOOTHING_LOGITS)
    target = torch.tensor(SMOOTHING_TARGET)
    shard, (start, stop) = shard_of(full, group)
    reference_logits = full.double().requires_grad_(True)
    reference = smoothed_reference64(reference_logits, target, ALPHA)
    reference.sum().backward()
    megatron, megatron_grad = megatron_ce64(shard, target, ALPHA, group, grad_output=torch.ones(4))
    close(megatron, reference, "Megatron's TP arithmetic vs the dense reference", rtol=1e-12, atol=1e-12)
    close(megatron_grad, reference_logits.grad[:, start:stop], "Megatron's TP backward", rtol=1e-12, atol=1e-12)

    leaf = shard.clone().requires_grad_(True)
    loss = kdfast.cross_entropy(leaf + 0.0, target, reduction="none", backend=backend, process_group=group,
                                label_smoothing=kdfast_smoothing(ALPHA, full.shape[-1]))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    close(loss, reference, "loss")
    close(leaf.grad, reference_logits.grad[:, start:stop], "gradient shard")


def mpu_case(backend, tp):
    """The legacy mpu test_cross_entropy at TP = tp."""
    group = GROUPS[tp]
    logits, target = mpu_inputs(11 * tp)
    torch_logits = logits.clone().requires_grad_(True)
    loss_torch = torch_ce_rows(torch_logits, target).mean()
    loss_torch.backward()
    shard, _ = shard_of(logits, group)
    x = shard.clone().requires_grad_(True)
    loss = kdfast.cross_entropy(x, target, reduction="none", backend=backend, process_group=group).mean()
    loss.backward()
    gathered = [torch.empty_like(x.grad) for _ in range(tp)]
    dist.all_gather(gathered, x.grad.contiguous(), group=group)
    error = (loss.detach() - loss_torch).abs().max().item()
    assert error < 1.0e-6, f"loss: {error}"
    error = (torch.cat(gathered, -1) - torch_logits.grad).abs().max().item()
    assert error < 1.0e-6, f"gradient: {error}"


def liger_tp2_case(backend, dtype):
    """test_liger_ce_matches_unfused_vocab_parallel_tp2."""
    group = GROUPS[2]
    full, target = liger_inputs(dtype, 32)
    if backend == SLOW:  # the interpreter's cut: the first 2 of the 8 positions
        full, target = full[:2], target[:2]
    shard, _ = shard_of(full, group)
    x = shard.clone().requires_grad_(True)
    loss = kdfast.cross_entropy(x, target, reduction="none", backend=backend, process_group=group)
    upstream = torch.ones(target.shape)
    expected, grad = megatron_ce64(shard, target, group=group, grad_output=upstream)
    tols = dict(rtol=1e-4, atol=1e-4) if dtype is FP32 else dict(rtol=2e-2, atol=1e-2)
    # Megatron's unfused loss is float32 and its gradient cast to the logits' dtype by autograd.
    torch.testing.assert_close(loss.float(), expected.float(), **tols)
    loss.sum().backward()
    torch.testing.assert_close(x.grad.float(), grad.to(dtype).float(), **tols)
    close(loss, expected, "loss vs float64", rtol=1e-6, atol=1e-6)
    within_units(x.grad, grad, dtype, "gradient shard vs float64", units=1.0 if dtype is BF16 else 8.0)


def vp_rows(mode, backend):
    """A covering set of the peer's dtype x problem x reduction: each problem under two reductions, the dtypes in
    turn under each reduction; under Triton's interpreter the first three problems, one reduction each."""
    problems = list(VP_CUTS[mode])
    rows = []
    for r, reduction in enumerate(REDUCTIONS):
        having = [p for p in range(len(problems)) if r in (p % 3, (p + 1) % 3)]
        for i, p in enumerate(having):
            if backend == SLOW and (r != p % 3 or p >= 3):
                continue
            rows.append((mode, problems[p], (BF16, FP16)[i % 2], reduction, False))
    if mode == "tp" and backend != SLOW:  # beyond the peer: targets in every rank's rows
        rows.append((mode, problems[0], BF16, "none", True))
    return rows


def vp_cut(mode, problem, backend):
    """The CPU's cut of a peer problem; under Triton's interpreter 8 tokens in all (TP: a rank's; SP: 2 a rank)."""
    tokens, vocab, dim = VP_CUTS[mode][problem]
    if backend == SLOW:
        count = 8 if mode == "tp" else 2
        tokens = count if isinstance(tokens, int) else (1, count)
    return tokens, vocab, dim


def linear_case(backend, mode, problem, dtype, reduction, global_labels):
    """TestFusedLinearCrossEntropyTensorParallel (mode "tp") / SequenceParallel ("sp") .test_correctness."""
    group, rank = GROUPS[WORLD], dist.get_rank()
    tokens, vocab, dim = vp_cut(mode, problem, backend)
    shape = (tokens,) if isinstance(tokens, int) else tokens
    # The whole inputs on every rank from one generator (the peer broadcasts rank 0's hidden states and labels and
    # draws each rank's head; here each rank takes its rows of one head).
    generator = torch.Generator().manual_seed(0)
    token_shape = shape if mode == "tp" else (shape[0] * WORLD, *shape[1:])
    hidden = torch.empty(*token_shape, dim, dtype=dtype).uniform_(-0.1, 0.1, generator=generator)
    weight = torch.empty(vocab * WORLD, dim, dtype=dtype).uniform_(-0.1, 0.1, generator=generator)
    labels = torch.randint(0, vocab * WORLD if global_labels else vocab, token_shape, generator=generator)
    rows = slice(rank * vocab, (rank + 1) * vocab)
    w = weight[rows].clone().requires_grad_(True)
    settings = dict(reduction=reduction, fp32_logits=True, backend=backend, process_group=group)
    if mode == "tp":
        h = hidden.clone().requires_grad_(True)
        loss = kdfast.linear_cross_entropy(h, w, labels, **settings)
    else:
        # Sequence parallel: this rank's tokens, gathered; the TP call; d hidden reduce-scattered to the tokens.
        local = hidden.reshape(WORLD, -1, dim)[rank].clone().requires_grad_(True)
        whole = torch.empty(WORLD * local.shape[0], dim, dtype=dtype)
        dist.all_gather_into_tensor(whole, local.detach(), group=group)
        whole.requires_grad_(True)
        loss = kdfast.linear_cross_entropy(whole, w, labels.reshape(-1), reduce_hidden_grad=False, **settings)
    assert loss.dtype == FP32
    upstream = torch.empty(loss.shape).uniform_(-0.1, 0.1, generator=generator)
    if mode == "tp":
        d_hidden, d_weight = torch.autograd.grad(loss, (h, w), upstream)
    else:
        d_whole, d_weight = torch.autograd.grad(loss, (whole, w), upstream)
        summed = torch.empty(local.shape, dtype=FP32)
        dist.reduce_scatter_tensor(summed, d_whole.float(), group=group)
        d_hidden = summed.to(dtype)

    # The peer's expectation: the full-vocabulary float32 computation, this rank's rows of d weight (and in SP its
    # tokens' rows of d hidden).
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = linear_ce_reference(h32, w32, labels, reduction)
    torch.testing.assert_close(loss.detach().view(expected.shape), expected.detach())
    g_h, g_w = torch.autograd.grad(expected, (h32, w32), upstream.view(expected.shape))
    own = slice(None) if mode == "tp" else slice(rank * local.shape[0], (rank + 1) * local.shape[0])
    torch.testing.assert_close(d_hidden.reshape(-1, dim), g_h.reshape(-1, dim)[own], atol=1e-3, rtol=1e-3)
    weight_tol = 1e-4 if mode == "tp" else 1e-3
    torch.testing.assert_close(d_weight, g_w[rows], atol=weight_tol, rtol=weight_tol)

    expected64, grad64 = d_logits64(hidden, weight, labels, reduction, -100, upstream)
    close(loss.view(expected64.shape), expected64, "loss vs float64", rtol=1e-6, atol=1e-6)
    hidden64 = hidden.reshape(-1, dim)
    within_16bit_gemm(d_hidden, grad64[own], weight, dtype, "d hidden vs float64")
    within_16bit_gemm(d_weight, grad64.T[rows], hidden64, dtype, "d weight vs float64")


def cases() -> dict:
    listed = {}
    for backend in VP_BACKENDS:
        listed[f"golden-tp4-{backend}"] = (golden_case, backend)
        listed[f"explicit_group-{backend}"] = (explicit_group_case, backend)
        listed[f"label_smoothing-tp2-{backend}"] = (label_smoothing_case, backend)
        for tp in (2, 4):
            if backend != SLOW:  # the peer's 221 tokens take ~10 s a case under the interpreter (module docstring)
                listed[f"mpu-tp{tp}-{backend}"] = (mpu_case, backend, tp)
        for dtype in (FP32, BF16):
            listed[f"liger-tp2-{str(dtype).removeprefix('torch.')}-{backend}"] = (liger_tp2_case, backend, dtype)
        for mode, problem, dtype, reduction, global_labels in itertools.chain(vp_rows("tp", backend),
                                                                               vp_rows("sp", backend)):
            name = (f"linear_ce-{mode}-{problem}-{str(dtype).removeprefix('torch.')}-{reduction}"
                    f"{'-global_labels' if global_labels else ''}-{backend}").replace(" ", "")
            listed[name] = (linear_case, backend, mode, problem, dtype, reduction, global_labels)
    return listed


def cases_to_run() -> dict:
    make_groups()
    return cases()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases_to_run, WORLD, tmp_path_factory.mktemp("megatron_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_megatron_tensor_parallel(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed
