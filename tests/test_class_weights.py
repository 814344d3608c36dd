"""Per-class weights on the cross-entropy (`class_weights` of kdfast.cross_entropy and linear_cross_entropy, PyTorch's
`weight`): held to torch's F.cross_entropy(weight=) in float64 plus Liger-Kernel's z-loss (unweighted, over the
kept rows), on the forms Liger's ported cases do not reach: batched and shifted logits, in place, padded
vocabularies, num_items_in_batch, per-row upstream gradients, the components, the modules, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from ce_checks import V, weighted_ce_reference
from ce_checks import check_against_reference as _check
from ce_checks import weighted_ce_inputs as _inputs
from conftest import BACKENDS, device_for

import kdfast


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing, z_loss_weight", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_cross_entropy_with_class_weights_matches_torch(backend, reduction, label_smoothing, z_loss_weight,
                                                        inplace_backward):
    logits, labels, class_weights = _inputs()
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x * 1.0 if inplace_backward else x, labels, class_weights=class_weights,
                               reduction=reduction, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight,
                               inplace_backward=inplace_backward, backend=backend)
    x64 = logits.double().requires_grad_()
    reference = weighted_ce_reference(x64, labels, class_weights.double(), reduction, label_smoothing, z_loss_weight)
    upstream = torch.rand(labels.shape) + 0.5 if reduction == "none" else torch.tensor(1.7)
    _check(out, reference, [x], [x64], upstream)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_on_every_backend_and_device(backend):
    """Both forms with every option at once, on the backend's own device (CUDA and Triton on a GPU): the weighing
    is torch's ops after each backend's kernel."""
    device = device_for(backend)
    logits, labels, class_weights = _inputs(seed=9)
    settings = dict(class_weights=class_weights.to(device), label_smoothing=0.1, z_loss_weight=1e-3, backend=backend)
    x = logits.clone().to(device).requires_grad_()
    out = kdfast.cross_entropy(x * 1.0, labels.to(device), inplace_backward=True, **settings)
    x64 = logits.double().requires_grad_()
    _check(out.cpu(), weighted_ce_reference(x64, labels, class_weights.double(), label_smoothing=0.1,
                                            z_loss_weight=1e-3), [x], [x64], torch.tensor(1.0))
    hidden, head = torch.randn(labels.numel(), 16), torch.randn(V, 16) * 0.5
    leaves = [hidden.clone().to(device).requires_grad_(), head.clone().to(device).requires_grad_()]
    out = kdfast.linear_cross_entropy(*leaves, labels.reshape(-1).to(device), chunk_size=8, **settings)
    leaves64 = [hidden.double().requires_grad_(), head.double().requires_grad_()]
    reference = weighted_ce_reference(leaves64[0] @ leaves64[1].T, labels.reshape(-1), class_weights.double(),
                                      label_smoothing=0.1, z_loss_weight=1e-3)
    _check(out.cpu(), reference, leaves, leaves64, torch.tensor(1.0), atol=1e-5)


def test_cross_entropy_with_class_weights_on_shifted_padded_logits_and_num_items():
    """A causal LM's shifted view (non-contiguous rows), a padded vocabulary (`vocab_size`: the weights cover the
    shared one; the padding gets no gradient), negative weights, and num_items_in_batch dividing both terms."""
    logits, labels, class_weights = _inputs(shape=(2, 9), vocab=V + 7, seed=1)
    class_weights = class_weights[:V] - 0.5
    labels = labels.clamp(max=V - 1)
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x[:, :-1], labels[:, 1:], class_weights=class_weights, vocab_size=V,
                               label_smoothing=0.1, z_loss_weight=1e-3, num_items_in_batch=13)
    x64 = logits.double().requires_grad_()
    reference = weighted_ce_reference(x64[:, :-1, :V], labels[:, 1:], class_weights.double(), label_smoothing=0.1,
                                      z_loss_weight=1e-3, num_items_in_batch=13)
    _check(out, reference, [x], [x64], torch.tensor(0.8))
    assert x.grad[..., V:].abs().max() == 0 and x.grad[:, -1].abs().max() == 0


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_cross_entropy_with_class_weights_in_bf16_is_as_close_as_torch(softcap):
    """bf16 logits: the loss in float32 from the rounded logits (torch's bf16 CE was 0.013-0.12 off here), the
    gradient within two bf16 units of its largest entry (written in bf16, then weighed in place: torch's own bf16
    gradient was 3.6e-4 to 9.8e-4 off, kdfast's 1.1e-4 to 4.6e-4, at a largest entry of 0.06-0.08)."""
    logits, labels, class_weights = _inputs(dtype=torch.bfloat16, seed=2)
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x, labels, class_weights=class_weights, label_smoothing=0.1, softcap=softcap)
    out.backward()
    x64 = logits.double().requires_grad_()
    capped = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    reference = weighted_ce_reference(capped, labels, class_weights.double(), label_smoothing=0.1)
    reference.backward()
    torch.testing.assert_close(out.double(), reference.detach(), atol=1e-5, rtol=1e-5)
    assert (x.grad.double() - x64.grad).abs().max() <= 2**-7 * x64.grad.abs().max()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap, logit_scale, bias", [(None, 1.0, False), (30.0, 1.0, True), (None, 0.6, True)])
def test_linear_cross_entropy_with_class_weights_matches_torch(reduction, softcap, logit_scale, bias):
    """The fused linear form in chunks of 8 rows: each chunk's parts and gradient weighed before its GEMMs (and for
    reduction="none" again in the backward's pass, times each row's grad_output)."""
    gen = torch.Generator().manual_seed(3)
    hidden, head = torch.randn(2, 13, 16, generator=gen), torch.randn(V, 16, generator=gen) * 0.5
    head_bias = torch.randn(V, generator=gen) * 0.2 if bias else None
    labels = torch.randint(0, V, (2, 13), generator=gen)
    labels[0, ::3] = -100
    class_weights = torch.randn(V, generator=gen)
    leaves = [hidden.clone().requires_grad_(), head.clone().requires_grad_()]
    leaves += [head_bias.clone().requires_grad_()] if bias else []
    out = kdfast.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None,
                                      class_weights=class_weights, reduction=reduction, label_smoothing=0.1,
                                      z_loss_weight=1e-3, softcap=softcap, logit_scale=logit_scale, chunk_size=8)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    logits = (leaves64[0] @ leaves64[1].T + (leaves64[2] if bias else 0)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    reference = weighted_ce_reference(logits, labels, class_weights.double(), reduction, 0.1, 1e-3)
    upstream = torch.rand(labels.shape, generator=gen) + 0.5 if reduction == "none" else torch.tensor(1.3)
    _check(out, reference, leaves, leaves64, upstream, atol=1e-5)


def test_class_weights_components_weigh_the_ce_alone():
    """With class weights the CE component is the weighted CE (the loss without its z-loss); the z-loss, the entropy
    and the accuracy are those of the unweighted loss, as Liger-Kernel keeps its z-loss."""
    logits, labels, class_weights = _inputs(seed=4)
    loss, parts = kdfast.cross_entropy(logits, labels, class_weights=class_weights, z_loss_weight=1e-2,
                                       return_components=True)
    _, plain = kdfast.cross_entropy(logits, labels, z_loss_weight=1e-2, return_components=True)
    weighted_ce = weighted_ce_reference(logits.double(), labels, class_weights.double())
    torch.testing.assert_close(parts.ce.double(), weighted_ce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, parts.ce + 1e-2 * parts.z_loss)
    for name in ("z_loss", "entropy", "accuracy"):
        torch.testing.assert_close(getattr(parts, name), getattr(plain, name), atol=1e-6, rtol=1e-6)
    hidden, head = torch.randn(33, 8), torch.randn(V, 8)
    flat_labels = labels.reshape(-1)
    linear, linear_parts = kdfast.linear_cross_entropy(hidden[:flat_labels.numel()], head, flat_labels,
                                                       class_weights=class_weights, return_components="per_row")
    torch.testing.assert_close(linear_parts.ce.sum() / class_weights[flat_labels[flat_labels != -100]].sum(), linear)


def test_class_weights_all_zero_give_a_differentiable_zero():
    """Kept rows whose classes all weigh 0: torch's mean is 0 / 0 = NaN; kdfast's a 0 with a zero gradient."""
    logits, labels, _ = _inputs(seed=5)
    x = logits.clone().requires_grad_()
    loss = kdfast.cross_entropy(x, labels, class_weights=torch.zeros(V))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0


def test_class_weights_modules_keep_them_as_a_buffer():
    logits, labels, class_weights = _inputs(seed=6)
    module = kdfast.CrossEntropyLoss(class_weights=class_weights, label_smoothing=0.1)
    assert torch.equal(module.state_dict()["class_weights"], class_weights)
    torch.testing.assert_close(module(logits, labels), kdfast.cross_entropy(logits, labels, class_weights=class_weights,
                                                                            label_smoothing=0.1))
    linear = kdfast.LinearCrossEntropyLoss(class_weights=class_weights).to(torch.float64)
    assert linear.class_weights.dtype == torch.float64
    hidden, head = torch.randn(33, 8), torch.randn(V, 8)
    flat_labels = labels.reshape(-1)
    torch.testing.assert_close(linear(hidden, head, flat_labels),
                               F.cross_entropy(hidden @ head.T, flat_labels, weight=class_weights))


@pytest.mark.parametrize("class_weights, message", [
    (torch.rand(V + 1), r"class_weights must have shape \[53\]"),
    (torch.rand(V, 1), r"class_weights must have shape \[53\]"),
    (torch.ones(V, dtype=torch.int64), "class_weights must be a floating-point tensor"),
    ([1.0] * V, "class_weights must be a floating-point tensor"),
    (torch.full((V,), float("nan")), "class_weights must be finite")])
def test_bad_class_weights_are_refused_by_name(class_weights, message):
    logits, labels, _ = _inputs(seed=7)
    with pytest.raises(ValueError, match=message):
        kdfast.cross_entropy(logits, labels, class_weights=class_weights)
    with pytest.raises(ValueError, match=message):
        kdfast.linear_cross_entropy(torch.randn(33, 8), torch.randn(V, 8), labels.reshape(-1),
                                    class_weights=class_weights)


def test_class_weights_over_vocab_shards_are_refused():
    logits, labels, class_weights = _inputs(seed=8)
    with pytest.raises(ValueError, match="class_weights and token_scaling are not supported over vocab shards"):
        kdfast.cross_entropy(logits, labels, class_weights=class_weights, vocab_range=(0, V))
    with pytest.raises(ValueError, match="class_weights and token_scaling are not supported over vocab shards"):
        kdfast.linear_cross_entropy(torch.randn(33, 8), torch.randn(V, 8), labels.reshape(-1),
                                    class_weights=class_weights, vocab_range=(0, V))


def test_modules_name_class_weights_for_the_peers_keywords():
    """torch's `weight` and Liger's `ce_weight` passed to the modules: the error says what kdfast calls them."""
    with pytest.raises(TypeError, match="torch's `weight` is `class_weights` here"):
        kdfast.CrossEntropyLoss(weight=torch.ones(V))
    with pytest.raises(TypeError, match="Liger's `ce_weight` is `class_weights` here"):
        kdfast.LinearCrossEntropyLoss(ce_weight=torch.ones(V))
