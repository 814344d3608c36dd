"""A teacher with another tokenizer: the vocabulary map of two BPE tokenizers trained here (exact token-string matches,
saved and loaded with both fingerprints), and cross_vocab_distill_loss held to the float64 reference (every method,
on the C++ and torch backends), to distill_loss where the tokenizers are one, and to TRL's GOLD `ULDLoss` (plain ULD
and the hybrid) on aligned rows; bad input named."""

import os

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast
from kdfast.demo.corpus import train_tokenizer
from kdfast.reference import cross_vocab_distill_loss_reference
from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG

TEXT = [" ".join(f"def function_{i}(value): return value * {i} + {i % 7}" for i in range(60)),
        " ".join(f"the {word} runs over {i} hills" for i, word in enumerate(["fox", "dog", "cat", "owl"] * 15))]


class Vocabulary:
    """A tokenizer as the map reads it: get_vocab() alone (TRL's tests pass such objects too)."""

    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


# The teacher's strings tok0..tok12; the student holds seven of them in another order and four of its own.
TEACHER_VOCAB = {f"tok{i}": i for i in range(13)}
STUDENT_VOCAB = {**{f"tok{t}": s for s, t in enumerate([5, 0, 12, 3, 9, 7, 1])}, **{f"own{s}": s for s in range(7, 11)}}


@pytest.fixture(scope="module")
def vocab_map():
    return kdfast.VocabMap.from_tokenizers(Vocabulary(STUDENT_VOCAB), Vocabulary(TEACHER_VOCAB))


def aligned_rows(seed=0, rows=6, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, 11, generator=generator) * scale
    teacher = torch.randn(rows, 13, generator=generator) * scale
    labels = torch.randint(0, 11, (rows,), generator=generator)
    labels[2] = -100
    return student, teacher, labels


def test_the_map_of_two_bpe_tokenizers_is_their_shared_token_strings(tmp_path):
    student_tokenizer, teacher_tokenizer = train_tokenizer(TEXT, 300), train_tokenizer(TEXT[:1], 400)
    vmap = kdfast.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    shared = set(student) & set(teacher)
    assert vmap.matched == len(shared) > 0
    names = {token: index for token, index in student.items()}
    inverse = {index: token for token, index in names.items()}
    for s_id, t_id in zip(vmap.student_ids.tolist(), vmap.teacher_ids.tolist()):
        assert teacher[inverse[s_id]] == t_id
    assert f"{vmap.matched} tokens matched" in repr(vmap) and "% of the student's" in repr(vmap)
    vmap.save(tmp_path / "map.json")
    loaded = kdfast.VocabMap.load(tmp_path / "map.json")
    assert torch.equal(loaded.student_ids, vmap.student_ids) and torch.equal(loaded.teacher_ids, vmap.teacher_ids)
    loaded.check_tokenizers(student_tokenizer, teacher_tokenizer)
    with pytest.raises(ValueError, match="teacher_tokenizer is not the tokenizer this vocab_map was built from"):
        loaded.check_tokenizers(student_tokenizer, student_tokenizer)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a kdfast vocabulary map"):
        kdfast.VocabMap.load(tmp_path / "other.json")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_mapped_with_one_tokenizer_is_distill_loss(divergence):
    vocab = Vocabulary({f"t{i}": i for i in range(37)})
    vmap = kdfast.VocabMap.from_tokenizers(vocab, vocab)
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 37, generator=generator) * 3, torch.randn(5, 37, generator=generator) * 3
    labels = torch.randint(0, 37, (5,), generator=generator)
    settings = dict(divergence=divergence, temperature=2.0, ce_weight=0.5)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    mapped = kdfast.cross_vocab_distill_loss(s1, teacher, labels, vocab_map=vmap, method="mapped", **settings)
    dense = kdfast.distill_loss(s2, teacher, labels, **settings)
    mapped.backward()
    dense.backward()
    torch.testing.assert_close(mapped, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


CASES = [("mapped", "forward_kl"), ("mapped", "reverse_kl"), ("mapped", "jsd"), ("mapped", "skew_forward_kl"),
         ("uld", "forward_kl"), ("hybrid", "forward_kl"), ("hybrid", "reverse_kl"), ("hybrid", "jsd")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, divergence", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradient_equal_the_float64_reference(vocab_map, backend, method, divergence, reduction):
    """Every backend: the C++ passes on the CPU; elsewhere the CE family and "mapped" from that backend's rows
    kernels (Triton under its interpreter off the GPU) and ULD as torch statements."""
    student, teacher, labels = aligned_rows()
    settings = dict(vocab_map=vocab_map, method=method, divergence=divergence, beta=0.3, temperature=1.5,
                    teacher_temperature=0.7, ce_weight=0.3, reduction=reduction)
    device = device_for(backend)
    s = student.clone().to(device).requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, teacher.to(device), labels.to(device), backend=backend, **settings)
    (loss.sum() if reduction == "none" else loss).backward()
    s64 = student.double().requires_grad_()
    expected = cross_vocab_distill_loss_reference(s64, teacher, labels, **settings)
    (expected.sum() if reduction == "none" else expected).backward()
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)


