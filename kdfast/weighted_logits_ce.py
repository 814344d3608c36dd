"""The cross-entropy of logits with per-class weights (`cross_entropy(class_weights=)`, kdfast.class_weights) and / or a
token scaling (`token_scaling=`, kdfast.token_scaling): the plain CE kernel over every row in one call, then its
parts and gradient weighed in place. Weighing a chunk of rows at a time, while it is in the cache, was slower here,
its per-chunk calls costing more than the passes they saved (2048 x 32000 fp32 in place, two threads of an AMD EPYC,
interleaved medians: 59 ms in one call against 66-70 in chunks of 49-196 rows, 45 unweighted; with label smoothing 95
against 110-131, 48 unweighted)."""

from __future__ import annotations

import torch

from kdfast import ops
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale
from kdfast.saved_gradient import saved_gradient_times
from kdfast.token_scaling import weighed_rows
from kdfast.views import as_rows_view, flat_labels


class WeighedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, num_items_in_batch, opts: LossOptions, class_weights, token_scaling):
        lead_shape = logits.shape[:-1]
        batched, copied = as_rows_view(logits)  # [batch, rows, V]
        flat = flat_labels(labels)
        batch, rows, _ = batched.shape
        blocks = [slice(b * rows, (b + 1) * rows) for b in range(batch)]
        weighted = weighed_rows(class_weights, token_scaling, flat, opts, num_items_in_batch,
                                opts.vocab_size or logits.shape[-1])
        scale = reduction_scale(flat, batch * rows, opts, weighted.denominator, batched.device)
        for b, block in enumerate(blocks):  # before an in-place kernel overwrites the logits
            weighted.observe(block, batched[b])
        # The CE reads no teacher (kd_weight is 0): the logits stand in for it, as kdfast.cross_entropy does.
        settings, want_grad = weighted.kernel_options.encoded(), ctx.needs_input_grad[0]
        if want_grad and opts.inplace_backward:
            parts, grad = ops.distill_forward_inplace(batched, batched, flat, scale, settings), batched
        else:
            parts, grad = ops.distill_forward(batched, batched, flat, scale, want_grad, settings)
        factors = weighted.of_chunk(slice(None), parts)
        if want_grad:
            for b, block in enumerate(blocks):
                grad[b].mul_(factors[block, None])
                weighted.add_to_gradient_(block, grad[b], scale)
            ctx.save_for_backward(grad.view(logits.shape) if copied or not opts.inplace_backward else logits.detach())
        ctx.reduction = opts.reduction
        return reduced_outputs(ctx, parts, lead_shape, flat, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None
