"""`linear_student_cross_vocab_distill_loss`: a teacher of another tokenizer given as its logits, the student's head
fused. Equal to `cross_vocab_distill_loss` of the student's materialised logits (every method, with and without an
alignment that merges tokens, a student scale and softcap, small chunks, reductions "mean" and "none", a bf16 teacher
and a shifted view of its logits): loss, components and the gradients of the student's hidden states, weight and
bias; under torch.compile (fullgraph) as eager; bad input named."""

import pytest
import torch
from small_vocab_map import STUDENT_VOCAB, small_vocab_map
from test_linear_cross_vocab import CASES, alignment, heads, logits_of, seeded

import kdfast


@pytest.fixture(scope="module")
def vocab_map():
    return small_vocab_map()


def inputs(aligned: bool, teacher_dtype=torch.float32):
    """The student's heads, the teacher's logits (a view of the first rows of a longer tensor, in `teacher_dtype`),
    the alignment and labels."""
    tensors = heads(3)
    align = alignment() if aligned else None
    rows = align.groups if aligned else tensors["student_hidden"].shape[0]
    if not aligned:
        tensors["teacher_hidden"] = tensors["teacher_hidden"][:rows]
    teacher = logits_of(tensors, ((1.0, None), (1.0, None)))[1]
    longer = torch.cat([teacher, teacher[:1]]).to(teacher_dtype)
    labels = torch.randint(0, STUDENT_VOCAB, (rows,), generator=torch.Generator().manual_seed(1))
    labels[1] = -100
    return tensors, longer[:-1], align, labels


@pytest.mark.parametrize("method, divergence, aligned", CASES)
@pytest.mark.parametrize("student_map, reduction", [((1.0, None), "mean"), ((0.5, 3.0), "none")])
@pytest.mark.parametrize("teacher_dtype, column_major", [(torch.float32, False), (torch.bfloat16, False),
                                                         (torch.float32, True)])
def test_equals_the_logits_form(vocab_map, method, divergence, aligned, student_map, reduction, teacher_dtype,
                                column_major):
    """`column_major`: the teacher's rows are not one run in memory (each chunk's are gathered)."""
    tensors, teacher, align, labels = inputs(aligned, teacher_dtype)
    if column_major:
        teacher = teacher.t().contiguous().t()
    settings = dict(vocab_map=vocab_map, alignment=align, method=method, divergence=divergence, beta=0.3,
                    temperature=1.5, teacher_temperature=0.8, ce_weight=0.4, return_components=True,
                    reduction=reduction)
    names = ("student_hidden", "student_weight", "student_bias")
    leaves = {name: tensors[name].clone().requires_grad_() for name in names}
    student_logits = logits_of({**tensors, **leaves}, (student_map, (1.0, None)))[0]
    expected, expected_parts = kdfast.cross_vocab_distill_loss(student_logits, teacher.float(), labels,
                                                               **settings)
    seeded(expected).backward()
    found = {name: tensors[name].clone().requires_grad_() for name in names}
    loss, parts = kdfast.linear_student_cross_vocab_distill_loss(
        found["student_hidden"], found["student_weight"], teacher, labels, student_bias=found["student_bias"],
        logit_scale=student_map[0], softcap=student_map[1], chunk_size=3, **settings)
    seeded(loss).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name in ("kd", "entropy", *(("matched", "unmatched") if method == "hybrid" else ())):
        torch.testing.assert_close(getattr(parts, name), getattr(expected_parts, name), rtol=1e-5, atol=1e-6)
    for name, leaf in found.items():
        torch.testing.assert_close(leaf.grad, leaves[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method, aligned", [("hybrid", True), ("mapped", False), ("uld", False)])
def test_equals_the_heads_form_under_torch_compile(vocab_map, method, aligned):
    """fullgraph=True: the given logits ride the compiled op as given; the eager heads form's loss and gradients."""
    tensors, teacher, align, labels = inputs(aligned)
    settings = dict(vocab_map=vocab_map, alignment=align, method=method, ce_weight=0.3, temperature=2.0)
    names = ("student_hidden", "student_weight", "student_bias")
    results = []
    def heads_step(hidden, weight, bias):
        return kdfast.linear_cross_vocab_distill_loss(hidden, weight, tensors["teacher_hidden"],
                                                      tensors["teacher_weight"], labels, student_bias=bias,
                                                      teacher_bias=tensors["teacher_bias"], **settings)

    def given_step(hidden, weight, bias):
        return kdfast.linear_student_cross_vocab_distill_loss(hidden, weight, teacher, labels, student_bias=bias,
                                                              **settings)

    for step in (heads_step, torch.compile(given_step, fullgraph=True)):
        leaves = [tensors[name].clone().requires_grad_() for name in names]
        loss = step(*leaves)
        loss.backward()
        results.append((loss, *(leaf.grad for leaf in leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(vocab_map):
    tensors, teacher, _, labels = inputs(False)
    call = kdfast.linear_student_cross_vocab_distill_loss
    args = (tensors["student_hidden"], tensors["student_weight"])
    with pytest.raises(ValueError, match="teacher_logits has a vocabulary of 9"):
        call(*args, teacher[:, :9], labels, vocab_map=vocab_map)
    with pytest.raises(ValueError, match=r"teacher_logits \(6, 13\) and student_hidden \(7, 6\) must have the same"):
        call(*args, teacher[:6], labels, vocab_map=vocab_map)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        call(*args, teacher.clone().requires_grad_(), labels, vocab_map=vocab_map)
    with pytest.raises(ValueError, match="teacher_logits must be float32, bfloat16 or float16"):
        call(*args, teacher.long(), labels, vocab_map=vocab_map)
    with pytest.raises(ValueError, match="pass no teacher_bias, teacher_softcap or teacher_logit_scale"):
        kdfast.linear_cross_vocab_distill_loss(*args, teacher, None, labels, vocab_map=vocab_map, teacher_softcap=3.0)
