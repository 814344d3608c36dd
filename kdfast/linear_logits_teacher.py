"""A teacher given as its logits in the fused linear form: `linear_student_distill_loss` takes the student's last
hidden states and LM head and the teacher's logits [..., V] (a teacher's own forward under no_grad, a teacher that
ran on another device or in another process, logits kept from an earlier pass), and its `nn.Module`,
`LinearStudentDistillLoss`. The student's logits, and their gradient, exist one chunk at a time as in
`linear_distill_loss`; each chunk reads the teacher's rows (`linear_chunks.TeacherLogits`): the dense kind's kernel,
no teacher GEMM."""

from __future__ import annotations

import torch

from kdfast.dispatch import rows_kernel_for
from kdfast.linear_chunks import TeacherLogits
from kdfast.linear_function import ChunkPlan
from kdfast.linear_loss import LinearDistillLoss, apply_linear
from kdfast.linear_ops import compiled_linear_loss, runs_as_op
from kdfast.logit_maps import logit_maps
from kdfast.options import LossOptions
from kdfast.shared_vocab import check_vocab_size, heads_cut_to_vocab, mismatch_hint
from kdfast.validation import (
    check_chunk_settings,
    check_labels_for,
    check_linear_student,
    check_logits,
    check_num_items,
    check_row_weights,
    flat_row_weights,
)


def linear_student_distill_loss(student_hidden, student_weight, teacher_logits, labels=None, *, student_bias=None,
                                softcap=None, logit_scale=1.0, chunk_size="auto", fp32_logits=False,
                                divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                                t2_scale=True, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                                inplace_backward=False, backend="auto", return_components=False, vocab_size=None,
                                label_smoothing=0.0, z_loss_weight=0.0, process_group=None, vocab_range=None,
                                reduce_hidden_grad=True, row_weights=None):
    """`distill_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, labels, ...)`, computed
    `chunk_size` tokens at a time ("auto": sized from a memory budget), without the student's [N, V] logits or their
    gradient. `teacher_logits` [..., V] (float32, bfloat16 or float16; a view such as `logits[:, :-1]` is read as
    it is, never copied whole) have the hidden states' leading shape and are final: `logit_scale` then `softcap`
    apply to the student's logits alone, after the bias and before the temperature, which divides both. Gradients
    flow to student_hidden, student_weight and student_bias; the teacher is a constant. `fp32_logits`, `row_weights`
    and the loss settings as for `linear_distill_loss`; `vocab_size` keeps the first `vocab_size` columns of the
    teacher's logits and rows of the student's head. Without a divergence (`kd_weight` 0) `teacher_logits` may be
    None. Vocab parallel as for `linear_distill_loss`: with a `process_group`, `teacher_logits` are this rank's
    columns, those of its shard of the student's head."""
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                       vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return fused_linear_student_loss(student_hidden, student_weight, teacher_logits, labels, opts,
                                     student_bias=student_bias, softcap=softcap, logit_scale=logit_scale,
                                     chunk_size=chunk_size, fp32_logits=fp32_logits,
                                     num_items_in_batch=num_items_in_batch, process_group=process_group,
                                     vocab_range=vocab_range, reduce_hidden_grad=reduce_hidden_grad,
                                     row_weights=row_weights)


def check_teacher_logits(teacher_logits, student_hidden, vocab: int, opts: LossOptions, routed: bool = False) -> None:
    """[..., V] logits with the hidden states' leading shape, on their device, a constant; V the student head's rows
    (at least `vocab_size` of them when it is given). `routed`: also [n, V], the rows routed to this teacher (their
    count checked with the routing)."""
    check_logits("teacher_logits", teacher_logits)
    width = teacher_logits.shape[-1]
    if opts.vocab_size is not None:
        check_vocab_size(opts.vocab_size, teacher_logits=width)
    elif width != vocab:
        raise ValueError(f"teacher_logits vocab size {width} != student_weight vocab size {vocab}: both models must "
                         f"score the same vocabulary" + mismatch_hint(vocab, width))
    if teacher_logits.shape[:-1] != student_hidden.shape[:-1] and not (routed and teacher_logits.dim() == 2):
        raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} must equal "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])}: one teacher row per token")
    if teacher_logits.device != student_hidden.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden is on "
                         f"{student_hidden.device}: both must be on the same device")
    if teacher_logits.requires_grad:
        raise ValueError("teacher_logits requires grad, but the teacher is a constant in kdfast: pass "
                         "teacher_logits.detach() (or compute the teacher under torch.no_grad())")


