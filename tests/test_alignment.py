"""Two tokenizations of one text: `align_tokenizations` against TRL's GOLD (`ULDLoss._align_by_byte_offsets`, the
merge of split tokens), and `cross_vocab_distill_loss(alignment=...)` equal to GOLD's ULDLoss with byte offsets
(use_extended_uld, both merge strategies, uld and hybrid): loss and gradient, a batch of two samples of different
lengths, and the hybrid's matched/unmatched parts (LossComponents) as GOLD keeps them for its last sample. Bad input
named."""

import os
import random

import pytest
import torch
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, Vocabulary

import kdfast
from kdfast.alignment import _groups_by_ends

TEACHER_STRINGS = {f"tok{i}": i for i in range(TEACHER_VOCAB)}
STUDENT_STRINGS = {**{f"tok{t}": s for s, t in enumerate([5, 0, 12, 3, 9, 7, 1])},
                   **{f"own{s}": s for s in range(7, STUDENT_VOCAB)}}


def spans(rng: random.Random, length: int, cut_share: float) -> list:
    """(start, end) byte spans of one tokenization of a text of `length` bytes."""
    cuts = [0] + [b for b in range(1, length) if rng.random() < cut_share] + [length]
    return [[a, b] for a, b in zip(cuts, cuts[1:])]


def gold():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip("trl.experimental.gold.gold_trainer")


@pytest.mark.parametrize("seed", range(6))
def test_groups_are_golds(seed):
    rng = random.Random(seed)
    length = rng.randint(5, 40)
    student, teacher = spans(rng, length, 0.5), spans(rng, length, 0.3)
    if seed == 5:  # a shorter teacher text: GOLD puts what is left in one last group
        teacher = [span for span in teacher if span[1] < length] or [[0, 1]]
    expected = gold().ULDLoss._align_by_byte_offsets(student, teacher)
    found = _groups_by_ends([e for _, e in student], [e for _, e in teacher])
    assert [list(g) for g in found[0]] == expected[0] and [list(g) for g in found[1]] == expected[1]


def test_alignment_rows_and_merges():
    # Student "ab|c|def", teacher "abc|d|ef": groups (ab, c | abc), (def | d, ef).
    student_offsets, teacher_offsets = [[0, 2], [2, 3], [3, 6]], [[0, 3], [3, 4], [4, 6]]
    observed = kdfast.align_tokenizations([4, 5, 6], student_offsets, [7, 8, 9], teacher_offsets,
                                          student_rows=[10, 11, 12])
    assert observed.groups == 2 and observed.student_rows.tolist() == [10, 12]
    assert observed.student.extra_rows.tolist() == [11] and observed.student.extra_ids.tolist() == [5]
    assert observed.teacher_rows.tolist() == [0, 1] and observed.teacher.extra_ids.tolist() == [9]
    bayesian = kdfast.align_tokenizations([4, 5, 6], student_offsets, [7, 8, 9], teacher_offsets, merge="bayesian")
    assert bayesian.student_rows.tolist() == [1, 2] and bayesian.student.extra_ids.tolist() == [4]
    assert bayesian.teacher_rows.tolist() == [0, 2] and bayesian.teacher.extra_rows.tolist() == [1]
    both = kdfast.TokenAlignment.cat([observed, bayesian])
    assert both.sample.tolist() == [0, 0, 1, 1] and both.student.extra_groups.tolist() == [0, 2]
    assert "4 groups" in repr(both)


