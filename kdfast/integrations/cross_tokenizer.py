"""A causal-LM student learning from a teacher of another tokenizer: `CrossTokenizerCollator` tokenises each text
with both tokenizers and aligns the two tokenizations (`kdfast.align_tokenizations`, by where tokens end in the
text), and `batch_cross_vocab_loss` is a batch's loss from both decoders' last hidden states and LM heads:
`kd_weight · linear_cross_vocab_distill_loss` over the aligned groups (no logits of either model for the whole
batch) plus `ce_weight · CE` of the student on its own tokens (`linear_token_logprobs`). `DistillationTrainer` uses
both when it is given `teacher_tokenizer`."""

from __future__ import annotations

import bisect
import contextlib

import torch

from kdfast.alignment import TokenAlignment, align_tokenizations
from kdfast.cross_vocab import METHODS, check_settings
from kdfast.integrations.causal_lm import (
    final_softcap,
    head_settings,
    last_hidden_state,
    logit_scale,
    output_head,
    own_logits,
)
from kdfast.integrations.sharding import run_through_wrapper, whole_head
from kdfast.linear_cross_vocab import linear_cross_vocab_distill_loss
from kdfast.reduction import LossComponents
from kdfast.token_logprobs import linear_token_logprobs
from kdfast.vocab_map import VocabMap

TEXT_COLUMN = "text"
GROUPS_IN_BATCH = "groups_in_batch"
_NO_LIMIT = 1_000_000  # a tokenizer's model_max_length at or past this is transformers' "not set"


class CrossTokenizerCollator:
    """Rows with a `text` column -> a batch of the student's `input_ids`, `attention_mask`, `labels` (-100 on
    padding), the teacher's `teacher_input_ids`, `teacher_attention_mask`, and `alignment`, the `TokenAlignment` of
    the two tokenizations over the padded batch flattened: the row predicting student token k of sample b is
    b * L_s + k - 1 (the teacher's b * L_t + k - 1), so the alignment indexes the decoders' hidden states [B, L, H]
    unshifted; the groups holding a first token are dropped (no row predicts it).

    `max_length` bounds both sides (default: the tokenizers' smaller `model_max_length`, when set). A text longer
    than that is cut on both sides after the last character where both tokenizations end a token within the limit,
    so both keep the same text and every kept token after the first group is in exactly one group. `merge` is
    `align_tokenizations`' ("observed": with these rows a group's merge is the exact chain-rule product)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, max_length=None, *, merge="observed"):
        for name, tokenizer in (("student_tokenizer", student_tokenizer), ("teacher_tokenizer", teacher_tokenizer)):
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError(f"{name} must be a fast tokenizer (PreTrainedTokenizerFast): the alignment needs "
                                 "its offsets mapping")
        if max_length is None:
            limits = [t.model_max_length for t in (student_tokenizer, teacher_tokenizer)
                      if isinstance(getattr(t, "model_max_length", None), int) and t.model_max_length < _NO_LIMIT]
            max_length = min(limits) if limits else None
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (tokens per side) or None, got {max_length!r}")
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length, self.merge = max_length, merge

    def __call__(self, rows) -> dict:
        texts = [row[TEXT_COLUMN] for row in rows]
        student, teacher = _encoded(self.student_tokenizer, texts), _encoded(self.teacher_tokenizer, texts)
        kept = [_cut(s_ends, t_ends, self.max_length) for (_, s_ends), (_, t_ends) in zip(student, teacher)]
        student_ids, student_mask = _padded([ids[:n] for (ids, _), (n, _) in zip(student, kept)],
                                            _pad_id(self.student_tokenizer))
        teacher_ids, teacher_mask = _padded([ids[:n] for (ids, _), (_, n) in zip(teacher, kept)],
                                            _pad_id(self.teacher_tokenizer))
        student_length, teacher_length = student_ids.shape[1], teacher_ids.shape[1]
        alignments = []
        for b, ((s_ids, s_ends), (t_ids, t_ends), (s_n, t_n)) in enumerate(zip(student, teacher, kept)):
            # strict=False: after a cut both sides end at one character; uncut, a tokenizer whose offsets stop short
            # of the other's (trimmed trailing space) leaves its last tokens in one last group, as GOLD does.
            alignments.append(align_tokenizations(
                s_ids[:s_n], _spans(s_ends[:s_n]), t_ids[:t_n], _spans(t_ends[:t_n]),
                student_rows=_rows(b, student_length, s_n), teacher_rows=_rows(b, teacher_length, t_n),
                merge=self.merge, strict=False))
        return {"input_ids": student_ids, "attention_mask": student_mask,
                "labels": student_ids.masked_fill(student_mask == 0, -100),
                "teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask,
                "alignment": TokenAlignment.cat(alignments)}


def _encoded(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each text's ids and the character where each token ends, as a running maximum: special tokens the tokenizer
    adds have offsets (0, 0) and take the end of the token before them."""
    encoded = tokenizer(texts, return_offsets_mapping=True)
    out = []
    for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"]):
        ends, last = [], 0
        for _, end in offsets:
            last = max(last, end)
            ends.append(last)
        out.append((ids, ends))
    return out


