"""Bad inputs to linear_distill_loss: a ValueError naming the argument and the expected shape or value."""

import pytest
import torch

import kdfast


def _heads(**changes):
    heads = dict(student_hidden=torch.randn(2, 5, 8), student_weight=torch.randn(30, 8),
                 teacher_hidden=torch.randn(2, 5, 12), teacher_weight=torch.randn(30, 12))
    heads.update(changes)
    return heads


@pytest.mark.parametrize("changes,extra,match", [
    (dict(teacher_weight=torch.randn(31, 12)), {}, "teacher_weight vocab size 31 != student_weight vocab size 30"),
    (dict(student_weight=torch.randn(30, 9)), {}, r"student_weight must have shape \[vocab, 8\]"),
    (dict(teacher_weight=torch.randn(30, 8)), {}, r"teacher_weight must have shape \[vocab, 12\]"),
    (dict(teacher_hidden=torch.randn(2, 4, 12)), {}, "one teacher row per token"),
    (dict(student_hidden=torch.randn(8)), {}, r"student_hidden must have shape \[tokens, hidden_s\]"),
    (dict(student_hidden=torch.randn(2, 5, 8).double()), {}, "student_hidden must be float32, bfloat16 or float16"),
    (dict(student_weight=torch.randn(30, 8).numpy()), {}, "student_weight must be a torch.Tensor"),
    ({}, dict(student_bias=torch.randn(29)), r"student_bias must have shape \[30\]"),
    ({}, dict(teacher_bias=torch.randn(30, 1)), r"teacher_bias must have shape \[30\]"),
    (dict(teacher_weight=torch.randn(30, 12, requires_grad=True)), {}, "teacher_weight requires grad"),
    ({}, dict(softcap=0.0), "softcap must be None or a finite number > 0"),
    ({}, dict(chunk_size=0), "chunk_size must be 'auto' or a positive int"),
    ({}, dict(chunk_size="big"), "chunk_size must be 'auto' or a positive int"),
    ({}, dict(labels=torch.zeros(2, 4, dtype=torch.long)), r"labels shape \(2, 4\) must equal the hidden states"),
    ({}, dict(labels=torch.full((2, 5), 30), ce_weight=1.0), r"labels must lie in \[0, 30\)"),
    ({}, dict(ce_weight=1.0), "needs labels"),
    ({}, dict(divergence="wasserstein"), "divergence must be one of"),
])
def test_bad_input_is_a_clear_value_error(changes, extra, match):
    with pytest.raises(ValueError, match=match):
        kdfast.linear_distill_loss(**_heads(**changes), **extra)


def test_bad_module_settings_fail_at_construction():
    with pytest.raises(ValueError, match="softcap"):
        kdfast.LinearDistillLoss(softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kdfast.LinearDistillLoss(chunk_size=0)
