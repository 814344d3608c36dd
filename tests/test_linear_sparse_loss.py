"""kdfast.linear_sparse_distill_loss (hidden states and the student's LM head, a sparse teacher's ids and log-probs)
against its float64 reference: divergences, tails, bias, softcap, chunk sizes, reductions, dtypes, the module, and
that no teacher GEMM or [tokens, vocab] buffer is needed."""

import itertools

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import linear_loss_matches_reference, make_labels

import kdfast
from kdfast import cpu_gemm
from kdfast.reference import linear_sparse_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def make_inputs(lead_shape, hidden, vocab, k, dtype=torch.float32, bias=True, device="cpu", temperature=1.0):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    teacher_logits = torch.randn(*lead_shape, vocab, generator=generator) * 2
    top = torch.log_softmax(teacher_logits / temperature, dim=-1).topk(k, dim=-1)
    return dict(student_hidden=randn(*lead_shape, hidden), student_weight=randn(vocab, hidden, scale=0.5),
                student_bias=randn(vocab) if bias else None, teacher_ids=top.indices.to(device),
                teacher_logprobs=top.values.to(device))


def assert_matches_reference(inputs, labels, backend, **options):
    linear_loss_matches_reference(kdfast.linear_sparse_distill_loss, linear_sparse_distill_loss_reference, inputs,
                                  labels, TOLERANCES, backend=backend, **options)


def _grid():
    cases = []
    settings = itertools.cycle(itertools.product([1.0, 2.0, 0.7], ["mean", "sum", "none"]))
    extras = itertools.cycle([("none", True, None), ("some", False, 20.0), ("all", True, None), ("some", True, 3.0)])
    pairs = [(d, "bucket") for d in DIVERGENCES] + [("forward_kl", "renormalize")]
    for backend, (divergence, tail) in itertools.product(BACKENDS, pairs):
        temperature, reduction = next(settings)
        ignore, bias, softcap = next(extras)
        cases.append(pytest.param(backend, divergence, tail, temperature, reduction, ignore, bias, softcap,
                                  id=f"{backend}-{divergence}-{tail}-T{temperature}-{reduction}-{ignore}-b{bias}"
                                     f"-c{softcap}"))
    return cases


@pytest.mark.parametrize("backend,divergence,tail,temperature,reduction,ignore,bias,softcap", _grid())
def test_matches_reference(backend, divergence, tail, temperature, reduction, ignore, bias, softcap):
    device = device_for(backend)
    inputs = make_inputs((2, 13), 24, 211, 16, bias=bias, device=device, temperature=temperature)
    inputs["teacher_ids"][0, 3, 2] = -1
    labels = make_labels((2, 13), 211, ignore, device=device)
    assert_matches_reference(inputs, labels, backend, divergence=divergence, tail=tail, temperature=temperature,
                             reduction=reduction, ce_weight=0.5, beta=0.3, softcap=softcap, chunk_size=7)


@pytest.mark.parametrize("chunk_size", [1, 9, 64, "auto"])
def test_chunk_sizes(chunk_size):
    inputs = make_inputs((40,), 16, 300, 8)
    labels = make_labels((40,), 300, "some")
    assert_matches_reference(inputs, labels, "auto", chunk_size=chunk_size, ce_weight=0.5, temperature=2.0)


def test_bf16_inputs():
    inputs = make_inputs((32,), 32, 256, 16, dtype=torch.bfloat16)
    labels = make_labels((32,), 256, "some")
    assert_matches_reference(inputs, labels, "auto", chunk_size=16, ce_weight=0.5, divergence="jsd")


def test_module_matches_function():
    inputs = make_inputs((2, 5), 8, 40, 4)
    labels = make_labels((2, 5), 40, "some")
    module = kdfast.LinearSparseDistillLoss(tail="renormalize", ce_weight=0.5, softcap=10.0, chunk_size=3)
    assert "renormalize" in repr(module)
    got = module(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_ids"],
                 inputs["teacher_logprobs"], labels, student_bias=inputs["student_bias"])
    want = kdfast.linear_sparse_distill_loss(labels=labels, tail="renormalize", ce_weight=0.5, softcap=10.0,
                                             chunk_size=3, **inputs)
    torch.testing.assert_close(got, want)


def test_no_teacher_gemm_and_no_vocab_sized_teacher_buffer(monkeypatch):
    """Only the student's GEMMs run (forward into one chunk buffer, d hidden, d weight): three per chunk."""
    inputs = make_inputs((24,), 8, 50, 4, bias=False)
    calls = []

    def counting(product):
        def counted(a, b, *args, **kwargs):
            calls.append((tuple(a.shape), tuple(b.shape)))
            return product(a, b, *args, **kwargs)
        return counted

    cpu_gemm.onednn_products()  # (its one-time check of oneDNN is not the loss's)
    monkeypatch.setattr(torch, "mm", counting(torch.mm))
    monkeypatch.setattr(cpu_gemm, "onednn_linear", counting(cpu_gemm.onednn_linear))  # an AMD CPU's products (oneDNN)
    hidden = inputs["student_hidden"].requires_grad_(True)
    kdfast.linear_sparse_distill_loss(hidden, inputs["student_weight"], inputs["teacher_ids"],
                                      inputs["teacher_logprobs"], chunk_size=8, backend="cpu").backward()
    assert len(calls) == 2 * 3, calls  # per chunk: the logits and d hidden (d weight is an addmm)


@pytest.mark.parametrize("changes,match", [
    (dict(teacher_ids=torch.randint(0, 30, (2, 4, 3))), r"teacher_ids shape \(2, 4, 3\) must be the hidden states'"),
    (dict(teacher_logprobs=torch.randn(2, 5, 4)), r"teacher_logprobs shape \(2, 5, 4\) must equal teacher_ids"),
    (dict(teacher_ids=torch.full((2, 5, 3), 30)), r"teacher_ids must lie in \[0, 30\) or be -1"),
    (dict(student_weight=torch.randn(30, 9)), r"student_weight must have shape \[vocab, 8\]"),
])
def test_bad_input_is_a_clear_value_error(changes, match):
    arguments = dict(student_hidden=torch.randn(2, 5, 8), student_weight=torch.randn(30, 8),
                     teacher_ids=torch.randint(0, 30, (2, 5, 3)), teacher_logprobs=torch.randn(2, 5, 3))
    arguments.update(changes)
    with pytest.raises(ValueError, match=match):
        kdfast.linear_sparse_distill_loss(**arguments)
