"""TRL's GOLD on kdfast: `GOLDTrainer`, TRL's `trl.experimental.gold.GOLDTrainer` (same arguments, same `GOLDConfig`)
whose cross-tokenizer ULD loss (`use_uld_loss=True`) is `ULDLoss` here, a subclass of TRL's `ULDLoss` that computes
the distillation term with one `kdfast.cross_vocab_distill_loss` call over one `kdfast.TokenAlignment` of the batch.

Why: TRL's `ULDLoss` loops over the samples in Python and, per sample, builds the softmax of every answer row, a
merged [groups, V] copy per side, and sorts of the whole vocabulary, all kept by autograd for the backward pass. Here
the per-sample Python work is only index bookkeeping on the host (answer spans from the labels, the EOS skips, the
"bayesian" leading-span drop and one-row shift, the byte-offset groups), and the fused loss computes every group's
ULD (plain or hybrid) and its gradient a chunk of rows at a time.

The result is TRL's: the same loss and gradients for plain and hybrid ULD, `use_extended_uld` on or off, "observed"
and "bayesian" merges, both temperatures and every weight; TRL's cross-entropy term is TRL's own code. Two freedoms:
where a row holds exactly tied student probabilities, the sorted L1's subgradient depends on which tied column takes
which rank, and kdfast's sort may order ties otherwise than torch.sort; and the loss is float32 whatever the logits'
dtype (TRL's is the logits' dtype). The hybrid's `last_matched_loss` / `last_unmatched_loss`, which TRL's trainer
logs as `matched_loss` / `unmatched_loss`, are TRL's values (see `ULDLoss`), read from the same fused call."""

from __future__ import annotations

import warnings

import torch

from kdfast.alignment import TokenAlignment, align_tokenizations
from kdfast.cross_vocab import cross_vocab_distill_loss
from kdfast.vocab_map import VocabMap

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
    from trl.experimental.gold import GOLDTrainer as _TRLGOLDTrainer
    from trl.experimental.gold.gold_trainer import ULDLoss as _TRLULDLoss


def hybrid_divergence(beta: float) -> str:
    """The divergence GOLD's hybrid applies to the matched tokens: its `generalized_jsd_loss` is KL(teacher‖student)
    at beta 0, KL(student‖teacher) at beta 1 and the generalized JSD with that beta between."""
    if beta == 0:
        return "forward_kl"
    if beta == 1:
        return "reverse_kl"
    return "jsd"


