"""Where a cache's targets come from: a causal LM in this process (`ModelTeacher`) or one behind an inference server
(`ServerTeacher`, over `served.ServedTeacher`). The writer asks each the same things: who the teacher is (for the
cache's settings), which settings it can honour, and a shard's targets, [W, L - 1, k] ids and float32 log-probs, row
j the teacher's distribution of token j + 1 given tokens 0..j."""

from __future__ import annotations

import torch

from kdfast.teacher_cache import fingerprints
from kdfast.teacher_cache.targets import sampled_targets, top_k_targets

SERVED_WEIGHTS = "served"  # a server does not show its weights: its model name stands for them


class ModelTeacher:
    def __init__(self, model, batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model, self.batch_size = model.eval(), batch_size
        self.head_rows = model.get_output_embeddings().weight.shape[0]
        self.origin = {"source": "model"}

    def identity(self, teacher_name=None) -> dict:
        config = self.model.config
        return {"teacher": str(teacher_name or getattr(config, "_name_or_path", "") or type(self.model).__name__),
                "teacher_config": fingerprints.config_fingerprint(config),
                "teacher_weights": fingerprints.weights_checksum(self.model)}

    def check(self, method: str, temperature: float) -> None:
        """A model in this process honours every method and temperature."""

    @torch.no_grad()
    def shard_targets(self, windows: torch.Tensor, settings, index: int, on_tokens) -> tuple[torch.Tensor, ...]:
        device = self.model.get_output_embeddings().weight.device
        generator = None
        if settings.method == "sample":  # seeded per shard: a recomputed shard draws the same samples
            generator = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + index)
        ids, logprobs = [], []
        for batch in windows.split(self.batch_size):
            logits = self.model(input_ids=batch.to(device), use_cache=False).logits[:, :-1, :settings.vocab_size]
            if settings.method == "top_k":
                batch_ids, batch_logprobs = top_k_targets(logits, settings.k, settings.temperature)
            else:
                batch_ids, batch_logprobs = sampled_targets(logits, settings.k, settings.temperature, generator)
            ids.append(batch_ids.cpu())
            logprobs.append(batch_logprobs.cpu())
            on_tokens(batch.numel() - batch.shape[0])
        return torch.cat(ids), torch.cat(logprobs)


class ServerTeacher:
    """A teacher behind vLLM's or SGLang's server: its top-k prompt log-probs of the raw model (T = 1)."""

    head_rows = None  # unknown: the tokenizer's length bounds the ids, and each answer is checked against it

    def __init__(self, served):
        self.served = served
        self.origin = {"source": "server", "server": served.url, "api": served.api, "model": served.model_name}

    def identity(self, teacher_name=None) -> dict:
        return {"teacher": str(teacher_name or self.served.model_name),
                "teacher_config": fingerprints.digest(f"{self.served.api}:{self.served.model_name}")[:16],
                "teacher_weights": SERVED_WEIGHTS}

    def check(self, method: str, temperature: float) -> None:
        if method != "top_k":
            raise ValueError(f"method={method!r}: a served teacher gives its top-k prompt log-probs only; sampling "
                             "needs the teacher in this process (--teacher)")
        if temperature != 1.0:
            raise ValueError(f"temperature={temperature}: inference servers return the raw model's log-probs, so a "
                             "served cache holds them at temperature 1; keep temperature=1 and let the loss re-temper "
                             "them (tail='renormalize' with teacher_temperature=1)")

    def shard_targets(self, windows: torch.Tensor, settings, index: int, on_tokens) -> tuple[torch.Tensor, ...]:
        ids, logprobs = self.served.window_targets(windows, settings.k, on_window=on_tokens)
        if ids.numel() and int(ids.max()) >= settings.vocab_size:
            raise ValueError(f"the server {self.served.url} returned token id {int(ids.max())}, outside the "
                             f"vocabulary [0, {settings.vocab_size}) of the tokenizer: is it serving a model with "
                             "this tokenizer? (or pass vocab_size)")
        return ids, logprobs


def teacher_source(teacher, batch_size: int):
    """A source for `teacher`: a `ServedTeacher`, or a causal LM (in eval mode, on its device)."""
    if callable(getattr(teacher, "window_targets", None)):  # a ServedTeacher, without importing its HTTP client
        return ServerTeacher(teacher)
    if not callable(getattr(teacher, "get_output_embeddings", None)):
        raise ValueError(f"teacher must be a causal LM (with get_output_embeddings) or a ServedTeacher, got "
                         f"{type(teacher).__name__}")
    return ModelTeacher(teacher, batch_size)
