"""The C++ CPU kernel (csrc/cpu), JIT-built on first use."""

from __future__ import annotations

from kdfast.kernel_abi import FUSED, MixedTeachers, Phase, PhaseCall, SparseTargets, native_settings
from kdfast.native_build import cpu_extension_or_none, load_cpu_extension
from kdfast.options import LossOptions


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
    if call.phase != Phase.FUSED:
        raise ValueError("several teachers are mixed in fused calls only (no vocab-parallel phases)")
    if not opts.has_kd:
        return forward_rows(student, student, labels, grad_scale, grad, opts, call)
    ops = load_cpu_extension()
    teachers = teacher.teachers
    first = teachers[0]
    if any(t.dtype != first.dtype or t.stride() != first.stride() for t in teachers):
        teachers = [t.float().contiguous() for t in teachers]  # the kernel reads one dtype and one layout
    ints, floats = native_settings(opts, call)
    return ops.mixture_distill_forward(student, list(teachers), teacher.log_weights, labels, grad_scale, grad, ints,
                                       floats)