def test_hybrid_weights_num_items_and_components(vocab_map):
    student, teacher, labels = aligned_rows(seed=5)
    settings = dict(vocab_map=vocab_map, method="hybrid", matched_weight=0.6, unmatched_weight=0.4, ce_weight=0.5,
                    num_items_in_batch=9)
    loss, parts = kdfast.cross_vocab_distill_loss(student, teacher, labels, return_components=True, **settings)
    expected = cross_vocab_distill_loss_reference(student, teacher, labels, **settings)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert parts.kd is not None and parts.ce is not None and parts.entropy is not None
    torch.testing.assert_close(loss, parts.kd + 0.5 * parts.ce, rtol=1e-5, atol=1e-6)


def _trl_uld(config_settings, student_vocab=None, teacher_vocab=None):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    from types import SimpleNamespace

    config = SimpleNamespace(**{"uld_crossentropy_weight": 0.0, "uld_distillation_weight": 1.0,
                                "uld_student_temperature": 1.0, "uld_teacher_temperature": 1.0,
                                "uld_skip_student_eos": False, "uld_skip_teacher_eos": False,
                                "use_extended_uld": False, "uld_token_merge_strategy": "observed",
                                "uld_use_hybrid_loss": student_vocab is not None, "uld_hybrid_matched_weight": None,
                                "uld_hybrid_unmatched_weight": None, "beta": 0.5, **config_settings})
    tokenizers = (Vocabulary(student_vocab), Vocabulary(teacher_vocab)) if student_vocab else (None, None)
    return gold.ULDLoss(config, student_tokenizer=tokenizers[0], teacher_tokenizer=tokenizers[1])


TRL_CASES = [({}, False), ({"uld_student_temperature": 2.0, "uld_teacher_temperature": 0.5,
                            "uld_distillation_weight": 0.7}, False),
             ({}, True), ({"beta": 0.0}, True), ({"beta": 1.0}, True),
             ({"uld_hybrid_matched_weight": 0.6, "uld_hybrid_unmatched_weight": 0.4, "beta": 0.3}, True)]


