"""The Triton kernel (kernels/distill.py): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

from kdfast.options import LossOptions


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions):
    from kdfast.kernels.distill import distill_forward_rows

    return distill_forward_rows(
        student, teacher if opts.has_kd else student, labels, grad_scale, grad,
        divergence_code=opts.divergence_code, beta=float(opts.beta), temperature=float(opts.temperature),
        kd_scale=opts.kd_scale, ce_weight=float(opts.ce_weight), ignore_index=int(opts.ignore_index),
        has_kd=opts.has_kd, has_ce=opts.has_ce)
