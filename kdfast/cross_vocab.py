"""A teacher with another tokenizer: `cross_vocab_distill_loss` over rows already aligned (student [..., V_s], teacher
[..., V_t]) and a `VocabMap` of the tokens both vocabularies hold.

method="mapped": the divergence between the teacher's probabilities at the matched tokens plus one bucket for its
mass on the rest, and the student's the same way: the sparse teacher's bucket algebra, the teacher's log-probs at
the matched columns gathered a chunk of rows at a time (a dense gather, no [N, V] copy) and handed to the sparse
rows kernel of the backend, which writes the gradient. With identical tokenizers it is `distill_loss`.
method="uld" and "hybrid": TRL's GOLD (`kdfast.uld`): the sorted L1 of the two probability vectors, or a divergence
over the matched columns plus the sorted L1 over the rest, a chunk of rows at a time; the CE family from the dense
rows kernel (kd_weight 0). An `alignment` (`kdfast.align_tokenizations`) makes the loss's rows its groups: each
reads its base rows of both logits, merged tokens multiplied in. The chunk loop is `kdfast.cross_vocab_rows`."""

from __future__ import annotations

import torch

from kdfast.alignment import TokenAlignment
from kdfast.cross_vocab_rows import CrossVocabPlan, LogitRows, cross_vocab_parts, loss_rows, unmatched_columns
from kdfast.huge_pages import empty_gradient
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale, returned
from kdfast.saved_gradient import saved_gradient_times, saved_gradients
from kdfast.uld import HYBRID_DIVERGENCES, UldTerms, native_sort_available
from kdfast.validation import check_labels, check_labels_for, check_logits, check_num_items
from kdfast.views import flat_labels
from kdfast.vocab_map import VocabMap

METHODS = ("mapped", "uld", "hybrid")


# Driven from the host (a kernel object, several calls or chunks): torch.compile runs the model around it and calls
# it as is, rather than tracing into it (README, "Backends").
@torch.compiler.disable
def cross_vocab_distill_loss(student_logits, teacher_logits, labels=None, *, vocab_map, alignment=None,
                             method="hybrid", matched_weight=None, unmatched_weight=None, divergence="forward_kl",
                             beta=0.5, temperature=1.0, student_temperature=None, teacher_temperature=None,
                             kd_weight=1.0, ce_weight=0.0, t2_scale=True, ignore_index=-100, reduction="mean",
                             num_items_in_batch=None, inplace_backward=False, backend="auto",
                             return_components=False):
    """Distillation from a teacher of another vocabulary. Without `alignment`, row i of both logits is one position;
    with a `kdfast.TokenAlignment` the loss's rows are its G groups (labels [G], "none" returns [G]), each the base
    rows of both logits with the group's other tokens' probabilities multiplied in as GOLD merges them (method
    "mapped" compares the base rows, unmerged: its divergences need normalised rows). `student_temperature` /
    `teacher_temperature` default to `temperature`; the T^2 factor is the student's. method "mapped" takes every
    divergence; "hybrid" forward KL, reverse KL or JSD(beta) on the matched columns as GOLD computes it
    (probabilities unrenormalised, floored at 1e-8), with `matched_weight` / `unmatched_weight` (default: the matched
    share of the teacher's vocabulary, and the rest); "uld" compares sorted probabilities and takes no divergence.
    CE, ignore_index, reductions, num_items_in_batch and components are `distill_loss`'s; the hybrid's components
    also carry `matched` and `unmatched`, its two parts before their weights (as TRL's GOLD logs them).
    `inplace_backward=True` writes the gradient over the student logits' storage as `distill_loss` does (rows
    without an alignment; nothing else may need those logits afterwards)."""
    opts, teacher_temperature = cross_vocab_options(
        method, vocab_map, temperature, student_temperature, teacher_temperature, divergence=divergence, beta=beta,
        kd_weight=kd_weight, ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
        inplace_backward=inplace_backward, backend=backend, return_components=return_components)
    _check(student_logits, teacher_logits, vocab_map, method, opts, teacher_temperature, alignment)
    if opts.inplace_backward and alignment is not None:
        raise ValueError("inplace_backward=True takes rows without an alignment (an alignment gathers the student's "
                         "rows into groups and adds their gradient back): pass alignment=None or "
                         "inplace_backward=False")
    if alignment is None:
        check_labels(labels, student_logits, opts)
    else:
        check_labels_for(labels, (alignment.groups,), opts.vocab_size or student_logits.shape[-1],
                         student_logits.device, opts, "the alignment's groups")
    check_num_items(num_items_in_batch)
    settings = (method, vocab_map, alignment, float(teacher_temperature), matched_weight, unmatched_weight)
    return returned(CrossVocabFunction.apply(student_logits, teacher_logits.detach(), labels, num_items_in_batch, opts,
                                             settings), opts, labels)


