"""The fused linear API: `linear_distill_loss` and its `nn.Module`, `LinearDistillLoss`. Takes the last hidden
states and the LM-head weights; never holds logits for all tokens. Both build the settings record and call
`fused_linear_loss`, as the integrations do."""

from __future__ import annotations

import torch

from kdfast.dispatch import rows_kernel_for
from kdfast.linear_chunks import TeacherHead
from kdfast.linear_function import ChunkPlan, LinearDistillFunction, gemm_dtype
from kdfast.linear_ops import compiled_linear_loss, runs_as_op
from kdfast.logit_maps import logit_maps
from kdfast.options import LossOptions
from kdfast.reduction import returned
from kdfast.shared_vocab import heads_cut_to_vocab
from kdfast.validation import (
    check_chunk_settings,
    check_labels_for,
    check_linear_inputs,
    check_linear_student,
    check_num_items,
    check_row_weights,
    flat_row_weights,
)


def linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                        student_bias=None, teacher_bias=None, softcap=None, student_softcap=None,
                        teacher_softcap=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
                        chunk_size="auto", fp32_logits=False,
                        divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                        t2_scale=True, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                        inplace_backward=False, backend="auto", return_components=False, vocab_size=None,
                        label_smoothing=0.0, z_loss_weight=0.0, process_group=None, vocab_range=None,
                        reduce_hidden_grad=True, row_weights=None):
    """`distill_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T +
    teacher_bias, labels, ...)`, computed `chunk_size` tokens at a time ("auto": sized from a memory budget).

    Hidden states are [..., H_s] and [..., H_t] (the sizes may differ), weights [V, H_s] and [V, H_t], biases
    [V]. Each head's logits are post-processed as the models (and TRL) do it, in this order: the bias, times
    `student_logit_scale` / `teacher_logit_scale` (Cohere's `logit_scale`, Granite's 1 / `logits_scaling`), then
    Gemma-2's softcap `c * tanh(z / c)` (`softcap` for both models, or `student_softcap` / `teacher_softcap` each),
    then the temperature. No weight or hidden state is rescaled for it.
    `fp32_logits`: with 16-bit GEMMs, the chunk's logits are kept in float32 as the GEMM accumulated them, never
    rounded to 16 bits before the softmax (on CUDA the GEMM writes float32; elsewhere it runs in float32).
    Gradients flow to student_hidden, student_weight and student_bias; the teacher is a constant. Under
    `torch.autocast` the GEMMs run in autocast's dtype; sums are kept in float32. The chunk's logits are
    always overwritten by their gradient (they are the loss's own buffers), so `inplace_backward` changes
    nothing here; it is accepted so that every `distill_loss` keyword works (`return_components` too).
    `vocab_size` keeps the first `vocab_size` rows of heads padded to different sizes (the others get no gradient).
    `row_weights` (float, the hidden states' leading shape, no gradient): each row's loss, parts and gradient times
    its weight before the reduction ("mean" still divides by the kept rows or `num_items_in_batch`): a per-sequence
    normalisation or an importance ratio at the cost of the plain loss, where reduction="none" and a weighted sum
    would run the chunks again in backward. Not with reduction="none".

    Vocab parallel (tensor-parallel LM heads): with a `process_group`, both weights (and biases) are this rank's
    rows `vocab_range` of the global heads (default: equal contiguous shards in rank order); hidden states and
    labels (global token ids) are the same on every rank. Each rank gets its shard's weight gradient and the
    full d hidden, summed over the ranks unless `reduce_hidden_grad=False` leaves that to the caller's own
    tensor-parallel layer.
    """
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                       vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts,
                             student_bias=student_bias, teacher_bias=teacher_bias, softcap=softcap,
                             student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                             student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                             chunk_size=chunk_size, fp32_logits=fp32_logits, num_items_in_batch=num_items_in_batch,
                             process_group=process_group, vocab_range=vocab_range,
                             reduce_hidden_grad=reduce_hidden_grad, row_weights=row_weights)


def fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, opts: LossOptions, *,
                      student_bias=None, teacher_bias=None, softcap=None, student_softcap=None, teacher_softcap=None,
                      student_logit_scale=1.0, teacher_logit_scale=1.0, chunk_size="auto", fp32_logits=False,
                      num_items_in_batch=None, process_group=None, vocab_range=None, reduce_hidden_grad=True,
                      row_weights=None):
    """`linear_distill_loss` with its loss settings already in one record. Without a divergence (`kd_weight` 0) no
    teacher is projected, and `teacher_hidden` / `teacher_weight` may be None (`linear_cross_entropy`)."""
    student_map, teacher_map = logit_maps(softcap, student_softcap, teacher_softcap, student_logit_scale,
                                          teacher_logit_scale)
    student_weight, student_bias, teacher_weight, teacher_bias = heads_cut_to_vocab(
        opts, process_group, student_weight, student_bias, teacher_weight, teacher_bias)

    no_teacher = not opts.has_kd and teacher_hidden is None and teacher_weight is None and teacher_bias is None

    def check(vocab):
        if no_teacher:
            check_linear_student(student_hidden, student_weight, student_bias, softcap, chunk_size, fp32_logits)
        else:
            check_linear_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                teacher_bias, softcap, chunk_size, opts, fp32_logits)
        check_labels_for(labels, tuple(student_hidden.shape[:-1]), vocab, student_hidden.device, opts,
                         "the hidden states")
        check_num_items(num_items_in_batch)
        check_row_weights(row_weights, tuple(student_hidden.shape[:-1]), student_hidden.device, opts)
    # Over shards labels are global token ids: their range is checked in the exchange, against the global vocabulary.
    vocab = 2**62 if process_group is not None else (
        student_weight.shape[0] if isinstance(student_weight, torch.Tensor) else 0)
    if runs_as_op(process_group, vocab_range):  # traced by torch.compile: the chunk loop as one custom op
        check(vocab)
        teacher = None if not opts.has_kd else TeacherHead(teacher_hidden, teacher_weight, teacher_bias,
                                                           gemm_dtype(teacher_hidden, teacher_weight), teacher_map)
        return compiled_linear_loss(student_hidden, student_weight, student_bias, teacher, labels, num_items_in_batch,
                                    opts, student_map, chunk_size, fp32_logits, flat_row_weights(row_weights))
    rows_kernel = rows_kernel_for(opts, lambda: check(vocab), lambda: student_weight.shape[0], student_hidden, labels,
                                  process_group, vocab_range, reduce_hidden_grad)
    # Without a divergence the kernel never reads the teacher: its GEMMs and its chunk of logits are left out.
    teacher = None if not opts.has_kd else TeacherHead(
        teacher_hidden.detach(), teacher_weight.detach(), teacher_bias.detach() if teacher_bias is not None else None,
        teacher_hidden.dtype)
    return apply_linear(student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts,
                        ChunkPlan(student_map, chunk_size, rows_kernel, fp32_logits, teacher_map), teacher,
                        flat_row_weights(row_weights))


# The chunk loop is driven from the host (a Python loop of GEMMs and kernel calls): torch.compile runs the
# model around it and calls it as is, rather than tracing into the loop.
@torch.compiler.disable
def apply_linear(student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts, plan, teacher,
                 row_weights=None):
    return returned(LinearDistillFunction.apply(student_hidden, student_weight, student_bias, labels,
                                                num_items_in_batch, opts, plan, teacher, row_weights), opts, labels)


class LinearDistillLoss(torch.nn.Module):
    """`linear_distill_loss` with its settings fixed at construction: takes `softcap`, `student_softcap`,
    `teacher_softcap`, `student_logit_scale`, `teacher_logit_scale`, `chunk_size`, `fp32_logits`, `process_group`,
    `vocab_range`, `reduce_hidden_grad` and every loss setting keyword of `distill_loss`."""

    def __init__(self, *, softcap=None, student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
                 teacher_logit_scale=1.0, chunk_size="auto", fp32_logits=False, process_group=None, vocab_range=None,
                 reduce_hidden_grad=True, **settings):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions.build("LinearDistillLoss", **settings)
        check_chunk_settings(softcap, chunk_size, fp32_logits)
        self.head_settings = dict(softcap=softcap, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                  student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)
        logit_maps(**self.head_settings)
        self.softcap, self.chunk_size, self.fp32_logits = softcap, chunk_size, fp32_logits
        self.process_group, self.vocab_range, self.reduce_hidden_grad = process_group, vocab_range, reduce_hidden_grad

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None, row_weights=None):
        return fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, self.options,
                                 student_bias=student_bias, teacher_bias=teacher_bias, **self.head_settings,
                                 chunk_size=self.chunk_size, fp32_logits=self.fp32_logits,
                                 num_items_in_batch=num_items_in_batch,
                                 process_group=self.process_group, vocab_range=self.vocab_range,
                                 reduce_hidden_grad=self.reduce_hidden_grad, row_weights=row_weights)

    def extra_repr(self) -> str:
        o = self.options
        return (f"divergence={o.divergence!r}, beta={o.beta}, temperature={o.temperature}, "
                f"kd_weight={o.kd_weight}, ce_weight={o.ce_weight}, reduction={o.reduction!r}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size!r}, fp32_logits={self.fp32_logits}")
