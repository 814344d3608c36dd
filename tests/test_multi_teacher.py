"""Several teachers at once, held to the float64 reference: every divergence, both combine modes, every weights mode,
M in {1, 2, 3}, on every backend, loss and gradient (M up to 7 on the C++ kernel, whose mixing changes past three);
with M = 1 both modes are the single-teacher loss; each teacher's own divergence in the components; bad input named."""

import itertools

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast
from kdfast.reference import distill_loss_reference, multi_teacher_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
WEIGHTS = [None, "static", "rows", "confidence", "min_ce"]
ROWS, VOCAB = 7, 37


def make_inputs(teachers: int, seed: int = 0, scale: float = 3.0, device="cpu"):
    """The same numbers on every device (drawn on the CPU), so that a GPU backend meets the CPU's cases."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(ROWS, VOCAB, generator=generator) * scale
    stacked = torch.randn(teachers, ROWS, VOCAB, generator=generator) * scale
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[2] = -100
    return student.to(device), stacked.to(device), labels.to(device)


def weights_for(mode, teachers: int, seed: int = 0, device="cpu"):
    generator = torch.Generator().manual_seed(seed + 1)
    if mode == "static":
        return [float(i + 1) for i in range(teachers)]
    if mode == "rows":
        rows = torch.rand(ROWS, teachers, generator=generator)
        rows[0] = 0.0
        rows[0, -1] = 1.0  # a routing one-hot row
        return rows.to(device)
    return mode


def on_cpu(value):
    """The float64 references run on the CPU whatever device the case ran on."""
    if isinstance(value, (list, tuple)):
        return [on_cpu(item) for item in value]
    return value.cpu() if isinstance(value, torch.Tensor) else value


def assert_matches_reference(student, teachers, labels, *, return_components=False, want="parts", **settings):
    """kdfast's loss and the student's gradient against the float64 reference; the components (or the gradient)."""
    s = student.clone().requires_grad_()
    outputs = kdfast.multi_teacher_distill_loss(s, teachers, labels, return_components=return_components, **settings)
    loss, parts = outputs if return_components else (outputs, None)
    loss.backward()
    settings = {key: on_cpu(value) for key, value in settings.items() if key != "backend"}
    s64 = student.detach().cpu().double().requires_grad_()
    stacked = torch.stack(on_cpu(list(teachers))).double()
    expected = multi_teacher_distill_loss_reference(s64, stacked, on_cpu(labels), **settings)
    expected.backward()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4, atol=2e-6)
    return s.grad if want == "gradient" else parts


def assert_each_teachers_divergence(student, teachers, labels, **settings):
    """With return_components: the loss as the reference's, and each teacher's own divergence per row (a routed-away
    teacher's too) as its single-teacher reference's."""
    assert_matches_reference(student, teachers, labels, return_components=True, **settings)
    _, parts = kdfast.multi_teacher_distill_loss(student, teachers, labels, reduction="none", return_components=True,
                                                 **settings)
    for index, teacher in enumerate(teachers):
        own = distill_loss_reference(student.double(), teacher.double(), labels, temperature=settings["temperature"],
                                     divergence=settings["divergence"], t2_scale=False, reduction="none")
        torch.testing.assert_close(parts.teachers[..., index].double(), own, rtol=1e-5, atol=2e-5)


# Every divergence and combine; the weights mode, M and the backend cycle through the cases.
CASES = [(divergence, combine, WEIGHTS[i % len(WEIGHTS)], 1 + i % 3)
         for i, (divergence, combine) in enumerate(itertools.product(DIVERGENCES, ["mixture", "average"]))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence, combine, weights, teachers", CASES)
def test_loss_and_gradient_equal_the_float64_reference(backend, divergence, combine, weights, teachers):
    student, stacked, labels = make_inputs(teachers, device=device_for(backend))
    settings = dict(divergence=divergence, beta=0.3, temperature=1.7, kd_weight=0.8, ce_weight=0.4,
                    weights=weights_for(weights, teachers, device=device_for(backend)), combine=combine)
    assert_matches_reference(student, list(stacked), labels, backend=backend, **settings)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["mixture", "average"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_teacher_is_the_single_teacher_loss(backend, combine, divergence):
    student, stacked, labels = make_inputs(1, seed=4, device=device_for(backend))
    settings = dict(divergence=divergence, temperature=2.0, ce_weight=0.3, backend=backend)
    one = kdfast.multi_teacher_distill_loss(student, stacked, labels, combine=combine, **settings)
    torch.testing.assert_close(one, kdfast.distill_loss(student, stacked[0], labels, **settings), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_num_items_and_components(reduction):
    student, stacked, labels = make_inputs(3, seed=2)
    settings = dict(temperature=1.5, ce_weight=0.5, reduction=reduction, weights=[1.0, 0.0, 3.0])
    loss, parts = kdfast.multi_teacher_distill_loss(student, stacked, labels, return_components=True, **settings)
    expected = multi_teacher_distill_loss_reference(student, stacked, labels, **settings)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert parts.teachers.shape == ((ROWS, 3) if reduction == "none" else (3,))
    for index in range(3):  # each teacher's own divergence, reduced as the loss
        own = distill_loss_reference(student, stacked[index], labels, temperature=1.5, kd_weight=1.0,
                                     t2_scale=False, reduction=reduction)
        torch.testing.assert_close(parts.teachers[..., index].double(), own, rtol=1e-5, atol=1e-6)
    if reduction == "mean":
        counted = kdfast.multi_teacher_distill_loss(student, stacked, labels, num_items_in_batch=11, **settings)
        torch.testing.assert_close(counted.double(), multi_teacher_distill_loss_reference(
            student, stacked, labels, num_items_in_batch=11, **settings), rtol=1e-5, atol=1e-6)


def test_a_zero_weight_teacher_drops_out_and_mixture_is_not_average():
    student, stacked, labels = make_inputs(3, seed=5)
    settings = dict(divergence="reverse_kl", temperature=1.0, ce_weight=0.2)
    dropped = kdfast.multi_teacher_distill_loss(student, stacked, labels, weights=[2.0, 0.0, 2.0], **settings)
    two = kdfast.multi_teacher_distill_loss(student, stacked[[0, 2]], labels, **settings)
    torch.testing.assert_close(dropped, two, rtol=1e-6, atol=1e-6)
    average = kdfast.multi_teacher_distill_loss(student, stacked, labels, combine="average", **settings)
    assert not torch.allclose(average, kdfast.multi_teacher_distill_loss(student, stacked, labels, **settings))


def test_min_ce_routes_each_row_to_its_best_teacher_and_ties_to_the_lowest_index():
    student, stacked, labels = make_inputs(2, seed=6)
    stacked[1, 3] = stacked[0, 3]  # a tie in row 3: the lowest index wins
    routed = kdfast.multi_teacher_distill_loss(student, stacked, labels, weights="min_ce", reduction="none")
    log_p = torch.log_softmax(stacked.double(), dim=-1)
    safe = labels.clamp(min=0)
    best = (log_p.gather(-1, safe.expand(2, -1)[..., None])[..., 0]).argmax(0)
    assert best[3] == 0
    for row in range(ROWS):
        if labels[row] == -100:
            assert routed[row] == 0
            continue
        own = distill_loss_reference(student[row], stacked[best[row], row], reduction="none")
        torch.testing.assert_close(routed[row].double(), own, rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_argument():
    student, stacked, labels = make_inputs(2)
    call = kdfast.multi_teacher_distill_loss
    cases = [
        (dict(teacher_logits=[stacked[0], stacked[1, :, :-1]]), r"teacher_logits\[1\]: teacher_logits vocab size"),
        (dict(teacher_logits=[stacked[0], stacked[1, :-1]]), r"teacher_logits\[1\]: teacher_logits shape"),
        (dict(teacher_logits=[]), "non-empty list"),
        (dict(weights=[1.0, 2.0, 3.0]), "weights must hold 2 numbers"),
        (dict(weights=[1.0, -1.0]), "weights must be finite, >= 0 and not all 0"),
        (dict(weights=[0.0, 0.0]), "not all 0"),
        (dict(weights=torch.zeros(ROWS, 2)), "weights are all 0 in row 0"),
        (dict(weights=-torch.ones(ROWS, 2)), "weights must be finite and >= 0 in every row"),
        (dict(weights="confidence", labels=None), "weights='confidence' .* needs labels"),
        (dict(weights="min_ce", labels=None), "weights='min_ce' .* needs labels"),
        (dict(weights="best"), "weights must be None"),
        (dict(combine="sum"), "combine must be one of"),
        (dict(vocab_range=(0, VOCAB)), "vocab_range needs a process_group"),
    ]
    for changes, message in cases:
        arguments = {"teacher_logits": list(stacked), "labels": labels, **changes}
        with pytest.raises(ValueError, match=message):
            call(student, arguments.pop("teacher_logits"), arguments.pop("labels"), **arguments)


def test_teachers_and_weights_get_no_gradient():
    student, stacked, labels = make_inputs(2)
    weights = torch.rand(ROWS, 2, requires_grad=True)
    s = student.clone().requires_grad_()
    kdfast.multi_teacher_distill_loss(s, list(stacked), labels, weights=weights).backward()
    assert weights.grad is None and s.grad is not None
    with pytest.raises(ValueError, match=r"teacher_logits\[0\]: teacher_logits requires grad"):
        kdfast.multi_teacher_distill_loss(s, [stacked[0].clone().requires_grad_(), stacked[1]], labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.25, 4.0])
@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_every_divergence_keeps_its_digits_at_large_logits(backend, temperature, combine):
    """The single-teacher promise, 1e-4 of float64 at |logits| ~ 1e3, holds for the mixture (its log-probabilities
    are centred before the temperature divides)."""
    student, stacked, labels = make_inputs(3, seed=9, scale=1e3 / 3)
    device = device_for(backend)
    for divergence in DIVERGENCES:
        settings = dict(divergence=divergence, temperature=temperature, weights=[1.0, 2.0, 3.0], combine=combine)
        loss = kdfast.multi_teacher_distill_loss(student.to(device), stacked.to(device), labels.to(device),
                                                 backend=backend, **settings)
        expected = multi_teacher_distill_loss_reference(student, stacked, labels, **settings)
        torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-4, atol=1e-4, msg=divergence)


def linear_inputs(teachers: int, hidden_sizes=(8, 12, 10), rows=ROWS, seed=3, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(rows, 6, generator=generator)
    student_weight = torch.randn(VOCAB, 6, generator=generator)
    hiddens = [torch.randn(rows, hidden_sizes[m], generator=generator) for m in range(teachers)]
    weights = [torch.randn(VOCAB, hidden_sizes[m], generator=generator) for m in range(teachers)]
    biases = [torch.randn(VOCAB, generator=generator) if m % 2 else None for m in range(teachers)]
    labels = torch.randint(0, VOCAB, (rows,), generator=generator)
    labels[1] = -100
    moved = [None if b is None else b.to(device) for b in biases]
    return (student_hidden.to(device), student_weight.to(device), [h.to(device) for h in hiddens],
            [w.to(device) for w in weights], moved, labels.to(device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["mixture", "average"])
@pytest.mark.parametrize("weights, teachers, reduction", [(None, 2, "mean"), ("confidence", 3, "sum"),
                                                          ("min_ce", 2, "none"), ("static", 3, "mean"),
                                                          ("rows", 1, "mean")])
def test_fused_linear_form_equals_the_reference_of_its_heads(backend, combine, weights, teachers, reduction):
    """Teachers of different hidden sizes, with and without a bias, chunks of 3 rows (a part chunk at the end)."""
    device = device_for(backend)
    student_hidden, student_weight, hiddens, head_weights, biases, labels = linear_inputs(teachers, device=device)
    settings = dict(divergence="jsd", beta=0.4, temperature=1.5, ce_weight=0.3, reduction=reduction,
                    weights=weights_for(weights, teachers, device=device), combine=combine)
    h, w = student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()
    loss = kdfast.linear_multi_teacher_distill_loss(h, w, hiddens, head_weights, labels, teacher_bias=biases,
                                                    chunk_size=3, backend=backend, **settings)
    (loss.sum() if reduction == "none" else loss).backward()
    h64, w64 = student_hidden.cpu().double().requires_grad_(), student_weight.cpu().double().requires_grad_()
    teacher_logits = [torch.nn.functional.linear(x.double(), y.double(), b.double() if b is not None else None)
                      for x, y, b in zip(on_cpu(hiddens), on_cpu(head_weights), on_cpu(biases))]
    settings = {key: on_cpu(value) for key, value in settings.items()}
    expected = multi_teacher_distill_loss_reference(h64 @ w64.t(), teacher_logits, labels.cpu(), **settings)
    (expected.sum() if reduction == "none" else expected).backward()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.cpu().double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.cpu().double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_fused_linear_form_names_bad_teachers():
    student_hidden, student_weight, hiddens, head_weights, biases, labels = linear_inputs(2)
    call = kdfast.linear_multi_teacher_distill_loss
    with pytest.raises(ValueError, match="teacher_weight must be a list/tuple of 2 entries"):
        call(student_hidden, student_weight, hiddens, head_weights[:1], labels)
    with pytest.raises(ValueError, match=r"teacher 1: teacher_weight must have shape \[vocab, 12\]"):
        call(student_hidden, student_weight, hiddens, [head_weights[0], head_weights[0]], labels)
    with pytest.raises(ValueError, match="teacher_bias must be None or a list/tuple of 2"):
        call(student_hidden, student_weight, hiddens, head_weights, labels, teacher_bias=biases[1])
    with pytest.raises(ValueError, match="weights='min_ce' .* needs labels"):
        call(student_hidden, student_weight, hiddens, head_weights, weights="min_ce")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_kernel_mixes_underflowed_columns_zero_weights_and_16_bit_teachers(divergence, teacher_dtype):
    """The C++ kernel mixes each row in its scratch: its fast path (a sum of the scaled exps, one log), the log-sum-exp
    where every teacher's entry underflowed (|t| / T ~ 600), a zero weight, a column of -inf in every teacher (in
    two of three under reverse KL, which a teacher without mass makes infinite), a part vector block at the row's
    end (V = 45), and 16-bit teachers widened row by row."""
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(5, 45, generator=generator) * 4
    teachers = (torch.randn(3, 5, 45, generator=generator) * 40).to(teacher_dtype)
    teachers[1:, :, 7] = -float("inf")
    if divergence != "reverse_kl":
        teachers[0, :, 7] = -float("inf")
    weights = torch.rand(5, 3, generator=generator) + 0.1
    weights[2, 1] = 0.0
    labels = torch.randint(0, 45, (5,), generator=generator)
    for temperature in (0.25, 1.0, 3.0):
        assert_matches_reference(student, teachers, labels, weights=weights, divergence=divergence,
                                 temperature=temperature, ce_weight=0.5, backend="cpu")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_kernel_streams_each_teacher_once_past_routed_away_teachers(divergence, teacher_dtype):
    """The C++ mixture's teacher passes take the max of the row read next and add the previous teacher's share: each
    row's routing skips the first, a middle, the last or all but one of four teachers, so the next row is another
    teacher or the student after any of them; rows of 203 columns (full vector blocks and a tail), the student's
    argmax anywhere in its row (the centring of reverse KL and JSD); with return_components every teacher's own
    divergence from the same passes, a routed-away teacher's too."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(7, 203, generator=generator) * 3
    student[1, 202] = 40.0  # the student's max in the tail
    student[2, 0] = 40.0
    teachers = (torch.randn(4, 7, 203, generator=generator) * 3).to(teacher_dtype)
    weights = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1],
                            [1, 1, 1, 1]], dtype=torch.float32) * (torch.rand(7, 4, generator=generator) + 0.5)
    labels = torch.randint(0, 203, (7,), generator=generator)
    for temperature in (0.5, 2.0):
        settings = dict(weights=weights, divergence=divergence, temperature=temperature, ce_weight=0.5, backend="cpu")
        assert_matches_reference(student, list(teachers), labels, **settings)
        assert_each_teachers_divergence(student, list(teachers), labels, **settings)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("count", [4, 5, 7])