class ULDLoss(_TRLULDLoss):
    """TRL's `ULDLoss` (built from the same `GOLDConfig` and tokenizers; `__call__` and its cross-entropy term are
    TRL's) whose distillation term is kdfast's fused cross-vocabulary loss over the batch's aligned groups.

    For the hybrid it sets `last_matched_loss` / `last_unmatched_loss` as TRL does: the parts of the last sample of
    the batch that has groups to score (TRL's last call of `_compute_hybrid_uld_loss`), each the mean over that
    sample's aligned groups of its unweighted part (TRL's "batchmean" of the matched divergence, and its sorted L1
    summed and divided by the groups), before hybrid_matched_weight / hybrid_unmatched_weight and
    distillation_weight, as 0-dim detached float32 tensors (TRL's are the logits' dtype and carry autograd history;
    its trainer only calls `.item()` on them). They are read from the fused call's `LossComponents` (per group,
    reduction "none"), not computed again. As in TRL, plain ULD and batches with no group to score leave them as
    they were (unset before the first hybrid sample), and TRL's `compute_loss` adds each micro-batch's values to
    its `matched_loss` / `unmatched_loss` logs."""

    def __init__(self, config, student_tokenizer=None, teacher_tokenizer=None, device=None):
        super().__init__(config, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
                         device=device)
        # TRL falls back to plain ULD when it has no vocabulary mapping (no tokenizers given).
        self.method = "hybrid" if self.use_hybrid_loss and self._vocab_mapping is not None else "uld"
        if self.method == "hybrid":
            self.vocab_map = VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
        else:
            # Plain ULD compares sorted probabilities and matches no token; an empty map also spares it the check
            # that every shared token id is a column of the logits, which TRL's plain ULD does not make either.
            none = torch.zeros(0, dtype=torch.int64)
            self.vocab_map = VocabMap(none, none, 0, 0)

    def _compute_distillation_loss(self, student_logits, teacher_logits, student_labels, teacher_labels,
                                   student_input_ids, teacher_input_ids, student_byte_offsets=None,
                                   teacher_byte_offsets=None):
        # The offsets are read only by extended ULD: positional ULD takes whatever the collator left there, as TRL's.
        offsets = (student_byte_offsets, teacher_byte_offsets) if self.use_extended_uld else (None, None)
        _check_batch(student_logits, teacher_logits, student_labels, teacher_labels, student_input_ids,
                     teacher_input_ids, *offsets)
        # One host copy per tensor: the per-sample bookkeeping below reads them many times.
        student_labels, teacher_labels = student_labels.cpu(), teacher_labels.cpu()
        student_starts, student_sizes = _answer_spans(student_labels, self.ignore_index)
        teacher_starts, teacher_sizes = _answer_spans(teacher_labels, self.ignore_index)
        if self.skip_student_eos:
            student_sizes = [size - 1 for size in student_sizes]
        if self.skip_teacher_eos:
            teacher_sizes = [size - 1 for size in teacher_sizes]
        if not student_sizes or not teacher_sizes or max(max(student_sizes), max(teacher_sizes)) <= 0:
            # TRL's value for a batch with nothing to score, shape [1] included.
            return torch.zeros(1, device=student_logits.device, requires_grad=True) * student_logits.sum() * 1e-8
        if self.use_extended_uld:
            if student_byte_offsets is None or teacher_byte_offsets is None:
                raise ValueError("Byte offsets are required when `use_extended_uld=True`.")
            student_byte_offsets = torch.as_tensor(student_byte_offsets).cpu()
            teacher_byte_offsets = torch.as_tensor(teacher_byte_offsets).cpu()
        student_input_ids, teacher_input_ids = student_input_ids.cpu(), teacher_input_ids.cpu()

        batch_size, student_length = student_logits.shape[:2]
        teacher_length = teacher_logits.shape[1]
        alignments, owners = [], []
        for i in range(batch_size):
            spans = self._scored_spans(i, student_starts[i], student_sizes[i], teacher_starts[i], teacher_sizes[i],
                                       student_byte_offsets, teacher_byte_offsets)
            if spans is None:  # TRL adds a 0 for this sample (it still counts in the mean)
                continue
            (student_start, student_size), (teacher_start, teacher_size) = spans
            # "bayesian" reads the row before each token: probs[k] is the distribution that predicted token k.
            shift = 1 if self.token_merge_strategy == "bayesian" else 0
            student_positions = torch.arange(student_start, student_start + student_size)
            teacher_positions = torch.arange(teacher_start, teacher_start + teacher_size)
            student_rows = i * student_length + student_positions - shift
            teacher_rows = i * teacher_length + teacher_positions - shift
            student_ids = student_input_ids[i, student_positions]
            teacher_ids = teacher_input_ids[i, teacher_positions]
            if self.use_extended_uld:
                student_offsets = student_byte_offsets[i, student_positions]
                teacher_offsets = teacher_byte_offsets[i, teacher_positions]
                strict = False  # GOLD's walk: tokens past the last shared boundary form one last group
            else:
                # Positional ULD: token k with token k, both truncated to the shorter answer; no merges.
                common = min(student_size, teacher_size)
                student_rows, teacher_rows = student_rows[:common], teacher_rows[:common]
                student_ids, teacher_ids = student_ids[:common], teacher_ids[:common]
                student_offsets = teacher_offsets = torch.stack([torch.arange(common), torch.arange(1, common + 1)], 1)
                strict = True
            try:
                alignment = align_tokenizations(student_ids, student_offsets, teacher_ids, teacher_offsets,
                                                student_rows=student_rows, teacher_rows=teacher_rows,
                                                merge=self.token_merge_strategy, strict=strict)
            except ValueError as error:
                raise ValueError(f"sample {i} of the batch: {error}") from error
            if alignment.groups:
                alignments.append(alignment)
                owners.append(i)
        if not alignments:
            return self.distillation_weight * (student_logits.sum() * 0.0)

        alignment = TokenAlignment.cat(alignments)
        hybrid = self.method == "hybrid"
        divergence = hybrid_divergence(self.beta) if hybrid else "forward_kl"
        group_losses, parts = cross_vocab_distill_loss(
            student_logits.reshape(-1, student_logits.shape[-1]), teacher_logits.reshape(-1, teacher_logits.shape[-1]),
            vocab_map=self.vocab_map, alignment=alignment, method=self.method, divergence=divergence,
            beta=self.beta if divergence == "jsd" else 0.5,
            matched_weight=self.hybrid_matched_weight if hybrid else None,
            unmatched_weight=self.hybrid_unmatched_weight if hybrid else None,
            student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature,
            t2_scale=False, reduction="none", return_components=True)  # GOLD's ULD has no T^2 factor
        if hybrid:
            # TRL keeps the last sample's parts, each averaged over its groups: the batch's last groups here.
            last = alignments[-1].groups
            self.last_matched_loss = parts.matched[-last:].mean()
            self.last_unmatched_loss = parts.unmatched[-last:].mean()
        # TRL: each sample's loss is the mean over its groups; the batch's the mean over all samples.
        sample = torch.tensor(owners, dtype=torch.int64)[alignment.sample].to(group_losses.device)
        sums = group_losses.new_zeros(batch_size).index_add(0, sample, group_losses)
        counts = torch.bincount(sample, minlength=batch_size).clamp_min(1)
        return self.distillation_weight * (sums / counts).mean()

    def _scored_spans(self, i, student_start, student_size, teacher_start, teacher_size, student_byte_offsets,
                      teacher_byte_offsets):
        """The answer spans TRL scores for sample i, ((start, size) student, teacher), or None when it scores 0."""
        if student_size <= 0 or teacher_size <= 0:
            return None
        if self.token_merge_strategy == "bayesian" and (student_start == 0 or teacher_start == 0):
            # No row predicts a token at index 0: TRL drops the leading span on both sides (the first aligned
            # group with byte offsets, else the first position).
            if self.use_extended_uld:
                student_groups, teacher_groups = self._align_by_byte_offsets(
                    student_byte_offsets[i, student_start:student_start + student_size].tolist(),
                    teacher_byte_offsets[i, teacher_start:teacher_start + teacher_size].tolist())
                if not student_groups or not teacher_groups:
                    return None
                student_drop, teacher_drop = len(student_groups[0]), len(teacher_groups[0])
            else:
                student_drop = teacher_drop = 1
            student_start, student_size = student_start + student_drop, student_size - student_drop
            teacher_start, teacher_size = teacher_start + teacher_drop, teacher_size - teacher_drop
            if student_size <= 0 or teacher_size <= 0:
                return None
        return (student_start, student_size), (teacher_start, teacher_size)


