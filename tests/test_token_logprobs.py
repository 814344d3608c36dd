"""kdfast.linear_token_logprobs against float64 torch (log_softmax gathered at the token, the entropy) and against
TRL's ChunkedLogProbFunction: values, and the gradients of hidden, weight and bias of a weighted sum of either or
both outputs; every backend, bias, logit scale, softcap, temperature, chunks splitting the rows, 3-D hidden, bf16,
autocast; bad inputs; the peak memory of a step; a ZeRO-3 head gathered again by a backward that recomputes."""

from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast
from kdfast.memory import extra_peak_bytes_in_child
from kdfast.token_logprobs import linear_token_outputs

TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}
# The logprobs' gradient alone (the entropy unused: backward gets no gradient for it), the entropy's alone, both.
TERMS = ["logprobs", "entropy", "both"]
# bias, logit_scale, softcap, temperature
SETTINGS = [
    (False, 1.0, None, 1.0),
    (True, 1.0, None, 0.7),
    (True, 1.7, None, 2.0),
    (False, 0.5, 3.0, 1.0),
    (True, 1.3, 4.0, 0.7),
    (True, 1.0, 2.5, 2.0),
]


def make_inputs(lead_shape, hidden_size, vocab, dtype=torch.float32, bias=True, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    return dict(hidden=randn(*lead_shape, hidden_size), weight=randn(vocab, hidden_size, scale=0.5),
                bias=randn(vocab) if bias else None,
                token_ids=torch.randint(0, vocab, lead_shape, generator=generator).to(device))


def reference(hidden, weight, bias, token_ids, logit_scale=1.0, softcap=None, temperature=1.0):
    """(log q(token), entropy of q) in float64 from full logits, in TRL's order: bias, scale, softcap, temperature."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_q = (logits / temperature).log_softmax(-1)
    return log_q.gather(-1, token_ids[..., None].long()).squeeze(-1), -(log_q.exp() * log_q).sum(-1)


def weighted_sum(logprobs, entropy, terms, seed=5):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(logprobs.shape, generator=generator).to(logprobs.device, logprobs.dtype) for _ in "ab"]
    total = 0
    if terms in ("logprobs", "both"):
        total = total + (logprobs * weights[0]).sum()
    if terms in ("entropy", "both"):
        total = total + (entropy * weights[1]).sum()
    return total


def leaves(inputs, dtype=None):
    """Copies of the float inputs that require grad (in `dtype` when given); the token ids as they are."""
    return {k: (v.detach().to(dtype or v.dtype).requires_grad_(True) if k != "token_ids" and v is not None else v)
            for k, v in inputs.items()}


def assert_matches_reference(inputs, backend, terms="both", tolerance=None, autocast=False, **settings):
    ours = leaves(inputs)
    with torch.autocast(ours["hidden"].device.type, enabled=autocast):
        logprobs, entropy = kdfast.linear_token_logprobs(**ours, return_entropy=True, backend=backend, **settings)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == inputs["token_ids"].shape
    weighted_sum(logprobs, entropy, terms).backward()
    theirs = leaves(inputs, torch.float64)
    ref_logprobs, ref_entropy = reference(**theirs, **{k: v for k, v in settings.items() if k != "chunk_size"})
    weighted_sum(ref_logprobs, ref_entropy, terms).backward()
    rtol, atol = tolerance or TOLERANCES[inputs["hidden"].dtype]
    torch.testing.assert_close(logprobs.double(), ref_logprobs, rtol=rtol, atol=atol)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=rtol, atol=atol)
    for name, tensor in ours.items():
        if name != "token_ids" and tensor is not None:
            assert tensor.grad.dtype == tensor.dtype, f"d {name} has the dtype of {name}"
            torch.testing.assert_close(tensor.grad.double(), theirs[name].grad, rtol=rtol, atol=atol,
                                       msg=lambda text, name=name: f"d {name}: {text}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("bias,logit_scale,softcap,temperature", SETTINGS)
@pytest.mark.parametrize("terms", TERMS)
def test_matches_float64_reference(backend, bias, logit_scale, softcap, temperature, terms):
    inputs = make_inputs((2, 9), 16, 131, bias=bias, device=device_for(backend))
    assert_matches_reference(inputs, backend, terms, logit_scale=logit_scale, softcap=softcap,
                             temperature=temperature, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,logit_scale,softcap,temperature", [SETTINGS[2], SETTINGS[4]])
def test_every_backend_matches_float64_reference(backend, bias, logit_scale, softcap, temperature):
    """The Triton kernel (its interpreter off a GPU) too, on fewer settings: the interpreter is slow."""
    inputs = make_inputs((2, 7), 16, 131, bias=bias, device=device_for(backend))
    assert_matches_reference(inputs, backend, "both", logit_scale=logit_scale, softcap=softcap,
                             temperature=temperature, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64, "auto"])
@pytest.mark.parametrize("lead_shape", [(37,), (3, 5, 4)])
def test_chunk_sizes_and_shapes(chunk_size, lead_shape):
    inputs = make_inputs(lead_shape, 12, 97)
    assert_matches_reference(inputs, "auto", "both", softcap=5.0, temperature=0.7, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("terms", TERMS)
def test_bfloat16_inputs(backend, terms):
    """The GEMMs and the chunk's logits are bf16 (the logits rounded to ~3 digits); sums stay float32."""
    inputs = make_inputs((24,), 32, 257, dtype=torch.bfloat16, device=device_for(backend))
    assert_matches_reference(inputs, backend, terms, tolerance=(5e-2, 5e-2), temperature=0.7, chunk_size=7)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_autocast_runs_the_gemms_in_its_dtype(softcap):
    inputs = make_inputs((2, 10), 32, 257)
    assert_matches_reference(inputs, "auto", "both", tolerance=(5e-2, 5e-2), autocast=True, softcap=softcap,
                             temperature=2.0, chunk_size=6)


@pytest.mark.parametrize("bias,logit_scale,softcap,temperature", SETTINGS)
def test_equals_trl_chunked_logprob(bias, logit_scale, softcap, temperature):
    """TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py) on the same inputs: values and gradients."""
    chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob")
    inputs = make_inputs((40,), 24, 301, bias=bias, seed=2)
    ours, theirs = leaves(inputs), leaves(inputs)
    logprobs, entropy = kdfast.linear_token_logprobs(**ours, logit_scale=logit_scale, softcap=softcap,
                                                     temperature=temperature, return_entropy=True, chunk_size=16)
    trl_logprobs, trl_entropy, *_ = chunked_logprob.ChunkedLogProbFunction.apply(
        theirs["hidden"], theirs["weight"], theirs["bias"], theirs["token_ids"], temperature, 128, softcap,
        logit_scale, ("entropy",))
    torch.testing.assert_close(logprobs, trl_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, trl_entropy, rtol=1e-5, atol=1e-5)
    weighted_sum(logprobs, entropy, "both").backward()
    weighted_sum(trl_logprobs, trl_entropy, "both").backward()
    for name in ("hidden", "weight", "bias"):
        if ours[name] is not None:
            torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-4, atol=1e-5)


