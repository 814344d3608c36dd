"""`kdfast.top_k_support`: a student's own top-k ids, its logits there, the rows' log-sum-exp and a token's log-prob
equal torch's on the full logits (every head map: bias, scale, softcap, temperature; several chunks); the gradient of
the logits at the ids, through the selected head rows alone, equals autograd's through the full logits."""

import pytest
import torch

import kdfast.top_k_support as support
from kdfast.top_k_support import HeadMap, logits_at, student_logits_at, top_k_support

ROWS, HIDDEN, VOCAB, K = 23, 12, 40, 7


def _head(softcap, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator).to(dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).to(dtype)
    bias = torch.randn(VOCAB, generator=generator).to(dtype)
    return hidden, weight, bias, dict(scale=0.7, softcap=softcap, temperature=1.5)


def _reference(hidden, weight, bias, scale, softcap, temperature):
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), bias.float()) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature


@pytest.fixture(params=[False, True], ids=["one-chunk", "several-chunks"])
def chunks(request, monkeypatch):
    if request.param:  # 3 rows a chunk forward, 1 row a chunk backward
        monkeypatch.setattr(support, "CHUNK_ELEMENTS", 3 * VOCAB)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_support_equals_torch_on_the_full_logits(softcap, chunks):
    hidden, weight, bias, settings = _head(softcap)
    head = HeadMap(weight, bias, **settings)
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(1))
    ids, values, lse, token_logprobs = top_k_support(hidden, head, K, tokens, with_lse=True)
    reference = _reference(hidden, weight, bias, **settings)
    top = torch.topk(reference, K)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(values, top.values)
    torch.testing.assert_close(lse, reference.logsumexp(-1))
    torch.testing.assert_close(token_logprobs, reference.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
    teacher_values, teacher_lse, teacher_logprobs = logits_at(hidden, head, ids, tokens, with_lse=True)
    torch.testing.assert_close(teacher_values, values)
    torch.testing.assert_close(teacher_lse, lse)
    torch.testing.assert_close(teacher_logprobs, token_logprobs)
    # Neither statistic where not asked for (each is a pass over the chunk's logits).
    assert top_k_support(hidden, head, K)[2] is None and logits_at(hidden, head, ids)[1:] == (None, None)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_logits_at_ids_gradient_equals_autograd(softcap, with_bias, chunks):
    hidden, weight, bias, settings = _head(softcap, seed=2)
    bias = bias if with_bias else None
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    head = HeadMap(tensors[1], tensors[2] if with_bias else None, **settings)
    ids, values, _, _ = top_k_support(hidden, head, K)
    upstream = torch.randn(ROWS, K, generator=torch.Generator().manual_seed(3))
    actual = torch.autograd.grad((student_logits_at(tensors[0], head, ids, values) * upstream).sum(), tensors)
    reference = _reference(tensors[0], tensors[1], tensors[2] if with_bias else torch.zeros(VOCAB), **settings)
    expected = torch.autograd.grad((reference.gather(1, ids) * upstream).sum(), tensors)
    for got, wanted in zip(actual, expected):
        torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6)


def test_sixteen_bit_head_gets_sixteen_bit_gradients():
    hidden, weight, bias, settings = _head(None, torch.bfloat16, seed=4)
    tensors = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    head = HeadMap(tensors[1], tensors[2], **settings)
    ids, values, _, _ = top_k_support(hidden, head, K)
    assert values.dtype == torch.float32
    grads = torch.autograd.grad(student_logits_at(tensors[0], head, ids, values).sum(), tensors)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    expected = torch.autograd.grad(_reference(*[t.float() for t in tensors], **settings).gather(1, ids).sum(),
                                   tensors)
    for got, wanted in zip(grads, expected):
        torch.testing.assert_close(got.float(), wanted.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("k", [0, VOCAB + 1])
def test_k_outside_the_vocabulary_is_refused(k):
    hidden, weight, bias, settings = _head(None)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 40\]"):
        top_k_support(hidden, HeadMap(weight, bias, **settings), k)