@pytest.mark.parametrize("config_settings, hybrid", TRL_CASES)
def test_equals_trls_gold_uld_loss_on_aligned_rows(vocab_map, config_settings, hybrid):
    """One sample whose answer positions are aligned one to one (TRL's positional mode): TRL's loss is the mean of
    the rows' ULD (or hybrid), kdfast's with reduction="mean"; the gradients of both are the student logits'."""
    student, teacher, _ = aligned_rows(seed=7, rows=5)
    uld = _trl_uld(config_settings, STUDENT_VOCAB if hybrid else None, TEACHER_VOCAB if hybrid else None)
    labels = torch.zeros(1, 5, dtype=torch.int64)  # every position an answer token
    s_trl = student.clone().unsqueeze(0).requires_grad_()
    expected = uld(student_logits=s_trl, teacher_logits=teacher.unsqueeze(0), student_labels=labels,
                   teacher_labels=labels, student_input_ids=labels, teacher_input_ids=labels)
    expected.backward()
    s = student.clone().requires_grad_()
    beta = config_settings.get("beta", 0.5)
    loss = kdfast.cross_vocab_distill_loss(
        s, teacher, vocab_map=vocab_map, method="hybrid" if hybrid else "uld",
        divergence="jsd" if hybrid else "forward_kl", beta=beta,
        student_temperature=config_settings.get("uld_student_temperature", 1.0),
        teacher_temperature=config_settings.get("uld_teacher_temperature", 1.0),
        kd_weight=config_settings.get("uld_distillation_weight", 1.0), t2_scale=False,
        matched_weight=config_settings.get("uld_hybrid_matched_weight"),
        unmatched_weight=config_settings.get("uld_hybrid_unmatched_weight"))
    loss.backward()
    torch.testing.assert_close(loss, expected.reshape(()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_trl.grad[0], rtol=1e-4, atol=1e-6)


def test_bad_input_names_the_argument(vocab_map):
    student, teacher, labels = aligned_rows()
    call = kdfast.cross_vocab_distill_loss
    with pytest.raises(ValueError, match="method must be one of"):
        call(student, teacher, vocab_map=vocab_map, method="sorted")
    with pytest.raises(ValueError, match="vocab_map must be a kdfast.VocabMap"):
        call(student, teacher, vocab_map={1: 2})
    with pytest.raises(ValueError, match="must have the same rows"):
        call(student, teacher[:4], vocab_map=vocab_map)
    with pytest.raises(ValueError, match="method='uld' compares sorted probabilities"):
        call(student, teacher, vocab_map=vocab_map, method="uld", divergence="reverse_kl")
    with pytest.raises(ValueError, match="method='hybrid' takes divergence in"):
        call(student, teacher, vocab_map=vocab_map, method="hybrid", divergence="tvd")
    with pytest.raises(ValueError, match="teacher_logits has 9 columns|teacher_logits"):
        call(student, teacher[:, :9], vocab_map=vocab_map)
    with pytest.raises(ValueError, match="matched_weight and unmatched_weight go together"):
        call(student, teacher, vocab_map=vocab_map, matched_weight=0.5)
    with pytest.raises(ValueError, match="teacher_temperature must be a number > 0"):
        call(student, teacher, vocab_map=vocab_map, teacher_temperature=0.0)


@pytest.mark.parametrize("student_ids,teacher_ids,match", [
    ([0, 1, 1, 5], [3, 4, 0, 11], r"VocabMap.student_ids must hold each token id once .* 1 repeated"),
    # Two student tokens on one teacher token: its probability would count twice (before, a silent wrong loss).
    ([0, 1, 2, 5], [3, 3, 0, 11], r"VocabMap.teacher_ids must hold each token id once"),
    ([-1, 1, 2, 5], [3, 4, 0, 11], r"VocabMap.student_ids must lie in \[0, 10\) .* from -1 to 5"),
    ([0, 1, 2, 5], [3, 4, 0, 12], r"VocabMap.teacher_ids must lie in \[0, 12\)"),
    ([0, 1, 2], [3, 4, 0, 11], r"VocabMap.student_ids \(3,\) and teacher_ids \(4,\) must pair up"),
    ([0.0, 1.0], [3.0, 4.0], r"VocabMap.student_ids must be an int64 tensor \[K\]"),
])
def test_a_hand_built_map_is_checked_as_one_from_tokenizers(student_ids, teacher_ids, match):
    with pytest.raises(ValueError, match=match):
        kdfast.VocabMap(torch.tensor(student_ids), torch.tensor(teacher_ids), 10, 12)


def test_a_hand_built_map_in_any_order_gives_the_same_loss():
    student, teacher = torch.randn(4, 10), torch.randn(4, 12)
    ascending = kdfast.VocabMap(torch.tensor([0, 1, 2, 5]), torch.tensor([3, 4, 0, 11]), 10, 12)
    shuffled = kdfast.VocabMap(torch.tensor([5, 1, 2, 0]), torch.tensor([11, 4, 0, 3]), 10, 12)
    for method in ("mapped", "hybrid"):
        torch.testing.assert_close(kdfast.cross_vocab_distill_loss(student, teacher, vocab_map=shuffled, method=method),
                                   kdfast.cross_vocab_distill_loss(student, teacher, vocab_map=ascending,
                                                                   method=method))


def test_mapped_forward_kl_with_no_student_bucket_is_refused():
    """Every student token matched, the teacher holding more: forward KL's rest term P_r log(P_r / 0) is infinite.
    Refused for forward KL; reverse KL (whose rest term is 0 log 0 = 0) equals the float64 reference."""
    nested = kdfast.VocabMap(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 3, 4)
    student, teacher = torch.randn(5, 3), torch.randn(5, 4)
    with pytest.raises(ValueError, match="matches every one of the student's 3 tokens but the teacher holds 1 more"):
        kdfast.cross_vocab_distill_loss(student, teacher, vocab_map=nested, method="mapped")
    loss = kdfast.cross_vocab_distill_loss(student, teacher, vocab_map=nested, method="mapped", divergence="reverse_kl")
    expected = cross_vocab_distill_loss_reference(student, teacher, vocab_map=nested, method="mapped",
                                                  divergence="reverse_kl")
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mapped_components_agree_across_backends(vocab_map, temperature, width):
    """The C++ fused forward KL (the cpu backend) against the sparse kernel's bucket algebra in torch: the loss, every
    component (accuracy and entropy included) and the gradient, on narrow rows (the pass's scalar tail) and wide ones
    (its vector loop and gathers)."""
    if width == "wide":
        vocab_map = wide_map(seed=3)
        student, teacher, labels = wide_rows(vocab_map, seed=8)
    else:
        student, teacher, labels = aligned_rows(seed=11, rows=9)
    found = {}
    for backend in ("cpu", "torch"):
        s = student.clone().requires_grad_()
        loss, parts = kdfast.cross_vocab_distill_loss(s, teacher, labels, vocab_map=vocab_map, method="mapped",
                                                      temperature=temperature, ce_weight=0.4, backend=backend,
                                                      return_components=True)
        loss.backward()
        found[backend] = (loss, parts, s.grad)
    (loss_c, parts_c, grad_c), (loss_t, parts_t, grad_t) = found["cpu"], found["torch"]
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-5, atol=1e-6)
    for name in ("kd", "ce", "accuracy", "entropy"):
        torch.testing.assert_close(getattr(parts_c, name), getattr(parts_t, name), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(grad_c, grad_t, rtol=1e-4, atol=1e-6)


def bucket_kl_by_log_sum_exps(student, teacher, labels, vocab_map, ce_weight):
    """The bucket KL with each rest's log-mass as a log-sum-exp of its own columns, the student's at least
    exp(STUDENT_REST_FLOOR_LOG) (a constant there, as the sparse algebra floors it), plus the CE; mean over the kept
    rows."""
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    s_rest = [j for j in range(student.shape[-1]) if j not in vocab_map.student_ids.tolist()]
    t_rest = [j for j in range(teacher.shape[-1]) if j not in vocab_map.teacher_ids.tolist()]
    log_p_k, log_q_k = log_p[:, vocab_map.teacher_ids], log_q[:, vocab_map.student_ids]
    log_p_r, log_q_r = log_p[:, t_rest].logsumexp(-1), log_q[:, s_rest].logsumexp(-1).clamp_min(STUDENT_REST_FLOOR_LOG)
    kl = (log_p_k.exp() * (log_p_k - log_q_k)).sum(-1) + log_p_r.exp() * (log_p_r - log_q_r)
    kept = labels != -100
    ce = -log_q.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    return ((kl + ce_weight * ce) * kept).sum() / kept.sum()


def wide_map(student_vocab=203, teacher_vocab=257, matched=150, seed=0):
    """A map over rows wider than a SIMD vector (the C++ pass's vector loop, gathers and tail all run): the matched
    pairs drawn at random on both sides."""
    generator = torch.Generator().manual_seed(seed)
    student_ids = torch.randperm(student_vocab, generator=generator)[:matched]
    teacher_ids = torch.randperm(teacher_vocab, generator=generator)[:matched]
    order = student_ids.argsort()
    return kdfast.VocabMap(student_ids[order].contiguous(), teacher_ids[order].contiguous(), student_vocab,
                           teacher_vocab)


def wide_rows(vocab_map, rows=7, seed=5):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab_map.student_size, generator=generator) * 2
    teacher = torch.randn(rows, vocab_map.teacher_size, generator=generator) * 2
    labels = torch.randint(0, vocab_map.student_size, (rows,), generator=generator)
    labels[1] = -100
    return student, teacher, labels


