"""Routed teachers (`weights=` each row's teacher, an integer tensor): the loss and gradients of its one-hot weights,
in the fused linear form with only the row's own head run on it (a teacher's hidden states of every row, or of its
own rows alone), each teacher's share of the divergence in the components, and clear errors."""

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast

V, H = 40, 12
HIDDEN = (12, 20, 8)  # the teachers' hidden sizes


def _inputs(rows=29, teachers=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, H, generator=generator)
    weight = torch.randn(V, H, generator=generator) * 0.5
    bias = torch.randn(V, generator=generator)
    hidden = [torch.randn(rows, size, generator=generator) for size in HIDDEN[:teachers]]
    heads = [torch.randn(V, size, generator=generator) * 0.5 for size in HIDDEN[:teachers]]
    labels = torch.randint(0, V, (rows,), generator=generator)
    labels[[2, 11]] = -100
    route = torch.randint(0, teachers, (rows,), generator=generator)
    route[5:14] = teachers - 1  # a long run of one teacher across chunks
    return student, weight, bias, hidden, heads, labels, route


def _run(student, weight, bias, hidden, heads, labels, weights, grad_output=None, **settings):
    student, weight, bias = (t.clone().requires_grad_() for t in (student, weight, bias))
    loss, parts = kdfast.linear_multi_teacher_distill_loss(
        student, weight, hidden, heads, labels, student_bias=bias, weights=weights, return_components=True,
        teacher_bias=[None, torch.linspace(-1, 1, V, device=student.device), None][:len(hidden)],
        teacher_softcap=[None, 3.0, None][:len(hidden)], **settings)
    loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), parts, student.grad, weight.grad, bias.grad


def _own_rows(hidden, route):
    return [rows[route == index] for index, rows in enumerate(hidden)]


@pytest.mark.parametrize("teachers", [1, 2, 3])
@pytest.mark.parametrize("divergence,combine", [("forward_kl", "mixture"), ("jsd", "average"),
                                                ("reverse_kl", "mixture"), ("tvd", "average")])
