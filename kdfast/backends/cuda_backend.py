"""The hand-written CUDA kernels (csrc/cuda), JIT-built on first use."""

from __future__ import annotations

import os

import torch

from kdfast.native_build import cuda_extension_or_none
from kdfast.options import LossOptions


def available() -> bool:
    return torch.cuda.is_available() and cuda_extension_or_none() is not None


def forced_splits() -> int:
    """KDFAST_CUDA_SPLITS: blocks per row, for tests and tuning (0: the kernel's own choice)."""
    value = os.environ.get("KDFAST_CUDA_SPLITS", "0")
    if not value.isdigit():
        raise ValueError(f"KDFAST_CUDA_SPLITS must be a non-negative integer, got {value!r}")
    return int(value)


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions):
    ops = cuda_extension_or_none()
    if ops is None:
        raise RuntimeError("the kdfast CUDA kernels are not available on this machine (see the build warning)")
    if not opts.has_kd:
        teacher = student  # unused by the kernel without KD; any valid view will do
    elif teacher.dtype not in (student.dtype, torch.float32):
        # The kernels pair a teacher of the student's dtype or float32; widening is exact.
        teacher = teacher.float()
    return ops.distill_forward(student, teacher, labels, grad_scale, grad, opts.divergence_code,
                               float(opts.beta), float(opts.temperature), opts.kd_scale,
                               float(opts.ce_weight), int(opts.ignore_index), opts.has_kd, opts.has_ce,
                               forced_splits())
