"""The Triton kernel (kernels/distill.py): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import torch

from kdfast.kernel_abi import FUSED, MixedTeachers, PhaseCall, SparseTargets
from kdfast.options import LossOptions
from kdfast.teacher_mixture import kernel_teachers


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
    from kdfast.kernels.distill import distill_forward_rows

    return distill_forward_rows(student, teacher if opts.has_kd else student, labels, grad_scale, grad, opts, call)


# The sparse kernel compares a row's K ids pairwise as one [K, K] block (kernels/sparse.py), and Triton caps a block
# at 2^20 elements.
MAX_SPARSE_TOPK = 1024


def sparse_forward_rows(student, teacher: SparseTargets, labels, grad_scale, grad, opts: LossOptions,
                        call: PhaseCall = FUSED):
    """The sparse kernel for K <= MAX_SPARSE_TOPK entries a row; more are refused where Triton was asked for by name,
    and otherwise ("auto" on a GPU) run by the CUDA kernel (its workspace holds any K) or PyTorch."""
    topk = teacher.ids.shape[-1]
    if topk > MAX_SPARSE_TOPK:
        if opts.backend == "triton":
            raise ValueError(f"teacher_ids has {topk} entries a row; backend='triton' takes at most {MAX_SPARSE_TOPK} "
                             "(its kernel compares a row's ids as one [K, K] block): use backend='auto', 'cuda' or "
                             "'torch'")
        from kdfast.dispatch import backend_module, cuda_kernels_available

        other = "cuda" if student.device.type == "cuda" and cuda_kernels_available() else "torch"
        return backend_module(other).sparse_forward_rows(student, teacher, labels, grad_scale, grad, opts, call)
    from kdfast.kernels.sparse import sparse_forward_rows as launch

    return launch(student, teacher.ids, teacher.logprobs, labels, grad_scale, grad, opts, call)


def teacher_offsets(teachers) -> torch.Tensor:
    """Each teacher's element offset from the first's data (int64 [M], on their device): the kernel takes one
    pointer, and teacher m's rows are the first's plus this offset, in the first's strides."""
    first = teachers[0]
    size = first.element_size()
    offsets = []
    for index, teacher in enumerate(teachers):
        if teacher.dtype != first.dtype or teacher.stride() != first.stride() or teacher.device != first.device:
            raise ValueError(f"teacher {index} is {teacher.dtype} with strides {teacher.stride()} on "
                             f"{teacher.device}, teacher 0 {first.dtype} with {first.stride()} on {first.device}: "
                             "the teachers of one mixture must share dtype, layout and device")
        distance = teacher.data_ptr() - first.data_ptr()
        if distance % size:
            raise ValueError(f"teacher {index} starts {distance} bytes from teacher 0, not a whole number of "
                             f"{first.dtype} elements")
        offsets.append(distance // size)
    return torch.tensor(offsets, dtype=torch.int64).to(first.device, non_blocking=True)


def mixture_forward_rows(student, teacher: MixedTeachers, labels, grad_scale, grad, opts: LossOptions,
                         call: PhaseCall = FUSED):
    """Several teachers mixed per row inside the kernel (kernels/mixture.py): fused calls only."""
    teachers = kernel_teachers(teacher, call)
    if not opts.has_kd:
        return forward_rows(student, student, labels, grad_scale, grad, opts, call)
    from kdfast.kernels.distill import distill_forward_rows

    log_weights = teacher.log_weights.float()
    if log_weights.stride(-1) != 1:
        log_weights = log_weights.contiguous()
    mixture = (teacher_offsets(teachers), log_weights)
    return distill_forward_rows(student, teachers[0], labels, grad_scale, grad, opts, call, mixture,
                                teacher.divergences, mix_reads_once=mixture_reads_once())


def mixture_reads_once() -> bool:
    """KDFAST_TRITON_MIX_READS: "once" (the default) or "twice", the mixing kernel's reads of each teacher's block per
    pass (kernels/mixture.py, mixed_teacher): "once" skips the teachers in the first pass where the mixture's
    statistics are known, 40-60% fewer teacher reads. On an H200 (M=3, 8192 x 128256 bf16, forward KL + CE,
    2026-12-04) "once" took 12.1 ms against 17.4 ms for "twice" and 13.9 ms for a loop of three single-teacher
    calls; "twice" stays for comparison (`benchmarks/bench_multi_teacher.py` times both on a GPU)."""
    value = os.environ.get("KDFAST_TRITON_MIX_READS", "once")
    if value not in ("twice", "once"):
        raise ValueError(f"KDFAST_TRITON_MIX_READS must be 'once' or 'twice', got {value!r}")
    return value == "once"


def fills_teacher_divergences(opts: LossOptions) -> bool:
    """Whether the mixing kernel writes each teacher's own divergence (MixedTeachers.divergences) beside the mixture's
    loss (kernels/mixture.py, own_divergence, in its loss pass): when backend="triton" is asked for by name. Under
    "auto" the caller runs them as single-teacher calls instead: on an H200 (M=3, 8192 x 128256 bf16, forward KL +
    CE, 2026-12-04) the mixing call with them took 37.1 ms against 17.3 ms without, and a loop of three single-teacher
    calls, forward and backward, 13.9 ms."""
    return opts.has_kd and opts.backend == "triton"
