"""Models whose logits (or LM heads) are padded to different widths (a Qwen teacher's head has 152064 rows, its
student's 151936; LLaMA heads are padded to multiples of 64 or 128): `vocab_size` is the vocabulary both score.
Columns (head rows) at and past it are padding: no softmax sees them and their gradient is 0. They are masked by
taking views of the first `vocab_size` columns, never copied and never zero-padded (a zero logit would give a
padding token real probability)."""

from __future__ import annotations

import torch


def check_vocab_size(vocab_size: int, **widths: int) -> None:
    """Every model must score the shared vocabulary: a width below it is a real vocabulary mismatch."""
    for name, width in widths.items():
        if vocab_size > width:
            raise ValueError(f"vocab_size={vocab_size} but {name} covers only {width} tokens: the models do not "
                             f"share that vocabulary (vocab_size is the tokenizer's vocabulary, at most the "
                             f"narrowest model's width)")


def mismatch_hint(student_width: int, teacher_width: int) -> str:
    return (f"; if both models share a tokenizer and only their padding differs, pass vocab_size=<the tokenizer's "
            f"vocabulary> (at most {min(student_width, teacher_width)}) to leave the padding columns out")


def shared_rows(tensor: torch.Tensor | None, vocab_size: int | None) -> torch.Tensor | None:
    """A head's weight or bias cut to the shared vocabulary's rows: a view."""
    if tensor is None or vocab_size is None or tensor.shape[0] == vocab_size:
        return tensor
    return tensor[:vocab_size]


def shared_columns(student, teacher, grad, vocab_size: int | None):
    """[batch, rows, width] views cut to their first `vocab_size` columns, with the gradient's padding columns set
    to 0 (`teacher` may be a sparse teacher's targets, which are not cut)."""
    if vocab_size is None:
        return student, teacher, grad
    if grad is not None and grad.shape[-1] > vocab_size:
        grad[..., vocab_size:].zero_()  # the kernels never read these columns, even when grad is the student
        grad = grad[..., :vocab_size]
    if isinstance(teacher, torch.Tensor):
        teacher = teacher[..., :vocab_size]
    return student[..., :vocab_size], teacher, grad


def refuse_over_shards(opts) -> None:
    if opts.vocab_size is not None:
        raise ValueError("vocab_size is for a single device: over vocab shards give each rank its shard of the shared "
                         "vocabulary (vocab_range) and leave the padding columns out of the shards")


def heads_cut_to_vocab(opts, process_group, student_weight, student_bias, teacher_weight=None, teacher_bias=None):
    """The fused linear form's heads (weights [V, H] and biases [V]) cut to `opts.vocab_size` rows: views, whose
    gradient reaches the full weights with zeros in the padding rows."""
    if opts.vocab_size is None or not isinstance(student_weight, torch.Tensor):
        return student_weight, student_bias, teacher_weight, teacher_bias  # (a bad weight is refused later)
    if process_group is not None:
        refuse_over_shards(opts)
    widths = {"student_weight": student_weight.shape[0]}
    if isinstance(teacher_weight, torch.Tensor):
        widths["teacher_weight"] = teacher_weight.shape[0]
    check_vocab_size(opts.vocab_size, **widths)

    def cut(weight, bias):
        if not isinstance(weight, torch.Tensor):
            return weight, bias
        # A bias is cut with its weight only when it matches it: any other shape is refused by the input checks.
        matching = isinstance(bias, torch.Tensor) and bias.shape[:1] == weight.shape[:1]
        return shared_rows(weight, opts.vocab_size), shared_rows(bias, opts.vocab_size) if matching else bias

    return (*cut(student_weight, student_bias), *cut(teacher_weight, teacher_bias))
