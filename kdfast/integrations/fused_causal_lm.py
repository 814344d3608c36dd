"""`patch_causal_lm`: a Hugging Face causal LM whose training loss, `model(input_ids, labels=labels).loss`, is
kdfast's fused linear cross-entropy over its last hidden states and LM head, so the [tokens, vocab] logits are never
built. Two generic hooks, not a copy of each architecture's forward: during a fused forward the LM head records its
input and hands back a two-column probe, and the model's loss function (its `ForCausalLMLoss`) records the labels and
keywords it is given and returns 0. The model's own code runs around both: its post-processing of the logits (Gemma-2's
softcap, Cohere's scale, Granite's division) maps the probe, which checks the map kdfast reads from the config, and
whatever it adds to the loss (a mixture of experts' router loss) is kept."""

from __future__ import annotations

import inspect
import math

import torch

from kdfast.class_weights import check_class_weights
from kdfast.integrations.causal_lm import head_settings, output_head
from kdfast.integrations.sharding import whole_head
from kdfast.linear_ce import LinearCrossEntropyLoss, linear_cross_entropy

_LOGIT_MAP = "_kdfast_logit_map"  # the map the probe showed, kept after the first fused call
_PROBE = (0.75, 3.0)  # logits the head hands back in its place: exact in every float dtype


def patch_causal_lm(model, enabled: bool = True, *, training_only: bool = True, ignore_index: int | None = None,
                    label_smoothing: float = 0.0, z_loss_weight: float = 0.0, chunk_size="auto",
                    fp32_logits: bool = False, backend: str = "auto", class_weights=None,
                    token_scaling=None):
    """Computes `model`'s loss with `kdfast.linear_cross_entropy` whenever it is called with `labels` while training
    (`training_only=False`: in eval mode too); otherwise its forward is untouched. The fused call returns the
    model's own output with `loss` set and `logits=None`. The cross-entropy takes what the model hands its
    `ForCausalLMLoss` (labels shifted as it shifts them, `shift_labels`, `num_items_in_batch`, which
    `transformers.Trainer` passes, `ignore_index`), each model family's logit scale and final softcap are applied as
    the model applies them, and what the model adds to its loss is added. `ignore_index` None: the call's own, else
    -100 (ForCausalLMLoss's); the other settings are `linear_cross_entropy`'s (the reduction is the model loss's
    own). `class_weights` [V] weigh each label's class as `F.cross_entropy(weight=)` does (kept as given, taken to the
    hidden states' device at each call); `token_scaling="dft"` scales each token's loss by its label's detached
    probability (TRL's SFT `loss_type="dft"`), "eaft" or kdfast.EAFT by its top-k entropy. A PEFT model is patched at
    its base model (the head must not carry an adapter). Returns `model`; `patch_causal_lm(model, False)` restores it.
    A deep copy of a patched model is patched too."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = dict(label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, chunk_size=chunk_size,
                    fp32_logits=fp32_logits, backend=backend, token_scaling=token_scaling)
    if ignore_index is not None:
        settings["ignore_index"] = ignore_index
    _unpatch(target)
    if not enabled:
        return model
    # Refused now rather than at the first training step: no linear head, an adapter on it, another loss, a bad
    # setting.
    head = output_head(target)
    _check_loss_function(target)
    LinearCrossEntropyLoss(**settings)
    if class_weights is not None:
        check_class_weights(class_weights, head.weight.shape[0])
        settings["class_weights"] = class_weights
    # Each installed once, here: a module's forward assigned inside a torch.compile'd forward is a side effect dynamo
    # does not replay.
    target.forward = _FusedLossForward(target, training_only, settings)
    head.forward = _HeadRecorder(head)
    target.loss_function = _LossRecorder(target.__dict__.get("_loss_function"))
    return model


def _check_loss_function(target) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    own = getattr(target, "loss_function", None)
    if own is not ForCausalLMLoss:
        raise ValueError(f"{type(target).__name__}'s loss function is {getattr(own, '__name__', own)!r}, not "
                         f"transformers' ForCausalLMLoss: patch_causal_lm computes only the causal LM's cross-entropy")


class _FusedLossForward:
    """The patched model's forward. An object rather than a closure: a deep copy of the model (a reference model,
    an EMA copy) must call its own copy's forward, and deepcopy remaps an object's attributes but not a closure's."""

    def __init__(self, target, training_only: bool, settings: dict):
        self.target, self.training_only, self.settings = target, training_only, settings
        self.replaced = target.__dict__.get("forward")  # an instance forward of the model's own, put back on unpatch
        self.original = target.forward
        # Trainer reads **kwargs from the forward's signature to pass num_items_in_batch.
        self.__signature__ = inspect.signature(self.original)

    def __call__(self, *args, **kwargs):
        arguments = self.__signature__.bind_partial(*args, **kwargs).arguments
        # A forward of (*args, **kwargs) (a subclass's) holds labels among its extra keywords.
        labels = arguments.get("labels", kwargs.get("labels"))
        if labels is None or (self.training_only and not self.target.training):
            return self.original(*args, **kwargs)
        return _fused_forward(self.target, self.original, args, kwargs, self.settings)


