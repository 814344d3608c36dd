"""`linear_cross_vocab_distill_loss`: `cross_vocab_distill_loss` from the two models' hidden states and LM heads of
different vocabularies, a chunk of rows' logits at a time (no [N, V] tensor of either model). The chunk loop is the
logits form's (`kdfast.cross_vocab_rows`); here a `HeadRows` makes a chunk's logits by a GEMM of the hidden rows it
is asked for (aligned groups gather them) and takes their gradient back through the head: d hidden at those rows,
d weight and d bias summed, in forward (backward rescales them, as the other fused linear forms do)."""

from __future__ import annotations

import torch

from kdfast.alignment import TokenAlignment, check_alignment
from kdfast.cross_vocab import check_settings, cross_vocab_options, runs_in_op
from kdfast.cross_vocab_function import row_groups
from kdfast.cross_vocab_rows import cross_vocab_parts, loss_rows
from kdfast.linear_cross_vocab_ops import CompiledLinearCrossVocabFunction
from kdfast.linear_cross_vocab_rows import head_rows, head_rows_plan
from kdfast.logit_maps import logit_maps
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale, returned
from kdfast.saved_gradient import rescale_gradient_, saved_gradients
from kdfast.validation import (
    _check_bias,
    _check_floating,
    _check_one_device,
    check_chunk_settings,
    check_labels_for,
    check_logits,
)
from kdfast.views import flat_labels
from kdfast.zero3 import gathered


def linear_cross_vocab_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                    vocab_map, alignment=None, method="hybrid", student_bias=None, teacher_bias=None,
                                    softcap=None, student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
                                    teacher_logit_scale=1.0, chunk_size="auto", matched_weight=None,
                                    unmatched_weight=None, divergence="forward_kl", beta=0.5, temperature=1.0,
                                    student_temperature=None, teacher_temperature=None, kd_weight=1.0,
                                    ce_weight=0.0, t2_scale=True, ignore_index=-100, reduction="mean",
                                    num_items_in_batch=None, backend="auto", return_components=False):
    """`cross_vocab_distill_loss` of the heads' logits (student [..., H_s] @ [V_s, H_s]^T + bias, teacher [..., H_t]
    @ [V_t, H_t]^T + bias, each mapped as `linear_distill_loss` maps it: scale, then softcap), `chunk_size` rows at a
    time ("auto": 16 MiB of float32 logits per model). Gradients flow to student_hidden, student_weight and
    student_bias. With reduction "mean" or "sum" they are summed in the forward's pass; with "none" (a loss per row,
    or per group of an alignment) the forward computes the losses alone and backward runs the chunks again, each
    row's gradient times its grad_output before it reaches the head's GEMMs. `teacher_weight` None: the teacher is
    given as its logits [..., V_t] in `teacher_hidden` (final: no bias, scale or softcap; what
    `linear_student_cross_vocab_distill_loss` takes), read a chunk of rows at a time."""
    opts, teacher_temperature = cross_vocab_options(
        method, vocab_map, temperature, student_temperature, teacher_temperature, divergence=divergence, beta=beta,
        kd_weight=kd_weight, ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
        backend=backend, return_components=return_components)
    maps = logit_maps(softcap, student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale)
    given = teacher_weight is None
    if given:
        _check_given_teacher(teacher_hidden, teacher_bias, teacher_softcap, teacher_logit_scale)
        _check_one_device(student_hidden, student_weight, teacher_hidden)
    _check_heads(student_hidden, student_weight, student_bias, *((None,) * 3 if given else
                                                                 (teacher_hidden, teacher_weight, teacher_bias)),
                 chunk_size)
    names = ("student_weight", "teacher_logits" if given else "teacher_weight")
    vocabs = (student_weight.shape[0], teacher_hidden.shape[-1] if given else teacher_weight.shape[0])
    if alignment is not None:
        check_alignment(alignment, (student_hidden.numel() // student_hidden.shape[-1],
                                    teacher_hidden.numel() // teacher_hidden.shape[-1]), vocabs,
                        ("student_hidden", "teacher_logits" if given else "teacher_hidden"))
    elif teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"{'teacher_logits' if given else 'teacher_hidden'} {tuple(teacher_hidden.shape)} and "
                         f"student_hidden {tuple(student_hidden.shape)} must have the same rows (aligned positions); "
                         "rows of two tokenizations take alignment=")
    check_settings(vocab_map, method, opts, teacher_temperature, vocabs, names)
    rows = alignment.groups if alignment is not None else student_hidden.numel() // student_hidden.shape[-1]
    lead = (rows,) if alignment is not None else tuple(student_hidden.shape[:-1])
    check_labels_for(labels, lead, student_weight.shape[0], student_hidden.device, opts,
                     "the alignment's groups" if alignment is not None else "the hidden states")
    settings = (method, vocab_map, alignment, float(teacher_temperature), matched_weight, unmatched_weight, maps,
                None if chunk_size == "auto" else chunk_size)
    teacher = (teacher_hidden.detach(), teacher_weight.detach() if not given else None,
               teacher_bias.detach() if teacher_bias is not None else None)
    if torch.compiler.is_compiling() and runs_in_op(method, opts.backend, student_hidden.device.type):
        # Traced by torch.compile: the chunk loop as one custom op.
        return returned(CompiledLinearCrossVocabFunction.apply(student_hidden, student_weight, student_bias, *teacher,
                                                               labels, num_items_in_batch, opts, settings),
                        opts, labels)
    return _host_driven_loss(student_hidden, student_weight, student_bias, teacher, labels, num_items_in_batch, opts,
                             settings)


