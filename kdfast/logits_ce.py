"""The cross-entropy alone on [..., V] logits: `F.cross_entropy` as Liger-Kernel's and flash-attn's
`CrossEntropyLoss` compute it, on the distillation loss's own kernels with no teacher (the kernels read no teacher
row when the loss has no divergence): one pass over the logits, the gradient written in the forward, over the
logits' own storage with `inplace_backward=True`."""

from __future__ import annotations

import torch

from kdfast.class_weights import check_class_weights
from kdfast.logit_maps import tempered_map
from kdfast.loss import logits_loss
from kdfast.mapped_logits_ce import MappedCrossEntropyFunction
from kdfast.options import LossOptions
from kdfast.reduction import returned
from kdfast.shared_vocab import check_vocab_size
from kdfast.token_scaling import check_token_scaling
from kdfast.validation import check_labels, check_logits, check_num_items
from kdfast.weighted_logits_ce import WeighedCrossEntropyFunction

# The settings a cross-entropy takes; the rest of LossOptions (divergence, temperature, kd_weight, ...) are the
# teacher's and are refused by name.
CE_SETTINGS = ("ignore_index", "reduction", "label_smoothing", "z_loss_weight", "inplace_backward", "backend",
               "return_components", "vocab_size", "softcap", "logit_scale")


def cross_entropy(logits, labels, *, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                  label_smoothing=0.0, z_loss_weight=0.0, inplace_backward=False, backend="auto",
                  return_components=False, vocab_size=None, softcap=None, logit_scale=1.0, class_weights=None,
                  token_scaling=None, process_group=None, vocab_range=None):
    """`F.cross_entropy(logits, labels, ignore_index=, label_smoothing=)` for logits [..., V] and labels [...], plus
    `z_loss_weight` times log-sum-exp² (PaLM's z-loss, flash-attn's `lse_square_scale`), float32 statistics whatever
    the logits' dtype. `reduction` "mean" (over the kept labels, or `num_items_in_batch`), "sum" or "none" (per row,
    0 where ignored). `inplace_backward=True` writes the gradient over the logits' storage: no [N, V] allocation,
    and nothing else may read those logits afterwards. `return_components=True` returns `(loss,
    kdfast.LossComponents)`: the CE and the z-loss before their weights, the token accuracy and the entropy of
    softmax(logits), from the same pass. `vocab_size`, `process_group` / `vocab_range` (each rank its shard of the
    columns, labels global ids) as `distill_loss` takes them.

    `logit_scale` and `softcap`: the CE of softcap * tanh(logit_scale * logits / softcap) (Gemma-2's
    final_logit_softcapping; Liger-Kernel's `softcap`) or of logit_scale * logits, mapped a chunk of rows at a time
    in float32 (kdfast.mapped_logits_ce): no [N, V] tensor beyond the gradient's (none with `inplace_backward`), and
    the gradient is with respect to the logits before the map. Not over vocab shards.

    `class_weights` [V] (`F.cross_entropy`'s `weight`, Liger-Kernel's `weight`): each kept row's CE times its label's
    weight, label smoothing's uniform target weighted by them, "mean" dividing by the kept rows' label weights (or by
    `num_items_in_batch`), any sign, all as PyTorch computes them; the z-loss, the entropy and the accuracy stay
    unweighted (means over the kept rows, Liger-Kernel's z-loss). Weighed after the kernel in place
    (kdfast.class_weights): no [N, V] tensor added; with label smoothing one more read of the logits. Not over vocab
    shards.

    `token_scaling="dft"` (Dynamic Fine-Tuning: TRL's SFT `loss_type="dft"`, Liger-Kernel's `use_token_scaling`):
    each kept row's loss (the z-loss included) and gradient times its label's probability under softmax of the
    (mapped) logits, detached; "mean" still over the kept rows; read from the kernel's own CE. `token_scaling="eaft"`
    or `kdfast.EAFT(alpha=1.0, top_k=20)` (Entropy-Adaptive Fine-Tuning, LlamaFactory's and Liger-Kernel's): times
    (the entropy of the row's top-k softmax / 3)^alpha instead (kdfast.token_scaling). Not over vocab shards."""
    logit_map = tempered_map(logit_scale, softcap)
    opts = _options(logits, labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                    z_loss_weight=z_loss_weight, inplace_backward=inplace_backward, backend=backend,
                    return_components=return_components, vocab_size=vocab_size)
    check_token_scaling(token_scaling)
    weighed = class_weights is not None or token_scaling is not None
    if weighed and (process_group is not None or vocab_range is not None):
        raise ValueError("class_weights and token_scaling are not supported over vocab shards (process_group / "
                         "vocab_range)")
    check_class_weights(class_weights, opts.vocab_size or logits.shape[-1], logits.device)
    if logit_map.softcap is not None or logit_map.scale != 1.0:
        if process_group is not None or vocab_range is not None:
            raise ValueError("softcap and logit_scale are not supported over vocab shards (process_group / "
                             "vocab_range): map each shard's logits before the call, or leave them out")
        check_labels(labels, logits, opts)
        check_num_items(num_items_in_batch)
        return returned(MappedCrossEntropyFunction.apply(logits, labels, num_items_in_batch, opts, logit_map,
                                                         class_weights, token_scaling), opts, labels)
    if weighed:
        check_labels(labels, logits, opts)
        check_num_items(num_items_in_batch)
        return returned(WeighedCrossEntropyFunction.apply(logits, labels, num_items_in_batch, opts, class_weights,
                                                          token_scaling), opts, labels)
    return logits_loss(logits, logits.detach(), labels, opts, num_items_in_batch=num_items_in_batch,
                       process_group=process_group, vocab_range=vocab_range)