@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize("shift", [0.0, 10.0, 40.0, 120.0])
def test_mapped_with_a_vanishing_rest_stays_finite_and_exact(vocab_map, width, shift):
    """A student whose mass on its unmatched tokens is small (logits `shift` below the rest: at 120 it underflows
    float32, and counts e^-87.3 as a probability, as on every backend) and a teacher whose own rest
    underflows on some rows: the fused pass takes an unmatched target as q_j times P_r / Q_r while that ratio is
    moderate (shift 0, 10), as exp(x_j + spread) past e^20 (40) and as none under the floor (120), and agrees with
    the float64 bucket KL. Narrow rows (11 and 13 columns) run the pass's scalar tail alone; wide ones (203 and 257)
    its vector loop and gathers too."""
    if width == "wide":
        vocab_map = wide_map()
        student, teacher, labels = wide_rows(vocab_map)
    else:
        student, teacher, labels = aligned_rows(seed=4)
    rows = student.shape[0]
    rest = [s for s in range(vocab_map.student_size) if s not in vocab_map.student_ids.tolist()]
    student[:rows // 2, rest] -= shift
    teacher_rest = [t for t in range(vocab_map.teacher_size) if t not in vocab_map.teacher_ids.tolist()]
    teacher[rows // 2 + 1:, teacher_rest] -= 120.0
    s = student.clone().requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, teacher, labels, vocab_map=vocab_map, method="mapped", ce_weight=0.2,
                                           backend="cpu")
    loss.backward()
    s64 = student.double().requires_grad_()
    expected = bucket_kl_by_log_sum_exps(s64, teacher.double(), labels, vocab_map, ce_weight=0.2)
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("method, divergence", [("mapped", "forward_kl"), ("mapped", "reverse_kl"),
                                                ("uld", "forward_kl"), ("hybrid", "jsd")])
@pytest.mark.parametrize("layout", ["contiguous", "strided rows", "bfloat16"])
def test_inplace_backward_writes_the_same_gradient_over_the_logits(backend, method, divergence, layout):
    vocab_map = wide_map(seed=1)
    student, teacher, labels = wide_rows(vocab_map, seed=2)
    if layout == "bfloat16":
        student = student.bfloat16()
    settings = dict(vocab_map=vocab_map, method=method, divergence=divergence, ce_weight=0.3, backend=backend)
    fresh = student.clone().requires_grad_()
    expected = kdfast.cross_vocab_distill_loss(fresh, teacher, labels, **settings)
    expected.backward()
    if layout == "strided rows":  # every row contiguous, the rows 5 columns apart
        storage = torch.zeros(student.shape[0], student.shape[1] + 5)
        storage[:, :student.shape[1]] = student
        work = storage[:, :student.shape[1]]
    else:
        work = student.clone()
    leaf = work.requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(leaf, teacher, labels, inplace_backward=True, **settings)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    tolerance = dict(rtol=1e-2, atol=1e-4) if layout == "bfloat16" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(leaf.grad, fresh.grad, **tolerance)
    torch.testing.assert_close(leaf.detach(), fresh.grad, **tolerance), "the logits' storage holds the gradient"


def test_inplace_backward_refuses_an_alignment(vocab_map):
    student, teacher, labels = aligned_rows()
    alignment = kdfast.align_tokenizations(torch.arange(6), torch.tensor([[i, i + 1] for i in range(6)]),
                                           torch.arange(6), torch.tensor([[i, i + 1] for i in range(6)]))
    with pytest.raises(ValueError, match="inplace_backward=True takes rows without an alignment"):
        kdfast.cross_vocab_distill_loss(student.requires_grad_(), teacher, vocab_map=vocab_map, method="mapped",
                                        alignment=alignment, inplace_backward=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # Triton: tests/test_mapped_kernels.py
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_mapped_keeps_the_teachers_rest_where_the_student_matches_every_column(backend, divergence):
    """The student's rest is empty (Q_r = 0) but the teacher's holds real mass off the map: its term (a constant of
    the row: -beta P_r log beta under JSD, P_r / 2 under TVD) stays in the loss, as the float64 reference keeps it.
    The sparse algebra alone had dropped it as the rounding of ids that cover the row (JSD 0.380 against 0.485)."""
    student_vocab = {f"tok{t}": s for s, t in enumerate([5, 0, 12, 3, 9, 7, 1])}
    vmap = kdfast.VocabMap.from_tokenizers(Vocabulary(student_vocab), Vocabulary(TEACHER_VOCAB))
    generator = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(5, 7, generator=generator) * 2, torch.randn(5, 13, generator=generator) * 2
    labels = torch.tensor([3, -100, 0, 6, 2])
    settings = dict(vocab_map=vmap, method="mapped", divergence=divergence, beta=0.3, temperature=1.5,
                    teacher_temperature=0.8, ce_weight=0.2, reduction="none")
    device = device_for(backend)
    s = student.clone().to(device).requires_grad_()
    loss = kdfast.cross_vocab_distill_loss(s, teacher.to(device), labels.to(device), backend=backend, **settings)
    loss.sum().backward()
    s64 = student.double().requires_grad_()
    expected = cross_vocab_distill_loss_reference(s64, teacher.double(), labels, **settings)
    expected.sum().backward()
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)


def test_a_gpu_chunk_holds_more_rows_than_a_cpu_chunk():
    """A chunk is sized by the device: near the CPU's caches, and on a GPU large enough to fill it in one launch."""
    from kdfast.cross_vocab_rows import chunks

    assert len(chunks(2048, 40000, device=torch.device("cpu"))) == 20
    assert len(chunks(2048, 40000, device=torch.device("cuda"))) == 3
    assert chunks(10, 40000, chunk_rows=4, device="cuda") == [slice(0, 4), slice(4, 8), slice(8, 10)]


@pytest.mark.parametrize("dtype, calls", [(torch.float32, 1), (torch.bfloat16, 3)])
def test_the_cpu_mapped_pass_takes_float32_rows_in_one_call(monkeypatch, vocab_map, dtype, calls):
    """"mapped"'s one C++ pass reads float32 rows where they lie and writes the gradient there: all rows in one call
    (its threads started once), whatever the chunk size; 16-bit rows, which it converts a chunk at a time, stay in
    chunks (here of 4 rows)."""
    import kdfast.cross_vocab_rows as rows

    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 13 * 4)
    seen = []
    fused = rows._fused_mapped
    monkeypatch.setattr(rows, "_fused_mapped", lambda student, *rest: seen.append(student.shape[0]) or
                        fused(student, *rest))
    student, teacher, labels = (x.to(dtype) if x.is_floating_point() else x for x in aligned_rows(seed=6, rows=9))
    for in_place in (False, True):
        seen.clear()
        s = student.clone().requires_grad_()
        loss = kdfast.cross_vocab_distill_loss(s, teacher, labels, vocab_map=vocab_map, method="mapped",
                                               divergence="jsd", ce_weight=0.4, backend="cpu",
                                               inplace_backward=in_place)
        (grad,) = torch.autograd.grad(loss, s)
        assert len(seen) == calls and sum(seen) == 9
        s64 = student.double().requires_grad_()
        expected = cross_vocab_distill_loss_reference(s64, teacher.double(), labels, vocab_map=vocab_map,
                                                      method="mapped", divergence="jsd", ce_weight=0.4)
        expected.backward()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=1e-6)
        torch.testing.assert_close(grad.double(), s64.grad, rtol=tolerance, atol=1e-5 if calls == 1 else 1e-3)


