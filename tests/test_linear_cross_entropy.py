"""kdfast.linear_cross_entropy (the fused linear CE with no teacher) against float64 torch on every backend: bias, logit
scale, softcap, label smoothing, z-loss, every reduction, ignored rows, num_items_in_batch, bf16 with and without
float32 logits; its bad inputs named; no teacher projected by it or by `linear_distill_loss` with kd_weight 0; the
compiled step. Cut Cross-Entropy's own cases on it: tests/test_cce_peer_cases*.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for

import kdfast
from kdfast import linear_chunks

# bias, logit_scale, softcap, label_smoothing, z_loss_weight
SETTINGS = [(False, 1.0, None, 0.0, 0.0), (True, 1.0, 20.0, 0.0, 1e-2), (True, 0.6, None, 0.1, 0.0),
            (True, 1.4, 5.0, 0.05, 1e-3)]


def make_inputs(rows=37, hidden_size=24, vocab=211, dtype=torch.float32, bias=True, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::5] = -100
    tensors = dict(hidden=torch.randn(rows, hidden_size, generator=generator),
                   weight=torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5 * 4,
                   bias=torch.randn(vocab, generator=generator) * 0.5 if bias else None)
    return {name: value.to(dtype).to(device) if value is not None else None for name, value in tensors.items()}, \
        labels.to(device)


def reference(hidden, weight, bias, labels, logit_scale=1.0, softcap=None, label_smoothing=0.0, z_loss_weight=0.0,
              reduction="mean", num_items_in_batch=None):
    """float64 torch: the head, its scale and softcap, CE with smoothing, z-loss on the kept rows."""
    logits = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none", label_smoothing=label_smoothing)
    kept = labels != -100
    rows = rows + torch.where(kept, z_loss_weight * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (num_items_in_batch if num_items_in_batch is not None else kept.sum())


def leaves(tensors, dtype=None):
    return {name: value.detach().to(dtype or value.dtype).requires_grad_(True) if value is not None else None
            for name, value in tensors.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,logit_scale,softcap,label_smoothing,z_loss_weight", SETTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64(backend, bias, logit_scale, softcap, label_smoothing, z_loss_weight, reduction):
    device = device_for(backend)
    tensors, labels = make_inputs(rows=9 if backend == "triton" else 37, bias=bias, device=device)
    settings = dict(logit_scale=logit_scale, softcap=softcap, label_smoothing=label_smoothing,
                    z_loss_weight=z_loss_weight, reduction=reduction)
    ours, theirs = leaves(tensors), leaves(tensors, torch.float64)
    loss = kdfast.linear_cross_entropy(ours["hidden"], ours["weight"], labels, bias=ours["bias"], chunk_size=8,
                                       backend=backend, **settings)
    expected = reference(theirs["hidden"], theirs["weight"], theirs["bias"], labels, **settings)
    upstream = torch.linspace(-1.0, 2.0, labels.numel(), dtype=torch.float64, device=device)
    (loss.double() * (upstream if reduction == "none" else 1.0)).sum().backward()
    (expected * (upstream if reduction == "none" else 1.0)).sum().backward()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)
    for name, value in ours.items():
        if value is not None:
            torch.testing.assert_close(value.grad.double(), theirs[name].grad, rtol=2e-5, atol=2e-5,
                                       msg=lambda text, name=name: f"d {name}: {text}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_num_items_in_batch_and_leading_dims(backend):
    device = device_for(backend)
    tensors, labels = make_inputs(rows=36, device=device)
    hidden = tensors["hidden"].view(4, 9, -1)
    loss = kdfast.linear_cross_entropy(hidden, tensors["weight"], labels.view(4, 9), bias=tensors["bias"],
                                       num_items_in_batch=50, backend=backend)
    expected = reference(tensors["hidden"], tensors["weight"], tensors["bias"], labels, num_items_in_batch=50)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)
    per_row = kdfast.linear_cross_entropy(hidden, tensors["weight"], labels.view(4, 9), reduction="none",
                                          backend=backend)
    assert per_row.shape == (4, 9) and bool((per_row.view(-1)[labels == -100] == 0).all())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_bfloat16_with_and_without_float32_logits(backend):
    """bf16 heads: float32 logits come within float32's sums of float64 on the bf16 values; rounded ones do not."""
    device = device_for(backend)
    tensors, labels = make_inputs(rows=40, hidden_size=64, vocab=509, dtype=torch.bfloat16, device=device)
    expected = reference(tensors["hidden"], tensors["weight"], tensors["bias"], labels, reduction="none")
    errors = {}
    for fp32_logits in (True, False):
        loss = kdfast.linear_cross_entropy(tensors["hidden"], tensors["weight"], labels, bias=tensors["bias"],
                                           reduction="none", fp32_logits=fp32_logits, backend=backend)
        errors[fp32_logits] = (loss.double() - expected).abs().max().item()
    assert errors[True] < 1e-4 and errors[True] < errors[False] / 10, errors


