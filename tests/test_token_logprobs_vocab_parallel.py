"""`linear_token_logprobs` over a vocab-parallel head (tensor-parallel LM heads: each rank holds its rows of the head,
the hidden states and token ids the same on every rank), over torch.distributed (gloo, CPU), 3 ranks with uneven
shards. Every rank's log-probs and entropy are held to float64 math on the whole head, its weight and bias gradients
to that head's rows it holds, and d hidden to the whole one (summed over the ranks, or each rank's part with
`reduce_hidden_grad=False`): every path of the function (a head that learns, with its kept chunk; a frozen head's d
hidden taken in the forward and summed there; the entropy's gradient, whose token entry only the holding rank
writes), softcap and temperature, ignored rows, chunks sized from a budget on shards of different widths (every rank
must run the same chunks: each chunk's exchange is a collective), and the errors every rank raises together."""

import pytest
import torch
import torch.distributed as dist
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases
from test_token_logprobs import make_inputs, reference, weighted_sum

import kdfast

WORLD = 3
VOCAB = 157
RANGES = [(0, 61), (61, 140), (140, VOCAB)]  # uneven: 61, 79 and 17 columns
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors
PATHS = {"head learns": (("hidden", "weight", "bias"), "both", True),
         "frozen head": (("hidden",), "logprobs", False),
         "entropy grad": (("hidden",), "both", False)}


def cases() -> dict:
    listed = {}
    for backend in VP_BACKENDS:
        for path in PATHS:
            for capped in (False, True):
                if backend == "triton" and capped:
                    continue  # Triton's interpreter is slow: the plain map only
                listed[f"{path}-{'softcap' if capped else 'plain'}-{backend}"] = (
                    lambda b=backend, p=path, c=capped: matches_float64(b, p, c))
    listed["ignored rows"] = lambda: matches_float64("cpu", "head learns", False, ignored=True)
    listed["ignored rows, entropy grad"] = lambda: matches_float64("cpu", "entropy grad", True, ignored=True)
    listed["budget chunks on uneven shards"] = budget_chunks_on_uneven_shards
    listed["reduce_hidden_grad=False"] = partial_hidden_grads_sum_to_the_whole
    listed["token id past the global vocabulary"] = token_past_the_vocabulary_raises_on_every_rank
    listed["metrics refused"] = metrics_refused
    return listed


def shard_inputs(rows=(4, 9), seed=0, ignored=False):
    """The same whole-head inputs on every rank, and this rank's (start, stop)."""
    inputs = make_inputs(rows, 16, VOCAB, seed=seed)
    if ignored:
        inputs["token_ids"].view(-1)[::3] = -100
    return inputs, RANGES[dist.get_rank()]


def run(inputs, trainable, terms, vocab_range=None, dtype=None, ignore_index=-100, **settings):
    """(log-probs, entropy, {name: grad}) of a weighted sum of the `terms`: over this rank's shard of the head when
    `vocab_range` is given, else float64 math on the whole head (ignored rows zeroed)."""
    leaves = {name: (value.detach().to(dtype or value.dtype) if name != "token_ids" and value is not None else value)
              for name, value in inputs.items()}
    if vocab_range is not None:
        start, stop = vocab_range
        leaves["weight"], leaves["bias"] = leaves["weight"][start:stop], leaves["bias"][start:stop]
    for name in trainable:
        leaves[name] = leaves[name].clone().requires_grad_(True)
    if dtype is torch.float64:
        ignored = leaves["token_ids"] == ignore_index
        settings = {key: value for key, value in settings.items() if key not in ("chunk_size", "backend",
                                                                                   "entropy_grad")}
        logprobs, entropy = reference(**{**leaves, "token_ids": leaves["token_ids"].clamp_min(0)}, **settings)
        zero = torch.zeros((), dtype=logprobs.dtype)
        logprobs, entropy = torch.where(ignored, zero, logprobs), torch.where(ignored, zero, entropy)
    else:
        group = dict(process_group=dist.group.WORLD, vocab_range=vocab_range)
        logprobs, entropy = kdfast.linear_token_logprobs(**leaves, return_entropy=True, ignore_index=ignore_index,
                                                         **group, **settings)
    weighted_sum(logprobs, entropy, terms).backward()
    return logprobs, entropy, {name: leaves[name].grad for name in trainable}


def assert_close(ours, theirs, vocab_range, tolerance=2e-5):
    start, stop = vocab_range
    for what, value, expected in (("log-probs", ours[0], theirs[0]), ("entropy", ours[1], theirs[1])):
        torch.testing.assert_close(value.double(), expected, rtol=tolerance, atol=tolerance,
                                   msg=lambda text, what=what: f"{what}: {text}")
    for name, grad in ours[2].items():
        expected = theirs[2][name] if name == "hidden" else theirs[2][name][start:stop]
        torch.testing.assert_close(grad.double(), expected, rtol=tolerance, atol=tolerance,
                                   msg=lambda text, name=name: f"d {name}: {text}")


