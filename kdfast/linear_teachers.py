"""Several dense teachers in the fused linear loss's chunks (`linear_chunks.run_chunks`): a `TeacherHeads` kind.

combine="mixture": each teacher's GEMM writes the chunk's logits into one reused buffer, its logit map applies, and
its log-probabilities at T (centred on the row's largest logit before the temperature divides) are folded into a
running log-sum-exp of log w_m + log p_m; the chunk's teacher is then T * log p_bar, and the loss kernel runs once,
as for one teacher. combine="average": the M teachers' chunks are kept, and the kernel runs once per teacher on a
copy of the student's logits (and once for the CE), each gradient weighed per row (`AveragedRows`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.kernel_abi import PART_COLUMNS, PART_CORRECT, PART_ENTROPY, PART_KD
from kdfast.options import LossOptions


@dataclass
class TeacherHeads:
    """M dense teachers (`linear_chunks.TeacherHead`, hidden states flattened to [N, H_m]) and their per-row
    log-weights [N, M]."""

    heads: list
    log_weights: torch.Tensor
    combine: str
    temperature: float
    native_mixing: bool = False  # the C++ kernel mixes the teachers' chunks (multi_teacher.native_mixing)
    # [N, M] float32 to fill with each teacher's own divergence per row (return_components), else None.
    per_teacher: torch.Tensor | None = None

    @property
    def keeps_every_chunk(self) -> bool:
        """Whether a chunk holds every teacher's logits (the average, the C++ mixing, and the per-teacher divergences
        need them), rather than one teacher's and the running mixture."""
        return self.combine == "average" or self.native_mixing or self.per_teacher is not None

    @property
    def chunk_buffers(self) -> int:
        """[rows, V] float32 buffers a chunk holds: every teacher's logits (and the C++ kernel's mixture), or one
        teacher's and the running mixture of the torch statement."""
        if not self.keeps_every_chunk:
            return 2
        return len(self.heads) + (1 if self.combine == "mixture" else 0)


@dataclass
class AveragedTeacherRows:
    """A chunk's teachers for combine="average": each one's logits [1, C, V], the rows' weights [C, M], and where
    each teacher's own divergence per row goes ([C, M], or None)."""

    rows: list
    weights: torch.Tensor
    per_teacher: torch.Tensor | None = None


