"""Token scaling on the cross-entropy (`token_scaling=` of kdfast.cross_entropy, linear_cross_entropy and
patch_causal_lm): Dynamic Fine-Tuning ("dft") as TRL's SFT computes it (`-log p * exp(log p).detach()`) and as
Liger-Kernel's fused linear CE scales it (`use_token_scaling=True`: the smoothed CE and the z-loss times p, per-class
weights as before), and Entropy-Adaptive Fine-Tuning (kdfast.EAFT: (top-k entropy / 3)^alpha, LlamaFactory's and
ms-swift's), held to float64 on the forms the peers' ported cases do not reach: the logits form in and out of place,
every reduction, label smoothing, z-loss, per-class weights, softcap, shifted and padded logits, num_items_in_batch,
bf16, per-row upstream gradients, the components, the modules, a Hugging Face model, and bad input."""

import pytest
import torch
from ce_checks import V, weighted_ce_inputs, weighted_ce_reference
from ce_checks import check_against_reference as _check
from conftest import BACKENDS, device_for

import kdfast

EAFT_HALF = kdfast.EAFT(alpha=0.5, top_k=10)
SCALINGS = ["dft", EAFT_HALF]


def scaling_factors(flat, kept, scaling):
    """Per row of logits [N, V]: p(label) (DFT; `kept` carries the labels) or (H_k / 3)^alpha (EAFT), detached."""
    flat = flat.detach()
    if scaling == "dft":
        labels, keep = kept
        label_logprob = flat.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0] - torch.logsumexp(flat, -1)
        return torch.where(keep, label_logprob.exp(), 0.0)
    top = flat.topk(min(scaling.top_k, flat.shape[-1]), dim=-1).values
    log_probs = top - torch.logsumexp(top, -1, keepdim=True)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.where(kept[1], (entropy / 3.0) ** scaling.alpha, 0.0)


def dft_reference(logits, labels, reduction="mean", label_smoothing=0.0, z_loss_weight=0.0, class_weights=None,
                  num_items_in_batch=None, ignore_index=-100, scaling="dft"):
    """Each kept row's (weighted, smoothed) CE and z-loss times its factor (`scaling_factors`; DFT's p(label) =
    softmax(logits)[label] by default); "mean" divides the CE by the kept rows' label weights (their count without
    weights) and the z-loss by the kept rows, or both by num_items_in_batch."""
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    factors = scaling_factors(flat, (flat_labels, flat_labels != ignore_index), scaling)
    return weighted_ce_reference(logits, labels, class_weights, reduction, label_smoothing, z_loss_weight,
                                 num_items_in_batch, ignore_index, row_factors=factors)


def _inputs(shape=(3, 11), vocab=V, seed=0, dtype=torch.float32):
    logits, labels, class_weights = weighted_ce_inputs(shape, vocab, seed, dtype)
    # Some rows confident in their label, so that p spans (0, 1) and the scaling is not near-uniform.
    confident = labels.view(-1)[1::3]
    logits.view(-1, vocab)[1::3].scatter_(1, confident.clamp(min=0)[:, None], 12.0)
    return logits, labels, class_weights


