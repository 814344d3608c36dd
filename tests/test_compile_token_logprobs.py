"""`linear_token_logprobs` / `linear_token_outputs` inside a torch.compile'd step with fullgraph=True (kdfast.token_ops:
the forward's and the backward's chunk loops as custom ops): the eager step's log-probs, entropy, metrics and
gradients to hidden, weight and bias, for a head that learns and a frozen one, the entropy differentiated or only
read, every logit map; a frozen head whose entropy is only read takes d hidden in the forward there too; the ops pass
torch.library's own checks. AOTAutograd's eager backend traces the graph as inductor would, without compiling C++."""

import pytest
import torch
from conftest import BACKENDS, device_for
from test_token_logprobs import SETTINGS, make_inputs

import kdfast
from kdfast import token_ops
from kdfast.options import LossOptions
from kdfast.token_logprobs import linear_token_outputs

COMPILE_BACKENDS = ["cpu"] + [backend for backend in BACKENDS if device_for(backend) == "cuda"]
METRICS = ("is_top1", "mean_logits", "log_sum_sq_probs")


def _step(inputs, settings, entropy_term: bool, entropy_grad: bool, backend: str):
    bias_, logit_scale, softcap, temperature = settings
    weights = torch.linspace(0.5, 1.5, inputs["token_ids"].numel()).reshape(inputs["token_ids"].shape)

    def step(hidden, weight, bias):  # a model in front, so that the graph holds work of its own
        logprobs, entropy, metrics = linear_token_outputs(
            torch.tanh(hidden) * 2.0, weight, inputs["token_ids"], bias=bias, temperature=temperature,
            logit_scale=logit_scale, softcap=softcap, return_entropy=True, entropy_grad=entropy_grad,
            metrics=METRICS, chunk_size=4, backend=backend)
        loss = (weights.to(logprobs.device) * logprobs).sum()  # per-row gradients, as GRPO's advantages give
        if entropy_term:
            loss = loss + 0.1 * entropy.sum()
        return loss, logprobs, entropy, metrics
    return step


def _run(step, inputs, head_learns: bool, with_bias: bool):
    leaves = [inputs["hidden"].clone().requires_grad_(True), inputs["weight"].clone().requires_grad_(head_learns),
              inputs["bias"].clone().requires_grad_(head_learns) if with_bias else None]
    loss, logprobs, entropy, metrics = step(*leaves)
    loss.backward()
    return ([loss.detach(), logprobs.detach(), entropy.detach(), *(metrics[name] for name in METRICS)],
            [leaf.grad if leaf is not None else None for leaf in leaves])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("head_learns,entropy_term", [(True, True), (True, False), (False, True)])
def test_fullgraph_step_equals_eager(backend, settings, head_learns, entropy_term):
    inputs = make_inputs((2, 7), 8, 37, bias=settings[0], device=device_for(backend))
    step = _step(inputs, settings, entropy_term, True, backend)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    expected = _run(step, inputs, head_learns, settings[0])
    for _ in range(2):  # the second call runs the cached graph
        got = _run(compiled, inputs, head_learns, settings[0])
        for value, reference in zip(got[0], expected[0]):
            torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-6)
        for grad, reference in zip(got[1], expected[1]):
            assert (grad is None) == (reference is None)
            if grad is not None:
                torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [SETTINGS[1], SETTINGS[4]])
@pytest.mark.parametrize("entropy_term", [False, True])
def test_a_frozen_head_takes_d_hidden_in_the_forward_when_compiled(settings, entropy_term, backward_chunks_counted):
    """The entropy returned and said to be only read (entropy_grad=False): no chunk is recomputed in the compiled
    backward; a gradient that reaches the entropy after all is exact, the chunks recomputed, as eagerly."""
    inputs = make_inputs((2, 7), 8, 37, bias=settings[0])
    step = _step(inputs, settings, entropy_term, False, "auto")
    torch._dynamo.reset()
    expected = _run(step, inputs, False, settings[0])
    eager_chunks = len(backward_chunks_counted)
    got = _run(torch.compile(step, backend="aot_eager", fullgraph=True), inputs, False, settings[0])
    assert (eager_chunks > 0) == entropy_term and (len(backward_chunks_counted) > eager_chunks) == entropy_term
    torch.testing.assert_close(got[1][0], expected[1][0], rtol=1e-5, atol=1e-6)


def test_the_ops_pass_torch_librarys_checks():
    inputs = make_inputs((9,), 8, 37)
    hidden, weight, bias, ids = inputs["hidden"], inputs["weight"], inputs["bias"], inputs["token_ids"]
    settings = LossOptions(kd_weight=0.0, ce_weight=1.0, reduction="none").encoded()
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    for direct, metrics in ((False, (True, True, True)), (True, (False, False, False))):
        torch.library.opcheck(token_ops.token_logprobs_forward,
                              (hidden, weight, bias, ids, 1.3, 4.0, 0.7, torch.float32, False, 4, direct, *metrics,
                               settings),
                              test_utils=checks)
    logprobs, entropy = torch.randn(9).neg().abs().neg(), torch.rand(9)
    for grads, wanted in (((torch.rand(9), None), (True, True, True)), ((torch.rand(9), torch.rand(9)),
                                                                         (True, False, False))):
        torch.library.opcheck(token_ops.token_logprobs_backward,
                              (hidden, weight, bias, ids, logprobs, entropy, torch.empty(0), *grads, *wanted, 1.0,
                               0.0, 1.0, torch.float32, False, 0, settings), test_utils=checks)


def test_token_logprobs_alone_compile_whole():
    inputs = make_inputs((3, 5), 8, 37)

    def step(hidden):
        return kdfast.linear_token_logprobs(hidden * 2.0, inputs["weight"], inputs["token_ids"]).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    step(hidden).backward()
    expected, hidden.grad = hidden.grad, None
    compiled(hidden).backward()
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)
