"""The autograd Function of the fused linear loss.

"mean" and "sum": the gradients are final in the forward pass (up to grad_output), computed chunk by chunk
while the chunk's logits exist; backward only rescales them. "none": each row's gradient depends on its
own grad_output, so forward computes the loss alone and backward runs the chunks again with those weights.
Nothing is computed for gradients when no student input requires one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.kernel_abi import SparseTargets
from kdfast.linear_chunks import Heads, TeacherHead, TeacherLogits, Wanted, run_chunks
from kdfast.linear_teachers import TeacherHeads
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale, with_teacher_summary
from kdfast.saved_gradient import rescale_gradient_, saved_gradients
from kdfast.views import flat_labels
from kdfast.zero3 import gathered


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of a head's GEMM: autocast's when it is on for this device, else the inputs' promoted type."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


@dataclass(frozen=True)
class ChunkPlan:
    """How the chunks run: each head's logit scale and softcap, the chunk size, and the rows kernel (a device's or a
    vocab shard's)."""

    student_map: LogitMap
    chunk_size: int | str
    rows_kernel: object
    fp32_logits: bool = False  # logits kept in float32 where the GEMMs are 16-bit
    teacher_map: LogitMap = LogitMap()  # a dense teacher's (a sparse teacher's log-probs are final)


class LinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts: LossOptions,
                plan: ChunkPlan, teacher, row_weights=None):
        """`teacher`: a TeacherHead (its tensors [..., H_t]), several (TeacherHeads), TeacherLogits ([..., V]),
        SparseTargets ([..., K]), constants every way, or None (CE alone). `row_weights` [N] float32 (one teacher,
        reduction "mean" or "sum"): each row's loss and gradient times its weight."""
        lead_shape = student_hidden.shape[:-1]
        labels = flat_labels(labels)
        if isinstance(teacher, TeacherHead):
            teacher = TeacherHead(teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight, teacher.bias,
                                  gemm_dtype(teacher.hidden, teacher.weight), plan.teacher_map)
        elif isinstance(teacher, TeacherHeads):
            flattened = [TeacherHead(head.hidden.reshape(-1, head.hidden.shape[-1]), head.weight, head.bias,
                                     gemm_dtype(head.hidden, head.weight), head.logit_map)
                         if isinstance(head, TeacherHead) else head for head in teacher.heads]  # (logits as given)
            # Each teacher's own divergence per row, for the components (filled by the chunks).
            per_teacher = (torch.zeros(lead_shape.numel(), len(flattened), device=student_hidden.device)
                           if opts.return_components else None)
            teacher = TeacherHeads(flattened, teacher.log_weights, teacher.combine, teacher.temperature, per_teacher,
                                   teacher.route)
        elif teacher is not None and not isinstance(teacher, TeacherLogits):  # (given logits keep their shape)
            teacher = SparseTargets(teacher.ids.reshape(-1, teacher.ids.shape[-1]),  # (K + 1 log-probs: a given rest)
                                    teacher.logprobs.reshape(-1, teacher.logprobs.shape[-1]))
        heads = Heads(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias, teacher,
                      labels, plan.student_map, gemm_dtype(student_hidden, student_weight), plan.fp32_logits)
        wanted = Wanted(ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                        student_bias is not None and ctx.needs_input_grad[2])
        scale = reduction_scale(labels, heads.rows, opts, num_items_in_batch, student_hidden.device)
        ctx.reduction, ctx.plan = opts.reduction, plan
        ctx.shapes = (student_hidden.shape, student_weight.dtype,
                      student_bias.dtype if student_bias is not None else None)
        # The chunks' casts and GEMMs are ours: autocast must not cast them again.
        with torch.autocast(student_hidden.device.type, enabled=False):
            if opts.reduction == "none" and wanted.any:
                # (Plain row weights are refused per row; weights that weigh the parts themselves are taken.)
                parts, *_ = run_chunks(heads, opts, scale, Wanted(False, False, False), plan.chunk_size,
                                       plan.rows_kernel, row_weights=row_weights)
                ctx.heads, ctx.opts, ctx.wanted, ctx.row_weights = heads, opts, wanted, row_weights
                # Saved too so that autograd refuses a backward after they were modified in place.
                ctx.save_for_backward(student_hidden, student_weight, student_bias)
            else:
                parts, d_hidden, d_weight, d_bias = run_chunks(heads, opts, scale, wanted, plan.chunk_size,
                                                               plan.rows_kernel, row_weights=row_weights)
                d_hidden = plan.rows_kernel.reduce_hidden_grad(d_hidden)
                ctx.save_for_backward(*LinearDistillFunction._as_input_dtypes(ctx, d_hidden, d_weight, d_bias))
        # Weights formed chunk by chunk from the parts (an `of_chunk` object) are a tensor once the chunks ran.
        outputs = reduced_outputs(ctx, parts, lead_shape, labels, opts, scale, getattr(row_weights, "tensor",
                                                                                     row_weights))
        if not isinstance(teacher, TeacherHeads) or not opts.return_components:
            return outputs
        # A backward that runs the chunks again need not find them again.
        per_teacher, teacher.per_teacher = teacher.per_teacher, None
        return with_teacher_summary(ctx, outputs, per_teacher, lead_shape, opts, scale)

    @staticmethod
    def _as_input_dtypes(ctx, d_hidden, d_weight, d_bias):
        hidden_shape, weight_dtype, bias_dtype = ctx.shapes
        if d_hidden is not None:
            d_hidden = d_hidden.view(hidden_shape)
        if d_weight is not None:
            d_weight = d_weight.to(weight_dtype)  # frees the float32 sum for 16-bit heads
        if d_bias is not None:
            d_bias = d_bias.to(bias_dtype)
        return d_hidden, d_weight, d_bias

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        if ctx.reduction == "none":
            plan = ctx.plan
            weights = grad_output.reshape(-1).to(torch.float32)
            if hasattr(ctx.row_weights, "for_upstream"):  # each row's gradient is its weights' times grad_output
                weights = ctx.row_weights.for_upstream(weights)
            ones = torch.ones((), dtype=torch.float32, device=grad_output.device)
            # A ZeRO-3 head, whole in the forward (gathered by the caller), may be partitioned again by now (the
            # teachers' were passed detached: they keep the values they had).
            head = (ctx.heads.student_weight, ctx.heads.student_bias)
            with torch.autocast(grad_output.device.type, enabled=False), gathered(*head):
                _, d_hidden, d_weight, d_bias = run_chunks(ctx.heads, ctx.opts, ones, ctx.wanted, plan.chunk_size,
                                                           plan.rows_kernel, row_weights=weights)
                d_hidden = plan.rows_kernel.reduce_hidden_grad(d_hidden)
            d_hidden, d_weight, d_bias = LinearDistillFunction._as_input_dtypes(ctx, d_hidden, d_weight, d_bias)
        else:
            d_hidden, d_weight, d_bias = saved_gradients(ctx)
            for grad in (d_hidden, d_weight, d_bias):
                rescale_gradient_(grad, grad_output)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None
