"""The public API: `distill_loss` and its `nn.Module`, `DistillLoss`. Both build the settings record and call
`logits_loss`, as the integrations do."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.function import DistillFunction
from kdfast.options import LossOptions
from kdfast.reduction import reduction_scale, returned
from kdfast.shared_vocab import refuse_over_shards
from kdfast.validation import check_labels, check_labels_for, check_num_items, check_pair
from kdfast.views import flat_labels


def distill_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl", beta=0.5,
                 temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scale=True, ignore_index=-100,
                 reduction="mean", num_items_in_batch=None, inplace_backward=False, backend="auto",
                 return_components=False, vocab_size=None, label_smoothing=0.0, z_loss_weight=0.0,
                 process_group=None, vocab_range=None):
    """Fused distillation loss over [..., vocab] logits (docs/DESIGN.md, "The loss").

    total = kd_weight * (T^2 if t2_scale else 1) * divergence(teacher || student at T)
            + ce_weight * cross_entropy(student at T=1, labels)
    Rows whose label is `ignore_index` contribute nothing. reduction "mean" divides by the kept rows (or by
    `num_items_in_batch`), "sum" sums, "none" returns per-row values shaped like the labels.
    The gradient is computed in the forward pass; `inplace_backward=True` writes it over the student
    logits' storage (no [tokens, vocab] allocation), so nothing else may need those logits afterwards.

    Vocab parallel: with a `process_group`, the logits' last dimension is this rank's shard `vocab_range`
    = [start, stop) of the global vocabulary (default: equal contiguous shards in rank order); labels are global
    token ids. Every rank returns the same loss and gets its shard's slice of the gradient; ranks exchange
    O(rows) statistics (kdfast.vocab_parallel).

    `vocab_size`: the vocabulary both models share when their logits are padded to different widths (a Qwen
    teacher's 152064 columns, its student's 151936): columns at and past it are left out of both softmaxes (views,
    no copy) and get a zero gradient; a model narrower than it is an error.

    `return_components=True` returns `(loss, kdfast.LossComponents)`: the divergence and the CE, each reduced as the
    loss is and before its weight, the student's token accuracy, and the student's entropy at T (reduced as the
    loss), from the same pass (for logging).
    """
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                       vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return logits_loss(student_logits, teacher_logits, labels, opts, num_items_in_batch=num_items_in_batch,
                       process_group=process_group, vocab_range=vocab_range)


def logits_loss(student_logits, teacher_logits, labels, opts: LossOptions, *, num_items_in_batch=None,
                process_group=None, vocab_range=None):
    """`distill_loss` with its settings already in one record."""
    if process_group is not None:
        refuse_over_shards(opts)
        return _vocab_parallel_loss(student_logits, teacher_logits, labels, num_items_in_batch, opts,
                                    process_group, vocab_range)
    if vocab_range is not None:
        raise ValueError("vocab_range needs a process_group (the ranks that hold the other shards)")
    check_pair(student_logits, teacher_logits, opts)
    check_labels(labels, student_logits, opts)
    check_num_items(num_items_in_batch)
    return returned(DistillFunction.apply(student_logits, teacher_logits.detach(), labels, num_items_in_batch, opts),
                    opts, labels)


# Collectives and a host-side agreement check: inside a torch.compile'd model this runs as is, untraced.
@torch.compiler.disable
def _vocab_parallel_loss(student_logits, teacher_logits, labels, num_items_in_batch, opts, process_group,
                         vocab_range):
    from kdfast.distributed import check_then_agree
    from kdfast.vocab_parallel import ShardedDistillFunction

    def check():
        check_pair(student_logits, teacher_logits, opts)
        # The range of global token ids is checked in the exchange, against the global vocabulary.
        check_labels_for(labels, tuple(student_logits.shape[:-1]), 2**62, student_logits.device, opts, "the logits")
        check_num_items(num_items_in_batch)

    shard = check_then_agree(check, lambda: student_logits.shape[-1], student_logits, process_group, vocab_range,
                             labels, opts)
    rows, device = student_logits.numel() // student_logits.shape[-1], student_logits.device
    scale = reduction_scale(flat_labels(labels), rows, opts, num_items_in_batch, device)
    return returned(ShardedDistillFunction.apply(student_logits, teacher_logits.detach(), labels, scale, opts, shard,
                                                 device_rows(opts, device)), opts, labels)


class DistillLoss(torch.nn.Module):
    """`distill_loss` with its settings fixed at construction: `DistillLoss(temperature=2.0, ce_weight=0.5, ...)`
    takes every setting keyword of `distill_loss`, and `process_group` / `vocab_range`."""

    def __init__(self, *, process_group=None, vocab_range=None, **settings):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions.build("DistillLoss", **settings)
        self.process_group, self.vocab_range = process_group, vocab_range

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        return logits_loss(student_logits, teacher_logits, labels, self.options, num_items_in_batch=num_items_in_batch,
                           process_group=self.process_group, vocab_range=self.vocab_range)

    def extra_repr(self) -> str:
        o = self.options
        return (f"divergence={o.divergence!r}, beta={o.beta}, temperature={o.temperature}, "
                f"kd_weight={o.kd_weight}, ce_weight={o.ce_weight}, reduction={o.reduction!r}")
