"""The fused linear cross-entropy alone: `linear_cross_entropy`, what Cut Cross-Entropy's `linear_cross_entropy` and
Liger-Kernel's fused linear CE compute, on the fused linear loss's own chunks with no teacher (the teacher kind
"none": the kernel is given no divergence, and no teacher is projected)."""

from __future__ import annotations

import inspect

import torch

from kdfast.class_weights import check_class_weights
from kdfast.dispatch import device_rows
from kdfast.linear_function import ChunkPlan
from kdfast.linear_loss import apply_linear, fused_linear_loss
from kdfast.logit_maps import _check_scale, tempered_map
from kdfast.options import LossOptions
from kdfast.shared_vocab import heads_cut_to_vocab
from kdfast.token_scaling import check_token_scaling, weighed_rows
from kdfast.validation import check_chunk_settings, check_labels_for, check_linear_student, check_num_items
from kdfast.views import flat_labels


def linear_cross_entropy(hidden, weight, labels, *, bias=None, softcap=None, logit_scale=1.0, ignore_index=-100,
                         reduction="mean", num_items_in_batch=None, label_smoothing=0.0, z_loss_weight=0.0,
                         chunk_size="auto", fp32_logits=False, backend="auto", return_components=False,
                         vocab_size=None, class_weights=None, token_scaling=None, process_group=None,
                         vocab_range=None, reduce_hidden_grad=True):
    """`F.cross_entropy(softcap(logit_scale * (hidden @ weight.T + bias)), labels)` for hidden states [..., H], a head
    [V, H] (+ bias [V]) and labels [...] (`ignore_index`: no loss, no gradient), computed `chunk_size` tokens at a
    time: no [N, V] logits. `reduction` "mean" (over the kept labels, or `num_items_in_batch`), "sum" or "none";
    `label_smoothing` and `z_loss_weight` (times log-sum-exp², PaLM's) as `distill_loss` takes them. Gradients flow
    to hidden, weight and bias; the other settings are `linear_distill_loss`'s (`fp32_logits`, vocab parallelism).
    `class_weights` [V] as `kdfast.cross_entropy` takes them (Liger-Kernel's fused linear CE's `ce_weight`), weighed
    in each chunk before its gradient GEMMs; `token_scaling` ("dft", "eaft" or kdfast.EAFT) as `kdfast.cross_entropy`
    takes it (Liger-Kernel's `use_token_scaling=True` and `use_eaft=True`, TRL's SFT `loss_type="dft"`): each row's
    loss and gradient times its detached factor, read from the chunk's kernel or logits. Neither over vocab shards."""
    # In this function's names (fused_linear_loss checks the same as the student's).
    check_linear_student(hidden, weight, bias, softcap, chunk_size, fp32_logits, prefix="")
    _check_scale("logit_scale", logit_scale)
    if labels is None:
        raise ValueError("labels must be a tensor of token ids shaped like hidden's leading dims: cross-entropy needs "
                         "them")
    opts = LossOptions(kd_weight=0.0, ce_weight=1.0, ignore_index=ignore_index, reduction=reduction, backend=backend,
                       return_components=return_components, vocab_size=vocab_size, label_smoothing=label_smoothing,
                       z_loss_weight=z_loss_weight)
    check_token_scaling(token_scaling)
    if class_weights is not None or token_scaling is not None:
        if process_group is not None or vocab_range is not None:
            raise ValueError("class_weights and token_scaling are not supported over vocab shards (process_group / "
                             "vocab_range)")
        return _weighed(hidden, weight, labels, class_weights, token_scaling, opts, bias=bias,
                        student_map=tempered_map(logit_scale, softcap), chunk_size=chunk_size,
                        fp32_logits=fp32_logits, num_items_in_batch=num_items_in_batch)
    return fused_linear_loss(hidden, weight, None, None, labels, opts, student_bias=bias, softcap=softcap,
                             student_logit_scale=logit_scale, chunk_size=chunk_size, fp32_logits=fp32_logits,
                             num_items_in_batch=num_items_in_batch, process_group=process_group,
                             vocab_range=vocab_range, reduce_hidden_grad=reduce_hidden_grad)



