"""The fused linear loss of several teachers (`linear_multi_teacher_distill_loss`) as a torch.library custom op, so
that a torch.compile'd step traces through it whole (`fullgraph=True` included), as `kdfast.linear_ops` does for one
teacher.

`kdfast::linear_multi_teacher_forward` runs the chunk loop of the eager Function with a `TeacherHeads` kind: each
teacher's hidden states, head and bias as tensor lists (a teacher given as its logits: them, None, None), their rows'
log-weights (computed while tracing, from any weights mode) or a routing (each row's teacher, read on the host inside
the op), their logit maps as float lists and the GEMM dtypes as names (a schema takes no dtype list). It returns the
rows' loss parts, the gradients, and each teacher's own divergence per row when the components are wanted.
`CompiledLinearMultiTeacherFunction` reduces them as `LinearDistillFunction` does; for per-row losses its backward runs
the op again with each row's grad_output."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.kernel_abi import PART_COLUMNS
from kdfast.linear_chunks import Heads, TeacherHead, TeacherLogits, Wanted, run_chunks
from kdfast.linear_function import gemm_dtype
from kdfast.linear_ops import _map, keep_for_backward, op_forward_inputs, student_gradients
from kdfast.linear_teachers import TeacherHeads
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions
from kdfast.reduction import reduced_with_teachers
from kdfast.teacher_routing import host_routing

# Written out: torch 2.4's schema inference takes no list annotations.
_SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor[] teacher_hidden, "
           "Tensor?[] teacher_weight, Tensor?[] teacher_bias, Tensor? log_weights, Tensor? route, Tensor? labels, "
           "Tensor grad_scale, Tensor? row_weights, bool want_hidden, bool want_weight, bool want_bias, "
           "bool want_teachers, float student_scale, float student_softcap, float[] teacher_scales, "
           "float[] teacher_softcaps, str gemm_dtypes, int chunk_size, bool fp32_logits, str combine, str settings) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("kdfast::linear_multi_teacher_forward", mutates_args=(), schema=_SCHEMA)
def linear_multi_teacher_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                 teacher_bias, log_weights, route, labels, grad_scale, row_weights, want_hidden,
                                 want_weight, want_bias, want_teachers, student_scale, student_softcap, teacher_scales,
                                 teacher_softcaps, gemm_dtypes, chunk_size, fp32_logits, combine, settings):
    """The student's hidden states [N, H] and head [V, H]; each teacher's hidden states ([N, H_m], or routed its own
    rows [n_m, H_m]), head [V, H_m] and bias, or where its head is None its logits as given ([..., V]: no map, no
    bias); the rows' log-weights [N, M], or `route` [N] each row's teacher. The
    rows' loss parts [N, PART_COLUMNS] float32, d hidden, d weight, d bias in their inputs' dtypes and each teacher's
    own divergence per row [N, M] float32 (an empty tensor where not wanted). Softcaps of 0: none; `gemm_dtypes` the
    student's GEMM dtype and each teacher's, by name, comma-separated; `chunk_size` 0: "auto"."""
    opts = LossOptions.decode(settings)
    student_dtype, *teacher_dtypes = (getattr(torch, name) for name in gemm_dtypes.split(","))
    heads = [TeacherHead(hidden, weight, bias, dtype, _map(scale, cap)) if weight is not None else TeacherLogits(hidden)
             for hidden, weight, bias, dtype, scale, cap
             in zip(teacher_hidden, teacher_weight, teacher_bias, teacher_dtypes, teacher_scales, teacher_softcaps)]
    rows = student_hidden.shape[0]
    per_teacher = student_hidden.new_zeros(rows, len(heads), dtype=torch.float32) if want_teachers else None
    routing = (host_routing(route, len(heads), [head.row_count for head in heads], student_hidden.device)
               if route is not None else None)
    teachers = TeacherHeads(heads, log_weights, combine, opts.temperature, per_teacher, routing)
    chunks = Heads(student_hidden, student_weight, student_bias, teachers, labels, _map(student_scale, student_softcap),
                   student_dtype, fp32_logits)
    with torch.autocast(student_hidden.device.type, enabled=False), torch.no_grad():
        parts, d_hidden, d_weight, d_bias = run_chunks(chunks, opts, grad_scale,
                                                       Wanted(want_hidden, want_weight, want_bias),
                                                       chunk_size or "auto", device_rows(opts, student_hidden.device),
                                                       row_weights=row_weights)
    # A fresh empty tensor per missing output: an op's outputs may not alias each other.
    return (parts, d_hidden if d_hidden is not None else student_hidden.new_empty(0),
            d_weight.to(student_weight.dtype) if d_weight is not None else student_hidden.new_empty(0),
            d_bias.to(student_bias.dtype) if d_bias is not None else student_hidden.new_empty(0),
            per_teacher if per_teacher is not None else student_hidden.new_empty(0))


@linear_multi_teacher_forward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, log_weights, route,
      labels, grad_scale, row_weights, want_hidden, want_weight, want_bias, want_teachers, *settings):
    def like(tensor, want):
        return torch.empty_like(tensor) if want else student_hidden.new_empty(0)

    rows = student_hidden.shape[0]
    return (student_hidden.new_empty(rows, PART_COLUMNS, dtype=torch.float32), like(student_hidden, want_hidden),
            like(student_weight, want_weight),
            like(student_bias, want_bias) if student_bias is not None else student_hidden.new_empty(0),
            student_hidden.new_empty(rows, len(teacher_hidden), dtype=torch.float32) if want_teachers
            else student_hidden.new_empty(0))


def compiled_multi_teacher_loss(student_hidden, student_weight, student_bias, heads: list, log_weights, route, labels,
                                num_items_in_batch, opts: LossOptions, combine: str, student_map: LogitMap,
                                chunk_size, fp32_logits: bool):
    """The loss through the op, as `LinearDistillFunction` returns it for several teachers: `heads` the teachers'
    `TeacherHead`s or `TeacherLogits` (constants), `log_weights` [N, M] or `route` (each row's teacher)."""
    given = [isinstance(head, TeacherLogits) for head in heads]
    # Given logits pass as given: a reshape would copy a view such as logits[:, :-1] whole.
    teachers = ([head.logits if own else head.hidden.reshape(-1, head.hidden.shape[-1])
                 for head, own in zip(heads, given)],
                [None if own else head.weight for head, own in zip(heads, given)],
                [None if own else head.bias for head, own in zip(heads, given)])
    maps = [LogitMap() if own else head.logit_map for head, own in zip(heads, given)]
    dtypes = ",".join(str(dtype).removeprefix("torch.") for dtype in
                      (gemm_dtype(student_hidden, student_weight),
                       *(head.dtype if own else gemm_dtype(head.hidden, head.weight)
                         for head, own in zip(heads, given))))
    settings = (student_map.scale, student_map.softcap or 0.0, [teacher_map.scale for teacher_map in maps],
                [teacher_map.softcap or 0.0 for teacher_map in maps], dtypes,
                0 if chunk_size == "auto" else int(chunk_size), fp32_logits, combine, opts.encoded())
    route = route.reshape(-1) if route is not None else None
    return CompiledLinearMultiTeacherFunction.apply(student_hidden, student_weight, student_bias, labels,
                                                    num_items_in_batch, opts, settings, log_weights, route, *teachers)


class CompiledLinearMultiTeacherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts: LossOptions,
                settings: tuple, log_weights, route, teacher_hidden, teacher_weight, teacher_bias):
        lead_shape, hidden, labels, scale = op_forward_inputs(ctx, student_hidden, student_bias, labels,
                                                              num_items_in_batch, opts)
        # Lists of tensors are kept on ctx for a per-row backward: the teachers are constants of the step.
        ctx.settings, ctx.teachers = settings, (teacher_hidden, teacher_weight, teacher_bias, log_weights, route,
                                                labels)
        parts, *grads, per_teacher = linear_multi_teacher_forward(
            hidden, student_weight, student_bias, *ctx.teachers, scale, None,
            *((False, False, False) if ctx.per_row else ctx.wanted), opts.return_components, *settings)
        keep_for_backward(ctx, hidden, student_weight, student_bias, *grads)
        return reduced_with_teachers(ctx, parts, per_teacher, lead_shape, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grads):
        def rerun(saved, ones, row_weights):
            return linear_multi_teacher_forward(*saved, *ctx.teachers, ones, row_weights, *ctx.wanted, False,
                                                *ctx.settings)[1:4]

        return (*student_gradients(ctx, grad_output, rerun), None, None, None, None, None, None, None, None, None)
