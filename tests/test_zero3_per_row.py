"""The fused linear losses with reduction="none" under DeepSpeed ZeRO-3: their backward runs the chunks again from the
student's head, which ZeRO-3 may have partitioned again since the forward, so it enters kdfast.zero3's gather of
that very weight and bias; "mean" takes its gradients in the forward and gathers nothing. Every form: one teacher
head, several, a sparse teacher, a teacher of another vocabulary."""

import pytest
import torch
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, small_vocab_map

import kdfast

ROWS, HIDDEN, TEACHER_HIDDEN = 6, 8, 12


def _teacher_head(vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(ROWS, TEACHER_HIDDEN, generator=generator),
            torch.randn(vocab, TEACHER_HIDDEN, generator=generator))


def one_teacher(hidden, weight, bias, reduction):
    return kdfast.linear_distill_loss(hidden, weight, *_teacher_head(STUDENT_VOCAB, 1), student_bias=bias,
                                      reduction=reduction, chunk_size=4)


def two_teachers(hidden, weight, bias, reduction):
    heads = [_teacher_head(STUDENT_VOCAB, 1), _teacher_head(STUDENT_VOCAB, 2)]
    return kdfast.linear_multi_teacher_distill_loss(hidden, weight, [h for h, _ in heads], [w for _, w in heads],
                                                    student_bias=bias, reduction=reduction, chunk_size=4)


def sparse_teacher(hidden, weight, bias, reduction):
    generator = torch.Generator().manual_seed(3)
    ids = torch.rand(ROWS, STUDENT_VOCAB, generator=generator).argsort(-1)[:, :4]
    logprobs = torch.randn(ROWS, 4, generator=generator).log_softmax(-1) - 0.1
    return kdfast.linear_sparse_distill_loss(hidden, weight, ids, logprobs, student_bias=bias, reduction=reduction,
                                             chunk_size=4)


def other_vocabulary(hidden, weight, bias, reduction):
    return kdfast.linear_cross_vocab_distill_loss(hidden, weight, *_teacher_head(TEACHER_VOCAB, 1),
                                                  vocab_map=small_vocab_map(), student_bias=bias,
                                                  reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("loss", [one_teacher, two_teachers, sparse_teacher, other_vocabulary])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_per_row_backward_gathers_a_zero3_head_again(zero3_gathers, loss, reduction):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(STUDENT_VOCAB, HIDDEN, generator=generator))
    bias = torch.nn.Parameter(torch.randn(STUDENT_VOCAB, generator=generator))
    weight.ds_id, bias.ds_id = 0, 1  # what ZeRO-3 marks its partitioned parameters with
    out = loss(hidden, weight, bias, reduction)
    assert zero3_gathers == [], "the forward's head is gathered by the caller"
    (out * torch.arange(1.0, out.numel() + 1).reshape(out.shape)).sum().backward()
    assert zero3_gathers == ([[weight, bias]] if reduction == "none" else [])
    assert weight.grad is not None and bias.grad is not None and hidden.grad is not None