def test_the_cpu_kernel_keeps_three_shares_pending_and_adds_the_rest_into_the_mixture_row(divergence, count):
    """The C++ mixture keeps up to three teachers' shares pending in a ring of four exps rows and sums them in its last
    pass; a counted teacher's pass with three pending adds the oldest into the mixture row (several times with seven).
    Rows route teachers away before, between and after the pending ones (with return_components a zero-weight
    teacher still takes a pass, its exps in the ring's free row); in place too (forward KL then sums p_bar in the
    kernel's exp pass, from the mixture row and three pending shares)."""
    generator = torch.Generator().manual_seed(count)
    rows, vocab = 9, 131
    student = torch.randn(rows, vocab, generator=generator) * 3
    teachers = list(torch.randn(count, rows, vocab, generator=generator) * 3)
    routed = torch.rand(rows, count, generator=generator) < 0.7
    weights = (torch.rand(rows, count, generator=generator) + 0.5) * routed
    weights[0] = 1.0  # every teacher counts
    weights[1, :] = 0.0
    weights[1, -1] = 1.0  # the last one alone
    weights[2, :3], weights[2, 3:] = 1.0, 0.0  # three pending, the rest routed away
    weights[3, ::2], weights[3, 1::2] = 0.0, 1.0  # every other one
    weights[weights.sum(dim=1) == 0, 0] = 1.0  # every row needs a teacher
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    settings = dict(weights=weights, divergence=divergence, temperature=1.5, ce_weight=0.5, backend="cpu")
    gradient = assert_matches_reference(student, teachers, labels, want="gradient", **settings)
    assert_each_teachers_divergence(student, teachers, labels, **settings)
    in_place = student.clone().requires_grad_()
    kdfast.multi_teacher_distill_loss(in_place, teachers, labels, inplace_backward=True, **settings).backward()
    torch.testing.assert_close(in_place.grad, gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_kl_average_is_one_mixing_call(monkeypatch, backend):
    """combine="average" under forward KL on a kernel that writes each teacher's own divergence: one mixing call (no
    single-teacher call), the loss, gradient and components of the float64 reference, in place too; a routed-away
    teacher whose row is all -inf (its own divergence NaN) adds nothing; the linear form the same."""
    if backend == "triton":
        pytest.importorskip("triton")
    from kdfast.backends import cpu_backend, triton_backend

    def refuse(*args, **kwargs):
        raise AssertionError("a single-teacher call ran")

    monkeypatch.setattr(cpu_backend if backend == "cpu" else triton_backend, "forward_rows", refuse)
    device = device_for(backend)
    student, stacked, labels = make_inputs(3, seed=8, device=device)
    weights = weights_for("rows", 3, seed=8, device=device)
    settings = dict(combine="average", weights=weights, temperature=1.5, ce_weight=0.4, backend=backend)
    parts = assert_matches_reference(student, stacked, labels, return_components=True, **settings)
    assert parts.teachers.shape == (3,)
    gradient = assert_matches_reference(student, stacked, labels, want="gradient", **settings)
    in_place = student.clone().requires_grad_()
    kdfast.multi_teacher_distill_loss(in_place, stacked, labels, inplace_backward=True, **settings).backward()
    torch.testing.assert_close(in_place.grad, gradient)
    assert in_place.grad.data_ptr() == in_place.data_ptr(), "one call writes the gradient over the logits"

    routed = weights.clone()
    routed[:, 1] = 0.0
    empty = stacked.clone()
    empty[1, 3] = -float("inf")  # teacher 1 has no mass in row 3, where its weight is 0
    expected = kdfast.multi_teacher_distill_loss(student, stacked, labels, **{**settings, "weights": routed})
    loss = kdfast.multi_teacher_distill_loss(student, empty, labels, **{**settings, "weights": routed})
    assert torch.isfinite(loss) and torch.equal(loss, expected)

    student_hidden, student_weight, hiddens, head_weights, biases, labels = linear_inputs(3)
    for components in (False, True):
        out = kdfast.linear_multi_teacher_distill_loss(
            student_hidden.to(device), student_weight.to(device), [h.to(device) for h in hiddens],
            [w.to(device) for w in head_weights], labels.to(device),
            teacher_bias=[None if b is None else b.to(device) for b in biases], combine="average", chunk_size=3,
            temperature=1.5, ce_weight=0.4, backend=backend, return_components=components)
        loss = out[0] if components else out
        student_logits = student_hidden.double() @ student_weight.double().t()
        teachers = torch.stack([torch.nn.functional.linear(x.double(), y.double(), None if b is None else b.double())
                                for x, y, b in zip(hiddens, head_weights, biases)])
        expected = multi_teacher_distill_loss_reference(student_logits, teachers, labels, combine="average",
                                                        temperature=1.5, ce_weight=0.4)
        torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-6)