def _options(logits, labels, **settings) -> LossOptions:
    # Checked in this function's names first: the shared checks below would speak of a student and a teacher.
    check_logits("logits", logits)
    if labels is None:
        raise ValueError(f"labels must be a tensor of token ids of shape {tuple(logits.shape[:-1])}: the "
                         f"cross-entropy needs them")
    if settings["vocab_size"] is not None:
        check_vocab_size(settings["vocab_size"], logits=logits.shape[-1])
    return LossOptions(kd_weight=0.0, ce_weight=1.0, **settings)


class CrossEntropyLoss(torch.nn.Module):
    """`cross_entropy` with its settings fixed at construction: `CrossEntropyLoss(label_smoothing=0.1,
    inplace_backward=True)`; `forward(logits, labels, num_items_in_batch=None)`. `class_weights` is kept as a
    buffer."""

    def __init__(self, *, class_weights=None, token_scaling=None, process_group=None, vocab_range=None, **settings):
        super().__init__()
        unknown = sorted(set(settings) - set(CE_SETTINGS))
        if unknown:
            raise TypeError(f"CrossEntropyLoss got unknown setting(s) {unknown}; the settings are "
                            f"{[*CE_SETTINGS, 'class_weights', 'token_scaling']} (torch's `weight` is `class_weights` "
                            f"here, Liger-Kernel's `use_token_scaling=True` is `token_scaling='dft'` and its "
                            f"`use_eaft=True` `token_scaling=kdfast.EAFT(alpha, top_k)`; a teacher's settings belong "
                            f"to kdfast.DistillLoss)")
        check_token_scaling(token_scaling)
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        tempered_map(settings.get("logit_scale", 1.0), settings.get("softcap"))
        LossOptions(kd_weight=0.0, ce_weight=1.0, **{name: value for name, value in settings.items()
                                                      if name not in ("softcap", "logit_scale")})
        self.settings, self.process_group, self.vocab_range = settings, process_group, vocab_range
        self.token_scaling = token_scaling
        # A buffer, as torch.nn.CrossEntropyLoss keeps its `weight`: `.to(device)` moves it with the module.
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits, labels, num_items_in_batch=None):
        return cross_entropy(logits, labels, num_items_in_batch=num_items_in_batch, process_group=self.process_group,
                             vocab_range=self.vocab_range, class_weights=self.class_weights,
                             token_scaling=self.token_scaling, **self.settings)

    def extra_repr(self) -> str:
        shown = {**self.settings, **({"token_scaling": self.token_scaling} if self.token_scaling else {})}
        return ", ".join(f"{name}={value!r}" for name, value in shown.items())
