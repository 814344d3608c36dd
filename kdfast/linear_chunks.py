"""The chunked orchestrator of the fused linear loss (docs/DESIGN.md, "Algorithms"): tokens in chunks; per chunk
the student's LM head on the platform's GEMM, the teacher's (a dense head's GEMM, or a sparse teacher's rows: no
GEMM at all), the logits-level kernel for loss and dlogits in place, then d hidden = G W_s and d W_s += G^T X (and
d b_s) accumulated. Only the loss kernel differs between devices.

At most one chunk of logits per model exists at a time, so memory is bounded by the chunk, not by
tokens x vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.kernel_abi import PART_COLUMNS, SparseTargets
from kdfast.options import LossOptions

# Bytes the chunk's logits (both models) may take: small enough that the loss adds little to the step's
# peak, large enough that each GEMM stays efficient (measured: benchmarks/bench_linear.py).
CHUNK_BUDGET_BYTES = {"cpu": 48 * 2**20, "cuda": 512 * 2**20}
# The weight gradient of 16-bit heads is summed in float32; each chunk's product is added a vocab slice at
# a time so that its 16-bit temporary stays this small.
WEIGHT_GRAD_SLICE_BYTES = 64 * 2**20


@dataclass
class TeacherHead:
    """A dense teacher: hidden states [N, H_t] and its LM head [V, H_t] (+ bias [V]), a constant."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype  # its GEMM's dtype


@dataclass
class Heads:
    """Flattened inputs of one call: the student's hidden [N, H] and head [V, H] (+ bias [V]), and the teacher: a
    TeacherHead, or a sparse teacher's SparseTargets ([N, K] ids and log-probs)."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher: TeacherHead | SparseTargets
    labels: torch.Tensor | None  # [N] int64, contiguous
    softcap: float | None
    student_dtype: torch.dtype  # the GEMMs' dtype (autocast's, or the inputs' promoted type)

    @property
    def rows(self) -> int:
        return self.student_hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.student_weight.shape[0]

    @property
    def dense_teacher(self) -> bool:
        return isinstance(self.teacher, TeacherHead)


@dataclass
class Wanted:
    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def chunk_rows(chunk_size, heads: Heads) -> int:
    if chunk_size != "auto":
        return min(int(chunk_size), max(heads.rows, 1))
    budget = CHUNK_BUDGET_BYTES.get(heads.student_hidden.device.type, CHUNK_BUDGET_BYTES["cpu"])
    per_row = heads.vocab * heads.student_dtype.itemsize
    if heads.dense_teacher:
        per_row += heads.vocab * heads.teacher.dtype.itemsize
    if heads.softcap is not None:
        per_row += heads.vocab * heads.student_dtype.itemsize  # the uncapped student logits, kept for the chain rule
    rows = max(16, budget // per_row // 16 * 16)
    return min(rows, max(heads.rows, 1))


class ChunkBuffers:
    """The chunk's logits of both models (and the student's before its softcap), allocated once per call and reused
    by every chunk: a fresh allocation per chunk would hold two generations at the moment the next one is made."""

    def __init__(self, rows: int, heads: Heads):
        device = heads.student_hidden.device
        self.student = torch.empty(rows, heads.vocab, dtype=heads.student_dtype, device=device)
        self.teacher = (torch.empty(rows, heads.vocab, dtype=heads.teacher.dtype, device=device)
                        if heads.dense_teacher else None)
        self.uncapped = torch.empty_like(self.student) if heads.softcap is not None else None


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    torch.mm(hidden.to(out.dtype), weight.t(), out=out)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc [V, H] += grad_logits^T [V, C] @ hidden [C, H], with acc in float32."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    step = max(1, WEIGHT_GRAD_SLICE_BYTES // max(1, hidden.shape[1] * grad_logits.element_size()))
    for start in range(0, acc.shape[0], step):
        acc[start:start + step] += grad_logits[:, start:start + step].t() @ hidden


def run_chunks(heads: Heads, opts: LossOptions, grad_scale: torch.Tensor, wanted: Wanted, chunk_size, rows_kernel,
               row_weights: torch.Tensor | None = None):
    """The rows' loss parts [N, PART_COLUMNS] float32 and the wanted gradients (d hidden in the hidden's dtype;
    d weight and d bias in float32), each already multiplied by grad_scale and, when given, by row_weights [N].
    `rows_kernel` is the logits-level kernel of the device (kdfast.dispatch.DeviceRows) or of a vocab shard
    (kdfast.vocab_parallel.ShardedRows)."""
    device = heads.student_hidden.device
    parts = torch.empty(heads.rows, PART_COLUMNS, dtype=torch.float32, device=device)
    d_hidden = (torch.empty(heads.student_hidden.shape, dtype=heads.student_hidden.dtype, device=device)
                if wanted.hidden else None)
    d_weight = (torch.zeros(heads.student_weight.shape, dtype=torch.float32, device=device)
                if wanted.weight else None)
    d_bias = torch.zeros(heads.vocab, dtype=torch.float32, device=device) if wanted.bias else None
    weight_s = heads.student_weight.to(heads.student_dtype)  # one cast for all chunks (a no-op when equal)
    teacher = heads.teacher
    weight_t = teacher.weight.to(teacher.dtype) if heads.dense_teacher else None
    step = chunk_rows(chunk_size, heads)
    buffers = ChunkBuffers(min(step, heads.rows), heads)
    for start in range(0, heads.rows, step):
        rows = slice(start, start + step)
        count = min(step, heads.rows - start)
        hidden = heads.student_hidden[rows].to(heads.student_dtype)
        if heads.dense_teacher:
            teacher_rows = _logits_into(buffers.teacher[:count], teacher.hidden[rows], weight_t, teacher.bias)
            if heads.softcap is not None:
                teacher_rows.div_(heads.softcap).tanh_().mul_(heads.softcap)
            teacher_rows = teacher_rows.unsqueeze(0)
        else:  # a sparse teacher's log-probs are final: the softcap is the student's alone
            teacher_rows = SparseTargets(teacher.ids[rows].unsqueeze(0), teacher.logprobs[rows].unsqueeze(0))
        student = buffers.student[:count]
        if heads.softcap is not None:
            uncapped = _logits_into(buffers.uncapped[:count], hidden, weight_s, heads.student_bias)
            torch.div(uncapped, heads.softcap, out=student).tanh_().mul_(heads.softcap)
        else:
            _logits_into(student, hidden, weight_s, heads.student_bias)
        labels = heads.labels[rows] if heads.labels is not None else None
        grad = student.unsqueeze(0) if wanted.any else None  # dlogits overwrite the chunk's logits
        parts[rows] = rows_kernel(student.unsqueeze(0), teacher_rows, labels, grad_scale, grad, opts)
        if not wanted.any:
            continue
        grad_logits = student
        if row_weights is not None:
            grad_logits.mul_(row_weights[rows, None].to(grad_logits.dtype))
        if heads.softcap is not None:
            # d/dz [c tanh(z / c)] = 1 - tanh(z / c)^2
            tanh = uncapped.div_(heads.softcap).tanh_()
            grad_logits.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        if wanted.hidden and d_hidden.dtype == grad_logits.dtype:
            torch.mm(grad_logits, weight_s, out=d_hidden[rows])
        elif wanted.hidden:  # autocast: a 16-bit product for float32 hidden states
            d_hidden[rows] = grad_logits @ weight_s
        if wanted.weight:
            _accumulate_weight_grad(d_weight, grad_logits, hidden)
        if wanted.bias:
            d_bias += grad_logits.sum(0, dtype=torch.float32)
    return parts, d_hidden, d_weight, d_bias
