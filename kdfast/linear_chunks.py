"""The chunked orchestrator of the fused linear loss (docs/DESIGN.md, "Algorithms"): tokens in chunks; per chunk
the student's LM head on the platform's GEMM, the teacher's (a dense head's GEMM, or the rows of given logits or of a
sparse teacher: no GEMM at all), the logits-level kernel for loss and dlogits in place, then d hidden = G W_s and
d W_s += G^T X (and d b_s) accumulated. Only the loss kernel differs between devices.

At most one chunk of logits per model exists at a time, so memory is bounded by the chunk, not by
tokens x vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kdfast import cpu_gemm
from kdfast.dispatch import average_runs_as_mixture, teacher_divergences_in_kernel
from kdfast.kernel_abi import PART_COLUMNS, SparseTargets
from kdfast.linear_teachers import AverageAsMixture, AveragedRows, ChunkTeachers, RoutedChunkTeachers, TeacherHeads
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions

# Bytes the chunk's logits (both models) may take: small enough that the loss adds little to the step's
# peak, large enough that each GEMM stays efficient (measured: benchmarks/bench_linear.py).
CHUNK_BUDGET_BYTES = {"cpu": 48 * 2**20, "cuda": 512 * 2**20}
# The weight gradient of 16-bit heads is summed in float32; each chunk's product is added a vocab slice at
# a time so that its 16-bit temporary stays this small.
WEIGHT_GRAD_SLICE_BYTES = 64 * 2**20
# Several teacher heads on the CPU: their GEMMs in chunks of fewer rows than this run well below the whole-size
# GEMMs' speed, and the mixture pays it once per model (measured on a Zen 5, N=4096, V=32000, two teachers, fp32:
# the call took 1.26-1.34x the five whole-size GEMMs in chunks of 192 rows, 1.14-1.19x in chunks of 384, no less in
# chunks of 448 to 1024). Still one chunk of logits per model. That is MKL's products; oneDNN's (kdfast.cpu_gemm) are
# at their fastest in the budget's own chunks, whose logits stay in the cache: the same call took 1.19-1.22 s in
# chunks of 192 rows, 1.50-1.53 s in 256 and 1.66-1.70 s in 384, so they take no minimum.
SEVERAL_TEACHERS_MIN_ROWS = {"cpu": 384}


@dataclass
class TeacherHead:
    """A dense teacher: hidden states [N, H_t] and its LM head [V, H_t] (+ bias [V]), a constant."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype  # its GEMM's dtype
    logit_map: LogitMap = LogitMap()  # its logit scale and softcap

    @property
    def row_count(self) -> int:
        return self.hidden.shape[:-1].numel()

    def prepared_weight(self, weight_for, logits: torch.Tensor) -> torch.Tensor:
        """Its head as the chunks' GEMMs take it (`weight_for`: `gemm_weight`), cast once per call."""
        return weight_for(self.weight, self.dtype, logits)

    def chunk_into(self, out: torch.Tensor, rows: slice, weight, logits_into) -> torch.Tensor:
        """Its mapped logits of the flat `rows` [C, V] in `out`, or in the tensor oneDNN wrote (`_logits_into`)."""
        return logits_into(out, self.hidden[rows].to(self.dtype), weight, self.bias, self.logit_map)


@dataclass
class TeacherLogits:
    """A dense teacher given as its logits [..., V_t], a constant (kdfast.linear_logits_teacher): each chunk reads its
    rows, no GEMM. The first V columns count (V_t > V: a head padded wider than `vocab_size`)."""

    logits: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype

    @property
    def row_count(self) -> int:
        return self.logits.shape[:-1].numel()

    def rows(self, rows: slice, vocab: int) -> torch.Tensor:
        """Flat rows `rows` [C, V], contiguous: a view where the rows are one run in memory (and no column is cut),
        else a copy of the chunk alone."""
        chunk = self._flat_rows(rows, vocab)
        return chunk if chunk.is_contiguous() else chunk.contiguous()

    def prepared_weight(self, weight_for, logits: torch.Tensor) -> None:
        """No head: its rows are read."""

    def chunk_into(self, out: torch.Tensor, rows: slice, weight, logits_into) -> torch.Tensor:
        """Its flat `rows` [C, V] for one of several teachers' chunk buffers `out`: a view of them where they are one
        run in memory in `out`'s dtype (the kernels only read a teacher, as they read given logits; no copy), else
        copied into `out`, in its dtype."""
        chunk = self._flat_rows(rows, out.shape[1])
        return chunk if chunk.dtype == out.dtype and chunk.is_contiguous() else out.copy_(chunk)

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """The flat rows at `index` ([C] int64) [C, V_t], gathered (an alignment's rows, a chunk of a view)."""
        flat = self._flat()
        if flat is not None:
            return flat.index_select(0, index)
        return self.logits[torch.unravel_index(index, self.logits.shape[:-1])]

    def _flat(self) -> torch.Tensor | None:
        """The logits as [N, V_t] rows, a view; None where there is none (a view such as `logits[:, :-1]` of a
        [B, S, V] tensor, which is never copied whole: its rows are gathered by their index into the leading
        dimensions)."""
        if self.logits.dim() <= 2:
            return self.logits
        try:
            return self.logits.view(-1, self.logits.shape[-1])
        except RuntimeError:
            return None

    def _flat_rows(self, rows: slice, vocab: int) -> torch.Tensor:
        """Flat rows `rows` [C, V], a view where one exists, else gathered (`rows_at`)."""
        flat = self._flat()
        if flat is not None:
            return flat[rows, :vocab]
        return self.rows_at(torch.arange(rows.start, rows.stop, device=self.logits.device))[:, :vocab]


