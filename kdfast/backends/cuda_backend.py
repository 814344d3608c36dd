"""The hand-written CUDA kernels (csrc/cuda), JIT-built on first use."""

from __future__ import annotations

import os

import torch

from kdfast import teacher_mixture
from kdfast.kernel_abi import FUSED, MixedTeachers, PhaseCall, SparseTargets, native_settings
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


def mixture_forward_rows(student, teacher: MixedTeachers, labels, grad_scale, grad, opts: LossOptions,
                         call: PhaseCall = FUSED):
    """Several teachers mixed per row inside the kernel (csrc/cuda/mixed_teachers.cuh), one block per row: fused calls
    of teachers in the student's dtype. Teachers of another dtype are mixed a chunk of rows at a time by torch (the
    kernel pairs each student dtype with its own alone, which keeps the build small)."""
    teachers = teacher_mixture.kernel_teachers(teacher, call)
    if not opts.has_kd:
        return forward_rows(student, student, labels, grad_scale, grad, opts, call)
    if teachers[0].dtype != student.dtype:
        return teacher_mixture.mixture_rows_by_chunks(forward_rows, student, teacher, labels, grad_scale, grad, opts,
                                                      call)
    ops = load_cuda_extension()
    ints, floats = native_settings(opts, call, 1)  # the mixing kernel runs one block per row
    log_weights = teacher.log_weights.float()
    if log_weights.stride(-1) != 1:
        log_weights = log_weights.contiguous()
    return ops.mixture_distill_forward(student, teachers, log_weights, labels, grad_scale, grad, None, ints, floats)