@pytest.mark.parametrize("method", ["mapped", "uld", "hybrid"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_of_rows_give_the_loss_and_gradient_of_one_chunk(monkeypatch, vocab_map, backend, method):
    """Every chunk size gives one call's loss and gradient: chunks of 1, 2 and 4 of 9 rows against all 9 at once (the
    C++ "mapped" pass takes float32 rows in one call whatever the size, the test above)."""
    import kdfast.cross_vocab_rows as rows

    device = device_for(backend)
    student, teacher, labels = (x.to(device) for x in aligned_rows(seed=5, rows=9))

    def loss_and_grad():
        s = student.detach().clone().requires_grad_()
        divergence = {} if method == "uld" else {"divergence": "jsd"}
        loss = kdfast.cross_vocab_distill_loss(s, teacher, labels, vocab_map=vocab_map, method=method,
                                               temperature=1.5, ce_weight=0.4, backend=backend, **divergence)
        loss.backward()
        return loss.detach(), s.grad

    whole = loss_and_grad()
    for rows_per_chunk in (1, 2, 4):
        width = 13  # the teacher's vocabulary, the wider of the two
        monkeypatch.setattr(rows, "CHUNK_ELEMENTS", width * rows_per_chunk)
        monkeypatch.setattr(rows, "GPU_CHUNK_ELEMENTS", width * rows_per_chunk)
        chunked = loss_and_grad()
        torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-7)