def cross_vocab_options(method: str, vocab_map, temperature, student_temperature, teacher_temperature,
                        **loss_keywords) -> tuple[LossOptions, float]:
    """The settings record (at the student's temperature) and the teacher's temperature, both forms' first checks."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(vocab_map, VocabMap):
        raise ValueError(f"vocab_map must be a kdfast.VocabMap (VocabMap.from_tokenizers), got "
                         f"{type(vocab_map).__name__}")
    student_temperature = temperature if student_temperature is None else student_temperature
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    return LossOptions(temperature=student_temperature, **loss_keywords), teacher_temperature


def _check(student_logits, teacher_logits, vocab_map: VocabMap, method: str, opts: LossOptions, teacher_temperature,
           alignment):
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits are on {teacher_logits.device}, student_logits on {student_logits.device}")
    names = ("student_logits", "teacher_logits")
    if alignment is not None:
        check_alignment(alignment, (student_logits.numel() // student_logits.shape[-1],
                                    teacher_logits.numel() // teacher_logits.shape[-1]),
                        (student_logits.shape[-1], teacher_logits.shape[-1]), names)
    elif teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must have the same rows (aligned positions); the "
                         "vocabularies may differ; rows of two tokenizations take alignment=)")
    check_settings(vocab_map, method, opts, teacher_temperature, (student_logits.shape[-1], teacher_logits.shape[-1]),
                   names)


def check_settings(vocab_map: VocabMap, method: str, opts: LossOptions, teacher_temperature, vocabs: tuple,
                   names: tuple) -> None:
    """The map fits both vocabularies; the method takes the divergence; the teacher's temperature is > 0."""
    if not (isinstance(teacher_temperature, (int, float)) and teacher_temperature > 0):
        raise ValueError(f"teacher_temperature must be a number > 0, got {teacher_temperature!r}")
    vocab_map.check_logits(*vocabs, names=names)
    divergence = opts.effective_divergence.name.lower()
    if method == "uld" and opts.divergence != "forward_kl":
        raise ValueError(f"method='uld' compares sorted probabilities and takes no divergence (got "
                         f"divergence={opts.divergence!r}): use method='hybrid' or 'mapped' for one")
    if method == "hybrid" and divergence not in HYBRID_DIVERGENCES:
        raise ValueError(f"method='hybrid' takes divergence in {HYBRID_DIVERGENCES} on the matched tokens (as TRL's "
                         f"GOLD), got {opts.divergence!r}; method='mapped' takes every divergence")
    if (method == "mapped" and opts.effective_divergence.name.lower() == "forward_kl"
            and vocab_map.matched == vocabs[0] and vocab_map.matched < vocabs[1]):
        raise ValueError(f"vocab_map matches every one of the student's {vocabs[0]} tokens but the teacher holds "
                         f"{vocabs[1] - vocab_map.matched} more: the teacher's mass there has no student bucket, so "
                         "method='mapped' with forward KL is infinite; use method='hybrid' or 'uld', or a divergence "
                         "that stays finite (reverse_kl, jsd, tvd)")
    if method != "uld" and vocab_map.matched == 0:
        raise ValueError(f"vocab_map matches no token: method={method!r} needs matched tokens (method='uld' does not)")