def test_no_teacher_is_projected(monkeypatch):
    """One GEMM of logits per chunk, the student's: for linear_cross_entropy, and for linear_distill_loss given a
    teacher with kd_weight 0 (which projected it into a chunk of logits of its own, unread)."""
    tensors, labels = make_inputs(rows=32)
    calls = []
    original = linear_chunks._logits_into
    monkeypatch.setattr(linear_chunks, "_logits_into", lambda out, *rest: calls.append(out) or original(out, *rest))
    ce = kdfast.linear_cross_entropy(tensors["hidden"], tensors["weight"], labels, chunk_size=8)
    assert len(calls) == 4
    teacher_hidden, teacher_weight = torch.randn(32, 5), torch.randn(211, 5)
    distill = kdfast.linear_distill_loss(tensors["hidden"], tensors["weight"], teacher_hidden, teacher_weight, labels,
                                         kd_weight=0.0, ce_weight=1.0, chunk_size=8)
    assert len(calls) == 8
    torch.testing.assert_close(distill, ce, rtol=0, atol=0)


BAD_INPUTS = [
    (dict(labels=None), "labels"),
    (dict(hidden=torch.randn(8)), "hidden"),
    (dict(hidden=torch.ones(8, 24, dtype=torch.long)), "hidden"),
    (dict(weight=torch.randn(211, 23)), "weight"),
    (dict(bias=torch.randn(210)), "bias"),
    (dict(labels=torch.full((8,), 211)), "labels"),
    (dict(softcap=0.0), "softcap"),
    (dict(logit_scale=float("nan")), "logit_scale"),
    (dict(reduction="avg"), "reduction"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(fp32_logits="yes"), "fp32_logits"),
]


@pytest.mark.parametrize("change,argument", BAD_INPUTS)
def test_bad_inputs_name_the_argument(change, argument):
    generator = torch.Generator().manual_seed(1)
    arguments = dict(hidden=torch.randn(8, 24, generator=generator), weight=torch.randn(211, 24, generator=generator),
                     labels=torch.randint(0, 211, (8,), generator=generator), bias=None)
    arguments.update(change)
    with pytest.raises(ValueError, match=rf"(^|\W){argument}\W"):
        kdfast.linear_cross_entropy(arguments.pop("hidden"), arguments.pop("weight"), arguments.pop("labels"),
                                    **arguments)


def test_compiled_step_equals_eager():
    tensors, labels = make_inputs(rows=24, bias=False)

    def step(hidden, weight):
        return kdfast.linear_cross_entropy(hidden, weight, labels, softcap=20.0, chunk_size=8)

    results = []
    for function in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        hidden, weight = (tensors[name].clone().requires_grad_(True) for name in ("hidden", "weight"))
        loss = function(hidden, weight)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


def test_module_equals_function():
    tensors, labels = make_inputs(rows=24)
    settings = dict(softcap=20.0, logit_scale=0.8, label_smoothing=0.1, chunk_size=8, reduction="sum")
    module = kdfast.LinearCrossEntropyLoss(**settings)
    assert "softcap=20.0" in repr(module) and "chunk_size=8" in repr(module)
    results = []
    for call in (lambda h, w, b: module(h, w, labels, b, num_items_in_batch=5),
                 lambda h, w, b: kdfast.linear_cross_entropy(h, w, labels, bias=b, num_items_in_batch=5, **settings)):
        ours = leaves(tensors)
        loss = call(ours["hidden"], ours["weight"], ours["bias"])
        loss.backward()
        results.append((loss.detach(), ours["hidden"].grad, ours["weight"].grad, ours["bias"].grad))
    for from_module, from_function in zip(*results):
        torch.testing.assert_close(from_module, from_function, rtol=0, atol=0)


@pytest.mark.parametrize("settings,error,match", [
    (dict(temperature=2.0), TypeError, r"unknown setting\(s\) \['temperature'\]"),
    (dict(bias=None), TypeError, r"unknown setting\(s\) \['bias'\]"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
])
def test_module_refuses_bad_settings_where_built(settings, error, match):
    with pytest.raises(error, match=match):
        kdfast.LinearCrossEntropyLoss(**settings)
