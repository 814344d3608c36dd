"""The demo's cached teacher: the teacher's top-k log-probs over exactly the windows the students train on, stored
once with `build_teacher_cache`, and students that learn from them through `linear_sparse_distill_loss`, with no
teacher in memory and no teacher forward per step."""

from __future__ import annotations

from pathlib import Path

import torch

from kdfast.integrations.causal_lm import batch_sparse_distill_loss
from kdfast.sparse_options import SparseOptions
from kdfast.teacher_cache import build_teacher_cache
from kdfast.teacher_cache.fingerprints import digest, tensor_fingerprint, weights_checksum


def training_windows(batches, steps: int) -> torch.Tensor:
    """The first `steps` batches of `batches` stacked: [steps * batch, seq_len + 1], the windows every student sees."""
    return torch.cat([next(batches) for _ in range(steps)])


def cache_folder(cache_dir: Path, teacher, windows: torch.Tensor, method: str, k: int, temperature: float) -> Path:
    """One folder per teacher, windows, method, k and temperature: a rerun reuses it, another teacher never
    collides."""
    kind = "" if method == "top_k" else f"{method}-"
    key = digest(f"{weights_checksum(teacher)}-{tensor_fingerprint(windows)}-{kind}{k}-{temperature}")[:16]
    return cache_dir / ("teacher-cache-" + (f"k{k}" if method == "top_k" else f"samples{k}") + f"-{key}")


def build_caches(teacher, windows, tokenizer, kinds, temperature: float, cache_dir: Path, batch_size: int, console):
    """(method, k) -> TeacherCache over `windows` (built, finished or reused), for each of `kinds`."""
    caches = {}
    for method, k in kinds:
        console.print(f"teacher cache, {describe(method, k)} at T={temperature}:")
        folder = cache_folder(cache_dir, teacher, windows, method, k, temperature)
        caches[method, k] = build_teacher_cache(teacher, windows, folder, tokenizer=tokenizer, k=k, method=method,
                                                temperature=temperature, batch_size=batch_size,
                                                windows_per_shard=16 * batch_size, vocab_size=len(tokenizer),
                                                console=console)
    return caches


def describe(method: str, k: int) -> str:
    return f"top-{k}" if method == "top_k" else f"{k} samples"


def top_k_mass(cache, windows: int = 512) -> float:
    """The teacher's mean probability mass inside its stored ids, over the first `windows` windows: what a top-k
    cache keeps of the teacher."""
    batch = cache.batch(0, min(windows, len(cache)))
    return batch["teacher_logprobs"][:, 1:].exp().sum(-1).mean().item()


class CachedBatches:
    """The cache's windows in order, `batch_size` at a time: the same batches as `Batches` gave the other
    students, with their teacher targets."""

    def __init__(self, cache, batch_size: int):
        self.cache, self.batch_size, self.next_window = cache, batch_size, 0

    def __next__(self) -> dict:
        start = self.next_window
        if start + self.batch_size > len(self.cache):
            raise RuntimeError(f"the teacher cache holds {len(self.cache)} windows: fewer than the steps asked for")
        self.next_window += self.batch_size
        return self.cache.batch(start, start + self.batch_size)


def cached_distill_step(settings: dict, vocab: int, tail: str = "bucket"):
    """The loss of a student on a cached teacher: the fused sparse loss over its last hidden states."""
    options = SparseOptions(tail=tail, reduction="mean", vocab_size=vocab, **settings)

    def step(model, batch):
        inputs = {**batch, "labels": batch["input_ids"]}
        return batch_sparse_distill_loss(model, inputs, options)

    return step
