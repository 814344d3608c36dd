"""GOLD's hybrid split for logging: `LossComponents.matched` / `.unmatched` of `cross_vocab_distill_loss` (and its
linear form) with method="hybrid" against a float64 reference of the matched divergence and the unmatched sorted L1,
each before its weight: every backend, reductions mean / sum / none, ignored rows, temperatures != 1, with and
without an alignment that merges tokens on both sides; matched_weight * matched + unmatched_weight * unmatched is
the kd part; None for the other methods and for a loss without a divergence."""

import pytest
import torch
from conftest import BACKENDS, device_for
from small_vocab_map import STUDENT_VOCAB, TEACHER_VOCAB, small_vocab_map

import kdfast

FLOOR = 1e-8  # GOLD's floor of the matched probabilities and of a merged token's probability


@pytest.fixture(scope="module")
def vocab_map():
    return small_vocab_map()


def merging_alignment():
    # student "ab|c|de|f|g|h|ij" (7 tokens, rows 0..6), teacher "abc|d|e|fg|h|i|j" (rows 2..8): merges both ways.
    student = [[0, 2], [2, 3], [3, 5], [5, 6], [6, 7], [7, 8], [8, 10]]
    teacher = [[0, 3], [3, 4], [4, 5], [5, 7], [7, 8], [8, 9], [9, 10]]
    return kdfast.align_tokenizations([1, 2, 3, 4, 5, 6, 7], student, [3, 4, 5, 6, 7, 8, 9], teacher,
                                      teacher_rows=list(range(2, 9)))


def case(aligned: bool, seed: int = 0):
    """(student logits, teacher logits, labels, alignment or None): [2, 3, V] rows without an alignment, a row of
    each sample ignored; with it the alignment's groups, the second ignored."""
    generator = torch.Generator().manual_seed(seed)
    if aligned:
        alignment = merging_alignment()
        student = torch.randn(8, STUDENT_VOCAB, generator=generator) * 2.0
        teacher = torch.randn(9, TEACHER_VOCAB, generator=generator) * 2.0
        labels = torch.randint(0, STUDENT_VOCAB, (alignment.groups,), generator=generator)
        labels[1] = -100
        return student, teacher, labels, alignment
    student = torch.randn(2, 3, STUDENT_VOCAB, generator=generator) * 2.0
    teacher = torch.randn(2, 3, TEACHER_VOCAB, generator=generator) * 2.0
    labels = torch.randint(0, STUDENT_VOCAB, (2, 3), generator=generator)
    labels[0, 1] = labels[1, 2] = -100
    return student, teacher, labels, None


def merged_probs(logits, side, temperature):
    """float64 softmax(logits / T) per loss row: the row itself, or a group's base row times its other tokens'
    probabilities (each floored), as GOLD merges them."""
    probs = torch.softmax(logits.double().reshape(-1, logits.shape[-1]) / temperature, dim=-1)
    if side is None:
        return probs
    factor = torch.ones(side.base.numel(), dtype=torch.float64)
    for row, token, group in zip(side.extra_rows.tolist(), side.extra_ids.tolist(), side.extra_groups.tolist()):
        factor[group] *= probs[row, token].clamp_min(FLOOR)
    return probs[side.base] * factor[:, None]


def sorted_l1(a, b):
    a, b = a.sort(-1, descending=True).values, b.sort(-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, width - b.shape[-1]))
    return (a - b).abs().sum(-1)


def hybrid_parts_reference(student, teacher, labels, alignment, vocab_map, divergence, beta, temperatures,
                           reduction, num_items_in_batch=None):
    """(matched, unmatched) per loss row in float64, reduced as the loss: GOLD's divergence on the matched columns
    (probabilities unrenormalised, floored at 1e-8) and the sorted L1 of the unmatched ones."""
    q = merged_probs(student, alignment.student if alignment is not None else None, temperatures[0])
    p = merged_probs(teacher, alignment.teacher if alignment is not None else None, temperatures[1])
    s_ids, t_ids = vocab_map.student_ids, vocab_map.teacher_ids
    s = q[:, s_ids].clamp_min(FLOOR)
    t = p[:, t_ids].clamp_min(FLOOR)
    if divergence == "forward_kl":
        matched = (t * (t.log() - s.log())).sum(-1)
    elif divergence == "reverse_kl":
        matched = (s * (s.log() - t.log())).sum(-1)
    else:
        m = (1 - beta) * s + beta * t
        matched = (beta * t * (t.log() - m.log()) + (1 - beta) * s * (s.log() - m.log())).sum(-1)
    s_rest = [j for j in range(q.shape[-1]) if j not in s_ids.tolist()]
    t_rest = [j for j in range(p.shape[-1]) if j not in t_ids.tolist()]
    unmatched = sorted_l1(q[:, s_rest], p[:, t_rest])
    kept = labels.reshape(-1) != -100
    out = []
    for rows in (matched, unmatched):
        rows = torch.where(kept, rows, torch.zeros_like(rows))
        if reduction == "none":
            out.append(rows.view(labels.shape))
        elif reduction == "sum":
            out.append(rows.sum())
        else:
            out.append(rows.sum() / (num_items_in_batch if num_items_in_batch is not None else kept.sum()))
    return tuple(out)


