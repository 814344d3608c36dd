"""Several dense teachers in the fused linear loss's chunks (`linear_chunks.run_chunks`): a `TeacherHeads` kind.

Each teacher's GEMM writes the chunk's logits into a buffer of its own (allocated once per call) and its logit map
applies (a teacher given as its logits has its rows copied there). combine="mixture": the chunk's teacher is
`kernel_abi.MixedTeachers` (the M chunks and the rows' log-weights), mixed by the rows kernel itself (the C++ kernel per
row in its scratch; elsewhere `teacher_mixture.py`), which runs once per chunk, as for one teacher. combine="average":
the kernel runs once per teacher on a copy of the student's logits (and once for the CE), each gradient weighed per row
(`AveragedRows`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.dispatch import average_of_teacher_divergences
from kdfast.kernel_abi import PART_COLUMNS, PART_CORRECT, PART_ENTROPY, PART_KD, MixedTeachers
from kdfast.options import LossOptions
from kdfast.teacher_routing import Routing


@dataclass
class TeacherHeads:
    """M dense teachers, each a `linear_chunks.TeacherHead` (hidden states flattened to [N, H_m]) or given as its
    logits (`linear_chunks.TeacherLogits`, whose rows are copied into the chunk's buffer), and their per-row
    log-weights [N, M]; or, routed (`kdfast.teacher_routing.Routing`), each row's one teacher (no log-weights; a
    teacher's hidden states or logits may hold its own rows alone)."""

    heads: list
    log_weights: torch.Tensor | None
    combine: str
    temperature: float
    # [N, M] float32 to fill with each teacher's own divergence per row (return_components), else None.
    per_teacher: torch.Tensor | None = None
    route: Routing | None = None

    @property
    def chunk_buffers(self) -> int:
        """[rows, V] float32 buffers a chunk of mixed or averaged teachers holds: every teacher's logits (a routed chunk
        holds one buffer: `linear_chunks.routed_logits_dtype`)."""
        return len(self.heads)


@dataclass
class AveragedTeacherRows:
    """A chunk's teachers for combine="average": each one's logits [1, C, V], the rows' weights [C, M], and where
    each teacher's own divergence per row goes ([C, M], or None)."""

    rows: list
    weights: torch.Tensor
    per_teacher: torch.Tensor | None = None


class ChunkTeachers:
    """The chunk's teacher input for the loss kernel, from `TeacherHeads`, with buffers allocated once per call.
    `average_as_mixture`: combine="average" runs as the mixture's call (`dispatch.average_runs_as_mixture`), each
    teacher's own divergence written by the kernel (into a buffer of the chunk's when no components are kept)."""

    def __init__(self, teachers: TeacherHeads, rows: int, vocab: int, device, weight_for,
                 divergences_in_kernel: bool = False, average_as_mixture: bool = False):
        self.teachers = teachers
        self.average_as_mixture = average_as_mixture
        # The rows kernel writes each teacher's own divergence in the mixture's call (no call per teacher).
        self.divergences_in_kernel = (divergences_in_kernel or average_as_mixture) and teachers.per_teacher is not None
        self.own_divergences = (torch.empty(rows, len(teachers.heads), dtype=torch.float32, device=device)
                                if average_as_mixture and teachers.per_teacher is None else None)
        self.buffers = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in teachers.heads]
        self.chunks = None
        # Each head's weight as its GEMM writes float32 logits (kdfast.linear_chunks.gemm_weight), cast once.
        self.weights = [head.prepared_weight(weight_for, self.buffers[0]) for head in teachers.heads]

    def rows(self, rows: slice, count: int, logits_into):
        teachers = self.teachers
        self.chunks = None  # the last chunk's logits go first (`logits_into` may make new tensors)
        self.chunks = chunks = [head.chunk_into(buffer[:count], rows, weight, logits_into)
                                for head, weight, buffer in zip(teachers.heads, self.weights, self.buffers)]
        if teachers.combine == "average" and not self.average_as_mixture:
            per_teacher = teachers.per_teacher[rows] if teachers.per_teacher is not None else None
            return AveragedTeacherRows([chunk.unsqueeze(0) for chunk in chunks], teachers.log_weights[rows].exp(),
                                       per_teacher)
        divergences = teachers.per_teacher[rows] if self.divergences_in_kernel else None
        if self.own_divergences is not None:
            divergences = self.own_divergences[:count]
        return MixedTeachers(tuple(chunk.unsqueeze(0) for chunk in chunks), teachers.log_weights[rows], divergences)

    def record_kernel_parts(self, rows: slice, parts: torch.Tensor) -> None:
        """Nothing: the mixture's divergences per teacher come from `record_divergences` or the kernel."""

    def record_divergences(self, rows: slice, student, labels, scale, opts: LossOptions, rows_kernel) -> None:
        """Each teacher's own divergence per row of the chunk into `per_teacher`, from the student's logits before the
        kernel writes their gradient (forward only; none for the average, whose calls give them)."""
        if self.teachers.per_teacher is None or self.teachers.combine == "average" or self.divergences_in_kernel:
            return
        kd_only = opts.replace(ce_weight=0.0, z_loss_weight=0.0, label_smoothing=0.0)
        for index, chunk in enumerate(self.chunks):
            parts = rows_kernel(student, chunk.unsqueeze(0), labels, scale, None, kd_only)
            self.teachers.per_teacher[rows, index] = parts[:, PART_KD]


