"""kdfast.linear_student_distill_loss (the student's hidden states and LM head, the teacher's logits as given) against
its float64 reference on every backend: divergences, reductions, bias, logit scale and softcap, 16-bit teacher logits,
views of the logits, padded vocabularies, row weights, the module, torch.compile, and the bad input it refuses."""

import itertools

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import linear_loss_matches_reference, make_labels

import kdfast
from kdfast.linear_chunks import TeacherLogits
from kdfast.reference import linear_student_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def make_inputs(lead_shape, hidden, vocab, dtype=torch.float32, teacher_dtype=torch.float32, bias=True,
                device="cpu"):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    teacher = (torch.randn(*lead_shape, vocab, generator=generator) * 2).to(teacher_dtype).to(device)
    return dict(student_hidden=randn(*lead_shape, hidden), student_weight=randn(vocab, hidden, scale=0.5),
                student_bias=randn(vocab) if bias else None, teacher_logits=teacher)


def assert_matches_reference(inputs, labels, backend="auto", **options):
    return linear_loss_matches_reference(kdfast.linear_student_distill_loss, linear_student_distill_loss_reference,
                                         inputs, labels, TOLERANCES, backend=backend, **options)


def _grid():
    cases = []
    settings = itertools.cycle(itertools.product([1.0, 2.0, 0.7], ["mean", "sum", "none"]))
    extras = itertools.cycle([("none", True, None, 1.0), ("some", False, 20.0, 0.5), ("all", True, None, 1.0),
                              ("some", True, 3.0, 1.3)])
    for backend, divergence in itertools.product(BACKENDS, DIVERGENCES):
        temperature, reduction = next(settings)
        ignore, bias, softcap, scale = next(extras)
        cases.append(pytest.param(backend, divergence, temperature, reduction, ignore, bias, softcap, scale,
                                  id=f"{backend}-{divergence}-T{temperature}-{reduction}-{ignore}-b{bias}-c{softcap}"
                                     f"-s{scale}"))
    return cases


@pytest.mark.parametrize("backend,divergence,temperature,reduction,ignore,bias,softcap,scale", _grid())
def test_matches_reference(backend, divergence, temperature, reduction, ignore, bias, softcap, scale):
    device = device_for(backend)
    inputs = make_inputs((2, 13), 24, 211, bias=bias, device=device)
    if divergence != "reverse_kl":  # (where the student's mass meets a teacher's 0 reverse KL is infinite)
        inputs["teacher_logits"][0, 2, 5:40] = float("-inf")  # tokens the teacher rules out
    labels = make_labels((2, 13), 211, ignore, device=device)
    assert_matches_reference(inputs, labels, backend, divergence=divergence, temperature=temperature,
                             reduction=reduction, ce_weight=0.5, beta=0.3, softcap=softcap, logit_scale=scale,
                             chunk_size=7)


