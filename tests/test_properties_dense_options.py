"""Hypothesis: the dense loss with every option at once against the float64 reference, on every backend.

tests/test_properties.py draws shapes, scales and the divergence's settings; this file draws what a training loop
adds around them: padded vocabularies (`vocab_size`, with garbage in the padding), teacher columns masked to -inf
(the student's too, where a vocabulary's unused ids are masked on both sides), label smoothing, the z-loss, 16-bit
logits, [B, T, V] batches, `num_items_in_batch`, `inplace_backward` and strided rows."""

import math

import torch
from conftest import BACKENDS, device_for
from helpers import TOLERANCES, beta_refused, property_examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.reference import distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]


@st.composite
def loops(draw):
    batch, time = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 200))
    padding = draw(st.sampled_from([0, 0, 1, 7]))
    scale = draw(st.sampled_from([0.5, 3.0, 30.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    student = torch.randn(batch, time, vocab + padding, generator=generator) * scale
    teacher = torch.randn(batch, time, vocab + padding, generator=generator) * scale + draw(st.floats(-20, 20))
    # Columns past vocab_size hold whatever the head wrote there: they must change nothing.
    student[..., vocab:], teacher[..., vocab:] = 1e4, -1e4
    divergence, beta = draw(st.sampled_from(DIVERGENCES)), draw(st.floats(0, 1))
    masked = torch.zeros(vocab, dtype=torch.bool)
    if draw(st.booleans()):  # some ids the teacher never predicts (never all: a row needs a finite max)
        masked = torch.rand(vocab, generator=generator) < draw(st.floats(0.0, 0.9))
        masked[int(torch.randint(0, vocab, (1,), generator=generator))] = False
        teacher[..., :vocab][..., masked] = -math.inf
        # Reverse KL (JSD's at beta = 1) and its skew are infinite where the student has mass the teacher lacks:
        # mask the student there too.
        if divergence in ("reverse_kl", "skew_reverse_kl") or (divergence, beta) == ("jsd", 1.0) or draw(st.booleans()):
            student[..., :vocab][..., masked] = -math.inf
    unmasked = (~masked).nonzero().squeeze(1)
    labels = unmasked[torch.randint(0, unmasked.numel(), (batch, time), generator=generator)]
    labels[torch.rand(batch, time, generator=generator) < draw(st.floats(0, 1))] = -100
    options = dict(
        divergence=divergence, beta=beta, temperature=draw(st.floats(0.5, 3.0)),
        kd_weight=draw(st.floats(0.05, 2)), ce_weight=draw(st.floats(0, 2)), t2_scale=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])), z_loss_weight=draw(st.sampled_from([0.0, 1e-3])),
        vocab_size=vocab if padding else draw(st.sampled_from([None, vocab])))
    if (student[..., :vocab] == -math.inf).any():
        # Label smoothing spreads the CE target over every column, masked ones included: infinite by definition.
        options["label_smoothing"] = 0.0
    assume(not beta_refused(divergence, options["beta"]))
    if options["reduction"] == "mean" and draw(st.booleans()):
        options["num_items_in_batch"] = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    return student, teacher, labels, options, dtype


@settings(max_examples=property_examples(60), deadline=None, derandomize=True)
@given(case=loops(), backend=st.sampled_from(BACKENDS), inplace=st.booleans(), strided=st.booleans())
def test_every_option_matches_reference(case, backend, inplace, strided):
    student, teacher, labels, options, dtype = case
    device = device_for(backend)
    student, teacher, labels = student.to(dtype).to(device), teacher.to(dtype).to(device), labels.to(device)
    if strided:  # rows that are not contiguous with each other: every other row of a batch twice as long
        teacher = torch.stack([teacher, torch.zeros_like(teacher)], dim=2).flatten(1, 2)[:, ::2]
    base = student.detach().clone()
    if strided and not inplace:
        base = torch.stack([base, torch.zeros_like(base)], dim=2).flatten(1, 2)
    base.requires_grad_(True)
    s = base[:, ::2] if base.shape[1] != student.shape[1] else base
    loss = kdfast.distill_loss(s, teacher, labels, backend=backend, inplace_backward=inplace, **options)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss.device)
    (loss * weights).sum().backward()
    grad = (base.grad[:, ::2] if s is not base else base.grad).double().cpu()

    s64 = student.detach().double().cpu().requires_grad_(True)
    ref = distill_loss_reference(s64, teacher.double().cpu(), labels.cpu(), **options)
    (ref * weights.double().cpu()).sum().backward()
    assert torch.isfinite(ref).all() and torch.isfinite(s64.grad).all(), "the draw should make finite references"

    rtol, atol = TOLERANCES[dtype]
    kd_scale = options["kd_weight"] * (options["temperature"] ** 2 if options["t2_scale"] else 1.0)
    atol = atol * (1.0 + kd_scale + options["ce_weight"])
    assert loss.dtype == torch.float32 and grad.shape == student.shape
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    vocab = options["vocab_size"] or student.shape[-1]
    assert (grad[..., vocab:] == 0).all(), "padding columns past vocab_size got a gradient"
    torch.testing.assert_close(grad[..., :vocab], s64.grad[..., :vocab], rtol=rtol, atol=atol)
