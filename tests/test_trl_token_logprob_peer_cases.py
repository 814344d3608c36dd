"""TRL's tests of its chunked per-token log-prob kernel (huggingface/trl tests/test_kernels.py, class
TestChunkedLogProbFunction), ported to kdfast: the cases for `ChunkedLogProbFunction` not ported elsewhere
(tests/test_token_logprobs.py and tests/test_trl_fused_lm_head.py compare kdfast with TRL's function on inputs of
their own). Each runs on kdfast's stand-in `KdfastChunkedLogProb.apply` (TRL's arguments and five outputs; it sizes its
row chunks itself) and on `kdfast.linear_token_outputs` in chunks of 17 rows (64 rows: 17 + 17 + 17 + 13), on the CPU
(TRL's `torch_device` without an accelerator), with TRL's inputs, expectations and tolerances.

In bf16 TRL's expectation is its reference's rounding: the product rounded to bf16, then the bias added in bf16,
then the temperature in float32; kdfast rounds the chunk's (x W + b) / T to bf16 once, and with bf16 hidden states
and a float32 head keeps the GEMM in float32 where TRL casts the head to bf16. Both are roundings of the same math,
so where they differ (T = 0.7, a bias, a float32 head) the port holds kdfast to TRL's own accuracy instead: against
float64 math on the same inputs, kdfast's largest error in each output and gradient is at most 1.25x that of TRL's
reference (plus 1e-3); where the roundings agree (T = 1, no bias) TRL's tolerance of 1e-2 stays.

Left out: TestLogProbEntropy (TRL's `selective_log_softmax_and_entropy` on materialised logits: kdfast has no such
function, its per-token log-probs always come from hidden states and a head), and, in test_forward and
test_backward_combined, TRL's patching of its TOKEN_CHUNK_SIZE and recording of torch.mm calls, which check TRL's own
tiling: here kdfast's `chunk_size` (rows per chunk) makes the partial last chunk, and test_forward records kdfast's
chunks instead."""

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from kdfast import token_logprobs
from kdfast.integrations.trl_fused_lm_head import KdfastChunkedLogProb
from kdfast.token_logprobs import linear_token_outputs

N, H, V = 64, 32, 128  # TRL's sizes
CHUNK_SIZE = 32  # TRL's vocabulary tile, passed as TRL passes it (kdfast's stand-in does not tile the vocabulary)
ROWS_PER_CHUNK = 17  # kdfast's chunk_size is rows per chunk: 64 rows make three full chunks and one of 13


def kdfast_rows_of_17(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                      logit_scale=1.0):
    """kdfast's own API called as TRL's function is, in chunks of 17 rows (TRL's vocabulary `chunk_size` unused)."""
    logprobs, entropy, metrics = linear_token_outputs(
        hidden, weight, targets, bias=bias, temperature=temperature, logit_scale=logit_scale,
        softcap=final_logit_softcapping, return_entropy=True, metrics=("log_sum_sq_probs", "mean_logits", "is_top1"),
        chunk_size=ROWS_PER_CHUNK)
    return logprobs, entropy, metrics["log_sum_sq_probs"], metrics["mean_logits"], metrics["is_top1"]


@pytest.fixture(params=[pytest.param(KdfastChunkedLogProb.apply, id="stand-in"),
                        pytest.param(kdfast_rows_of_17, id="rows-of-17")])
