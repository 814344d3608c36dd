"""The fused linear loss of a teacher with another tokenizer (`linear_cross_vocab_distill_loss`) as a torch.library
custom op, so that a torch.compile'd step traces through it whole (`fullgraph=True` included), as `kdfast.linear_ops`
does for one vocabulary.

`kdfast::linear_cross_vocab_forward` runs the eager Function's chunk loop (`HeadRows` of both heads through
`cross_vocab_rows.cross_vocab_parts`) on a plan built inside the op: the map as its id tensors and sizes, an alignment
as its nine tensors, each head's logit map as two floats. It returns the loss rows' parts and the student's d hidden,
d weight and d bias; for per-row losses the backward runs it again with each row's grad_output (an alignment's group's
for the rows of that group)."""

from __future__ import annotations

import torch

from kdfast.alignment import check_alignment
from kdfast.cross_vocab_function import row_groups
from kdfast.cross_vocab_ops import alignment_from_tensors, alignment_tensors, optional_float
from kdfast.cross_vocab_rows import cross_vocab_parts
from kdfast.kernel_abi import PART_COLUMNS
from kdfast.linear_cross_vocab_rows import head_rows, head_rows_plan
from kdfast.linear_ops import _map, keep_for_backward, student_gradients
from kdfast.options import LossOptions
from kdfast.reduction import PART_SPLIT_COLUMNS, reduced_outputs, reduction_scale
from kdfast.views import flat_labels
from kdfast.vocab_map import VocabMap

# Written out: torch 2.4's schema inference takes no list annotations.
_SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, "
           "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? labels, Tensor grad_scale, Tensor? row_weights, "
           "bool want_hidden, bool want_weight, bool want_bias, Tensor map_student_ids, Tensor map_teacher_ids, "
           "int map_student_size, int map_teacher_size, Tensor[] alignment, str method, float teacher_temperature, "
           "float? matched_weight, float? unmatched_weight, float student_scale, float student_softcap, "
           "float teacher_scale, float teacher_softcap, int chunk_size, str settings) "
           "-> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("kdfast::linear_cross_vocab_forward", mutates_args=(), schema=_SCHEMA)
def linear_cross_vocab_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                               teacher_bias, labels, grad_scale, row_weights, want_hidden, want_weight, want_bias,
                               map_student_ids, map_teacher_ids, map_student_size, map_teacher_size, alignment, method,
                               teacher_temperature, matched_weight, unmatched_weight, student_scale, student_softcap,
                               teacher_scale, teacher_softcap, chunk_size, settings):
    """Both models' hidden states [N, H] / [N_t, H_t] and heads (or, the teacher's head None, its logits as given
    [..., V_t]); the loss rows' parts (PART_SPLIT_COLUMNS for the
    hybrid) and d hidden, d weight, d bias in their inputs' dtypes (an empty tensor where not wanted). `row_weights`
    [N]: each student row's gradient times its weight (a per-row backward). Softcaps of 0: none; `chunk_size` 0:
    "auto"."""
    opts = LossOptions.decode(settings)
    vocab_map = VocabMap.of_checked_ids(map_student_ids, map_teacher_ids, map_student_size, map_teacher_size)
    aligned = alignment_from_tensors(alignment)
    # The checks of values a traced call left out (a read would break the graph): here, before a kernel reads them.
    given = teacher_weight is None  # the teacher's logits as given, [..., V_t]
    vocabs = (student_weight.shape[0], teacher_hidden.shape[-1] if given else teacher_weight.shape[0])
    vocab_map.check_logits(*vocabs, names=("student_weight", "teacher_logits" if given else "teacher_weight"))
    if aligned is not None:
        check_alignment(aligned, (student_hidden.shape[0], teacher_hidden.numel() // teacher_hidden.shape[-1]),
                        vocabs, ("student_hidden", "teacher_logits" if given else "teacher_hidden"))
    maps = (_map(student_scale, student_softcap), _map(teacher_scale, teacher_softcap))
    wanted = (want_hidden, want_weight, want_bias)
    student, teacher = head_rows(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                 teacher_bias, maps, wanted, row_weights)
    settings_record = (method, vocab_map, aligned, teacher_temperature, matched_weight, unmatched_weight, maps,
                       chunk_size or None)
    plan = head_rows_plan(settings_record, opts, student, teacher, student_hidden.device)
    with torch.autocast(student_hidden.device.type, enabled=False), torch.no_grad():
        parts = cross_vocab_parts(student, teacher, labels, grad_scale, opts, plan, any(wanted))
    return (parts,
            student.d_hidden.to(student_hidden.dtype) if want_hidden else student_hidden.new_empty(0),
            student.d_weight.to(student_weight.dtype) if want_weight else student_hidden.new_empty(0),
            student.d_bias.to(student_bias.dtype) if want_bias else student_hidden.new_empty(0))


@linear_cross_vocab_forward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, grad_scale,
      row_weights, want_hidden, want_weight, want_bias, map_student_ids, map_teacher_ids, map_student_size,
      map_teacher_size, alignment, method, *settings):
    def like(tensor, want):
        return torch.empty_like(tensor) if want else student_hidden.new_empty(0)

    rows = alignment[8].shape[0] if alignment else student_hidden.shape[0]
    return (student_hidden.new_empty(rows, PART_SPLIT_COLUMNS if method == "hybrid" else PART_COLUMNS,
                                     dtype=torch.float32),
            like(student_hidden, want_hidden), like(student_weight, want_weight),
            like(student_bias, want_bias) if student_bias is not None else student_hidden.new_empty(0))


