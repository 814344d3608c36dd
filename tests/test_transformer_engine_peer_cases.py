"""NVIDIA TransformerEngine's cross-entropy tests (NVIDIA/TransformerEngine:
tests/pytorch/test_parallel_cross_entropy.py, its `transformer_engine.pytorch.parallel_cross_entropy`) on
`kdfast.cross_entropy`, every backend. Its `dist_process_group` (never set by that file) is in
tests/test_transformer_engine_peer_cases_vocab_parallel.py.

What the peer computes (transformer_engine/pytorch/cross_entropy.py, pytorch/triton/cross_entropy.py and the kernels of
common/triton/cross_entropy.py), and the kdfast call that expresses it:
- `parallel_cross_entropy(inp, target, label_smoothing, reduce_loss, dist_process_group, ignore_idx)` takes logits
  (B, SQ, V) or (SQ, B, V) and targets (B, SQ) or (SQ, B) and returns a float32 loss:
  kdfast.cross_entropy(inp, target, label_smoothing=, reduction=, ignore_index=ignore_idx), which takes [..., V]
  logits and [...] labels as they are and returns "none"'s per-row losses in the labels' shape, as the peer does.
- `reduce_loss=True`: the sum of the per-row losses over the kept rows' count (its kernels count the rows whose
  target is not ignore_idx, at least 1; the docstring's "averaged across the B*SQ dimension" predates that), and the
  gradient scaled alike: kdfast's reduction="mean" (over the kept labels). `reduce_loss=False`: per-row losses, 0 and
  no gradient on ignored rows: reduction="none".
- `label_smoothing`: eps = label_smoothing / V on every class (V the global vocabulary: n_cols x world), the loss
  (1 - label_smoothing) CE + label_smoothing (lse - mean(x)): torch's definition, kdfast's `label_smoothing`.
- The gradient: the peer computes it in the forward in float32 and multiplies it by grad_output in float32 in the
  backward, rounded to the logits' dtype once (its pull request 3193, test_bfloat16_unreduced_external_grad). kdfast
  stores it in the logits' dtype in the forward and multiplies that by grad_output: for 16-bit logits and a
  grad_output other than 1, two roundings, one unit of the dtype apart from the peer's at some entries (README,
  "Checked against the peers' own tests"). The peer's bf16 tolerance (rtol 1.6e-2) absorbs this in
  TestParallelCrossEntropy; its exact test_bfloat16_unreduced_external_grad does not (`peer_exact_or_known`). (This
  port also found kdfast's C++ backend writing the label's entry as the stored, rounded p minus 1, rounded again:
  another unit at p = 1/3, far off with a confident label; fixed, tests/test_confident_label_gradient.py.)
- `is_cg_capturable` (CUDA graphs) and the deprecated `_input` keyword: the peer's file passes neither.

Inputs: the peer's. torch.rand (uniform [0, 1)) logits in the dtype, targets uniform in [0, V), and for the ignore
tests 5 of the first SQ - 1 positions of the first sequence set to -100 (random.sample, as the peer draws them).
The peer draws SQ (64 or 128), batch (1 or 2) and V (64000 or 128000) at random, unseeded, each iteration (1 to 5 of
them a test), and swap_dim at random in its two ignore tests. Here each test's iterations are cases that cover every
value it can draw (`iterations`): batch 1 with V 64000 and batch 2 with V 128000, and in the ignore tests each
swap_dim with both (batch 1 meeting both vocabularies). SQ cut to 12 (12 or 24 rows of the peer's vocabularies; its
64 to 256 rows of 128000 columns take seconds a case of float64 reference on this CPU); draws from one CPU generator
seeded 0 (and random.Random(0) for the positions). Under Triton's interpreter (~0.1 s a row at these vocabularies)
each test runs once, batch 1, V and swap_dim in turn, SQ 8.

Expectations: the peer's. Its reference, torch.nn.CrossEntropyLoss(label_smoothing=, reduction=) on a copy of the
logits in their dtype (run here on the CPU, the peer's on its GPU), both losses squared ("to avoid trivial backward
pass": the upstream gradient is 2 x loss, per row without reduction, whose sum is back-propagated), then the squared
loss and the logits' gradient within tests/pytorch/utils.py's dtype_tols: float32 rtol 1.3e-6, atol 1e-5; bf16
rtol 1.6e-2, atol 1e-5. Beside them, float64 on the same inputs (bf16's 1.6e-2 is loose): the loss before squaring
within 1e-6 relative, the gradient within `grad64_allowance` of tests/test_flash_attn_peer_cases.py (float32
statistics, then half a bf16 unit at each of kdfast's two roundings; a whole unit at the first under Triton's
interpreter, which truncates to bf16).

The peer's module-level tests, each on every backend: test_non_contiguous_transposed_input (its [4, 2, 8] logits
seeded 42, transposed so that stride(-2) != V, against the contiguous copy at allclose's defaults; and against
float64), test_bfloat16_unreduced_external_grad (exact: the logits untouched by the forward, the gradient equal to
float32 torch's cast to bf16), test_bfloat16_loss_matches_float32_input (its [1, 64, 64000] bf16 randn logits seeded
42, their per-row losses against those of the same values in float32 within 2 float32 epsilons; 8 of its 64 rows
under Triton's interpreter).

Left out: test_bfloat16_unreduced_external_grad's check that the peer saves one float32 tensor for its backward (its
fix's mechanism, not a result: kdfast saves the gradient in the logits' dtype, which is why its result differs).

Found: kdfast's bf16 gradient under a grad_output other than 1 is not the peer's single rounding (above):
test_bfloat16_unreduced_external_grad is xfailed on it, by name and only while every entry is within one bf16 unit
of the peer's (`peer_exact_or_known`); everything else passes at the peer's tolerances.
"""