def chunked(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_entropy_guess(monkeypatch):
    """The stand-in learns process-wide whether the entropy gets a gradient: each test starts as a fresh patch does."""
    monkeypatch.setattr(KdfastChunkedLogProb, "entropy_grad", "auto")
    monkeypatch.setattr(KdfastChunkedLogProb, "entropy_grad_seen", False)


def reference(hidden, weight, labels, temperature, bias=None, logit_scale=1.0, final_logit_softcapping=None):
    """TRL's `_reference_logprobs_and_entropy`: full float32 logits in TRL's order (bias, scale, softcap, T)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.float32) * logit_scale
    if final_logit_softcapping is not None:
        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
    logits = logits / temperature
    log_p = F.log_softmax(logits, dim=-1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(torch.softmax(logits, dim=-1) * log_p).sum(dim=-1)


def trl_inputs(dtype=torch.float32, weight_dtype=None, requires_grad=(False, False, False), bias=False):
    """TRL's draws, in its order after torch.manual_seed(42): hidden [N, H], weight [V, H], with `bias` a bias [V],
    labels [N]; `requires_grad` for hidden, weight and bias."""
    torch.manual_seed(42)
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=requires_grad[0])
    weight = torch.randn(V, H, dtype=weight_dtype or dtype, requires_grad=requires_grad[1])
    bias = torch.randn(V, dtype=dtype, requires_grad=requires_grad[2]) if bias else None
    return hidden, weight, bias, torch.randint(0, V, (N,))


def float64_truth(output, hidden, weight, labels, temperature, bias=None):
    """`output` (0: log-probs, 1: entropy) and the gradients of 2 x its sum into hidden, weight (and bias), in
    float64 on the same inputs: the math both roundings approximate."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    values = reference(leaves[0], leaves[1], labels, temperature, leaves[2] if bias is not None else None)
    values = [value.double() for value in values]
    (2.0 * values[output].sum()).backward()
    return (values[output].detach(), *(leaf.grad for leaf in leaves))


def assert_as_exact_as_trls_reference(actual, trls, truth):
    """Each of kdfast's tensors at most 1.25x as far from float64 as TRL's reference's (plus 1e-3)."""
    for name, mine, theirs, exact in zip(("output", "d hidden", "d weight", "d bias"), actual, trls, truth):
        mine_error = (mine.double() - exact).abs().max().item()
        their_error = (theirs.double() - exact).abs().max().item()
        assert mine_error <= 1.25 * their_error + 1e-3, f"{name}: kdfast {mine_error:.4g}, TRL's {their_error:.4g}"


def backward_grads(loss, *tensors):
    """The gradients of `loss` into `tensors`, which are then cleared for the reference's backward."""
    loss.backward()
    grads = tuple(t.grad.clone() for t in tensors)
    for t in tensors:
        t.grad = None
    return grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward(chunked, temperature, monkeypatch):
    """TRL's test_forward. TRL records its torch.mm tiles; kdfast's chunks are its `_mapped_logits` calls."""
    chunk_rows = []
    mapped_logits = token_logprobs._mapped_logits
    monkeypatch.setattr(token_logprobs, "_mapped_logits",
                        lambda out, *rest: chunk_rows.append(out.shape[0]) or mapped_logits(out, *rest))
    hidden, weight, _, labels = trl_inputs()
    logprobs, entropy, *_ = chunked(hidden, weight, None, labels, temperature, CHUNK_SIZE)
    logprobs_ref, entropy_ref = reference(hidden, weight, labels, temperature)
    torch.testing.assert_close(logprobs, logprobs_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=1e-5)
    if chunked is kdfast_rows_of_17:  # the stand-in sizes its chunks from a memory budget: no size to check
        assert max(chunk_rows) <= ROWS_PER_CHUNK
        assert chunk_rows[-1] == N % ROWS_PER_CHUNK == 13


def test_log_sum_sq_probs(chunked):
    """TRL's test_log_sum_sq_probs: log sum_v p_v^2 = LSE(2z) - 2 LSE(z), z the logits over T."""
    hidden, weight, _, labels = trl_inputs()
    _, _, log_sum_sq_probs, _, _ = chunked(hidden, weight, None, labels, 0.7, CHUNK_SIZE)
    logits = (hidden @ weight.t()) / 0.7
    expected = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(log_sum_sq_probs, expected, atol=1e-5, rtol=1e-5)


def test_mean_logits(chunked):
    """TRL's test_mean_logits: the mean over the vocabulary of the logits over T."""
    hidden, weight, _, labels = trl_inputs()
    _, _, _, mean_logits, _ = chunked(hidden, weight, None, labels, 0.7, CHUNK_SIZE)
    torch.testing.assert_close(mean_logits, (hidden @ weight.t()).mean(-1) / 0.7, atol=1e-5, rtol=1e-5)


def test_is_top1_matches_argmax_with_ties(chunked):
    """TRL's test_is_top1_matches_argmax_with_ties: the head's second half repeats its first, so every row's maximum
    is tied; only the first of the tied tokens (argmax's) counts as the top-1."""
    hidden, weight, _, _ = trl_inputs()
    weight[V // 2:] = weight[: V - V // 2]
    argmax = (hidden @ weight.t()).argmax(-1)
    # Half the labels are the argmax, half its duplicate further down the vocabulary
    labels = torch.where(torch.arange(N) % 2 == 0, argmax, argmax + V // 2).clamp(max=V - 1)
    *_, is_top1 = chunked(hidden, weight, None, labels, 1.0, CHUNK_SIZE)
    torch.testing.assert_close(is_top1, argmax == labels)


@pytest.mark.parametrize("logit_scale,final_logit_softcapping", [
    (0.5, None),  # models that scale but don't softcap, e.g. MPT
    (1.0, 30.0),  # models that softcap but don't scale, e.g. Gemma 2
    (0.5, 30.0),  # both, applied in that order
])
def test_logit_scale_and_softcapping(chunked, logit_scale, final_logit_softcapping):
    """TRL's test_logit_scale_and_softcapping."""
    hidden, weight, _, labels = trl_inputs()
    logprobs, entropy, *_ = chunked(hidden, weight, None, labels, 0.7, CHUNK_SIZE, final_logit_softcapping,
                                    logit_scale)
    logprobs_ref, entropy_ref = reference(hidden, weight, labels, 0.7, logit_scale=logit_scale,
                                          final_logit_softcapping=final_logit_softcapping)
    torch.testing.assert_close(logprobs, logprobs_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=1e-5)


# TRL's test_backward (float32), test_backward_bfloat16 and test_backward_entropy: d hidden and d weight of the
# log-probs' or the entropy's sum, at TRL's tolerance for each.
BACKWARD_CASES = [
    pytest.param(torch.float32, 0, 1e-5, id="test_backward"),
    pytest.param(torch.bfloat16, 0, 1e-2, id="test_backward_bfloat16"),
    pytest.param(torch.float32, 1, 1e-4, id="test_backward_entropy"),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype,output,tolerance", BACKWARD_CASES)
def test_backward(chunked, temperature, dtype, output, tolerance):
    hidden, weight, _, labels = trl_inputs(dtype, requires_grad=(True, True, False))
    outputs = chunked(hidden, weight, None, labels, temperature, CHUNK_SIZE)
    grads = backward_grads(outputs[output].sum(), hidden, weight)
    reference(hidden, weight, labels, temperature)[output].sum().backward()
    if dtype == torch.bfloat16 and temperature != 1.0:  # the two roundings differ: TRL's accuracy (docstring)
        truth = float64_truth(output, hidden, weight, labels, temperature)
        assert_as_exact_as_trls_reference(grads, (hidden.grad, weight.grad), [g / 2 for g in truth[1:]])
        return
    torch.testing.assert_close(grads[0], hidden.grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(grads[1], weight.grad, atol=tolerance, rtol=tolerance)


def test_backward_bfloat16_hidden_float32_weight(chunked):
    """TRL's test_backward_bfloat16_hidden_float32_weight: TRL's reference runs on the weight cast to bf16, kdfast's
    GEMM on the float32 head; held to TRL's accuracy against float64 (the docstring), and far closer there."""
    hidden, weight, _, labels = trl_inputs(torch.bfloat16, torch.float32, requires_grad=(True, True, False))
    logprobs, _, *_ = chunked(hidden, weight, None, labels, 1.0, CHUNK_SIZE)
    grads = backward_grads(logprobs.sum(), hidden, weight)
    expected, _ = reference(hidden, weight.to(hidden.dtype), labels, 1.0)
    expected.sum().backward()
    truth = float64_truth(0, hidden, weight, labels, 1.0)
    assert_as_exact_as_trls_reference((logprobs, *grads), (expected, hidden.grad, weight.grad),
                                      (truth[0], *(g / 2 for g in truth[1:])))
    assert (logprobs.double() - truth[0]).abs().max() < 1e-3  # the float32 head's product is not rounded


def test_backward_uses_autocast_hidden_for_weight_gradient(chunked):
    """TRL's test_backward_uses_autocast_hidden_for_weight_gradient: under bf16 autocast two fp32 hidden states that
    round to the same bf16 values give the same log-probs, and so must give the same d weight; one taken from the fp32
    hidden states would depend on the bits autocast discarded."""
    torch.manual_seed(42)
    hidden = torch.linspace(1.0, 2.0, N * H).reshape(N, H).to(torch.bfloat16).float()
    perturbed_hidden = hidden + 1e-4
    assert torch.equal(hidden.to(torch.bfloat16), perturbed_hidden.to(torch.bfloat16))
    hidden.requires_grad_()
    perturbed_hidden.requires_grad_()
    weight = torch.randn(V, H, requires_grad=True)
    perturbed_weight = weight.detach().clone().requires_grad_()
    labels = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _, *_ = chunked(hidden, weight, None, labels, 1.0, CHUNK_SIZE)
        perturbed_logprobs, _, *_ = chunked(perturbed_hidden, perturbed_weight, None, labels, 1.0, CHUNK_SIZE)
    logprobs.sum().backward()
    perturbed_logprobs.sum().backward()
    torch.testing.assert_close(logprobs, perturbed_logprobs, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, perturbed_weight.grad, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backward_combined(chunked, temperature):
    """TRL's test_backward_combined: the log-probs' and the entropy's gradients must add up, not overwrite each other
    (TRL runs it in tiles of 17 tokens; the rows-of-17 case does the same in kdfast's chunks)."""
    hidden, weight, _, labels = trl_inputs(requires_grad=(True, True, False))
    logprobs, entropy, *_ = chunked(hidden, weight, None, labels, temperature, CHUNK_SIZE)
    grads = backward_grads((2.0 * logprobs + 0.5 * entropy).sum(), hidden, weight)
    logprobs_ref, entropy_ref = reference(hidden, weight, labels, temperature)
    (2.0 * logprobs_ref + 0.5 * entropy_ref).sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias(chunked, dtype):
    """TRL's test_bias: values and the gradients of hidden, weight and bias, T = 0.7."""
    hidden, weight, bias, labels = trl_inputs(dtype, requires_grad=(True, True, True), bias=True)
    logprobs, entropy, *_ = chunked(hidden, weight, bias, labels, 0.7, CHUNK_SIZE)
    grads = backward_grads((2.0 * logprobs + 0.5 * entropy).sum(), hidden, weight, bias)
    logprobs_ref, entropy_ref = reference(hidden, weight, labels, 0.7, bias)
    (2.0 * logprobs_ref + 0.5 * entropy_ref).sum().backward()
    if dtype == torch.bfloat16:  # the two roundings differ: TRL's accuracy against float64 (docstring)
        values, *truth = float64_truth(0, hidden, weight, labels, 0.7, bias)
        entropy_truth, *entropy_grads = float64_truth(1, hidden, weight, labels, 0.7, bias)
        truth = [g + e / 4 for g, e in zip(truth, entropy_grads)]  # 2 x log-probs + 0.5 x entropy
        assert_as_exact_as_trls_reference((logprobs, *grads), (logprobs_ref, hidden.grad, weight.grad, bias.grad),
                                          (values, *truth))
        assert_as_exact_as_trls_reference((entropy,), (entropy_ref,), (entropy_truth,))
        return
    atol, rtol = 1e-4, 1e-4
    torch.testing.assert_close(logprobs, logprobs_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(entropy, entropy_ref, atol=atol, rtol=rtol)
    for actual, expected in zip(grads, (hidden.grad, weight.grad, bias.grad), strict=True):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _shape(args):
    """The shape a torch.zeros / torch.empty call was given, as a torch.Size (TRL passes shapes, kdfast ints too)."""
    return torch.Size(args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)


def test_backward_skips_frozen_parameter_gradients(chunked):
    """TRL's test_backward_skips_frozen_parameter_gradients: a frozen head allocates no [V, H] or [V] gradient buffer.
    TRL watches torch.zeros in the backward; kdfast allocates its gradients with torch.empty too, and a frozen head's d
    hidden may be taken in the forward, so both calls are watched over both passes."""
    hidden, weight, bias, labels = trl_inputs(requires_grad=(True, False, False), bias=True)
    with (patch.object(torch, "zeros", wraps=torch.zeros) as zeros,
          patch.object(torch, "empty", wraps=torch.empty) as empty):
        logprobs, _, *_ = chunked(hidden, weight, bias, labels, 1.0, CHUNK_SIZE)
        logprobs.sum().backward()
    allocated_shapes = [_shape(call.args) for call in zeros.call_args_list + empty.call_args_list]
    assert weight.shape not in allocated_shapes
    assert bias.shape not in allocated_shapes
    assert hidden.grad is not None


@pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, False), (False, False, True)])
def test_backward_with_partially_frozen_inputs(chunked, requires_grad):
    """TRL's test_backward_with_partially_frozen_inputs: one of hidden, weight and bias learns."""
    hidden, weight, bias, labels = trl_inputs(requires_grad=requires_grad, bias=True)
    logprobs, _, *_ = chunked(hidden, weight, bias, labels, 1.0, CHUNK_SIZE)
    logprobs.sum().backward()
    leaves_ref = [t.detach().clone().requires_grad_(g) for t, g in zip((hidden, weight, bias), requires_grad)]
    logprobs_ref, _ = reference(leaves_ref[0], leaves_ref[1], labels, 1.0, leaves_ref[2])
    logprobs_ref.sum().backward()
    for actual, ref in zip((hidden, weight, bias), leaves_ref, strict=True):
        if ref.grad is not None:
            torch.testing.assert_close(actual.grad, ref.grad, atol=1e-5, rtol=1e-5)
