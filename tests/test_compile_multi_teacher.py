"""`linear_multi_teacher_distill_loss` inside a torch.compile'd step with fullgraph=True (kdfast.linear_multi_ops: the
chunk loop as one custom op): the eager step's loss, each teacher's divergence and the gradients to hidden, weight and
bias, for both combine modes, every weights mode (routing included, with hidden states of each teacher's own rows),
per-row losses weighed, teachers given as their logits (beside heads, as views) and autocast; the op passes
torch.library's own checks."""

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
from kdfast import linear_multi_ops
from kdfast.options import LossOptions

ROWS, VOCAB, HIDDEN, TEACHER_HIDDEN = 12, 40, 8, (12, 6)
CASES = {
    "mixture": dict(),
    "average, static weights, sum": dict(combine="average", weights=[1.0, 3.0], reduction="sum"),
    "per-row weights, components": dict(weights="rows", return_components=True, divergence="jsd"),
    "confidence, softcaps, chunks": dict(weights="confidence", teacher_softcap=[None, 4.0], softcap=None,
                                         student_softcap=3.0, chunk_size=5, ce_weight=0.5),
    "min_ce, average, components": dict(weights="min_ce", combine="average", return_components=True),
    "routed": dict(weights="routed", ce_weight=0.3),
    "routed, own rows, components": dict(weights="routed", own_rows=True, return_components=True, chunk_size=4),
    # Per-row losses, weighed: the compiled backward runs the op again with each row's grad_output.
    "per row": dict(reduction="none", chunk_size=4, teacher_bias=True),
    "per row, routed, own rows": dict(reduction="none", weights="routed", own_rows=True),
    # Teachers given as their logits (`given`: their indices; the op takes them as given, no head).
    "given logits, confidence, components": dict(given=(0, 1), weights="confidence", return_components=True),
    "a head and given logits, routed, own rows": dict(given=(1,), weights="routed", own_rows=True, chunk_size=4,
                                                      teacher_bias=True),
    "given logits as a view, per row": dict(given=(0,), view=True, reduction="none", chunk_size=4),
}
COMPILE_BACKENDS = ["cpu"] + [backend for backend in BACKENDS if device_for(backend) == "cuda"]


def _inputs(device="cpu"):
    generator = torch.Generator().manual_seed(3)
    data = {"hidden": torch.randn(2, ROWS // 2, HIDDEN, generator=generator),
            "weight": torch.randn(VOCAB, HIDDEN, generator=generator) / 2,
            "bias": torch.randn(VOCAB, generator=generator),
            "teacher_hidden": [torch.randn(2, ROWS // 2, size, generator=generator) for size in TEACHER_HIDDEN],
            "teacher_weight": [torch.randn(VOCAB, size, generator=generator) / 2 for size in TEACHER_HIDDEN],
            "teacher_bias": [None, torch.randn(VOCAB, generator=generator)],
            "labels": make_labels((2, ROWS // 2), VOCAB, "some"),
            "rows": torch.rand(2, ROWS // 2, 2, generator=generator) + 0.1,
            "route": torch.randint(0, 2, (2, ROWS // 2), generator=generator)}
    return {key: [t.to(device) if t is not None else None for t in value] if isinstance(value, list)
            else value.to(device) for key, value in data.items()}


def _step(data, settings):
    settings = dict(settings)
    own_rows = settings.pop("own_rows", False)
    teacher_bias = data["teacher_bias"] if settings.pop("teacher_bias", False) else None
    weights = settings.pop("weights", None)
    weights = {"rows": data["rows"], "routed": data["route"]}.get(weights, weights) \
        if isinstance(weights, str) else weights
    hidden, heads = list(data["teacher_hidden"]), list(data["teacher_weight"])
    given, view = settings.pop("given", ()), settings.pop("view", False)
    for index in given:  # this teacher given as its logits [2, ROWS // 2, V] (a view of a longer tensor: `view`)
        logits = torch.nn.functional.linear(hidden[index], heads[index], (teacher_bias or data["teacher_bias"])[index])
        hidden[index] = torch.cat([logits, logits[:, :1]], dim=1)[:, :-1] if view else logits
        heads[index] = None
        if teacher_bias is not None:
            teacher_bias = [None if each == index else bias for each, bias in enumerate(teacher_bias)]
    if own_rows:  # each teacher's hidden states (or logits) of its own rows alone
        hidden = [rows[data["route"] == index] for index, rows in enumerate(hidden)]

    def step(student_hidden, weight, bias):
        return kdfast.linear_multi_teacher_distill_loss(student_hidden, weight, hidden, heads, data["labels"],
                                                        student_bias=bias, teacher_bias=teacher_bias,
                                                        weights=weights, **settings)

    return step


def _run(step, data):
    return weighted_step_outputs(step, [data[name].clone().requires_grad_(True) for name in ("hidden", "weight",
                                                                                           "bias")])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_step_equals_eager(case, backend):
    data = _inputs(device_for(backend))
    assert_compiled_step_equals_eager(_step(data, {**CASES[case], "backend": backend}), _run, data,
                                      ("kd", "ce", "entropy", "teachers"))


def test_fullgraph_step_under_autocast_equals_eager():
    data = _inputs()
    assert_compiled_under_autocast_equals_eager(_step(data, {"weights": "routed", "ce_weight": 0.5}), _run, data)


def test_the_op_passes_torch_librarys_checks():
    data = _inputs()
    hidden, teachers = data["hidden"].reshape(ROWS, HIDDEN), [t.reshape(ROWS, -1) for t in data["teacher_hidden"]]
    log_weights = torch.log(data["rows"].reshape(ROWS, 2) / data["rows"].reshape(ROWS, 2).sum(-1, keepdim=True))
    settings = (1.0, 0.0, [1.0, 1.0], [0.0, 4.0], "float32,float32,float32", 0, False, "mixture",
                LossOptions(ce_weight=0.5).encoded())
    # The second teacher given as its logits: no head, no bias.
    given = ([teachers[0], teachers[1] @ data["teacher_weight"][1].t()], [data["teacher_weight"][0], None],
             [None, None])
    for weights, route, row_weights, wanted, teacher_args in (
            (log_weights, None, None, (True, True, True, True),
             (teachers, data["teacher_weight"], data["teacher_bias"])),
            (None, data["route"].reshape(-1), torch.rand(ROWS), (True, False, True, False),
             (teachers, data["teacher_weight"], data["teacher_bias"])),
            (log_weights, None, None, (True, True, False, True), given)):
        args = (hidden, data["weight"], data["bias"], *teacher_args, weights, route, data["labels"].reshape(-1),
                torch.full((), 0.1), row_weights, *wanted, *settings)
        torch.library.opcheck(linear_multi_ops.linear_multi_teacher_forward, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