class CompiledLinearCrossVocabFunction(torch.autograd.Function):
    """`LinearCrossVocabFunction` through the op: forward keeps the gradients (or, per row, the op's inputs), backward
    rescales them (or runs the op again with each row's grad_output)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, num_items_in_batch, opts: LossOptions, settings):
        method, vocab_map, alignment, teacher_temperature, matched_weight, unmatched_weight, maps, chunk = settings
        alignment = alignment.to(student_hidden.device) if alignment is not None else None
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        flat = flat_labels(labels)
        rows = alignment.groups if alignment is not None else hidden.shape[0]
        scale = reduction_scale(flat, rows, opts, num_items_in_batch, hidden.device)
        ctx.wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                      student_bias is not None and ctx.needs_input_grad[2])
        ctx.per_row, ctx.hidden_shape = opts.reduction == "none", student_hidden.shape
        # Kept on ctx for a per-row backward: the teacher's tensors and the alignment are constants of the step.
        # (Given logits pass as given: a reshape would copy a view such as logits[:, :-1] whole.)
        ctx.teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_weight is not None
                       else teacher_hidden, teacher_weight, teacher_bias, flat)
        ctx.settings = (vocab_map.student_ids, vocab_map.teacher_ids, vocab_map.student_size, vocab_map.teacher_size,
                        alignment_tensors(alignment), method, float(teacher_temperature),
                        optional_float(matched_weight), optional_float(unmatched_weight), maps[0].scale,
                        maps[0].softcap or 0.0, maps[1].scale, maps[1].softcap or 0.0, chunk or 0, opts.encoded())
        ctx.row_groups = row_groups(alignment, hidden.shape[0]) if alignment is not None else None
        parts, *grads = linear_cross_vocab_forward(
            hidden, student_weight, student_bias, *ctx.teacher[:3], flat, scale, None,
            *((False, False, False) if ctx.per_row else ctx.wanted), *ctx.settings)
        keep_for_backward(ctx, hidden, student_weight, student_bias, *grads)
        ctx.reduction = opts.reduction
        lead_shape = (rows,) if alignment is not None else student_hidden.shape[:-1]
        return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        def rerun(saved, ones, row_weights):
            if ctx.row_groups is not None:  # each student row takes its group's grad_output (0: in no group)
                row_weights = torch.cat([row_weights, row_weights.new_zeros(1)])[ctx.row_groups]
            teacher_hidden, teacher_weight, teacher_bias, labels = ctx.teacher
            return linear_cross_vocab_forward(*saved, teacher_hidden, teacher_weight, teacher_bias, labels, ones,
                                              row_weights, *ctx.wanted, *ctx.settings)[1:4]

        return (*student_gradients(ctx, grad_output, rerun), None, None, None, None, None, None, None)