class RoutedChunkTeachers:
    """The chunk's teacher for routed rows: one [rows, V] buffer in a single teacher's logits dtype
    (`linear_chunks.routed_logits_dtype`), each run of rows of one teacher written by that teacher's GEMM (and logit
    map), so the rows kernel takes it as a single dense teacher. A row's divergence is its teacher's own: with
    return_components it goes to that teacher's column (the others stay 0 on that row)."""

    def __init__(self, teachers: TeacherHeads, rows: int, vocab: int, device, weight_for, dtype: torch.dtype):
        self.teachers = teachers
        self.buffer = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.weights = [head.prepared_weight(weight_for, self.buffer) for head in teachers.heads]

    def rows(self, rows: slice, count: int, logits_into):
        chunk = self.buffer[:count]
        for index, first, end, slot in self.teachers.route.runs(rows.start, rows.start + count):
            out = chunk[first - rows.start:end - rows.start]
            logits = self.teachers.heads[index].chunk_into(out, slice(slot, slot + end - first), self.weights[index],
                                                           logits_into)
            if logits.data_ptr() != out.data_ptr():  # oneDNN wrote a tensor of its own (linear_chunks._logits_into)
                out.copy_(logits)
        return chunk.unsqueeze(0)

    def record_divergences(self, rows: slice, student, labels, scale, opts: LossOptions, rows_kernel) -> None:
        """Nothing before the kernel: each row's divergence is the kernel's own KD part."""

    def record_kernel_parts(self, rows: slice, parts: torch.Tensor) -> None:
        if self.teachers.per_teacher is not None:
            self.teachers.per_teacher[rows].scatter_(1, self.teachers.route.device_teacher[rows, None],
                                                     parts[:, PART_KD, None])


class AverageAsMixture:
    """The loss kernel for combine="average" run as the mixture's call (`dispatch.average_runs_as_mixture`): its
    gradient, and the KD part sum_m w_m KL(p_m || q) from each teacher's own divergence the kernel wrote."""

    def __init__(self, rows_kernel):
        self.rows_kernel = rows_kernel

    def __call__(self, student, teachers: MixedTeachers, labels, scale, grad, opts: LossOptions):
        parts = self.rows_kernel(student, teachers, labels, scale, grad, opts)
        parts[:, PART_KD] = average_of_teacher_divergences(teachers.divergences, teachers.log_weights)
        return parts

    def reduce_hidden_grad(self, d_hidden):
        return self.rows_kernel.reduce_hidden_grad(d_hidden)


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
