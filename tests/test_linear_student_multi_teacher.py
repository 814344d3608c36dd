"""`kdfast.linear_student_multi_teacher_distill_loss`: several teachers given as their logits, the student's head
fused. Held to the float64 reference of the student's materialised logits (loss, gradients to hidden, weight and bias,
each teacher's divergence) on every backend, both combine modes, every weights mode and reduction; teachers in 16 bits
and as views; routed rows (each teacher's logits of every row, or of its own rows alone) equal to the same teachers as
heads; a list mixing heads and given logits (`linear_multi_teacher_distill_loss` with a None head) equal to all heads;
one teacher equal to `linear_student_distill_loss`; the module; bad input named."""

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast
from kdfast.reference import multi_teacher_distill_loss_reference

ROWS, VOCAB, HIDDEN = (2, 9), 41, 8
SETTINGS = dict(divergence="jsd", beta=0.4, temperature=1.5, ce_weight=0.3)


def make_inputs(teachers=2, seed=0, device="cpu", teacher_dtype=torch.float32):
    """The student's hidden states, head and bias; each teacher's logits (and the hidden states and head that give
    them, for the forms with heads); labels with ignored rows. Drawn on the CPU: the same numbers on every device."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*ROWS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / 2
    bias = torch.randn(VOCAB, generator=generator)
    teacher_hidden = [torch.randn(*ROWS, HIDDEN + 2 * m, generator=generator) for m in range(teachers)]
    teacher_weight = [torch.randn(VOCAB, HIDDEN + 2 * m, generator=generator) for m in range(teachers)]
    logits = [(h @ w.t()).to(teacher_dtype) for h, w in zip(teacher_hidden, teacher_weight)]
    labels = torch.randint(0, VOCAB, ROWS, generator=generator)
    labels.view(-1)[::4] = -100
    moved = {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels, "logits": logits,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    return {key: [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
            for key, value in moved.items()}


def weights_for(mode, data, teachers=2):
    generator = torch.Generator().manual_seed(7)
    device = data["hidden"].device
    if mode == "static":
        return [float(m + 1) for m in range(teachers)]
    if mode == "rows":
        rows = torch.rand(*ROWS, teachers, generator=generator)
        rows[0, 0] = 0.0
        rows[0, 0, -1] = 1.0  # a routing one-hot row
        return rows.to(device)
    if mode == "routed":
        return torch.randint(0, teachers, ROWS, generator=generator).to(device)
    return mode


def student_leaves(data):
    return [data[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]


def backward_of(loss, reduction):
    weighted = loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).view(loss.shape)
    (weighted.sum() if reduction == "none" else loss).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["mixture", "average"])
@pytest.mark.parametrize("weights, teachers, reduction", [(None, 2, "mean"), ("static", 3, "sum"),
                                                          ("rows", 2, "none"), ("confidence", 3, "mean"),
                                                          ("min_ce", 2, "sum"), (None, 1, "none")])
def test_equals_the_float64_reference_of_the_students_logits(backend, combine, weights, teachers, reduction):
    device = device_for(backend)
    data = make_inputs(teachers, device=device)
    settings = dict(SETTINGS, combine=combine, reduction=reduction, weights=weights_for(weights, data, teachers))
    hidden, weight, bias = student_leaves(data)
    loss, parts = kdfast.linear_student_multi_teacher_distill_loss(
        hidden, weight, data["logits"], data["labels"], student_bias=bias, chunk_size=5, backend=backend,
        return_components=True, **settings)
    backward_of(loss, reduction)
    cpu = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in settings.items()}
    h64, w64, b64 = (data[name].cpu().double().requires_grad_(True) for name in ("hidden", "weight", "bias"))
    stacked = torch.stack([t.cpu().double() for t in data["logits"]])
    expected = multi_teacher_distill_loss_reference(h64 @ w64.t() + b64, stacked, data["labels"].cpu(), **cpu)
    backward_of(expected, reduction)
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    for got, want, name in ((hidden, h64, "hidden"), (weight, w64, "weight"), (bias, b64, "bias")):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-4, atol=1e-5, msg=name)
    # Each teacher's own divergence, as the logits-level loss reports it.
    _, expected_parts = kdfast.multi_teacher_distill_loss(
        (data["hidden"] @ data["weight"].t() + data["bias"]), data["logits"], data["labels"], backend="torch",
        return_components=True, **settings)
    torch.testing.assert_close(parts.teachers, expected_parts.teachers, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_teachers_and_views_are_read_as_given(backend, teacher_dtype):
    """A bf16 teacher beside a float32 one given as `logits[:, :-1]` of a longer tensor (not viewable as rows): the
    same loss and gradients as the contiguous float32 copies of both."""
    data = make_inputs(device=device_for(backend), teacher_dtype=teacher_dtype)
    longer = torch.cat([data["logits"][1].float(), data["logits"][1][:, :1].float()], dim=1)
    given = [data["logits"][0], longer[:, :-1]]
    copies = [t.float().contiguous() for t in given]
    results = []
    for teachers in (given, copies):
        hidden, weight, bias = student_leaves(data)
        loss = kdfast.linear_student_multi_teacher_distill_loss(hidden, weight, teachers, data["labels"],
                                                                student_bias=bias, chunk_size=4, backend=backend,
                                                                **SETTINGS)
        loss.backward()
        results.append((loss, hidden.grad, weight.grad, bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("combine", ["mixture", "average"])
@pytest.mark.parametrize("own_rows", [False, True])
def test_routed_rows_equal_the_same_teachers_as_heads(combine, own_rows):
    """Each row's teacher: its given logits of every row, or of its own rows alone ([n_m, V] in row order), give the
    loss, gradients and per-teacher shares of the teachers' heads."""
    data = make_inputs(3)
    route = weights_for("routed", data, 3)
    logits, hiddens = data["logits"], data["teacher_hidden"]
    if own_rows:
        logits = [t[route == m] for m, t in enumerate(logits)]
        hiddens = [h[route == m] for m, h in enumerate(hiddens)]
    settings = dict(SETTINGS, combine=combine, weights=route, return_components=True, chunk_size=5)
    results = []
    for call, teachers in ((kdfast.linear_student_multi_teacher_distill_loss, (logits,)),
                           (kdfast.linear_multi_teacher_distill_loss, (hiddens, data["teacher_weight"]))):
        hidden, weight, bias = student_leaves(data)
        loss, parts = call(hidden, weight, *teachers, data["labels"], student_bias=bias, **settings)
        loss.backward()
        results.append((loss, parts.teachers, hidden.grad, weight.grad, bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_heads_and_given_logits_mix_in_one_list(backend, combine):
    """`linear_multi_teacher_distill_loss` with teacher 1's head None and its logits in its place: every teacher as
    a head gives the same loss, components and gradients."""
    device = device_for(backend)
    data = make_inputs(2, device=device)
    settings = dict(SETTINGS, combine=combine, weights="confidence", return_components=True, chunk_size=4,
                    backend=backend)
    results = []
    for hiddens, heads in (([data["teacher_hidden"][0], data["logits"][1]], [data["teacher_weight"][0], None]),
                           (data["teacher_hidden"], data["teacher_weight"])):
        hidden, weight, bias = student_leaves(data)
        loss, parts = kdfast.linear_multi_teacher_distill_loss(hidden, weight, hiddens, heads, data["labels"],
                                                               student_bias=bias, **settings)
        loss.backward()
        results.append((loss, parts.teachers, hidden.grad, weight.grad, bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_teacher_is_the_single_given_logits_loss():
    data = make_inputs(1)
    results = []
    for call, teacher in ((kdfast.linear_student_multi_teacher_distill_loss, data["logits"]),
                          (kdfast.linear_student_distill_loss, data["logits"][0])):
        hidden, weight, bias = student_leaves(data)
        loss = call(hidden, weight, teacher, data["labels"], student_bias=bias, softcap=6.0, logit_scale=0.5,
                    chunk_size=5, **SETTINGS)
        loss.backward()
        results.append((loss, hidden.grad, weight.grad, bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_the_module_and_one_stacked_tensor():
    data = make_inputs(2)
    weights = weights_for("rows", data)
    module = kdfast.LinearStudentMultiTeacherDistillLoss(combine="average", chunk_size=3, weights=weights,
                                                         **SETTINGS)
    assert "combine='average'" in repr(module) and "chunk_size=3" in repr(module)
    got = module(data["hidden"], data["weight"], torch.stack(data["logits"]), data["labels"],
                 student_bias=data["bias"])
    want = kdfast.linear_student_multi_teacher_distill_loss(data["hidden"], data["weight"], data["logits"],
                                                            data["labels"], student_bias=data["bias"],
                                                            weights=weights, combine="average", **SETTINGS)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="combine must be one of"):
        kdfast.LinearStudentMultiTeacherDistillLoss(combine="sum")
    with pytest.raises(TypeError, match="unknown loss setting"):
        kdfast.LinearStudentMultiTeacherDistillLoss(temprature=2.0)


@pytest.mark.parametrize("change, message", [
    ("narrow", r"teacher 1: teacher_logits vocab size 40 != student_weight vocab size 41"),
    ("rows", r"teacher 0: teacher_logits leading shape \(2, 8\) must equal student_hidden's \(2, 9\)"),
    ("grad", "teacher 1: teacher_logits requires grad"),
    ("int", "teacher 0: teacher_logits must be float32, bfloat16 or float16"),
    ("empty", "teacher_logits must be a non-empty list"),
    ("weights", r"weights must hold 2 numbers \(one per teacher\)"),
])
def test_bad_input_is_named(change, message):
    data = make_inputs(2)
    logits, weights = list(data["logits"]), None
    if change == "narrow":
        logits[1] = logits[1][..., :-1]
    elif change == "rows":
        logits[0] = logits[0][:, :-1]
    elif change == "grad":
        logits[1] = logits[1].clone().requires_grad_(True)
    elif change == "int":
        logits[0] = logits[0].long()
    elif change == "empty":
        logits = []
    elif change == "weights":
        weights = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=message):
        kdfast.linear_student_multi_teacher_distill_loss(data["hidden"], data["weight"], logits, data["labels"],
                                                         weights=weights)


def test_a_bias_for_a_teacher_given_as_logits_is_refused():
    data = make_inputs(2)
    with pytest.raises(ValueError, match=r"teacher_bias\[1\] is given but teacher_weight\[1\] is None"):
        kdfast.linear_multi_teacher_distill_loss(data["hidden"], data["weight"], data["logits"],
                                                 [data["teacher_weight"][0], None], data["labels"],
                                                 teacher_bias=[None, data["bias"]])
