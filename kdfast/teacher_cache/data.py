"""Token windows for a teacher cache: a text file (tokenised with the teacher's tokenizer) or token ids already made
(a .pt or .npy tensor, or a folder saved by `datasets` with an `input_ids` column), cut into windows of
`window_tokens` that overlap by one token, so that every token after the first is predicted exactly once."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_BLOCK_CHARS = 1 << 20  # tokenised a block of lines at a time, so a large file never sits in memory twice


def text_tokens(path: Path, tokenizer) -> torch.Tensor:
    ids: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        while True:
            block = handle.read(TEXT_BLOCK_CHARS)
            if not block:
                break
            block += handle.readline()  # end the block at a line break: no word is cut in two
            ids.extend(tokenizer(block, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


def stored_tokens(path: Path) -> torch.Tensor:
    """A 1-D stream or 2-D windows of token ids from .pt / .npy, or a `datasets` folder's rows, concatenated."""
    if path.is_dir():
        import datasets

        rows = datasets.load_from_disk(str(path))
        if "input_ids" not in rows.column_names:
            raise ValueError(f"{path}: the dataset has no input_ids column (columns: {rows.column_names})")
        return torch.tensor([token for row in rows["input_ids"] for token in row], dtype=torch.int64)
    if path.suffix == ".npy":
        import numpy

        tokens = torch.from_numpy(numpy.load(path))
    elif path.suffix == ".pt":
        tokens = torch.load(path, weights_only=True)
    else:
        raise ValueError(f"{path}: token ids must be a .pt or .npy file or a datasets folder")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2) or tokens.dtype.is_floating_point:
        raise ValueError(f"{path} must hold an integer tensor of token ids, 1-D (a stream) or 2-D (windows)")
    return tokens.to(torch.int64)


def token_windows(tokens: torch.Tensor, window_tokens: int, max_windows: int | None = None) -> torch.Tensor:
    """[num_windows, window_tokens]: a 2-D input as it is, a stream cut with a one-token overlap (the tail that does
    not fill a window is left out)."""
    if tokens.dim() == 1:
        if window_tokens < 2:
            raise ValueError(f"windows need at least 2 tokens, got {window_tokens}")
        if tokens.numel() < window_tokens:
            raise ValueError(f"{tokens.numel()} tokens do not fill one window of {window_tokens}")
        tokens = tokens.unfold(0, window_tokens, window_tokens - 1)
    return tokens[:max_windows].contiguous() if max_windows else tokens.contiguous()
