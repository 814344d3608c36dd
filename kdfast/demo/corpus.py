"""The demo's data: by default the Python standard library's own source files (on every machine with Python),
or a text file given on the command line; a byte-level BPE tokenizer trained on the training split (or a
checkpoint's own tokenizer); both splits encoded into flat token streams."""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

HELD_OUT_EVERY = 20  # every 20th file (or the last 5% of a text file) is held out
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
EOS = "<|endoftext|>"


@dataclass
class Corpus:
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    train: torch.Tensor  # int64 token ids, one stream
    held_out: torch.Tensor
    fingerprint: str  # content hash of the text and tokenizer settings: part of the teacher's cache key
    description: str


def stdlib_documents() -> tuple[list[str], list[str], str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1]))
    if not files:
        raise SystemExit(f"no Python sources under {root}: pass --data FILE")
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    train = [text for index, text in enumerate(texts) if index % HELD_OUT_EVERY]
    held_out = texts[::HELD_OUT_EVERY]
    return train, held_out, (f"Python {sys.version.split()[0]} standard library: {len(train)} training files, "
                             f"{len(held_out)} held out")


def file_documents(path: Path) -> tuple[list[str], list[str], str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    cut = int(len(text) * (1 - 1 / HELD_OUT_EVERY))
    if cut == 0 or cut == len(text):
        raise SystemExit(f"--data {path}: too short to split into training and held-out text")
    return [text[:cut]], [text[cut:]], f"{path.name}: {len(text) / 1e6:.1f} M characters, last 5% held out"


# The other tokenizer of `kdfast distill --cross-tokenizer`'s students. A smaller BPE of the same text and rules would
# be a prefix of the teacher's (every student token a teacher token, no teacher token split); this one is trained on
# every other training document (other counts, so other merges) with each digit a token of its own (as Llama 3's
# and Qwen's tokenizers split numbers, GPT-2's not), so that the vocabularies share part of their tokens and each
# side's tokens are merged against the other's, as between two real models' tokenizers.
OTHER_TOKENIZER = "other"


def train_tokenizer(texts: list[str], vocab_size: int, split_digits: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream: each document followed by the end-of-text token."""
    ids = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def load_corpus(data: Path | None, vocab_size: int, tokenizer_dir: Path | None, cache_dir: Path,
                style: str = "") -> Corpus:
    """The tokenizer comes from `tokenizer_dir` (a checkpoint's), else from the cache, else it is trained and
    cached: a cached teacher is only valid with the exact tokenizer it was trained with. `style` OTHER_TOKENIZER:
    the cross-tokenizer students' BPE (see there), else the default run's."""
    train_texts, held_out_texts, description = file_documents(data) if data else stdlib_documents()
    digest = hashlib.sha256()
    for text in train_texts + held_out_texts:
        digest.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        digest.update(str(Path(tokenizer_dir).resolve()).encode())
    else:
        digest.update(f"bpe-{vocab_size}{'-' + style if style else ''}".encode())
        tokenizer_path = cache_dir / f"tokenizer-{digest.hexdigest()[:16]}"
        if (tokenizer_path / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
        else:
            other = style == OTHER_TOKENIZER
            tokenizer = train_tokenizer(train_texts[::2] if other else train_texts, vocab_size, split_digits=other)
            tokenizer.save_pretrained(tokenizer_path)
    if tokenizer.eos_token_id is None:
        raise SystemExit("the tokenizer has no end-of-text token (eos_token): documents could not be separated")
    return Corpus(tokenizer, encode(tokenizer, train_texts), encode(tokenizer, held_out_texts),
                  digest.hexdigest()[:16], description)