class _HeadRecorder:
    """The LM head's forward while the model is patched: the head's own, except during a fused forward, when it
    records its input and returns the probe."""

    def __init__(self, head):
        self.head, self.replaced, self.recorded = head, head.__dict__.get("forward"), None

    def __call__(self, hidden, *args, **kwargs):
        if self.recorded is None:
            own = self.replaced or type(self.head).forward.__get__(self.head)
            return own(hidden, *args, **kwargs)
        self.recorded.append(hidden)
        probe = torch.tensor(_PROBE, dtype=hidden.dtype, device=hidden.device)
        return probe.expand(*hidden.shape[:-1], len(_PROBE)).clone()


class _LossRecorder:
    """The model's loss function while it is patched: ForCausalLMLoss, except during a fused forward, when it records
    the arguments it is given and returns a float32 0 to which the model adds its own terms."""

    def __init__(self, replaced):
        self.replaced, self.recorded = replaced, None  # replaced: a `_loss_function` set before the patch

    def __call__(self, *args, **kwargs):
        from transformers.loss.loss_utils import ForCausalLMLoss

        if self.recorded is None:
            return ForCausalLMLoss(*args, **kwargs)
        call = inspect.signature(ForCausalLMLoss).bind(*args, **kwargs).arguments
        self.recorded.append(call)
        return torch.zeros((), dtype=torch.float32, device=call["logits"].device)


def _unpatch(target) -> None:
    patched = target.__dict__.get("forward")
    if not isinstance(patched, _FusedLossForward):
        return
    _restore(target, "forward", patched.replaced)
    _restore(target, "_loss_function", target.__dict__["_loss_function"].replaced)
    target.__dict__.pop(_LOGIT_MAP, None)
    head = output_head(target)
    if isinstance(head.__dict__.get("forward"), _HeadRecorder):
        _restore(head, "forward", head.__dict__["forward"].replaced)


def _restore(module, name: str, replaced) -> None:
    if replaced is None:
        module.__dict__.pop(name, None)
    else:
        setattr(module, name, replaced)


def _recorders(target) -> tuple[_HeadRecorder, _LossRecorder]:
    head_recorder = output_head(target).__dict__.get("forward")
    loss_recorder = target.__dict__.get("_loss_function")
    if not isinstance(head_recorder, _HeadRecorder) or not isinstance(loss_recorder, _LossRecorder):
        raise ValueError(f"{type(target).__name__}'s LM head or loss function was replaced after patch_causal_lm "
                         f"(resized embeddings?): patch the model again")
    return head_recorder, loss_recorder


def _fused_forward(target, original, args, kwargs, settings):
    head_recorder, loss_recorder = _recorders(target)
    head_recorder.recorded, loss_recorder.recorded = [], []
    try:
        output = original(*args, **kwargs)
    finally:
        hidden, calls = head_recorder.recorded, loss_recorder.recorded
        head_recorder.recorded = loss_recorder.recorded = None
    name = type(target).__name__
    if len(hidden) != 1 or len(calls) != 1:
        raise ValueError(f"{name}.forward called its LM head {len(hidden)} times and its loss function {len(calls)} "
                         f"times; patch_causal_lm needs one call of each (the head on the last hidden states)")
    if not hasattr(output, "logits"):
        raise ValueError(f"{name}.forward returned {type(output).__name__}, not a ModelOutput: patch_causal_lm needs "
                         f"return_dict=True (the default)")
    head_map = _logit_map(target, output.logits)
    call, hidden = calls[0], hidden[0]
    ignore_index = settings.get("ignore_index", call.get("ignore_index", -100))
    shift_labels = call.get("shift_labels")
    if shift_labels is None:
        # ForCausalLMLoss's shift: position i predicts label i + 1, the last position nothing.
        shift_labels = torch.nn.functional.pad(call["labels"], (0, 1), value=ignore_index)[..., 1:]
    head = head_recorder.head
    class_weights = settings.get("class_weights")
    if class_weights is not None:  # the model may have moved since it was patched
        class_weights = class_weights.to(hidden.device)
    with whole_head(target, head):
        loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias, **head_map,
                                    num_items_in_batch=call.get("num_items_in_batch"),
                                    **{**settings, "ignore_index": ignore_index, "class_weights": class_weights})
    # The model's own terms (a router loss), added to the 0 its loss function returned.
    loss = loss + output.loss.to(loss.device)
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    return type(output)(loss=loss, logits=None, **fields)


def _logit_map(target, probe_logits) -> dict:
    """The map the model's code after its head applies, as `linear_cross_entropy`'s logit_scale and softcap: the
    config's scale then cap (TRL's reading), or the cap alone where the model applies its scale to the hidden states
    before the head (MiniCPM3 divides them by `logits_scaling`), which the recorded input already carries. Found on
    the first call (it reads the probe back to the host) and kept; a map that is neither is refused."""
    if _LOGIT_MAP in target.__dict__:
        return target.__dict__[_LOGIT_MAP]
    seen = probe_logits.reshape(-1, len(_PROBE))[0].float().tolist()
    read = head_settings(target)
    candidates = [read, {**read, "logit_scale": 1.0}]
    for candidate in candidates:
        scale, cap = candidate["logit_scale"], candidate["softcap"]
        expected = [scale * z if cap is None else cap * math.tanh(scale * z / cap) for z in _PROBE]
        if all(math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-3) for a, b in zip(seen, expected)):
            target.__dict__[_LOGIT_MAP] = candidate
            return candidate
    raise ValueError(f"{type(target).__name__} maps its LM head's output z to logits kdfast does not read from its "
                     f"config (logit_scale={read['logit_scale']}, softcap={read['softcap']}): z = {list(_PROBE)} gave "
                     f"{seen}; patch_causal_lm cannot compute this model's loss")
