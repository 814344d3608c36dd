"""The loss as torch.library custom ops (real + fake implementations), so torch.compile can trace it.

Two ops because an op may either return a fresh gradient or write it over its input, not both:
`kdfast::distill_forward` returns (the rows' loss parts, gradient); `kdfast::distill_forward_inplace` writes the
gradient over the student logits and returns the parts (kernel_abi.PART_COLUMNS). Both take the settings record
whole, as the text `LossOptions.encoded()` gives (an op's schema takes no dataclass).
"""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows, triton_available
from kdfast.huge_pages import empty_gradient
from kdfast.kernel_abi import PART_COLUMNS, SparseTargets
from kdfast.options import LossOptions
from kdfast.shared_vocab import shared_columns
from kdfast.sparse_options import SparseOptions


def triton_gpu_available() -> bool:
    return triton_available() and torch.cuda.is_available()


def _run(student, teacher, labels, grad_scale, grad, settings: str):
    opts = LossOptions.decode(settings)
    student, teacher, grad = shared_columns(student, teacher, grad, opts.vocab_size)
    # Resolved here, inside the op, so torch.compile never traces the build / availability checks.
    return device_rows(opts, student.device)(student, teacher, labels, grad_scale, grad, opts)


@torch.library.custom_op("kdfast::distill_forward", mutates_args=())
def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                    grad_scale: torch.Tensor, want_grad: bool, settings: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, rows, vocab] views in; the rows' loss parts [batch * rows, PART_COLUMNS] float32 and the gradient (or
    an empty tensor)."""
    grad = empty_gradient(student) if want_grad else None
    loss_rows = _run(student, teacher, labels, grad_scale, grad, settings)
    if grad is None:
        grad = student.new_empty(0)
    return loss_rows, grad


@distill_forward.register_fake
def _(student, teacher, labels, grad_scale, want_grad, settings):
    rows = student.shape[0] * student.shape[1]
    grad_shape = student.shape if want_grad else (0,)
    return (student.new_empty(rows, PART_COLUMNS, dtype=torch.float32),
            torch.empty(grad_shape, dtype=student.dtype, device=student.device))


@torch.library.custom_op("kdfast::distill_forward_inplace", mutates_args=("student",))
def distill_forward_inplace(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                            grad_scale: torch.Tensor, settings: str) -> torch.Tensor:
    """Like distill_forward, but the gradient overwrites `student`; returns the rows' loss parts."""
    return _run(student, teacher, labels, grad_scale, student, settings)


@distill_forward_inplace.register_fake
def _(student, teacher, labels, grad_scale, settings):
    return student.new_empty(student.shape[0] * student.shape[1], PART_COLUMNS, dtype=torch.float32)


def _run_sparse(student, ids, logprobs, labels, grad_scale, grad, settings: str):
    opts = SparseOptions.decode(settings)
    student, _, grad = shared_columns(student, None, grad, opts.vocab_size)
    return device_rows(opts, student.device)(student, SparseTargets(ids, logprobs), labels, grad_scale, grad, opts)


@torch.library.custom_op("kdfast::sparse_distill_forward", mutates_args=())
def sparse_distill_forward(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                           labels: torch.Tensor | None, grad_scale: torch.Tensor, want_grad: bool,
                           settings: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher's distill_forward: [batch, rows, K] ids and log-probs in place of the teacher's logits."""
    grad = empty_gradient(student) if want_grad else None
    loss_rows = _run_sparse(student, ids, logprobs, labels, grad_scale, grad, settings)
    if grad is None:
        grad = student.new_empty(0)
    return loss_rows, grad


@sparse_distill_forward.register_fake
def _(student, ids, logprobs, labels, grad_scale, want_grad, settings):
    rows = student.shape[0] * student.shape[1]
    grad_shape = student.shape if want_grad else (0,)
    return (student.new_empty(rows, PART_COLUMNS, dtype=torch.float32),
            torch.empty(grad_shape, dtype=student.dtype, device=student.device))


@torch.library.custom_op("kdfast::sparse_distill_forward_inplace", mutates_args=("student",))
def sparse_distill_forward_inplace(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                                   labels: torch.Tensor | None, grad_scale: torch.Tensor,
                                   settings: str) -> torch.Tensor:
    return _run_sparse(student, ids, logprobs, labels, grad_scale, student, settings)


@sparse_distill_forward_inplace.register_fake
def _(student, ids, logprobs, labels, grad_scale, settings):
    return student.new_empty(student.shape[0] * student.shape[1], PART_COLUMNS, dtype=torch.float32)


@torch.library.custom_op("kdfast::scale_gradient_", mutates_args=("grad",))
def scale_gradient_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (one element). On a GPU the factor is read by the kernel, which writes nothing
    when it is 1 (the usual loss.backward()), so neither a host sync nor a pass over the gradient is paid; on the
    CPU the host reads it (free) and skips the pass."""
    if grad.is_cuda and grad.is_contiguous() and triton_gpu_available():
        from kdfast.kernels.rescale import scale_unless_one_

        scale_unless_one_(grad, grad_output.reshape(1).to(torch.float32))
    elif grad.is_cuda or grad_output.device.type != "cpu" or grad_output.numel() != 1 or not bool(grad_output == 1):
        grad.mul_(grad_output)


@scale_gradient_.register_fake
def _(grad, grad_output):
    return None
