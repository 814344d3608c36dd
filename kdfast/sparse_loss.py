"""A teacher that is not in memory: `sparse_distill_loss` against its top-k (or sampled) next-token log-probs, and
its `nn.Module`, `SparseDistillLoss` (docs/DESIGN.md, "A sparse teacher")."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.function import SparseDistillFunction
from kdfast.kernel_abi import SparseTargets
from kdfast.reduction import reduction_scale, returned
from kdfast.shared_vocab import check_vocab_size, refuse_over_shards
from kdfast.sparse_options import SparseOptions
from kdfast.validation import check_labels, check_labels_for, check_logits, check_num_items, check_sparse_targets
from kdfast.views import as_rows_view, flat_labels


def sparse_distill_loss(student_logits, teacher_ids, teacher_logprobs, labels=None, *, divergence="forward_kl",
                        beta=0.5, temperature=1.0, teacher_temperature=None, tail="bucket", kd_weight=1.0,
                        ce_weight=0.0, t2_scale=True, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                        inplace_backward=False, backend="auto", return_components=False, vocab_size=None,
                        label_smoothing=0.0, z_loss_weight=0.0, process_group=None, vocab_range=None):
    """Distillation against a sparse teacher: `teacher_ids` [..., K] (-1 = padding) and `teacher_logprobs` [..., K]
    its log-probabilities there, at the loss's temperature (or at `teacher_temperature`, tail="renormalize").

    With q = softmax(student_logits / T) over the whole vocabulary and p_k = exp(teacher_logprobs_k):
    tail="bucket" (every divergence): the divergence between the teacher's K + 1 buckets (p_1..p_K and the rest
    1 - sum p, at least 1e-7 under reverse KL; none where the ids hold every column) and the student's (q at the K
    ids and its mass outside them); an id listed twice is two buckets of one column (both terms, both gradients);
    tail="renormalize" (forward KL): sum_k P_k (log P_k - log q_k), P = p / sum p, the top-k cross-entropy (with
    log-probs log(count / n) of n samples from the teacher, the unbiased sampled estimator);
    tail="given": as "bucket", with the rest's log-probability given after each row's K (`teacher_logprobs`
    [..., K + 1]), where the teacher can sum it exactly (1 - sum p of float32 log-probs is off by ~1e-7).
    The CE mix, T^2 scaling, ignore_index, reductions, num_items_in_batch, inplace_backward and vocab parallelism
    (the logits' last dimension a rank's shard; teacher ids global), `return_components` and `vocab_size` (ids
    must lie below it) are those of `distill_loss`.
    """
    opts = SparseOptions(divergence=divergence, beta=beta, temperature=temperature,
                         teacher_temperature=teacher_temperature, tail=tail, kd_weight=kd_weight, ce_weight=ce_weight,
                         t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                         inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                         vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return sparse_logits_loss(student_logits, teacher_ids, teacher_logprobs, labels, opts,
                              num_items_in_batch=num_items_in_batch, process_group=process_group,
                              vocab_range=vocab_range)


def sparse_logits_loss(student_logits, teacher_ids, teacher_logprobs, labels, opts: SparseOptions, *,
                       num_items_in_batch=None, process_group=None, vocab_range=None):
    """`sparse_distill_loss` with its settings already in one record."""
    if process_group is not None:
        refuse_over_shards(opts)
        return _vocab_parallel_loss(student_logits, teacher_ids, teacher_logprobs, labels, num_items_in_batch, opts,
                                    process_group, vocab_range)
    if vocab_range is not None:
        raise ValueError("vocab_range needs a process_group (the ranks that hold the other shards)")
    _check(student_logits, teacher_ids, teacher_logprobs, labels, num_items_in_batch, opts)
    check_labels(labels, student_logits, opts)
    return returned(SparseDistillFunction.apply(student_logits, teacher_ids.to(torch.int64), teacher_logprobs.detach(),
                                                labels, num_items_in_batch, opts), opts, labels)


def _check(student_logits, teacher_ids, teacher_logprobs, labels, num_items_in_batch, opts, vocab=None):
    check_logits("student_logits", student_logits)
    if opts.vocab_size is not None:
        check_vocab_size(opts.vocab_size, student_logits=student_logits.shape[-1])
    check_sparse_targets(teacher_ids, teacher_logprobs, tuple(student_logits.shape[:-1]),
                         vocab or opts.vocab_size or student_logits.shape[-1], student_logits.device, opts,
                         "the student logits", labels)
    check_num_items(num_items_in_batch)


# Collectives and a host-side agreement check: inside a torch.compile'd model this runs as is, untraced.
@torch.compiler.disable
def _vocab_parallel_loss(student_logits, teacher_ids, teacher_logprobs, labels, num_items_in_batch, opts,
                         process_group, vocab_range):
    from kdfast.distributed import check_then_agree
    from kdfast.vocab_parallel import ShardedDistillFunction

    def check():
        # Ids and labels are global token ids: their range is checked against the global vocabulary below.
        _check(student_logits, teacher_ids, teacher_logprobs, labels, num_items_in_batch, opts, vocab=2**62)
        check_labels_for(labels, tuple(student_logits.shape[:-1]), 2**62, student_logits.device, opts, "the logits")

    shard = check_then_agree(check, lambda: student_logits.shape[-1], student_logits, process_group, vocab_range,
                             labels, opts)
    ids = teacher_ids.to(torch.int64)
    if opts.has_kd and ids.numel() and int(ids.max()) >= shard.vocab:  # a sync, as the agreement check already is
        raise ValueError(f"teacher_ids must lie in [0, {shard.vocab}) (global token ids) or be -1; found "
                         f"{int(ids.max())}")
    rows, device = student_logits.numel() // student_logits.shape[-1], student_logits.device
    scale = reduction_scale(flat_labels(labels), rows, opts, num_items_in_batch, device)
    targets = SparseTargets(as_rows_view(ids)[0], as_rows_view(teacher_logprobs.detach())[0])
    return returned(ShardedDistillFunction.apply(student_logits, targets, labels, scale, opts, shard,
                                                 device_rows(opts, device)), opts, labels)


class SparseDistillLoss(torch.nn.Module):
    """`sparse_distill_loss` with its settings fixed at construction: every setting keyword of `sparse_distill_loss`,
    and `process_group` / `vocab_range`."""

    def __init__(self, *, process_group=None, vocab_range=None, **settings):
        super().__init__()
        self.options = SparseOptions.build("SparseDistillLoss", **settings)
        self.process_group, self.vocab_range = process_group, vocab_range

    def forward(self, student_logits, teacher_ids, teacher_logprobs, labels=None, num_items_in_batch=None):
        return sparse_logits_loss(student_logits, teacher_ids, teacher_logprobs, labels, self.options,
                                  num_items_in_batch=num_items_in_batch, process_group=self.process_group,
                                  vocab_range=self.vocab_range)

    def extra_repr(self) -> str:
        o = self.options
        return (f"divergence={o.divergence!r}, tail={o.tail!r}, temperature={o.temperature}, "
                f"kd_weight={o.kd_weight}, ce_weight={o.ce_weight}, reduction={o.reduction!r}")