def test_dft_is_trl_sft_loss():
    """TRL's SFT `loss_type="dft"` (its compute_loss: per-token -log p times exp(log p).detach(), summed, over the
    kept tokens), written as TRL writes it, against kdfast's."""
    logits, labels, _ = _inputs(seed=3)
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x, labels, token_scaling="dft")
    x_trl = logits.clone().requires_grad_()
    log_probs = torch.log_softmax(x_trl, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    log_probs = torch.where(labels != -100, log_probs, 0.0)  # zero on ignored positions, as TRL's fused head
    per_token_loss = -log_probs * log_probs.exp().detach()
    trl_loss = per_token_loss.sum() / (labels != -100).sum().clamp(min=1)
    torch.testing.assert_close(out, trl_loss, atol=1e-6, rtol=1e-5)
    out.backward()
    trl_loss.backward()
    torch.testing.assert_close(x.grad, x_trl.grad, atol=1e-7, rtol=1e-5)
    plain = kdfast.cross_entropy(logits, labels)
    assert out < 0.9 * plain  # the scaling changes the loss: p < 1 on the unconfident rows


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing, z_loss_weight", [(0.0, 0.0), (0.1, 0.0), (0.2, 1e-3)])
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
def test_cross_entropy_scaled_matches_reference(backend, reduction, label_smoothing, z_loss_weight, inplace_backward,
                                                weighted, scaling):
    logits, labels, class_weights = _inputs()
    class_weights = class_weights if weighted else None
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x * 1.0 if inplace_backward else x, labels, token_scaling=scaling,
                               class_weights=class_weights, reduction=reduction, label_smoothing=label_smoothing,
                               z_loss_weight=z_loss_weight, inplace_backward=inplace_backward, backend=backend)
    x64 = logits.double().requires_grad_()
    reference = dft_reference(x64, labels, reduction, label_smoothing, z_loss_weight,
                              None if class_weights is None else class_weights.double(), scaling=scaling)
    upstream = torch.rand(labels.shape) + 0.5 if reduction == "none" else torch.tensor(1.7)
    _check(out, reference, [x], [x64], upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
def test_scaling_on_every_backend_and_device(backend, scaling):
    """Both forms with every option at once, on the backend's own device (CUDA and Triton on a GPU): the scaling is
    torch's ops after each backend's kernel."""
    device = device_for(backend)
    logits, labels, class_weights = _inputs(seed=9)
    settings = dict(token_scaling=scaling, class_weights=class_weights.to(device), label_smoothing=0.1,
                    z_loss_weight=1e-3, backend=backend)
    x = logits.clone().to(device).requires_grad_()
    out = kdfast.cross_entropy(x * 1.0, labels.to(device), inplace_backward=True, softcap=20.0, **settings)
    x64 = logits.double().requires_grad_()
    reference = dft_reference(20.0 * torch.tanh(x64 / 20.0), labels, label_smoothing=0.1, z_loss_weight=1e-3,
                              class_weights=class_weights.double(), scaling=scaling)
    _check(out.cpu(), reference, [x], [x64], torch.tensor(1.0))
    hidden, head = torch.randn(labels.numel(), 16), torch.randn(V, 16) * 0.5
    leaves = [hidden.clone().to(device).requires_grad_(), head.clone().to(device).requires_grad_()]
    out = kdfast.linear_cross_entropy(*leaves, labels.reshape(-1).to(device), chunk_size=8, **settings)
    leaves64 = [hidden.double().requires_grad_(), head.double().requires_grad_()]
    reference = dft_reference(leaves64[0] @ leaves64[1].T, labels.reshape(-1), label_smoothing=0.1,
                              z_loss_weight=1e-3, class_weights=class_weights.double(), scaling=scaling)
    _check(out.cpu(), reference, leaves, leaves64, torch.tensor(1.0), atol=1e-5)


@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
def test_scaling_on_shifted_padded_logits_and_num_items(scaling):
    """A causal LM's shifted view (non-contiguous rows), a padded vocabulary (`vocab_size`: p over the shared one;
    the padding gets no gradient), and num_items_in_batch dividing both terms."""
    logits, labels, _ = _inputs(shape=(2, 9), vocab=V + 7, seed=1)
    labels = labels.clamp(max=V - 1)
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x[:, :-1], labels[:, 1:], token_scaling=scaling, vocab_size=V, label_smoothing=0.1,
                               z_loss_weight=1e-3, num_items_in_batch=13)
    x64 = logits.double().requires_grad_()
    reference = dft_reference(x64[:, :-1, :V], labels[:, 1:], label_smoothing=0.1, z_loss_weight=1e-3,
                              num_items_in_batch=13, scaling=scaling)
    _check(out, reference, [x], [x64], torch.tensor(0.8))
    assert x.grad[..., V:].abs().max() == 0 and x.grad[:, -1].abs().max() == 0


@pytest.mark.parametrize("softcap, scaling", [(None, "dft"), (20.0, "dft"), (None, EAFT_HALF), (20.0, EAFT_HALF)],
                         ids=str)
def test_scaling_in_bf16_is_close_to_float64(softcap, scaling):
    """bf16 logits: the loss in float32 from the rounded logits, the gradient within two bf16 units of its largest
    entry."""
    logits, labels, _ = _inputs(dtype=torch.bfloat16, seed=2)
    x = logits.clone().requires_grad_()
    out = kdfast.cross_entropy(x, labels, token_scaling=scaling, label_smoothing=0.1, softcap=softcap)
    out.backward()
    x64 = logits.double().requires_grad_()
    capped = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    reference = dft_reference(capped, labels, label_smoothing=0.1, scaling=scaling)
    reference.backward()
    torch.testing.assert_close(out.double(), reference.detach(), atol=1e-5, rtol=1e-5)
    assert (x.grad.double() - x64.grad).abs().max() <= 2**-7 * x64.grad.abs().max()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap, logit_scale, bias, weighted", [(None, 1.0, False, False), (30.0, 1.0, True, True),
                                                                  (None, 0.6, True, False)])
