"""Batches of examples that carry a sparse teacher: `teacher_ids` / `teacher_logprobs` rows aligned with the tokens
(row j: the teacher's distribution of token j; a row for the first token may be left out, as inference servers leave
it out of their prompt log-probs) are padded and shifted exactly as the labels are. Examples with axolotl's columns
(target_token_ids / target_logprobs / target_mask) or DistillKit's raw ones (token_ids / top_values) are read as
kdfast's first (`peer_formats`)."""

from __future__ import annotations

import torch

from kdfast.teacher_cache.peer_formats import as_kdfast_example

IGNORE_INDEX = -100


def _rows(example: dict, name: str, tokens: int, index: int) -> torch.Tensor:
    rows = torch.as_tensor(example[name])
    if rows.dim() != 2:
        raise ValueError(f"example {index}: {name} must be [tokens, K] (one row of K per token), got shape "
                         f"{tuple(rows.shape)}")
    if rows.shape[0] == tokens - 1:  # no row for the first token: nothing predicts it
        rows = torch.cat([torch.full_like(rows[:1], -1 if name == "teacher_ids" else 0), rows])
    if rows.shape[0] != tokens:
        raise ValueError(f"example {index}: {name} has {rows.shape[0]} rows for {tokens} input_ids; it needs one row "
                         "per token (or per token after the first)")
    return rows


class SparseTeacherCollator:
    """examples -> a batch of `input_ids` (padded with `pad_token_id`), `attention_mask`, `labels` (the example's, or
    its input_ids; -100 at padding), `teacher_ids` [B, S, K] (-1 at padding) and `teacher_logprobs` [B, S, K]
    (float32, 0 at padding). Examples may differ in length and in K, and carry kdfast's columns or a peer's.
    `with_teacher=False`: examples of tokens only, whose teacher a server answers per batch afterwards (the batch then
    has no teacher columns)."""

    def __init__(self, pad_token_id: int = 0, with_teacher: bool = True):
        self.pad_token_id, self.with_teacher = pad_token_id, with_teacher

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("no examples to collate")
        if not self.with_teacher:  # rows of no targets, padded and shifted as any (then dropped)
            no_targets = [{**example, "teacher_ids": torch.empty(len(example["input_ids"]), 0, dtype=torch.int64),
                           "teacher_logprobs": torch.empty(len(example["input_ids"]), 0)} for example in examples]
            batch = SparseTeacherCollator(self.pad_token_id)(no_targets)
            return {name: value for name, value in batch.items() if name not in ("teacher_ids", "teacher_logprobs")}
        examples = [as_kdfast_example(example, f"example {index}") for index, example in enumerate(examples)]
        missing = {"input_ids", "teacher_ids", "teacher_logprobs"} - set(examples[0])
        if missing:
            raise ValueError(f"examples need input_ids, teacher_ids and teacher_logprobs; missing {sorted(missing)}")
        tokens = [torch.as_tensor(example["input_ids"], dtype=torch.int64) for example in examples]
        length, width = max(t.numel() for t in tokens), 0
        rows = []
        for index, (example, ids) in enumerate(zip(examples, tokens)):
            teacher_ids = _rows(example, "teacher_ids", ids.numel(), index)
            teacher_logprobs = _rows(example, "teacher_logprobs", ids.numel(), index)
            if teacher_ids.shape != teacher_logprobs.shape:
                raise ValueError(f"example {index}: teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                                 f"{tuple(teacher_logprobs.shape)} differ in shape")
            rows.append((teacher_ids, teacher_logprobs))
            width = max(width, teacher_ids.shape[1])
        batch = {"input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.int64),
                 "attention_mask": torch.zeros(len(examples), length, dtype=torch.int64),
                 "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64),
                 "teacher_ids": torch.full((len(examples), length, width), -1, dtype=torch.int64),
                 "teacher_logprobs": torch.zeros(len(examples), length, width)}
        for index, (example, ids, (teacher_ids, teacher_logprobs)) in enumerate(zip(examples, tokens, rows)):
            size, k = ids.numel(), teacher_ids.shape[1]
            labels = torch.as_tensor(example["labels"], dtype=torch.int64) if "labels" in example else ids
            batch["input_ids"][index, :size] = ids
            batch["attention_mask"][index, :size] = 1
            batch["labels"][index, :size] = labels
            batch["teacher_ids"][index, :size, :k] = teacher_ids
            batch["teacher_logprobs"][index, :size, :k] = teacher_logprobs
        return batch
