"""The C++ kernel splits rows between torch's threads. The suite's workers run on one thread each (tests/conftest.py),
so this file runs the kernel's forms (a dense teacher, a sparse one, several, another vocabulary's; the fused linear
forms and the token log-probs) on 1, 2 and 3 threads: a row's loss and gradient do not depend on which thread
took it, and the per-row results are reduced in one order, so the logits-level forms give the same bits; the fused
linear forms add the BLAS products, whose blocking follows the thread count (within float32 rounding)."""

import functools

import pytest
import torch
from small_vocab_map import Vocabulary

import kdfast

ROWS, VOCAB, HIDDEN, TEACHERS = 301, 5003, 48, 5  # 301 rows: uneven shares for 2 and 3 threads
THREAD_COUNTS = (2, 3)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(ROWS, VOCAB, generator=generator) * 3
    teachers = [torch.randn(ROWS, VOCAB, generator=generator) * 3 for _ in range(TEACHERS)]
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[::7] = -100
    return student, teachers, labels


def _large_vocab_map() -> kdfast.VocabMap:
    """A teacher of VOCAB + 1000 strings; the student holds 4000 of them, in another order, and VOCAB - 4000 own."""
    teacher = {f"tok{i}": i for i in range(VOCAB + 1000)}
    shared = torch.randperm(VOCAB + 1000, generator=torch.Generator().manual_seed(1))[:4000].tolist()
    student = {**{f"tok{t}": s for s, t in enumerate(shared)}, **{f"own{s}": s for s in range(4000, VOCAB)}}
    return kdfast.VocabMap.from_tokenizers(Vocabulary(student), Vocabulary(teacher))


@functools.cache  # built once a worker: the test ids come from its names
def _logits_level_cases():
    student, teachers, labels = _inputs()
    top_logprobs, top_ids = torch.log_softmax(teachers[0], dim=-1).topk(20, dim=-1)
    wide_teacher = torch.randn(ROWS, VOCAB + 1000, generator=torch.Generator().manual_seed(2)) * 3
    vocab_map = _large_vocab_map()
    cases = {
        "dense jsd + ce": lambda x: kdfast.distill_loss(x, teachers[0], labels, divergence="jsd", ce_weight=0.5,
                                                        backend="cpu"),
        "dense reverse kl, T=2": lambda x: kdfast.distill_loss(x, teachers[0], labels, divergence="reverse_kl",
                                                               temperature=2.0, backend="cpu"),
        "sparse top-20 bucket": lambda x: kdfast.sparse_distill_loss(x, top_ids, top_logprobs, labels, ce_weight=0.5,
                                                                     backend="cpu"),
        "mixture of 5": lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, ce_weight=0.5, backend="cpu"),
        "average of 3, jsd": lambda x: kdfast.multi_teacher_distill_loss(x, teachers[:3], labels, combine="average",
                                                                         divergence="jsd", backend="cpu"),
    }
    for method in ("mapped", "uld", "hybrid"):
        cases[f"cross-vocab {method}"] = lambda x, method=method: kdfast.cross_vocab_distill_loss(
            x, wide_teacher, labels, vocab_map=vocab_map, method=method, ce_weight=0.5, backend="cpu")
    return cases, student


def _loss_and_gradients(loss_of, leaves, threads):
    torch.set_num_threads(threads)
    leaves = [leaf.clone().requires_grad_() for leaf in leaves]
    loss = loss_of(*leaves)
    loss.backward()
    return [loss.detach(), *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize("case", list(_logits_level_cases()[0]))
def test_logits_level_forms_give_the_same_bits_on_any_thread_count(case, restore_threads):
    cases, student = _logits_level_cases()
    one = _loss_and_gradients(cases[case], [student], 1)
    for threads in THREAD_COUNTS:
        several = _loss_and_gradients(cases[case], [student], threads)
        for name, a, b in zip(("loss", "gradient"), one, several):
            assert torch.equal(a, b), (case, threads, name, (a - b).abs().max().item())


@functools.cache
def _linear_cases():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3
    teacher_hidden = [torch.randn(ROWS, HIDDEN + 16 * m, generator=generator) for m in range(3)]
    teacher_weight = [torch.randn(VOCAB, HIDDEN + 16 * m, generator=generator) * 0.3 for m in range(3)]
    _, _, labels = _inputs()
    with torch.no_grad():
        top_logprobs, top_ids = torch.log_softmax(teacher_hidden[0] @ teacher_weight[0].T, dim=-1).topk(20, dim=-1)
    cases = {
        "linear jsd + ce": lambda h, w: kdfast.linear_distill_loss(h, w, teacher_hidden[0], teacher_weight[0], labels,
                                                                   divergence="jsd", ce_weight=0.5, chunk_size=64,
                                                                   backend="cpu"),
        "linear sparse": lambda h, w: kdfast.linear_sparse_distill_loss(h, w, top_ids, top_logprobs, labels,
                                                                        ce_weight=0.5, chunk_size=64, backend="cpu"),
        "linear mixture of 3": lambda h, w: kdfast.linear_multi_teacher_distill_loss(
            h, w, teacher_hidden, teacher_weight, labels, ce_weight=0.5, chunk_size=64, backend="cpu"),
        "token log-probs and entropy": lambda h, w: sum(part.sum() for part in kdfast.linear_token_logprobs(
            h, w, labels.clamp(min=0), return_entropy=True, chunk_size=64, backend="cpu")),
    }
    return cases, [hidden, weight]


@pytest.mark.parametrize("case", list(_linear_cases()[0]))
def test_fused_linear_forms_agree_on_any_thread_count(case, restore_threads):
    cases, leaves = _linear_cases()
    one = _loss_and_gradients(cases[case], leaves, 1)
    for threads in THREAD_COUNTS:
        several = _loss_and_gradients(cases[case], leaves, threads)
        for name, a, b in zip(("loss", "hidden gradient", "weight gradient"), one, several):
            where = f"{case}, {threads} threads, {name}"
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda text, where=where: f"{where}: {text}")
