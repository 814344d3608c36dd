"""The C++ CPU kernel (csrc/cpu), JIT-built on first use."""

from __future__ import annotations

from kdfast.native_build import cpu_extension_or_none
from kdfast.options import LossOptions


def available() -> bool:
    return cpu_extension_or_none() is not None


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions):
    ops = cpu_extension_or_none()
    if ops is None:
        raise RuntimeError("the kdfast CPU kernel is not available on this machine (see the build warning)")
    teacher = teacher if opts.has_kd else student  # unused by the kernel without KD; any valid view will do
    return ops.distill_forward(student, teacher, labels, grad_scale, grad, opts.divergence_code,
                               float(opts.beta), float(opts.temperature), opts.kd_scale,
                               float(opts.ce_weight), int(opts.ignore_index), opts.has_kd, opts.has_ce)
