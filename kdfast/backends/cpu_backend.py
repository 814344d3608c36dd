"""The C++ CPU kernel (csrc/cpu), JIT-built on first use."""

from __future__ import annotations

from kdfast.kernel_abi import FUSED, MixedTeachers, PhaseCall, SparseTargets, native_settings
from kdfast.native_build import cpu_extension_or_none, load_cpu_extension
from kdfast.options import LossOptions
from kdfast.teacher_mixture import kernel_teachers


def available() -> bool:
    return cpu_extension_or_none() is not None


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
    ops = load_cpu_extension()  # raises NativeBuildError, saying why, when the kernel cannot be built here
    teacher = teacher if opts.has_kd else student  # unused by the kernel without KD; any valid view will do
    ints, floats = native_settings(opts, call)
    return ops.distill_forward(student, teacher, labels, grad_scale, grad, call.row_stats, call.row_totals, ints,
                               floats)


def sparse_forward_rows(student, teacher: SparseTargets, labels, grad_scale, grad, opts: LossOptions,
                        call: PhaseCall = FUSED):
    ops = load_cpu_extension()
    ints, floats = native_settings(opts, call)
    return ops.sparse_distill_forward(student, teacher.ids, teacher.logprobs, labels, grad_scale, grad, call.row_stats,
                                      call.row_totals, ints, floats)


def mixture_forward_rows(student, teacher: MixedTeachers, labels, grad_scale, grad, opts: LossOptions,
                         call: PhaseCall = FUSED):
    """Several teachers mixed per row inside the kernel (csrc/cpu/mixture_row.h): fused calls only."""
    teachers = kernel_teachers(teacher, call)
    if not opts.has_kd:
        return forward_rows(student, student, labels, grad_scale, grad, opts, call)
    ops = load_cpu_extension()
    ints, floats = native_settings(opts, call)
    return ops.mixture_distill_forward(student, teachers, teacher.log_weights, labels, grad_scale, grad,
                                       teacher.divergences, ints, floats)


def fills_teacher_divergences(opts: LossOptions) -> bool:
    """Whether the mixing kernel writes each teacher's own divergence (MixedTeachers.divergences) beside the mixture's
    loss: under every divergence, from the exps the mixture takes anyway and the student's (forward KL two FMAs a
    column and teacher; the others a sweep of each teacher's row; csrc/cpu/mixture_row.h)."""
    return opts.has_kd