@dataclass
class Heads:
    """Flattened inputs of one call: the student's hidden [N, H] and head [V, H] (+ bias [V]), and the teacher: a
    TeacherHead, several (TeacherHeads: each a TeacherHead or TeacherLogits), given logits (TeacherLogits), a sparse
    teacher's SparseTargets ([N, K] ids and log-probs), or None where the loss has no divergence (CE alone: no teacher
    is projected; the kernel is given the student's rows)."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher: TeacherHead | TeacherHeads | TeacherLogits | SparseTargets | None
    labels: torch.Tensor | None  # [N] int64, contiguous
    student_map: LogitMap  # the student's logit scale and softcap
    student_dtype: torch.dtype  # the GEMMs' dtype (autocast's, or the inputs' promoted type)
    fp32_logits: bool = False

    def logits_dtype(self, gemm: torch.dtype) -> torch.dtype:
        """The dtype of the chunk's logits from a GEMM in `gemm`: float32 when asked for, else the GEMM's."""
        return torch.float32 if self.fp32_logits else gemm

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


def chunk_bounds(chunk_size, heads: Heads) -> list[tuple[int, int]]:
    """(first row, rows) of each chunk: `chunk_size` rows at a time ("auto": from the memory budget), or, given a
    tuple of lengths, chunks of those (groups of rows one chunk must hold whole: sequences whose row weights depend on
    each other, formed from the chunk's own parts)."""
    if isinstance(chunk_size, tuple):
        if sum(chunk_size) != heads.rows or min(chunk_size, default=1) < 1:
            raise ValueError(f"chunk lengths {chunk_size} must be positive and cover the {heads.rows} rows")
        starts = [0]
        for length in chunk_size[:-1]:
            starts.append(starts[-1] + length)
        return list(zip(starts, chunk_size, strict=True))
    step = chunk_rows(chunk_size, heads)
    return [(start, min(step, heads.rows - start)) for start in range(0, heads.rows, step)]


def chunk_rows(chunk_size, heads: Heads) -> int:
    if chunk_size != "auto":
        return min(int(chunk_size), max(heads.rows, 1))
    budget = CHUNK_BUDGET_BYTES.get(heads.student_hidden.device.type, CHUNK_BUDGET_BYTES["cpu"])
    student_bytes = heads.logits_dtype(heads.student_dtype).itemsize
    per_row = heads.vocab * student_bytes
    if heads.dense_teacher:
        per_row += heads.vocab * heads.logits_dtype(heads.teacher.dtype).itemsize
    elif isinstance(heads.teacher, TeacherHeads) and heads.teacher.route is not None:
        per_row += heads.vocab * routed_logits_dtype(heads).itemsize
    elif isinstance(heads.teacher, TeacherHeads):
        per_row += heads.vocab * 4 * heads.teacher.chunk_buffers
        # Each model keeps the share of the budget it has beside one teacher (half), and on the CPU at least
        # SEVERAL_TEACHERS_MIN_ROWS rows: more teachers would otherwise shrink the chunk to GEMMs that run slowly.
        budget = budget * (1 + heads.teacher.chunk_buffers) // 2
    if heads.student_map.softcap is not None:
        per_row += heads.vocab * student_bytes  # the uncapped student logits, kept for the chain rule
    if student_bytes != heads.student_dtype.itemsize:
        per_row += heads.vocab * heads.student_dtype.itemsize  # the gradient rounded for the backward GEMMs
    rows = max(16, budget // per_row // 16 * 16)
    if isinstance(heads.teacher, TeacherHeads) and not cpu_gemm.on_onednn(heads.student_hidden, heads.student_weight):
        rows = max(rows, SEVERAL_TEACHERS_MIN_ROWS.get(heads.student_hidden.device.type, 0))
    return min(rows, max(heads.rows, 1))


def routed_logits_dtype(heads: Heads) -> torch.dtype:
    """The dtype of a routed chunk's teacher logits: a single teacher's (its GEMM's, or float32 logits when asked for)
    where every head's GEMM has one dtype, else float32."""
    dtypes = {head.dtype for head in heads.teacher.heads}
    return heads.logits_dtype(dtypes.pop()) if len(dtypes) == 1 else torch.float32


class ChunkBuffers:
    """The chunk's logits of both models (and the student's before its softcap, and with float32 logits their
    gradient rounded for the 16-bit backward GEMMs), allocated once per call and reused by every chunk: a fresh
    allocation per chunk would hold two generations at the moment the next one is made."""

    def __init__(self, rows: int, heads: Heads):
        device = heads.student_hidden.device
        self.student = torch.empty(rows, heads.vocab, dtype=heads.logits_dtype(heads.student_dtype), device=device)
        self.teacher = (torch.empty(rows, heads.vocab, dtype=heads.logits_dtype(heads.teacher.dtype), device=device)
                        if heads.dense_teacher else None)
        self.uncapped = torch.empty_like(self.student) if heads.student_map.softcap is not None else None
        self.gemm_grad = (torch.empty(rows, heads.vocab, dtype=heads.student_dtype, device=device)
                          if self.student.dtype != heads.student_dtype else None)


@functools.cache
def dtype_out_gemm(device_type: str, dtype: torch.dtype, accumulate: bool) -> bool:
    """Whether GEMMs on this device take `dtype` inputs and write float32 (`mm(..., out_dtype=)`), or add into a
    float32 sum (`addmm(..., out_dtype=, out=)`) when `accumulate` (CUDA, torch >= 2.8): the 16-bit product is never
    rounded, and no 16-bit temporary is made. Probed once per device type, dtype and kind."""
    if device_type != "cuda" or dtype == torch.float32:
        return False
    try:
        probe = torch.ones(1, 1, dtype=dtype, device=device_type)
        if accumulate:
            acc = torch.zeros(1, 1, device=device_type)
            torch.addmm(acc, probe, probe, out_dtype=torch.float32, out=acc)
        else:
            torch.mm(probe, probe, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):  # an older torch, or no kernel for this dtype
        return False


def gemm_weight(weight: torch.Tensor, gemm: torch.dtype, logits: torch.Tensor) -> torch.Tensor:
    """The weight as the chunks' logits GEMMs take it: in the GEMM's dtype, or in float32 where float32 logits are
    wanted and the device has no GEMM that writes them from 16-bit inputs (one cast per call). That float32 copy is
    of the weight rounded to the GEMM's dtype, as the 16-bit GEMM would read it (an autocast's float32 weight): the
    logits are then the product of the same operands on every device, only not rounded."""
    if logits.dtype != gemm and not dtype_out_gemm(weight.device.type, gemm, accumulate=False):
        return weight.to(gemm).to(logits.dtype)
    return weight.to(gemm)


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias, factor: float = 1.0
                 ) -> torch.Tensor:
    """The chunk's logits, `factor` (hidden @ weight.T + bias): in `out`, or where the CPU's products run on oneDNN
    (kdfast.cpu_gemm) in the new tensor that oneDNN writes them to, which then stands for `out` (never touched, its
    pages never become memory): one chunk per model either way, as `run_chunks` lets the last chunk's go before it
    makes the next's. 16-bit logits are rounded once, as F.linear rounds them: the bias and the factor ride in the
    GEMM's beta and alpha rather than each rounding the product again (a bf16 head with a bias otherwise put the
    loss 3x further from float64 than F.linear's logits do)."""
    if out.dtype != weight.dtype:  # float32 logits of 16-bit inputs, accumulated by the GEMM and never rounded
        torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=out.dtype, out=out)
    elif cpu_gemm.on_onednn(out, weight):
        out = cpu_gemm.onednn_linear(hidden.to(out.dtype), weight)
    elif cpu_gemm.widened(out, weight):  # 16-bit on a CPU without 16-bit GEMMs: bias and factor inside, one rounding
        return cpu_gemm.widened_logits_into(out, hidden, weight, bias, factor)
    elif bias is not None:
        return torch.addmm(bias.to(out.dtype), hidden.to(out.dtype), weight.t(), beta=factor, alpha=factor, out=out)
    elif factor == 1.0:
        return torch.mm(hidden.to(out.dtype), weight.t(), out=out)
    else:  # beta 0: the buffer's old values are not read
        return torch.addmm(out, hidden.to(out.dtype), weight.t(), beta=0.0, alpha=factor, out=out)
    if bias is not None:  # float32 logits here: one more float32 rounding, as the GEMM's own epilogue would
        out.add_(bias.to(out.dtype))
    return out.mul_(factor) if factor != 1.0 else out


