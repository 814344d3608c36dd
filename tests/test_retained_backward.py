"""A graph retained for a second backward (kdfast/saved_gradient.py): every loss keeps the gradient its forward computed
and scales it by grad_output in place, so a second backward gets the first's answer where the first, seeded with 1 on
the CPU, left it as it was, and is otherwise refused in kdfast's words rather than answered from a scaled gradient."""

import pytest
import torch
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, small_vocab_map

import kdfast

ROWS, VOCAB, HIDDEN = 6, 48, 8
REFUSED = "scales it by the backward's grad_output in place"


def _losses():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(ROWS, VOCAB, generator=generator)
    teacher_hidden, teacher_weight = torch.randn(ROWS, HIDDEN, generator=generator), \
        torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, STUDENT_VOCAB, (ROWS,), generator=generator)
    return {
        "distill_loss": ("logits", lambda x: kdfast.distill_loss(x, teacher, labels, ce_weight=0.5)),
        "multi_teacher_distill_loss": ("logits", lambda x: kdfast.multi_teacher_distill_loss(
            x, [teacher, teacher * 0.5], labels, combine="average", divergence="jsd")),
        "cross_vocab_distill_loss": ("logits", lambda x: kdfast.cross_vocab_distill_loss(
            x[:, :STUDENT_VOCAB], teacher[:, :TEACHER_VOCAB], labels, vocab_map=small_vocab_map())),
        "linear_distill_loss": ("hidden", lambda h, w: kdfast.linear_distill_loss(
            h, w, teacher_hidden, teacher_weight, labels, ce_weight=0.5)),
        "linear_multi_teacher_distill_loss": ("hidden", lambda h, w: kdfast.linear_multi_teacher_distill_loss(
            h, w, [teacher_hidden] * 2, [teacher_weight, teacher_weight * 0.5], labels)),
    }


def _leaves(kind):
    generator = torch.Generator().manual_seed(1)
    if kind == "logits":
        return [torch.randn(ROWS, VOCAB, generator=generator).requires_grad_(True)]
    return [torch.randn(ROWS, HIDDEN, generator=generator).requires_grad_(True),
            torch.randn(VOCAB, HIDDEN, generator=generator).requires_grad_(True)]


@pytest.mark.parametrize("name", list(_losses()))
def test_a_second_backward_after_a_seed_of_one_gets_the_same_gradients(name):
    kind, loss_of = _losses()[name]
    leaves = _leaves(kind)
    loss = loss_of(*leaves)
    first = [grad.clone() for grad in torch.autograd.grad(loss, leaves, retain_graph=True)]
    second = torch.autograd.grad(loss, leaves, torch.tensor(2.0))
    for once, twice in zip(first, second):
        torch.testing.assert_close(twice, 2 * once, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(_losses()))
def test_a_second_backward_after_another_seed_is_refused_in_kdfasts_words(name):
    kind, loss_of = _losses()[name]
    leaves = _leaves(kind)
    loss = loss_of(*leaves)
    torch.autograd.grad(loss, leaves, torch.tensor(0.7), retain_graph=True)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(loss, leaves, torch.tensor(0.7))
