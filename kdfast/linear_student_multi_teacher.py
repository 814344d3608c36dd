"""Several teachers given as their logits in the fused linear form: `linear_student_multi_teacher_distill_loss` takes
the student's last hidden states and LM head and M teachers' logits (each teacher's own forward under no_grad, served
or stored logits, teachers with no linear head to fuse), and its `nn.Module`. It is `linear_multi_teacher_distill_loss`
with every teacher of the `TeacherLogits` kind (`linear_chunks`): each chunk copies the M teachers' rows into the
mixture's buffers, and the student's logits and gradient exist one chunk at a time."""

from __future__ import annotations

import torch

from kdfast.linear_loss import LinearDistillLoss
from kdfast.linear_multi_teacher import fused_linear_multi_teacher_loss
from kdfast.logit_maps import logit_maps
from kdfast.multi_teacher import check_combine, settings_repr, teacher_list
from kdfast.options import LossOptions
from kdfast.validation import check_chunk_settings


def linear_student_multi_teacher_distill_loss(student_hidden, student_weight, teacher_logits, labels=None, *,
                                              student_bias=None, weights=None, combine="mixture", softcap=None,
                                              logit_scale=1.0, chunk_size="auto", fp32_logits=False,
                                              divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0,
                                              ce_weight=0.0, t2_scale=True, ignore_index=-100, reduction="mean",
                                              num_items_in_batch=None, backend="auto", return_components=False,
                                              vocab_size=None, label_smoothing=0.0, z_loss_weight=0.0,
                                              process_group=None, vocab_range=None):
    """`multi_teacher_distill_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, labels, ...)`,
    computed `chunk_size` tokens at a time, without the student's [N, V] logits or their gradient. `teacher_logits`:
    a list/tuple of M tensors [..., V] (each in any float dtype; views such as `logits[:, :-1]` are read as they are)
    or one tensor [M, ..., V], final: `logit_scale` then `softcap` apply to the student's logits alone, as in
    `linear_student_distill_loss`. `weights` and `combine` as `multi_teacher_distill_loss` takes them (routed: each
    row's teacher; a teacher's logits may then hold its own rows alone, [n_m, V] in row order).
    `return_components=True` adds `teachers`, each teacher's own divergence reduced as the loss. Vocab parallel as
    `linear_student_distill_loss`: with a `process_group` each teacher's logits are this rank's columns."""
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       backend=backend, return_components=return_components, vocab_size=vocab_size,
                       label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return fused_linear_student_multi_teacher_loss(
        student_hidden, student_weight, teacher_logits, labels, opts, student_bias=student_bias, weights=weights,
        combine=combine, softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size, fp32_logits=fp32_logits,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_range=vocab_range)


def fused_linear_student_multi_teacher_loss(student_hidden, student_weight, teacher_logits, labels,
                                            opts: LossOptions, *, student_bias=None, weights=None,
                                            combine="mixture", softcap=None, logit_scale=1.0, chunk_size="auto",
                                            fp32_logits=False, num_items_in_batch=None, process_group=None,
                                            vocab_range=None):
    """`linear_student_multi_teacher_distill_loss` with its loss settings already in one record."""
    teachers = teacher_list(teacher_logits)
    # No head: each teacher's entry of the list is its logits (`fused_linear_multi_teacher_loss`).
    return fused_linear_multi_teacher_loss(
        student_hidden, student_weight, teachers, [None] * len(teachers), labels, opts, student_bias=student_bias,
        weights=weights, combine=combine, student_softcap=softcap, student_logit_scale=logit_scale,
        chunk_size=chunk_size, fp32_logits=fp32_logits, num_items_in_batch=num_items_in_batch,
        process_group=process_group, vocab_range=vocab_range)


class LinearStudentMultiTeacherDistillLoss(torch.nn.Module):
    """`linear_student_multi_teacher_distill_loss` with its settings fixed at construction: `weights` (a `weights`
    given to `forward`, such as a batch's per-row tensor, takes their place), `combine`, `softcap`, `logit_scale`,
    `chunk_size`, `fp32_logits`, `process_group`, `vocab_range` and every loss setting of `distill_loss`."""

    def __init__(self, *, weights=None, combine="mixture", softcap=None, logit_scale=1.0, chunk_size="auto",
                 fp32_logits=False, process_group=None, vocab_range=None, **settings):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions.build("LinearStudentMultiTeacherDistillLoss", **settings)
        check_combine(combine)
        check_chunk_settings(softcap, chunk_size, fp32_logits)
        logit_maps(softcap, student_logit_scale=logit_scale)
        self.weights, self.combine, self.softcap, self.logit_scale = weights, combine, softcap, logit_scale
        self.chunk_size, self.fp32_logits = chunk_size, fp32_logits
        self.process_group, self.vocab_range = process_group, vocab_range

    def forward(self, student_hidden, student_weight, teacher_logits, labels=None, student_bias=None, weights=None,
                num_items_in_batch=None):
        return fused_linear_student_multi_teacher_loss(
            student_hidden, student_weight, teacher_logits, labels, self.options, student_bias=student_bias,
            weights=self.weights if weights is None else weights, combine=self.combine, softcap=self.softcap,
            logit_scale=self.logit_scale, chunk_size=self.chunk_size, fp32_logits=self.fp32_logits,
            num_items_in_batch=num_items_in_batch, process_group=self.process_group, vocab_range=self.vocab_range)

    def extra_repr(self) -> str:
        return (f"combine={self.combine!r}, weights={settings_repr(self.weights)}, "
                + LinearDistillLoss.extra_repr(self))
