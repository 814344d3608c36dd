"""`cross_vocab_distill_loss` inside a torch.compile'd step with fullgraph=True (kdfast.cross_vocab_ops: the rows as
one custom op, the gradient fresh or written over the student): the eager step's loss, components and gradient for
every method (ULD and the hybrid where the C++ passes run them), rows aligned one to one or through a
`TokenAlignment` (merged tokens included), per-row losses weighed, in place, the hybrid's own weights; the ops pass
torch.library's own checks; elsewhere ULD still gives the eager step's answer, called as it is."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import assert_compiled_step_equals_eager, weighted_step_outputs
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, compiled_backends, small_alignment, small_vocab_map

import kdfast
from kdfast import cross_vocab_ops
from kdfast.options import LossOptions

CASES = {
    "hybrid, ce, components": dict(method="hybrid", ce_weight=0.5, return_components=True),
    "hybrid, reverse KL, own weights, sum": dict(method="hybrid", divergence="reverse_kl", matched_weight=0.7,
                                                 unmatched_weight=0.2, reduction="sum"),
    "uld, temperatures": dict(method="uld", student_temperature=2.0, teacher_temperature=1.5),
    "mapped, jsd": dict(method="mapped", divergence="jsd", ce_weight=0.3),
    "mapped, in place": dict(method="mapped", divergence="reverse_kl", inplace_backward=True),
    "hybrid, per row": dict(method="hybrid", reduction="none"),
    "hybrid, aligned, components": dict(method="hybrid", aligned=True, ce_weight=0.5, return_components=True),
    "uld, aligned, per row": dict(method="uld", aligned=True, reduction="none"),
    "mapped, aligned": dict(method="mapped", aligned=True, divergence="tvd"),
}
GPU_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cuda"]


def _inputs(device="cpu"):
    generator = torch.Generator().manual_seed(8)
    data = {"student": torch.randn(2, 5, STUDENT_VOCAB, generator=generator),
            "teacher": torch.randn(2, 5, TEACHER_VOCAB, generator=generator) * 2,
            "labels": torch.randint(0, STUDENT_VOCAB, (2, 5), generator=generator)}
    data["labels"][0, 1] = -100
    return {key: value.to(device) for key, value in data.items()}


def _step(data, settings):
    settings = dict(settings)
    vocab_map = small_vocab_map()
    if settings.pop("aligned", False):
        alignment = small_alignment()
        labels = torch.tensor([3, -100, 5], device=data["labels"].device)[:alignment.groups]

        def step(student):  # rows of one sequence, read through the alignment
            return kdfast.cross_vocab_distill_loss(torch.tanh(student[0]) * 3.0, data["teacher"][1], labels,
                                                   vocab_map=vocab_map, alignment=alignment, **settings)
    else:
        def step(student):  # a model in front of the loss: the in-place gradient overwrites its output, not the leaf
            return kdfast.cross_vocab_distill_loss(torch.tanh(student) * 3.0, data["teacher"], data["labels"],
                                                   vocab_map=vocab_map, **settings)

    return step


def _run(step, data):
    return weighted_step_outputs(step, [data["student"].clone().requires_grad_(True)])


@pytest.mark.parametrize("case, backend", compiled_backends(CASES, GPU_BACKENDS))
def test_fullgraph_step_equals_eager(case, backend):
    data = _inputs(device_for(backend))
    assert_compiled_step_equals_eager(_step(data, {**CASES[case], "backend": backend}), _run, data,
                                      ("kd", "ce", "entropy", "accuracy", "matched", "unmatched"))


def test_the_ops_pass_torch_librarys_checks():
    data = _inputs()
    vocab_map = small_vocab_map()
    student, teacher = data["student"].reshape(-1, STUDENT_VOCAB), data["teacher"].reshape(-1, TEACHER_VOCAB)
    labels, scale = data["labels"].reshape(-1), torch.full((), 0.1)
    aligned = cross_vocab_ops.alignment_tensors(small_alignment())
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    for method, alignment, weights, opts in (("hybrid", [], (None, None), LossOptions(ce_weight=0.5)),
                                             ("uld", aligned, (None, None), LossOptions()),
                                             ("mapped", [], (None, None), LossOptions(divergence="jsd")),
                                             ("hybrid", aligned, (0.7, 0.2), LossOptions(divergence="reverse_kl"))):
        rows_labels = labels[:aligned[8].numel()] if alignment else labels
        inputs = (teacher[:5] if alignment else teacher, rows_labels, scale, vocab_map.student_ids,
                  vocab_map.teacher_ids, vocab_map.student_size, vocab_map.teacher_size, alignment, method, 1.0,
                  *weights, opts.encoded())
        torch.library.opcheck(cross_vocab_ops.cross_vocab_forward, (student[:5] if alignment else student, *inputs,
                                                                    True), test_utils=checks)
        if not alignment:
            torch.library.opcheck(cross_vocab_ops.cross_vocab_forward_inplace, (student.clone(), *inputs),
                                  test_utils=checks)


@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_uld_in_torch_runs_as_it_is_inside_a_compiled_step(method):
    data = _inputs()
    step = _step(data, {"method": method, "backend": "torch", "ce_weight": 0.5})
    torch._dynamo.reset()
    expected, got = _run(step, data), _run(torch.compile(step, backend="aot_eager"), data)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2][0], expected[2][0], rtol=1e-6, atol=1e-7)


def test_a_map_or_alignment_of_other_rows_is_refused_inside_a_compiled_step():
    # Their values are read inside the op (a read while tracing would break the graph), before a kernel reads them.
    data, vocab_map = _inputs(), small_vocab_map()
    narrow = data["teacher"][..., :TEACHER_VOCAB - 2]  # the map names teacher ids up to TEACHER_VOCAB - 1

    def step(student):
        return kdfast.cross_vocab_distill_loss(student, narrow, data["labels"], vocab_map=vocab_map)

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="the map was built from another tokenizer"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(data["student"].clone().requires_grad_(True))
    alignment = small_alignment()

    def aligned(student):  # one sequence's rows: 2 student rows where the alignment names 4
        return kdfast.cross_vocab_distill_loss(student[0, :2], data["teacher"][1], vocab_map=vocab_map,
                                               alignment=alignment)

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="alignment names a group's row 3 but student_logits has 2 rows"):
        torch.compile(aligned, backend="aot_eager", fullgraph=True)(data["student"].clone().requires_grad_(True))