def matches_float64(backend, path, capped, ignored=False):
    trainable, terms, entropy_grad = PATHS[path]
    inputs, vocab_range = shard_inputs(rows=(2, 5) if backend == "triton" else (4, 9), ignored=ignored)
    settings = dict(softcap=4.0, temperature=0.7, logit_scale=1.3) if capped else dict(temperature=1.0)
    ours = run(inputs, trainable, terms, vocab_range, backend=backend, chunk_size=7, entropy_grad=entropy_grad,
               **settings)
    theirs = run(inputs, trainable, terms, dtype=torch.float64, **settings)
    assert_close(ours, theirs, vocab_range)


def budget_chunks_on_uneven_shards():
    """Chunks from a memory budget: a budget that, sized by each rank's own width (4 bytes a column, the log-probs'
    gradient alone), would give the ranks different chunks (16 rows on the 79- and 61-column shards, 64 on the
    17-column one); sized by the widest shard, every rank runs the same six chunks of 16 rows."""
    from kdfast import cpu_gemm, linear_chunks

    inputs, vocab_range = shard_inputs(rows=(96,))
    # Where oneDNN runs the float32 products, the chunks take a quarter of the budget (kdfast.token_logprobs).
    budget = 16 * 79 * 4 * (4 if cpu_gemm.on_onednn(inputs["hidden"], inputs["weight"]) else 1)
    saved = dict(linear_chunks.CHUNK_BUDGET_BYTES)
    linear_chunks.CHUNK_BUDGET_BYTES["cpu"] = budget
    try:
        ours = run(inputs, ("hidden", "weight", "bias"), "logprobs", vocab_range, chunk_size="auto")
    finally:
        linear_chunks.CHUNK_BUDGET_BYTES.clear()
        linear_chunks.CHUNK_BUDGET_BYTES.update(saved)
    assert_close(ours, run(inputs, ("hidden", "weight", "bias"), "logprobs", dtype=torch.float64), vocab_range)


def partial_hidden_grads_sum_to_the_whole():
    inputs, vocab_range = shard_inputs()
    for trainable, entropy_grad in ((("hidden", "weight"), True), (("hidden",), False)):
        hidden = inputs["hidden"].clone().requires_grad_(True)
        weight = inputs["weight"][slice(*vocab_range)].clone().requires_grad_("weight" in trainable)
        logprobs = kdfast.linear_token_logprobs(hidden, weight, inputs["token_ids"],
                                                bias=inputs["bias"][slice(*vocab_range)],
                                                process_group=dist.group.WORLD, vocab_range=vocab_range,
                                                reduce_hidden_grad=False, entropy_grad=entropy_grad)
        weighted_sum(logprobs, logprobs, "logprobs").backward()
        total = hidden.grad.clone()
        dist.all_reduce(total)
        whole = run(inputs, ("hidden",), "logprobs", dtype=torch.float64)[2]["hidden"]
        torch.testing.assert_close(total.double(), whole, rtol=2e-5, atol=2e-5)
        assert not torch.allclose(hidden.grad.double(), whole, atol=1e-3), "each rank's part alone is not the whole"


def token_past_the_vocabulary_raises_on_every_rank():
    inputs, vocab_range = shard_inputs()
    inputs["token_ids"][0, 0] = VOCAB  # every rank's own shard is narrower anyway: only the exchange can tell
    with pytest.raises(ValueError, match=rf"token_ids must lie in \[0, {VOCAB}\) \(global token ids\); found {VOCAB}"):
        run(inputs, ("hidden",), "logprobs", vocab_range)
    inputs["token_ids"][0, 0] = -100  # no ignore_index: refused on every rank by its own check, then the exchange
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, the global vocabulary\); found -100"):
        run(inputs, ("hidden",), "logprobs", vocab_range, ignore_index=None)


def metrics_refused():
    from kdfast.token_logprobs import linear_token_outputs

    inputs, vocab_range = shard_inputs()
    weight = inputs["weight"][slice(*vocab_range)]
    with pytest.raises(ValueError, match=r"metrics \['is_top1'\] are not computed over vocab shards"):
        linear_token_outputs(inputs["hidden"], weight, inputs["token_ids"], metrics=("is_top1",),
                             process_group=dist.group.WORLD, vocab_range=vocab_range)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases, WORLD, tmp_path_factory.mktemp("token_logprobs_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_vocab_parallel(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed


def test_vocab_range_without_group_is_refused():
    inputs = make_inputs((3,), 8, 20)
    with pytest.raises(ValueError, match="vocab_range needs a process_group"):
        kdfast.linear_token_logprobs(**inputs, vocab_range=(0, 20))
