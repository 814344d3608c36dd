"""A teacher with another tokenizer: `cross_vocab_distill_loss` over rows already aligned (student [..., V_s], teacher
[..., V_t]) and a `VocabMap` of the tokens both vocabularies hold.

method="mapped": the divergence between the teacher's probabilities at the matched tokens plus one bucket for its
mass on the rest, and the student's the same way: the sparse teacher's bucket algebra, the teacher's log-probs at
the matched columns gathered a chunk of rows at a time (a dense gather, no [N, V] copy) and handed to the sparse
rows kernel of the backend, which writes the gradient. With identical tokenizers it is `distill_loss`.
method="uld" and "hybrid": TRL's GOLD (`kdfast.uld`): the sorted L1 of the two probability vectors, or a divergence
over the matched columns plus the sorted L1 over the rest, a chunk of rows at a time; the CE family from the dense
rows kernel (kd_weight 0)."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.kernel_abi import PART_COLUMNS, PART_ENTROPY, PART_KD, SparseTargets
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale, returned
from kdfast.saved_gradient import saved_gradient_times
from kdfast.sparse_options import SparseOptions
from kdfast.uld import HYBRID_DIVERGENCES, UldTerms, native_sort_available
from kdfast.validation import check_labels, check_logits, check_num_items
from kdfast.views import flat_labels
from kdfast.vocab_map import VocabMap

METHODS = ("mapped", "uld", "hybrid")
_CHUNK_ELEMENTS = 1 << 22  # a chunk's [rows, V] float32 temporaries: 16 MiB each


def cross_vocab_distill_loss(student_logits, teacher_logits, labels=None, *, vocab_map, method="hybrid",
                             matched_weight=None, unmatched_weight=None, divergence="forward_kl", beta=0.5,
                             temperature=1.0, student_temperature=None, teacher_temperature=None, kd_weight=1.0,
                             ce_weight=0.0, t2_scale=True, ignore_index=-100, reduction="mean",
                             num_items_in_batch=None, backend="auto", return_components=False):
    """Distillation from a teacher of another vocabulary, over aligned rows (`kdfast.align_tokenizations` is to come;
    row i of both is one position). `student_temperature` / `teacher_temperature` default to `temperature`; the T^2
    factor is the student's. method "mapped" takes every divergence; "hybrid" forward KL, reverse KL or JSD(beta) on
    the matched columns as GOLD computes it (probabilities unrenormalised, floored at 1e-8), with `matched_weight` /
    `unmatched_weight` (default: the matched share of the teacher's vocabulary, and the rest); "uld" compares sorted
    probabilities and takes no divergence. CE, ignore_index, reductions, num_items_in_batch and components are
    `distill_loss`'s."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(vocab_map, VocabMap):
        raise ValueError(f"vocab_map must be a kdfast.VocabMap (VocabMap.from_tokenizers), got "
                         f"{type(vocab_map).__name__}")
    student_temperature = temperature if student_temperature is None else student_temperature
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    opts = LossOptions(divergence=divergence, beta=beta, temperature=student_temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       backend=backend, return_components=return_components)
    _check(student_logits, teacher_logits, vocab_map, method, opts, teacher_temperature)
    check_labels(labels, student_logits, opts)
    check_num_items(num_items_in_batch)
    settings = (method, vocab_map, float(teacher_temperature), matched_weight, unmatched_weight)
    return returned(CrossVocabFunction.apply(student_logits, teacher_logits.detach(), labels, num_items_in_batch, opts,
                                             settings), opts, labels)


def _check(student_logits, teacher_logits, vocab_map: VocabMap, method: str, opts: LossOptions, teacher_temperature):
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must have the same rows (aligned positions); the "
                         "vocabularies may differ")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits are on {teacher_logits.device}, student_logits on {student_logits.device}")
    if not (isinstance(teacher_temperature, (int, float)) and teacher_temperature > 0):
        raise ValueError(f"teacher_temperature must be a number > 0, got {teacher_temperature!r}")
    vocab_map.check_logits(student_logits.shape[-1], teacher_logits.shape[-1])
    divergence = opts.effective_divergence.name.lower()
    if method == "uld" and opts.divergence != "forward_kl":
        raise ValueError(f"method='uld' compares sorted probabilities and takes no divergence (got "
                         f"divergence={opts.divergence!r}): use method='hybrid' or 'mapped' for one")
    if method == "hybrid" and divergence not in HYBRID_DIVERGENCES:
        raise ValueError(f"method='hybrid' takes divergence in {HYBRID_DIVERGENCES} on the matched tokens (as TRL's "
                         f"GOLD), got {opts.divergence!r}; method='mapped' takes every divergence")
    if method != "uld" and vocab_map.matched == 0:
        raise ValueError(f"vocab_map matches no token: method={method!r} needs matched tokens (method='uld' does not)")