def test_returns_the_logprobs_alone_by_default():
    inputs = make_inputs((3, 4), 8, 29)
    logprobs = kdfast.linear_token_logprobs(**inputs)
    expected, _ = reference(**{k: v.double() if k != "token_ids" and v is not None else v for k, v in inputs.items()})
    torch.testing.assert_close(logprobs.double(), expected, rtol=2e-5, atol=2e-5)


def test_gradients_only_for_inputs_that_require_them():
    inputs = make_inputs((10,), 8, 29)
    weight = inputs["weight"].clone().requires_grad_(True)
    logprobs, entropy = kdfast.linear_token_logprobs(inputs["hidden"], weight, inputs["token_ids"],
                                                     bias=inputs["bias"], return_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    assert weight.grad is not None and inputs["hidden"].grad is None and inputs["bias"].grad is None
    with torch.no_grad():
        assert not kdfast.linear_token_logprobs(**leaves(inputs)).requires_grad


@pytest.mark.parametrize("terms", TERMS)
def test_no_nan_when_probabilities_underflow(terms):
    """Nearly one-hot rows (most q_j are 0 in float32): log q comes from the logits, never from log(q). Logits of
    ~450 hold log q to ~450 * 2^-24 in float32 and the slope is 160, so the gradients (~450) agree to ~1e-5 of their
    scale: the absolute tolerance is set from it."""
    inputs = make_inputs((12,), 16, 211)
    assert_matches_reference(inputs, "auto", terms, tolerance=(1e-4, 5e-2), logit_scale=40.0, temperature=0.25,
                             chunk_size=5)


def test_empty_input():
    inputs = leaves(make_inputs((0,), 8, 29))
    logprobs, entropy = kdfast.linear_token_logprobs(**inputs, return_entropy=True)
    assert logprobs.shape == entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert inputs["weight"].grad.abs().sum() == 0 and inputs["hidden"].grad.shape == (0, 8)


@pytest.mark.parametrize("terms", TERMS)
def test_a_second_backward_recomputes_the_kept_chunk(terms):
    """The forward keeps its last chunk of logits for the backward, which overwrites them with the gradient: a
    second backward through the same graph (retain_graph) must recompute them, and so give the same gradients (to
    float32 rounding: the chunks are summed in another order)."""
    inputs = leaves(make_inputs((11,), 8, 29))
    logprobs, entropy = kdfast.linear_token_logprobs(**inputs, return_entropy=True, chunk_size=4)
    total = weighted_sum(logprobs, entropy, terms)
    first = torch.autograd.grad(total, (inputs["hidden"], inputs["weight"], inputs["bias"]), retain_graph=True)
    second = torch.autograd.grad(total, (inputs["hidden"], inputs["weight"], inputs["bias"]))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("terms", TERMS)
def test_budget_chunks_spread_evenly(monkeypatch, terms):
    """chunk_size "auto" under a budget of a few rows: 37 rows in even chunks, the forward's last one kept (and, with
    the entropy's gradient, whose backward chunks are smaller, recomputed)."""
    from kdfast import token_logprobs

    inputs = make_inputs((37,), 8, 29)
    monkeypatch.setitem(token_logprobs.CHUNK_BUDGET_BYTES, "cpu", 16 * 29 * 4)
    rows = token_logprobs.Rows(inputs["hidden"], inputs["weight"], None, inputs["token_ids"], torch.float32)
    assert token_logprobs.chunk_rows("auto", rows, 29 * 4) == 13  # 3 chunks of 13, 13, 11 rather than 16, 16, 5
    assert_matches_reference(inputs, "auto", terms, temperature=0.7)


def token_logprobs_step(device, tokens, hidden_size, vocab):
    """Builds the inputs and returns one step: the log-probs and entropy, and their backward into hidden and head."""
    inputs = make_inputs((tokens,), hidden_size, vocab, bias=False, device=device)
    hidden, weight = inputs["hidden"].requires_grad_(True), inputs["weight"].requires_grad_(True)

    def step():
        logprobs, entropy = kdfast.linear_token_logprobs(hidden, weight, inputs["token_ids"], return_entropy=True)
        (logprobs.sum() + entropy.sum()).backward()
        hidden.grad = weight.grad = None  # so that every step allocates (and is charged for) them

    return step


def test_cpu_peak_is_a_fraction_of_one_logits_tensor():
    """One chunk of logits (and the entropy term's buffer) at a time, never [tokens, vocab]."""
    tokens, hidden_size, vocab = 4096, 64, 32_000
    one_logits_tensor = tokens * vocab * 4
    extra = extra_peak_bytes_in_child(f"{Path(__file__)}:token_logprobs_step", "cpu", tokens, hidden_size, vocab)
    assert extra < one_logits_tensor / 4, f"extra peak {extra / 2**20:.0f} MiB"


BAD_INPUTS = [  # changes to good inputs, and the argument the error must name
    ({"token_ids": torch.zeros(6)}, "token_ids"),
    ({"token_ids": torch.zeros(6, dtype=torch.bool)}, "token_ids"),
    ({"token_ids": [0, 1, 2, 3, 4, 5]}, "token_ids"),
    ({"token_ids": torch.zeros(5, dtype=torch.long)}, "token_ids"),
    ({"token_ids": torch.full((6,), 29)}, "token_ids"),
    ({"token_ids": torch.full((6,), -1)}, "token_ids"),
    ({"weight": torch.randn(29, 9)}, "weight"),
    ({"weight": torch.randn(29)}, "weight"),
    ({"hidden": torch.ones(6, 8, dtype=torch.long)}, "hidden"),
    ({"hidden": torch.randn(())}, "hidden"),
    ({"bias": torch.randn(28)}, "bias"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"logit_scale": float("inf")}, "logit_scale"),
    ({"softcap": 0.0}, "softcap"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"return_entropy": "yes"}, "return_entropy"),
    ({"return_entropy": True, "entropy_grad": None}, "entropy_grad"),
    ({"fp32_logits": 1}, "fp32_logits"),
    ({"backend": "gpu"}, "backend"),
]


