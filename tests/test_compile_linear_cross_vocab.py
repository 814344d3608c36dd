"""`linear_cross_vocab_distill_loss` inside a torch.compile'd step with fullgraph=True (kdfast.linear_cross_vocab_ops:
the chunk loop as one custom op): the eager step's loss, components and gradients to the student's hidden states, head
and bias for every method (ULD and the hybrid where the C++ passes run them), rows aligned one to one or through a
`TokenAlignment`, per-row losses weighed (the op run again in backward), logit maps and chunks; the op passes
torch.library's own checks; a map of another tokenizer is refused inside the compiled step."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import assert_compiled_step_equals_eager, weighted_step_outputs
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, compiled_backends, small_alignment, small_vocab_map

import kdfast
from kdfast import cross_vocab_ops, linear_cross_vocab_ops
from kdfast.options import LossOptions

HIDDEN, TEACHER_HIDDEN = 6, 10
CASES = {
    "hybrid, ce, components": dict(method="hybrid", ce_weight=0.5, return_components=True),
    "uld, softcaps, chunks": dict(method="uld", student_softcap=3.0, teacher_softcap=5.0, chunk_size=3),
    "mapped, jsd, logit scale": dict(method="mapped", divergence="jsd", teacher_logit_scale=0.5),
    "hybrid, per row": dict(method="hybrid", reduction="none", chunk_size=4),
    "hybrid, aligned, components": dict(method="hybrid", aligned=True, ce_weight=0.5, return_components=True),
    "uld, aligned, per row": dict(method="uld", aligned=True, reduction="none"),
    "mapped, aligned": dict(method="mapped", aligned=True, divergence="tvd"),
}
GPU_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cuda"]


def _inputs(device="cpu"):
    generator = torch.Generator().manual_seed(9)
    data = {"hidden": torch.randn(2, 5, HIDDEN, generator=generator),
            "weight": torch.randn(STUDENT_VOCAB, HIDDEN, generator=generator) / 2,
            "bias": torch.randn(STUDENT_VOCAB, generator=generator),
            "teacher_hidden": torch.randn(2, 5, TEACHER_HIDDEN, generator=generator),
            "teacher_weight": torch.randn(TEACHER_VOCAB, TEACHER_HIDDEN, generator=generator) / 2,
            "teacher_bias": torch.randn(TEACHER_VOCAB, generator=generator),
            "labels": torch.randint(0, STUDENT_VOCAB, (2, 5), generator=generator)}
    data["labels"][0, 1] = -100
    return {key: value.to(device) for key, value in data.items()}


def _step(data, settings, vocab_map):
    settings = dict(settings)
    alignment = small_alignment() if settings.pop("aligned", False) else None
    teacher = {"teacher_hidden": data["teacher_hidden"], "teacher_weight": data["teacher_weight"]}
    labels = data["labels"]
    if alignment is not None:  # one sequence's rows, read through the alignment
        teacher = {"teacher_hidden": data["teacher_hidden"][1], "teacher_weight": data["teacher_weight"]}
        labels = torch.tensor([3, -100, 5, 2], device=labels.device)[:alignment.groups]

    def step(hidden, weight, bias):
        hidden = hidden[0] if alignment is not None else hidden
        return kdfast.linear_cross_vocab_distill_loss(
            hidden, weight, teacher["teacher_hidden"], teacher["teacher_weight"], labels, student_bias=bias,
            teacher_bias=data["teacher_bias"], vocab_map=vocab_map, alignment=alignment, **settings)

    return step


def _run(step, data):
    return weighted_step_outputs(step, [data[name].clone().requires_grad_(True) for name in ("hidden", "weight",
                                                                                           "bias")])


@pytest.mark.parametrize("case, backend", compiled_backends(CASES, GPU_BACKENDS))
def test_fullgraph_step_equals_eager(case, backend):
    data = _inputs(device_for(backend))
    assert_compiled_step_equals_eager(_step(data, {**CASES[case], "backend": backend}, small_vocab_map()), _run,
                                      data, ("kd", "ce", "entropy", "accuracy", "matched", "unmatched"))


def test_the_op_passes_torch_librarys_checks():
    data = _inputs()
    vocab_map = small_vocab_map()
    aligned = cross_vocab_ops.alignment_tensors(small_alignment())
    hidden, teacher_hidden = data["hidden"].reshape(-1, HIDDEN), data["teacher_hidden"].reshape(-1, TEACHER_HIDDEN)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    for method, alignment, row_weights, opts in (("hybrid", [], None, LossOptions(ce_weight=0.5)),
                                                 ("uld", aligned, None, LossOptions()),
                                                 ("mapped", [], torch.rand(10), LossOptions(divergence="jsd"))):
        labels = data["labels"].reshape(-1)[:aligned[8].numel()] if alignment else data["labels"].reshape(-1)
        rows = slice(0, 5) if alignment else slice(None)
        args = (hidden[rows], data["weight"], data["bias"], teacher_hidden[rows], data["teacher_weight"],
                data["teacher_bias"], labels, torch.full((), 0.1), row_weights, True, True, True,
                vocab_map.student_ids, vocab_map.teacher_ids, vocab_map.student_size, vocab_map.teacher_size,
                alignment, method, 1.0, None, None, 1.0, 0.0, 1.0, 4.0, 0, opts.encoded())
        torch.library.opcheck(linear_cross_vocab_ops.linear_cross_vocab_forward, args, test_utils=checks)


def test_a_map_of_another_tokenizer_is_refused_inside_a_compiled_step():
    data, vocab_map = _inputs(), small_vocab_map()
    narrow = data["teacher_weight"][:TEACHER_VOCAB - 2]  # the map names teacher ids up to TEACHER_VOCAB - 1

    def step(hidden):
        return kdfast.linear_cross_vocab_distill_loss(hidden, data["weight"], data["teacher_hidden"], narrow,
                                                      data["labels"], vocab_map=vocab_map)

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="the map was built from another tokenizer"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(data["hidden"].clone().requires_grad_(True))