def fused_linear_student_loss(student_hidden, student_weight, teacher_logits, labels, opts: LossOptions, *,
                              student_bias=None, softcap=None, logit_scale=1.0, chunk_size="auto", fp32_logits=False,
                              num_items_in_batch=None, process_group=None, vocab_range=None,
                              reduce_hidden_grad=True, row_weights=None):
    """`linear_student_distill_loss` with its loss settings already in one record."""
    student_map = logit_maps(softcap, student_logit_scale=logit_scale)[0]
    student_weight, student_bias, _, _ = heads_cut_to_vocab(opts, process_group, student_weight, student_bias)
    # Without a divergence the kernel never reads the teacher: None is accepted and nothing is checked.
    read_teacher = opts.has_kd

    def check(vocab):
        check_linear_student(student_hidden, student_weight, student_bias, softcap, chunk_size, fp32_logits)
        if read_teacher:
            check_teacher_logits(teacher_logits, student_hidden, student_weight.shape[0], opts)
        lead_shape = tuple(student_hidden.shape[:-1])
        check_labels_for(labels, lead_shape, vocab, student_hidden.device, opts, "the hidden states")
        check_num_items(num_items_in_batch)
        check_row_weights(row_weights, lead_shape, student_hidden.device, opts)

    # Over shards labels are global token ids: their range is checked in the exchange, against the global vocabulary.
    vocab = 2**62 if process_group is not None else (
        student_weight.shape[0] if isinstance(student_weight, torch.Tensor) else 0)
    if runs_as_op(process_group, vocab_range):  # traced by torch.compile: the chunk loop as one custom op
        check(vocab)
        teacher = TeacherLogits(teacher_logits.detach()) if read_teacher else None
        return compiled_linear_loss(student_hidden, student_weight, student_bias, teacher, labels, num_items_in_batch,
                                    opts, student_map, chunk_size, fp32_logits, flat_row_weights(row_weights))
    rows_kernel = rows_kernel_for(opts, lambda: check(vocab), lambda: student_weight.shape[0], student_hidden, labels,
                                  process_group, vocab_range, reduce_hidden_grad)
    teacher = TeacherLogits(teacher_logits.detach()) if read_teacher else None
    return apply_linear(student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts,
                        ChunkPlan(student_map, chunk_size, rows_kernel, fp32_logits), teacher,
                        flat_row_weights(row_weights))


class LinearStudentDistillLoss(torch.nn.Module):
    """`linear_student_distill_loss` with its settings fixed at construction: `softcap`, `logit_scale`, `chunk_size`,
    `fp32_logits`, `process_group`, `vocab_range`, `reduce_hidden_grad` and every loss setting of `distill_loss`."""

    def __init__(self, *, softcap=None, logit_scale=1.0, chunk_size="auto", fp32_logits=False, process_group=None,
                 vocab_range=None, reduce_hidden_grad=True, **settings):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions.build("LinearStudentDistillLoss", **settings)
        check_chunk_settings(softcap, chunk_size, fp32_logits)
        logit_maps(softcap, student_logit_scale=logit_scale)
        self.softcap, self.logit_scale = softcap, logit_scale
        self.chunk_size, self.fp32_logits = chunk_size, fp32_logits
        self.process_group, self.vocab_range, self.reduce_hidden_grad = process_group, vocab_range, reduce_hidden_grad

    def forward(self, student_hidden, student_weight, teacher_logits, labels=None, student_bias=None,
                num_items_in_batch=None, row_weights=None):
        return fused_linear_student_loss(student_hidden, student_weight, teacher_logits, labels, self.options,
                                         student_bias=student_bias, softcap=self.softcap,
                                         logit_scale=self.logit_scale, chunk_size=self.chunk_size,
                                         fp32_logits=self.fp32_logits, num_items_in_batch=num_items_in_batch,
                                         process_group=self.process_group, vocab_range=self.vocab_range,
                                         reduce_hidden_grad=self.reduce_hidden_grad, row_weights=row_weights)

    extra_repr = LinearDistillLoss.extra_repr  # the same settings shown the same way
