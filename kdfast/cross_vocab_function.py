"""The autograd Function of `cross_vocab_distill_loss` and what its compiled form (`kdfast.cross_vocab_ops`) and the
fused linear form share with it: the plan of a pass (the map, the alignment, the GOLD terms on the rows' device), the
rows' parts with the gradient, the outputs and the backward."""

from __future__ import annotations

import torch

from kdfast.alignment import TokenAlignment
from kdfast.cross_vocab_rows import CrossVocabPlan, LogitRows, cross_vocab_parts, unmatched_columns
from kdfast.huge_pages import empty_gradient
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale
from kdfast.saved_gradient import saved_gradient_times, saved_gradients
from kdfast.uld import UldTerms, native_sort_available
from kdfast.views import flat_labels
from kdfast.vocab_map import VocabMap


def uld_terms(method: str, vocab_map: VocabMap, student_vocab: int, teacher_vocab: int, opts: LossOptions,
              teacher_temperature: float, matched_weight, unmatched_weight, device) -> UldTerms | None:
    if method == "mapped":
        return None
    return UldTerms(method, vocab_map, student_vocab, teacher_vocab, opts.effective_divergence.name.lower(), opts.beta,
                    opts.temperature, teacher_temperature, matched_weight, unmatched_weight, device,
                    native_sort_available(opts.backend, device))


def mapped_rest(method: str, vocab_map: VocabMap, student_vocab: int, teacher_vocab: int, device):
    return unmatched_columns(vocab_map, student_vocab, teacher_vocab, device) if method == "mapped" else None


def cross_vocab_plan(method: str, vocab_map: VocabMap, alignment, teacher_temperature: float, matched_weight,
                     unmatched_weight, opts: LossOptions, student_vocab: int, teacher_vocab: int, device,
                     chunk_rows: int | None = None) -> CrossVocabPlan:
    """What a pass needs besides the rows, on the rows' device (`chunk_rows` None: chunks by their elements)."""
    return CrossVocabPlan(method, vocab_map.to(device), alignment.to(device) if alignment is not None else None,
                          teacher_temperature,
                          uld_terms(method, vocab_map, student_vocab, teacher_vocab, opts, teacher_temperature,
                                    matched_weight, unmatched_weight, device), chunk_rows,
                          rest=mapped_rest(method, vocab_map, student_vocab, teacher_vocab, device),
                          native=native_sort_available(opts.backend, device))


def parts_and_gradient(student, teacher, labels, scale, opts: LossOptions, plan: CrossVocabPlan, want_grad: bool,
                       in_place: bool):
    """The loss rows' parts and the gradient of the student's rows [N, V_s] (the rows themselves in place, else a
    fresh buffer: under an alignment zeros where a row is in no group; None without want_grad)."""
    if in_place:
        grad = student
    else:  # an alignment gathers rows and adds their gradient at them: rows of no group keep zeros
        grad = empty_gradient(student) if want_grad else None
        if grad is not None and plan.alignment is not None:
            grad.zero_()
    parts = cross_vocab_parts(LogitRows(student, grad, in_place), LogitRows(teacher), labels, scale, opts, plan,
                              want_grad)
    return parts, grad


def flat_inputs(student_logits, teacher_logits, alignment, labels, num_items_in_batch, opts: LossOptions) -> tuple:
    """A cross-vocabulary Function's inputs as its rows take them: both models' rows [N, V], the labels flat and the
    reduction's factor over the loss's rows (an alignment's groups, else the student's rows)."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    rows = alignment.groups if alignment is not None else student.shape[0]
    flat = flat_labels(labels)
    return student, teacher, flat, reduction_scale(flat, rows, opts, num_items_in_batch, student.device)


class CrossVocabFunction(torch.autograd.Function):
    """Forward computes the rows' parts and the gradient a chunk of rows at a time; backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions, settings):
        method, vocab_map, alignment, teacher_temperature, matched_weight, unmatched_weight = settings
        student, teacher, flat, scale = flat_inputs(student_logits, teacher_logits, alignment, labels,
                                                    num_items_in_batch, opts)
        plan = cross_vocab_plan(method, vocab_map, alignment, teacher_temperature, matched_weight, unmatched_weight,
                                opts, student.shape[-1], teacher.shape[-1], student.device)
        in_place = ctx.needs_input_grad[0] and opts.inplace_backward
        parts, grad = parts_and_gradient(student, teacher, flat, scale, opts, plan, ctx.needs_input_grad[0],
                                         in_place)
        if grad is not None:
            # In place into the logits' own storage: a detached alias of them (autograd then takes it as the leaf's
            # .grad as it is), or the rows' copy when reshaping them needed one.
            aliases = in_place and grad.data_ptr() == student_logits.data_ptr()
            ctx.save_for_backward(student_logits.detach() if aliases else grad.view(student_logits.shape))
        return kept_for_backward(ctx, parts, student_logits, plan.alignment, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return cross_vocab_backward(ctx, grad_output), None, None, None, None, None


def kept_for_backward(ctx, parts, student_logits, alignment, labels, opts: LossOptions, scale):
    """A cross-vocabulary Function's outputs from its rows' parts, what its backward reads kept."""
    ctx.reduction = opts.reduction
    rows = student_logits.numel() // student_logits.shape[-1]
    ctx.row_groups = row_groups(alignment, rows) if alignment is not None else None
    lead_shape = student_logits.shape[:-1] if alignment is None else (alignment.groups,)
    return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)


def cross_vocab_backward(ctx, grad_output):
    """The kept gradient times grad_output: per group's grad_output for per-row losses of an alignment."""
    if ctx.row_groups is not None and ctx.reduction == "none":
        # Each student row belongs to one group at most: its gradient scales by that group's grad_output.
        (grad,) = saved_gradients(ctx)
        per_group = torch.cat([grad_output.reshape(-1).to(grad.dtype), grad_output.new_zeros(1, dtype=grad.dtype)])
        grad.view(-1, grad.shape[-1]).mul_(per_group[ctx.row_groups][:, None])
        return grad
    return saved_gradient_times(ctx, grad_output)


def row_groups(alignment: TokenAlignment, rows: int) -> torch.Tensor:
    """The group of each student row, -1 (the appended zero) for rows of no group."""
    groups = torch.full((rows,), -1, dtype=torch.int64, device=alignment.sample.device)
    groups[alignment.student.base] = torch.arange(alignment.groups, device=groups.device)
    groups[alignment.student.extra_rows] = alignment.student.extra_groups
    return groups
