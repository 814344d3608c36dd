"""`linear_token_logprobs(ignore_index=...)`: rows whose token id equals it get 0 for the log-prob, the entropy and
every metric, and no gradient, as torch's cross_entropy(reduction="none") treats an ignored label; the other rows are
what the call without those rows gives. Held to float64 math on every path of the function (a head that learns, with
its kept chunk; a frozen head's d hidden taken in the forward; the entropy's gradient; a softcap), every backend,
chunks that split the rows, an ignore_index outside the vocabulary (-100) and inside it (a padding id), every row
ignored, the metrics, and torch.compile `fullgraph`."""

import pytest
import torch
from conftest import BACKENDS, device_for
from test_token_logprobs import make_inputs, reference, weighted_sum

import kdfast
from kdfast.token_logprobs import linear_token_outputs

PATHS = [(("hidden", "weight", "bias"), "both", True), (("hidden",), "logprobs", False), (("hidden",), "both", False)]
PATH_IDS = ["head learns", "frozen head", "entropy grad"]


def with_ignored_rows(inputs, ignore_index, every=3):
    """The inputs with every `every`-th row's token id set to ignore_index; the ignored rows' mask."""
    token_ids = inputs["token_ids"].clone()
    ignored = torch.zeros_like(token_ids, dtype=torch.bool)
    ignored.view(-1)[::every] = True
    token_ids[ignored] = ignore_index
    return {**inputs, "token_ids": token_ids}, ignored


def run(inputs, trainable, terms, dtype=None, ignore_index=-100, **settings):
    """(log-probs, entropy, {name: grad}) of a weighted sum of the `terms`; float64 runs the reference with the
    ignored rows zeroed."""
    leaves = {name: (value.detach().to(dtype or value.dtype).requires_grad_(name in trainable)
                     if name != "token_ids" and value is not None else value) for name, value in inputs.items()}
    if dtype is torch.float64:
        ignored = leaves["token_ids"] == ignore_index
        clamped = leaves["token_ids"].clamp(0, leaves["weight"].shape[0] - 1)
        logprobs, entropy = reference(**{**leaves, "token_ids": clamped}, **settings)
        zero = torch.zeros((), dtype=logprobs.dtype)
        logprobs, entropy = torch.where(ignored, zero, logprobs), torch.where(ignored, zero, entropy)
    else:
        logprobs, entropy = kdfast.linear_token_logprobs(**leaves, return_entropy=True, ignore_index=ignore_index,
                                                         **settings)
    weighted_sum(logprobs, entropy, terms).backward()
    return logprobs, entropy, {name: leaves[name].grad for name in trainable if leaves[name] is not None}


def assert_matches_float64(ours, theirs, tolerance=2e-5):
    for value, expected in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(value.double(), expected, rtol=tolerance, atol=tolerance)
    for name, grad in ours[2].items():
        torch.testing.assert_close(grad.double(), theirs[2][name], rtol=tolerance, atol=tolerance,
                                   msg=lambda text, name=name: f"d {name}: {text}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable,terms,entropy_grad", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (4.0, 0.7)])
def test_ignored_rows_are_zero_and_the_rest_match_float64(backend, trainable, terms, entropy_grad, softcap,
                                                          temperature):
    device = device_for(backend)
    shape, vocab = ((9,), 97) if backend == "triton" else ((4, 10), 301)  # Triton's interpreter is slow
    inputs, ignored = with_ignored_rows(make_inputs(shape, 24, vocab, device=device), -100)
    settings = dict(softcap=softcap, temperature=temperature, logit_scale=1.3)
    ours = run(inputs, trainable, terms, backend=backend, chunk_size=7, entropy_grad=entropy_grad, **settings)
    theirs = run(inputs, trainable, terms, dtype=torch.float64, **settings)
    assert_matches_float64(ours, theirs)
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    assert (ours[2]["hidden"][ignored] == 0).all(), "an ignored row's hidden state gets no gradient"


