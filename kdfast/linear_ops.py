"""The fused linear loss of one teacher (a dense head, its given logits, or a sparse teacher's ids and log-probs) as a
torch.library custom op, so that a torch.compile'd step traces through it whole (`fullgraph=True` included) instead of
breaking its graph there.

`kdfast::linear_distill_forward` runs the same chunk loop as the eager Function (`linear_function.py`): the rows'
loss parts and the gradients, final in the forward up to grad_output. The backend is resolved inside the op, so the
compiler never traces the build or the availability checks; the settings record travels as its text, the teacher as
its tensors, the heads' logit maps and GEMM dtypes as plain arguments (an op's schema takes no dataclass).
`CompiledLinearDistillFunction` reduces the parts and rescales the saved gradients in backward, as
`LinearDistillFunction` does; for per-row losses (reduction "none") the forward takes the losses alone and the
backward runs the op again with each row's grad_output as its weight. Eager calls keep `LinearDistillFunction`
itself; several teachers are `kdfast.linear_multi_ops`'; vocab shards stay host-driven: one graph break."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.kernel_abi import PART_COLUMNS, SparseTargets
from kdfast.linear_chunks import Heads, TeacherHead, TeacherLogits, Wanted, run_chunks
from kdfast.linear_function import gemm_dtype
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale, returned
from kdfast.saved_gradient import rescale_gradient_, saved_gradients
from kdfast.sparse_options import SparseOptions
from kdfast.views import flat_labels


def runs_as_op(process_group, vocab_range) -> bool:
    """Whether torch.compile is tracing a call the op takes: one device's vocabulary."""
    if not torch.compiler.is_compiling() or process_group is not None:
        return False
    if vocab_range is not None:
        raise ValueError("vocab_range needs a process_group (the ranks that hold the other shards)")
    return True


def _map(scale: float, softcap: float) -> LogitMap:
    return LogitMap(scale, softcap if softcap > 0 else None)  # a softcap is > 0: 0 stands for none


# Scalars and tensors only in the schema (no lists): torch 2.4's schema inference takes no builtin `list[...]`.
@torch.library.custom_op("kdfast::linear_distill_forward", mutates_args=())
def linear_distill_forward(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           student_bias: torch.Tensor | None, teacher_a: torch.Tensor | None,
                           teacher_b: torch.Tensor | None,
                           teacher_bias: torch.Tensor | None, labels: torch.Tensor | None, grad_scale: torch.Tensor,
                           row_weights: torch.Tensor | None, want_hidden: bool, want_weight: bool, want_bias: bool,
                           student_scale: float, student_softcap: float, teacher_scale: float, teacher_softcap: float,
                           student_dtype: torch.dtype, teacher_dtype: torch.dtype, chunk_size: int,
                           fp32_logits: bool, settings: str,
                           teacher_kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's hidden states [N, H] and head [V, H]; the teacher (`teacher_kind`): "head", its hidden states
    [N, H_t] and head [V, H_t] (`teacher_a`, `teacher_b`) and bias; "sparse", its ids [N, K] and log-probs [N, K or
    K + 1]; "logits", its logits [..., V_t] with N rows (`teacher_a`, as given); or None (CE alone). The rows' loss
    parts [N, PART_COLUMNS] float32 and d hidden, d weight, d bias in their inputs' dtypes (an empty tensor where not
    wanted), each row's gradient times `row_weights` [N] when given (a per-row loss's backward). Softcaps of 0: none;
    the dtypes: each head's GEMM's; `chunk_size` 0: "auto"."""
    opts = (SparseOptions if teacher_kind == "sparse" else LossOptions).decode(settings)
    targets = (None if teacher_a is None else SparseTargets(teacher_a, teacher_b) if teacher_kind == "sparse" else
               TeacherLogits(teacher_a) if teacher_kind == "logits" else
               TeacherHead(teacher_a, teacher_b, teacher_bias, teacher_dtype, _map(teacher_scale, teacher_softcap)))
    heads = Heads(student_hidden, student_weight, student_bias, targets, labels, _map(student_scale, student_softcap),
                  student_dtype, fp32_logits)
    rows_kernel = device_rows(opts, student_hidden.device)
    with torch.autocast(student_hidden.device.type, enabled=False), torch.no_grad():
        parts, d_hidden, d_weight, d_bias = run_chunks(heads, opts, grad_scale,
                                                       Wanted(want_hidden, want_weight, want_bias),
                                                       chunk_size or "auto", rows_kernel, row_weights=row_weights)
    # A fresh empty tensor per missing gradient: an op's outputs may not alias each other.
    return (parts, d_hidden if d_hidden is not None else student_hidden.new_empty(0),
            d_weight.to(student_weight.dtype) if d_weight is not None else student_hidden.new_empty(0),
            d_bias.to(student_bias.dtype) if d_bias is not None else student_hidden.new_empty(0))


@linear_distill_forward.register_fake
def _(student_hidden, student_weight, student_bias, teacher_a, teacher_b, teacher_bias, labels, grad_scale,
      row_weights, want_hidden, want_weight, want_bias, *settings):
    def like(tensor, want):
        return torch.empty_like(tensor) if want else student_hidden.new_empty(0)

    return (student_hidden.new_empty(student_hidden.shape[0], PART_COLUMNS, dtype=torch.float32),
            like(student_hidden, want_hidden), like(student_weight, want_weight),
            like(student_bias, want_bias) if student_bias is not None else student_hidden.new_empty(0))


def compiled_linear_loss(student_hidden, student_weight, student_bias, teacher, labels, num_items_in_batch,
                         opts: LossOptions, student_map: LogitMap, chunk_size, fp32_logits: bool, row_weights=None):
    """The loss through the op, as `apply_linear` returns it: `teacher` a TeacherHead (its GEMM dtype and logit map;
    its tensors constants), TeacherLogits or SparseTargets, each [..., ·] with the hidden states' leading shape, or
    None (CE alone); `row_weights` [N] float32 or None."""
    # The teacher's tensors as rows ([N, K] ids and log-probs, [N, V] logits or [N, H_t] hidden states) and its head
    # as it is; the kinds without a GEMM have no map or GEMM dtype of their own.
    kind, teacher_map, teacher_dtype = "head", LogitMap(), student_hidden.dtype
    if teacher is None:
        tensors = (None, None, None)
    elif isinstance(teacher, SparseTargets):
        ids, logprobs = teacher.ids.to(torch.int64), teacher.logprobs.detach()
        tensors, kind = (ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, logprobs.shape[-1]), None), "sparse"
    elif isinstance(teacher, TeacherLogits):  # as given: a reshape would copy a view such as logits[:, :-1] whole
        tensors, kind = (teacher.logits.detach(), None, None), "logits"
    else:
        tensors = (teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1]), teacher.weight.detach(),
                   teacher.bias.detach() if teacher.bias is not None else None)
        teacher_map, teacher_dtype = teacher.logit_map, teacher.dtype
    maps = (student_map.scale, student_map.softcap or 0.0, teacher_map.scale, teacher_map.softcap or 0.0)
    outputs = CompiledLinearDistillFunction.apply(
        student_hidden, student_weight, student_bias, tensors, labels, num_items_in_batch, opts, maps,
        (gemm_dtype(student_hidden, student_weight), teacher_dtype), chunk_size, fp32_logits, kind, row_weights)
    return returned(outputs, opts, labels)


def op_forward_inputs(ctx, student_hidden, student_bias, labels, num_items_in_batch, opts: LossOptions):
    """What a compiled Function's forward starts from: the hidden states' leading shape, the rows [N, H], the flat
    labels and the reduction's scale; on `ctx` the wanted gradients and whether the loss is per row (reduction
    "none": each row's gradient waits for its grad_output, so the forward takes the losses alone and the backward
    runs the chunks again, the op again with the rows' weights)."""
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = flat_labels(labels)
    ctx.wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                  student_bias is not None and ctx.needs_input_grad[2])
    ctx.per_row, ctx.hidden_shape = opts.reduction == "none", student_hidden.shape
    return student_hidden.shape[:-1], hidden, labels, reduction_scale(labels, hidden.shape[0], opts,
                                                                      num_items_in_batch, hidden.device)