def weights(vocab_map, matched_weight, unmatched_weight):
    if matched_weight is None:  # GOLD's default: the matched share of the teacher's vocabulary, and the rest
        return vocab_map.matched / TEACHER_VOCAB, 1.0 - vocab_map.matched / TEACHER_VOCAB
    return matched_weight, unmatched_weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("aligned", [False, True])
def test_parts_equal_the_float64_reference(vocab_map, backend, reduction, divergence, aligned):
    student, teacher, labels, alignment = case(aligned)
    chosen = (0.6, 0.3) if divergence == "jsd" else (None, None)
    device = device_for(backend)
    loss, parts = kdfast.cross_vocab_distill_loss(
        student.clone().to(device).requires_grad_(), teacher.to(device), labels.to(device), vocab_map=vocab_map,
        alignment=alignment, method="hybrid", divergence=divergence, beta=0.3, temperature=1.5,
        teacher_temperature=0.7, matched_weight=chosen[0], unmatched_weight=chosen[1], ce_weight=0.3,
        reduction=reduction, backend=backend, return_components=True)
    matched, unmatched = hybrid_parts_reference(student, teacher, labels, alignment, vocab_map, divergence, 0.3,
                                                (1.5, 0.7), reduction)
    assert parts.matched.shape == parts.unmatched.shape == parts.kd.shape == loss.shape
    assert not parts.matched.requires_grad and not parts.unmatched.requires_grad
    torch.testing.assert_close(parts.matched.double().cpu(), matched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.unmatched.double().cpu(), unmatched, rtol=1e-5, atol=1e-6)
    assert float(matched.abs().sum()) > 0 and float(unmatched.abs().sum()) > 0
    matched_weight, unmatched_weight = weights(vocab_map, *chosen)
    torch.testing.assert_close(matched_weight * parts.matched + unmatched_weight * parts.unmatched, parts.kd,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_parts_are_reduced_by_num_items_in_batch(vocab_map, backend):
    student, teacher, labels, _ = case(False, seed=3)
    _, parts = kdfast.cross_vocab_distill_loss(student, teacher, labels, vocab_map=vocab_map, method="hybrid",
                                               temperature=2.0, num_items_in_batch=9, backend=backend,
                                               return_components=True)
    matched, unmatched = hybrid_parts_reference(student, teacher, labels, None, vocab_map, "forward_kl", 0.5,
                                                (2.0, 2.0), "mean", num_items_in_batch=9)
    torch.testing.assert_close(parts.matched.double(), matched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.unmatched.double(), unmatched, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("aligned", [False, True])
def test_linear_form_parts_equal_the_float64_reference(vocab_map, backend, reduction, aligned):
    """The fused linear form, chunks of 3 rows: the parts of the heads' logits."""
    generator = torch.Generator().manual_seed(5)
    alignment = merging_alignment() if aligned else None
    student_hidden = torch.randn(8, 6, generator=generator)
    student_weight = torch.randn(STUDENT_VOCAB, 6, generator=generator)
    teacher_hidden = torch.randn(9 if aligned else 8, 5, generator=generator)
    teacher_weight = torch.randn(TEACHER_VOCAB, 5, generator=generator)
    rows = alignment.groups if aligned else 8
    labels = torch.randint(0, STUDENT_VOCAB, (rows,), generator=generator)
    labels[2] = -100
    loss, parts = kdfast.linear_cross_vocab_distill_loss(
        student_hidden.requires_grad_(), student_weight, teacher_hidden, teacher_weight, labels, vocab_map=vocab_map,
        alignment=alignment, method="hybrid", divergence="reverse_kl", temperature=1.5, teacher_temperature=0.7,
        ce_weight=0.2, chunk_size=3, reduction=reduction, backend=backend, return_components=True)
    loss.backward()
    matched, unmatched = hybrid_parts_reference(student_hidden.detach() @ student_weight.t(),
                                                teacher_hidden @ teacher_weight.t(), labels, alignment, vocab_map,
                                                "reverse_kl", 0.5, (1.5, 0.7), reduction)
    torch.testing.assert_close(parts.matched.double(), matched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.unmatched.double(), unmatched, rtol=1e-5, atol=1e-6)
    matched_weight, unmatched_weight = weights(vocab_map, None, None)
    torch.testing.assert_close(matched_weight * parts.matched + unmatched_weight * parts.unmatched, parts.kd,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_no_split_for_other_methods_or_without_a_divergence(vocab_map, backend):
    student, teacher, labels, _ = case(False)
    for method in ("mapped", "uld"):
        _, parts = kdfast.cross_vocab_distill_loss(student, teacher, labels, vocab_map=vocab_map, method=method,
                                                   backend=backend, return_components=True)
        assert parts.kd is not None and parts.matched is None and parts.unmatched is None, method
    _, parts = kdfast.cross_vocab_distill_loss(student, teacher, labels, vocab_map=vocab_map, method="hybrid",
                                               kd_weight=0.0, ce_weight=1.0, backend=backend, return_components=True)
    assert parts.kd is None and parts.matched is None and parts.unmatched is None
    _, parts = kdfast.distill_loss(student, student.flip(-1), labels, backend=backend, return_components=True)
    assert parts.matched is None and parts.unmatched is None
