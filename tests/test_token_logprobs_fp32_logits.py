"""`linear_token_logprobs(fp32_logits=True)`: with 16-bit hidden states and head, each chunk's logits stay in float32
as the GEMM accumulated them. verl's fused log-probs hold bf16 inputs to 1e-3 of float64 math (tests/
test_verl_peer_cases.py); rounded to bf16 first (the default, TRL's rounding), logits of a trained model's size (|z / T|
near 16) move the log-probs by up to 0.03. Here: against float64 math on the same bf16 values, every path of the
function (a head that learns, with its kept chunk; a frozen head's d hidden taken in the forward; the entropy's
gradient; a softcap, whose chain rule needs the tanh), every backend, torch.compile and autocast."""

import pytest
import torch
from conftest import BACKENDS, device_for
from test_token_logprobs import reference, weighted_sum

import kdfast

BF16 = torch.bfloat16


def trained_scale_inputs(device, rows=40, hidden_size=96, vocab=509, bias=True, seed=0):
    """bf16 hidden states and head whose logits spread like a trained model's (std ~ 6)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(BF16).to(device)

    return dict(hidden=randn(rows, hidden_size), weight=randn(vocab, hidden_size, std=6.0 / hidden_size**0.5),
                bias=randn(vocab, std=0.5) if bias else None,
                token_ids=torch.randint(0, vocab, (rows,), generator=generator).to(device))


def run(inputs, trainable, terms, dtype=None, **settings):
    """(log-probs, entropy, {name: grad}) of a weighted sum of the `terms`, the `trainable` inputs requiring grad."""
    leaves = {name: (value.detach().to(dtype or value.dtype).requires_grad_(name in trainable)
                     if name != "token_ids" and value is not None else value) for name, value in inputs.items()}
    if dtype is torch.float64:
        logprobs, entropy = reference(**leaves, **settings)
    else:
        logprobs, entropy = kdfast.linear_token_logprobs(**leaves, return_entropy=True, **settings)
    weighted_sum(logprobs, entropy, terms).backward()
    return logprobs, entropy, {name: leaves[name].grad for name in trainable if leaves[name] is not None}


def relative_error(value, expected):
    return ((value.double() - expected).norm() / expected.norm()).item()


def max_error(value, expected):
    return (value.double() - expected).abs().max().item()


# (trainable inputs, the terms differentiated, entropy_grad): a head that learns (the forward keeps its last chunk for
# the backward), a frozen one differentiating the log-probs alone (d hidden taken in the forward), a frozen one whose
# entropy gets a gradient after all (its backward recomputes every chunk).
PATHS = [(("hidden", "weight", "bias"), "both", True), (("hidden",), "logprobs", False), (("hidden",), "both", False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable,terms,entropy_grad", PATHS, ids=["head learns", "frozen head", "entropy grad"])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (30.0, 0.7)])
def test_float32_logits_match_float64_on_bf16_inputs(backend, trainable, terms, entropy_grad, softcap, temperature):
    device = device_for(backend)
    inputs = trained_scale_inputs(device, rows=12 if backend == "triton" else 40)
    settings = dict(softcap=softcap, temperature=temperature)
    expected_lp, expected_h, expected_grads = run(inputs, trainable, terms, torch.float64, **settings)
    lp, h, grads = run(inputs, trainable, terms, backend=backend, chunk_size=5, fp32_logits=True,
                       entropy_grad=entropy_grad, **settings)
    rounded_lp, _, _ = run(inputs, trainable, terms, backend=backend, chunk_size=5, entropy_grad=entropy_grad,
                           **settings)
    # Products of bf16 values are exact in float32; only the sums round.
    assert max_error(lp, expected_lp) < 2e-4 and max_error(h, expected_h) < 2e-4, (
        max_error(lp, expected_lp), max_error(h, expected_h))
    assert max_error(lp, expected_lp) < max_error(rounded_lp, expected_lp) / 10
    for name, grad in grads.items():
        assert grad.dtype == BF16, f"d {name} has its input's dtype"
        # Returned in bf16 and, for the backward's GEMMs on CUDA, the gradient rounded to bf16: bf16's rounding.
        assert relative_error(grad, expected_grads[name]) < 1e-2, (name, relative_error(grad, expected_grads[name]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_float32_inputs_are_unchanged_by_the_setting(backend):
    """Float32 GEMMs write float32 logits already: the same call, bit for bit."""
    inputs = {name: value.float() if value.is_floating_point() else value
              for name, value in trained_scale_inputs(device_for(backend)).items()}
    first = run(inputs, ("hidden", "weight", "bias"), "both", backend=backend, chunk_size=7, fp32_logits=True)
    second = run(inputs, ("hidden", "weight", "bias"), "both", backend=backend, chunk_size=7)
    for ours, theirs in zip(first[:2], second[:2]):
        assert torch.equal(ours, theirs)
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_autocast_gemms_with_float32_logits():
    """Float32 parameters under bf16 autocast: the GEMMs take their bf16 values, the logits stay float32, the
    gradients come back in float32."""
    inputs = {name: value.float() if value.is_floating_point() else value
              for name, value in trained_scale_inputs("cpu").items()}
    rounded = {name: value.to(BF16).double() if value.is_floating_point() else value for name, value in inputs.items()}
    expected_lp, _, expected_grads = run(rounded, ("hidden", "weight"), "both", torch.float64)
    with torch.autocast("cpu", dtype=BF16):
        lp, _, grads = run(inputs, ("hidden", "weight"), "both", chunk_size=9, fp32_logits=True)
    assert max_error(lp, expected_lp) < 2e-4
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert relative_error(grad, expected_grads[name]) < 1e-2, name


def test_compiled_call_equals_eager():
    """Under torch.compile (the chunk loops as custom ops) the setting reaches the ops: the same values as eager."""
    inputs = trained_scale_inputs("cpu", bias=False)
    upstream = torch.randn(2, inputs["token_ids"].shape[0], generator=torch.Generator().manual_seed(5))

    def step(hidden, weight, token_ids):
        logprobs, entropy = kdfast.linear_token_logprobs(hidden, weight, token_ids, return_entropy=True,
                                                         temperature=0.7, chunk_size=16, fp32_logits=True)
        return (logprobs * upstream[0]).sum() + (entropy * upstream[1]).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for function in (step, compiled):
        hidden = inputs["hidden"].clone().requires_grad_(True)
        weight = inputs["weight"].clone().requires_grad_(True)
        loss = function(hidden, weight, inputs["token_ids"])
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    rounded = kdfast.linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["token_ids"], temperature=0.7)
    with_float32 = kdfast.linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["token_ids"],
                                                temperature=0.7, fp32_logits=True)
    assert not torch.equal(rounded, with_float32)  # the setting changes the values here, so the check above can fail