def batch(seed: int, lengths=(9, 6)):
    """Two samples: ids, byte spans per side (the teacher's tokens coarser), logits [2, L, V] per side; position 0
    is a prompt token (label -100), the answer follows."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    samples = []
    for text_length in lengths:
        student, teacher = spans(rng, text_length, 0.6), spans(rng, text_length, 0.35)
        samples.append((student, teacher))
    width = 1 + max(max(len(s), len(t)) for s, t in samples)
    ids = {side: torch.zeros(2, width, dtype=torch.int64) for side in ("student", "teacher")}
    labels = {side: torch.full((2, width), -100, dtype=torch.int64) for side in ("student", "teacher")}
    offsets = {side: torch.zeros(2, width, 2, dtype=torch.int64) for side in ("student", "teacher")}
    for b, (student, teacher) in enumerate(samples):
        for side, vocab, side_spans in (("student", STUDENT_VOCAB, student), ("teacher", TEACHER_VOCAB, teacher)):
            count = len(side_spans)
            ids[side][b, 1:1 + count] = torch.randint(0, vocab, (count,), generator=generator)
            labels[side][b, 1:1 + count] = ids[side][b, 1:1 + count]
            offsets[side][b, 1:1 + count] = torch.tensor(side_spans)
    logits = {"student": torch.randn(2, width, STUDENT_VOCAB, generator=generator) * 2,
              "teacher": torch.randn(2, width, TEACHER_VOCAB, generator=generator) * 2}
    return samples, ids, labels, offsets, logits


def kdfast_alignment(samples, ids, width: int, merge: str) -> kdfast.TokenAlignment:
    """Rows as GOLD reads them: the answer starts at position 1; "bayesian" reads the row before each token."""
    shift = 1 if merge == "observed" else 0
    parts = []
    for b, (student, teacher) in enumerate(samples):
        rows = {side: b * width + shift + torch.arange(len(side_spans))
                for side, side_spans in (("student", student), ("teacher", teacher))}
        parts.append(kdfast.align_tokenizations(
            ids["student"][b, 1:1 + len(student)], student, ids["teacher"][b, 1:1 + len(teacher)], teacher,
            student_rows=rows["student"], teacher_rows=rows["teacher"], merge=merge))
    return kdfast.TokenAlignment.cat(parts)


def gold_per_sample_mean(per_group: torch.Tensor, alignment: kdfast.TokenAlignment, samples: int) -> torch.Tensor:
    counts = torch.bincount(alignment.sample, minlength=samples).clamp_min(1).float()
    return (per_group / counts[alignment.sample]).sum() / samples


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 3])
def test_equals_golds_uld_loss_with_byte_offsets(merge, hybrid, temperatures, seed):
    """GOLD's ULDLoss over a batch of two samples whose tokenizations split the text differently (use_extended_uld,
    its merges): kdfast with the alignment, reduction "none" per group, reduced as GOLD reduces (the mean over
    samples of each sample's mean over groups); loss and student-logit gradient."""
    from types import SimpleNamespace

    samples, ids, labels, offsets, logits = batch(seed)
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
                             uld_student_temperature=temperatures[0], uld_teacher_temperature=temperatures[1],
                             uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True,
                             uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid,
                             uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    vocabularies = (Vocabulary(STUDENT_STRINGS), Vocabulary(TEACHER_STRINGS)) if hybrid else (None, None)
    uld = gold().ULDLoss(config, student_tokenizer=vocabularies[0], teacher_tokenizer=vocabularies[1])
    s_trl = logits["student"].clone().requires_grad_()
    expected = uld(student_logits=s_trl, teacher_logits=logits["teacher"], student_labels=labels["student"],
                   teacher_labels=labels["teacher"], student_input_ids=ids["student"],
                   teacher_input_ids=ids["teacher"], student_byte_offsets=offsets["student"],
                   teacher_byte_offsets=offsets["teacher"])
    expected.backward()

    alignment = kdfast_alignment(samples, ids, logits["student"].shape[1], merge)
    vmap = kdfast.VocabMap.from_tokenizers(Vocabulary(STUDENT_STRINGS), Vocabulary(TEACHER_STRINGS))
    s = logits["student"].clone().requires_grad_()
    per_group, parts = kdfast.cross_vocab_distill_loss(
        s, logits["teacher"], vocab_map=vmap, alignment=alignment, method="hybrid" if hybrid else "uld",
        divergence="jsd" if hybrid else "forward_kl", beta=0.5, student_temperature=temperatures[0],
        teacher_temperature=temperatures[1], t2_scale=False, reduction="none", return_components=True)
    assert per_group.shape == (alignment.groups,)
    loss = gold_per_sample_mean(per_group, alignment, 2)
    loss.backward()
    torch.testing.assert_close(loss, expected.reshape(()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_trl.grad, rtol=1e-4, atol=1e-6)
    if not hybrid:
        assert parts.matched is None and parts.unmatched is None and not hasattr(uld, "last_matched_loss")
        return
    # GOLD keeps its last sample's parts, each the mean over that sample's groups, before the hybrid's weights.
    last = alignment.sample == 1
    torch.testing.assert_close(parts.matched[last].mean(), uld.last_matched_loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.unmatched[last].mean(), uld.last_unmatched_loss.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mapped_reads_the_base_rows_and_reductions_agree(reduction):
    samples, ids, _, _, logits = batch(1)
    alignment = kdfast_alignment(samples, ids, logits["student"].shape[1], "observed")
    vmap = kdfast.VocabMap.from_tokenizers(Vocabulary(STUDENT_STRINGS), Vocabulary(TEACHER_STRINGS))
    student = logits["student"].reshape(-1, STUDENT_VOCAB)
    teacher = logits["teacher"].reshape(-1, TEACHER_VOCAB)
    labels = torch.randint(0, STUDENT_VOCAB, (alignment.groups,), generator=torch.Generator().manual_seed(2))
    labels[0] = -100
    s = student.clone().requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, teacher, labels, vocab_map=vmap, alignment=alignment, method="mapped",
                                           ce_weight=0.5, reduction=reduction)
    loss.backward()
    gathered = student[alignment.student_rows].clone().requires_grad_()
    expected = kdfast.cross_vocab_distill_loss(gathered, teacher[alignment.teacher_rows], labels, vocab_map=vmap,
                                               method="mapped", ce_weight=0.5, reduction=reduction)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    want = torch.zeros_like(student).index_add_(0, alignment.student_rows, gathered.grad)
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)


def test_bad_input_names_the_argument():
    align = kdfast.align_tokenizations
    with pytest.raises(ValueError, match="student_offsets end at byte 3 and teacher_offsets at byte 4"):
        align([1, 2], [[0, 1], [1, 3]], [1], [[0, 4]])
    strict_off = align([1, 2], [[0, 1], [1, 3]], [1], [[0, 4]], strict=False)
    assert strict_off.groups == 1 and strict_off.student.extra_rows.tolist() == [1]
    with pytest.raises(ValueError, match="merge must be one of"):
        align([1], [[0, 1]], [1], [[0, 1]], merge="first")
    with pytest.raises(ValueError, match=r"teacher_offsets must be integers \[S, 2\]"):
        align([1], [[0, 1]], [1, 2], [[0, 1]])
    with pytest.raises(ValueError, match="student_offsets must end in increasing byte order"):
        align([1, 2], [[0, 2], [0, 1]], [1], [[0, 1]], strict=False)
    with pytest.raises(ValueError, match="student_rows must hold one row per token"):
        align([1, 2], [[0, 1], [1, 2]], [1], [[0, 2]], student_rows=[0])
    alignment = align([1, 2], [[0, 1], [1, 2]], [1], [[0, 2]], student_rows=[5, 6])
    vmap = kdfast.VocabMap.from_tokenizers(Vocabulary(STUDENT_STRINGS), Vocabulary(TEACHER_STRINGS))
    with pytest.raises(ValueError, match="alignment names a group's row 5 but student_logits has 4 rows"):
        kdfast.cross_vocab_distill_loss(torch.randn(4, STUDENT_VOCAB), torch.randn(3, TEACHER_VOCAB), vocab_map=vmap,
                                        alignment=alignment)
    with pytest.raises(ValueError, match="alignment must be a kdfast.TokenAlignment"):
        kdfast.cross_vocab_distill_loss(torch.randn(4, STUDENT_VOCAB), torch.randn(3, TEACHER_VOCAB), vocab_map=vmap,
                                        alignment=[(0, 0)])
    with pytest.raises(ValueError, match="labels shape .* the alignment's groups"):
        kdfast.cross_vocab_distill_loss(torch.randn(8, STUDENT_VOCAB), torch.randn(3, TEACHER_VOCAB), vocab_map=vmap,
                                        alignment=alignment, labels=torch.zeros(3, dtype=torch.int64))


def test_a_token_no_row_predicts_drops_its_group():
    # Causal rows (token k read at row k - 1): the first group holds token 0 of both sides and is dropped.
    alignment = kdfast.align_tokenizations([1, 2, 3], [[0, 1], [1, 2], [2, 4]], [4, 5], [[0, 2], [2, 4]],
                                           student_rows=[-1, 0, 1], teacher_rows=[-1, 0])
    assert alignment.groups == 1 and alignment.student_rows.tolist() == [1]
    assert alignment.teacher_rows.tolist() == [0] and alignment.student.extra_rows.numel() == 0
    with pytest.raises(ValueError, match="student_rows must be rows of the flattened logits"):
        kdfast.align_tokenizations([1], [[0, 1]], [1], [[0, 1]], student_rows=[-2])