@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
def test_linear_cross_entropy_scaled_matches_reference(reduction, softcap, logit_scale, bias, weighted, scaling):
    """The fused linear form in chunks of 8 (DFT's p read from each chunk's kernel, EAFT's top-k from its logits),
    with reduction="none" taking a per-row upstream gradient (the backward runs the chunks again)."""
    gen = torch.Generator().manual_seed(4)
    n, hidden_size = 29, 12
    hidden, head = torch.randn(n, hidden_size, generator=gen), torch.randn(V, hidden_size, generator=gen)
    head_bias = torch.randn(V, generator=gen) if bias else None
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::5] = -100
    class_weights = torch.rand(V, generator=gen) + 0.5 if weighted else None
    leaves = [t.clone().requires_grad_() for t in (hidden, head, head_bias) if t is not None]
    out = kdfast.linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None,
                                      token_scaling=scaling, class_weights=class_weights, softcap=softcap,
                                      logit_scale=logit_scale, reduction=reduction, label_smoothing=0.1,
                                      z_loss_weight=1e-3, chunk_size=8)
    leaves64 = [t.double().requires_grad_() for t in (hidden, head, head_bias) if t is not None]
    logits = leaves64[0] @ leaves64[1].T + (leaves64[2] if bias else 0.0)
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    reference = dft_reference(logits, labels, reduction, 0.1, 1e-3,
                              None if class_weights is None else class_weights.double(), scaling=scaling)
    upstream = torch.rand(n) + 0.5 if reduction == "none" else torch.tensor(1.3)
    _check(out, reference, leaves, leaves64, upstream, atol=1e-5)


def test_dft_components_scale_the_ce_and_z_loss_alone():
    """The components: the CE and the z-loss scaled as the loss is; the entropy and the accuracy are the model's,
    unscaled."""
    logits, labels, _ = _inputs(seed=5)
    kept = labels != -100
    loss, parts = kdfast.cross_entropy(logits, labels, token_scaling="dft", z_loss_weight=1e-3,
                                       return_components=True)
    plain_loss, plain = kdfast.cross_entropy(logits, labels, z_loss_weight=1e-3, return_components=True)
    x64 = logits.double()
    torch.testing.assert_close(parts.ce.double(), dft_reference(x64, labels), atol=1e-6, rtol=1e-5)
    lse = torch.logsumexp(x64, -1)
    p = torch.exp(x64.gather(-1, labels.clamp(min=0)[..., None])[..., 0] - lse)
    torch.testing.assert_close(parts.z_loss.double(), (lse**2 * p)[kept].mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts.entropy, plain.entropy)
    torch.testing.assert_close(parts.accuracy, plain.accuracy)
    assert loss < plain_loss


def test_dft_on_confident_and_ignored_rows():
    """A row whose label holds all the mass keeps its CE (p = 1); rows that are all ignored give a differentiable 0."""
    logits = torch.zeros(2, V)
    logits[0, 7] = 40.0
    labels = torch.tensor([7, -100])
    torch.testing.assert_close(kdfast.cross_entropy(logits, labels, token_scaling="dft"),
                               kdfast.cross_entropy(logits, labels))
    x = torch.randn(3, V, requires_grad=True)
    out = kdfast.cross_entropy(x, torch.full((3,), -100), token_scaling="dft")
    out.backward()
    assert out.item() == 0.0 and x.grad.abs().max() == 0


