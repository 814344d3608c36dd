"""`kdfast.sampled_token_loss.linear_sampled_token_loss`, the sampled-token estimator in one pass over the head:
its loss, the log-probs and ratios it returns and its gradients to the hidden states, the head and its bias equal
float64 autograd through the full logits (every head map, the clipped ratio, several chunks, 16-bit heads), without
a gradient too."""

import pytest
import torch

from kdfast.sampled_token_loss import linear_sampled_token_loss

ROWS, HIDDEN, VOCAB = 37, 16, 53


def _inputs(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.8).to(dtype)
    bias = torch.randn(VOCAB, generator=generator).to(dtype)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    teacher = torch.log_softmax(torch.randn(ROWS, VOCAB, generator=generator) * 2, -1).gather(1, tokens[:, None])
    row_weights = torch.rand(ROWS, generator=generator)
    old = teacher.squeeze(1) + torch.randn(ROWS, generator=generator)  # some ratios far enough off to be clipped
    return hidden, weight, bias, tokens, teacher.squeeze(1), row_weights, old


def _reference(hidden, weight, bias, tokens, teacher, row_weights, old, scale, softcap, temperature, clip):
    """TRL's formula in float64: (log q - log p).detach() * log q, times the detached clipped ratio and the weight."""
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double()) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logprobs = torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    per_token = (logprobs - teacher.double()).detach() * logprobs
    ratio = None
    if clip is not None:
        ratio = torch.exp((logprobs.detach() - old.double()).clamp(-20, 20)).clamp(max=clip)
        per_token = per_token * ratio
    return (per_token * row_weights.double()).sum(), logprobs.detach(), ratio


@pytest.mark.parametrize("scale, softcap, temperature", [(1.0, None, 1.0), (0.7, None, 1.6), (1.2, 3.0, 0.8)])
@pytest.mark.parametrize("clip", [None, 2.0])
@pytest.mark.parametrize("chunk_size", ["auto", 5])
def test_loss_and_gradients_equal_float64(scale, softcap, temperature, clip, chunk_size):
    hidden, weight, bias, tokens, teacher, row_weights, old = _inputs()
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, logprobs, ratio = linear_sampled_token_loss(
        tensors[0], tensors[1], tokens, teacher, row_weights, bias=tensors[2], temperature=temperature,
        logit_scale=scale, softcap=softcap, clip=clip, old_logprobs=old, chunk_size=chunk_size)
    expected, expected_logprobs, expected_ratio = _reference(*tensors, tokens, teacher, row_weights, old, scale,
                                                             softcap, temperature, clip)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logprobs.double(), expected_logprobs, rtol=1e-5, atol=1e-5)
    assert (ratio is None) == (clip is None)
    if clip is not None:
        torch.testing.assert_close(ratio.double(), expected_ratio, rtol=1e-5, atol=1e-6)
        assert bool((expected_ratio == clip).any()) and bool((expected_ratio < clip).any())
    grads = torch.autograd.grad(loss, tensors)
    expected_grads = torch.autograd.grad(expected, tensors)
    for got, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), wanted.double(), rtol=1e-4, atol=1e-5)


def test_without_gradients_the_loss_and_log_probs_are_the_same():
    hidden, weight, bias, tokens, teacher, row_weights, old = _inputs(seed=1)
    with_grad = linear_sampled_token_loss(hidden.requires_grad_(True), weight, tokens, teacher, row_weights,
                                          bias=bias, clip=2.0, old_logprobs=old)
    with torch.no_grad():
        without = linear_sampled_token_loss(hidden, weight, tokens, teacher, row_weights, bias=bias, clip=2.0,
                                            old_logprobs=old)
    for a, b in zip(with_grad, without):
        torch.testing.assert_close(a.detach(), b)


def test_sixteen_bit_head():
    hidden, weight, bias, tokens, teacher, row_weights, old = _inputs(torch.bfloat16, seed=2)
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, _, _ = linear_sampled_token_loss(tensors[0], tensors[1], tokens, teacher, row_weights, bias=tensors[2])
    expected, _, _ = _reference(*tensors, tokens, teacher, row_weights, old, 1.0, None, 1.0, None)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(loss, tensors)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    # The chunk's logits are rounded to 16 bits (as the head's GEMM gives them): a few elements move by a few %.
    for got, wanted in zip(grads, torch.autograd.grad(expected, tensors)):
        assert float((got.double() - wanted.double()).norm() / wanted.double().norm()) < 2e-2


@pytest.mark.parametrize("chunk_size", ["auto", 8, (5, 20, 12), (37,)], ids=str)
def test_weighted_nll_equals_float64_over_any_chunks(chunk_size):
    """`linear_weighted_nll`: sum_r w_r * -log q(t_r) with signed weights, over uniform chunks or given lengths (the
    groups of whole sequences IW-OPD's weights need), against float64 autograd."""
    from kdfast.sampled_token_loss import linear_weighted_nll

    hidden, weight, bias, tokens, _, _, _ = _inputs()
    signed = torch.randn(ROWS, generator=torch.Generator().manual_seed(3))
    leaves = [tensor.detach().double().requires_grad_(True) for tensor in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves) / 1.3
    expected = -(signed.double() * torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)).sum()
    expected_grads = torch.autograd.grad(expected, leaves)
    ours = [tensor.detach().requires_grad_(True) for tensor in (hidden, weight, bias)]
    loss = linear_weighted_nll(ours[0], ours[1], tokens, signed, bias=ours[2], temperature=1.3, chunk_size=chunk_size)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(loss, ours), expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_chunk_lengths_must_cover_the_rows():
    from kdfast.sampled_token_loss import linear_weighted_nll

    hidden, weight, _, tokens, _, row_weights, _ = _inputs()
    with pytest.raises(ValueError, match="chunk lengths"):
        linear_weighted_nll(hidden, weight, tokens, row_weights, chunk_size=(5, 20))
