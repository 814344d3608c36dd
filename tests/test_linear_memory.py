"""The fused linear loss holds one chunk of logits, never [tokens, vocab]: its extra peak memory for a
training step's loss + backward stays under a quarter of one float32 [tokens, vocab] tensor."""

import pytest
import torch

import kdfast
from kdfast.memory import extra_peak_bytes


def _step_extra_bytes(device, tokens, hidden, vocab):
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

    step()  # first call: kernel build / load, allocator warm-up
    student_hidden.grad = student_weight.grad = None
    return extra_peak_bytes(step, torch.device(device))


def test_cpu_peak_is_a_fraction_of_one_logits_tensor():
    tokens, vocab = 4096, 32_000
    one_logits_tensor = tokens * vocab * 4
    extra = _step_extra_bytes("cpu", tokens, 64, vocab)
    # The gradients themselves (student_weight.grad: 8 MB, student_hidden.grad: 1 MB) are part of "extra".
    assert extra < one_logits_tensor / 4, f"extra peak {extra / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_is_a_fraction_of_one_logits_tensor():
    tokens, vocab = 8192, 128_256
    one_logits_tensor = tokens * vocab * 4
    extra = _step_extra_bytes("cuda", tokens, 256, vocab)
    assert extra < one_logits_tensor / 4, f"extra peak {extra / 2**20:.0f} MiB"