def test_dft_modules_take_the_setting():
    logits, labels, _ = _inputs(seed=6)
    module = kdfast.CrossEntropyLoss(token_scaling="dft", label_smoothing=0.1)
    assert "token_scaling='dft'" in repr(module)
    torch.testing.assert_close(module(logits, labels).double(), dft_reference(logits.double(), labels,
                                                                             label_smoothing=0.1), atol=1e-6, rtol=1e-5)
    hidden, head = torch.randn(labels.numel(), 8), torch.randn(V, 8)
    linear = kdfast.LinearCrossEntropyLoss(token_scaling="dft", chunk_size=8)
    torch.testing.assert_close(linear(hidden, head, labels.reshape(-1)).double(),
                               dft_reference(hidden.double() @ head.double().T, labels.reshape(-1)), atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("build, message", [
    (lambda: kdfast.cross_entropy(torch.randn(2, V), torch.tensor([1, 2]), token_scaling="dtf"), "token_scaling"),
    (lambda: kdfast.linear_cross_entropy(torch.randn(2, 4), torch.randn(V, 4), torch.tensor([1, 2]),
                                         token_scaling=True), "token_scaling"),
    (lambda: kdfast.CrossEntropyLoss(token_scaling="eaft "), "token_scaling"),
    (lambda: kdfast.LinearCrossEntropyLoss(token_scaling="p"), "token_scaling"),
    (lambda: kdfast.CrossEntropyLoss(use_token_scaling=True), "token_scaling='dft'"),
    (lambda: kdfast.CrossEntropyLoss(use_eaft=True), "token_scaling=kdfast.EAFT"),
    (lambda: kdfast.LinearCrossEntropyLoss(use_eaft=True), "token_scaling=kdfast.EAFT"),
    (lambda: kdfast.EAFT(alpha=-1.0), "EAFT alpha must be a finite number >= 0"),
    (lambda: kdfast.EAFT(alpha=float("nan")), "EAFT alpha must be a finite number >= 0"),
    (lambda: kdfast.EAFT(top_k=0), "EAFT top_k must be an int >= 1"),
    (lambda: kdfast.EAFT(top_k=2.5), "EAFT top_k must be an int >= 1"),
    (lambda: kdfast.LinearCrossEntropyLoss(use_token_scaling=True), "token_scaling='dft'"),
])
def test_bad_token_scaling_is_refused_by_name(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_dft_over_vocab_shards_is_refused():
    with pytest.raises(ValueError, match="token_scaling are not supported over vocab shards"):
        kdfast.cross_entropy(torch.randn(2, V), torch.tensor([1, 2]), token_scaling="dft", vocab_range=(0, V))
    with pytest.raises(ValueError, match="token_scaling are not supported over vocab shards"):
        kdfast.linear_cross_entropy(torch.randn(2, 4), torch.randn(V, 4), torch.tensor([1, 2]), token_scaling="dft",
                                    vocab_range=(0, V))


def test_eaft_defaults_are_the_peers_and_top_k_past_the_vocabulary_takes_it_all():
    """"eaft" is EAFT(alpha=1, top_k=20) (LlamaFactory's, ms-swift's, Liger's defaults); a top_k past V takes the
    row's whole softmax."""
    logits, labels, _ = _inputs(seed=7)
    torch.testing.assert_close(kdfast.cross_entropy(logits, labels, token_scaling="eaft"),
                               kdfast.cross_entropy(logits, labels, token_scaling=kdfast.EAFT(1.0, 20)))
    whole = kdfast.cross_entropy(logits, labels, token_scaling=kdfast.EAFT(top_k=10 * V))
    torch.testing.assert_close(whole.double(), dft_reference(logits.double(), labels, scaling=kdfast.EAFT(top_k=V)),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("settings", [
    dict(token_scaling="eaft"), dict(token_scaling="dft", label_smoothing=0.1),
    dict(class_weights=torch.rand(V, generator=torch.Generator().manual_seed(5)) + 0.5, label_smoothing=0.1)],
    ids=["eaft", "dft-smoothing", "class-weights-smoothing"])
def test_linear_weighed_forms_under_torch_compile(settings):
    """torch.compile calls the weighed fused linear form as the host-driven loop it is (its one graph break the
    deliberate skip, none inside its checks: tracing them stat'ed the build folder), equal to eager."""
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(11)
    hidden, head = torch.randn(40, 12, generator=gen), torch.randn(V, 12, generator=gen)
    labels = torch.randint(0, V, (40,), generator=gen)
    labels[::6] = -100
    leaves, eager_leaves = [[hidden.clone().requires_grad_(), head.clone().requires_grad_()] for _ in range(2)]
    counters.clear()
    compiled = torch.compile(lambda h, w: kdfast.linear_cross_entropy(h, w, labels, chunk_size=8, **settings))
    compiled(*leaves).backward()
    kdfast.linear_cross_entropy(*eager_leaves, labels, chunk_size=8, **settings).backward()
    assert all("_weighed" in reason for reason in counters["graph_break"]), dict(counters["graph_break"])
    for leaf, eager in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager.grad, atol=0, rtol=0)
