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


def cache_folder(cache_dir: Path, teacher, windows: torch.Tensor, k: int, temperature: float) -> Path:
    """One folder per teacher, windows, k and temperature: a rerun reuses it, another teacher never collides."""
    key = digest(f"{weights_checksum(teacher)}-{tensor_fingerprint(windows)}-{k}-{temperature}")[:16]
    return cache_dir / f"teacher-cache-k{k}-{key}"


def build_caches(teacher, windows, tokenizer, ks, temperature: float, cache_dir: Path, batch_size: int, console):
    """k -> TeacherCache over `windows` (built, finished or reused)."""
    caches = {}
    for k in ks:
        console.print(f"teacher cache, top-{k} at T={temperature}:")
        caches[k] = build_teacher_cache(teacher, windows, cache_folder(cache_dir, teacher, windows, k, temperature),
                                        tokenizer=tokenizer, k=k, temperature=temperature, batch_size=batch_size,
                                        windows_per_shard=16 * batch_size, vocab_size=len(tokenizer),
                                        console=console)
    return caches


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
    options = SparseOptions(tail=tail, reduction="mean", **settings)

    def step(model, batch):
        inputs = {**batch, "labels": batch["input_ids"]}
        return batch_sparse_distill_loss(model, inputs, options, vocab_size=vocab)

    return step