# The chunk loop is driven from the host: torch.compile calls it as is rather than tracing into it, where the op does
# not take it (`cross_vocab.runs_in_op`).
@torch.compiler.disable
def _host_driven_loss(student_hidden, student_weight, student_bias, teacher, labels, num_items_in_batch, opts,
                      settings):
    return returned(LinearCrossVocabFunction.apply(student_hidden, student_weight, student_bias, *teacher, labels,
                                                   num_items_in_batch, opts, settings), opts, labels)


def linear_student_cross_vocab_distill_loss(student_hidden, student_weight, teacher_logits, labels=None, *,
                                            vocab_map, alignment=None, method="hybrid", student_bias=None,
                                            softcap=None, logit_scale=1.0, chunk_size="auto", matched_weight=None,
                                            unmatched_weight=None, divergence="forward_kl", beta=0.5,
                                            temperature=1.0, student_temperature=None, teacher_temperature=None,
                                            kd_weight=1.0, ce_weight=0.0, t2_scale=True, ignore_index=-100,
                                            reduction="mean", num_items_in_batch=None, backend="auto",
                                            return_components=False):
    """`linear_cross_vocab_distill_loss` with the teacher given as its logits [..., V_t] (its own forward under
    no_grad, on its own tokenization: any float dtype, views read as they are): the student's head fused (its
    `softcap` and `logit_scale`), the teacher's rows read a chunk at a time."""
    return linear_cross_vocab_distill_loss(
        student_hidden, student_weight, teacher_logits, None, labels, vocab_map=vocab_map, alignment=alignment,
        method=method, student_bias=student_bias, student_softcap=softcap, student_logit_scale=logit_scale,
        chunk_size=chunk_size, matched_weight=matched_weight, unmatched_weight=unmatched_weight,
        divergence=divergence, beta=beta, temperature=temperature, student_temperature=student_temperature,
        teacher_temperature=teacher_temperature, kd_weight=kd_weight, ce_weight=ce_weight, t2_scale=t2_scale,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch, backend=backend,
        return_components=return_components)


def _check_given_teacher(teacher_logits, teacher_bias, teacher_softcap, teacher_logit_scale) -> None:
    check_logits("teacher_logits", teacher_logits)
    if teacher_bias is not None or teacher_softcap is not None or teacher_logit_scale != 1.0:
        raise ValueError("a teacher given as its logits has them final: pass no teacher_bias, teacher_softcap or "
                         "teacher_logit_scale with it")
    if teacher_logits.requires_grad:
        raise ValueError("teacher_logits requires grad, but the teacher is a constant in kdfast: pass "
                         "teacher_logits.detach() (or compute the teacher under torch.no_grad())")