import functools
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from test_flash_attn_peer_cases import (
    BF16,
    FP32,
    IGNORE,
    INTERPRETED,
    LOSS64_TOL,
    assert_close,
    assert_within,
    float32_error,
    grad64_allowance,
    spacing,
)

import kdfast

# The peer's SQ, 64 or 128, cut (module docstring); under Triton's interpreter 8; its 5 ignored positions.
SQ, INTERPRETED_SQ, IGNORED = 12, 8, 5
BATCHES, VOCABS = (1, 2), (64000, 128000)
# tests/pytorch/utils.py dtype_tols, the peer's tolerance for the squared loss and the gradient.
PEER_TOL = {FP32: dict(rtol=1.3e-6, atol=1e-5), BF16: dict(rtol=1.6e-2, atol=1e-5)}
# TestParallelCrossEntropy's tests: dtype, the swap_dim values it runs, label_smoothing, reduce_loss, ignore_idx.
PEER_TESTS = {
    "test_float32_input": (FP32, (False,), 0.0, True, False),
    "test_bfloat16_input": (BF16, (False,), 0.0, True, False),
    "test_swapped_input": (FP32, (True,), 0.0, True, False),
    "test_label_smoothing": (FP32, (False,), 0.1, True, False),
    "test_non_reduced_loss": (FP32, (False,), 0.0, False, False),
    "test_ignore_idx": (FP32, (False, True), 0.0, False, True),
    "test_ignore_idx_reduced_loss": (FP32, (False, True), 0.0, True, True),
}
KNOWN_ROUNDING = ("kdfast stores a 16-bit gradient in the logits' dtype and scales it by grad_output afterwards: "
                  "two roundings where the peer rounds once (module docstring)")


def interpreted(backend) -> bool:
    return backend == "triton" and INTERPRETED


def iterations(swaps) -> list:
    """(swap_dim, batch, V) of a test's cases: every value the peer draws, and every pair of them where it draws
    swap_dim too (its ignore tests)."""
    if len(swaps) == 1:
        return [(swaps[0], batch, vocab) for batch, vocab in zip(BATCHES, VOCABS)]
    # Batch 1 meets both vocabularies, once with each swap_dim.
    return [(False, 1, VOCABS[0]), (False, 2, VOCABS[1]), (True, 1, VOCABS[1]), (True, 2, VOCABS[0])]


def cases() -> list:
    """Each peer test's iterations (`iterations`) on the C++ and PyTorch backends; under Triton's interpreter each test
    once (batch 1, V and swap_dim in turn, INTERPRETED_SQ). Backends innermost: consecutive cases share the cached
    expectations."""
    listed = []
    for index, (test, (_, swaps, *_)) in enumerate(PEER_TESTS.items()):
        chosen = (swaps[index % len(swaps)], 1, VOCABS[index % 2])
        for swap, batch, vocab in dict.fromkeys(iterations(swaps) + [chosen]):
            for backend in BACKENDS:
                if not ((swap, batch, vocab) == chosen if interpreted(backend)
                        else (swap, batch, vocab) in iterations(swaps)):
                    continue
                listed.append(pytest.param(backend, test, swap, batch, vocab,
                                           id=f"{test}-{backend}-{'SQxB' if swap else 'BxSQ'}-B{batch}-V{vocab}"))
    return listed