def test_inplace_backward_writes_the_mixtures_gradient_over_the_student():
    student, stacked, labels = make_inputs(3, seed=4)
    expected = assert_matches_reference(student, stacked, labels, want="gradient", ce_weight=0.5, temperature=2.0)
    for backend in ("cpu", "torch"):
        s = student.clone().requires_grad_()
        storage = s.detach()
        kdfast.multi_teacher_distill_loss(s, stacked, labels, ce_weight=0.5, temperature=2.0, inplace_backward=True,
                                          backend=backend).backward()
        torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(storage, expected, rtol=1e-5, atol=1e-7, msg="the logits' storage holds it")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_fused_linear_form_gives_each_teachers_divergence(backend, combine):
    student_hidden, student_weight, hiddens, head_weights, biases, labels = linear_inputs(3)
    settings = dict(temperature=1.5, ce_weight=0.3, reduction="sum", combine=combine, weights=[1.0, 2.0, 0.5])
    loss, parts = kdfast.linear_multi_teacher_distill_loss(student_hidden, student_weight, hiddens, head_weights,
                                                           labels, teacher_bias=biases, chunk_size=3,
                                                           backend=backend, return_components=True, **settings)
    student_logits = student_hidden.double() @ student_weight.double().t()
    for index, (x, y, b) in enumerate(zip(hiddens, head_weights, biases)):
        teacher = torch.nn.functional.linear(x.double(), y.double(), b.double() if b is not None else None)
        own = distill_loss_reference(student_logits, teacher, labels, temperature=1.5, t2_scale=False,
                                     reduction="sum")
        torch.testing.assert_close(parts.teachers[index].double(), own, rtol=1e-5, atol=1e-5)
    assert parts.kd is not None and parts.entropy is not None


