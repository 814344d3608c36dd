"""Fingerprints that tie a teacher cache to what produced it: the teacher's config and weights, the tokenizer, the
token windows, and each shard's bytes. A cache is only valid for the exact tokenizer and windows it was made on."""

from __future__ import annotations

import hashlib
import json

import torch

# Parts of a fast tokenizer's serialised form that are call state, not the tokenizer: a call with truncation=True
# changes them.
_TOKENIZER_STATE_KEYS = ("truncation", "padding")


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The same for two tokenizers that map every text to the same ids: a fast tokenizer's model, normaliser,
    pre-tokeniser and added tokens; otherwise its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {key: value for key, value in json.loads(backend.to_str()).items() if key not in _TOKENIZER_STATE_KEYS}
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items()),
                "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))}
    return digest(json.dumps(spec, sort_keys=True))[:16]


def config_fingerprint(config) -> str:
    """The model's architecture and settings, without what changes on a mere save or load."""
    spec = {key: value for key, value in config.to_dict().items()
            if key not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    return digest(json.dumps(spec, sort_keys=True, default=str))[:16]


@torch.no_grad()
def weights_checksum(model) -> str:
    """Per parameter its name, shape, dtype, sum and sum of squares (float64, on the model's own device, so a
    teacher on a GPU is not copied to the host): any retraining or another checkpoint changes it."""
    parts = []
    for name, tensor in model.state_dict().items():
        values = tensor.detach().double() if tensor.is_floating_point() else tensor.detach().to(torch.float64)
        parts.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{values.sum().item():.17g}:"
                     f"{values.square().sum().item():.17g}")
    return digest("\n".join(parts))[:16]


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    return digest(tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())[:16]