def check_alignment(alignment, rows: tuple, vocabs: tuple, names: tuple) -> None:
    """A TokenAlignment whose rows and merged ids lie in both models' (rows, vocabulary)."""
    if not isinstance(alignment, TokenAlignment):
        raise ValueError(f"alignment must be a kdfast.TokenAlignment (kdfast.align_tokenizations), got "
                         f"{type(alignment).__name__}")
    for name, side, count, vocab in zip(names, (alignment.student, alignment.teacher), rows, vocabs):
        side.check_rows(name, count)
        side.check_ids(name, vocab)


def uld_terms(method: str, vocab_map: VocabMap, student_vocab: int, teacher_vocab: int, opts: LossOptions,
              teacher_temperature: float, matched_weight, unmatched_weight, device) -> UldTerms | None:
    if method == "mapped":
        return None
    return UldTerms(method, vocab_map, student_vocab, teacher_vocab, opts.effective_divergence.name.lower(), opts.beta,
                    opts.temperature, teacher_temperature, matched_weight, unmatched_weight, device,
                    native_sort_available(opts.backend, device))


def mapped_rest(method: str, vocab_map: VocabMap, student_vocab: int, teacher_vocab: int, device):
    return unmatched_columns(vocab_map, student_vocab, teacher_vocab, device) if method == "mapped" else None


class CrossVocabFunction(torch.autograd.Function):
    """Forward computes the rows' parts and the gradient a chunk of rows at a time; backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions, settings):
        method, vocab_map, alignment, teacher_temperature, matched_weight, unmatched_weight = settings
        student = student_logits.reshape(-1, student_logits.shape[-1])
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        device = student.device
        alignment = alignment.to(device) if alignment is not None else None
        plan = CrossVocabPlan(method, vocab_map.to(device), alignment, teacher_temperature,
                              uld_terms(method, vocab_map, student.shape[-1], teacher.shape[-1], opts,
                                        teacher_temperature, matched_weight, unmatched_weight, device),
                              rest=mapped_rest(method, vocab_map, student.shape[-1], teacher.shape[-1], device),
                              native=native_sort_available(opts.backend, device))
        rows = loss_rows(plan, student.shape[0])
        lead_shape = student_logits.shape[:-1] if alignment is None else (rows,)
        flat = flat_labels(labels)
        scale = reduction_scale(flat, rows, opts, num_items_in_batch, device)
        want_grad = ctx.needs_input_grad[0]
        in_place = want_grad and opts.inplace_backward
        if in_place:
            grad = student
        else:  # an alignment gathers rows and adds their gradient at them: rows of no group keep zeros
            grad = empty_gradient(student) if want_grad else None
            if grad is not None and alignment is not None:
                grad.zero_()
        parts = cross_vocab_parts(LogitRows(student, grad, in_place), LogitRows(teacher), flat, scale, opts, plan,
                                  want_grad)
        if grad is not None:
            # In place into the logits' own storage: a detached alias of them (autograd then takes it as the leaf's
            # .grad as it is), or the rows' copy when reshaping them needed one.
            aliases = in_place and grad.data_ptr() == student_logits.data_ptr()
            ctx.save_for_backward(student_logits.detach() if aliases else grad.view(student_logits.shape))
        ctx.reduction = opts.reduction
        ctx.row_groups = row_groups(alignment, student.shape[0]) if alignment is not None else None
        return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        if ctx.row_groups is not None and ctx.reduction == "none":
            # Each student row belongs to one group at most: its gradient scales by that group's grad_output.
            (grad,) = saved_gradients(ctx)
            per_group = torch.cat([grad_output.reshape(-1).to(grad.dtype), grad_output.new_zeros(1, dtype=grad.dtype)])
            grad.view(-1, grad.shape[-1]).mul_(per_group[ctx.row_groups][:, None])
            return grad, None, None, None, None, None
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None


def row_groups(alignment: TokenAlignment, rows: int) -> torch.Tensor:
    """The group of each student row, -1 (the appended zero) for rows of no group."""
    groups = torch.full((rows,), -1, dtype=torch.int64, device=alignment.sample.device)
    groups[alignment.student.base] = torch.arange(alignment.groups, device=groups.device)
    groups[alignment.student.extra_rows] = alignment.student.extra_groups
    return groups