def _answer_spans(labels: torch.Tensor, ignore_index: int):
    """TRL's answer region per row: the first label that is not ignored, and how many are not (0, 0 for none)."""
    kept = labels.ne(ignore_index)
    sizes = kept.sum(1)
    starts = torch.where(sizes > 0, kept.int().argmax(1), torch.zeros_like(sizes))
    return starts.tolist(), sizes.tolist()


def _check_batch(student_logits, teacher_logits, student_labels, teacher_labels, student_input_ids,
                 teacher_input_ids, student_byte_offsets, teacher_byte_offsets):
    for side, logits, labels, input_ids, offsets in (
            ("student", student_logits, student_labels, student_input_ids, student_byte_offsets),
            ("teacher", teacher_logits, teacher_labels, teacher_input_ids, teacher_byte_offsets)):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise ValueError(f"{side}_logits must be a tensor [batch, seq, vocab], got "
                             f"{tuple(getattr(logits, 'shape', ()))}")
        for name, tensor in ((f"{side}_labels", labels), (f"{side}_input_ids", input_ids)):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"{name} must be a tensor [batch, seq] = {tuple(logits.shape[:2])} like "
                                 f"{side}_logits, got {tuple(getattr(tensor, 'shape', ()))}")
        if offsets is not None and tuple(torch.as_tensor(offsets).shape) != (*logits.shape[:2], 2):
            raise ValueError(f"{side}_byte_offsets must be [batch, seq, 2] = {(*logits.shape[:2], 2)} (start, end) "
                             f"per token, got {tuple(torch.as_tensor(offsets).shape)}")
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"the teacher's batch ({teacher_logits.shape[0]} sequences) and the student's "
                         f"({student_logits.shape[0]}) must be the same samples")


class GOLDTrainer(_TRLGOLDTrainer):
    """TRL's `GOLDTrainer` (same arguments, same `GOLDConfig`; on-policy sampling, vLLM and the JSD path of a shared
    tokenizer are TRL's) whose cross-tokenizer ULD loss, with `use_uld_loss=True`, is this module's `ULDLoss`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.uld_loss_fn is not None:
            self.uld_loss_fn = ULDLoss(config=self.args, student_tokenizer=self._tokenizer,
                                       teacher_tokenizer=self.teacher_tokenizer, device=self.accelerator.device)
