"""Several teachers as one teacher kind (`kernel_abi.MixedTeachers`) on any backend. The C++ kernel mixes each row
in its own scratch (csrc/cpu/mixture_row.h), the Triton and CUDA kernels at each read of the teacher
(kernels/mixture.py, csrc/cuda/mixed_teachers.cuh); elsewhere (torch, and CUDA for teachers of another dtype than the
student's) a chunk of rows is mixed by the torch statement below into T * log p_bar, logits whose
softmax at T is the mixture, and the backend's single-teacher rows kernel takes it from there: every divergence, the
CE family and the numerical guards come with it."""

from __future__ import annotations

import torch

from kdfast.kernel_abi import FUSED, PART_COLUMNS, MixedTeachers, Phase, PhaseCall
from kdfast.options import LossOptions

_CHUNK_ELEMENTS = 1 << 22  # elements of one teacher's chunk: M float32 temporaries of 16 MiB


def kernel_teachers(teacher: MixedTeachers, call: PhaseCall) -> list:
    """The teachers as a mixing kernel reads them (the C++ one, the Triton one): one dtype and one layout, float32
    contiguous copies where they differ; fused calls only."""
    if call.phase != Phase.FUSED:
        raise ValueError("several teachers are mixed in fused calls only (no vocab-parallel phases)")
    teachers, first = list(teacher.teachers), teacher.teachers[0]
    if any(t.dtype != first.dtype or t.stride() != first.stride() for t in teachers):
        teachers = [t.float().contiguous() for t in teachers]
    return teachers


def mixed_logits(teachers, log_weights: torch.Tensor, temperature: float, group=None) -> torch.Tensor:
    """T * log sum_m w_m softmax(t_m / T) of M chunks [C, V] (any float dtype) and log-weights [C, M], float32.
    Each log p_m is (t - max) / T - log z (never t / T - ..., which rounds by |max| / T); a teacher whose weight is
    0 (log-weight -inf) drops out exactly. With a process `group` the chunks are vocab shards [C, V_shard] and each
    p_m is normalised over the whole vocabulary (`_shard_log_probs`), so the shards' mixtures sum to 1 together."""
    if group is not None:
        log_p = _shard_log_probs(teachers, temperature, group)
    else:
        log_p = []
        for logits in teachers:
            centred = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
            log_p.append(centred - torch.logsumexp(centred, dim=-1, keepdim=True))
        log_p = torch.stack(log_p)
    mixed = torch.logsumexp(log_p + log_weights.t()[:, :, None], dim=0)
    return mixed.mul_(temperature)


def _shard_log_probs(teachers, temperature: float, group) -> torch.Tensor:
    """[M, C, V_shard] log p_m over this rank's columns, p_m normalised over every rank's: two exchanges of [M, C]
    (each row's max over the ranks, then its sum of exps under that max), 8 bytes per row and teacher."""
    from kdfast.distributed import all_reduce_max, all_reduce_sum

    logits = torch.stack([teacher.float() for teacher in teachers])
    top = all_reduce_max(logits.amax(-1), group)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))  # a row of no mass: -inf - -inf would be NaN
    centred = (logits - top[..., None]) / temperature
    return centred - all_reduce_sum(centred.exp().sum(-1), group).log()[..., None]


def mixture_rows_by_chunks(forward_rows, student, teacher: MixedTeachers, labels, grad_scale, grad,
                           opts: LossOptions, call: PhaseCall = FUSED, shard=None) -> torch.Tensor:
    """A backend's single-teacher `forward_rows` over chunks of rows, each chunk's teachers mixed first: the rows'
    parts [batch * rows, PART_COLUMNS], the gradient written into `grad` ([batch, rows, V], or None). With a vocab
    `shard` (kdfast.distributed.VocabShard) the columns are its own and the mixture is normalised over all ranks;
    every rank then takes chunks of the same rows, sized by the whole vocabulary, since each chunk exchanges."""
    if call.phase != Phase.FUSED:
        raise ValueError("several teachers are mixed in fused calls only (no vocab-parallel phases)")
    batch, rows_per_batch, vocab = student.shape
    parts = torch.empty(batch * rows_per_batch, PART_COLUMNS, dtype=torch.float32, device=student.device)
    step = max(1, _CHUNK_ELEMENTS // max(shard.vocab if shard is not None else vocab, 1))
    group = shard.group if shard is not None else None
    for b in range(batch):
        for start in range(0, rows_per_batch, step):
            span = slice(start, min(start + step, rows_per_batch))
            flat = slice(b * rows_per_batch + span.start, b * rows_per_batch + span.stop)
            chunk_labels = labels[flat] if labels is not None else None
            mixed = (mixed_logits([t[b, span] for t in teacher.teachers], teacher.log_weights[flat], opts.temperature,
                                  group) if opts.has_kd else student[b, span])
            chunk_grad = grad[b, span].unsqueeze(0) if grad is not None else None
            parts[flat] = forward_rows(student[b, span].unsqueeze(0), mixed.unsqueeze(0), chunk_labels, grad_scale,
                                       chunk_grad, opts, call)
    return parts
