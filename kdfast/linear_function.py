"""The autograd Function of the fused linear loss.

"mean" and "sum": the gradients are final in the forward pass (up to grad_output), computed chunk by chunk
while the chunk's logits exist; backward only rescales them. "none": each row's gradient depends on its
own grad_output, so forward computes the loss alone and backward runs the chunks again with those weights.
Nothing is computed for gradients when no student input requires one.
"""

from __future__ import annotations

import torch

from kdfast.distributed import all_reduce_sum
from kdfast.function import reduced, reduction_scale, rescale_gradient_
from kdfast.linear_chunks import Heads, Wanted, run_chunks
from kdfast.options import LossOptions
from kdfast.vocab_parallel import ShardKernel


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of a head's GEMM: autocast's when it is on for this device, else the inputs' promoted type."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class LinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, num_items_in_batch, opts: LossOptions, softcap, chunk_size, shard=None):
        lead_shape = student_hidden.shape[:-1]
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
        heads = Heads(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
                      teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias,
                      flat_labels, softcap, gemm_dtype(student_hidden, student_weight),
                      gemm_dtype(teacher_hidden, teacher_weight))
        wanted = Wanted(ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                        student_bias is not None and ctx.needs_input_grad[2])
        scale = reduction_scale(flat_labels, heads.rows, opts, num_items_in_batch, student_hidden.device)
        ctx.reduction, ctx.shard = opts.reduction, shard
        kernel = ShardKernel(shard) if shard is not None else None
        ctx.shapes = (student_hidden.shape, student_weight.dtype,
                      student_bias.dtype if student_bias is not None else None)
        # The chunks' casts and GEMMs are ours: autocast must not cast them again.
        with torch.autocast(student_hidden.device.type, enabled=False):
            if opts.reduction == "none" and wanted.any:
                loss_rows, *_ = run_chunks(heads, opts, scale, Wanted(False, False, False), chunk_size,
                                           kernel=kernel)
                ctx.heads, ctx.opts, ctx.wanted, ctx.chunk_size = heads, opts, wanted, chunk_size
                # Saved too so that autograd refuses a backward after they were modified in place.
                ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden,
                                      teacher_weight, teacher_bias)
            else:
                loss_rows, d_hidden, d_weight, d_bias = run_chunks(heads, opts, scale, wanted, chunk_size,
                                                                   kernel=kernel)
                d_hidden = _summed_over_shards(d_hidden, shard)
                ctx.save_for_backward(*LinearDistillFunction._as_input_dtypes(ctx, d_hidden, d_weight, d_bias))
        return reduced(loss_rows, lead_shape, opts.reduction, scale)

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
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            heads = ctx.heads
            weights = grad_output.reshape(-1).to(torch.float32)
            ones = torch.ones((), dtype=torch.float32, device=weights.device)
            with torch.autocast(weights.device.type, enabled=False):
                kernel = ShardKernel(ctx.shard) if ctx.shard is not None else None
                _, d_hidden, d_weight, d_bias = run_chunks(heads, ctx.opts, ones, ctx.wanted, ctx.chunk_size,
                                                           row_weights=weights, kernel=kernel)
                d_hidden = _summed_over_shards(d_hidden, ctx.shard)
            d_hidden, d_weight, d_bias = LinearDistillFunction._as_input_dtypes(ctx, d_hidden, d_weight, d_bias)
        else:
            d_hidden, d_weight, d_bias = ctx.saved_tensors
            for grad in (d_hidden, d_weight, d_bias):
                rescale_gradient_(grad, grad_output)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None, None, None


def _summed_over_shards(d_hidden, shard):
    """Each rank's d hidden covers its vocab shard only; the full gradient is their sum, unless the caller's own
    tensor-parallel layer does that reduction (reduce_hidden_grad=False)."""
    if d_hidden is None or shard is None or not shard.reduce_hidden_grad:
        return d_hidden
    return all_reduce_sum(d_hidden, shard.group)