class CrossVocabFunction(torch.autograd.Function):
    """Forward computes the rows' parts and the gradient a chunk of rows at a time; backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions, settings):
        method, vocab_map, teacher_temperature, matched_weight, unmatched_weight = settings
        lead_shape = student_logits.shape[:-1]
        student = student_logits.reshape(-1, student_logits.shape[-1])
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        flat = flat_labels(labels)
        rows = student.shape[0]
        scale = reduction_scale(flat, rows, opts, num_items_in_batch, student.device)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        vocab_map = vocab_map.to(student.device)
        if method == "mapped":
            parts = _mapped_parts(student, teacher, flat, scale, grad, opts, vocab_map, teacher_temperature)
        else:
            terms = UldTerms(method, vocab_map, student.shape[-1], teacher.shape[-1],
                             opts.effective_divergence.name.lower(), opts.beta, opts.temperature,
                             teacher_temperature, matched_weight, unmatched_weight, student.device,
                             native_sort_available(opts.backend, student.device))
            parts = _uld_parts(student, teacher, flat, scale, grad, opts, terms)
        if grad is not None:
            ctx.save_for_backward(grad.view(student_logits.shape))
        ctx.reduction = opts.reduction
        return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None


def _chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _mapped_parts(student, teacher, labels, scale, grad, opts: LossOptions, vocab_map: VocabMap,
                  teacher_temperature: float):
    """The sparse rows kernel per chunk, the teacher's log-probs at T_t gathered at the matched columns."""
    sparse = SparseOptions(**{name: getattr(opts, name) for name in LossOptions.FIELD_NAMES}, tail="bucket")
    rows_kernel = device_rows(sparse, student.device)
    parts = torch.empty(student.shape[0], PART_COLUMNS, device=student.device)
    matched = vocab_map.matched
    for span in _chunks(student.shape[0], max(student.shape[-1], teacher.shape[-1])):
        count = span.stop - span.start
        log_p = torch.log_softmax(teacher[span].float() / teacher_temperature, dim=-1)
        targets = SparseTargets(vocab_map.student_ids.expand(1, count, matched),
                                log_p.index_select(1, vocab_map.teacher_ids).unsqueeze(0))
        chunk_labels = labels[span] if labels is not None else None
        chunk_grad = grad[span].unsqueeze(0) if grad is not None else None
        parts[span] = rows_kernel(student[span].unsqueeze(0), targets, chunk_labels, scale, chunk_grad, sparse)
    return parts


def _uld_parts(student, teacher, labels, scale, grad, opts: LossOptions, terms: UldTerms):
    """The CE family from the dense rows kernel (kd_weight 0), then per chunk the ULD rows and their gradient (times
    kd_scale and the reduction's scale; ignored rows none) added to it."""
    ce_only = opts.replace(kd_weight=0.0)
    if opts.has_ce:
        parts = device_rows(ce_only, student.device)(student.unsqueeze(0), student.unsqueeze(0), labels, scale,
                                                     grad.unsqueeze(0) if grad is not None else None, ce_only)
    else:
        parts = torch.zeros(student.shape[0], PART_COLUMNS, device=student.device)
        if grad is not None and not opts.has_kd:
            grad.zero_()
    if not opts.has_kd:
        return parts
    kept = (labels != opts.ignore_index) if labels is not None else None
    for span in _chunks(student.shape[0], max(student.shape[-1], teacher.shape[-1])):
        teacher_probs = terms.teacher_probs(teacher[span])
        with torch.enable_grad():
            logits = student[span].detach().float().requires_grad_(grad is not None)
            losses, entropy = terms.row_losses(logits, teacher_probs)
            if kept is not None:
                losses = torch.where(kept[span], losses, torch.zeros_like(losses))
                entropy = torch.where(kept[span], entropy, torch.zeros_like(entropy))
            if grad is not None:
                (chunk_grad,) = torch.autograd.grad(losses.sum() * (scale * opts.kd_scale), logits)
                if opts.has_ce:
                    grad[span] += chunk_grad.to(grad.dtype)
                else:  # the first gradient these rows get: written, not added to a zeroed buffer
                    grad[span] = chunk_grad
        parts[span, PART_KD] = losses.detach()
        parts[span, PART_ENTROPY] = entropy
    return parts
