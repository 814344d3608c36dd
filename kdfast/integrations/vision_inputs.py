"""A vision-language batch's images, and the part of a vision-language model that takes them: the trainers distil
such models from the hidden states their multimodal backbone computes with the images merged in, as TRL's
`DistillationTrainer` does, where `get_decoder()` (the text stack alone) would read the image placeholders as text."""

from __future__ import annotations

import inspect

# The inputs TRL's `_get_last_hidden_state` passes on to a vision-language model's backbone.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
# What only images bring (token_type_ids also come with some text tokenizers' batches).
IMAGE_KEYS = tuple(key for key in MULTIMODAL_KEYS if "token_type" not in key)


def image_inputs(inputs) -> dict:
    """The batch's multimodal inputs (those of MULTIMODAL_KEYS it holds, not None) where it holds images, else {}: a
    text batch's token_type_ids stay out, as they do today for text models."""
    if not any(inputs.get(key) is not None for key in IMAGE_KEYS):
        return {}
    return {key: inputs[key] for key in MULTIMODAL_KEYS if inputs.get(key) is not None}


def vision_backbone(model, images: dict):
    """The module whose forward takes `images` (with whatever else the batch gives every model) and the input ids and
    returns the last hidden states before the LM head: transformers' `base_model` (the multimodal wrapper of a
    vision-language model; a PEFT model's underlying one), or `.model` where a pre-5.0 vision-language model's base
    model is itself. A model that does not take the batch's image inputs by name is refused: a text model would drop
    them into its **kwargs unseen."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = inner.base_model
    if backbone is inner:
        backbone = getattr(inner, "model", inner)
    accepted = inspect.signature(backbone.forward).parameters
    missing = sorted(key for key in images if key in MULTIMODAL_KEYS and key not in accepted)
    if missing:
        raise ValueError(f"the batch holds images but {type(inner).__name__}'s backbone {type(backbone).__name__} "
                         f"takes no {missing}: it would not see them; every model distilled on a vision-language "
                         f"batch (the student and each teacher) must be a vision-language model")
    return backbone