@pytest.mark.parametrize("weights", [None, "static", "rows"])
@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_the_ce_family_is_counted_once(combine, weights):
    """CE with label smoothing and the z-loss: once per row whatever M (the average folds them into one teacher's call
    when every row has the same weights)."""
    student, stacked, labels = make_inputs(3, seed=12)
    settings = dict(temperature=2.0, ce_weight=0.6, label_smoothing=0.1, z_loss_weight=1e-3, combine=combine,
                    weights=weights_for(weights, 3))
    parts = assert_matches_reference(student, stacked, labels, return_components=True, **settings)
    ce_only = distill_loss_reference(student, stacked[0], labels, kd_weight=0.0, ce_weight=1.0, label_smoothing=0.1)
    torch.testing.assert_close(parts.ce.double(), ce_only, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_heads_padded_past_the_vocabulary(backend, combine):
    """vocab_size: the columns both models share; the student's padding columns get no gradient."""
    generator = torch.Generator().manual_seed(13)
    student, teachers = torch.randn(6, 40, generator=generator), torch.randn(2, 6, 44, generator=generator)
    labels, weights = torch.randint(0, 30, (6,), generator=generator), torch.rand(6, 2, generator=generator)
    settings = dict(vocab_size=30, ce_weight=0.5, combine=combine, weights=weights, temperature=1.3)
    gradient = assert_matches_reference(student, teachers, labels, backend=backend, **settings, want="gradient")
    assert bool((gradient[:, 30:] == 0).all())


def test_static_shares_are_known_to_the_host_without_a_device_tensor():
    """The average gives the CE to its heaviest teacher's call by the host's shares: no device sync on a GPU."""
    from kdfast.teacher_weights import static_shares

    assert static_shares(None, 4) == (0.25,) * 4
    assert static_shares([1.0, 3.0], 2) == (0.25, 0.75)
    assert static_shares(torch.tensor([2.0, 2.0, 4.0]), 3) == (0.25, 0.25, 0.5)
    assert static_shares("min_ce", 2) is None and static_shares(torch.ones(5, 2), 2) is None


def test_more_teachers_than_one_call_mixes_is_refused_by_name():
    student = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="teacher_logits holds 65 teachers; at most 64"):
        kdfast.multi_teacher_distill_loss(student, torch.zeros(65, 2, 5))


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                              ("skew_forward_kl", 0.3), ("skew_reverse_kl", 0.3), ("tvd", 0.5)])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_the_cpu_kernel_writes_each_teachers_divergence_in_the_mixtures_call(monkeypatch, teacher_dtype, offset,
                                                                             divergence, beta):
    """return_components on the C++ kernel, every divergence: each teacher's own divergence comes from the mixing
    call itself (no single-teacher call runs), equal to the float64 reference per teacher in every row: a routed-away
    teacher (weight 0 in that row) included, -inf columns (reverse KL: infinite), an ignored row (0), logits far
    from 0 (centred sums), both forms."""
    from kdfast.backends import cpu_backend

    def refuse(*args, **kwargs):
        raise AssertionError("a single-teacher call ran for a teacher's own divergence")

    monkeypatch.setattr(cpu_backend, "forward_rows", refuse)
    student, stacked, labels = make_inputs(3, seed=21)
    student, stacked = student + offset, (stacked + offset).to(teacher_dtype)
    stacked[1, :, [4, 11]] = -float("inf")
    weights = weights_for("rows", 3, seed=21)
    for temperature in (1.0, 2.0):
        settings = dict(temperature=temperature, ce_weight=0.5, weights=weights, divergence=divergence, beta=beta,
                        backend="cpu")
        _, parts = kdfast.multi_teacher_distill_loss(student, stacked, labels, reduction="none",
                                                     return_components=True, **settings)
        for index in range(3):
            own = distill_loss_reference(student.double(), stacked[index].double(), labels, temperature=temperature,
                                         divergence=divergence, beta=beta, t2_scale=False, reduction="none")
            torch.testing.assert_close(parts.teachers[..., index].double(), own, rtol=1e-5, atol=2e-5)
        assert bool((parts.teachers[2] == 0).all()), "an ignored row has no divergence"
    student_hidden, student_weight, hiddens, head_weights, biases, labels = linear_inputs(3)
    _, parts = kdfast.linear_multi_teacher_distill_loss(student_hidden, student_weight, hiddens, head_weights, labels,
                                                        teacher_bias=biases, chunk_size=3, temperature=1.5,
                                                        reduction="sum", divergence=divergence, beta=beta,
                                                        backend="cpu", return_components=True)
    student_logits = student_hidden.double() @ student_weight.double().t()
    for index, (x, y, b) in enumerate(zip(hiddens, head_weights, biases)):
        teacher = torch.nn.functional.linear(x.double(), y.double(), b.double() if b is not None else None)
        own = distill_loss_reference(student_logits, teacher, labels, temperature=1.5, divergence=divergence,
                                     beta=beta, t2_scale=False, reduction="sum")
        torch.testing.assert_close(parts.teachers[index].double(), own, rtol=1e-5, atol=1e-5)


