"""A check, once per model, that the logits the trainers' fused loss computes are the model's own: its decoder's
output through `get_output_embeddings()`'s weight and bias, the logit scale and the softcap read from its config,
against the model's own forward on a few tokens of the first batch. A model whose forward does more between its
decoder and its logits than kdfast reads (remote-code models that normalise their head's rows, as Baichuan 2 does,
or scale their logits by a name no config shares) would otherwise be distilled on other logits than its own,
silently; one whose `get_decoder()` is not its decoder (ModernBERT's decoder model returns its output embeddings)
failed deep inside the loss."""

from __future__ import annotations

import torch

from kdfast.integrations.causal_lm import head_settings, last_hidden_state, no_cache, output_head
from kdfast.integrations.packed_sequences import packing_inputs
from kdfast.integrations.sharding import collective_forward
from kdfast.integrations.vision_inputs import image_inputs

_CHECKED = "_kdfast_head_checked"
PROBE_TOKENS = 16  # the first example's first tokens: a forward of a few rows of logits, once


def check_head_map(model, inputs) -> None:
    """Raises a ValueError naming `model` if its own logits on `PROBE_TOKENS` tokens of the batch's first example
    differ from the fused loss's; once per model (kept on it). Skipped where the check cannot be run alone
    or cheaply: a model whose forward is a collective of sharded ranks (FSDP2, ZeRO-3), a batch with images (their
    inputs are the whole batch's)."""
    if model.__dict__.get(_CHECKED) or image_inputs(inputs):
        return
    if collective_forward(model):
        # Sharded for good: marked, so that no later step walks its modules and parameters to ask again.
        model.__dict__[_CHECKED] = True
        return
    mask = inputs.get("attention_mask")
    # The first example's tokens from its first kept one (past a left padding).
    start = int(mask[0].ne(0).int().argmax()) if mask is not None else 0
    span = slice(start, start + PROBE_TOKENS)
    probe = {"input_ids": inputs["input_ids"][:1, span]}
    if mask is not None:
        probe["attention_mask"] = mask[:1, span]
    positions = packing_inputs(inputs).get("position_ids")
    if positions is not None:  # packed examples: the first example's positions (no flash-attention lengths)
        probe["position_ids"] = positions[:1, span]
    was_training = model.training
    model.eval()  # no dropout: the two forwards must see the same network
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            own = model(**probe, **no_cache(model)).logits.float()
            extra = {"position_ids": probe["position_ids"]} if "position_ids" in probe else None
            fused = _mapped_logits(model, _decoder_output(model, probe, extra))
    finally:
        model.train(was_training)
    if own.shape != fused.shape:
        raise ValueError(f"{type(model).__name__}'s own logits have shape {tuple(own.shape)} but its LM head "
                         f"(get_output_embeddings()) gives {tuple(fused.shape)}: kdfast cannot distil its logits")
    keep = probe["attention_mask"].bool() if "attention_mask" in probe else torch.ones_like(probe["input_ids"],
                                                                                              dtype=torch.bool)
    difference = (own - fused)[keep].abs().max().item() if keep.any() else 0.0
    # Far above the rounding of two orders of the same products (a 16-bit head's included), far below a missing
    # normalisation or prediction head.
    bound = 2e-2 * (1.0 + own[keep].abs().max().item()) if keep.any() else 0.0
    if difference > bound:
        raise ValueError(f"{type(model).__name__}'s own logits differ from those of its decoder's output through its "
                         f"LM head (get_output_embeddings()) with the logit scale and softcap its config names, by up "
                         f"to {difference:.3g} on the batch's first tokens: its forward does more before its logits "
                         f"than kdfast reads, so kdfast cannot distil this model's logits")
    model.__dict__[_CHECKED] = True


def _decoder_output(model, probe, extra) -> torch.Tensor:
    try:
        return last_hidden_state(model, probe["input_ids"], probe.get("attention_mask"), extra)
    except TypeError as error:  # get_decoder() found a module that is not the decoder (ModernBERT's: its head)
        raise ValueError(f"{type(model).__name__}.get_decoder() is a {type(model.get_decoder()).__name__}, which "
                         f"does not run on the input ids ({error}): kdfast cannot distil this model's logits") \
            from error


def _mapped_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the fused loss computes for `hidden`: bias, then scale, then softcap (at T = 1), in float32."""
    head = output_head(model)
    logits = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                        head.bias.float() if head.bias is not None else None)
    settings = head_settings(model)
    logits = logits * settings["logit_scale"]
    cap = settings["softcap"]
    return cap * torch.tanh(logits / cap) if cap is not None else logits