@pytest.mark.parametrize("own_rows", [False, True])
def test_routed_equals_its_one_hot(teachers, divergence, combine, own_rows):
    student, weight, bias, hidden, heads, labels, route = _inputs(teachers=teachers)
    settings = dict(divergence=divergence, combine=combine, ce_weight=0.3, temperature=1.5, chunk_size=6)
    one_hot = torch.nn.functional.one_hot(route, teachers).float()
    expected = _run(student, weight, bias, hidden, heads, labels, one_hot, **settings)
    routed = _run(student, weight, bias, _own_rows(hidden, route) if own_rows else hidden, heads, labels, route,
                  **settings)
    torch.testing.assert_close(routed[0], expected[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(routed[2:], expected[2:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Each teacher's share: its own rows' divergence (the one-hot's per-row divergence where it is routed).
    per_row = kdfast.linear_multi_teacher_distill_loss(
        student, weight, hidden, heads, labels, student_bias=bias, weights=one_hot, return_components="per_row",
        teacher_bias=[None, torch.linspace(-1, 1, V), None][:teachers], teacher_softcap=[None, 3.0, None][:teachers],
        **settings)[1].teachers
    kept = (labels != -100).sum()
    torch.testing.assert_close(routed[1].teachers, (per_row * one_hot).sum(0) / kept, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(routed[1].teachers.sum(), routed[1].kd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_equals_its_one_hot_on_every_backend(backend):
    """The routed chunk (one float32 buffer of each row's own teacher) is a dense teacher to every backend's kernel."""
    device = device_for(backend)
    student, weight, bias, hidden, heads, labels, route = (
        [t.to(device) for t in value] if isinstance(value, list) else value.to(device) for value in _inputs())
    settings = dict(divergence="jsd", ce_weight=0.3, chunk_size=6, backend=backend)
    expected = _run(student, weight, bias, hidden, heads, labels, torch.nn.functional.one_hot(route, 3).float(),
                    **settings)
    routed = _run(student, weight, bias, _own_rows(hidden, route), heads, labels, route, **settings)
    for got, want in zip((routed[0], *routed[2:]), (expected[0], *expected[2:])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_per_row_losses_and_their_gradients_equal_the_one_hots():
    student, weight, bias, hidden, heads, labels, route = _inputs()
    grad_output = torch.rand(len(route), generator=torch.Generator().manual_seed(3))
    one_hot = torch.nn.functional.one_hot(route, 3).float()
    settings = dict(divergence="jsd", reduction="none", chunk_size=7, grad_output=grad_output)
    expected = _run(student, weight, bias, hidden, heads, labels, one_hot, **settings)
    routed = _run(student, weight, bias, _own_rows(hidden, route), heads, labels, route, **settings)
    for got, want in zip((routed[0], *routed[2:]), (expected[0], *expected[2:])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert routed[1].teachers.shape == (len(route), 3)


def test_a_routed_row_reads_its_own_teacher_alone():
    """Every other teacher's hidden states at that row are NaN: a head run on a row not routed to it would show."""
    student, weight, bias, hidden, heads, labels, route = _inputs()
    poisoned = [rows.masked_fill((route != index)[:, None], float("nan")) for index, rows in enumerate(hidden)]
    expected = _run(student, weight, bias, hidden, heads, labels, route, chunk_size=4)
    routed = _run(student, weight, bias, poisoned, heads, labels, route, chunk_size=4)
    assert torch.isfinite(routed[0]) and all(torch.isfinite(grad).all() for grad in routed[2:])
    torch.testing.assert_close(routed[0], expected[0])


def test_a_teacher_with_no_rows_takes_an_empty_tensor():
    student, weight, bias, hidden, heads, labels, _ = _inputs()
    route = torch.zeros(len(labels), dtype=torch.long)
    route[::3] = 2
    single = kdfast.linear_distill_loss(student, weight, hidden[0], heads[0], labels, student_bias=bias,
                                        ce_weight=0.3)
    routed = kdfast.linear_multi_teacher_distill_loss(  # teacher 2 is teacher 0 again; teacher 1 has no rows
        student, weight, [hidden[0][route == 0], torch.empty(0, HIDDEN[1]), hidden[0][route == 2]],
        [heads[0], heads[1], heads[0]], labels, student_bias=bias, weights=route, ce_weight=0.3)
    torch.testing.assert_close(routed, single)


@pytest.mark.parametrize("fp32_logits", [False, True])
def test_under_autocast_a_routed_teacher_is_a_single_teacher(fp32_logits):
    """Under a bf16 autocast the routed chunk holds a single teacher's logits dtype (bf16, or float32 logits when
    asked for): every row routed to teacher 0 gives `linear_distill_loss` against it, to the bit."""
    student, weight, bias, hidden, heads, labels, _ = _inputs()
    route = torch.zeros(len(labels), dtype=torch.long)
    settings = dict(divergence="reverse_kl", ce_weight=0.3, chunk_size=8, fp32_logits=fp32_logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = kdfast.linear_multi_teacher_distill_loss(student, weight, [hidden[0], hidden[1][:0]], heads[:2],
                                                          labels, weights=route, **settings)
        single = kdfast.linear_distill_loss(student, weight, hidden[0], heads[0], labels, **settings)
    assert torch.equal(routed, single)


@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_the_logits_form_takes_a_routing_as_its_one_hot(combine):
    generator = torch.Generator().manual_seed(1)
    student, teachers = torch.randn(6, 5, V, generator=generator), torch.randn(3, 6, 5, V, generator=generator)
    labels = torch.randint(0, V, (6, 5), generator=generator)
    route = torch.randint(0, 3, (6, 5), generator=generator)
    settings = dict(divergence="jsd", combine=combine, ce_weight=0.2, return_components=True)
    routed = kdfast.multi_teacher_distill_loss(student, teachers, labels, weights=route, **settings)
    expected = kdfast.multi_teacher_distill_loss(student, teachers, labels,
                                                 weights=torch.nn.functional.one_hot(route, 3).float(), **settings)
    torch.testing.assert_close(routed[0], expected[0])
    torch.testing.assert_close(routed[1].teachers, expected[1].teachers)


def test_as_many_rows_as_teachers_an_integer_tensor_is_a_routing():
    generator = torch.Generator().manual_seed(2)
    student, teachers = torch.randn(2, V, generator=generator), torch.randn(2, 2, V, generator=generator)
    routed = kdfast.multi_teacher_distill_loss(student, teachers, weights=torch.tensor([1, 0]))
    expected = kdfast.multi_teacher_distill_loss(student, teachers, weights=torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(routed, expected)


def test_bad_routings_are_clear_errors():
    student, weight, bias, hidden, heads, labels, route = _inputs()
    with pytest.raises(ValueError, match=r"must index the 3 teachers \(0..2\), got values from 0 to 3"):
        kdfast.linear_multi_teacher_distill_loss(student, weight, hidden, heads, labels, weights=route
                                                 .index_fill(0, torch.tensor([0]), 3))
    with pytest.raises(ValueError, match=r"must index the 3 teachers \(0..2\), got values from -1 to 2"):
        kdfast.multi_teacher_distill_loss(torch.randn(len(route), V), torch.randn(3, len(route), V),
                                          weights=route.index_fill(0, torch.tensor([0]), -1))
    own = _own_rows(hidden, route)
    with pytest.raises(ValueError, match=r"teacher_hidden\[1\] holds .* rows: it must hold every row \(29\) or only "
                                         r"the .* rows routed to teacher 1"):
        kdfast.linear_multi_teacher_distill_loss(student, weight, [own[0], own[1][1:], own[2]], heads, labels,
                                                 weights=route)
    with pytest.raises(ValueError, match="teacher 0: teacher_hidden leading shape"):  # own rows need a routing
        kdfast.linear_multi_teacher_distill_loss(student, weight, own, heads, labels,
                                                 weights=torch.nn.functional.one_hot(route, 3).float())