@pytest.mark.parametrize("change,argument", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_argument(change, argument):
    arguments = {**make_inputs((6,), 8, 29), **change}
    with pytest.raises(ValueError, match=argument):
        kdfast.linear_token_logprobs(**arguments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_rows_entropy_gradient_is_exact_to_the_float32_logits(backend):
    """Rows whose logits / T reach ~900 (a randomised search's draw: weights of scale 30, logit_scale 4, T = 0.5), with
    the entropy's gradient weighted in: the gradient equals float64 math on the same float32 logits. log q_j taken as
    z_j - lse there lost eps |lse| at every column (5.5e-3 off at a gradient entry of 0.26)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 35, generator=generator)
    weight = torch.randn(36, 35, generator=generator) * 30.0 / 35**0.5
    bias = torch.randn(36, generator=generator)
    token_ids = torch.randint(0, 36, (2, 5), generator=generator)
    weights = torch.randn(2, 5, generator=generator), torch.randn(2, 5, generator=generator)
    device = device_for(backend)
    ours = [tensor.to(device).clone().requires_grad_(True) for tensor in (hidden, weight, bias)]
    logprobs, entropy = kdfast.linear_token_logprobs(ours[0], ours[1], token_ids.to(device), bias=ours[2],
                                                     temperature=0.5, logit_scale=4.0, return_entropy=True,
                                                     backend=backend)
    ((logprobs * weights[0].to(device)).sum() + (entropy * weights[1].to(device)).sum()).backward()
    theirs = [tensor.double().requires_grad_(True) for tensor in (hidden, weight, bias)]
    exact = (theirs[0] @ theirs[1].T + theirs[2]) * 4.0
    rounded = ((hidden @ weight.T + bias) * 4.0).double()  # the float32 logits the kernels see
    log_q = torch.log_softmax((exact + (rounded - exact).detach()) / 0.5, dim=-1)
    reference = (log_q.gather(-1, token_ids[..., None])[..., 0] * weights[0].double()).sum() + \
        (-(log_q.exp() * log_q).sum(-1) * weights[1].double()).sum()
    reference.backward()
    assert float(rounded.abs().max()) / 0.5 > 800
    for found, expected in zip(ours, theirs):
        scale = float(expected.grad.abs().max())
        assert float((found.grad.double().cpu() - expected.grad).abs().max()) < 1e-5 * scale  # 1e-7 measured


@pytest.mark.parametrize("head_learns", [True, False])
def test_a_backward_that_recomputes_gathers_a_zero3_head_again(zero3_gathers, head_learns):
    """Under DeepSpeed ZeRO-3 the head whole in the forward may be partitioned again by the backward: a backward that
    recomputes from it enters kdfast.zero3's gather of that very parameter; a frozen head's d hidden, taken in the
    forward, reads no head and gathers nothing."""
    inputs = make_inputs((10,), 8, 29)
    weight = torch.nn.Parameter(inputs["weight"], requires_grad=head_learns)
    weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    hidden = inputs["hidden"].clone().requires_grad_(True)
    kdfast.linear_token_logprobs(hidden, weight, inputs["token_ids"], chunk_size=4).sum().backward()
    assert zero3_gathers == ([[weight]] if head_learns else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("head_learns", [True, False])
def test_metrics_of_the_same_pass(backend, softcap, head_learns):
    """`linear_token_outputs`' metrics against float64: whether the token is the argmax, the mean of the mapped logits
    (scale, softcap, temperature) and log sum q^2; the log-probs and gradients as without them, chunks splitting the
    rows."""
    inputs = make_inputs((3, 11), 16, 131, device=device_for(backend))
    logits = inputs["hidden"].double() @ inputs["weight"].double().T + inputs["bias"].double()
    inputs["token_ids"][:, ::2] = logits.argmax(-1)[:, ::2]  # every other token the argmax
    settings = dict(logit_scale=1.3, softcap=softcap, temperature=0.7)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    weight = inputs["weight"].clone().requires_grad_(head_learns)
    logprobs, entropy, metrics = token_outputs(hidden, weight, inputs, backend,
                                               metrics=("is_top1", "mean_logits", "log_sum_sq_probs"), **settings)
    plain_hidden = inputs["hidden"].clone().requires_grad_(True)
    plain_weight = inputs["weight"].clone().requires_grad_(head_learns)
    plain, _, none = token_outputs(plain_hidden, plain_weight, inputs, backend, metrics=(), **settings)
    assert none == {} and entropy is not None
    torch.testing.assert_close(logprobs, plain, rtol=0, atol=0)
    logprobs.sum().backward()
    plain.sum().backward()
    torch.testing.assert_close(hidden.grad, plain_hidden.grad, rtol=0, atol=0)
    mapped = logits * 1.3
    mapped = softcap * torch.tanh(mapped / softcap) if softcap is not None else mapped
    assert metrics["is_top1"].dtype == torch.bool and metrics["is_top1"].shape == (3, 11)
    assert torch.equal(metrics["is_top1"], mapped.argmax(-1).eq(inputs["token_ids"]))
    assert int(metrics["is_top1"].sum()) >= 18
    torch.testing.assert_close(metrics["mean_logits"].double(), (mapped / 0.7).mean(-1), rtol=1e-5, atol=1e-5)
    log_q = (mapped / 0.7).log_softmax(-1)
    torch.testing.assert_close(metrics["log_sum_sq_probs"].double(), (2 * log_q).logsumexp(-1), rtol=1e-5, atol=1e-5)


def token_outputs(hidden, weight, inputs, backend, **settings):
    return linear_token_outputs(hidden, weight, inputs["token_ids"], bias=inputs["bias"], return_entropy=True,
                                entropy_grad=False, chunk_size=4, backend=backend, **settings)


def test_an_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="metrics"):
        token_outputs(*(make_inputs((6,), 8, 29)[k] for k in ("hidden", "weight")), make_inputs((6,), 8, 29), "auto",
                      metrics=("top5",))
