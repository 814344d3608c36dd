"""`multi_teacher_distill_loss` inside a torch.compile'd step with fullgraph=True (kdfast.multi_teacher_ops: the rows
as one custom op, the gradient fresh or written over the student): the eager step's loss, components, each teacher's
divergence and gradient, for both combine modes, every weights mode (routing included), in place or not, per-row
losses weighed, a padded vocabulary and autocast; the ops pass torch.library's own checks."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import (
    assert_compiled_step_equals_eager,
    assert_compiled_under_autocast_equals_eager,
    make_labels,
    weighted_step_outputs,
)

import kdfast
from kdfast import multi_teacher_ops
from kdfast.options import LossOptions

ROWS, VOCAB, TEACHERS = 12, 40, 3
CASES = {
    "mixture": dict(),
    "average, static weights, jsd, sum": dict(combine="average", weights=[1.0, 3.0, 0.5], divergence="jsd",
                                              ce_weight=0.5, reduction="sum"),
    "per-row weights, components": dict(weights="rows", return_components=True, divergence="reverse_kl"),
    "confidence, temperature": dict(weights="confidence", temperature=2.0, ce_weight=0.3),
    "min_ce, average, components": dict(weights="min_ce", combine="average", return_components=True),
    "routed, in place": dict(weights="routed", inplace_backward=True, ce_weight=0.3),
    # The average's calls each read the student: the op writes its gradient there after them.
    "average, per-row weights, in place": dict(combine="average", divergence="jsd", weights="rows",
                                               inplace_backward=True),
    "per row": dict(reduction="none", divergence="skew_forward_kl", beta=0.2),
    "padded vocabulary, components": dict(vocab_size=VOCAB - 3, return_components=True, ce_weight=0.5),
    "teachers as one tensor, num_items_in_batch": dict(stacked=True, num_items_in_batch=7, ce_weight=0.5),
}
COMPILE_BACKENDS = ["cpu", "torch"] + [backend for backend in BACKENDS if device_for(backend) == "cuda"]


def _inputs(device="cpu"):
    generator = torch.Generator().manual_seed(5)
    data = {"student": torch.randn(2, ROWS // 2, VOCAB, generator=generator),
            "teachers": [torch.randn(2, ROWS // 2, VOCAB, generator=generator) * 2 for _ in range(TEACHERS)],
            "labels": make_labels((2, ROWS // 2), VOCAB - 3, "some"),
            "rows": torch.rand(2, ROWS // 2, TEACHERS, generator=generator) + 0.1,
            "route": torch.randint(0, TEACHERS, (2, ROWS // 2), generator=generator)}
    return {key: [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
            for key, value in data.items()}


def _step(data, settings):
    settings = dict(settings)
    teachers = torch.stack(data["teachers"]) if settings.pop("stacked", False) else data["teachers"]
    weights = settings.pop("weights", None)
    weights = {"rows": data["rows"], "routed": data["route"]}.get(weights, weights) \
        if isinstance(weights, str) else weights

    def step(student):  # a model in front of the loss: the in-place gradient overwrites its output, not the leaf
        return kdfast.multi_teacher_distill_loss(torch.tanh(student) * 3.0, teachers, data["labels"],
                                                 weights=weights, **settings)

    return step


def _run(step, data):
    return weighted_step_outputs(step, [data["student"].clone().requires_grad_(True)])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_step_equals_eager(case, backend):
    data = _inputs(device_for(backend))
    assert_compiled_step_equals_eager(_step(data, {**CASES[case], "backend": backend}), _run, data,
                                      ("kd", "ce", "entropy", "accuracy", "teachers"))


def test_fullgraph_step_under_autocast_equals_eager():
    data = _inputs()
    assert_compiled_under_autocast_equals_eager(_step(data, {"weights": "confidence", "ce_weight": 0.5}), _run, data)


def test_the_ops_pass_torch_librarys_checks():
    data = _inputs()
    student = data["student"].reshape(ROWS, VOCAB)
    teachers = [teacher.reshape(ROWS, VOCAB) for teacher in data["teachers"]]
    rows = data["rows"].reshape(ROWS, TEACHERS)
    log_weights = torch.log(rows / rows.sum(-1, keepdim=True))
    labels, scale = data["labels"].reshape(-1), torch.full((), 0.1)
    for combine, shares, opts in (("mixture", None, LossOptions(ce_weight=0.5, return_components=True)),
                                  ("average", [0.2, 0.3, 0.5], LossOptions(divergence="jsd", ce_weight=0.5)),
                                  ("average", None, LossOptions(divergence="reverse_kl", vocab_size=VOCAB - 3))):
        inputs = (teachers, log_weights, labels, scale, combine, shares, opts.encoded())
        checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
        torch.library.opcheck(multi_teacher_ops.multi_teacher_forward, (student, *inputs, True), test_utils=checks)
        torch.library.opcheck(multi_teacher_ops.multi_teacher_forward_inplace, (student.clone(), *inputs),
                              test_utils=checks)


@pytest.mark.parametrize("weights", [[1.0, -2.0, 1.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 1.0]])
@pytest.mark.parametrize("form", ["logits", "linear"])
def test_bad_static_weights_are_refused_under_compile_too(weights, form):
    # Checked in Python while tracing: a tensor's values cannot be read there, and the loss was NaN.
    data = _inputs()
    hidden, heads = torch.randn(ROWS, 8), [torch.randn(VOCAB, 8) for _ in range(TEACHERS)]

    def step(student):
        if form == "logits":
            return kdfast.multi_teacher_distill_loss(student, data["teachers"], data["labels"], weights=weights)
        return kdfast.linear_multi_teacher_distill_loss(student.reshape(ROWS, -1)[:, :8], heads[0], [hidden] * 3,
                                                        heads, data["labels"].reshape(-1), weights=weights)

    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"weights must be finite, >= 0 and not all 0"):
        torch.compile(step, backend="aot_eager")(data["student"].clone().requires_grad_(True))
