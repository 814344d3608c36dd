"""The peers' newest cases not yet ported, for behaviour kdfast shares, run on every kdfast backend (the earlier ports:
tests/test_liger_*_cases.py with tests/liger_cases.py, tests/test_sparse_peer_cases.py and
tests/test_sparse_peer_cases_more.py). Peer inputs (their seeds and draw order; a GPU-only peer's CUDA draws are drawn
here on the CPU, so the same recipe with other numbers), their tolerances and expectations; kdfast under test.

Liger-Kernel (linkedin/Liger-Kernel at ead96b6, 2026-08-21):
- test/transformers/test_fused_linear_scaled_cross_entropy.py (b304c89, #1359; the frontend a3f3654, #1354) and
  test/cutedsl/test_fused_scaled_cross_entropy_sm90.py (62b691b, #1370): the fused linear "scaled" cross-entropy,
  verl's FusedLinearForPPO: per token NLL = -log q(target) and the entropy of q at a temperature, q = softmax(x W^T /
  T), both differentiable to x and W. That is kdfast's `linear_token_logprobs(..., temperature=T,
  return_entropy=True)` (NLL = -log-prob). kdfast takes token ids in [0, V) and refuses -100, so an ignored row is
  given as Liger's own fallback gives it to its kernel (id 0, `masked_fill`) and its outputs are zeroed by
  `torch.where`, as Liger's fallback zeroes them: the upstream gradient reaching kdfast at those rows is then 0, and
  the peers' "ignored rows get no gradient" is kdfast's backward giving exactly 0 (and no NaN) for rows whose upstream
  gradient is 0. Liger returns a 16-bit entropy for 16-bit inputs, kdfast a float32 one: the values are compared.
  Ported: test_frontend_fallback_matches_torch_with_entropy_and_ignored_rows,
  test_frontend_fallback_returns_only_nll_when_entropy_is_disabled,
  test_frontend_fallback_supports_entropy_only_backward,
  test_cutile_matches_verl_fallback_forward_and_combined_backward (V 131072 cut to 4096 on a CPU, its several chunks
  kept with chunk_size=256), test_cutile_supports_single_output_backward, test_cutile_rejects_out_of_range_target,
  test_sm90_per_token_nll_and_grads_match_torch, test_sm90_temperature_matches_torch,
  test_sm90_differentiable_entropy_matches_torch, test_sm90_entropy_only_backward_matches_torch,
  test_sm90_matches_verl_fused_ppo_formulas (verl's closed-form gradient, float64),
  test_sm90_ignored_entropy_rows_stay_zero_with_large_logits, test_sm90_ignore_index_rows_are_zero,
  test_sm90_zero_grad_rows_produce_zero_dx, test_sm90_all_ignored_is_zero,
  test_sm90_many_wave_dw_matches_torch_within_bf16_accumulation_error (kdfast's row chunks for the waves),
  test_sm90_sum_reduction_composed_in_autograd, and test_sm90_rejects_bad_dtypes_shapes_and_options' temperature and
  shape checks.
- test/cutedsl/test_fused_linear_cross_entropy.py (6470a51, #1339), test/transformers/
  test_cutile_fused_linear_cross_entropy_sm90.py and test_cutedsl_fused_linear_cross_entropy_sm90.py (9d04571, #1356):
  kdfast's fused linear CE term (`kd_weight=0, ce_weight=1`, as in tests/test_liger_linear_cross_entropy_cases.py).
  Their oracle is Liger's Triton kernel or torch; here always torch's formula, written again in float64 from the same
  (rounded) inputs, the logits rounded as the peer's reference rounds them. Ported: test_flce_core_matches_torch,
  test_flce_not_last_layer_grad_matches_triton (the plain, bias, label-smoothing and z-loss rows),
  test_flce_independent_requires_grad_matches_torch with cuTile's test_independent_gradient_requirements,
  test_flce_repeated_backward_recomputes_full_feature_gradients, test_retained_backward_preserves_saved_gradient,
  test_sm90_fused_linear_cross_entropy_repeated_backward, test_flce_odd_vocab_padding_cannot_become_softmax_max,
  test_flce_all_ignored_targets_are_valid, cuTile's test_correctness, test_sm90_fused_linear_cross_entropy and
  test_large_token_grid.
- test/cutedsl/test_cross_entropy.py (08e8ccd, #1337; 4d899a0, #1290): kdfast's CE term on logits.
  Ported: test_ce_noncontiguous_input_matches_triton, test_ce_token_accuracy_matches_triton (targets boosted to 50),
  test_ce_all_ignored_matches_triton, test_ce_reduction_none_perrow_grad_matches_triton.

axolotl (axolotl-ai-cloud/axolotl at 067b021, 2026-07-24): tests/integrations/test_kd_topk_forward_kl.py (e27f9b2):
test_bf16_student_logits (its other five tests are in tests/test_sparse_peer_cases_more.py).

Not ported, and why:
- Liger's JSD, KL-div, TVD, fused linear JSD, chunked JSD loss, cross-entropy and fused linear CE tests in
  test/transformers and test/chunked_loss: every case kdfast shares is already in tests/test_liger_*_cases.py; what the
  newest commits there add has no kdfast counterpart (accum_dtype, e9bbef0 #1322; predicted tokens, 9c1ddb7 #1091;
  class weights; token scaling). KL-div's log_target=True fed probabilities, TVD's bf16 rows: as before.
- test/chunked_loss: no KL-div, multi-teacher or top-k distillation loss exists there; test_cosine_loss.py is a cosine
  similarity loss (no kdfast divergence), the others preference/RL losses.
- The cuteDSL/cuTile suites' parity-with-Triton rows that repeat behaviour the earlier ports hold to torch (production
  vocab, ragged row tiles, softcap, z-loss, label smoothing, forward only) and their kernel-internals tests (tile sizes,
  workspaces, dispatch, compile caches, one-kernel backward, device routing); their class weights, token scaling,
  accum_dtype and predicted tokens; their dtype contracts (bf16 only, int64 targets: kdfast also takes fp32 / fp16 and
  int32 ids); Liger's refusal of reduction="none" in the native FLCE (kdfast has it).
- axolotl's tests/integrations/test_kd_trainer_direct_loss.py (AxolotlKDTrainer.compute_loss with a MagicMock loss,
  lm-head lookup through PEFT wrappers), test_kd_chat_template.py (its dataset strategy), tests/e2e/integrations/
  test_kd.py (training a downloaded model on a GPU): axolotl's trainer and data plumbing, not a loss kdfast shares.

A second backward through a retained graph (test_flce_repeated_backward_recomputes_full_feature_gradients,
test_retained_backward_preserves_saved_gradient, test_sm90_fused_linear_cross_entropy_repeated_backward): kdfast
computes the gradient in the forward and scales the kept gradient in place in the backward (kdfast/saved_gradient.py),
so it answers a second backward as Liger does where the first was seeded with 1 on the CPU, and otherwise refuses it
with its own RuntimeError (README, "Use"); the port holds it to that: Liger's answer where kdfast gives one, the
clear refusal where it does not.

Run sizes: the peers' shapes, except under Triton's interpreter (about 30 ms a row and pass), where a case keeps 12 of
its rows (its first six and last six, so that its ignored rows stay among them), and test_large_token_grid runs on the
other backends only.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import BF16, F64, FP16, FP32, INTERPRETED, as_leaf, ce_with_z_loss, close, leaf, rounded_head, verify
from test_liger_cross_entropy_cases import ce_reference, kdfast_ce
from test_liger_linear_cross_entropy_cases import kdfast_flce
from test_sparse_peer_cases import axolotl_inputs
from test_sparse_peer_cases_more import as_padding, axolotl_reference_loss

import kdfast

CAP = 12  # rows a case keeps under Triton's interpreter


def some_rows(backend, n, cap=CAP):
    """All n rows, or under Triton's interpreter the first cap // 2 and the last cap - cap // 2."""
    if backend != "triton" or not INTERPRETED or n <= cap:
        return torch.arange(n)
    return torch.cat([torch.arange(cap // 2), torch.arange(n - (cap - cap // 2), n)])


def rel_max_error(actual, expected):
    """The sm90 suites' measure: max |actual - expected| over max |expected|."""
    expected = expected.detach().cpu().double()
    return ((actual.detach().cpu().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-9)).item()


# ================================================================================================================
# Liger: fused linear scaled cross-entropy (per-token NLL and entropy) -> kdfast.linear_token_logprobs
# ================================================================================================================


def scaled_ce(backend, x, w, target, temperature=1.0, return_entropy=True, ignore_index=-100, chunk_size="auto"):
    """Liger's (nll, entropy) from kdfast: ignored rows given id 0 and zeroed after, as Liger's fallback does (module
    docstring); also kdfast's own outputs, (log-probs, entropy), unmasked."""
    valid = target != ignore_index
    out = kdfast.linear_token_logprobs(x, w, target.masked_fill(~valid, 0), temperature=temperature,
                                       return_entropy=return_entropy, chunk_size=chunk_size, backend=backend)
    logq, entropy = out if return_entropy else (out, None)
    nll = torch.where(valid, -logq, torch.zeros_like(logq))
    masked_entropy = torch.where(valid, entropy, torch.zeros_like(entropy)) if return_entropy else None
    return nll, masked_entropy, (logq, entropy)


def scaled_ce_reference(x, w, target, temperature, grad_nll, grad_entropy, precision, ignore_index=-100):
    """Liger's torch reference (_reference_nll_entropy; its fallback's formulas) in `precision` from the inputs'
    values: (nll, entropy, d x, d w) for the upstream gradients given (None: that output gets none)."""
    h, v = as_leaf(x, precision), as_leaf(w, precision)
    log_probs = ((h @ v.T) / temperature).log_softmax(-1)
    valid = target != ignore_index
    nll = -log_probs.gather(-1, target.masked_fill(~valid, 0)[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    nll, entropy = (torch.where(valid, t, torch.zeros_like(t)) for t in (nll, entropy))
    outputs = [(o, g.to(precision)) for o, g in ((nll, grad_nll), (entropy, grad_entropy)) if g is not None]
    if outputs:
        torch.autograd.backward([o for o, _ in outputs], [g for _, g in outputs])
    return nll.detach(), entropy.detach(), h.grad, v.grad


def run_scaled_ce(backend, x, w, target, temperature, grad_nll, grad_entropy, return_entropy=True,
                  chunk_size="auto"):
    """kdfast's (nll, entropy, d x, d w) after backward of the given upstream gradients, and its raw outputs."""
    device = device_for(backend)
    xa, wa = leaf(x, device), leaf(w, device)
    nll, entropy, raw = scaled_ce(backend, xa, wa, target.to(device), temperature, return_entropy,
                                  chunk_size=chunk_size)
    outputs = [(o, g) for o, g in ((nll, grad_nll), (entropy, grad_entropy)) if g is not None]
    torch.autograd.backward([o for o, _ in outputs], [g.to(device).to(o.dtype) for o, g in outputs])
    return (nll.detach(), None if entropy is None else entropy.detach(), xa.grad, wa.grad), raw


def check_scaled_ce(actual, x, w, target, temperature, grad_nll, grad_entropy, out_tol, grad_tol):
    """kdfast's (nll, entropy, d x, d w) against the float64 reference within the peer's (atol, rtol); with float32
    inputs the float32 reference's own distance from float64 is added to atol (tests/liger_cases.py)."""
    expected = scaled_ce_reference(x, w, target, temperature, grad_nll, grad_entropy, F64)
    single = (scaled_ce_reference(x, w, target, temperature, grad_nll, grad_entropy, FP32)
              if x.dtype == FP32 else expected)
    names = ("nll", "entropy", "grad_input", "grad_weight")
    for name, mine, ref64, ref32, (atol, rtol) in zip(names, actual, expected, single,
                                                       (out_tol, out_tol, grad_tol, grad_tol)):
        if mine is None or ref64 is None:
            continue
        slack = (ref32.double() - ref64).abs().max().item()
        try:
            close(mine, ref64, atol + slack, rtol)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def make_inputs(gen, bt, hidden_size, vocab_size, ignore_stride=None, dtype=BF16):
    """The sm90 suite's _make_inputs: x = randn * 0.25 and W = randn / sqrt(H) in `dtype`, targets with every
    ignore_stride-th row -100."""
    x = torch.randn(bt, hidden_size, generator=gen, dtype=dtype) * 0.25
    weight = torch.randn(vocab_size, hidden_size, generator=gen, dtype=dtype) / hidden_size**0.5
    target = torch.randint(vocab_size, (bt,), generator=gen)
    if ignore_stride is not None:
        target[::ignore_stride] = -100
    return x, weight, target


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_fallback_matches_torch_with_entropy_and_ignored_rows(backend):
    """test_frontend_fallback_matches_torch_with_entropy_and_ignored_rows: 521 tokens, H 7, V 13, every 11th row
    ignored, T 0.7, both outputs differentiated (grad_entropy of both signs); torch.testing's float32 defaults on the
    outputs, 2e-5 on the gradients."""
    gen = torch.Generator().manual_seed(42)
    target = torch.randint(13, (521,), generator=gen)
    target[::11] = -100
    grad_nll = torch.rand(521, generator=gen)
    grad_entropy = torch.rand(521, generator=gen) - 0.5
    x, w = torch.randn(521, 7, generator=gen), torch.randn(13, 7, generator=gen)
    rows = some_rows(backend, 521)
    x, target, grad_nll, grad_entropy = x[rows], target[rows], grad_nll[rows], grad_entropy[rows]
    actual, _ = run_scaled_ce(backend, x, w, target, 0.7, grad_nll, grad_entropy)
    check_scaled_ce(actual, x, w, target, 0.7, grad_nll, grad_entropy, (1e-5, 1.3e-6), (2e-5, 2e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_returns_only_nll_when_entropy_is_disabled(backend):
    """test_frontend_fallback_returns_only_nll_when_entropy_is_disabled: without the entropy one tensor, shaped (4,),
    whose sum's backward reaches the input and the weight (held to the reference too)."""
    gen = torch.Generator().manual_seed(0)
    x, w, target = torch.randn(4, 8, generator=gen), torch.randn(16, 8, generator=gen), torch.arange(4)
    device = device_for(backend)
    xa, wa = leaf(x, device), leaf(w, device)
    output = kdfast.linear_token_logprobs(xa, wa, target.to(device), backend=backend)
    assert isinstance(output, torch.Tensor) and output.shape == (4,)
    (-output).sum().backward()
    assert xa.grad is not None and wa.grad is not None
    check_scaled_ce((-output.detach(), None, xa.grad, wa.grad), x, w, target, 1.0, torch.ones(4), None,
                    (1e-5, 1.3e-6), (2e-5, 2e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_supports_entropy_only_backward(backend):
    """test_frontend_fallback_supports_entropy_only_backward: entropy.sum().backward() alone reaches the input and the
    weight (held to the reference too)."""
    gen = torch.Generator().manual_seed(0)
    x, w, target = torch.randn(6, 8, generator=gen), torch.randn(16, 8, generator=gen), torch.arange(6)
    (nll, entropy, dx, dw), _ = run_scaled_ce(backend, x, w, target, 1.0, None, torch.ones(6))
    assert dx is not None and dw is not None
    check_scaled_ce((nll, entropy, dx, dw), x, w, target, 1.0, None, torch.ones(6), (1e-5, 1.3e-6), (2e-5, 2e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, atol, rtol, chunk_size", [
    ((17, 31, 257), FP32, 6e-5, 6e-5, "auto"),  # fp32-ragged
    ((1025, 64, 4096), BF16, 8e-2, 5e-2, 256),  # bf16-multichunk: V 131072 cut to 4096, several chunks of rows
], ids=["fp32-ragged", "bf16-multichunk"])
def test_scaled_ce_matches_verl_fallback_forward_and_combined_backward(backend, shape, dtype, atol, rtol, chunk_size):
    """test_cutile_matches_verl_fallback_forward_and_combined_backward: T 0.8, every 11th row ignored, both outputs
    differentiated (randn upstream gradients, the entropy's in the inputs' dtype)."""
    gen = torch.Generator().manual_seed(42)
    tokens, hidden_size, vocab_size = shape
    target = torch.randint(vocab_size, (tokens,), generator=gen)
    target[::11] = -100
    grad_nll = torch.randn(tokens, generator=gen)
    grad_entropy = torch.randn(tokens, generator=gen, dtype=dtype)
    x = torch.randn(tokens, hidden_size, generator=gen, dtype=dtype) * 0.25
    w = torch.randn(vocab_size, hidden_size, generator=gen, dtype=dtype) / hidden_size**0.5
    rows = some_rows(backend, tokens)
    if len(rows) < tokens:
        x, target, grad_nll, grad_entropy = x[rows], target[rows], grad_nll[rows], grad_entropy[rows]
        chunk_size = 4 if chunk_size != "auto" else chunk_size
    actual, _ = run_scaled_ce(backend, x, w, target, 0.8, grad_nll, grad_entropy, chunk_size=chunk_size)
    check_scaled_ce(actual, x, w, target, 0.8, grad_nll, grad_entropy, (atol, rtol), (atol, rtol))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["nll", "entropy"])
def test_scaled_ce_supports_single_output_backward(backend, output):
    """test_cutile_supports_single_output_backward: 19 x 33 x 259, T 1.2, every 5th row ignored; only one output
    differentiated (randn upstream), the gradients within 6e-5."""
    gen = torch.Generator().manual_seed(43)
    target = torch.randint(259, (19,), generator=gen)
    target[::5] = -100
    grad_output = torch.randn(19, generator=gen)
    x = torch.randn(19, 33, generator=gen) * 0.25
    w = torch.randn(259, 33, generator=gen) / 33**0.5
    rows = some_rows(backend, 19)
    x, target, grad_output = x[rows], target[rows], grad_output[rows]
    grads = (grad_output, None) if output == "nll" else (None, grad_output)
    (_, _, dx, dw), _ = run_scaled_ce(backend, x, w, target, 1.2, *grads)
    check_scaled_ce((None, None, dx, dw), x, w, target, 1.2, *grads, (6e-5, 6e-5), (6e-5, 6e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_rejects_out_of_range_target(backend):
    """test_cutile_rejects_out_of_range_target: a target of V (16) is refused with a ValueError naming [0, 16)."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, generator=gen).to(device), torch.randn(16, 8, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        kdfast.linear_token_logprobs(x, w, torch.tensor([0, 16], device=device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_rejects_bad_temperatures_and_shapes(backend):
    """test_sm90_rejects_bad_dtypes_shapes_and_options, the checks kdfast shares: temperature 0 and inf are
    ValueErrors; a target not one per row and a head of another hidden size are ValueErrors. A temperature that is not
    a number ("cold") is refused: Liger raises TypeError, kdfast ValueError, either is accepted. (Its dtype checks,
    bf16 only and int64 targets, are Liger's kernel's limits: kdfast takes fp32 / fp16 and int32 ids.)"""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen, dtype=BF16).to(device)
    w = torch.randn(16, 16, generator=gen, dtype=BF16).to(device)
    target = torch.zeros(4, dtype=torch.long, device=device)
    for temperature in (0.0, float("inf")):
        with pytest.raises(ValueError):
            kdfast.linear_token_logprobs(x, w, target, temperature=temperature, backend=backend)
    with pytest.raises((TypeError, ValueError)):
        kdfast.linear_token_logprobs(x, w, target, temperature="cold", backend=backend)
    with pytest.raises(ValueError):
        kdfast.linear_token_logprobs(x, w, target[:2], backend=backend)
    with pytest.raises(ValueError):
        kdfast.linear_token_logprobs(x, torch.randn(16, 8, dtype=BF16, device=device), target, backend=backend)


def _nll_only_case(backend, seed, shape, temperature, ignore_stride=7):
    gen = torch.Generator().manual_seed(seed)
    bt, hidden_size, vocab_size = shape
    x, w, target = make_inputs(gen, bt, hidden_size, vocab_size, ignore_stride=ignore_stride)
    grad_output = torch.rand(bt, generator=gen) + 0.25
    rows = some_rows(backend, bt)
    x, target, grad_output = x[rows], target[rows], grad_output[rows]
    actual, _ = run_scaled_ce(backend, x, w, target, temperature, grad_output, None, return_entropy=False)
    nll, _, dx, dw = actual
    assert nll.shape == (len(rows),) and nll.dtype == FP32
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.shape == w.shape and dw.dtype == w.dtype
    check_scaled_ce(actual, x, w, target, temperature, grad_output, None, (5e-2, 5e-2), (2e-2, 1e-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(256, 128, 512), (193, 70, 517)], ids=["aligned", "ragged"])
def test_scaled_ce_per_token_nll_and_grads_match_torch(backend, shape):
    """test_sm90_per_token_nll_and_grads_match_torch: bf16, every 7th row ignored, upstream rand + 0.25; the NLL is
    float32 and shaped per token, the gradients the inputs' shapes and dtype; NLL within 5e-2, gradients 2e-2 / 1e-1."""
    _nll_only_case(backend, 42, shape, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_scaled_ce_temperature_matches_torch(backend, temperature):
    """test_sm90_temperature_matches_torch: the ragged shape (193, 70, 517) at T 0.7 and 1.5."""
    _nll_only_case(backend, 43, (193, 70, 517), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_differentiable_entropy_matches_torch(backend):
    """test_sm90_differentiable_entropy_matches_torch: T 0.8, both outputs differentiated (grad_nll rand + 0.25,
    grad_entropy rand - 0.5); the entropy 0 at ignored rows; outputs within 5e-2, gradients 3e-2 / 1.5e-1."""
    gen = torch.Generator().manual_seed(44)
    x, w, target = make_inputs(gen, 193, 70, 517, ignore_stride=7)
    grad_nll = torch.rand(193, generator=gen) + 0.25
    grad_entropy = torch.rand(193, generator=gen) - 0.5
    rows = some_rows(backend, 193)
    x, target, grad_nll, grad_entropy = x[rows], target[rows], grad_nll[rows], grad_entropy[rows]
    actual, (_, raw_entropy) = run_scaled_ce(backend, x, w, target, 0.8, grad_nll, grad_entropy)
    assert actual[1][(target == -100).to(actual[1].device)].count_nonzero().item() == 0
    assert torch.isfinite(raw_entropy).all()
    check_scaled_ce(actual, x, w, target, 0.8, grad_nll, grad_entropy, (5e-2, 5e-2), (3e-2, 1.5e-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_entropy_only_backward_matches_torch(backend):
    """test_sm90_entropy_only_backward_matches_torch: T 0.8, only the entropy differentiated (rand - 0.5)."""
    gen = torch.Generator().manual_seed(144)
    x, w, target = make_inputs(gen, 193, 70, 517, ignore_stride=7)
    grad_entropy = torch.rand(193, generator=gen) - 0.5
    rows = some_rows(backend, 193)
    x, target, grad_entropy = x[rows], target[rows], grad_entropy[rows]
    (_, _, dx, dw), _ = run_scaled_ce(backend, x, w, target, 0.8, None, grad_entropy)
    check_scaled_ce((None, None, dx, dw), x, w, target, 0.8, None, grad_entropy, (3e-2, 1.5e-1), (3e-2, 1.5e-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_matches_verl_fused_ppo_formulas(backend):
    """test_sm90_matches_verl_fused_ppo_formulas: verl's closed forms, no ignored row, T 0.8 -- d logits =
    -g_nll (onehot - p) - g_ent p (log p + H), over T, then d x = d logits W and d W = d logits^T x -- in float64
    (no autograd); outputs within 5e-2, gradients 3e-2 / 1.5e-1."""
    gen = torch.Generator().manual_seed(45)
    x, w, target = make_inputs(gen, 193, 70, 517)
    grad_nll = torch.rand(193, generator=gen) + 0.25
    grad_entropy = torch.rand(193, generator=gen) - 0.5
    rows = some_rows(backend, 193)
    x, target, grad_nll, grad_entropy = x[rows], target[rows], grad_nll[rows], grad_entropy[rows]
    (nll, entropy, dx, dw), _ = run_scaled_ce(backend, x, w, target, 0.8, grad_nll, grad_entropy)

    x64, w64 = x.double(), w.double()
    logits = (x64 @ w64.T) / 0.8
    probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
    ref_nll = -log_probs.gather(-1, target[:, None]).squeeze(-1)
    ref_entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    one_hot = torch.zeros_like(logits).scatter_(-1, target[:, None], 1)
    dlogits = -grad_nll.double()[:, None] * (one_hot - probs)
    dlogits += probs * (log_probs + ref_entropy[:, None]) * (-grad_entropy.double()[:, None])
    dlogits /= 0.8
    close(nll, ref_nll, 5e-2, 5e-2)
    close(entropy, ref_entropy, 5e-2, 5e-2)
    close(dx, dlogits @ w64, 3e-2, 1.5e-1)
    close(dw, dlogits.T @ x64, 3e-2, 1.5e-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_ignored_entropy_rows_stay_zero_with_large_logits(backend):
    """test_sm90_ignored_entropy_rows_stay_zero_with_large_logits: x and W randn * 20 in bf16 (logits in the
    thousands), T 0.1, every row ignored, both outputs given ones upstream: the outputs are 0 and both gradients
    finite and exactly 0. kdfast's own (unmasked) log-probs and entropy at these rows must be finite too."""
    gen = torch.Generator().manual_seed(47)
    x = torch.randn(128, 64, generator=gen, dtype=BF16) * 20
    w = torch.randn(256, 64, generator=gen, dtype=BF16) * 20
    target = torch.full((128,), -100)
    rows = some_rows(backend, 128)
    x, target = x[rows], target[rows]
    ones = torch.ones(len(rows))
    (nll, entropy, dx, dw), (logq, raw_entropy) = run_scaled_ce(backend, x, w, target, 0.1, ones, ones)
    assert nll.count_nonzero().item() == 0 and entropy.count_nonzero().item() == 0
    assert torch.isfinite(dx).all() and dx.count_nonzero().item() == 0
    assert torch.isfinite(dw).all() and dw.count_nonzero().item() == 0
    assert torch.isfinite(logq).all() and torch.isfinite(raw_entropy).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_ignore_index_rows_are_zero(backend):
    """test_sm90_ignore_index_rows_are_zero: 192 x 96 x 257, every 5th row ignored, upstream ones: the NLL is 0 at
    ignored rows and above 0 at the others, and d x is exactly 0 at ignored rows."""
    gen = torch.Generator().manual_seed(0)
    x, w, target = make_inputs(gen, 192, 96, 257, ignore_stride=5)
    rows = some_rows(backend, 192)
    x, target = x[rows], target[rows]
    (nll, _, dx, _), _ = run_scaled_ce(backend, x, w, target, 1.0, torch.ones(len(rows)), None, return_entropy=False)
    ignored = (target == -100).to(nll.device)
    assert ignored.any() and (~ignored).any()
    assert nll[ignored].count_nonzero().item() == 0
    assert nll[~ignored].min().item() > 0.0
    assert dx[ignored].count_nonzero().item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_zero_grad_rows_produce_zero_dx(backend):
    """test_sm90_zero_grad_rows_produce_zero_dx: an upstream gradient of 0 except every 5th row (rand + 0.25), every
    11th row ignored: d x is exactly 0 where the upstream gradient is, and both gradients match torch (2e-2 / 1e-1)."""
    gen = torch.Generator().manual_seed(1)
    x, w, target = make_inputs(gen, 192, 96, 257, ignore_stride=11)
    grad_output = torch.zeros(192)
    grad_output[::5] = torch.rand((192 + 4) // 5, generator=gen) + 0.25
    rows = some_rows(backend, 192)
    x, target, grad_output = x[rows], target[rows], grad_output[rows]
    actual, _ = run_scaled_ce(backend, x, w, target, 1.0, grad_output, None, return_entropy=False)
    zero = (grad_output == 0).to(actual[2].device)
    assert zero.any() and (~zero).any()
    assert actual[2][zero].count_nonzero().item() == 0
    check_scaled_ce((None, None, *actual[2:]), x, w, target, 1.0, grad_output, None, (2e-2, 1e-1), (2e-2, 1e-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_all_ignored_is_zero(backend):
    """test_sm90_all_ignored_is_zero: 128 x 64 x 256, every row ignored, upstream ones: NLL, d x and d W all 0."""
    gen = torch.Generator().manual_seed(2)
    x, w, _ = make_inputs(gen, 128, 64, 256)
    rows = some_rows(backend, 128)
    x, target = x[rows], torch.full((len(rows),), -100)
    (nll, _, dx, dw), _ = run_scaled_ce(backend, x, w, target, 1.0, torch.ones(len(rows)), None, return_entropy=False)
    assert nll.count_nonzero().item() == 0
    assert dx.count_nonzero().item() == 0 and dw.count_nonzero().item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_many_chunk_dw_within_bf16_accumulation_error(backend):
    """test_sm90_many_wave_dw_matches_torch_within_bf16_accumulation_error: 2048 x 256 x 512 bf16, every 11th row
    ignored, upstream rand + 0.25; d W accumulated over kdfast's row chunks (256 rows each: Liger's two 1024-token
    waves, finer) within 5e-2 / 2e-1 of torch's float32 (here float64) d W, and its mean error under 2e-2 of its mean
    magnitude."""
    gen = torch.Generator().manual_seed(17)
    x, w, target = make_inputs(gen, 2048, 256, 512, ignore_stride=11)
    grad_output = torch.rand(2048, generator=gen) + 0.25
    rows = some_rows(backend, 2048)
    chunk_size = 256 if len(rows) == 2048 else 4
    x, target, grad_output = x[rows], target[rows], grad_output[rows]
    (_, _, _, dw), _ = run_scaled_ce(backend, x, w, target, 1.0, grad_output, None, return_entropy=False,
                                     chunk_size=chunk_size)
    expected = scaled_ce_reference(x, w, target, 1.0, grad_output, None, F64)[3]
    close(dw, expected, 5e-2, 2e-1)
    wave_err = (dw.cpu().double() - expected).abs().mean() / expected.abs().mean()
    assert wave_err < 2e-2, wave_err


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_ce_sum_reduction_composed_in_autograd(backend):
    """test_sm90_sum_reduction_composed_in_autograd: nll.sum().backward() (autograd expands the scalar into ones),
    every 6th row ignored; both gradients 2e-2 / 1e-1."""
    gen = torch.Generator().manual_seed(4)
    x, w, target = make_inputs(gen, 128, 64, 256, ignore_stride=6)
    rows = some_rows(backend, 128)
    x, target = x[rows], target[rows]
    device = device_for(backend)
    xa, wa = leaf(x, device), leaf(w, device)
    nll, _, _ = scaled_ce(backend, xa, wa, target.to(device), return_entropy=False)
    nll.sum().backward()
    check_scaled_ce((None, None, xa.grad, wa.grad), x, w, target, 1.0, torch.ones(len(rows)), None, (2e-2, 1e-1),
                    (2e-2, 1e-1))


# ================================================================================================================
# Liger: the cuteDSL / cuTile / sm90 fused linear cross-entropy suites -> kdfast's fused linear CE term
# ================================================================================================================

FLCE_TOL = {("mean", BF16): (5e-3, 5e-2), ("mean", FP16): (5e-3, 5e-2), ("sum", BF16): (5e0, 5e1),
            ("sum", FP16): (5e0, 5e1)}  # the cuteDSL FLCE suite's _TOL


# Liger's FLCE suites run a second backward through a retained graph. kdfast computes the gradient in the forward and
# scales the kept gradient by grad_output in place in the backward (kdfast/saved_gradient.py: a copy of [N, V] per
# backward otherwise): a first backward seeded with 1 leaves it as it was on the CPU, and a second backward then gets
# the peers' answer; one that scaled it (another seed, or any seed through the GPU's op) makes autograd refuse the
# second, with kdfast's message.
REFUSED = "scales it by the backward's grad_output in place"


def masters(gen, bt, hidden_size, vocab_size, bias, ce_weight=False):
    """The cuteDSL suite's _Masters: float32 randn input, head and bias (its class weights drawn, unused)."""
    x = torch.randn(bt, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen)
    bias_ = torch.randn(vocab_size, generator=gen) if bias else None
    if ce_weight:
        torch.rand(vocab_size, generator=gen)
    return x, weight, bias_


def make_target(gen, bt, vocab_size, ignore_frac=0.0, ignore_index=-100):
    """The cuteDSL suite's _make_target: int(bt * ignore_frac) random rows get ignore_index."""
    target = torch.randint(0, vocab_size, (bt,), generator=gen)
    count = int(bt * ignore_frac)
    if count > 0:
        target[torch.randperm(bt, generator=gen)[:count]] = ignore_index
    return target


def flce_torch_reference(hidden, weight, bias, labels, dtype, reduction="mean", rounding="linear", label_smoothing=0.0,
                         lse_square_scale=0.0, softcap=None):
    """torch's CE on the logits as each peer's reference forms them from `dtype` inputs: "linear" F.linear in
    `dtype` (one rounding, the bias included), "gemm" x @ W^T rounded and the bias added after the upcast (the
    cuteDSL suite's _torch_logits), "exact" the float32 product of the inputs' values (the sm90 suite)."""

    def reference(precision):
        h, w, b = as_leaf(hidden, precision), as_leaf(weight, precision), as_leaf(bias, precision)
        if rounding == "linear":
            logits = rounded_head(h, w, b, dtype)
        elif rounding == "gemm":
            logits = rounded_head(h, w, None, dtype) + (b if b is not None else 0)
        else:
            logits = h @ w.T + (b if b is not None else 0)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        total, _ = ce_with_z_loss(logits, labels, reduction, -100, label_smoothing, lse_square_scale)
        return total, [h, w, b]

    return reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, reduction, bias", [(BF16, "mean", True), (FP16, "sum", True), (BF16, "sum", False),
                                                    (FP16, "mean", False)])
def test_flce_core_matches_torch(backend, dtype, reduction, bias):
    """test_flce_core_matches_torch (its dtype x reduction x bias product, each value twice): 256 x 512 x 4096 randn
    (logits of std ~ 23), a quarter of the rows ignored; the loss against torch's CE on the cuteDSL suite's logits."""
    gen = torch.Generator().manual_seed(42)
    x, w, b = masters(gen, 256, 512, 4096, bias)
    target = make_target(gen, 256, 4096, ignore_frac=0.25)
    rows = some_rows(backend, 256)
    x, target = x[rows].to(dtype), target[rows]
    w, b = w.to(dtype), b.to(dtype) if b is not None else None
    device = device_for(backend)
    with torch.no_grad():
        out = kdfast_flce(x.to(device), w.to(device), b.to(device) if b is not None else None, target.to(device),
                          backend, reduction=reduction)
    verify(out, None, flce_torch_reference(x, w, b, target, dtype, reduction, rounding="gemm"), dtype,
           *FLCE_TOL[(reduction, dtype)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature, dtype, reduction", [("plain", BF16, "mean"), ("bias", FP16, "sum"),
                                                       ("label_smoothing", BF16, "sum"), ("zloss", FP16, "mean")])
def test_flce_not_last_layer_grad_matches_torch(backend, feature, dtype, reduction):
    """test_flce_not_last_layer_grad_matches_triton (its plain / bias / label_smoothing 0.1 / zloss 1e-4 rows; the
    class-weight row has no counterpart), 256 x 512 x 4096, a quarter ignored, an upstream gradient of 2: the loss and
    the input, weight and bias gradients, the gradients' atol scaled by 2 as the peer scales it."""
    gen = torch.Generator().manual_seed(42)
    x, w, b = masters(gen, 256, 512, 4096, bias=feature == "bias")
    target = make_target(gen, 256, 4096, ignore_frac=0.25)
    rows = some_rows(backend, 256)
    x, target = x[rows].to(dtype), target[rows]
    w, b = w.to(dtype), b.to(dtype) if b is not None else None
    settings = dict(label_smoothing=0.1 if feature == "label_smoothing" else 0.0,
                    lse_square_scale=1e-4 if feature == "zloss" else 0.0)
    device = device_for(backend)
    xa, wa, ba = leaf(x, device), leaf(w, device), leaf(b, device)
    out = kdfast_flce(xa, wa, ba, target.to(device), backend, reduction=reduction,
                      label_smoothing=settings["label_smoothing"], z_loss_weight=settings["lse_square_scale"])
    atol, rtol = FLCE_TOL[(reduction, dtype)]
    reference = flce_torch_reference(x, w, b, target, dtype, reduction, rounding="gemm", **settings)
    close(out, reference(F64)[0], atol, rtol)
    verify(out, [xa, wa, ba], reference, dtype, 2 * atol, rtol, upstream=torch.tensor(2.0, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", ["input", "weight", "bias"])
def test_flce_independent_requires_grad_matches_torch(backend, trainable):
    """test_flce_independent_requires_grad_matches_torch and cuTile's test_independent_gradient_requirements: only one
    of input, weight and bias requires a gradient (bf16, 256 x 128 x 256, a quarter ignored, mean): the loss and that
    gradient match torch's F.linear + CE within 5e-3 / 5e-2, and the others get none."""
    gen = torch.Generator().manual_seed(42)
    x, w, b = masters(gen, 256, 128, 256, bias=True)
    target = make_target(gen, 256, 256, ignore_frac=0.25)
    rows = some_rows(backend, 256)
    x, target, w, b = x[rows].to(BF16), target[rows], w.to(BF16), b.to(BF16)
    device = device_for(backend)
    leaves = {name: t.to(device).requires_grad_(name == trainable) for name, t in
              (("input", x), ("weight", w), ("bias", b))}
    out = kdfast_flce(leaves["input"], leaves["weight"], leaves["bias"], target.to(device), backend)
    mine = [leaves[name] if name == trainable else None for name in ("input", "weight", "bias")]
    verify(out, mine, flce_torch_reference(x, w, b, target, BF16), BF16, 5e-3, 5e-2)
    for name, tensor in leaves.items():
        assert (tensor.grad is not None) == (name == trainable), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_repeated_backward_recomputes_full_feature_gradients(backend):
    """test_flce_repeated_backward_recomputes_full_feature_gradients: a retained graph's second backward, with an
    upstream gradient of 2, gives exactly twice the first's gradients (rtol = atol = 0) for the input, weight and
    bias; bf16 256 x 512 x 4096 with label smoothing 0.1, z-loss 1e-4, softcap 30 and a quarter ignored (its class
    weights, token scaling and accum_dtype have no counterpart)."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(256, 512, generator=gen, dtype=BF16)
    w = torch.randn(4096, 512, generator=gen, dtype=BF16)
    b = torch.randn(4096, generator=gen, dtype=BF16)
    torch.rand(4096, generator=gen)  # its class weights, drawn and unused
    target = make_target(gen, 256, 4096, ignore_frac=0.25)
    rows = some_rows(backend, 256)
    device = device_for(backend)
    xa, wa, ba = leaf(x[rows], device), leaf(w, device), leaf(b, device)
    loss = kdfast_flce(xa, wa, ba, target[rows].to(device), backend, softcap=30.0, label_smoothing=0.1,
                       z_loss_weight=1e-4)
    loss.backward(retain_graph=True)
    first = (xa.grad.clone(), wa.grad.clone(), ba.grad.clone())
    assert all(g.count_nonzero() > 0 for g in first)
    xa.grad = wa.grad = ba.grad = None
    if device == "cuda":  # the GPU's op marks the kept gradient written, whatever the seed
        with pytest.raises(RuntimeError, match=REFUSED):
            loss.backward(torch.tensor(2.0, device=device), retain_graph=True)
        return
    loss.backward(torch.tensor(2.0, device=device), retain_graph=True)
    for repeated, expected in zip((xa.grad, wa.grad, ba.grad), first, strict=True):
        torch.testing.assert_close(repeated, expected * 2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_retained_backward_preserves_saved_gradient(backend):
    """cuTile's test_retained_backward_preserves_saved_gradient: bf16 128 x 128 x 256, two backwards of a retained
    graph at the same upstream gradient (0.7). Liger gives bit-identical gradients; kdfast's first backward scaled its
    kept gradient in place, so the second is refused in kdfast's words, not answered from the scaled one."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(128, 128, generator=gen, dtype=BF16)
    w = torch.randn(256, 128, generator=gen, dtype=BF16)
    target = torch.randint(256, (128,), generator=gen)
    rows = some_rows(backend, 128)
    device = device_for(backend)
    xa, wa = leaf(x[rows], device), leaf(w, device)
    loss = kdfast_flce(xa, wa, None, target[rows].to(device), backend)
    upstream = torch.tensor(0.7, device=device)
    loss.backward(upstream, retain_graph=True)
    assert xa.grad.count_nonzero() > 0 and wa.grad.count_nonzero() > 0
    xa.grad = wa.grad = None
    with pytest.raises(RuntimeError, match=REFUSED):
        loss.backward(upstream, retain_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_repeated_autograd_grad_is_bit_identical(backend):
    """test_sm90_fused_linear_cross_entropy_repeated_backward: torch.autograd.grad twice on a retained graph (bf16
    128 x 256 x 512) gives equal input and weight gradients."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 256, generator=gen, dtype=BF16)
    w = torch.randn(512, 256, generator=gen, dtype=BF16)
    target = torch.randint(512, (128,), generator=gen)
    rows = some_rows(backend, 128)
    device = device_for(backend)
    xa, wa = leaf(x[rows], device), leaf(w, device)
    loss = kdfast_flce(xa, wa, None, target[rows].to(device), backend)
    first = [grad.clone() for grad in torch.autograd.grad(loss, (xa, wa), retain_graph=True)]
    if device == "cuda":  # the GPU's op marks the kept gradient written, whatever the seed
        with pytest.raises(RuntimeError, match=REFUSED):
            torch.autograd.grad(loss, (xa, wa), retain_graph=True)
        return
    second = torch.autograd.grad(loss, (xa, wa), retain_graph=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_odd_vocab_padding_cannot_become_softmax_max(backend):
    """test_flce_odd_vocab_padding_cannot_become_softmax_max: every logit -1280 (x = 1, W = -20, H 64; V 513, bf16):
    no padding or initial maximum of 0 may stand in for the row's; the loss is log 513 and the gradients torch's
    (5e-3 / 5e-2)."""
    gen = torch.Generator().manual_seed(42)
    x = torch.ones(33, 64, dtype=BF16)
    w = torch.full((513, 64), -20.0, dtype=BF16)
    target = torch.randint(0, 513, (33,), generator=gen)
    rows = some_rows(backend, 33)
    x, target = x[rows], target[rows]
    device = device_for(backend)
    xa, wa = leaf(x, device), leaf(w, device)
    out = kdfast_flce(xa, wa, None, target.to(device), backend)
    close(out, torch.tensor(math.log(513), dtype=F64), 5e-3, 5e-2)
    verify(out, [xa, wa], flce_torch_reference(x, w, None, target, BF16), BF16, 5e-3, 5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_all_ignored_targets_are_valid(backend):
    """test_flce_all_ignored_targets_are_valid: bf16 16 x 16 x 256, every target -100: the mean is exactly 0."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(16, 16, generator=gen, dtype=BF16)
    w = torch.randn(256, 16, generator=gen, dtype=BF16)
    device = device_for(backend)
    xa = leaf(x, device)
    out = kdfast_flce(xa, w.to(device), None, torch.full((16,), -100, device=device), backend, reduction="mean")
    assert out.item() == 0.0
    out.backward()
    assert xa.grad.count_nonzero().item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(128, 128, 256), (129, 96, 384), (32, 64, 8192)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flce_cutile_correctness(backend, shape, reduction):
    """cuTile's test_correctness: bf16 randn input and head (unscaled), the first tokens // 8 rows ignored, an
    upstream gradient of 0.7; loss, input and weight gradients against F.linear (bf16) + CE within atol 5e-3 (mean)
    or 5e-2 (sum), rtol 5e-2."""
    gen = torch.Generator().manual_seed(42)
    tokens, hidden_size, vocab_size = shape
    x = torch.randn(tokens, hidden_size, generator=gen, dtype=BF16)
    w = torch.randn(vocab_size, hidden_size, generator=gen, dtype=BF16)
    target = torch.randint(vocab_size, (tokens,), generator=gen)
    target[: max(1, tokens // 8)] = -100
    rows = some_rows(backend, tokens)
    x, target = x[rows], target[rows]
    device = device_for(backend)
    xa, wa = leaf(x, device), leaf(w, device)
    out = kdfast_flce(xa, wa, None, target.to(device), backend, reduction=reduction)
    atol = 5e-3 if reduction == "mean" else 5e-2
    verify(out, [xa, wa], flce_torch_reference(x, w, None, target, BF16, reduction), BF16, atol, 5e-2,
           upstream=torch.tensor(0.7, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, reduction, with_ignored_tokens", [
    ((128, 256, 512), "mean", False), ((128, 256, 512), "sum", True), ((256, 512, 768), "mean", True),
    ((256, 512, 768), "sum", False)])
def test_flce_sm90_fused_linear_cross_entropy(backend, shape, reduction, with_ignored_tokens):
    """test_sm90_fused_linear_cross_entropy (its shape x reduction x ignored product, each value twice): bf16 randn
    input, head randn * 0.05, every 17th row ignored or none, upstream 0.75; the loss within 5e-3 / 5e-3 of the float32
    product's CE and each gradient's max error under 3e-2 of its largest magnitude."""
    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab_size = shape
    x = torch.randn(tokens, hidden_size, generator=gen, dtype=BF16)
    w = torch.randn(vocab_size, hidden_size, generator=gen, dtype=BF16) * 0.05
    target = torch.randint(vocab_size, (tokens,), generator=gen)
    if with_ignored_tokens:
        target[::17] = -100
    rows = some_rows(backend, tokens)
    x, target = x[rows], target[rows]
    device = device_for(backend)
    xa, wa = leaf(x, device), leaf(w, device)
    out = kdfast_flce(xa, wa, None, target.to(device), backend, reduction=reduction)
    out.backward(torch.tensor(0.75, device=device))
    loss, (h, v, _) = flce_torch_reference(x, w, None, target, BF16, reduction, rounding="exact")(F64)
    loss.backward(torch.tensor(0.75, dtype=F64))
    close(out, loss, 5e-3, 5e-3)
    assert rel_max_error(xa.grad, h.grad) < 3e-2
    assert rel_max_error(wa.grad, v.grad) < 3e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_large_token_grid(backend):
    """cuTile's test_large_token_grid: 65536 tokens (more rows than a CUDA grid's y and z dimensions hold), H 16,
    V 128, bf16: a finite loss (and the CE mean of torch's, 5e-3 / 5e-2). Under Triton's interpreter it would take
    minutes: skipped there."""
    if backend == "triton" and INTERPRETED:
        pytest.skip("65536 rows under Triton's interpreter")
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(65536, 16, generator=gen, dtype=BF16)
    w = torch.randn(128, 16, generator=gen, dtype=BF16)
    target = torch.randint(128, (65536,), generator=gen)
    device = device_for(backend)
    with torch.no_grad():
        out = kdfast_flce(x.to(device), w.to(device), None, target.to(device), backend)
    assert torch.isfinite(out)
    close(out, F.cross_entropy(F.linear(x, w).double(), target), 5e-3, 5e-2)


# ================================================================================================================
# Liger: the cuteDSL cross-entropy suite -> kdfast's CE term on logits
# ================================================================================================================

CE_TOL = {FP32: (1e-5, 1e-5), BF16: (5e-5, 5e-2), FP16: (5e-3, 5e-2)}  # the cuteDSL CE suite's _TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_ce_noncontiguous_input(backend, dtype):
    """test_ce_noncontiguous_input_matches_triton: logits randn(V, BT).t() (a column stride of BT), 128 x 4096, the
    mean loss forward only, against torch's CE on the same values."""
    gen = torch.Generator().manual_seed(42)
    base = torch.randn(4096, 128, generator=gen).t()
    target = torch.randint(0, 4096, (128,), generator=gen)
    n = len(some_rows(backend, 128))
    logits = base[:n].clone().to(dtype)  # clone and cast keep the strides
    assert not logits.is_contiguous()
    device = device_for(backend)
    x = logits.to(device)
    assert not x.is_contiguous()
    with torch.no_grad():
        out = kdfast_ce(x, target[:n].to(device), backend)
    verify(out, None, ce_reference(logits, target[:n]), dtype, *CE_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, dtype", [("mean", BF16), ("sum", FP16), ("none", FP32), ("none", BF16),
                                              ("mean", FP16), ("sum", FP32)])
def test_ce_token_accuracy_with_boosted_targets(backend, reduction, dtype):
    """test_ce_token_accuracy_matches_triton (its reduction x dtype product, each value twice): 256 x 4096 randn with
    the target's logit set to 50 in the first half of the rows, then an eighth of the rows ignored; kdfast's token
    accuracy (per row for "none", else over the kept rows), loss and gradient against torch's within the suite's
    per-dtype tolerance. The accuracy is the argmax of the logits in `dtype` (a tie counted as a hit by kdfast, as
    the first index by Liger: no row here ties)."""
    gen = torch.Generator().manual_seed(42)
    base = torch.randn(256, 4096, generator=gen)
    target = torch.randint(0, 4096, (256,), generator=gen)
    base[torch.arange(128), target[:128]] = 50.0
    target[torch.randperm(256, generator=gen)[:32]] = -100
    rows = some_rows(backend, 256)
    logits, target = base[rows].to(dtype), target[rows]
    device = device_for(backend)
    x = leaf(logits, device)
    out, parts = kdfast_ce(x, target.to(device), backend, reduction=reduction, return_components=True)
    atol, rtol = CE_TOL[dtype]
    keep = target != -100
    top = logits.float().max(-1)
    hits = ((logits.float() == top.values[:, None]).gather(-1, target.clamp(min=0)[:, None]).squeeze(-1) & keep)
    assert hits.sum() > 0 and (~hits & keep).sum() > 0
    expected = hits.double() if reduction == "none" else hits.sum().double() / keep.sum()
    close(parts.accuracy, expected, atol, rtol)
    upstream = torch.ones(len(rows), dtype=F64) if reduction == "none" else None
    verify(out, [x], ce_reference(logits, target, reduction), dtype, atol, rtol, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_all_ignored_is_exactly_zero(backend, reduction):
    """test_ce_all_ignored_matches_triton: float32 64 x 4096, every row ignored: the loss and the gradient are exactly
    0 (never NaN)."""
    gen = torch.Generator().manual_seed(42)
    base = torch.randn(64, 4096, generator=gen)
    rows = some_rows(backend, 64)
    device = device_for(backend)
    x = leaf(base[rows], device)
    out = kdfast_ce(x, torch.full((len(rows),), -100, device=device), backend, reduction=reduction)
    out.backward()
    assert torch.equal(out.detach().cpu(), torch.zeros_like(out.detach().cpu()))
    assert x.grad is not None and x.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_ce_reduction_none_per_row_grad(backend, dtype):
    """test_ce_reduction_none_perrow_grad_matches_triton: reduction "none" with a per-row upstream gradient
    (rand(256)), 256 x 4096: each row's loss and its gradient scaled by its own upstream value."""
    gen = torch.Generator().manual_seed(42)
    base = torch.randn(256, 4096, generator=gen)
    target = torch.randint(0, 4096, (256,), generator=gen)
    grad_vec = torch.rand(256, generator=gen)
    rows = some_rows(backend, 256)
    logits, target = base[rows].to(dtype), target[rows]
    device = device_for(backend)
    x = leaf(logits, device)
    out = kdfast_ce(x, target.to(device), backend, reduction="none")
    verify(out, [x], ce_reference(logits, target, "none"), dtype, *CE_TOL[dtype], upstream=grad_vec[rows].double())


# ================================================================================================================
# axolotl: tests/integrations/test_kd_topk_forward_kl.py
# ================================================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
def test_axolotl_bf16_student_logits(backend):
    """test_bf16_student_logits: the student's logits in bf16 give axolotl's float32 loss within rtol 2e-2, atol 1e-3
    (masked entries as padding, axolotl's row s * L + s log s from kdfast's renormalised row L, count of valid
    entries as the denominator: tests/test_sparse_peer_cases_more.py); the expectation is axolotl's loss on the float32
    logits (its reference, float64)."""
    device = device_for(backend)
    student, ids, logprobs, mask = axolotl_inputs()
    rows = ids.shape[1]
    per_row = kdfast.sparse_distill_loss(student[:, :rows].to(BF16).to(device), as_padding(ids, mask).to(device),
                                         logprobs.to(device), tail="renormalize", t2_scale=False, reduction="none",
                                         backend=backend)
    assert per_row.dtype == FP32
    held = (logprobs.double().exp() * mask).sum(-1)
    denominator = int(mask.sum())
    loss = (per_row.double().cpu() * held).sum() / denominator + (held * held.log()).sum() / denominator
    expected = axolotl_reference_loss(student.double(), ids, logprobs.double(), mask)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=1e-3)