def mapped_logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias,
                       logit_map: LogitMap) -> torch.Tensor:
    """`_logits_into` mapped by the head's `logit_map` (its temperature 1: the kernels divide by T): without a
    softcap the map is the GEMM's factor, with one it follows in float32 (`LogitMap.apply_`)."""
    if logit_map.softcap is None:
        return _logits_into(out, hidden, weight, bias, logit_map.slope)
    return logit_map.apply_(_logits_into(out, hidden, weight, bias))


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc [V, H] += grad_logits^T [V, C] @ hidden [C, H], with acc in float32."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    if cpu_gemm.widened(grad_logits, hidden):  # float32 operands: the product is not rounded before the sum
        cpu_gemm.accumulate_transposed_product(acc, grad_logits, hidden)
        return
    if dtype_out_gemm(acc.device.type, grad_logits.dtype, accumulate=True):
        # The GEMM adds its product into the float32 accumulator in its epilogue (measured on an H200: 0.99 ms
        # against 1.74 ms for the slices below, per 1024-token chunk at V=128256, H=2048).
        torch.addmm(acc, grad_logits.t(), hidden, out_dtype=torch.float32, out=acc)
        return
    step = max(1, WEIGHT_GRAD_SLICE_BYTES // max(1, hidden.shape[1] * grad_logits.element_size()))
    for start in range(0, acc.shape[0], step):
        acc[start:start + step] += grad_logits[:, start:start + step].t() @ hidden


def run_chunks(heads: Heads, opts: LossOptions, grad_scale: torch.Tensor, wanted: Wanted, chunk_size, rows_kernel,
               row_weights: torch.Tensor | None = None):
    """The rows' loss parts [N, PART_COLUMNS] float32 and the wanted gradients (d hidden in the hidden's dtype;
    d weight and d bias in float32), each already multiplied by grad_scale and, when given, by row_weights [N], or by
    the weights an object with `of_chunk(rows, parts)` forms from each chunk's parts (kdfast.sampled_token_loss; it
    may also weigh the parts in place, `observe(rows, logits)` a chunk's logits before the kernel and
    `add_to_gradient_(rows, grad_logits, kernel_scale)` after the weights: kdfast.class_weights).
    `rows_kernel` is the logits-level kernel of the device (kdfast.dispatch.DeviceRows) or of a vocab shard
    (kdfast.vocab_parallel.ShardedRows)."""
    device = heads.student_hidden.device
    parts = torch.empty(heads.rows, PART_COLUMNS, dtype=torch.float32, device=device)
    d_hidden = (torch.empty(heads.student_hidden.shape, dtype=heads.student_hidden.dtype, device=device)
                if wanted.hidden else None)
    d_weight = (torch.zeros(heads.student_weight.shape, dtype=torch.float32, device=device)
                if wanted.weight else None)
    d_bias = torch.zeros(heads.vocab, dtype=torch.float32, device=device) if wanted.bias else None
    bounds = chunk_bounds(chunk_size, heads)
    largest = max((count for _, count in bounds), default=0)
    buffers = ChunkBuffers(largest, heads)
    weight_s = heads.student_weight.to(heads.student_dtype)  # one cast for all chunks (a no-op when equal)
    logits_weight_s = gemm_weight(heads.student_weight, heads.student_dtype, buffers.student)
    teacher = heads.teacher
    weight_t = gemm_weight(teacher.weight, teacher.dtype, buffers.teacher) if heads.dense_teacher else None
    several = None
    if isinstance(teacher, TeacherHeads) and teacher.route is not None:
        several = RoutedChunkTeachers(teacher, largest, heads.vocab, device, gemm_weight,
                                      routed_logits_dtype(heads))
    elif isinstance(teacher, TeacherHeads):
        as_mixture = teacher.combine == "average" and average_runs_as_mixture(rows_kernel, opts)
        several = ChunkTeachers(teacher, largest, heads.vocab, device, gemm_weight,
                                teacher.combine == "mixture" and teacher_divergences_in_kernel(rows_kernel, opts),
                                as_mixture)
        if as_mixture:
            rows_kernel = AverageAsMixture(rows_kernel)
        elif teacher.combine == "average":
            rows_kernel = AveragedRows(rows_kernel)
    student_map = heads.student_map
    # Weights that form part of the loss themselves (kdfast.class_weights) run the kernel with options of their own.
    kernel_opts = getattr(row_weights, "kernel_options", opts)
    # Without a softcap the student's scale is a constant factor of its gradient: the kernel applies it with the
    # reduction's, and no pass over the chunk is added.
    kernel_scale = grad_scale * student_map.slope if student_map.softcap is None else grad_scale
    for start, count in bounds:
        # The last chunk's logits go before this chunk's are made (they may be new tensors: `_logits_into`).
        student = teacher_rows = uncapped = grad = grad_logits = None
        rows = slice(start, start + count)
        hidden = heads.student_hidden[rows].to(heads.student_dtype)
        if heads.dense_teacher:
            teacher_rows = mapped_logits_into(buffers.teacher[:count], teacher.hidden[rows].to(teacher.dtype),
                                              weight_t, teacher.bias, teacher.logit_map).unsqueeze(0)
        elif several is not None:
            teacher_rows = several.rows(rows, count, mapped_logits_into)
        elif isinstance(teacher, TeacherLogits):  # given logits are final: the map is the student's alone
            teacher_rows = teacher.rows(rows, heads.vocab).unsqueeze(0)
        elif teacher is not None:  # a sparse teacher's log-probs are final: the map is the student's alone
            teacher_rows = SparseTargets(teacher.ids[rows].unsqueeze(0), teacher.logprobs[rows].unsqueeze(0))
        if student_map.softcap is not None:
            uncapped = _logits_into(buffers.uncapped[:count], hidden, logits_weight_s, heads.student_bias)
            student = student_map.capped_into(uncapped, buffers.student[:count])
        else:
            student = mapped_logits_into(buffers.student[:count], hidden, logits_weight_s, heads.student_bias,
                                         student_map)
        labels = heads.labels[rows] if heads.labels is not None else None
        if teacher is None:  # no divergence: the kernel does not read the teacher's argument
            teacher_rows = student.unsqueeze(0)
        if several is not None:
            several.record_divergences(rows, student.unsqueeze(0), labels, kernel_scale, opts, rows_kernel)
        if hasattr(row_weights, "observe"):  # weights that read the logits the kernel is about to overwrite
            row_weights.observe(rows, student)
        grad = student.unsqueeze(0) if wanted.any else None  # dlogits overwrite the chunk's logits
        parts[rows] = rows_kernel(student.unsqueeze(0), teacher_rows, labels, kernel_scale, grad, kernel_opts)
        if several is not None:
            several.record_kernel_parts(rows, parts[rows])
        chunk_weights = None
        if row_weights is not None:  # (weights formed from the chunk's own parts are asked for even without grads)
            chunk_weights = (row_weights.of_chunk(rows, parts[rows]) if hasattr(row_weights, "of_chunk")
                             else row_weights[rows])
        if not wanted.any:
            continue
        grad_logits = student
        if chunk_weights is not None:
            grad_logits.mul_(chunk_weights[:, None].to(grad_logits.dtype))
        if hasattr(row_weights, "add_to_gradient_"):  # terms of the gradient that are not the kernel's times a weight
            row_weights.add_to_gradient_(rows, grad_logits, kernel_scale)
        if student_map.softcap is not None:
            student_map.chain_(grad_logits, uncapped)
        if wanted.bias:  # before any rounding of the gradient for the GEMMs
            d_bias += grad_logits.sum(0, dtype=torch.float32)
        if buffers.gemm_grad is not None:
            grad_logits = buffers.gemm_grad[:count].copy_(grad_logits)
        if wanted.hidden and d_hidden.dtype == grad_logits.dtype:
            cpu_gemm.product_into(d_hidden[rows], grad_logits, weight_s)
        elif wanted.hidden:  # autocast: a 16-bit product for float32 hidden states
            d_hidden[rows] = cpu_gemm.product(grad_logits, weight_s)
        if wanted.weight:
            _accumulate_weight_grad(d_weight, grad_logits, hidden)
    return parts, d_hidden, d_weight, d_bias
