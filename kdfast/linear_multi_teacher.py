"""The fused linear form with several teachers: `linear_multi_teacher_distill_loss`. The chunks of
`linear_distill_loss` with a `linear_teachers.TeacherHeads` kind: per chunk each teacher's GEMM, then one loss
kernel over the chunk (the mixture), or one per teacher (the average); no logits of all tokens are ever held."""

from __future__ import annotations

import torch

from kdfast.dispatch import rows_kernel_for
from kdfast.kernel_abi import MAX_MIXED_TEACHERS
from kdfast.linear_chunks import TeacherHead, TeacherLogits
from kdfast.linear_function import ChunkPlan, LinearDistillFunction
from kdfast.linear_logits_teacher import check_teacher_logits
from kdfast.linear_loss import LinearDistillLoss
from kdfast.linear_multi_ops import compiled_multi_teacher_loss
from kdfast.linear_ops import runs_as_op
from kdfast.linear_teachers import TeacherHeads
from kdfast.logit_maps import logit_maps
from kdfast.multi_teacher import check_combine, settings_repr
from kdfast.options import LossOptions
from kdfast.reduction import returned_with_teachers
from kdfast.shared_vocab import heads_cut_to_vocab
from kdfast.teacher_routing import host_routing, is_routing
from kdfast.teacher_weights import label_logprobs, row_log_weights
from kdfast.validation import (
    check_chunk_settings,
    check_labels_for,
    check_linear_inputs,
    check_linear_student,
    check_num_items,
)


def _teacher_lists(teacher_hidden, teacher_weight, teacher_bias) -> tuple[list, list, list]:
    if not isinstance(teacher_hidden, (list, tuple)) or not teacher_hidden:
        raise ValueError("teacher_hidden must be a non-empty list/tuple of M tensors [..., H_m] (one per teacher)")
    count = len(teacher_hidden)
    if count > MAX_MIXED_TEACHERS:  # what one kernel call mixes (kernel_abi.h)
        raise ValueError(f"teacher_hidden holds {count} teachers; at most {MAX_MIXED_TEACHERS} are taken")
    if not isinstance(teacher_weight, (list, tuple)) or len(teacher_weight) != count:
        raise ValueError(f"teacher_weight must be a list/tuple of {count} entries, one per teacher_hidden: a tensor "
                         f"[V, H_m], or None where that teacher_hidden entry is the teacher's logits [..., V]")
    if teacher_bias is None:
        teacher_bias = [None] * count
    if not isinstance(teacher_bias, (list, tuple)) or len(teacher_bias) != count:
        raise ValueError(f"teacher_bias must be None or a list/tuple of {count} entries (a tensor [V] or None)")
    for index, (weight, bias) in enumerate(zip(teacher_weight, teacher_bias)):
        if weight is None and bias is not None:
            raise ValueError(f"teacher_bias[{index}] is given but teacher_weight[{index}] is None: a teacher given as "
                             f"its logits has them final (its bias already added); pass None")
    return list(teacher_hidden), list(teacher_weight), list(teacher_bias)


