"""Every loss inside a torch.compile'd step gives the eager step's loss and input gradient. The logits-level
`distill_loss`, `sparse_distill_loss`, `multi_teacher_distill_loss` and `cross_vocab_distill_loss` (its ULD where the
C++ passes run it) are torch.library ops, and so are the chunk loops of `linear_distill_loss`,
`linear_sparse_distill_loss`, `linear_multi_teacher_distill_loss`, `linear_cross_vocab_distill_loss` and
`linear_token_logprobs` (tests/test_compile_multi_teacher_logits.py, tests/test_compile_cross_vocab.py,
tests/test_compile_linear.py, tests/test_compile_multi_teacher.py, tests/test_compile_linear_cross_vocab.py,
tests/test_compile_token_logprobs.py), so a step compiles whole (fullgraph=True) with each; the vocab shards' losses
and ULD's torch form (a GPU's) are driven from the host and run where a compiled step calls them, a graph break
(README, "Backends"). AOTAutograd's eager backend traces the graph as inductor would, without compiling C++ for it."""

import pytest
import torch
from helpers import make_labels, make_logits
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, small_vocab_map

import kdfast

ROWS, VOCAB, HIDDEN = 6, 40, 8


def _inputs():
    generator = torch.Generator().manual_seed(3)
    student, teacher = make_logits((ROWS, VOCAB), torch.float32)
    return {
        "student": student,
        "teacher": teacher,
        "second_teacher": make_logits((ROWS, VOCAB), torch.float32, seed=1)[1],
        "labels": make_labels((ROWS,), VOCAB, "some"),
        "hidden": torch.randn(ROWS, HIDDEN, generator=generator),
        "weight": torch.randn(VOCAB, HIDDEN, generator=generator) / 3,
        "teacher_hidden": torch.randn(ROWS, HIDDEN, generator=generator),
        "teacher_weight": torch.randn(VOCAB, HIDDEN, generator=generator) / 3,
        "ids": torch.randperm(VOCAB, generator=generator)[:5].repeat(ROWS, 1),
        "logprobs": torch.randn(ROWS, 5, generator=generator).log_softmax(-1),
    }


def _losses():
    """name -> (what the step's model makes: "logits" or "hidden", loss of (model output, inputs), fullgraph)."""
    vocab_map = small_vocab_map()
    return {
        "distill_loss": ("logits", lambda x, d: kdfast.distill_loss(
            x, d["teacher"], d["labels"], divergence="jsd", ce_weight=0.5, temperature=2.0), True),
        "sparse_distill_loss": ("logits", lambda x, d: kdfast.sparse_distill_loss(
            x, d["ids"], d["logprobs"], d["labels"], ce_weight=0.5), True),
        "multi_teacher_distill_loss": ("logits", lambda x, d: kdfast.multi_teacher_distill_loss(
            x, [d["teacher"], d["second_teacher"]], d["labels"], weights=[0.25, 0.75], ce_weight=0.5), True),
        "cross_vocab_distill_loss": ("logits", lambda x, d: kdfast.cross_vocab_distill_loss(
            x[:, :STUDENT_VOCAB], d["teacher"][:, :TEACHER_VOCAB], d["labels"] % STUDENT_VOCAB,
            vocab_map=vocab_map, method="hybrid", ce_weight=0.5), True),
        "linear_distill_loss": ("hidden", lambda x, d: kdfast.linear_distill_loss(
            x, d["weight"], d["teacher_hidden"], d["teacher_weight"], d["labels"], ce_weight=0.5), True),
        "linear_sparse_distill_loss": ("hidden", lambda x, d: kdfast.linear_sparse_distill_loss(
            x, d["weight"], d["ids"], d["logprobs"], d["labels"], ce_weight=0.5), True),
        "linear_multi_teacher_distill_loss": ("hidden", lambda x, d: kdfast.linear_multi_teacher_distill_loss(
            x, d["weight"], [d["teacher_hidden"]] * 2, [d["teacher_weight"], d["teacher_weight"] * 0.5],
            d["labels"]), True),
        "linear_cross_vocab_distill_loss": ("hidden", lambda x, d: kdfast.linear_cross_vocab_distill_loss(
            x, d["weight"][:STUDENT_VOCAB], d["teacher_hidden"], d["teacher_weight"][:TEACHER_VOCAB],
            d["labels"] % STUDENT_VOCAB, vocab_map=vocab_map, method="uld"), True),
        "linear_token_logprobs": ("hidden", lambda x, d: kdfast.linear_token_logprobs(
            x, d["weight"], d["labels"].clamp_min(0)).sum(), True),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_compiled_step_equals_eager(name):
    made_from, loss_of, fullgraph = _losses()[name]
    data = _inputs()
    start = data["student"] if made_from == "logits" else data["hidden"]

    def step(x):  # a model in front of the loss, so that the compiled graph holds work of its own
        return loss_of(torch.tanh(x) * 3.0, data)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=fullgraph)
    results = []
    for run in (step, compiled, compiled):  # the compiled step twice: its second call runs the cached graph
        x = start.clone().requires_grad_(True)
        loss = run(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


def _eager_and_compiled(step, compiled, start, *args):
    results = []
    for run in (step, compiled):
        x = start.clone().requires_grad_(True)
        loss = run(x, *args)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (expected, expected_grad) = results[1], results[0]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [name for name, (_, _, fullgraph) in _losses().items() if fullgraph])
def test_dynamic_shapes_compile_whole(name):
    """torch.compile(dynamic=True) traces every size as a symbol from the first call. The settings' checks once
    called math.isfinite, which TorchDynamo takes for a torch op returning a bool there: a graph break on every
    loss, an error under fullgraph=True."""
    made_from, loss_of, _ = _losses()[name]
    data = _inputs()

    def step(x):
        return loss_of(torch.tanh(x) * 3.0, data)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    _eager_and_compiled(step, compiled, data["student"] if made_from == "logits" else data["hidden"])


def test_a_temperature_passed_in_compiles_whole_at_each_value():
    """A float argument of the compiled function is a symbol under dynamic=True (and after its value changed, under
    automatic dynamic shapes): kdfast's settings guard on it, a graph per value, and break nothing."""
    from torch._dynamo.utils import counters

    data = _inputs()

    def step(x, temperature):
        return kdfast.distill_loss(torch.tanh(x) * 3.0, data["teacher"], data["labels"], ce_weight=0.5,
                                   temperature=temperature)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for temperature in (2.0, 3.0, 2.0):
        _eager_and_compiled(step, compiled, data["student"], temperature)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
