"""axolotl's sparse teacher (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/) read as kdfast rows and written
from them: columns `target_token_ids`, `target_logprobs`, `target_mask`, one row per token.

- Which token a row describes: the trainer (trainer.py, kernels/liger.py) scores row t against the hidden state at t,
  which predicts token t + 1, and shifts only the labels; the online collator (collator_online_teacher.py) builds its
  rows so, dropping vLLM's null first prompt_logprobs entry and padding one row at the end. So axolotl row t is kdfast
  row t + 1 (rows="next"). Its dataset strategy (chat_template.py, transform_logprobs) right-aligns the logprob lists
  with the tokens instead, as written for its first KD trainer, which compared logits[:, :-1] with targets[:, 1:]:
  datasets made for that trainer are read with rows="same" (axolotl row t is kdfast row t).
- Padding: target_mask 0 marks it. The dataset strategy writes -inf log-probs and ids range(K) for whole padding rows,
  the collator -1e9 and id 0 for short rows; written here id 0, -1e9 (JSON has no -inf), mask 0.
- Values: its loss (kernels/liger.py, beta 0) is T² · sum over valid entries of p (log p - log q_T), q the student's
  full softmax at kd_temperature, over num_items_in_batch (trainer.py counts labels != -100 when not given), so
  target_logprobs are taken as the teacher's log-probabilities at kd_temperature, summing to 1 over the row. The
  dataset strategy renormalises each row over its top-k and re-tempers it (p^(T_gen / T_kd), renormalised); the
  online collator renormalises when kd_normalize_topk. Written here the same (normalize=True). Read back, they are
  kept as stored; kdfast's tail="renormalize" renormalises (and re-tempers with teacher_temperature) in the loss.
- The mask also drops rows whose label is -100 (the strategy reads the label at the row's own position); written here
  from the label of the token the row predicts, the row kdfast's loss keeps.
- Its raw dataset field (`logprobs_field`, default "logprobs"): per position a list of {"token": "token_id:N",
  "logprob": x} at the generation temperature, right-aligned with input_ids, each the distribution of the token at its
  position (read by `read_legacy_example`)."""

from __future__ import annotations

import math
from collections import Counter

import torch

from kdfast.teacher_cache.peer_rows import (
    IGNORE_INDEX,
    check_ids,
    kdfast_rows,
    matrix,
    placed,
    require,
    same_shape,
    vector,
)

COLUMNS = ("target_token_ids", "target_logprobs", "target_mask")
ROWS = ("next", "same")
PAD_LOGPROB = -1e9  # axolotl's collator's padding (finite: JSON cannot hold -inf)
LEGACY_COLUMN = "logprobs"  # the dataset strategy's default logprobs_field


def read_example(example: dict, *, rows: str = "next", vocab_size: int | None = None,
                 where: str = "example") -> tuple[dict, int]:
    """(kdfast rows, rows dropped) of an example with axolotl's columns; a row is dropped when it holds targets but
    describes a token outside the example."""
    _check_rows(rows)
    require(example, ("input_ids", *COLUMNS), where)
    input_ids = vector(example["input_ids"], "input_ids", where)
    ids = matrix(example["target_token_ids"], "target_token_ids", where, torch.int64, 0)
    logprobs = matrix(example["target_logprobs"], "target_logprobs", where, torch.float32, -math.inf)
    mask = matrix(example["target_mask"], "target_mask", where, torch.int64, 0)
    same_shape(ids, "target_token_ids", (logprobs, "target_logprobs"), (mask, "target_mask"), where=where)
    if ids.shape[0] > input_ids.numel():
        raise ValueError(f"{where}: target_token_ids has {ids.shape[0]} rows for {input_ids.numel()} input_ids")
    if bool((logprobs.isnan() & (mask != 0)).any()):
        raise ValueError(f"{where}: target_logprobs holds NaN where target_mask marks the entry valid")
    valid = (mask != 0) & (logprobs > -math.inf)  # a valid entry at -inf has no mass: padding
    check_ids(ids, valid, "target_token_ids", vocab_size, where)
    teacher_ids, teacher_logprobs, dropped = placed(torch.where(valid, ids, -1), torch.where(valid, logprobs, 0.0),
                                                    input_ids.numel(), 1 if rows == "next" else 0)
    return kdfast_rows(example, input_ids, teacher_ids, teacher_logprobs, where), dropped


