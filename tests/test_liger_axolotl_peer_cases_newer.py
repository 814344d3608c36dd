"""The peers' newest cases not yet ported, for behaviour kdfast shares, run on every kdfast backend (the earlier ports:
tests/test_liger_*_cases.py with tests/liger_cases.py, tests/test_sparse_peer_cases.py and
tests/test_sparse_peer_cases_more.py). Peer inputs (their seeds and draw order; a GPU-only peer's CUDA draws are drawn
here on the CPU, so the same recipe with other numbers), their tolerances and expectations; kdfast under test.

Liger-Kernel (linkedin/Liger-Kernel at ead96b6, 2026-08-21; its scaled cross-entropy suites are in
tests/test_liger_scaled_ce_peer_cases.py):
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
from liger_cases import (
    BF16,
    F64,
    FP16,
    FP32,
    INTERPRETED,
    as_leaf,
    ce_with_z_loss,
    close,
    leaf,
    rel_max_error,
    rounded_head,
    some_rows,
    verify,
)
from test_liger_cross_entropy_cases import ce_reference, kdfast_ce
from test_liger_linear_cross_entropy_cases import kdfast_flce
from test_sparse_peer_cases import axolotl_inputs
from test_sparse_peer_cases_more import as_padding, axolotl_reference_loss

import kdfast

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