def _per_teacher(name: str, value, count: int) -> list:
    """One setting per teacher: a list/tuple of `count`, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must be one value or a list of {count} (one per teacher), got {len(value)}")
        return list(value)
    return [value] * count


def linear_multi_teacher_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                      student_bias=None, teacher_bias=None, weights=None, combine="mixture",
                                      softcap=None, student_softcap=None, teacher_softcap=None,
                                      student_logit_scale=1.0, teacher_logit_scale=1.0, chunk_size="auto",
                                      fp32_logits=False, divergence="forward_kl", beta=0.5, temperature=1.0,
                                      kd_weight=1.0, ce_weight=0.0, t2_scale=True, ignore_index=-100,
                                      reduction="mean", num_items_in_batch=None, backend="auto",
                                      return_components=False, vocab_size=None, label_smoothing=0.0,
                                      z_loss_weight=0.0, process_group=None, vocab_range=None):
    """`multi_teacher_distill_loss` of the heads' logits, computed `chunk_size` tokens at a time: `teacher_hidden`,
    `teacher_weight` (and `teacher_bias`) are lists of M ([..., H_m], [V, H_m], [V] or None; the hidden sizes may
    differ per teacher). Each teacher's logits take `teacher_softcap` / `teacher_logit_scale` (one value for all, or a
    list of M: teachers of different families), or `softcap`, as in `linear_distill_loss`. Routed (`weights` each
    row's teacher, an integer tensor [...]: `kdfast.teacher_routing`) only the row's own head runs on it, a teacher's
    hidden states may hold its own rows alone ([n_m, H_m], in row order), and `teachers` is each teacher's share of
    the divergence (its own rows'; the shares add up to the KD part). weights="confidence" / "min_ce" run each
    teacher's head once more, forward only, to find its probability of the label. `return_components=True` adds
    `teachers`, each teacher's own divergence reduced as the loss: with the mixture that is one more forward pass of
    the loss kernel per teacher and chunk (the average has them from its calls). A teacher whose `teacher_weight`
    entry is None is given as its logits: its `teacher_hidden` entry is them, [..., V] in any float dtype (final, as
    `linear_student_distill_loss` takes them: no map, no bias; routed, possibly its own rows alone [n_m, V]), read a
    chunk at a time (`kdfast.linear_student_multi_teacher_distill_loss` takes every teacher so). Vocab parallel as
    `linear_distill_loss` (every head this rank's rows `vocab_range`, given logits its columns), each teacher
    normalised over the ranks."""
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       backend=backend, return_components=return_components, vocab_size=vocab_size,
                       label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return fused_linear_multi_teacher_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts, student_bias=student_bias,
        teacher_bias=teacher_bias, weights=weights, combine=combine, softcap=softcap, student_softcap=student_softcap,
        teacher_softcap=teacher_softcap, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, chunk_size=chunk_size, fp32_logits=fp32_logits,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_range=vocab_range)


def fused_linear_multi_teacher_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    opts: LossOptions, *, student_bias=None, teacher_bias=None, weights=None,
                                    combine="mixture", softcap=None, student_softcap=None, teacher_softcap=None,
                                    student_logit_scale=1.0, teacher_logit_scale=1.0, chunk_size="auto",
                                    fp32_logits=False, num_items_in_batch=None, process_group=None,
                                    vocab_range=None, reduce_hidden_grad=True):
    """`linear_multi_teacher_distill_loss` with its loss settings already in one record."""
    check_combine(combine)
    hiddens, head_weights, biases = _teacher_lists(teacher_hidden, teacher_weight, teacher_bias)
    caps, scales = _per_teacher("teacher_softcap", teacher_softcap, len(hiddens)), \
        _per_teacher("teacher_logit_scale", teacher_logit_scale, len(hiddens))
    student_map = logit_maps(softcap, student_softcap, None, student_logit_scale, 1.0)[0]
    teacher_maps = [logit_maps(softcap, student_softcap, cap, student_logit_scale, scale)[1]
                    for cap, scale in zip(caps, scales)]
    heads = []
    routed = is_routing(weights, tuple(student_hidden.shape[:-1]))

    def check():
        for index, (hidden, weight, bias, teacher_map) in enumerate(zip(hiddens, head_weights, biases,
                                                                        teacher_maps)):
            try:
                heads.append(_teacher_kind(student_hidden, student_weight, student_bias, hidden, weight, bias,
                                           teacher_map, softcap, chunk_size, opts, fp32_logits, routed,
                                           process_group))
            except ValueError as error:
                raise ValueError(f"teacher {index}: {error}") from None
        # Over vocab shards labels are global token ids, checked in the ranks' exchange against the whole vocabulary.
        vocab = heads_cut_to_vocab(opts, None, student_weight, student_bias)[0].shape[0] if process_group is None \
            else 2**62
        check_labels_for(labels, tuple(student_hidden.shape[:-1]), vocab, student_hidden.device, opts,
                         "the hidden states")
        check_num_items(num_items_in_batch)

    traced = runs_as_op(process_group, vocab_range)  # by torch.compile: the chunk loop as one custom op
    if traced:
        check()
    rows_kernel = None if traced else rows_kernel_for(opts, check, lambda: student_weight.shape[0], student_hidden,
                                                      labels, process_group, vocab_range, reduce_hidden_grad)
    student_weight, student_bias, *_ = heads_cut_to_vocab(opts, process_group, student_weight, student_bias)

    def teacher_logits(index, start, stop):
        head = heads[index]
        if isinstance(head, TeacherLogits):
            return head.rows(slice(start, stop), student_weight.shape[0])
        hidden = head.hidden.reshape(-1, head.hidden.shape[-1])[start:stop]
        logits = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                            head.bias.float() if head.bias is not None else None)
        return head.logit_map.apply_(logits)

    log_weights = None if routed else row_log_weights(
        weights, len(heads), labels, tuple(student_hidden.shape[:-1]), opts, student_hidden.device,
        lambda: label_logprobs(teacher_logits, len(heads), labels, student_weight.shape[0], opts,
                               getattr(rows_kernel, "shard", None)))
    if traced:
        return returned_with_teachers(compiled_multi_teacher_loss(
            student_hidden, student_weight, student_bias, heads, log_weights, weights if routed else None, labels,
            num_items_in_batch, opts, combine, student_map, chunk_size, fp32_logits), opts, labels)
    if routed:  # each row's own head alone: the mixture of one teacher, whichever `combine`
        teachers = TeacherHeads(heads, None, combine, opts.temperature, route=host_routing(
            weights, len(heads), [head.row_count for head in heads], student_hidden.device))
    else:
        teachers = TeacherHeads(heads, log_weights, combine, opts.temperature)
    plan = ChunkPlan(student_map, chunk_size, rows_kernel, fp32_logits)
    return _apply(student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts, plan, teachers)


def _teacher_kind(student_hidden, student_weight, student_bias, hidden, weight, bias, teacher_map, softcap,
                  chunk_size, opts: LossOptions, fp32_logits: bool, routed: bool, process_group):
    """One teacher of the list, checked: a `TeacherHead` (its hidden states, head and bias), or with no head
    (`weight` None) a `TeacherLogits` (`hidden` its logits)."""
    cut_student, cut_student_bias, weight, bias = heads_cut_to_vocab(opts, process_group, student_weight,
                                                                     student_bias, weight, bias)
    if weight is None:
        check_linear_student(student_hidden, cut_student, cut_student_bias, softcap, chunk_size, fp32_logits)
        check_teacher_logits(hidden, student_hidden, cut_student.shape[0], opts, routed)
        return TeacherLogits(hidden.detach())
    check_linear_inputs(student_hidden, cut_student, hidden, weight, cut_student_bias, bias, softcap, chunk_size,
                        opts, fp32_logits, routed)
    return TeacherHead(hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, hidden.dtype,
                       teacher_map)


# The chunk loop is driven from the host: torch.compile calls it as is rather than tracing into it.
@torch.compiler.disable
def _apply(student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts, plan, teachers):
    return returned_with_teachers(LinearDistillFunction.apply(student_hidden, student_weight, student_bias, labels,
                                                              num_items_in_batch, opts, plan, teachers), opts, labels)


class LinearMultiTeacherDistillLoss(torch.nn.Module):
    """`linear_multi_teacher_distill_loss` with its settings fixed at construction: `weights` (a `weights` given to
    `forward`, such as a batch's routing, takes their place), `combine`, the heads' `softcap`, `student_softcap`,
    `teacher_softcap`, `student_logit_scale`, `teacher_logit_scale` (one value, or one per teacher), `chunk_size`,
    `fp32_logits`, `process_group`, `vocab_range` and every loss setting of `distill_loss`."""

    def __init__(self, *, weights=None, combine="mixture", softcap=None, student_softcap=None, teacher_softcap=None,
                 student_logit_scale=1.0, teacher_logit_scale=1.0, chunk_size="auto", fp32_logits=False,
                 process_group=None, vocab_range=None, **settings):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions.build("LinearMultiTeacherDistillLoss", **settings)
        check_combine(combine)
        check_chunk_settings(softcap, chunk_size, fp32_logits)
        self.head_settings = dict(softcap=softcap, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                  student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)
        self.weights, self.combine = weights, combine
        self.softcap, self.chunk_size, self.fp32_logits = softcap, chunk_size, fp32_logits
        self.process_group, self.vocab_range = process_group, vocab_range

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, student_bias=None,
                teacher_bias=None, weights=None, num_items_in_batch=None):
        return fused_linear_multi_teacher_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, self.options,
            student_bias=student_bias, teacher_bias=teacher_bias,
            weights=self.weights if weights is None else weights, combine=self.combine, **self.head_settings,
            chunk_size=self.chunk_size, fp32_logits=self.fp32_logits, num_items_in_batch=num_items_in_batch,
            process_group=self.process_group, vocab_range=self.vocab_range)

    def extra_repr(self) -> str:
        return (f"combine={self.combine!r}, weights={settings_repr(self.weights)}, "
                + LinearDistillLoss.extra_repr(self))