# Host-driven as apply_linear is, checks and the backend's choice included: torch.compile calls it as is (traced, the
# backend's choice stats the build folder, a graph break with a warning of its own).
@torch.compiler.disable
def _weighed(hidden, weight, labels, class_weights, token_scaling, opts: LossOptions, *, bias, student_map, chunk_size,
             fp32_logits, num_items_in_batch):
    """`linear_cross_entropy` with per-class weights and / or a token scaling: the chunks' kernel without smoothing,
    each chunk's parts and gradient weighed (kdfast.class_weights, kdfast.token_scaling) before its gradient GEMMs,
    "mean" over the weighted denominator."""
    weight, bias, _, _ = heads_cut_to_vocab(opts, None, weight, bias, None, None)
    lead_shape = tuple(hidden.shape[:-1])
    check_labels_for(labels, lead_shape, weight.shape[0], hidden.device, opts, "the hidden states")
    check_num_items(num_items_in_batch)
    check_class_weights(class_weights, weight.shape[0], hidden.device)
    weighted = weighed_rows(class_weights, token_scaling, flat_labels(labels), opts, num_items_in_batch,
                            weight.shape[0])
    plan = ChunkPlan(student_map, chunk_size, device_rows(opts, hidden.device), fp32_logits)
    # Per row (reduction="none") the backward runs the chunks again, the rows weighed again times their grad_output.
    return apply_linear(hidden, weight, bias, labels, weighted.denominator, opts, plan, None, weighted)


# The loss record's share of linear_cross_entropy's settings (the rest are the head's, the chunks' and the shards').
_LOSS_SETTINGS = ("ignore_index", "reduction", "label_smoothing", "z_loss_weight", "backend", "return_components",
                  "vocab_size")


class LinearCrossEntropyLoss(torch.nn.Module):
    """`linear_cross_entropy` with its settings fixed at construction: `LinearCrossEntropyLoss(softcap=30.0,
    label_smoothing=0.1)`; `forward(hidden, weight, labels, bias=None, num_items_in_batch=None)`. `class_weights` is
    kept as a buffer."""

    def __init__(self, *, class_weights=None, **settings):
        super().__init__()
        known = [name for name, parameter in inspect.signature(linear_cross_entropy).parameters.items()
                 if parameter.kind is inspect.Parameter.KEYWORD_ONLY
                 and name not in ("bias", "num_items_in_batch", "class_weights")]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"LinearCrossEntropyLoss got unknown setting(s) {unknown}; the settings are "
                            f"{[*known, 'class_weights']} (Liger's `ce_weight` is `class_weights` here, its "
                            f"`use_token_scaling=True` is `token_scaling='dft'` and its `use_eaft=True` "
                            f"`token_scaling=kdfast.EAFT(alpha, top_k)`; a teacher's settings belong to "
                            f"kdfast.LinearDistillLoss)")
        check_token_scaling(settings.get("token_scaling"))
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        loss_settings = {name: settings[name] for name in _LOSS_SETTINGS if name in settings}
        LossOptions(kd_weight=0.0, ce_weight=1.0, **loss_settings)
        check_chunk_settings(settings.get("softcap"), settings.get("chunk_size", "auto"),
                             settings.get("fp32_logits", False))
        _check_scale("logit_scale", settings.get("logit_scale", 1.0))
        self.settings = settings
        # A buffer, as torch.nn.CrossEntropyLoss keeps its `weight`: `.to(device)` moves it with the module.
        self.register_buffer("class_weights", class_weights)

    def forward(self, hidden, weight, labels, bias=None, num_items_in_batch=None):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=num_items_in_batch,
                                    class_weights=self.class_weights, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.settings.items()
                         if name not in ("process_group",))