def peer_draws(dtype, swap, ignore, batch, vocab, rows=SQ):
    """generate_input's logits and targets: rand in the dtype, (SQ, B, V) when swapped, 5 ignored positions of the
    first sequence (module docstring)."""
    gen, positions = torch.Generator().manual_seed(0), random.Random(0).sample(range(0, rows - 1), IGNORED)
    shape = (rows, batch) if swap else (batch, rows)
    logits = torch.rand(*shape, vocab, generator=gen, dtype=dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    if ignore:
        for position in positions:
            target[(position, 0) if swap else (0, position)] = IGNORE
    return logits, target


@functools.lru_cache(maxsize=2)
def expected(test, swap, batch, vocab, rows, truncating):
    """The case's draws; the peer's reference (torch in the logits' dtype: the squared loss and its gradient); float64's
    loss before squaring, gradient of the squared loss and that gradient's allowance. Cached: the backends share it."""
    dtype, _, smoothing, reduce_loss, ignore = PEER_TESTS[test]
    logits, target = peer_draws(dtype, swap, ignore, batch, vocab, rows)
    reduction, flat_target = "mean" if reduce_loss else "none", target.reshape(-1)

    peer_leaf = logits.reshape(-1, vocab).clone().requires_grad_(True)
    peer = torch.nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)(peer_leaf, flat_target).square()
    (peer if reduce_loss else peer.sum()).backward()

    leaf64 = logits.double().reshape(-1, vocab).requires_grad_(True)
    loss64 = F.cross_entropy(leaf64, flat_target, ignore_index=IGNORE, label_smoothing=smoothing, reduction=reduction)
    loss64.square().sum().backward()
    loss64 = loss64.detach()
    kept = (flat_target != IGNORE).sum().item()
    # d (loss^2) / d logits = upstream x (p - target) x the reduction's factor, upstream = 2 loss (per row: [N, 1]).
    upstream = 2 * loss64 if reduce_loss else (2 * loss64)[:, None]
    weight = upstream.abs() / kept if reduce_loss else upstream.abs()
    float32 = float32_error(leaf64.grad, smoothing / vocab * weight, weight)
    # Ignored rows (no upstream, no gradient) take any upstream: the allowance is 0 there whatever it is.
    rounding_upstream = upstream.item() if reduce_loss else upstream.masked_fill(upstream == 0, 1.0)
    return SimpleNamespace(
        logits=logits, target=target, reduction=reduction, smoothing=smoothing,
        peer_loss=peer.detach().double(), peer_grad=peer_leaf.grad.float(),
        loss64=loss64 if reduce_loss else loss64.view(target.shape), grad64=leaf64.grad.float(),
        grad64_allowance=grad64_allowance(leaf64.grad, dtype, float32, rounding_upstream, 2, truncating).float())


@pytest.mark.parametrize("backend, test, swap, batch, vocab", cases())
def test_parallel_cross_entropy(backend, test, swap, batch, vocab):
    """TestParallelCrossEntropy's test_* (`test`): one iteration of its one_iteration_test. kdfast's squared loss and
    its gradient against the peer's reference at dtype_tols, and against float64 (module docstring)."""
    dtype = PEER_TESTS[test][0]
    truth = expected(test, swap, batch, vocab, INTERPRETED_SQ if interpreted(backend) else SQ,
                     truncating=interpreted(backend))
    device = device_for(backend)
    leaf = truth.logits.clone().to(device).requires_grad_(True)  # the cached draws stay as drawn
    loss = kdfast.cross_entropy(leaf, truth.target.to(device), label_smoothing=truth.smoothing,
                                reduction=truth.reduction, ignore_index=IGNORE, backend=backend)
    assert loss.dtype == FP32
    assert loss.shape == (() if truth.reduction == "mean" else truth.target.shape)
    assert_close("loss (float64)", loss, truth.loss64, **LOSS64_TOL)
    squared = loss.square()
    (squared if truth.reduction == "mean" else squared.sum()).backward()
    assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype
    grad = leaf.grad.reshape(-1, vocab)
    assert_close("squared loss (peer)", squared.reshape(-1), truth.peer_loss.reshape(-1), **PEER_TOL[dtype])
    assert_close("gradient (peer)", grad, truth.peer_grad, **PEER_TOL[dtype])
    assert_within("gradient (float64)", grad, truth.grad64, truth.grad64_allowance)