def write_example(input_ids, teacher_ids, teacher_logprobs, labels=None, *, rows: str = "next",
                  normalize: bool = True, scale: float = 1.0) -> dict:
    """A kdfast example as axolotl's columns (and `input_ids`, `labels`, `attention_mask`, which its trainer needs).
    `normalize`: each row's log-probs times `scale` (T_stored / kd_temperature re-tempers) renormalised over its valid
    entries, as axolotl's loss expects; else stored as they are (then `scale` must be 1)."""
    _check_rows(rows)
    if not normalize and scale != 1.0:
        raise ValueError("re-tempering (scale != 1) renormalises the rows: pass normalize=True")
    input_ids = torch.as_tensor(input_ids, dtype=torch.int64)
    ids, logprobs = torch.as_tensor(teacher_ids, dtype=torch.int64), torch.as_tensor(teacher_logprobs).float()
    labels = input_ids if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    valid = (ids >= 0) & (labels != IGNORE_INDEX).unsqueeze(-1)  # a row counts where kdfast's loss keeps its label
    shift, length = (1 if rows == "next" else 0), input_ids.numel()
    out_valid = torch.zeros_like(valid)
    out_ids, out_logprobs = torch.zeros_like(ids), torch.zeros_like(logprobs)
    out_valid[:length - shift], out_ids[:length - shift] = valid[shift:], torch.where(valid, ids, 0)[shift:]
    out_logprobs[:length - shift] = logprobs[shift:]
    if normalize:
        scaled = torch.where(out_valid, out_logprobs.double() * scale, -math.inf)
        total = torch.logsumexp(scaled, -1, keepdim=True)
        out_logprobs = (scaled - torch.where(torch.isinf(total), 0.0, total)).float()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "target_token_ids": out_ids, "target_logprobs": torch.where(out_valid, out_logprobs, PAD_LOGPROB),
            "target_mask": out_valid.to(torch.int64)}


def read_legacy_example(example: dict, k: int, *, column: str = LEGACY_COLUMN, vocab_size: int | None = None,
                        where: str = "example") -> tuple[dict, int]:
    """(kdfast rows, rows dropped) of an example with input_ids and axolotl's raw per-position lists (tokens as
    'token_id:N', as vLLM writes them with return_tokens_as_token_ids), each cut to its first k entries, as axolotl's
    strategy cuts them to one width."""
    require(example, ("input_ids", column), where)
    input_ids = vector(example["input_ids"], "input_ids", where)
    positions = example[column]
    if len(positions) > input_ids.numel():
        raise ValueError(f"{where}: {column} has {len(positions)} positions for {input_ids.numel()} input_ids")
    ids, logprobs = torch.full((len(positions), k), -1, dtype=torch.int64), torch.zeros(len(positions), k)
    for row, entries in enumerate(positions):
        for slot, entry in enumerate((entries or [])[:k]):
            ids[row, slot] = _legacy_token(entry, f"{where}: {column}[{row}][{slot}]")
            logprobs[row, slot] = float(entry["logprob"])
    valid = (ids >= 0) & (logprobs > -math.inf)
    check_ids(ids, valid, column, vocab_size, where)
    # Right-aligned: the last list is the last token's; shifting by the tokens without a list puts each at its token.
    teacher_ids, teacher_logprobs, dropped = placed(torch.where(valid, ids, -1), torch.where(valid, logprobs, 0.0),
                                                    input_ids.numel(), input_ids.numel() - len(positions))
    return kdfast_rows(example, input_ids, teacher_ids, teacher_logprobs, where), dropped


def legacy_width(positions: list) -> Counter:
    """How many entries the positions of axolotl's raw lists hold (empty positions left out)."""
    return Counter(len(entries) for entries in positions if entries)


def _legacy_token(entry, where: str) -> int:
    token = entry.get("token") if isinstance(entry, dict) else None
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ValueError(f"{where}: token {token!r} is not 'token_id:<id>' (vLLM writes ids so with "
                         "return_tokens_as_token_ids)")
    return int(token.split(":", 1)[1])


def _check_rows(rows: str) -> None:
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
