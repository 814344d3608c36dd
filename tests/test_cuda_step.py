"""A training step's loss on a GPU: no host synchronisation in forward or backward, a step captured in a CUDA graph
and replayed gives the eager step's numbers, a label out of range stops the step (device-side assert) instead of
returning NaN, and the weight gradient of 16-bit heads is summed by the GEMM itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS
from helpers import make_labels

import kdfast
from kdfast.linear_chunks import dtype_out_gemm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [b for b in BACKENDS if b in ("cuda", "triton")]
SETTINGS = dict(divergence="forward_kl", temperature=2.0, kd_weight=0.5, ce_weight=0.5)
ROOT = Path(__file__).resolve().parent.parent


def _logits_step(backend):
    student = torch.randn(64, 5000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(64, 5000, device="cuda", dtype=torch.bfloat16)
    labels = make_labels((64,), 5000, "some").cuda()
    return lambda: kdfast.distill_loss(student, teacher, labels, backend=backend, **SETTINGS).backward()


def _linear_step(backend, fp32_logits=False, sparse=False):
    hidden = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5000, 128, device="cuda") / 4).to(torch.bfloat16).requires_grad_(True)
    teacher_hidden = torch.randn(96, 192, device="cuda", dtype=torch.bfloat16)
    teacher_weight = (torch.randn(5000, 192, device="cuda") / 4).to(torch.bfloat16)
    labels = make_labels((96,), 5000, "some").cuda()
    if sparse:
        top = (teacher_hidden @ teacher_weight.t()).float().log_softmax(-1).topk(16, dim=-1)
        return lambda: kdfast.linear_sparse_distill_loss(hidden, weight, top.indices, top.values, labels,
                                                         backend=backend, fp32_logits=fp32_logits,
                                                         **SETTINGS).backward()
    return lambda: kdfast.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                              backend=backend, fp32_logits=fp32_logits, chunk_size=32,
                                              **SETTINGS).backward()


STEPS = {"logits": _logits_step, "linear": _linear_step,
         "linear-fp32-logits": lambda b: _linear_step(b, fp32_logits=True),
         "linear-sparse": lambda b: _linear_step(b, sparse=True)}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("step", list(STEPS))
def test_no_host_sync_in_forward_or_backward(backend, step):
    run = STEPS[step](backend)
    run()  # the first call builds, loads and tunes the kernels: outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_step_captured_in_a_cuda_graph_replays_the_eager_step(backend):
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(32, 4000, device="cuda", generator=generator, requires_grad=True)
    teacher = torch.randn(32, 4000, device="cuda", generator=generator)
    labels = make_labels((32,), 4000, "some").cuda()

    def step():
        loss = kdfast.distill_loss(student, teacher, labels, backend=backend, **SETTINGS)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture asks
        for _ in range(3):
            student.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    captured_grad = student.grad
    for seed in (1, 2):  # new inputs copied into the captured ones, then replayed
        fresh = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            student.copy_(torch.randn(student.shape, device="cuda", generator=fresh))
            teacher.copy_(torch.randn(teacher.shape, device="cuda", generator=fresh))
        graph.replay()
        eager_student = student.detach().clone().requires_grad_(True)
        eager = kdfast.distill_loss(eager_student, teacher, labels, backend=backend, **SETTINGS)
        eager.backward()
        torch.testing.assert_close(captured_loss, eager)
        torch.testing.assert_close(captured_grad, eager_student.grad)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="the CUDA kernels are not built here")
@pytest.mark.parametrize("sparse", [False, True])
def test_a_label_out_of_range_stops_the_step_on_cuda(sparse):
    """A device-side assert (the CUDA context is lost), so in a process of its own."""
    teacher_args = ("torch.randint(0, 50, (4, 3), device='cuda'), torch.randn(4, 3, device='cuda').log_softmax(-1)"
                    if sparse else "torch.randn(4, 50, device='cuda')")
    function = "sparse_distill_loss" if sparse else "distill_loss"
    script = ("import torch, kdfast\n"
              "student = torch.randn(4, 50, device='cuda', requires_grad=True)\n"
              "labels = torch.tensor([1, 50, 2, -100], device='cuda')\n"
              f"loss = kdfast.{function}(student, {teacher_args}, labels, ce_weight=1.0, backend='cuda')\n"
              "loss.backward()\n"
              "torch.cuda.synchronize()\n"
              "print('the step ran')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("KDFAST_CHECK_LABELS", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "the step ran" not in result.stdout, result.stdout
    assert "kdfast: labels must lie in [0, vocab)" in result.stderr, result.stderr[-2000:]


def test_the_weight_gradient_of_16_bit_heads_is_summed_by_the_gemm():
    assert dtype_out_gemm("cuda", torch.bfloat16, accumulate=True), "no GEMM here adds into float32 (torch < 2.8?)"
    assert dtype_out_gemm("cuda", torch.bfloat16, accumulate=False), "no GEMM here writes float32 (torch < 2.8?)"
    hidden = torch.randn(200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(3000, 64, device="cuda") / 4).to(torch.bfloat16).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(200, 64, device="cuda"), torch.randn(3000, 64, device="cuda") / 4
    labels = make_labels((200,), 3000, "some").cuda()
    loss = kdfast.linear_distill_loss(hidden, weight, teacher_hidden.bfloat16(), teacher_weight.bfloat16(), labels,
                                      chunk_size=64, fp32_logits=True, **SETTINGS)
    loss.backward()
    weight64 = weight.detach().double().requires_grad_(True)
    from kdfast.reference import linear_distill_loss_reference

    linear_distill_loss_reference(hidden.detach().double(), weight64, teacher_hidden.bfloat16().double(),
                                  teacher_weight.bfloat16().double(), labels, **SETTINGS).backward()
    error = (weight.grad.double() - weight64.grad).norm() / weight64.grad.norm()
    assert error < 6e-3, error  # bf16's own rounding of the returned gradient