@pytest.mark.parametrize("chunk_size", [1, 9, 64, "auto"])
def test_chunk_sizes(chunk_size):
    inputs = make_inputs((40,), 16, 300)
    assert_matches_reference(inputs, make_labels((40,), 300, "some"), chunk_size=chunk_size, ce_weight=0.5,
                             temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_teacher_logits(backend, teacher_dtype):
    """A teacher's logits kept in 16 bits (its forward under autocast) are read as they are: the reference takes
    the same rounded values."""
    device = device_for(backend)
    inputs = make_inputs((3, 11), 16, 257, teacher_dtype=teacher_dtype, device=device)
    assert_matches_reference(inputs, make_labels((3, 11), 257, "some", device=device), backend, chunk_size=8,
                             ce_weight=0.3, temperature=2.0, divergence="jsd")


@pytest.mark.parametrize("fp32_logits", [False, True])
def test_a_16_bit_student(fp32_logits):
    """bf16 hidden states and head (their GEMM in bf16, its logits rounded or kept in float32) against bf16 teacher
    logits, within bf16's tolerance of the float64 reference on the same rounded inputs."""
    inputs = make_inputs((4, 9), 32, 301, dtype=torch.bfloat16, teacher_dtype=torch.bfloat16)
    assert_matches_reference(inputs, make_labels((4, 9), 301, "some"), chunk_size=10, ce_weight=0.5,
                             temperature=2.0, fp32_logits=fp32_logits)


def test_a_shifted_view_of_the_logits_is_read_in_place():
    """`logits[:, :-1]` of a [B, S, V] teacher is not one run of rows: each chunk gathers its own rows, and the
    whole tensor is never copied."""
    full = make_inputs((2, 10), 16, 97)
    teacher = torch.randn(2, 11, 97, generator=torch.Generator().manual_seed(5))
    inputs = dict(full, teacher_logits=teacher[:, :-1])
    assert_matches_reference(inputs, make_labels((2, 10), 97, "some"), chunk_size=6, ce_weight=0.5)
    rows = TeacherLogits(teacher[:, :-1]).rows(slice(8, 14), 97)
    assert rows.shape == (6, 97) and rows.is_contiguous()
    torch.testing.assert_close(rows, teacher[:, :-1].reshape(-1, 97)[8:14], rtol=0, atol=0)


@pytest.mark.parametrize("view", ["transposed", "every_other_row", "columns_cut", "contiguous"])
def test_chunk_rows_of_any_view(view):
    """`TeacherLogits.rows` gives each chunk's flat rows of whatever view it is handed, in the view's row order."""
    base = torch.randn(6, 5, 40, generator=torch.Generator().manual_seed(9))
    logits, vocab = {"transposed": (base.transpose(0, 1), 40), "every_other_row": (base[:, ::2], 40),
                     "columns_cut": (base[..., :33], 33), "contiguous": (base, 40)}[view]
    flat = logits.reshape(-1, logits.shape[-1])[:, :vocab]
    teacher = TeacherLogits(logits)
    for start, stop in ((0, 7), (7, 8), (8, flat.shape[0])):
        rows = teacher.rows(slice(start, stop), vocab)
        assert rows.is_contiguous()
        torch.testing.assert_close(rows, flat[start:stop], rtol=0, atol=0)


def test_padded_vocabularies():
    """`vocab_size`: the teacher's logits and the student's head both wider than the shared vocabulary."""
    inputs = make_inputs((12,), 16, 120)
    inputs["student_weight"] = inputs["student_weight"][:110]
    inputs["student_bias"] = inputs["student_bias"][:110]
    labels = make_labels((12,), 100, "some")
    assert_matches_reference(inputs, labels, vocab_size=100, chunk_size=5, ce_weight=0.5, temperature=2.0)


def test_equals_the_dense_head_form():
    """Given the teacher head's own logits it is `linear_distill_loss`, loss and gradients."""
    generator = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(30, 16, generator=generator), torch.randn(150, 16, generator=generator)
    ht, wt = torch.randn(30, 24, generator=generator), torch.randn(150, 24, generator=generator)
    labels = make_labels((30,), 150, "some")
    settings = dict(temperature=2.0, ce_weight=0.5, divergence="reverse_kl", chunk_size=8, return_components=True)
    a = hs.clone().requires_grad_()
    ours, our_parts = kdfast.linear_student_distill_loss(a, ws, ht @ wt.t(), labels, **settings)
    ours.backward()
    b = hs.clone().requires_grad_()
    theirs, their_parts = kdfast.linear_distill_loss(b, ws, ht, wt, labels, **settings)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for name in ("kd", "ce", "entropy", "accuracy"):
        torch.testing.assert_close(getattr(our_parts, name), getattr(their_parts, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_row_weights_and_num_items():
    """Row weights scale each row as reduction="none" times the weights would; num_items_in_batch divides."""
    inputs = make_inputs((20,), 16, 90)
    labels = make_labels((20,), 90, "some")
    weights = torch.rand(20, generator=torch.Generator().manual_seed(4))
    per_row = kdfast.linear_student_distill_loss(**inputs, labels=labels, reduction="none", ce_weight=0.5)
    weighed = kdfast.linear_student_distill_loss(**inputs, labels=labels, reduction="sum", ce_weight=0.5,
                                                 row_weights=weights)
    torch.testing.assert_close(weighed, (per_row * weights).sum(), rtol=1e-6, atol=1e-6)
    by_items = kdfast.linear_student_distill_loss(**inputs, labels=labels, ce_weight=0.5, num_items_in_batch=7)
    torch.testing.assert_close(by_items, per_row.sum() / 7, rtol=1e-6, atol=1e-6)


def test_the_module_and_ce_alone():
    inputs = make_inputs((15,), 16, 80)
    labels = make_labels((15,), 80, "some")
    module = kdfast.LinearStudentDistillLoss(temperature=2.0, ce_weight=0.5, softcap=10.0, chunk_size=4)
    assert "ce_weight=0.5" in repr(module)
    torch.testing.assert_close(module(**inputs, labels=labels),
                               kdfast.linear_student_distill_loss(**inputs, labels=labels, temperature=2.0,
                                                                  ce_weight=0.5, softcap=10.0, chunk_size=4))
    # Without a divergence the teacher is not read: None is taken, and the loss is the CE.
    ce = kdfast.linear_student_distill_loss(inputs["student_hidden"], inputs["student_weight"], None, labels,
                                            student_bias=inputs["student_bias"], kd_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(ce, kdfast.linear_cross_entropy(inputs["student_hidden"], inputs["student_weight"],
                                                               labels, bias=inputs["student_bias"]))
    with pytest.raises(TypeError, match="LinearStudentDistillLoss.*teacher_logit_scale"):
        kdfast.LinearStudentDistillLoss(teacher_logit_scale=2.0)


def test_under_torch_compile():
    """A compiled step traces through it whole (`fullgraph=True`) and gives the eager loss and gradients, the
    teacher's logits a shifted view (taken as given, never copied whole)."""
    inputs = make_inputs((2, 9), 16, 70)
    inputs["teacher_logits"] = torch.randn(2, 10, 70, generator=torch.Generator().manual_seed(8))[:, 1:]
    labels = make_labels((2, 9), 70, "some")

    def step(hidden, weight, teacher, labels):
        return kdfast.linear_student_distill_loss(hidden, weight, teacher, labels, temperature=2.0, ce_weight=0.5,
                                                  chunk_size=5)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        hidden = inputs["student_hidden"].clone().requires_grad_()
        loss = fn(hidden, inputs["student_weight"], inputs["teacher_logits"], labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change,message", [
    (dict(teacher_logits=torch.zeros(6, 49)), "teacher_logits vocab size 49 != student_weight vocab size 50"),
    (dict(teacher_logits=torch.zeros(5, 50)), r"teacher_logits leading shape \(5,\) must equal student_hidden's"),
    (dict(teacher_logits=torch.zeros(6, 50, dtype=torch.int32)), "teacher_logits must be float32, bfloat16"),
    (dict(teacher_logits=torch.zeros(6, 50, requires_grad=True)), "teacher_logits requires grad"),
    (dict(teacher_logits=None), "teacher_logits must be a torch.Tensor"),
    (dict(teacher_logits=torch.zeros(6, 40), vocab_size=45), "vocab_size=45 but teacher_logits covers only 40"),
    (dict(student_weight=torch.zeros(50, 7)), r"student_weight must have shape \[vocab, 8\]"),
])
def test_bad_input_is_named(change, message):
    arguments = dict(student_hidden=torch.zeros(6, 8), student_weight=torch.zeros(50, 8),
                     teacher_logits=torch.zeros(6, 50))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        kdfast.linear_student_distill_loss(**arguments)
