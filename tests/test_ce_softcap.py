"""`kdfast.cross_entropy(softcap=, logit_scale=)`: the CE of softcap * tanh(logit_scale * logits / softcap) mapped in
row chunks (kdfast.mapped_logits_ce), on every backend, against the float64 reference taken through the map."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels

import kdfast
from kdfast import mapped_logits_ce
from kdfast.reference import distill_loss_reference

V = 97


def _reference(logits, labels, softcap, logit_scale, **settings):
    """The loss and the gradient of a random upstream, in float64 through the map."""
    x = logits.detach().double().cpu().requires_grad_()
    z = x * logit_scale
    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
    loss = distill_loss_reference(z, z.detach(), labels.cpu(), kd_weight=0.0, ce_weight=1.0, **settings)
    return loss, x


def _check(logits, labels, softcap, logit_scale, atol, **settings):
    leaf = logits.detach().clone().requires_grad_()
    out = kdfast.cross_entropy(leaf, labels, softcap=softcap, logit_scale=logit_scale, **settings)
    settings.pop("backend", None)
    ref, x = _reference(logits, labels, softcap, logit_scale, **settings)
    upstream = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    out.backward(upstream.to(out.dtype).to(out.device))
    ref.backward(upstream)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=atol, rtol=atol)
    torch.testing.assert_close(leaf.grad.double().cpu(), x.grad, atol=atol, rtol=atol)
    return leaf


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows: every call crosses chunk and batch boundaries."""
    monkeypatch.setattr(mapped_logits_ce, "chunk_rows", lambda vocab, device: 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("softcap, logit_scale, reduction", [
    (30.0, 1.0, "mean"), (None, 0.5, "sum"), (15.0, 2.5, "none"), (7.0, -1.0, "mean")])
def test_matches_the_float64_reference(backend, dtype, atol, softcap, logit_scale, reduction, small_chunks):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 13, V, generator=gen) * 40).to(dtype).to(device)
    labels = make_labels((2, 13), V, "some", device=device)
    _check(logits, labels, softcap, logit_scale, atol, backend=backend, reduction=reduction, label_smoothing=0.1,
           z_loss_weight=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend, small_chunks):
    device = device_for(backend)
    logits = (torch.randn(3, 11, V, generator=torch.Generator().manual_seed(2)) * 30).to(device)
    labels = make_labels((3, 11), V, "some", device=device)
    fresh, storage = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    kdfast.cross_entropy(fresh, labels, softcap=30.0, backend=backend).backward()
    kdfast.cross_entropy(storage, labels, softcap=30.0, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(storage.grad, fresh.grad, atol=0, rtol=0)
    assert storage.grad.data_ptr() == storage.data_ptr(), "the gradient took a new [N, V] buffer"


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_a_shifted_view_and_num_items_in_batch(inplace_backward, small_chunks):
    """logits[:, :-1] (the causal shift: not contiguous) and a global token count, as a trainer passes them."""
    gen = torch.Generator().manual_seed(3)
    full = (torch.randn(2, 9, V, generator=gen) * 20).requires_grad_()
    labels = make_labels((2, 8), V, "some")
    x = full.detach().double().requires_grad_()  # read first: an in-place backward overwrites the logits
    z = 20.0 * torch.tanh(x[:, :-1] / 20.0)
    ref = distill_loss_reference(z, z.detach(), labels, kd_weight=0.0, ce_weight=1.0, reduction="sum") / 40
    ref.backward()
    loss = kdfast.cross_entropy(full[:, :-1], labels, softcap=20.0, num_items_in_batch=40,
                                inplace_backward=inplace_backward)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad.double(), x.grad, atol=1e-6, rtol=1e-5)


def test_padded_columns_are_left_out_and_get_no_gradient(small_chunks):
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(7, V + 31, generator=gen) * 30).requires_grad_()
    labels = make_labels((7,), V, "some")
    loss = kdfast.cross_entropy(logits, labels, softcap=30.0, vocab_size=V)
    loss.backward()
    expected = logits[:, :V].detach().clone().requires_grad_()
    kdfast.cross_entropy(expected, labels, softcap=30.0).backward()
    torch.testing.assert_close(loss, kdfast.cross_entropy(logits[:, :V].detach(), labels, softcap=30.0))
    torch.testing.assert_close(logits.grad[:, :V], expected.grad)
    assert not logits.grad[:, V:].any()


def test_components_are_those_of_the_capped_logits():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, V, generator=gen) * 50
    labels = make_labels((6, 4), V, "some")
    capped = 25.0 * torch.tanh(logits / 25.0)
    loss, parts = kdfast.cross_entropy(logits, labels, softcap=25.0, z_loss_weight=1e-2, return_components=True)
    expected, expected_parts = kdfast.cross_entropy(capped, labels, z_loss_weight=1e-2, return_components=True)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for name in ("ce", "z_loss", "accuracy", "entropy"):
        torch.testing.assert_close(getattr(parts, name), getattr(expected_parts, name), atol=1e-5, rtol=1e-5)


def test_no_rows_is_a_zero_loss_with_a_gradient():
    logits = torch.zeros(0, V, requires_grad=True)
    loss = kdfast.cross_entropy(logits, torch.zeros(0, dtype=torch.long), softcap=30.0)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, V)


def test_the_module_takes_the_settings():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(6)) * 40
    labels = make_labels((5,), V, "none")
    module = kdfast.CrossEntropyLoss(softcap=30.0, logit_scale=0.5, label_smoothing=0.1)
    expected = kdfast.cross_entropy(logits, labels, softcap=30.0, logit_scale=0.5, label_smoothing=0.1)
    torch.testing.assert_close(module(logits, labels), expected)
    assert "softcap=30.0" in repr(module)


@pytest.mark.parametrize("settings, message", [
    (dict(softcap=0.0), "softcap must be None or a finite number > 0"),
    (dict(softcap=float("inf")), "softcap must be None or a finite number > 0"),
    (dict(logit_scale=float("nan")), "logit_scale must be a finite number"),
    (dict(logit_scale="2"), "logit_scale must be a finite number")])
def test_bad_settings_are_named(settings, message):
    logits, labels = torch.randn(3, V), make_labels((3,), V, "none")
    with pytest.raises(ValueError, match=message):
        kdfast.cross_entropy(logits, labels, **settings)
    with pytest.raises(ValueError, match=message):
        kdfast.CrossEntropyLoss(**settings)


def test_vocab_shards_are_refused():
    logits, labels = torch.randn(3, V), make_labels((3,), V, "none")
    with pytest.raises(ValueError, match="not supported over vocab shards"):
        kdfast.cross_entropy(logits, labels, softcap=30.0, vocab_range=(0, V))


def test_a_label_out_of_range_is_named():
    logits = torch.randn(3, V)
    with pytest.raises(ValueError, match="label"):
        kdfast.cross_entropy(logits, torch.tensor([0, V, 1]), softcap=30.0)


def test_torch_compile_traces_it_whole():
    """The chunk loop and the map under torch.compile(fullgraph=True): no graph break, the eager loss and gradient."""
    gen = torch.Generator().manual_seed(7)
    logits, labels = (torch.randn(2, 9, V, generator=gen) * 30).requires_grad_(), make_labels((2, 9), V, "some")

    def loss_of(x):
        return kdfast.cross_entropy(x * 1.0, labels, softcap=30.0, logit_scale=0.5)

    eager = loss_of(logits)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(logits)
    (compiled_grad,) = torch.autograd.grad(compiled, logits)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
