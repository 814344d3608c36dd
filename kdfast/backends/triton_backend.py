"""The Triton kernel (kernels/distill.py): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

from kdfast.kernel_abi import FUSED, PhaseCall, SparseTargets
from kdfast.options import LossOptions


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
    from kdfast.kernels.distill import distill_forward_rows

    return distill_forward_rows(student, teacher if opts.has_kd else student, labels, grad_scale, grad, opts, call)


def sparse_forward_rows(student, teacher: SparseTargets, labels, grad_scale, grad, opts: LossOptions,
                        call: PhaseCall = FUSED):
    from kdfast.kernels.sparse import sparse_forward_rows as launch

    return launch(student, teacher.ids, teacher.logprobs, labels, grad_scale, grad, opts, call)
