"""kdfast.linear_token_logprobs with a frozen head (only hidden wants a gradient) and the log-probs alone: d hidden is
taken in the forward and the backward runs no chunk. Against float64 torch and the recomputing path on every
backend, setting, chunking, 16-bit GEMMs, 3-D hidden, peaked rows and a second backward; and the path is taken only
where it is exact (a head that learns, or an entropy that may be differentiated, recompute). With the entropy
returned and said to be only read (`entropy_grad=False`) the same path, and a gradient that reaches that entropy
after all still exact."""

import pytest
import torch
from conftest import BACKENDS, device_for
from test_token_logprobs import SETTINGS, TOLERANCES, make_inputs, reference, weighted_sum

import kdfast


def frozen_head_step(inputs, dtype=None, autocast=False, **settings):
    """The log-probs and d hidden of sum(g * log q(token)), g a fixed random row weight; hidden alone learns."""
    hidden = inputs["hidden"].detach().to(dtype or inputs["hidden"].dtype).requires_grad_(True)
    weight, bias = (t.to(hidden.dtype) if t is not None else None for t in (inputs["weight"], inputs["bias"]))
    with torch.autocast(hidden.device.type, enabled=autocast):
        if dtype == torch.float64:
            logprobs, _ = reference(hidden, weight, bias, inputs["token_ids"],
                                    **{k: v for k, v in settings.items() if k not in ("chunk_size", "backend")})
        else:
            logprobs = kdfast.linear_token_logprobs(hidden, weight, inputs["token_ids"], bias=bias, **settings)
    row_weights = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(7)).to(logprobs)
    (logprobs * row_weights).sum().backward()
    return logprobs.detach(), hidden.grad


