"""`patch_causal_lm`: a Hugging Face causal LM whose training loss, `model(input_ids, labels=labels).loss`, is
kdfast's fused linear cross-entropy over its last hidden states and LM head, so the [tokens, vocab] logits are never
built. One generic hook at the LM head, not a copy of each architecture's forward: while the patched forward runs,
the head records its input and hands back a two-column probe; the model's own code after the head (Gemma-2's
softcap, Cohere's scale, Granite's division) runs on the probe, which checks the logit map kdfast reads from the
config, and the loss is then computed from the recorded hidden states as the model's `ForCausalLMLoss` would."""

from __future__ import annotations

import inspect
import math

import torch

from kdfast.integrations.causal_lm import head_settings, output_head
from kdfast.integrations.sharding import whole_head
from kdfast.linear_ce import LinearCrossEntropyLoss, linear_cross_entropy

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
    `patch_causal_lm(model, False)` restores the original forward. A deep copy of a patched model is patched too."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = dict(label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, chunk_size=chunk_size,
                    fp32_logits=fp32_logits, backend=backend)
    if ignore_index is not None:
        settings["ignore_index"] = ignore_index
    _unpatch(target)
    if not enabled:
        return model
    # Refused now rather than at the first training step: no linear head, an adapter on it, a bad setting.
    head = output_head(target)
    LinearCrossEntropyLoss(**settings)
    target.forward = _FusedLossForward(target, training_only, settings)
    head.forward = _HeadRecorder(head)
    return model


class _FusedLossForward:
    """The patched model's forward. An object rather than a closure: a deep copy of the model (a reference model,
    an EMA copy) must call its own copy's forward, and deepcopy remaps an object's attributes but not a closure's."""

    def __init__(self, target, training_only: bool, settings: dict):
        self.target, self.training_only, self.settings = target, training_only, settings
        self.replaced = target.__dict__.get("forward")  # an instance forward of the model's own, put back on unpatch
        self.original = target.forward
        # Trainer reads **kwargs from the forward's signature to pass num_items_in_batch.
        self.__signature__ = inspect.signature(self.original)
        self.extra_name = next((name for name, parameter in self.__signature__.parameters.items()
                                if parameter.kind is inspect.Parameter.VAR_KEYWORD), None)

    def __call__(self, *args, **kwargs):
        bound = self.__signature__.bind_partial(*args, **kwargs)
        # The loss's keywords: named parameters, or in the extra keywords (a subclass's forward(*args, **kwargs)).
        extra = bound.arguments.setdefault(self.extra_name, {}) if self.extra_name else {}
        holder = bound.arguments if "labels" in self.__signature__.parameters else extra
        if (holder.get("labels") is None and extra.get("shift_labels") is None) or \
                (self.training_only and not self.target.training):
            return self.original(*args, **kwargs)
        labels = holder.pop("labels", None)
        return _fused_forward(self.target, self.original, bound, labels, extra, self.settings)


class _HeadRecorder:
    """The LM head's forward while the model is patched: the head's own, except during a fused forward, when it
    records its input and returns the probe. Installed once, at the patch: a module's forward assigned inside a
    torch.compile'd forward is a side effect dynamo does not replay."""

    def __init__(self, head):
        self.head, self.replaced, self.recorded = head, head.__dict__.get("forward"), None

    def __call__(self, hidden, *args, **kwargs):
        if self.recorded is None:
            own = self.replaced or type(self.head).forward.__get__(self.head)
            return own(hidden, *args, **kwargs)
        self.recorded.append(hidden)
        probe = torch.tensor(_PROBE, dtype=hidden.dtype, device=hidden.device)
        return probe.expand(*hidden.shape[:-1], len(_PROBE)).clone()


def _unpatch(target) -> None:
    patched = target.__dict__.get("forward")
    if not isinstance(patched, _FusedLossForward):
        return
    _restore(target, patched.replaced)
    target.__dict__.pop(_MAP_CHECKED, None)
    head = output_head(target)
    if isinstance(head.__dict__.get("forward"), _HeadRecorder):
        _restore(head, head.__dict__["forward"].replaced)


def _restore(module, replaced) -> None:
    if replaced is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = replaced


def _recorder(target) -> _HeadRecorder:
    head = output_head(target)
    recorder = head.__dict__.get("forward")
    if not isinstance(recorder, _HeadRecorder):
        raise ValueError(f"{type(target).__name__}'s LM head was replaced after patch_causal_lm (resized "
                         f"embeddings?): patch the model again")
    return recorder


def _fused_forward(target, original, bound, labels, extra, settings):
    # The model runs without its labels (its loss would need the logits) and without the loss's own keywords.
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    shift_labels = extra.pop("shift_labels", None)
    ignore_index = settings.get("ignore_index", extra.pop("ignore_index", -100))
    recorder = _recorder(target)
    recorder.recorded = []
    try:
        output = original(*bound.args, **bound.kwargs)
    finally:
        recorded, recorder.recorded = recorder.recorded, None
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
    head = recorder.head
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