def keep_for_backward(ctx, hidden, student_weight, student_bias, d_hidden, d_weight, d_bias, *per_row_tensors):
    """Per row the op's inputs (the student's, then `per_row_tensors`), else the final gradients."""
    if ctx.per_row:
        ctx.save_for_backward(hidden, student_weight, student_bias, *per_row_tensors)
    else:
        ctx.save_for_backward(d_hidden.view(ctx.hidden_shape) if ctx.wanted[0] else d_hidden, d_weight, d_bias)


def student_gradients(ctx, grad_output, rerun) -> list:
    """The backward's d hidden, d weight and d bias (None where not wanted): per row, `rerun(saved tensors, ones,
    row weights)` runs the op again and returns its gradients; else the forward's, times grad_output."""
    if ctx.per_row:
        saved = ctx.saved_tensors
        ones = torch.ones((), dtype=torch.float32, device=saved[0].device)
        grads = list(rerun(saved, ones, grad_output.reshape(-1).float()))
        grads[0] = grads[0].view(ctx.hidden_shape) if ctx.wanted[0] else grads[0]
    else:
        grads = list(saved_gradients(ctx))
        for grad, want in zip(grads, ctx.wanted):
            if want:
                rescale_gradient_(grad, grad_output)
    return [grad if want else None for grad, want in zip(grads, ctx.wanted)]


class CompiledLinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher: tuple, labels, num_items_in_batch,
                opts: LossOptions, maps: tuple, gemm_dtypes: tuple, chunk_size, fp32_logits: bool, teacher_kind: str,
                row_weights=None):
        lead_shape, hidden, labels, scale = op_forward_inputs(ctx, student_hidden, student_bias, labels,
                                                              num_items_in_batch, opts)
        ctx.settings = (*maps, *gemm_dtypes, 0 if chunk_size == "auto" else int(chunk_size), fp32_logits,
                        opts.encoded(), teacher_kind)
        parts, *grads = linear_distill_forward(hidden, student_weight, student_bias, *teacher, labels, scale,
                                               row_weights,
                                               *((False, False, False) if ctx.per_row else ctx.wanted), *ctx.settings)
        keep_for_backward(ctx, hidden, student_weight, student_bias, *grads, *teacher, labels)
        return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale, row_weights)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        def rerun(saved, ones, row_weights):
            return linear_distill_forward(*saved, ones, row_weights, *ctx.wanted, *ctx.settings)[1:]

        return (*student_gradients(ctx, grad_output, rerun), None, None, None, None, None, None, None, None, None,
                None)