def _cut(student_ends: list[int], teacher_ends: list[int], limit) -> tuple[int, int]:
    """How many tokens each side keeps: all, or those up to the last character where both end a token among their
    first `limit` (the first `limit` of each if they share no such end)."""
    if limit is None or (len(student_ends) <= limit and len(teacher_ends) <= limit):
        return len(student_ends), len(teacher_ends)
    shared = set(student_ends[:limit]).intersection(teacher_ends[:limit])
    if not shared:
        return min(limit, len(student_ends)), min(limit, len(teacher_ends))
    end = max(shared)
    return (bisect.bisect_right(student_ends, end, 0, min(limit, len(student_ends))),
            bisect.bisect_right(teacher_ends, end, 0, min(limit, len(teacher_ends))))


def _spans(ends: list[int]) -> torch.Tensor:
    # The alignment reads only the ends; the starts are filled with them.
    column = torch.tensor(ends, dtype=torch.int64).reshape(-1, 1)
    return torch.cat([column, column], 1)


def _rows(sample: int, length: int, count: int) -> torch.Tensor:
    rows = sample * length + torch.arange(count, dtype=torch.int64) - 1
    if count:
        rows[0] = -1  # no row predicts a sequence's first token
    return rows


def _pad_id(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0


def _padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(len(ids) for ids in sequences))
    ids = torch.full((len(sequences), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(sequences), length), dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.int64)
        mask[row, :len(sequence)] = 1
    return ids, mask


def _head(head, size: int, name: str):
    """The head's weight and bias cut to the tokenizer's `size` tokens (rows past it are padding)."""
    weight, bias = head.weight, head.bias
    if weight.shape[0] < size:
        raise ValueError(f"the {name}'s LM head has {weight.shape[0]} rows but its tokenizer {size} tokens")
    return weight[:size], bias[:size] if bias is not None else None


def batch_cross_vocab_loss(student, teacher, inputs, vocab_map: VocabMap, *, method="hybrid", divergence="forward_kl",
                           beta=0.5, temperature=1.0, teacher_temperature=None, kd_weight=0.5, ce_weight=0.5,
                           t2_scale=True, chunk_size="auto", backend="auto", num_items_in_batch=None,
                           groups_in_batch=None, own_logits_of_teacher=False):
    """(loss, LossComponents with kd and ce) of one `CrossTokenizerCollator` batch: the teacher's decoder under
    no_grad, the student's, then `kd_weight · KD + ce_weight · CE`. KD is `linear_cross_vocab_distill_loss` (its
    kd_weight 1, ce 0, T² included when `t2_scale`) averaged over the aligned groups; CE the student's mean
    -log q(label) over its label tokens. For a whole accumulated batch (micro-batches, ranks) give both of its
    counts: `num_items_in_batch` (its label tokens) divides the CE's sum and `groups_in_batch` (its aligned groups)
    the KD's, so that the micro-batches' losses add up to the accumulated batch's exactly (a micro-batch's groups
    per label token vary with its text, so neither count stands in for the other). Heads are cut to the map's
    vocabularies (rows past them are padding). `own_logits_of_teacher`: the teacher's own forward gives its logits
    (their columns cut to its tokenizer's), read as given (`kdfast.integrations.teacher_logits`). Called under the
    caller's autocast."""
    if (num_items_in_batch is None) != (groups_in_batch is None):
        raise ValueError("num_items_in_batch (the accumulated batch's label tokens) and groups_in_batch (its aligned "
                         "groups) are given together or not at all: the CE and the KD divide by one each")
    labels = inputs["labels"]
    student_hidden = last_hidden_state(student, inputs["input_ids"], inputs.get("attention_mask"))
    teacher_ids, teacher_mask = inputs["teacher_input_ids"], inputs.get("teacher_attention_mask")
    with torch.no_grad():
        if own_logits_of_teacher:  # its whole forward, hooks and all: a sharded teacher gathers its own parameters
            teacher_rows = own_logits(teacher, teacher_ids, teacher_mask)[..., :vocab_map.teacher_size]
        else:  # an FSDP2 teacher is entered through its own forward, which gathers its root's parameters
            teacher_rows = run_through_wrapper(teacher, teacher, last_hidden_state, teacher, teacher_ids, teacher_mask)
    student_head = output_head(student)
    teacher_head = None if own_logits_of_teacher else output_head(teacher)
    with whole_head(student, student_head), (whole_head(teacher, teacher_head, frozen=True) if teacher_head is not None
                                             else contextlib.nullcontext()):
        student_weight, student_bias = _head(student_head, vocab_map.student_size, "student")
        if teacher_head is None:  # given logits: final, the student's map alone
            teacher_weight = teacher_bias = None
            maps = dict(student_logit_scale=logit_scale(student), student_softcap=final_softcap(student))
        else:
            teacher_weight, teacher_bias = (t.detach() if t is not None else None
                                            for t in _head(teacher_head, vocab_map.teacher_size, "teacher"))
            maps = head_settings(student, teacher)
        kd, parts = linear_cross_vocab_distill_loss(
            student_hidden, student_weight, teacher_rows.detach(), teacher_weight, vocab_map=vocab_map,
            alignment=inputs["alignment"], method=method, student_bias=student_bias, teacher_bias=teacher_bias,
            **maps, chunk_size=chunk_size, divergence=divergence, beta=beta, temperature=temperature,
            teacher_temperature=teacher_temperature, kd_weight=1.0, ce_weight=0.0, t2_scale=t2_scale,
            num_items_in_batch=groups_in_batch, backend=backend, return_components=True)
        shifted = labels[:, 1:]
        kept = shifted.ne(-100)
        head = dict(bias=student_bias, logit_scale=logit_scale(student), softcap=final_softcap(student),
                    chunk_size=chunk_size, backend=backend)
        if torch.compiler.is_compiling():  # a mask's rows are a shape of the data: every row, the ignored ones 0
            logprobs = linear_token_logprobs(student_hidden[:, :-1], student_weight, shifted, ignore_index=-100,
                                             **head)
        else:  # only the label tokens' rows: padding costs no head GEMM
            logprobs = linear_token_logprobs(student_hidden[:, :-1][kept], student_weight, shifted[kept], **head)
    ce = -logprobs.sum() / (kept.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch)
    loss = kd_weight * kd + ce_weight * ce
    return loss, LossComponents(ce=ce.detach(), z_loss=None, accuracy=None, kd=parts.kd, matched=parts.matched,
                                unmatched=parts.unmatched)


