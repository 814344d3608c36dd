"""`row_weights` of the fused linear losses: a weighted loss ("mean" or "sum") and its gradients equal the per-row
losses (reduction="none") weighted and summed, with the dense and the sparse teacher, eager and compiled, through
the function and the module; its components are weighted as the loss (but the accuracy); bad weights are refused."""

import pytest
import torch

import kdfast

ROWS, HIDDEN, VOCAB = 29, 12, 41


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    bias = torch.randn(VOCAB, generator=generator)
    teacher_hidden = torch.randn(ROWS, HIDDEN + 3, generator=generator)
    teacher_weight = torch.randn(VOCAB, HIDDEN + 3, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[::5] = -100
    ids = torch.randint(0, VOCAB, (ROWS, 6), generator=generator)
    logprobs = torch.log_softmax(torch.randn(ROWS, 6, generator=generator), -1) - 0.4
    row_weights = torch.rand(ROWS, generator=generator) * 2 - 0.3  # some negative: an advantage may be
    return hidden, weight, bias, teacher_hidden, teacher_weight, labels, ids, logprobs, row_weights


def _loss(form, hidden, weight, bias, inputs, **settings):
    _, _, _, teacher_hidden, teacher_weight, labels, ids, logprobs, _ = inputs
    common = dict(student_bias=bias, divergence="jsd", beta=0.3, temperature=1.7, ce_weight=0.4, chunk_size=7,
                  softcap=6.0, **settings)
    if form == "sparse":
        common["logit_scale"] = common.pop("softcap") / 6.0
        return kdfast.linear_sparse_distill_loss(hidden, weight, ids, logprobs, labels, **common)
    return kdfast.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, **common)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("form", ["dense", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_loss_equals_weighted_rows(form, reduction):
    inputs = _inputs()
    tensors = [t.clone().requires_grad_(True) for t in inputs[:3]]
    row_weights = inputs[-1]
    per_row = _loss(form, *tensors, inputs, reduction="none")
    expected = (per_row * row_weights).sum()
    if reduction == "mean":
        expected = expected / (inputs[5] != -100).sum()
    expected_grads = _grads(expected, tensors)
    loss, parts = _loss(form, *tensors, inputs, reduction=reduction, row_weights=row_weights, return_components=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for actual, wanted in zip(_grads(loss, tensors), expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)
    # The parts reduced with the same weights add up to the loss; the accuracy is still a share of the kept rows.
    rows = _loss(form, *inputs[:3], inputs, reduction="none", return_components=True)[1]
    factor = 1.0 / (inputs[5] != -100).sum() if reduction == "mean" else 1.0
    torch.testing.assert_close(parts.kd, (rows.kd * row_weights).sum() * factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.ce, (rows.ce * row_weights).sum() * factor, rtol=1e-5, atol=1e-6)
    kept = inputs[5] != -100
    torch.testing.assert_close(parts.accuracy, rows.accuracy[kept].mean())
    assert not torch.allclose(loss, _loss(form, *inputs[:3], inputs, reduction=reduction))  # the weights count


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_per_row_components_are_the_unweighted_rows(form):
    inputs = _inputs(1)
    _, parts = _loss(form, *inputs[:3], inputs, reduction="sum", row_weights=inputs[-1], return_components="per_row")
    _, rows = _loss(form, *inputs[:3], inputs, reduction="none", return_components=True)
    torch.testing.assert_close(parts.kd, rows.kd)


def test_module_forms_take_row_weights():
    inputs = _inputs(2)
    hidden, weight, bias, teacher_hidden, teacher_weight, labels, ids, logprobs, row_weights = inputs
    dense = kdfast.LinearDistillLoss(reduction="sum")
    expected = (kdfast.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                           reduction="none") * row_weights).sum()
    torch.testing.assert_close(dense(hidden, weight, teacher_hidden, teacher_weight, labels, row_weights=row_weights),
                               expected, rtol=1e-5, atol=1e-6)
    sparse = kdfast.LinearSparseDistillLoss(reduction="sum")
    expected = (kdfast.linear_sparse_distill_loss(hidden, weight, ids, logprobs, labels, reduction="none")
                * row_weights).sum()
    torch.testing.assert_close(sparse(hidden, weight, ids, logprobs, labels, row_weights=row_weights), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_compiled_weighted_loss_equals_eager(form):
    inputs = _inputs(3)
    eager = [t.clone().requires_grad_(True) for t in inputs[:3]]
    expected = _loss(form, *eager, inputs, reduction="sum", row_weights=inputs[-1])
    expected_grads = _grads(expected, eager)

    def step(hidden, weight, bias, row_weights):
        return _loss(form, hidden, weight, bias, inputs, reduction="sum", row_weights=row_weights)

    compiled = [t.clone().requires_grad_(True) for t in inputs[:3]]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled, inputs[-1])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for actual, wanted in zip(_grads(loss, compiled), expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.ones(ROWS, dtype=torch.long), "floating-point tensor of shape"),
    (torch.ones(ROWS - 1), r"shape \[29\]"),
    (torch.full((ROWS,), float("nan")), "finite"),
    ([1.0] * ROWS, "floating-point tensor"),
])
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_bad_row_weights_are_refused(form, bad, message):
    inputs = _inputs()
    with pytest.raises(ValueError, match=message):
        _loss(form, *inputs[:3], inputs, reduction="sum", row_weights=bad)


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_row_weights_with_per_row_losses_are_refused(form):
    inputs = _inputs()
    with pytest.raises(ValueError, match="row_weights needs reduction='mean' or 'sum'"):
        _loss(form, *inputs[:3], inputs, reduction="none", row_weights=inputs[-1])
