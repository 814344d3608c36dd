"""A sparse teacher in the fused linear form: `linear_sparse_distill_loss` takes the student's last hidden states and
LM head and the teacher's top-k (or sampled) ids and log-probs, and its `nn.Module`, `LinearSparseDistillLoss`. No
teacher GEMM runs at all, and no student logits exist beyond one chunk."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.kernel_abi import SparseTargets
from kdfast.linear_function import ChunkPlan
from kdfast.linear_loss import apply_linear
from kdfast.linear_ops import compiled_linear_loss, runs_as_op
from kdfast.logit_maps import logit_maps
from kdfast.shared_vocab import heads_cut_to_vocab
from kdfast.sparse_options import SparseOptions
from kdfast.validation import (
    check_chunk_settings,
    check_labels_for,
    check_linear_student,
    check_num_items,
    check_row_weights,
    check_sparse_targets,
    flat_row_weights,
)


def linear_sparse_distill_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, *,
                               student_bias=None, softcap=None, logit_scale=1.0, chunk_size="auto",
                               fp32_logits=False, divergence="forward_kl", beta=0.5,
                               temperature=1.0, teacher_temperature=None, tail="bucket", kd_weight=1.0,
                               ce_weight=0.0, t2_scale=True, ignore_index=-100, reduction="mean",
                               num_items_in_batch=None, inplace_backward=False, backend="auto",
                               return_components=False, vocab_size=None, label_smoothing=0.0, z_loss_weight=0.0,
                               process_group=None, vocab_range=None, reduce_hidden_grad=True, row_weights=None):
    """`sparse_distill_loss(student_hidden @ student_weight.T + student_bias, teacher_ids, teacher_logprobs, labels,
    ...)`, computed `chunk_size` tokens at a time. `teacher_ids` / `teacher_logprobs` are [..., K] with the hidden
    states' leading shape. `logit_scale` then `softcap` apply to the student's logits after the bias and before the
    temperature (the teacher's log-probs are final);
    `fp32_logits` as for `linear_distill_loss`. Gradients
    flow to student_hidden, student_weight and student_bias. Vocab parallel as for `linear_distill_loss` (the
    student head's rows a rank's shard; teacher ids global). `row_weights` as for `linear_distill_loss`."""
    opts = SparseOptions(divergence=divergence, beta=beta, temperature=temperature,
                         teacher_temperature=teacher_temperature, tail=tail, kd_weight=kd_weight, ce_weight=ce_weight,
                         t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                         inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                         vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return fused_linear_sparse_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, opts,
                                    student_bias=student_bias, softcap=softcap, logit_scale=logit_scale,
                                    chunk_size=chunk_size,
                                    fp32_logits=fp32_logits, num_items_in_batch=num_items_in_batch,
                                    process_group=process_group,
                                    vocab_range=vocab_range, reduce_hidden_grad=reduce_hidden_grad,
                                    row_weights=row_weights)


def fused_linear_sparse_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                             opts: SparseOptions, *, student_bias=None, softcap=None, logit_scale=1.0,
                             chunk_size="auto", fp32_logits=False, num_items_in_batch=None, process_group=None,
                             vocab_range=None, reduce_hidden_grad=True, row_weights=None):
    """`linear_sparse_distill_loss` with its loss settings already in one record."""
    student_map = logit_maps(softcap, student_logit_scale=logit_scale)[0]
    student_weight, student_bias, _, _ = heads_cut_to_vocab(opts, process_group, student_weight, student_bias)

    def check(vocab):
        check_linear_student(student_hidden, student_weight, student_bias, softcap, chunk_size, fp32_logits)
        lead_shape = tuple(student_hidden.shape[:-1])
        check_sparse_targets(teacher_ids, teacher_logprobs, lead_shape, vocab, student_hidden.device, opts,
                             "the hidden states", labels)
        check_labels_for(labels, lead_shape, vocab, student_hidden.device, opts, "the hidden states")
        check_num_items(num_items_in_batch)
        check_row_weights(row_weights, lead_shape, student_hidden.device, opts)

    if runs_as_op(process_group, vocab_range):  # traced by torch.compile: the chunk loop as one custom op
        check(student_weight.shape[0] if isinstance(student_weight, torch.Tensor) else 0)
        return compiled_linear_loss(student_hidden, student_weight, student_bias,
                                    SparseTargets(teacher_ids, teacher_logprobs), labels, num_items_in_batch, opts,
                                    student_map, chunk_size, fp32_logits, flat_row_weights(row_weights))
    if process_group is not None:
        from kdfast.distributed import check_then_agree
        from kdfast.vocab_parallel import ShardedRows

        # Ids and labels are global token ids: checked in the exchange, and below, against the global vocabulary.
        shard = check_then_agree(lambda: check(2**62), lambda: student_weight.shape[0], student_hidden, process_group,
                                 vocab_range, labels, opts, reduce_hidden_grad)
        if opts.has_kd and teacher_ids.numel() and int(teacher_ids.max()) >= shard.vocab:
            raise ValueError(f"teacher_ids must lie in [0, {shard.vocab}) (global token ids) or be -1; found "
                             f"{int(teacher_ids.max())}")
        rows_kernel = ShardedRows(device_rows(opts, student_hidden.device), shard)
    else:
        if vocab_range is not None:
            raise ValueError("vocab_range needs a process_group (the ranks that hold the other shards)")
        check(student_weight.shape[0] if isinstance(student_weight, torch.Tensor) else 0)
        rows_kernel = device_rows(opts, student_hidden.device)
    teacher = SparseTargets(teacher_ids.to(torch.int64), teacher_logprobs.detach())
    return apply_linear(student_hidden, student_weight, student_bias, labels, num_items_in_batch, opts,
                        ChunkPlan(student_map, chunk_size, rows_kernel, fp32_logits), teacher,
                        flat_row_weights(row_weights))


class LinearSparseDistillLoss(torch.nn.Module):
    """`linear_sparse_distill_loss` with its settings fixed at construction: `softcap`, `logit_scale`, `chunk_size`,
    `fp32_logits`,
    `process_group`, `vocab_range`, `reduce_hidden_grad` and every loss setting of `sparse_distill_loss`."""

    def __init__(self, *, softcap=None, logit_scale=1.0, chunk_size="auto", fp32_logits=False, process_group=None,
                 vocab_range=None, reduce_hidden_grad=True, **settings):
        super().__init__()
        self.options = SparseOptions.build("LinearSparseDistillLoss", **settings)
        check_chunk_settings(softcap, chunk_size, fp32_logits)
        logit_maps(softcap, student_logit_scale=logit_scale)
        self.softcap, self.logit_scale = softcap, logit_scale
        self.chunk_size, self.fp32_logits = chunk_size, fp32_logits
        self.process_group, self.vocab_range, self.reduce_hidden_grad = process_group, vocab_range, reduce_hidden_grad

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, student_bias=None,
                num_items_in_batch=None, row_weights=None):
        return fused_linear_sparse_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                                        self.options, student_bias=student_bias, softcap=self.softcap,
                                        logit_scale=self.logit_scale,
                                        chunk_size=self.chunk_size, fp32_logits=self.fp32_logits,
                                        num_items_in_batch=num_items_in_batch,
                                        process_group=self.process_group, vocab_range=self.vocab_range,
                                        reduce_hidden_grad=self.reduce_hidden_grad, row_weights=row_weights)

    def extra_repr(self) -> str:
        o = self.options
        return (f"divergence={o.divergence!r}, tail={o.tail!r}, temperature={o.temperature}, "
                f"kd_weight={o.kd_weight}, ce_weight={o.ce_weight}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size!r}, fp32_logits={self.fp32_logits}")
