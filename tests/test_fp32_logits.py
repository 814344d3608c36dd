"""`fp32_logits=True`: with 16-bit heads the chunk's logits stay in float32 as the GEMM accumulated them. Against a
float64 reference over the same bf16 inputs, the loss and the gradients come out far closer than with the logits
rounded to bf16 before the softmax (the default), most of all at the logit magnitudes of trained models."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels

import kdfast
from kdfast.reference import linear_distill_loss_reference, sparse_distill_loss_reference

SETTINGS = dict(divergence="forward_kl", temperature=2.0, kd_weight=0.5, ce_weight=0.5)


def _bf16_heads(device, scale=6.0, rows=48, hidden_s=64, hidden_t=96, vocab=1000):
    """bf16 hidden states and heads whose logits have a spread of about `scale`, a trained model's."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16).to(device)

    return (tensor(rows, hidden_s), tensor(vocab, hidden_s, std=scale / hidden_s**0.5), tensor(rows, hidden_t),
            tensor(vocab, hidden_t, std=scale / hidden_t**0.5))


def _relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def _errors(backend, fp32_logits, heads, labels):
    hidden, weight, teacher_hidden, teacher_weight = heads
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = kdfast.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, backend=backend,
                                      fp32_logits=fp32_logits, **SETTINGS)
    loss.backward()
    hidden64, weight64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    expected = linear_distill_loss_reference(hidden64, weight64, teacher_hidden, teacher_weight, labels, **SETTINGS)
    expected.backward()
    return (abs(loss.item() - expected.item()) / expected.item(), _relative_error(hidden.grad, hidden64.grad),
            _relative_error(weight.grad, weight64.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_logits_are_closer_to_float64_than_rounded_ones(backend):
    device = device_for(backend)
    heads = _bf16_heads(device)
    labels = make_labels((heads[0].shape[0],), heads[1].shape[0], "some").to(device)
    loss_err, hidden_err, weight_err = _errors(backend, True, heads, labels)
    rounded_loss_err, rounded_hidden_err, rounded_weight_err = _errors(backend, False, heads, labels)
    assert loss_err < 1e-5, loss_err  # the products of bf16 values are exact in float32; only their sums round
    assert loss_err < rounded_loss_err / 10, (loss_err, rounded_loss_err)
    # The gradients are returned in bf16 (the inputs' dtype), which bounds both at bf16's rounding (~4e-3).
    assert hidden_err < 6e-3 and weight_err < 6e-3, (hidden_err, weight_err)
    assert hidden_err < rounded_hidden_err / 2 and weight_err < rounded_weight_err / 2, (
        hidden_err, rounded_hidden_err, weight_err, rounded_weight_err)


def test_sparse_teacher_with_float32_logits():
    hidden, weight, _, _ = _bf16_heads("cpu")
    rows, vocab = hidden.shape[0], weight.shape[0]
    generator = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:8] for _ in range(rows)])
    logprobs = torch.randn(rows, 8, generator=generator).log_softmax(-1) - 0.1
    labels = make_labels((rows,), vocab, "some")
    results = {}
    for fp32_logits in (True, False):
        loss = kdfast.linear_sparse_distill_loss(hidden, weight, ids, logprobs, labels, fp32_logits=fp32_logits,
                                                 **SETTINGS)
        results[fp32_logits] = loss.item()
    logits64 = hidden.double() @ weight.double().t()
    expected = sparse_distill_loss_reference(logits64, ids, logprobs, labels, **SETTINGS).item()
    assert abs(results[True] - expected) / expected < 1e-5
    assert abs(results[True] - expected) < abs(results[False] - expected) / 10


def test_float32_inputs_are_unchanged():
    hidden, weight, teacher_hidden, teacher_weight = (t.float() for t in _bf16_heads("cpu"))
    labels = make_labels((hidden.shape[0],), weight.shape[0], "some")
    losses = [kdfast.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, fp32_logits=flag,
                                         **SETTINGS) for flag in (True, False)]
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("teachers", [1, 2])
def test_under_autocast_the_logits_are_of_the_operands_the_16_bit_gemms_read(teachers):
    """float32 inputs under a bf16 autocast: the float32 logits are the product of the operands rounded to bf16, as
    a GPU's 16-bit GEMM reads them (and TRL projects them), not of the unrounded float32 ones."""
    hidden, weight, teacher_hidden, teacher_weight = (t.float() + 1e-3 * torch.randn(t.shape) for t in
                                                      _bf16_heads("cpu"))
    labels = make_labels((hidden.shape[0],), weight.shape[0], "some")

    def loss(*inputs):
        student, head, teacher, teacher_head = (tensor.clone().requires_grad_(index < 2)
                                                for index, tensor in enumerate(inputs))
        if teachers == 1:
            value = kdfast.linear_distill_loss(student, head, teacher, teacher_head, labels, fp32_logits=True,
                                               **SETTINGS)
        else:
            value = kdfast.linear_multi_teacher_distill_loss(student, head, [teacher, teacher * 0.5],
                                                             [teacher_head, teacher_head], labels, fp32_logits=True,
                                                             **SETTINGS)
        value.backward()
        return value, student.grad.float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(hidden, weight, teacher_hidden, teacher_weight)
    rounded = loss(*(t.to(torch.bfloat16) for t in (hidden, weight, teacher_hidden, teacher_weight)))
    torch.testing.assert_close(autocast[0], rounded[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(autocast[1], rounded[1], rtol=1e-2, atol=1e-5)


def test_bad_setting_names_the_argument():
    heads = _bf16_heads("cpu")
    with pytest.raises(ValueError, match="fp32_logits must be True or False"):
        kdfast.linear_distill_loss(*heads, fp32_logits="yes")
    with pytest.raises(ValueError, match="fp32_logits must be True or False"):
        kdfast.LinearSparseDistillLoss(fp32_logits=1)
    assert "fp32_logits=True" in repr(kdfast.LinearDistillLoss(fp32_logits=True))
