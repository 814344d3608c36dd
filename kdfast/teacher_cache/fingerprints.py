"""Fingerprints that tie a teacher cache to what produced it: the teacher's config and weights, the tokenizer, the
token windows, and each shard's bytes. A cache is only valid for the exact tokenizer and windows it was made on."""

from __future__ import annotations

import hashlib
import json

import torch

# Parts of a fast tokenizer's serialised form that are call state, not the tokenizer: a call with truncation=True
# changes them.
_TOKENIZER_STATE_KEYS = ("truncation", "padding")
# The weights' checksum sums int64 blocks of bytes: at most 255 * 65521 * 2**24 < 2**63 per block.
_CHECKSUM_BLOCK_BYTES, _CHECKSUM_MODULUS = 1 << 24, 65521


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
    """Per parameter its name, shape, dtype and two integer sums of its bytes, plain and weighted by position. Integer
    sums are exact in any order, so the checksum is the same on any device and thread count (float sums are not: their
    last digits follow the reduction's order, and a cache resumed with other threads looked like another teacher's).
    Summed on the model's own device, a block at a time, so a teacher on a GPU is neither copied nor doubled."""
    parts = []
    for name, tensor in model.state_dict().items():
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        plain = weighted = 0
        for start in range(0, data.numel(), _CHECKSUM_BLOCK_BYTES):
            block = data[start:start + _CHECKSUM_BLOCK_BYTES].to(torch.int64)
            position = torch.arange(start, start + block.numel(), device=block.device) % _CHECKSUM_MODULUS + 1
            plain += int(block.sum())
            weighted += int((block * position).sum())
        parts.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{plain}:{weighted}")
    return digest("\n".join(parts))[:16]


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    return digest(tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())[:16]
