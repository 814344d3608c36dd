"""`patch_causal_lm`: a Hugging Face causal LM whose training loss, `model(input_ids, labels=labels).loss`, is
kdfast's fused linear cross-entropy over its last hidden states and LM head, so the [tokens, vocab] logits are never
built. One generic hook at the LM head, not a copy of each architecture's forward: while the patched forward runs,
the head records its input and hands back a two-column probe; the model's own code after the head (Gemma-2's
softcap, Cohere's scale, Granite's division) runs on the probe, which checks the logit map kdfast reads from the
config, and the loss is then computed from the recorded hidden states as the model's `ForCausalLMLoss` would."""

from __future__ import annotations

import functools
import inspect
import math

import torch

from kdfast.integrations.causal_lm import head_settings, output_head
from kdfast.integrations.sharding import whole_head
from kdfast.linear_ce import LinearCrossEntropyLoss, linear_cross_entropy

_PATCH_STATE = "_kdfast_fused_loss"  # the model's __dict__ entry: (the forward it replaced or None, settings)
_MAP_CHECKED = "_kdfast_logit_map_checked"  # set once the probe has shown the model's logit map is the one read
_PROBE = (0.75, 3.0)  # logits the head hands back in its place: exact in every float dtype


def patch_causal_lm(model, enabled: bool = True, *, training_only: bool = True, ignore_index: int | None = None,
                    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, chunk_size="auto",
                    fp32_logits: bool = False, backend: str = "auto"):
    """Computes `model`'s loss with `kdfast.linear_cross_entropy` whenever it is called with `labels` (or
    `shift_labels`) while training (`training_only=False`: in eval mode too); otherwise its forward is untouched.
    The fused call returns the model's own output with `loss` set and `logits=None`. Labels are shifted as
    `ForCausalLMLoss` shifts them, `num_items_in_batch` (passed by `transformers.Trainer`) divides the summed loss,
    each model family's logit scale and final softcap are applied as the model applies them. `ignore_index` None:
    the call's own `ignore_index` keyword, else -100 (ForCausalLMLoss's); the other settings are
    `linear_cross_entropy`'s (the head's bias, scale and softcap are read from the model; the reduction is the model
    loss's own). A PEFT model is patched at its base model (the head must not carry an adapter). Returns `model`;
    `patch_causal_lm(model, False)` restores the original forward."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = dict(label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, chunk_size=chunk_size,
                    fp32_logits=fp32_logits, backend=backend)
    if ignore_index is not None:
        settings["ignore_index"] = ignore_index
    _unpatch(target)
    if not enabled:
        return model
    # Refused now rather than at the first training step: no linear head, an adapter on it, a bad setting.
    output_head(target)
    LinearCrossEntropyLoss(**settings)
    original = target.forward
    replaced = target.__dict__.get("forward")

    signature = inspect.signature(original)
    extra_name = next((name for name, parameter in signature.parameters.items()
                       if parameter.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)  # keeps the signature: Trainer reads **kwargs from it to pass num_items_in_batch
    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        # The loss's keywords: named parameters, or in the extra keywords (a subclass's forward(*args, **kwargs)).
        extra = bound.arguments.setdefault(extra_name, {}) if extra_name else {}
        holder = bound.arguments if "labels" in signature.parameters else extra
        if (holder.get("labels") is None and extra.get("shift_labels") is None) or \
                (training_only and not target.training):
            return original(*args, **kwargs)
        labels = holder.pop("labels", None)
        return _fused_forward(target, original, bound, labels, extra, settings)

    target.forward = forward
    target.__dict__[_PATCH_STATE] = (replaced, settings)
    return model


def _unpatch(target) -> None:
    if _PATCH_STATE not in target.__dict__:
        return
    replaced, _ = target.__dict__.pop(_PATCH_STATE)
    target.__dict__.pop(_MAP_CHECKED, None)
    if replaced is None:
        target.__dict__.pop("forward", None)
    else:
        target.forward = replaced


def _fused_forward(target, original, bound, labels, extra, settings):
    # The model runs without its labels (its loss would need the logits) and without the loss's own keywords.
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    shift_labels = extra.pop("shift_labels", None)
    ignore_index = settings.get("ignore_index", extra.pop("ignore_index", -100))
    head = output_head(target)
    recorded = []

    def record(hidden):
        recorded.append(hidden)
        probe = torch.tensor(_PROBE, dtype=hidden.dtype, device=hidden.device)
        return probe.expand(*hidden.shape[:-1], len(_PROBE)).clone()

    own_forward = head.__dict__.get("forward")
    head.forward = record
    try:
        output = original(*bound.args, **bound.kwargs)
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
    if len(recorded) != 1:
        raise ValueError(f"{type(target).__name__}.forward called its LM head {len(recorded)} times; "
                         f"patch_causal_lm needs one call on the last hidden states")
    if not hasattr(output, "logits"):
        raise ValueError(f"{type(target).__name__}.forward returned {type(output).__name__}, not a ModelOutput: "
                         f"patch_causal_lm needs return_dict=True (the default)")
    head_map = head_settings(target)
    _check_logit_map(target, output.logits, head_map)
    if shift_labels is None:
        # ForCausalLMLoss's shift: position i predicts label i + 1, the last position nothing.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    with whole_head(target, head):
        loss = linear_cross_entropy(recorded[0], head.weight, shift_labels.to(recorded[0].device), bias=head.bias,
                                    **head_map, num_items_in_batch=num_items_in_batch,
                                    **{"ignore_index": ignore_index, **settings})
    fields = {name: value for name, value in output.items() if name not in ("loss", "logits")}
    return type(output)(loss=loss, logits=None, **fields)


def _check_logit_map(target, probe_logits, head_map) -> None:
    """The model's code after its head, run on the probe, must be the map kdfast applies: the scale, then the cap.
    Checked once per model (it reads the probe back to the host)."""
    if target.__dict__.get(_MAP_CHECKED):
        return
    seen = probe_logits.reshape(-1, len(_PROBE))[0].float().tolist()
    scale, cap = head_map["logit_scale"], head_map["softcap"]
    expected = [scale * z if cap is None else cap * math.tanh(scale * z / cap) for z in _PROBE]
    if not all(math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-3) for a, b in zip(seen, expected)):
        raise ValueError(f"{type(target).__name__} maps its LM head's output z to logits kdfast does not read from "
                         f"its config (logit_scale={scale}, softcap={cap}): z = {list(_PROBE)} gave {seen}, "
                         f"expected {expected}; patch_causal_lm cannot compute this model's loss")
    target.__dict__[_MAP_CHECKED] = True
