"""Liger-Kernel's Entropy-Adaptive Fine-Tuning cases (test/transformers/test_eaft_cross_entropy.py, `use_eaft`,
`eaft_alpha`, `eaft_topk`) on kdfast's `token_scaling=kdfast.EAFT(alpha, top_k)`, logits and fused linear forms, every
backend (Triton's CPU interpreter on fewer rows). Liger's reference is kept as it writes it: each kept row's float32
CE times (H_k / 3)^alpha, H_k the entropy of softmax over the row's top-k logits (no gradient), summed and divided by
the kept rows. Liger's case that `use_eaft` and `use_token_scaling` refuse each other has no counterpart: kdfast's one
setting holds one scaling."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from liger_cases import INTERPRETED, sized

import kdfast


def torch_eaft_cross_entropy(source, target, ignore_index=-100, alpha=1.0, topk=20, reduction="mean"):
    """Liger's TorchEAFTCrossEntropy."""
    source_f32 = source.float()
    per_token_loss = F.cross_entropy(source_f32, target, ignore_index=ignore_index, reduction="none")
    valid_mask = target != ignore_index
    if not valid_mask.any():
        return torch.tensor(0.0, device=source.device, dtype=source.dtype)
    with torch.no_grad():
        k = min(topk, source_f32.shape[-1])
        topk_val, _ = torch.topk(source_f32, k=k, dim=-1)
        log_probs_topk = topk_val - torch.logsumexp(topk_val, dim=-1, keepdim=True)
        entropy_approx = -(torch.exp(log_probs_topk) * log_probs_topk).sum(dim=-1)
        adaptive_weight = torch.pow(entropy_approx / 3.0, alpha)
        adaptive_weight = torch.where(valid_mask, adaptive_weight, torch.zeros_like(adaptive_weight))
    weighted_losses = per_token_loss * adaptive_weight
    if reduction == "mean":
        return weighted_losses.sum() / valid_mask.sum()
    if reduction == "sum":
        return weighted_losses.sum()
    return weighted_losses


def _rows(backend, B, T):
    """Liger's rows, but for Triton's CPU interpreter (tests/liger_cases.py's cut)."""
    return sized(backend, B, T)[:2] if backend == "triton" and INTERPRETED else (B, T)


def _logits_pair(shape, seed, dtype=torch.float32, device="cpu", backend="auto"):
    """Liger's inputs: randn(B * T, V) cloned into two leaves, targets randint(0, V)."""
    B, T, V = shape
    B, T = _rows(backend, B, T)
    gen = torch.Generator().manual_seed(seed)
    tensor = torch.randn(B * T, V, generator=gen, dtype=dtype)
    target = torch.randint(0, V, (B * T,), generator=gen)
    return (tensor.clone().to(device).requires_grad_(), tensor.clone().requires_grad_(), target)


def _kdfast_eaft(x, target, backend, alpha=1.0, topk=20, module=False):
    if module:
        return kdfast.CrossEntropyLoss(token_scaling=kdfast.EAFT(alpha, topk), backend=backend)(x, target)
    return kdfast.cross_entropy(x, target, token_scaling=kdfast.EAFT(alpha=alpha, top_k=topk), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 64, 128), (4, 128, 256), (1, 32, 512)])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("topk", [10, 20])
def test_eaft_cross_entropy_correctness(backend, shape, alpha, topk):
    device = device_for(backend)
    x, x_ref, target = _logits_pair(shape, 42, device=device, backend=backend)
    loss = _kdfast_eaft(x, target.to(device), backend, alpha, topk)
    reference = torch_eaft_cross_entropy(x_ref, target, alpha=alpha, topk=topk)
    torch.testing.assert_close(loss.cpu(), reference, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 64, 128), (4, 128, 256)])
@pytest.mark.parametrize("ignore", [False, True])
def test_eaft_cross_entropy_gradient_and_ignore_index(backend, shape, ignore):
    """Liger's gradient case, and its ignore_index case (a third of the targets -100, from randperm)."""
    device = device_for(backend)
    x, x_ref, target = _logits_pair(shape, 42, device=device, backend=backend)
    if ignore:
        rows = target.shape[0]
        target[torch.randperm(rows, generator=torch.Generator().manual_seed(1))[:rows // 3]] = -100
    loss = _kdfast_eaft(x, target.to(device), backend)
    reference = torch_eaft_cross_entropy(x_ref, target)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(loss.cpu(), reference, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_eaft_cross_entropy_module(backend, alpha):
    device = device_for(backend)
    x, x_ref, target = _logits_pair((2, 64, 128), 42, device=device, backend=backend)
    loss = _kdfast_eaft(x, target.to(device), backend, alpha, module=True)
    reference = torch_eaft_cross_entropy(x_ref, target, alpha=alpha)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(loss.cpu(), reference, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, alpha, ignore", [((4, 64, 128, 256), 0.5, False), ((2, 128, 256, 512), 1.0, False),
                                                  ((4, 64, 128, 256), 1.0, True)])
def test_eaft_fused_linear_cross_entropy(backend, shape, alpha, ignore):
    """Liger's fused linear cases (a head of nn.Linear's initialisation, float32, no bias; the reference its logits
    then the EAFT CE): loss, hidden and head gradients within 1e-4 / 1e-3; and with a third of the targets ignored."""
    device = device_for(backend)
    B, T, H, V = shape
    B, T = _rows(backend, B, T)
    gen = torch.Generator().manual_seed(42)
    weight = (torch.rand(V, H, generator=gen) * 2 - 1) / H**0.5
    hidden = torch.randn(B * T, H, generator=gen)
    target = torch.randint(0, V, (B * T,), generator=gen)
    if ignore:
        target[torch.randperm(B * T, generator=gen)[:B * T // 3]] = -100
    x, w = hidden.clone().to(device).requires_grad_(), weight.clone().to(device).requires_grad_()
    x_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = kdfast.LinearCrossEntropyLoss(token_scaling=kdfast.EAFT(alpha=alpha), backend=backend)(x, w,
                                                                                                 target.to(device))
    reference = torch_eaft_cross_entropy(x_ref @ w_ref.T, target, alpha=alpha)
    torch.testing.assert_close(loss.cpu(), reference, atol=1e-4, rtol=1e-3)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(w.grad.cpu(), w_ref.grad, atol=1e-4, rtol=1e-3)


def test_eaft_alpha_zero_is_plain_cross_entropy():
    x, _, target = _logits_pair((2, 64, 128), 42)
    torch.testing.assert_close(_kdfast_eaft(x, target, "auto", alpha=0.0), F.cross_entropy(x, target), atol=1e-4,
                               rtol=1e-3)


def test_eaft_cross_entropy_bfloat16():
    """bf16 logits against the reference on their float32 copy, within Liger's 5e-2."""
    x, x_ref, target = _logits_pair((2, 64, 128), 42, dtype=torch.bfloat16)
    loss = _kdfast_eaft(x, target, "auto")
    reference = torch_eaft_cross_entropy(x_ref.detach().float(), target)
    torch.testing.assert_close(loss.float(), reference, atol=5e-2, rtol=5e-2)


def test_eaft_differs_from_standard_cross_entropy():
    x, _, target = _logits_pair((2, 64, 128), 42)
    assert not torch.allclose(kdfast.cross_entropy(x, target), _kdfast_eaft(x, target, "auto"), atol=1e-6)