@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
def test_an_ignore_index_inside_the_vocabulary_ignores_that_token(chunk_size):
    """A padding id that is also a token (0 here): its rows are ignored, the other rows keep their values."""
    inputs, _ = with_ignored_rows(make_inputs((23,), 16, 50), 0, every=4)
    ignored = inputs["token_ids"] == 0  # with the rows whose drawn token was 0 already
    trainable = ("hidden", "weight", "bias")
    ours = run(inputs, trainable, "both", ignore_index=0, chunk_size=chunk_size)
    theirs = run(inputs, trainable, "both", dtype=torch.float64, ignore_index=0)
    assert_matches_float64(ours, theirs)
    kept = kdfast.linear_token_logprobs(inputs["hidden"][~ignored], inputs["weight"], inputs["token_ids"][~ignored],
                                        bias=inputs["bias"])
    torch.testing.assert_close(ours[0][~ignored], kept, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trainable,terms,entropy_grad", PATHS, ids=PATH_IDS)
def test_every_row_ignored_gives_zeros_and_zero_gradients(trainable, terms, entropy_grad):
    inputs = make_inputs((6,), 8, 20)
    inputs["token_ids"] = torch.full_like(inputs["token_ids"], -100)
    logprobs, entropy, grads = run(inputs, trainable, terms, entropy_grad=entropy_grad)
    assert (logprobs == 0).all() and (entropy == 0).all()
    for name, grad in grads.items():
        assert (grad == 0).all(), f"d {name} is zero"


def test_metrics_of_ignored_rows_are_zero():
    inputs, ignored = with_ignored_rows(make_inputs((17,), 12, 40), -100)
    # One kept row whose token is its argmax, so that is_top1 is True somewhere it is kept.
    logits = inputs["hidden"] @ inputs["weight"].T + inputs["bias"]
    inputs["token_ids"][1] = logits[1].argmax()
    _, _, metrics = linear_token_outputs(**inputs, metrics=("is_top1", "mean_logits", "log_sum_sq_probs"),
                                         ignore_index=-100, chunk_size=4)
    _, _, kept = linear_token_outputs(inputs["hidden"][~ignored], inputs["weight"], inputs["token_ids"][~ignored],
                                      bias=inputs["bias"], metrics=("is_top1", "mean_logits", "log_sum_sq_probs"))
    for name, values in metrics.items():
        assert not values[ignored].any(), f"{name} is 0 in ignored rows"
        torch.testing.assert_close(values[~ignored], kept[name], msg=lambda text, name=name: f"{name}: {text}")
    assert metrics["is_top1"][1]


@pytest.mark.parametrize("trainable", [("hidden", "weight", "bias"), ("hidden",)], ids=["head learns", "frozen head"])
def test_compiled_fullgraph_matches_eager(trainable):
    inputs, _ = with_ignored_rows(make_inputs((3, 7), 16, 60), -100)

    def step(hidden, weight, bias, token_ids):
        logprobs, entropy = kdfast.linear_token_logprobs(hidden, weight, token_ids, bias=bias, return_entropy=True,
                                                         ignore_index=-100, chunk_size=5)
        return logprobs, entropy

    def grads_of(function):
        leaves = {name: (value.detach().clone().requires_grad_(name in trainable) if name != "token_ids" else value)
                  for name, value in inputs.items()}
        logprobs, entropy = function(**leaves)
        weighted_sum(logprobs, entropy, "both").backward()
        return logprobs, entropy, {name: leaves[name].grad for name in trainable}

    torch._dynamo.reset()
    compiled = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"))
    eager = grads_of(step)
    for value, expected in zip(compiled[:2], eager[:2]):
        torch.testing.assert_close(value, expected)
    for name in trainable:
        torch.testing.assert_close(compiled[2][name], eager[2][name], msg=lambda text, name=name: f"d {name}: {text}")


@pytest.mark.parametrize("ignore_index,token,message", [
    (1.5, 0, "ignore_index must be an int or None, got 1.5"),
    (True, 0, "ignore_index must be an int or None, got True"),
    (-100, -1, r"token_ids must lie in \[0, 20\) \(the vocab size of weight\) or equal ignore_index=-100; found -1"),
    (None, -100, r"token_ids must lie in \[0, 20\) \(the vocab size of weight\); found -100"),
])
def test_bad_ignore_index_or_ids_raise_naming_the_argument(ignore_index, token, message):
    inputs = make_inputs((5,), 8, 20)
    inputs["token_ids"][2] = token
    with pytest.raises(ValueError, match=message):
        kdfast.linear_token_logprobs(**inputs, ignore_index=ignore_index)
