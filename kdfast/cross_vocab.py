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

from kdfast.alignment import check_alignment
from kdfast.cross_vocab_function import CrossVocabFunction
from kdfast.cross_vocab_ops import CompiledCrossVocabFunction
from kdfast.options import LossOptions
from kdfast.reduction import returned
from kdfast.uld import HYBRID_DIVERGENCES, native_sort_available
from kdfast.validation import check_labels, check_labels_for, check_logits, check_num_items
from kdfast.vocab_map import VocabMap

METHODS = ("mapped", "uld", "hybrid")


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
    if torch.compiler.is_compiling() and runs_in_op(method, opts.backend, student_logits.device.type):
        # Traced by torch.compile: the rows as one custom op.
        return returned(CompiledCrossVocabFunction.apply(student_logits, teacher_logits.detach(), labels,
                                                         num_items_in_batch, opts, settings), opts, labels)
    return _host_driven_loss(student_logits, teacher_logits, labels, num_items_in_batch, opts, settings)


@torch.compiler.assume_constant_result
def runs_in_op(method: str, backend: str, device_type: str) -> bool:
    """Whether a compiled step runs the rows as `kdfast.cross_vocab_ops`' op: "mapped" everywhere, ULD and the hybrid
    where the C++ passes run them (their torch form takes its gradient by autograd, which an op's kernel has not)."""
    return method == "mapped" or native_sort_available(backend, torch.device(device_type))


# Driven from the host (a kernel object, several calls or chunks): torch.compile runs the model around it and calls
# it as is, rather than tracing into it (README, "Backends"), where the op does not take the rows.
@torch.compiler.disable
def _host_driven_loss(student_logits, teacher_logits, labels, num_items_in_batch, opts, settings):
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
    if not torch.compiler.is_compiling():  # values are read where the rows are (kdfast.cross_vocab_ops checks there)
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
