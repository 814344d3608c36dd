"""The logits-level loss of a teacher with another tokenizer (`cross_vocab_distill_loss`) as torch.library custom ops,
so that a torch.compile'd step traces through it whole (`fullgraph=True` included), as `kdfast.ops` does for one
vocabulary.

Two ops, as there: `kdfast::cross_vocab_forward` returns the loss rows' parts and a fresh gradient,
`kdfast::cross_vocab_forward_inplace` writes the gradient over the student's rows. Both run the eager Function's rows
(`cross_vocab_function.parts_and_gradient`) on a plan built inside the op: the vocabulary map as its two id tensors
and its sizes, an alignment as its nine tensors (none: row i with row i), the method, the teacher's temperature and
the hybrid's weights as plain arguments."""

from __future__ import annotations

import torch

from kdfast.alignment import SideRows, TokenAlignment, check_alignment
from kdfast.cross_vocab_function import (
    cross_vocab_backward,
    cross_vocab_plan,
    flat_inputs,
    kept_for_backward,
    parts_and_gradient,
)
from kdfast.kernel_abi import PART_COLUMNS
from kdfast.options import LossOptions
from kdfast.reduction import PART_SPLIT_COLUMNS
from kdfast.vocab_map import VocabMap

# Written out: torch 2.4's schema inference takes no list annotations.
_INPUTS = ("Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor map_student_ids, Tensor map_teacher_ids, "
           "int map_student_size, int map_teacher_size, Tensor[] alignment, str method, float teacher_temperature, "
           "float? matched_weight, float? unmatched_weight, str settings")
_SCHEMA = f"(Tensor student, {_INPUTS}, bool want_grad) -> (Tensor, Tensor)"
_INPLACE_SCHEMA = f"(Tensor(a!) student, {_INPUTS}) -> Tensor"
_SIDE_FIELDS = ("base", "extra_rows", "extra_ids", "extra_groups")


def alignment_tensors(alignment: TokenAlignment | None) -> list:
    """An alignment as the ops take it: each side's four tensors, then the groups' samples (none: an empty list)."""
    if alignment is None:
        return []
    return [*(getattr(alignment.student, name) for name in _SIDE_FIELDS),
            *(getattr(alignment.teacher, name) for name in _SIDE_FIELDS), alignment.sample]


def alignment_from_tensors(tensors: list) -> TokenAlignment | None:
    if not tensors:
        return None
    return TokenAlignment(SideRows(*tensors[:4]), SideRows(*tensors[4:8]), tensors[8])


def _rows(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids, map_student_size,
          map_teacher_size, alignment, method, teacher_temperature, matched_weight, unmatched_weight, settings,
          want_grad, in_place):
    opts = LossOptions.decode(settings)
    vocab_map = VocabMap.of_checked_ids(map_student_ids, map_teacher_ids, map_student_size, map_teacher_size)
    # The checks of values a traced call left out (a read would break the graph): here, before a kernel reads them.
    names, vocabs = ("student_logits", "teacher_logits"), (student.shape[-1], teacher.shape[-1])
    vocab_map.check_logits(*vocabs, names=names)
    aligned = alignment_from_tensors(alignment)
    if aligned is not None:
        check_alignment(aligned, (student.shape[0], teacher.shape[0]), vocabs, names)
    plan = cross_vocab_plan(method, vocab_map, aligned, teacher_temperature, matched_weight, unmatched_weight, opts,
                            *vocabs, student.device)
    return parts_and_gradient(student, teacher, labels, grad_scale, opts, plan, want_grad, in_place)


@torch.library.custom_op("kdfast::cross_vocab_forward", mutates_args=(), schema=_SCHEMA)
def cross_vocab_forward(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids, map_student_size,
                        map_teacher_size, alignment, method, teacher_temperature, matched_weight, unmatched_weight,
                        settings, want_grad):
    """The student's rows [N, V_s] and the teacher's [N_t, V_t] in; the loss rows' parts [rows, PART_COLUMNS] float32
    ([rows, PART_SPLIT_COLUMNS] for the hybrid) and the gradient (or an empty tensor)."""
    parts, grad = _rows(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids, map_student_size,
                        map_teacher_size, alignment, method, teacher_temperature, matched_weight, unmatched_weight,
                        settings, want_grad, False)
    return parts, grad if grad is not None else student.new_empty(0)


@cross_vocab_forward.register_fake
def _(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids, map_student_size, map_teacher_size,
      alignment, method, teacher_temperature, matched_weight, unmatched_weight, settings, want_grad):
    return (_fake_parts(student, alignment, method),
            torch.empty_like(student) if want_grad else student.new_empty(0))


@torch.library.custom_op("kdfast::cross_vocab_forward_inplace", mutates_args=("student",), schema=_INPLACE_SCHEMA)
def cross_vocab_forward_inplace(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids,
                                map_student_size, map_teacher_size, alignment, method, teacher_temperature,
                                matched_weight, unmatched_weight, settings):
    """Like cross_vocab_forward, but the gradient overwrites `student` (rows without an alignment)."""
    return _rows(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids, map_student_size,
                 map_teacher_size, alignment, method, teacher_temperature, matched_weight, unmatched_weight, settings,
                 True, True)[0]


@cross_vocab_forward_inplace.register_fake
def _(student, teacher, labels, grad_scale, map_student_ids, map_teacher_ids, map_student_size, map_teacher_size,
      alignment, method, teacher_temperature, matched_weight, unmatched_weight, settings):
    return _fake_parts(student, alignment, method)


def _fake_parts(student, alignment, method):
    rows = alignment[8].shape[0] if alignment else student.shape[0]
    return student.new_empty(rows, PART_SPLIT_COLUMNS if method == "hybrid" else PART_COLUMNS, dtype=torch.float32)


class CompiledCrossVocabFunction(torch.autograd.Function):
    """`CrossVocabFunction` through the ops: forward keeps the gradient, backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions, settings):
        method, vocab_map, alignment, teacher_temperature, matched_weight, unmatched_weight = settings
        alignment = alignment.to(student_logits.device) if alignment is not None else None
        student, teacher, flat, scale = flat_inputs(student_logits, teacher_logits, alignment, labels,
                                                    num_items_in_batch, opts)
        inputs = (teacher, flat, scale, vocab_map.student_ids, vocab_map.teacher_ids, vocab_map.student_size,
                  vocab_map.teacher_size, alignment_tensors(alignment), method, float(teacher_temperature),
                  optional_float(matched_weight), optional_float(unmatched_weight), opts.encoded())
        if ctx.needs_input_grad[0] and opts.inplace_backward:
            parts = cross_vocab_forward_inplace(student, *inputs)
            grad = student
        else:
            parts, grad = cross_vocab_forward(student, *inputs, ctx.needs_input_grad[0])
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(grad.view(student_logits.shape))
        return kept_for_backward(ctx, parts, student_logits, alignment, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return cross_vocab_backward(ctx, grad_output), None, None, None, None, None


def optional_float(weight):
    return float(weight) if weight is not None else None
