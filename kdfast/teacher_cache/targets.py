"""What a teacher cache stores per token, computed from the teacher's logits: its top-k next-token ids and
log-probabilities at a temperature, or the distinct ids of n samples from that distribution with log(count / n)."""

from __future__ import annotations

import torch

METHODS = ("top_k", "sample")


def top_k_targets(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [..., k] (most probable first) and their log-probabilities [..., k] (float32) under softmax(logits / T)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def sampled_targets(logits: torch.Tensor, samples: int, temperature: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n = `samples` draws per row from softmax(logits / T): ids [..., n] (the distinct ids drawn, ascending, then -1
    padding) and log(count / n) there (0 at padding). With tail="renormalize" these are the unbiased sampled
    estimator of the forward KL (random-sampling KD)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    probs = torch.softmax(logits.float().reshape(-1, vocab) / temperature, dim=-1)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator).sort(dim=-1).values
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = is_new.cumsum(-1) - 1  # each distinct id's place among the row's distinct ids
    ids = torch.full_like(draws, -1).scatter_(-1, slot, draws)  # repeats write the same id to the same slot
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    logprobs = torch.where(counts > 0, (counts.float() / samples).clamp_min(1e-30).log(), torch.zeros(()))
    return ids.reshape(*lead, samples), logprobs.reshape(*lead, samples)
