"""Other tools' sparse teachers as kdfast rows. A kdfast example is `input_ids` [L] (int64), `teacher_ids` [L, K]
(int64, -1 = padding, row 0 all -1: nothing predicts the first token) and `teacher_logprobs` [L, K] (float32, 0 at
padding), row j the teacher's distribution of token j; `labels` ride along when the source has them. Every reader
keeps the stored log-probs as they are: renormalising and re-tempering are the loss's settings (tail="renormalize",
teacher_temperature), so nothing the loss could use is lost.

- axolotl: `axolotl_format`.
- DistillKit (arcee-ai/DistillKit): `input_ids` and one row per prediction, row r the teacher's distribution of token
  r + 1: distillkit/sample_logits_vllm.py drops vLLM's null first entry (r rows for r + 1 tokens), and
  distillkit/pack_logits.py then cuts input_ids to the rows' count, so that the last row predicts a token not kept
  (dropped here). Rows are raw `token_ids` / `top_values` (log-probs: distillkit/signals.py's OfflineSignalSource reads
  them with log_values=True, at generation temperature 1) or compressed (`distillkit_codec`); an empty slot is -inf
  (NaN once compressed). Packed rows number their sequences 1, 2, ... in `attention_mask`; a sequence's first token
  then has the previous sequence's last row, which is blanked.
- vLLM: one /v1/completions choice with `prompt_logprobs` (`served.vllm_prompt_logprob_rows` reads them) and the
  prompt's token ids."""

from __future__ import annotations

import math
from collections import Counter

import torch

from kdfast.teacher_cache import axolotl_format
from kdfast.teacher_cache.peer_rows import check_ids, kdfast_rows, matrix, placed, require, same_shape, vector

KDFAST_COLUMNS = ("teacher_ids", "teacher_logprobs")
DISTILLKIT_RAW_COLUMNS = ("token_ids", "top_values")
DISTILLKIT_COMPRESSED_COLUMNS = ("compressed_logprobs", "bytepacked_indices")
# Formats an example carries in its columns, in the order they are looked for.
EXAMPLE_FORMATS = {"kdfast": KDFAST_COLUMNS, "axolotl": axolotl_format.COLUMNS, "distillkit-raw":
                   DISTILLKIT_RAW_COLUMNS, "distillkit": DISTILLKIT_COMPRESSED_COLUMNS}
# The peers' columns that a collator (and so a trainer) reads directly, converted per example.
DIRECT_FORMATS = ("axolotl", "distillkit-raw")


def teacher_format(columns) -> str | None:
    """Which teacher an example's (or a dataset's) column names carry: "kdfast", "axolotl", "distillkit-raw",
    "distillkit" (compressed), or None."""
    columns = set(columns)
    return next((name for name, group in EXAMPLE_FORMATS.items() if columns & set(group)), None)


def as_kdfast_example(example: dict, where: str = "example") -> dict:
    """`example` with a peer's teacher columns (axolotl's, DistillKit's raw) replaced by kdfast's; an example with
    kdfast's columns, or none, is returned as it is."""
    found = teacher_format(example)
    if found in (None, "kdfast"):
        return example
    if found == "distillkit":
        raise ValueError(f"{where} holds DistillKit's compressed rows, which decode only with the config they were "
                         "written with: convert them first (kdfast teacher-cache convert --from distillkit)")
    reader = axolotl_format.read_example if found == "axolotl" else distillkit_example
    rows, _ = reader(example, where=where)
    rest = {name: value for name, value in example.items() if name not in EXAMPLE_FORMATS[found]}
    return {**rest, **rows}


def distillkit_example(example: dict, *, config=None, vocab_size: int | None = None,
                       where: str = "example") -> tuple[dict, int]:
    """(kdfast rows, rows dropped) of a DistillKit example: raw `token_ids` / `top_values`, or compressed rows
    decoded with `config` (a `distillkit_codec.CompressionConfig`)."""
    from kdfast.teacher_cache import distillkit_codec

    if config is None:
        require(example, ("input_ids", *DISTILLKIT_RAW_COLUMNS), where)
        ids = matrix(example["token_ids"], "token_ids", where, torch.int64, -1)
        logprobs = matrix(example["top_values"], "top_values", where, torch.float32, -math.inf)
        same_shape(ids, "token_ids", (logprobs, "top_values"), where=where)
        id_column = "token_ids"
    else:
        require(example, ("input_ids", *DISTILLKIT_COMPRESSED_COLUMNS), where)
        logprobs = distillkit_codec.decode_logprobs(example["compressed_logprobs"], config)
        ids = distillkit_codec.decode_indices(example["bytepacked_indices"], config)
        id_column = "bytepacked_indices"
    input_ids = vector(example["input_ids"], "input_ids", where)
    length = input_ids.numel()
    if ids.shape[0] not in (length - 1, length):
        raise ValueError(f"{where}: {id_column} has {ids.shape[0]} rows for {length} input_ids; DistillKit writes one "
                         "per token after the first (one per token once packed)")
    valid = (ids >= 0) & (logprobs > -math.inf)  # False at NaN too
    # Packed ids have bits to spare past the config's vocabulary d: past it, they cannot be the capture's.
    check_ids(ids, valid, id_column, vocab_size or (config.d if config is not None else None), where)
    teacher_ids, teacher_logprobs, dropped = placed(torch.where(valid, ids, -1), torch.where(valid, logprobs, 0.0),
                                                    length, 1)
    segments = example.get("attention_mask")
    if segments is not None:
        segments = vector(segments, "attention_mask", where)
        starts = torch.nonzero(segments[1:] != segments[:-1]).flatten() + 1
        dropped += int((teacher_ids[starts] >= 0).any(-1).sum())
        teacher_ids[starts], teacher_logprobs[starts] = -1, 0.0
    return kdfast_rows(example, input_ids, teacher_ids, teacher_logprobs, where), dropped


