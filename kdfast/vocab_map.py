"""Which tokens two vocabularies share: `VocabMap`, the exact token-string matches of a student's and a teacher's
tokenizers (their `get_vocab()`, no normalisation, as TRL's GOLD matches them), kept with both tokenizers'
fingerprints so that a map is never used with tokenizers it was not built from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "kdfast-vocab-map/1"


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary (token string -> id, added tokens included)."""
    vocab = sorted(_vocab(tokenizer).items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _vocab(tokenizer) -> dict:
    if not hasattr(tokenizer, "get_vocab"):
        raise ValueError(f"a tokenizer with get_vocab() is needed, got {type(tokenizer).__name__}")
    return dict(tokenizer.get_vocab())


@dataclass(frozen=True)
class VocabMap:
    """student_ids[k] and teacher_ids[k] are one token string (int64 tensors [K], student ids ascending where
    `from_tokenizers` or `load` builds it; any order works); student_size / teacher_size the vocabularies' sizes
    (their largest id + 1). A map built by hand is checked as one from tokenizers would be: each id once a side."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int
    teacher_size: int
    student_fingerprint: str = ""
    teacher_fingerprint: str = ""

    def __post_init__(self):
        for name, ids in (("student_ids", self.student_ids), ("teacher_ids", self.teacher_ids)):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.int64:
                raise ValueError(f"VocabMap.{name} must be an int64 tensor [K] of token ids, got "
                                 f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        if self.student_ids.shape != self.teacher_ids.shape:
            raise ValueError(f"VocabMap.student_ids {tuple(self.student_ids.shape)} and teacher_ids "
                             f"{tuple(self.teacher_ids.shape)} must pair up: one matched token each")
        if self.student_ids.device.type != "cpu":
            return  # moved by `to()` from a map checked on the CPU; reading values on a GPU would be a sync
        # Two student tokens on one teacher token would count its probability twice, and the other way round.
        for name, ids, size in (("student_ids", self.student_ids, self.student_size),
                                ("teacher_ids", self.teacher_ids, self.teacher_size)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                raise ValueError(f"VocabMap.{name} must lie in [0, {size}) (the vocabulary's size), got ids from "
                                 f"{int(ids.min())} to {int(ids.max())}")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"VocabMap.{name} must hold each token id once (an exact token-string match is "
                                 f"one to one); {ids.numel() - ids.unique().numel()} repeated")

    @classmethod
    def from_tokenizers(cls, student_tokenizer, teacher_tokenizer) -> VocabMap:
        student, teacher = _vocab(student_tokenizer), _vocab(teacher_tokenizer)
        pairs = sorted((student_id, teacher[token]) for token, student_id in student.items() if token in teacher)
        ids = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        return cls(ids[:, 0].contiguous(), ids[:, 1].contiguous(), max(student.values()) + 1,
                   max(teacher.values()) + 1, tokenizer_fingerprint(student_tokenizer),
                   tokenizer_fingerprint(teacher_tokenizer))

    @classmethod
    def of_checked_ids(cls, student_ids, teacher_ids, student_size: int, teacher_size: int) -> VocabMap:
        """A map of ids a VocabMap held already (checked when it was built): a custom op's tensors, whose map is made
        again on every call without sorting its ids again."""
        vocab_map = object.__new__(cls)
        for name, value in (("student_ids", student_ids), ("teacher_ids", teacher_ids),
                            ("student_size", student_size), ("teacher_size", teacher_size),
                            ("student_fingerprint", ""), ("teacher_fingerprint", "")):
            object.__setattr__(vocab_map, name, value)
        return vocab_map

    @property
    def matched(self) -> int:
        return self.student_ids.numel()

    def __repr__(self) -> str:
        return (f"VocabMap({self.matched} tokens matched: {self.matched / max(self.student_size, 1):.1%} of the "
                f"student's {self.student_size}, {self.matched / max(self.teacher_size, 1):.1%} of the teacher's "
                f"{self.teacher_size})")

    def check_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        """A ValueError unless the map was built from these two tokenizers."""
        for name, tokenizer, expected in (("student_tokenizer", student_tokenizer, self.student_fingerprint),
                                          ("teacher_tokenizer", teacher_tokenizer, self.teacher_fingerprint)):
            if expected and tokenizer_fingerprint(tokenizer) != expected:
                raise ValueError(f"{name} is not the tokenizer this vocab_map was built from (fingerprint "
                                 f"{tokenizer_fingerprint(tokenizer)}, the map's {expected}): rebuild it with "
                                 "VocabMap.from_tokenizers")

    def check_logits(self, student_vocab: int, teacher_vocab: int, names=("student_logits", "teacher_logits")) -> None:
        """A ValueError unless every matched id is a column of logits (or a row of heads: `names`) of these widths."""
        for name, ids, width in zip(names, (self.student_ids, self.teacher_ids), (student_vocab, teacher_vocab)):
            if ids.numel() and int(ids.max()) >= width:
                raise ValueError(f"vocab_map matches token id {int(ids.max())} but {name} has a vocabulary of "
                                 f"{width}: the map was built from another tokenizer")

    def to(self, device) -> VocabMap:
        if self.student_ids.device == torch.device(device) and self.teacher_ids.device == torch.device(device):
            return self
        return VocabMap(self.student_ids.to(device), self.teacher_ids.to(device), self.student_size,
                        self.teacher_size, self.student_fingerprint, self.teacher_fingerprint)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({
            "format": FORMAT, "student_size": self.student_size, "teacher_size": self.teacher_size,
            "student_fingerprint": self.student_fingerprint, "teacher_fingerprint": self.teacher_fingerprint,
            "student_ids": self.student_ids.tolist(), "teacher_ids": self.teacher_ids.tolist()}))

    @classmethod
    def load(cls, path) -> VocabMap:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kdfast vocabulary map ({FORMAT})")
        return cls(torch.tensor(data["student_ids"], dtype=torch.int64),
                   torch.tensor(data["teacher_ids"], dtype=torch.int64), data["student_size"], data["teacher_size"],
                   data["student_fingerprint"], data["teacher_fingerprint"])