def test_teacher_divergences_in_the_kernel_are_refused_without_a_divergence():
    from kdfast.native_build import load_cpu_extension

    student, stacked, labels = make_inputs(2)
    ops = load_cpu_extension()
    log_weights = torch.full((ROWS, 2), -0.6931)
    from kdfast.kernel_abi import native_settings
    from kdfast.options import LossOptions

    ints, floats = native_settings(LossOptions(kd_weight=0.0, ce_weight=1.0))
    with pytest.raises(RuntimeError, match=r"teacher_divergences: .* in the kernel of a call with a divergence"):
        ops.mixture_distill_forward(student.unsqueeze(0), [t.unsqueeze(0) for t in stacked], log_weights, labels,
                                    torch.ones(1), None, torch.zeros(ROWS, 2), ints, floats)
    ints, floats = native_settings(LossOptions())
    with pytest.raises(RuntimeError, match=r"teacher_divergences must be a contiguous float32 \[7, 2\]"):
        ops.mixture_distill_forward(student.unsqueeze(0), [t.unsqueeze(0) for t in stacked], log_weights, labels,
                                    torch.ones(1), None, torch.zeros(ROWS, 3), ints, floats)


def test_a_teachers_own_temperature_through_its_logit_scale():
    """The README's recipe: teacher m softened at T_m where the loss's temperature is T, by teacher_logit_scale
    T / T_m, is the float64 mixture of softmax(z_m / T_m) against the student's softmax at T."""
    student_hidden, student_weight, hiddens, head_weights, _, labels = linear_inputs(2)
    temperature, own = 2.0, [1.0, 4.0]
    loss = kdfast.linear_multi_teacher_distill_loss(student_hidden, student_weight, hiddens, head_weights, labels,
                                                    temperature=temperature,
                                                    teacher_logit_scale=[temperature / t for t in own])
    # Logits already at each teacher's own temperature, then at the loss's: z_m / T_m.
    teachers = [(x.double() @ w.double().t()) * temperature / t for x, w, t in zip(hiddens, head_weights, own)]
    expected = multi_teacher_distill_loss_reference(student_hidden.double() @ student_weight.double().t(), teachers,
                                                    labels, temperature=temperature)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", ["distill_loss", "linear_distill_loss", "linear_student_distill_loss"])
def test_a_list_of_teachers_given_to_a_one_teacher_loss_names_the_several_teacher_ones(call):
    hidden, weight = torch.randn(4, 6), torch.randn(VOCAB, 6)
    teachers = {"distill_loss": (hidden @ weight.t(), [hidden @ weight.t()] * 2),
                "linear_distill_loss": (hidden, weight, [hidden, hidden], [weight, weight]),
                "linear_student_distill_loss": (hidden, weight, [hidden @ weight.t()] * 2)}[call]
    with pytest.raises(ValueError, match="got list; several teachers are kdfast.multi_teacher_distill_loss"):
        getattr(kdfast, call)(*teachers)