class ChunkTeachers:
    """The chunk's teacher input for the loss kernel, from `TeacherHeads`, with buffers allocated once per call."""

    def __init__(self, teachers: TeacherHeads, rows: int, vocab: int, device, weight_for):
        self.teachers = teachers
        # Every teacher's chunk (and the C++ mixing's output), or one and the running mixture.
        count = len(teachers.heads) + (1 if teachers.native_mixing else 0) if teachers.keeps_every_chunk else 2
        self.buffers = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(count)]
        self.chunks = None
        # Each head's weight as its GEMM writes float32 logits (kdfast.linear_chunks.gemm_weight), cast once.
        self.weights = [weight_for(head.weight, head.dtype, self.buffers[0]) for head in teachers.heads]

    def rows(self, rows: slice, count: int, logits_into):
        teachers = self.teachers
        if teachers.keeps_every_chunk:
            self.chunks = chunks = [
                head.logit_map.apply_(logits_into(buffer[:count], head.hidden[rows], weight, head.bias))
                for head, weight, buffer in zip(teachers.heads, self.weights, self.buffers)]
            if teachers.combine == "average":
                per_teacher = teachers.per_teacher[rows] if teachers.per_teacher is not None else None
                return AveragedTeacherRows([chunk.unsqueeze(0) for chunk in chunks], teachers.log_weights[rows].exp(),
                                           per_teacher)
            if teachers.native_mixing:
                mixed = self.buffers[-1][:count]
                torch.ops.kdfast_cpu.mix_teachers(chunks, teachers.log_weights[rows].contiguous(),
                                                  teachers.temperature, mixed)
                return mixed.unsqueeze(0)
            return self._mixture(rows, count, logits_into, chunks)
        return self._mixture(rows, count, logits_into)

    def record_divergences(self, rows: slice, student, labels, scale, opts: LossOptions, rows_kernel) -> None:
        """Each teacher's own divergence per row of the chunk into `per_teacher`, from the student's logits before the
        kernel writes their gradient (forward only; none for the average, whose calls give them)."""
        if self.teachers.per_teacher is None or self.teachers.combine == "average":
            return
        kd_only = opts.replace(ce_weight=0.0, z_loss_weight=0.0, label_smoothing=0.0)
        for index, chunk in enumerate(self.chunks):
            parts = rows_kernel(student, chunk.unsqueeze(0), labels, scale, None, kd_only)
            self.teachers.per_teacher[rows, index] = parts[:, PART_KD]

    def _mixture(self, rows: slice, count: int, logits_into, chunks=None):
        """The torch statement: a running log-sum-exp of each teacher's centred log-probabilities plus its log-weight,
        each teacher's logits computed into one reused buffer (or copied from `chunks`, which stay intact)."""
        teachers = self.teachers
        scratch = self.buffers[0][:count] if chunks is None else torch.empty_like(chunks[0])
        mixture = self.buffers[1][:count] if chunks is None else torch.empty_like(chunks[0])
        log_weights = teachers.log_weights[rows]
        for index, (head, weight) in enumerate(zip(teachers.heads, self.weights)):
            if chunks is None:
                head.logit_map.apply_(logits_into(scratch, head.hidden[rows], weight, head.bias))
            else:
                scratch.copy_(chunks[index])
            scratch.sub_(scratch.amax(-1, keepdim=True)).div_(teachers.temperature)
            scratch.sub_(torch.logsumexp(scratch, dim=-1, keepdim=True)).add_(log_weights[:, index:index + 1])
            if index == 0:
                mixture.copy_(scratch)
            else:
                torch.logaddexp(mixture, scratch, out=mixture)
        return mixture.mul_(teachers.temperature).unsqueeze(0)


class AveragedRows:
    """The loss kernel for combine="average": sum_m w_m (teacher m's divergence and gradient) per row, plus the CE
    once. The student's logits are copied for each call (the kernel writes its gradient over them)."""

    def __init__(self, rows_kernel):
        self.rows_kernel = rows_kernel

    def __call__(self, student, teachers: AveragedTeacherRows, labels, scale, grad, opts: LossOptions):
        kd_only = opts.replace(ce_weight=0.0, z_loss_weight=0.0, label_smoothing=0.0)
        work = torch.empty_like(student)
        total = torch.zeros(student.shape, dtype=torch.float32, device=student.device) if grad is not None else None
        parts = torch.zeros(student.shape[1], PART_COLUMNS, device=student.device)
        for index, teacher in enumerate(teachers.rows if opts.has_kd else []):
            work.copy_(student)
            teacher_parts = self.rows_kernel(work, teacher, labels, scale, work if grad is not None else None,
                                             kd_only)
            weight = teachers.weights[:, index]
            parts[:, PART_KD] += weight * teacher_parts[:, PART_KD]
            if teachers.per_teacher is not None:  # a view of the call's [N, M] table
                teachers.per_teacher[:, index] = teacher_parts[:, PART_KD]
            parts[:, [PART_ENTROPY, PART_CORRECT]] = teacher_parts[:, [PART_ENTROPY, PART_CORRECT]]
            if total is not None:
                total.add_(work * weight[None, :, None])
        if opts.needs_labels or opts.z_loss_weight != 0.0:
            work.copy_(student)
            ce_parts = self.rows_kernel(work, teachers.rows[0], labels, scale, work if grad is not None else None,
                                        opts.replace(kd_weight=0.0))
            if opts.has_kd:
                ce_parts[:, [PART_KD, PART_ENTROPY]] = parts[:, [PART_KD, PART_ENTROPY]]
            parts = ce_parts
            if total is not None:
                total.add_(work)
        if grad is not None:
            grad.copy_(total)
        return parts

    def reduce_hidden_grad(self, d_hidden):
        return self.rows_kernel.reduce_hidden_grad(d_hidden)
