"""What every reader of another tool's sparse teacher does to a row: reads ids, values and masks from lists or
arrays (rows of unequal length filled out), names the column that is missing or malformed, checks ids against the
vocabulary, and places the rows at kdfast's positions (row j the teacher's distribution of token j; row 0 blank)."""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def require(example: dict, columns, where: str) -> None:
    missing = [name for name in columns if example.get(name) is None]
    if missing:
        raise ValueError(f"{where}: missing column {', '.join(missing)} (has {sorted(example)})")


def vector(value, column: str, where: str) -> torch.Tensor:
    ids = torch.from_numpy(np.array(_numpy(value), dtype=np.int64))  # a copy, from any ints (DistillKit's are uint64)
    if ids.dim() != 1:
        raise ValueError(f"{where}: {column} must be one id per token, got shape {tuple(ids.shape)}")
    return ids


def matrix(value, column: str, where: str, dtype: torch.dtype, fill) -> torch.Tensor:
    """[rows, K]; rows of different lengths (axolotl's collator pads them) are filled out with `fill`."""
    try:
        array = np.array(_numpy(value), dtype=np.float64 if dtype.is_floating_point else np.int64)  # a copy: writable
    except (ValueError, TypeError):  # ragged
        rows = [np.asarray(row if row is not None else [], dtype=np.float64).reshape(-1) for row in value]
        array = np.full((len(rows), max((row.size for row in rows), default=0)), fill, dtype=np.float64)
        for index, row in enumerate(rows):
            array[index, :row.size] = row
    if array.ndim != 2:
        raise ValueError(f"{where}: {column} must be [tokens, K] (one row of K per token), got shape {array.shape}")
    return torch.from_numpy(array).to(dtype)


def same_shape(reference: torch.Tensor, name: str, *others, where: str) -> None:
    for tensor, other in others:
        if tensor.shape != reference.shape:
            raise ValueError(f"{where}: {other} has shape {tuple(tensor.shape)} but {name} {tuple(reference.shape)}: "
                             "one value per id")


def check_ids(ids: torch.Tensor, valid: torch.Tensor, column: str, vocab_size: int | None, where: str) -> None:
    chosen = ids[valid]
    if chosen.numel() and int(chosen.min()) < 0:
        raise ValueError(f"{where}: {column} holds id {int(chosen.min())}, below 0")
    if vocab_size is not None and chosen.numel() and int(chosen.max()) >= vocab_size:
        raise ValueError(f"{where}: {column} holds id {int(chosen.max())}, past vocab_size {vocab_size}")


def placed(ids: torch.Tensor, logprobs: torch.Tensor, length: int, shift: int):
    """Source rows [T, K] (-1 / 0 at padding) put at kdfast rows shift, shift + 1, ...: (ids [length, K], log-probs,
    rows dropped: those with targets that land on row 0, which nothing predicts, or past the last token)."""
    teacher_ids = torch.full((length, ids.shape[1]), -1, dtype=torch.int64)
    teacher_logprobs = torch.zeros(length, ids.shape[1])
    kept = max(min(ids.shape[0], length - shift), 0)
    teacher_ids[shift:shift + kept], teacher_logprobs[shift:shift + kept] = ids[:kept], logprobs[:kept]
    dropped = int((ids[kept:] >= 0).any(-1).sum()) + int(bool((teacher_ids[0] >= 0).any()))
    teacher_ids[0], teacher_logprobs[0] = -1, 0.0
    return teacher_ids, teacher_logprobs, dropped


def kdfast_rows(example: dict, input_ids, teacher_ids, teacher_logprobs, where: str) -> dict:
    """kdfast's columns, and the example's labels when it has them (they stay aligned with the tokens)."""
    rows = {"input_ids": input_ids, "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs}
    if example.get("labels") is not None:
        labels = vector(example["labels"], "labels", where)
        if labels.numel() != input_ids.numel():
            raise ValueError(f"{where}: labels has {labels.numel()} entries for {input_ids.numel()} input_ids")
        rows["labels"] = labels
    return rows


def _numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