def kdfast_example(example: dict, *, vocab_size: int | None = None, where: str = "example") -> tuple[dict, int]:
    """(kdfast rows, 0) of an example with kdfast's columns, one row per token (or per token after the first)."""
    require(example, ("input_ids", *KDFAST_COLUMNS), where)
    input_ids = vector(example["input_ids"], "input_ids", where)
    ids = matrix(example["teacher_ids"], "teacher_ids", where, torch.int64, -1)
    logprobs = matrix(example["teacher_logprobs"], "teacher_logprobs", where, torch.float32, 0.0)
    same_shape(ids, "teacher_ids", (logprobs, "teacher_logprobs"), where=where)
    if ids.shape[0] == input_ids.numel() - 1:
        ids = torch.cat([torch.full_like(ids[:1], -1), ids])
        logprobs = torch.cat([torch.zeros_like(logprobs[:1]), logprobs])
    if ids.shape[0] != input_ids.numel():
        raise ValueError(f"{where}: teacher_ids has {ids.shape[0]} rows for {input_ids.numel()} input_ids")
    if bool((ids < -1).any()):
        raise ValueError(f"{where}: teacher_ids holds {int(ids.min())}: ids are >= 0, or -1 for padding")
    check_ids(ids, ids >= 0, "teacher_ids", vocab_size, where)
    return kdfast_rows(example, input_ids, ids, torch.where(ids >= 0, logprobs, 0.0), where), 0


def vllm_example(choice: dict, prompt_ids, *, k: int, vocab_size: int | None = None,
                 where: str = "line") -> tuple[dict, int]:
    """(kdfast rows, 0) of one choice of a vLLM /v1/completions response for the prompt `prompt_ids`: ranks 1..k of
    each `prompt_logprobs` entry."""
    from kdfast.teacher_cache.served import vllm_prompt_logprob_rows

    prompt_logprobs = choice.get("prompt_logprobs")
    if prompt_logprobs is None:
        raise ValueError(f"{where}: missing prompt_logprobs (ask vLLM with prompt_logprobs=k)")
    input_ids = vector(prompt_ids, "prompt_token_ids", where)
    if len(prompt_logprobs) != input_ids.numel():
        raise ValueError(f"{where}: prompt_logprobs has {len(prompt_logprobs)} entries for {input_ids.numel()} prompt "
                         "tokens: the response is not for this prompt")
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        # vLLM lists the prompt's own token in every entry: this checks the ids are the ones the server read.
        if isinstance(entry, dict) and str(int(input_ids[position])) not in entry:
            raise ValueError(f"{where}: prompt_logprobs[{position}] does not list the prompt token "
                             f"{int(input_ids[position])}: the prompt ids are not the ones the server read")
    try:
        ids, logprobs = vllm_prompt_logprob_rows(prompt_logprobs, k)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    check_ids(ids, ids >= 0, "prompt_logprobs", vocab_size, where)
    teacher_ids = torch.cat([torch.full((1, k), -1, dtype=torch.int64), ids])
    return {"input_ids": input_ids, "teacher_ids": teacher_ids,
            "teacher_logprobs": torch.cat([torch.zeros(1, k), logprobs])}, 0


def vllm_widths(prompt_logprobs: list) -> Counter:
    """How many ranked candidates the entries hold: n when the prompt token is among them (n entries, ranks 1..n),
    else n + 1 entries, the prompt token's own rank beside 1..n (or tied with one of them)."""
    widths = Counter()
    for entry in prompt_logprobs[1:]:
        if isinstance(entry, dict) and entry:
            ranks = [value.get("rank") or 0 for value in entry.values()]
            whole = len(set(ranks)) == len(ranks) and max(ranks) == len(ranks)
            widths[len(ranks) if whole else len(ranks) - 1] += 1
    return widths


def most_common(widths: Counter, what: str) -> int:
    if not widths:
        raise ValueError(f"no {what} to take k from: pass top_k")
    return widths.most_common(1)[0][0]