def assert_matches_float64(inputs, tolerance, **settings):
    logprobs, d_hidden = frozen_head_step(inputs, **settings)
    expected, expected_d_hidden = frozen_head_step(inputs, torch.float64, **settings)
    rtol, atol = tolerance
    assert d_hidden.dtype == inputs["hidden"].dtype
    torch.testing.assert_close(logprobs.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(d_hidden.double(), expected_d_hidden, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,logit_scale,softcap,temperature", SETTINGS)
def test_matches_float64_and_runs_no_backward_chunk(backend, bias, logit_scale, softcap, temperature,
                                                    backward_chunks_counted):
    inputs = make_inputs((2, 9), 16, 131, bias=bias, device=device_for(backend))
    assert_matches_float64(inputs, TOLERANCES[torch.float32], backend=backend, logit_scale=logit_scale,
                           softcap=softcap, temperature=temperature, chunk_size=5)
    assert backward_chunks_counted == []


@pytest.mark.parametrize("chunk_size", [1, 7, "auto"])
@pytest.mark.parametrize("lead_shape", [(37,), (3, 5, 4)])
def test_chunk_sizes_and_shapes(chunk_size, lead_shape):
    assert_matches_float64(make_inputs(lead_shape, 12, 97), TOLERANCES[torch.float32], softcap=5.0,
                           temperature=0.7, chunk_size=chunk_size)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("autocast", [False, True])
def test_16_bit_gemms_equal_the_recomputing_path(softcap, autocast):
    """bf16 inputs, or float32 under autocast: the forward's q - onehot is the backward's own (the same kernel on the
    same 16-bit logits), so d hidden equals the recomputing path's to float32 rounding, and float64 to bf16's."""
    inputs = make_inputs((24,), 32, 257, dtype=torch.float32 if autocast else torch.bfloat16)
    settings = dict(softcap=softcap, temperature=0.7, chunk_size=7, autocast=autocast)
    logprobs, d_hidden = frozen_head_step(inputs, **settings)
    recompute = make_inputs((24,), 32, 257, dtype=inputs["hidden"].dtype)
    recompute["weight"].requires_grad_(True)  # a head that learns: the backward recomputes the chunks
    recomputed_logprobs, recomputed_d_hidden = frozen_head_step(recompute, **settings)
    torch.testing.assert_close(logprobs, recomputed_logprobs, rtol=0, atol=0)
    torch.testing.assert_close(d_hidden, recomputed_d_hidden, rtol=1e-5, atol=1e-5)
    assert_matches_float64(inputs, (5e-2, 5e-2), softcap=softcap, temperature=0.7, chunk_size=7, autocast=autocast)


def test_peaked_rows_have_no_nan():
    """Nearly one-hot rows (most q_j underflow to 0), as tests/test_token_logprobs.py's underflow case."""
    assert_matches_float64(make_inputs((12,), 16, 211), (1e-4, 5e-2), logit_scale=40.0, temperature=0.25,
                           chunk_size=5)


def test_a_second_backward_gives_the_same_gradient():
    inputs = make_inputs((11,), 8, 29)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    total = kdfast.linear_token_logprobs(hidden, inputs["weight"], inputs["token_ids"], bias=inputs["bias"],
                                         chunk_size=4).sum()
    first = torch.autograd.grad(total, hidden, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(total, hidden)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("learns", ["weight", "bias", "entropy returned"])
def test_recomputes_where_the_forward_cannot_know_the_gradient(learns, backward_chunks_counted):
    """A head that learns needs d weight = G^T X with each row's g inside the sum; an entropy that is returned may get
    a gradient of its own. Both recompute, and still match float64."""
    inputs = make_inputs((10,), 8, 29)
    if learns in ("weight", "bias"):
        inputs[learns].requires_grad_(True)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    out = kdfast.linear_token_logprobs(hidden, inputs["weight"], inputs["token_ids"], bias=inputs["bias"],
                                       return_entropy=learns == "entropy returned", chunk_size=4)
    logprobs = out[0] if isinstance(out, tuple) else out
    logprobs.sum().backward()
    assert len(backward_chunks_counted) == 1
    expected, _ = reference(*(inputs[k].double() for k in ("hidden", "weight", "bias")), inputs["token_ids"])
    torch.testing.assert_close(logprobs.double(), expected, rtol=2e-5, atol=2e-5)


def test_empty_input():
    hidden = torch.randn(0, 8, requires_grad=True)
    logprobs = kdfast.linear_token_logprobs(hidden, torch.randn(29, 8), torch.zeros(0, dtype=torch.long))
    logprobs.sum().backward()
    assert logprobs.shape == (0,) and hidden.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("entropy_differentiated", [False, True])
def test_an_entropy_said_to_be_only_read(backend, softcap, entropy_differentiated, backward_chunks_counted):
    """`entropy_grad=False`: the log-probs' d hidden comes from the forward and the entropy is the same; should the
    entropy get a gradient after all (the guess was wrong), the backward recomputes every chunk, exactly."""
    inputs = make_inputs((3, 7), 16, 131, bias=True, device=device_for(backend))
    settings = dict(logit_scale=1.3, softcap=softcap, temperature=0.7)
    terms = "both" if entropy_differentiated else "logprobs"
    hidden = inputs["hidden"].clone().requires_grad_(True)
    logprobs, entropy = kdfast.linear_token_logprobs(hidden, inputs["weight"], inputs["token_ids"],
                                                     bias=inputs["bias"], return_entropy=True, entropy_grad=False,
                                                     chunk_size=5, backend=backend, **settings)
    weighted_sum(logprobs, entropy, terms).backward()
    assert len(backward_chunks_counted) == int(entropy_differentiated)
    exact = {k: inputs[k].double().requires_grad_(k == "hidden") for k in ("hidden", "weight", "bias")}
    expected_logprobs, expected_entropy = reference(exact["hidden"], exact["weight"], exact["bias"],
                                                    inputs["token_ids"], **settings)
    weighted_sum(expected_logprobs, expected_entropy, terms).backward()
    rtol, atol = TOLERANCES[torch.float32]
    pairs = ((logprobs, expected_logprobs), (entropy, expected_entropy), (hidden.grad, exact["hidden"].grad))
    for mine, expected in pairs:
        torch.testing.assert_close(mine.double(), expected.detach(), rtol=rtol, atol=atol)
