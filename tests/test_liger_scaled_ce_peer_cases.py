"""Liger-Kernel's newest fused linear "scaled" cross-entropy cases (linkedin/Liger-Kernel at ead96b6, 2026-08-21), run
on every kdfast backend; the other newest peer cases are in tests/test_liger_axolotl_peer_cases_newer.py. Peer
inputs (their seeds and draw order; a GPU-only peer's CUDA draws are drawn here on the CPU, so the same recipe with
other numbers), their tolerances and expectations; kdfast under test.

test/transformers/test_fused_linear_scaled_cross_entropy.py (b304c89, #1359; the frontend a3f3654, #1354) and
test/cutedsl/test_fused_scaled_cross_entropy_sm90.py (62b691b, #1370): the fused linear "scaled" cross-entropy, verl's
FusedLinearForPPO: per token NLL = -log q(target) and the entropy of q at a temperature, q = softmax(x W^T / T), both
differentiable to x and W. That is kdfast's `linear_token_logprobs(..., temperature=T, return_entropy=True)` (NLL =
-log-prob). kdfast takes token ids in [0, V) and refuses -100, so an ignored row is given as Liger's own fallback
gives it to its kernel (id 0, `masked_fill`) and its outputs are zeroed by `torch.where`, as Liger's fallback zeroes
them: the upstream gradient reaching kdfast at those rows is then 0, and the peers' "ignored rows get no gradient" is
kdfast's backward giving exactly 0 (and no NaN) for rows whose upstream gradient is 0. Liger returns a 16-bit entropy
for 16-bit inputs, kdfast a float32 one: the values are compared. Ported:
test_frontend_fallback_matches_torch_with_entropy_and_ignored_rows,
test_frontend_fallback_returns_only_nll_when_entropy_is_disabled,
test_frontend_fallback_supports_entropy_only_backward, test_cutile_matches_verl_fallback_forward_and_combined_backward
(V 131072 cut to 4096 on a CPU, its several chunks kept with chunk_size=256),
test_cutile_supports_single_output_backward, test_cutile_rejects_out_of_range_target,
test_sm90_per_token_nll_and_grads_match_torch, test_sm90_temperature_matches_torch,
test_sm90_differentiable_entropy_matches_torch, test_sm90_entropy_only_backward_matches_torch,
test_sm90_matches_verl_fused_ppo_formulas (verl's closed-form gradient, float64),
test_sm90_ignored_entropy_rows_stay_zero_with_large_logits, test_sm90_ignore_index_rows_are_zero,
test_sm90_zero_grad_rows_produce_zero_dx, test_sm90_all_ignored_is_zero,
test_sm90_many_wave_dw_matches_torch_within_bf16_accumulation_error (kdfast's row chunks for the waves),
test_sm90_sum_reduction_composed_in_autograd, and test_sm90_rejects_bad_dtypes_shapes_and_options' temperature and
shape checks.

Run sizes: the peers' shapes, except under Triton's interpreter (about 30 ms a row and pass), where a case keeps 12 of
its rows (its first six and last six, so that its ignored rows stay among them).
"""

import pytest
import torch
from conftest import BACKENDS, device_for
from liger_cases import BF16, F64, FP32, as_leaf, close, leaf, some_rows

import kdfast

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
