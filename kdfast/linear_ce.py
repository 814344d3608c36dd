"""The fused linear cross-entropy alone: `linear_cross_entropy`, what Cut Cross-Entropy's `linear_cross_entropy` and
Liger-Kernel's fused linear CE compute, on the fused linear loss's own chunks with no teacher (the teacher kind
"none": the kernel is given no divergence, and no teacher is projected)."""

from __future__ import annotations

import inspect

import torch

from kdfast.linear_loss import fused_linear_loss
from kdfast.logit_maps import _check_scale
from kdfast.options import LossOptions
from kdfast.validation import check_chunk_settings, check_linear_student


def linear_cross_entropy(hidden, weight, labels, *, bias=None, softcap=None, logit_scale=1.0, ignore_index=-100,
                         reduction="mean", num_items_in_batch=None, label_smoothing=0.0, z_loss_weight=0.0,
                         chunk_size="auto", fp32_logits=False, backend="auto", return_components=False,
                         vocab_size=None, process_group=None, vocab_range=None, reduce_hidden_grad=True):
    """`F.cross_entropy(softcap(logit_scale * (hidden @ weight.T + bias)), labels)` for hidden states [..., H], a head
    [V, H] (+ bias [V]) and labels [...] (`ignore_index`: no loss, no gradient), computed `chunk_size` tokens at a
    time: no [N, V] logits. `reduction` "mean" (over the kept labels, or `num_items_in_batch`), "sum" or "none";
    `label_smoothing` and `z_loss_weight` (times log-sum-exp², PaLM's) as `distill_loss` takes them. Gradients flow
    to hidden, weight and bias; the other settings are `linear_distill_loss`'s (`fp32_logits`, vocab parallelism)."""
    # In this function's names (fused_linear_loss checks the same as the student's).
    check_linear_student(hidden, weight, bias, softcap, chunk_size, fp32_logits, prefix="")
    _check_scale("logit_scale", logit_scale)
    if labels is None:
        raise ValueError("labels must be a tensor of token ids shaped like hidden's leading dims: cross-entropy needs "
                         "them")
    opts = LossOptions(kd_weight=0.0, ce_weight=1.0, ignore_index=ignore_index, reduction=reduction, backend=backend,
                       return_components=return_components, vocab_size=vocab_size, label_smoothing=label_smoothing,
                       z_loss_weight=z_loss_weight)
    return fused_linear_loss(hidden, weight, None, None, labels, opts, student_bias=bias, softcap=softcap,
                             student_logit_scale=logit_scale, chunk_size=chunk_size, fp32_logits=fp32_logits,
                             num_items_in_batch=num_items_in_batch, process_group=process_group,
                             vocab_range=vocab_range, reduce_hidden_grad=reduce_hidden_grad)



# The loss record's share of linear_cross_entropy's settings (the rest are the head's, the chunks' and the shards').
_LOSS_SETTINGS = ("ignore_index", "reduction", "label_smoothing", "z_loss_weight", "backend", "return_components",
                  "vocab_size")


class LinearCrossEntropyLoss(torch.nn.Module):
    """`linear_cross_entropy` with its settings fixed at construction: `LinearCrossEntropyLoss(softcap=30.0,
    label_smoothing=0.1)`; `forward(hidden, weight, labels, bias=None, num_items_in_batch=None)`."""

    def __init__(self, **settings):
        super().__init__()
        known = [name for name, parameter in inspect.signature(linear_cross_entropy).parameters.items()
                 if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("bias", "num_items_in_batch")]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"LinearCrossEntropyLoss got unknown setting(s) {unknown}; the settings are {known} (a "
                            f"teacher's settings belong to kdfast.LinearDistillLoss)")
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        loss_settings = {name: settings[name] for name in _LOSS_SETTINGS if name in settings}
        LossOptions(kd_weight=0.0, ce_weight=1.0, **loss_settings)
        check_chunk_settings(settings.get("softcap"), settings.get("chunk_size", "auto"),
                             settings.get("fp32_logits", False))
        _check_scale("logit_scale", settings.get("logit_scale", 1.0))
        self.settings = settings

    def forward(self, hidden, weight, labels, bias=None, num_items_in_batch=None):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=num_items_in_batch,
                                    **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.settings.items()
                         if name not in ("process_group",))