def _check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                 chunk_size) -> None:
    """Each head's shapes (the teacher's where it has one: `teacher_weight` not None)."""
    heads = [("student", student_hidden, student_weight, student_bias)]
    if teacher_weight is not None:
        heads.append(("teacher", teacher_hidden, teacher_weight, teacher_bias))
    for prefix, hidden, weight, bias in heads:
        _check_floating(f"{prefix}_hidden", hidden, f"[..., hidden_{prefix[0]}]")
        _check_floating(f"{prefix}_weight", weight, f"[vocab_{prefix[0]}, hidden_{prefix[0]}]")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{prefix}_weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}] for "
                             f"{prefix}_hidden {tuple(hidden.shape)}")
        _check_bias(f"{prefix}_bias", bias, weight.shape[0])
    _check_one_device(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    check_chunk_settings(None, chunk_size)


class LinearCrossVocabFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, num_items_in_batch, opts: LossOptions, settings):
        device = student_hidden.device
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], student_bias is not None and
                  ctx.needs_input_grad[2])
        per_row = opts.reduction == "none"
        heads = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        # Per-row losses: their gradients wait for grad_output, so this pass computes the losses alone.
        student, teacher = head_rows(*heads, settings[6], (False, False, False) if per_row else wanted)
        plan = head_rows_plan(settings, opts, student, teacher, device)
        rows = loss_rows(plan, student.count)
        flat = flat_labels(labels)
        scale = reduction_scale(flat, rows, opts, num_items_in_batch, device)
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            parts = cross_vocab_parts(student, teacher, flat, scale, opts, plan, any(wanted) and not per_row)
        if per_row:
            ctx.save_for_backward(*heads)
            ctx.settings, ctx.opts, ctx.labels, ctx.scale, ctx.wanted = settings, opts, flat, scale, wanted
        else:
            ctx.save_for_backward(
                student.d_hidden.view(student_hidden.shape).to(student_hidden.dtype) if wanted[0] else None,
                student.d_weight.to(student_weight.dtype) if wanted[1] else None,
                student.d_bias.to(student_bias.dtype) if wanted[2] else None)
        ctx.reduction = opts.reduction
        lead_shape = (rows,) if plan.alignment is not None else student_hidden.shape[:-1]
        return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        if ctx.reduction == "none":
            return (*_per_row_backward(ctx, grad_output), None, None, None, None, None, None, None)
        grads = saved_gradients(ctx)
        for grad in grads:
            rescale_gradient_(grad, grad_output)
        return (*grads[:1], grads[1], grads[2], None, None, None, None, None, None, None)


def _per_row_backward(ctx, grad_output):
    """d student_hidden, d student_weight, d student_bias of sum(grad_output * per-row losses): the chunks again,
    each student row's gradient times the grad_output of its loss row (its group's under an alignment; 0 for a row
    of no group)."""
    heads = ctx.saved_tensors
    student_hidden, student_weight, student_bias = heads[:3]
    device = student_hidden.device
    alignment = ctx.settings[2]
    weights = grad_output.reshape(-1).float()
    if isinstance(alignment, TokenAlignment):
        rows = student_hidden.numel() // student_hidden.shape[-1]
        weights = torch.cat([weights, weights.new_zeros(1)])[row_groups(alignment.to(device), rows)]
    student, teacher = head_rows(*heads, ctx.settings[6], ctx.wanted, weights)
    plan = head_rows_plan(ctx.settings, ctx.opts, student, teacher, device)
    # A ZeRO-3 head, whole in the forward (gathered by the caller), may be partitioned again by now (the teacher's
    # was passed detached: it keeps the values it had).
    with torch.autocast(device.type, enabled=False), torch.no_grad(), gathered(student_weight, student_bias):
        cross_vocab_parts(student, teacher, ctx.labels, ctx.scale, ctx.opts, plan, True)
    return (student.d_hidden.view(student_hidden.shape).to(student_hidden.dtype) if ctx.wanted[0] else None,
            student.d_weight.to(student_weight.dtype) if ctx.wanted[1] else None,
            student.d_bias.to(student_bias.dtype) if ctx.wanted[2] else None)
