"""`return_components="per_row"`: the components one value per row (what reduction="none" gives) while the loss is
reduced as asked, in every form and on every backend; the loss and its gradient are those of
`return_components=True`. A trainer logs per-sequence or per-teacher metrics from them without a second call."""

import dataclasses

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels, make_logits, teacher_topk
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, small_vocab_map

import kdfast

ROWS, VOCAB, HIDDEN, K = 6, 40, 8, 5
SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4, z_loss_weight=1e-3)


def _inputs(device):
    generator = torch.Generator().manual_seed(5)
    student, teacher = make_logits((ROWS, VOCAB), torch.float32)
    ids, logprobs = teacher_topk(teacher, K, 2.0)
    data = {"student": student, "teacher": teacher, "second_teacher": make_logits((ROWS, VOCAB), torch.float32,
                                                                                  seed=1)[1],
            "labels": make_labels((ROWS,), VOCAB, "some"), "ids": ids, "logprobs": logprobs,
            "hidden": torch.randn(ROWS, HIDDEN, generator=generator),
            "weight": torch.randn(VOCAB, HIDDEN, generator=generator) / 3,
            "teacher_hidden": torch.randn(ROWS, HIDDEN + 2, generator=generator),
            "teacher_weight": torch.randn(VOCAB, HIDDEN + 2, generator=generator) / 3}
    return {name: value.to(device) for name, value in data.items()}


def _forms():
    """form -> (what takes the gradient: "student" or "hidden", loss of (leaf, inputs, settings))."""
    vocab_map = small_vocab_map()
    return {
        "logits": ("student", lambda x, d, s: kdfast.distill_loss(x, d["teacher"], d["labels"], **s)),
        "sparse": ("student", lambda x, d, s: kdfast.sparse_distill_loss(x, d["ids"], d["logprobs"], d["labels"],
                                                                           **s)),
        "several teachers": ("student", lambda x, d, s: kdfast.multi_teacher_distill_loss(
            x, [d["teacher"], d["second_teacher"]], d["labels"], weights=[0.25, 0.75], **s)),
        "cross-vocab hybrid": ("student", lambda x, d, s: kdfast.cross_vocab_distill_loss(
            x[:, :STUDENT_VOCAB], d["teacher"][:, :TEACHER_VOCAB], d["labels"] % STUDENT_VOCAB, vocab_map=vocab_map,
            method="hybrid", **s)),
        "linear": ("hidden", lambda x, d, s: kdfast.linear_distill_loss(
            x, d["weight"], d["teacher_hidden"], d["teacher_weight"], d["labels"], chunk_size=4, **s)),
        "linear sparse": ("hidden", lambda x, d, s: kdfast.linear_sparse_distill_loss(
            x, d["weight"], d["ids"], d["logprobs"], d["labels"], chunk_size=4, **s)),
        "linear several teachers": ("hidden", lambda x, d, s: kdfast.linear_multi_teacher_distill_loss(
            x, d["weight"], [d["teacher_hidden"]] * 2, [d["teacher_weight"], d["teacher_weight"] * 0.5],
            d["labels"], chunk_size=4, **s)),
    }


def _run(form, backend, reduction, components):
    made_from, loss_of = _forms()[form]
    data = _inputs(device_for(backend))
    settings = dict(SETTINGS, backend=backend, reduction=reduction, return_components=components)
    if form.startswith("cross-vocab"):  # its settings: no z-loss
        settings.pop("z_loss_weight")
    leaf = data[made_from].clone().requires_grad_(True)
    loss, parts = loss_of(leaf, data, settings)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), leaf.grad, parts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", list(_forms()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_row_components_are_those_of_reduction_none(backend, form, reduction):
    loss, grad, per_row = _run(form, backend, reduction, "per_row")
    reduced_loss, reduced_grad, reduced_parts = _run(form, backend, reduction, True)
    _, _, rows = _run(form, backend, "none", True)
    torch.testing.assert_close(loss, reduced_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, reduced_grad, rtol=0, atol=0)
    checked = 0
    for field in dataclasses.fields(per_row):
        mine, theirs = getattr(per_row, field.name), getattr(rows, field.name)
        assert (mine is None) == (theirs is None) == (getattr(reduced_parts, field.name) is None), field.name
        if mine is not None:
            assert mine.shape == theirs.shape and mine.shape[0] == ROWS, field.name
            # no component carries a graph (several teachers' once did: a second mark_non_differentiable replaced
            # the first)
            for value in (mine, theirs, getattr(reduced_parts, field.name)):
                assert not value.requires_grad, field.name
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=field.name)
            checked += 1
    assert checked >= 4  # kd, ce, accuracy, entropy at least


def test_per_row_sums_give_the_sum_reductions_components():
    _, _, per_row = _run("logits", "torch", "sum", "per_row")
    _, _, summed = _run("logits", "torch", "sum", True)
    for name in ("kd", "ce", "z_loss", "entropy"):
        torch.testing.assert_close(getattr(per_row, name).sum(), getattr(summed, name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", ["rows", "none", "PER_ROW"])
def test_other_values_are_refused(value):
    data = _inputs("cpu")
    with pytest.raises(ValueError, match="return_components must be True, False or 'per_row'"):
        kdfast.distill_loss(data["student"], data["teacher"], data["labels"], return_components=value)
