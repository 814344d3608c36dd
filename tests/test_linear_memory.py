"""The fused linear loss holds one chunk of logits, never [tokens, vocab]: its extra peak memory for a training
step's loss + backward (a live teacher head, or the teacher's logits given, or two teachers' logits) stays under a
quarter of one float32 [tokens, vocab] tensor, measured in a fresh process at
N=4096, H=256, V=32000 (glibc's mmap threshold pinned there, so that the peak is what the step holds live, not what
the heap happened to keep of the chunks it freed: kdfast/memory.py)."""

import functools
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast.memory import extra_peak_bytes, extra_peak_bytes_in_child


def linear_step(device, tokens, hidden, vocab):
    """Builds the inputs and returns one step: the loss and its backward into the student's hidden states and head."""
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_(True)
    student_weight = (torch.randn(vocab, hidden, generator=generator) * 0.1).to(device).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, hidden, generator=generator).to(device)
    teacher_weight = (torch.randn(vocab, hidden, generator=generator) * 0.1).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)

    def step():
        loss = kdfast.linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                          ce_weight=0.5, temperature=2.0)
        loss.backward()
        student_hidden.grad = student_weight.grad = None  # so that every step allocates (and is charged for) them

    return step


def _given_logits_step(device, tokens, hidden, vocab, several: bool):
    """`linear_step` with the teacher's logits given (`linear_student_distill_loss`), as a shifted view of [1, N + 1,
    V] logits (not one run of rows: each chunk gathers its own); `several`: two teachers given so
    (`linear_student_multi_teacher_distill_loss`, their mixture), the shifted view and a bf16 one. The given logits
    are inputs, held before the step like the hidden states; what the step adds is measured."""
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(1, tokens, hidden, generator=generator).to(device).requires_grad_(True)
    student_weight = (torch.randn(vocab, hidden, generator=generator) * 0.1).to(device).requires_grad_(True)
    teacher_logits = torch.randn(1, tokens + 1, vocab, generator=generator).to(device)[:, :-1]
    if several:
        teacher_logits = [teacher_logits,
                          torch.randn(1, tokens, vocab, generator=generator).to(device, torch.bfloat16)]
    labels = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)
    loss_fn = kdfast.linear_student_multi_teacher_distill_loss if several else kdfast.linear_student_distill_loss

    def step():
        loss = loss_fn(student_hidden, student_weight, teacher_logits, labels, ce_weight=0.5, temperature=2.0)
        loss.backward()
        student_hidden.grad = student_weight.grad = None

    return step


given_logits_step = functools.partial(_given_logits_step, several=False)
given_teachers_step = functools.partial(_given_logits_step, several=True)


@pytest.mark.parametrize("factory", ["linear_step", "given_logits_step", "given_teachers_step"])
def test_cpu_peak_is_a_fraction_of_one_logits_tensor(factory):
    tokens, hidden, vocab = 4096, 256, 32_000
    one_logits_tensor = tokens * vocab * 4
    extra = extra_peak_bytes_in_child(f"{Path(__file__)}:{factory}", "cpu", tokens, hidden, vocab)
    # The gradients themselves (student_weight.grad: 31 MiB, student_hidden.grad: 4 MiB) are part of "extra".
    assert extra < one_logits_tensor / 4, f"extra peak {extra / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_is_a_fraction_of_one_logits_tensor():
    tokens, vocab = 8192, 128_256
    one_logits_tensor = tokens * vocab * 4
    step = linear_step("cuda", tokens, 256, vocab)
    step()
    extra = extra_peak_bytes(step, torch.device("cuda"))
    assert extra < one_logits_tensor / 4, f"extra peak {extra / 2**20:.0f} MiB"
