"""The hand-written CUDA kernels (csrc/cuda), JIT-built on first use."""

from __future__ import annotations

import os

import torch

from kdfast.kernel_abi import FUSED, PhaseCall, SparseTargets, native_settings
from kdfast.native_build import cuda_extension_or_none, load_cuda_extension
from kdfast.options import LossOptions


def available() -> bool:
    return torch.cuda.is_available() and cuda_extension_or_none() is not None


def forced_splits() -> int:
    """KDFAST_CUDA_SPLITS: blocks per row, for tests and tuning (0: the kernel's own choice)."""
    value = os.environ.get("KDFAST_CUDA_SPLITS", "0")
    if not value.isdigit():
        raise ValueError(f"KDFAST_CUDA_SPLITS must be a non-negative integer, got {value!r}")
    return int(value)


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
    ops = load_cuda_extension()  # raises NativeBuildError, saying why, when the kernels cannot be built here
    if not opts.has_kd:
        teacher = student  # unused by the kernel without KD; any valid view will do
    elif teacher.dtype not in (student.dtype, torch.float32):
        # The kernels pair a teacher of the student's dtype or float32; widening is exact.
        teacher = teacher.float()
    ints, floats = native_settings(opts, call, forced_splits())
    return ops.distill_forward(student, teacher, labels, grad_scale, grad, call.row_stats, call.row_totals, ints,
                               floats)


def sparse_forward_rows(student, teacher: SparseTargets, labels, grad_scale, grad, opts: LossOptions,
                        call: PhaseCall = FUSED):
    ops = load_cuda_extension()
    ints, floats = native_settings(opts, call, forced_splits())
    teacher = SparseTargets(teacher.ids, teacher.logprobs.float())  # [rows, K]: widening costs nothing to speak of
    return ops.sparse_distill_forward(student, teacher.ids, teacher.logprobs, labels, grad_scale, grad, call.row_stats,
                                      call.row_totals, ints, floats)