def float64_rows(logits, target):
    """torch's per-row cross-entropy of [..., V] logits in float64, shaped like the target."""
    return F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(target.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_transposed_input(backend):
    """test_non_contiguous_transposed_input: logits [s, b, v] transposed to [b, s, v] (stride(-2) != v) give the
    contiguous copy's per-row losses (allclose's defaults, the peer's), and float64's."""
    s, b, v = 4, 2, 8
    gen = torch.Generator().manual_seed(42)
    logits = torch.randn(s, b, v, generator=gen)
    target = torch.randint(0, v, (b, s), generator=gen)
    device = device_for(backend)
    transposed = logits.to(device).transpose(0, 1)
    contiguous = transposed.contiguous()
    assert transposed.stride(-1) == 1
    assert transposed.stride(-2) != transposed.shape[-1]
    loss_t = kdfast.cross_entropy(transposed, target.to(device), reduction="none", backend=backend)
    loss_c = kdfast.cross_entropy(contiguous, target.to(device), reduction="none", backend=backend)
    assert torch.allclose(loss_t, loss_c), f"transposed {loss_t} against contiguous {loss_c}"
    assert_close("transposed rows (float64)", loss_t, float64_rows(contiguous.cpu(), target), **LOSS64_TOL)


def peer_exact_or_known(what, found, expected, grad64, truncating):
    """The peer's exact comparison of a bf16 gradient under a grad_output other than 1. Where it fails only by kdfast's
    second rounding (every differing entry within one bf16 unit of the peer's value; two under Triton's interpreter,
    which truncates at both; kdfast within its own float64 allowance, checked before), the case is xfailed by name
    (KNOWN_ROUNDING); any other difference fails."""
    found = found.detach().cpu().float()
    if torch.equal(found, expected):
        return
    off = (found - expected).abs()
    units = off / spacing(grad64.double().abs().clamp_min(expected.double().abs()), BF16).float()
    if units.max() <= (2.0 if truncating else 1.0):
        pytest.xfail(f"{what}: {int((off > 0).sum())} entries one bf16 unit from the peer's (largest "
                     f"{off.max().item():.3g}): {KNOWN_ROUNDING}")
    raise AssertionError(f"{what}: {found} against {expected}, up to {units.max().item():.3g} bf16 units")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_unreduced_external_grad(backend):
    """test_bfloat16_unreduced_external_grad: bf16 zeros [2, 2, 3], per-row losses under an external per-token
    gradient. The forward leaves the logits as they were (exact); the gradient is float32 torch's cast to bf16 once,
    exactly (the peer's), and within float64's allowance of two roundings (kdfast's)."""
    device = device_for(backend)
    logits = torch.zeros(2, 2, 3, dtype=BF16, device=device, requires_grad=True)
    target = torch.tensor([[0, 1], [2, IGNORE]])
    external = torch.tensor([[0.01, 0.03], [0.1, 0.7]])
    before = logits.detach().clone()
    loss = kdfast.cross_entropy(logits, target.to(device), reduction="none", backend=backend)
    torch.testing.assert_close(logits.detach(), before, rtol=0.0, atol=0.0)
    loss.backward(external.to(device))

    reference = before.cpu().float().requires_grad_(True)
    F.cross_entropy(reference.reshape(-1, 3), target.reshape(-1), reduction="none").view(target.shape).backward(
        external)
    leaf64 = before.cpu().double().requires_grad_(True)
    float64_rows(leaf64, target).backward(external.double())
    rows = external.double().reshape(-1, 1)
    allowance = grad64_allowance(leaf64.grad.reshape(-1, 3), BF16, float32_error(leaf64.grad.reshape(-1, 3), 0.0,
                                 rows), rows, 2, interpreted(backend))
    assert_within("gradient (float64)", logits.grad.reshape(-1, 3), leaf64.grad.reshape(-1, 3).float(),
                  allowance.float())
    peer_exact_or_known("gradient (peer, exact)", logits.grad, reference.grad.to(BF16).float(), leaf64.grad,
                        interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_loss_matches_float32_input(backend):
    """test_bfloat16_loss_matches_float32_input: bf16 randn [1, 64, 64000] seeded 42 and the same values in float32
    give per-row losses within 2 float32 epsilons (rtol and atol, the peer's); and float64's (8 rows under Triton's
    interpreter)."""
    gen = torch.Generator().manual_seed(42)
    logits = torch.randn(1, 64, 64000, dtype=BF16, generator=gen)
    target = torch.randint(0, logits.size(-1), logits.shape[:-1], generator=gen)
    if interpreted(backend):
        logits, target = logits[:, :8], target[:, :8]
    device = device_for(backend)
    bf16_loss = kdfast.cross_entropy(logits.to(device), target.to(device), reduction="none", backend=backend)
    fp32_loss = kdfast.cross_entropy(logits.float().to(device), target.to(device), reduction="none", backend=backend)
    eps = torch.finfo(FP32).eps
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=2 * eps, atol=2 * eps)
    assert_close("bf16 rows (float64)", bf16_loss, float64_rows(logits, target), **LOSS64_TOL)