def add_groups_in_batch(batch_samples: list, device, gather=None) -> None:
    """Puts into each micro-batch of an accumulated batch `groups_in_batch`, the aligned groups of them all (of
    every rank's too, summed by `gather` when given): the KD term's count, as the Trainer's num_items_in_batch is
    the CE's."""
    groups = torch.tensor(sum(batch["alignment"].groups for batch in batch_samples), device=device)
    if gather is not None:
        groups = gather(groups).sum()
    for batch in batch_samples:
        batch[GROUPS_IN_BATCH] = groups


def trainer_settings(teacher_tokenizer, student_tokenizer, method, options, teacher_temperature,
                     unsupported: dict, trainer_kwargs: dict) -> tuple[VocabMap, dict]:
    """`DistillationTrainer`'s checks and set-up for `teacher_tokenizer`: the vocabulary map (built once), the
    keywords of `batch_cross_vocab_loss` from the trainer's `LossOptions`, and `CrossTokenizerCollator` as the
    default collator (set in `trainer_kwargs`)."""
    if method not in METHODS:
        raise ValueError(f"cross_vocab must be one of {METHODS}, got {method!r}")
    if teacher_tokenizer is None:
        raise ValueError(f"cross_vocab={method!r} is the loss against a teacher of another tokenizer: pass "
                         "teacher_tokenizer too")
    if student_tokenizer is None:
        raise ValueError("teacher_tokenizer needs processing_class=<the student's tokenizer>: the tokens both "
                         "vocabularies share and the alignment come from the two tokenizers")
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise ValueError(f"{', '.join(given)} not supported with teacher_tokenizer (a teacher of another tokenizer)")
    vocab_map = VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    temperature = options.temperature if teacher_temperature is None else teacher_temperature
    try:
        check_settings(vocab_map, method, options, temperature, (vocab_map.student_size, vocab_map.teacher_size),
                       ("the student's tokenizer", "the teacher's tokenizer"))
    except ValueError as error:
        raise ValueError(f"cross_vocab={method!r}: {error}") from error
    if trainer_kwargs.get("data_collator") is None:
        trainer_kwargs["data_collator"] = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer)
    settings = dict(method=method, divergence=options.divergence, beta=options.beta, temperature=options.temperature,
                    teacher_temperature=teacher_temperature, kd_weight=options.kd_weight,
                    ce_weight=options.ce_weight, t2_scale=options.t2_scale, backend=options.backend)
    return vocab_map, settings
