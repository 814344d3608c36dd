"""The demo's models: LLaMA-style configurations for the teacher and the students, checkpoints from disk, and the
teacher's cache (trained once, keyed by everything that shapes it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int

    def config(self, vocab_size: int, seq_len: int):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           intermediate_size=self.hidden * 8 // 3 // 8 * 8, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=seq_len + 1,
                           tie_word_embeddings=False)


TEACHER_SIZE = ModelSize(hidden=256, layers=4, heads=4)
STUDENT_SIZE = ModelSize(hidden=128, layers=2, heads=4)


def new_model(size: ModelSize, vocab_size: int, seq_len: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(size.config(vocab_size, seq_len))


def load_checkpoint(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher_cache_path(cache_dir: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir / f"teacher-{key}"


def cached_teacher(path: Path):
    """(model, its training record) when `path` holds a finished teacher, else None."""
    record = path / "kdfast_teacher.json"
    if not record.exists():
        return None
    return load_checkpoint(path), json.loads(record.read_text())


def save_teacher(model, path: Path, settings: dict, record: dict):
    model.save_pretrained(path)
    # Written last: a run killed mid-save leaves no record, so the teacher is trained again.
    (path / "kdfast_teacher.json").write_text(json.dumps({"settings": settings, **record}, indent=2,
                                                         default=str))


def size_settings(size: ModelSize) -> dict:
    return asdict(size)
