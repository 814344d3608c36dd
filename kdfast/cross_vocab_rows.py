"""The chunk loop of cross-vocabulary distillation, shared by the logits form (`cross_vocab.py`) and the fused linear
form (`linear_cross_vocab.py`): they differ only in where a chunk of rows' logits comes from and where its gradient
goes, a `RowSource` (`LogitRows` here: rows of a logits tensor; `HeadRows` there: a GEMM of hidden rows).

Per chunk of loss rows (aligned groups, or rows 0..N-1 without an alignment): "mapped" hands the student's rows and
the teacher's log-probs at the matched columns to the sparse rows kernel of the backend (forward KL on the CPU and
every divergence on Triton: a pass of their own, reading the teacher's rows through the map); "uld" and "hybrid" take
the CE family from the dense rows kernel (kd_weight 0) and the GOLD terms of `kdfast.uld` with autograd on the chunk.
A group of merged tokens (`kdfast.alignment`) multiplies its base row's probabilities by its other tokens'
probabilities: their log-probs are summed into a log-mass per group before the loop; the loop yields d loss / d
log-mass, and a last pass over the merged tokens' rows turns it into their gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kdfast.alignment import SideRows, TokenAlignment
from kdfast.dispatch import device_rows, resolve_backend
from kdfast.kernel_abi import PART_COLUMNS, PART_ENTROPY, PART_KD, Divergence, SparseTargets
from kdfast.options import LossOptions
from kdfast.reduction import PART_MATCHED, PART_SPLIT_COLUMNS
from kdfast.sparse_options import SparseOptions
from kdfast.uld import PROBABILITY_FLOOR, UldTerms, complement_columns

CHUNK_ELEMENTS = 1 << 22  # a chunk's [rows, V] float32 temporaries on the CPU: 16 MiB each, near its caches
# On a GPU a chunk is a launch (the Triton "mapped" kernel: one program a row) or a dozen (torch's ULD): at the CPU's
# size, 104 rows of V_t = 40000, one launch did not fill an H200's 132 SMs, and 20 chunks of ULD launched 20 times
# the kernels of one (an H200, 2048 rows, 2026-12-04: mapped 9.8x its copy floor, uld 1.5x TRL's time, whose
# ULDLoss sorts all rows at once). 128 MiB a temporary: 838 rows at V 40000.
GPU_CHUNK_ELEMENTS = 1 << 25
_LOG_FLOOR = math.log(PROBABILITY_FLOOR)


class LogitRows:
    """Rows of a logits tensor [N, V]; their gradient into `grad` (the input's shape), written through views where
    the rows are a slice and added at their indices where an alignment gathers them (grad then starts zeroed).
    `in_place` (inplace_backward, rows taken as slices): `grad` is the logits themselves; a pass that reads each row
    wholly before writing its gradient writes there directly, any other into a chunk of scratch copied over the
    chunk's rows once the pass is done with them."""

    def __init__(self, logits: torch.Tensor, grad: torch.Tensor | None = None, in_place: bool = False):
        self.logits, self.grad, self.in_place = logits, grad, in_place
        self.width, self.count = logits.shape[-1], logits.shape[0]
        self._scratch = None

    def read(self, index) -> torch.Tensor:
        return self.logits[index] if isinstance(index, slice) else self.logits.index_select(0, index)

    def grad_buffer(self, index, count: int, may_overwrite: bool = False) -> torch.Tensor:
        if self.in_place and not may_overwrite:
            if self._scratch is None or self._scratch.shape[0] < count:
                self._scratch = torch.empty(count, self.width, dtype=self.grad.dtype, device=self.grad.device)
            return self._scratch[:count]
        if isinstance(index, slice):
            return self.grad[index]
        return torch.empty(count, self.width, dtype=self.grad.dtype, device=self.grad.device)

    def commit(self, index, buffer: torch.Tensor) -> None:
        if self.in_place:
            if buffer.data_ptr() != self.grad[index].data_ptr():
                self.grad[index].copy_(buffer)
        elif not isinstance(index, slice):
            self.grad.index_add_(0, index, buffer.to(self.grad.dtype))


@dataclass(frozen=True)
class CrossVocabPlan:
    """Everything a pass needs besides the rows: the method, the map, the alignment (None: row i with row i), the
    teacher's temperature, the hybrid's weights, the GOLD terms."""

    method: str
    vocab_map: object
    alignment: TokenAlignment | None
    teacher_temperature: float
    terms: UldTerms | None
    chunk_rows: int | None = None  # None: from CHUNK_ELEMENTS
    rest: tuple | None = None  # "mapped": the unmatched columns of the student and the teacher (`unmatched_columns`)
    native: bool = False  # the C++ passes run (CPU tensors, the extension built)
    tables: dict = field(default_factory=dict, compare=False)  # `mapped_tables`, made once a forward


def mapped_tables(plan: CrossVocabPlan, student_vocab: int, teacher_vocab: int, device) -> tuple:
    """The map as the Triton "mapped" kernel reads it: each student column's teacher column (int32 [V_s], -1 off the
    map), 1 at the teacher's unmatched columns (int8 [V_t]), and whether every student column is matched."""
    if "mapped" not in plan.tables:
        vocab_map = plan.vocab_map
        teacher_column = torch.full((student_vocab,), -1, dtype=torch.int32, device=device)
        teacher_column[vocab_map.student_ids] = vocab_map.teacher_ids.to(device=device, dtype=torch.int32)
        teacher_unmatched = torch.ones(teacher_vocab, dtype=torch.int8, device=device)
        teacher_unmatched[vocab_map.teacher_ids] = 0
        plan.tables["mapped"] = (teacher_column, teacher_unmatched, vocab_map.matched == student_vocab)
    return plan.tables["mapped"]


def unmatched_columns(vocab_map, student_vocab: int, teacher_vocab: int, device) -> tuple:
    """(the student's columns no map entry holds, the teacher's), int64."""
    return tuple(complement_columns(ids.to(device), width, device)
                 for ids, width in ((vocab_map.student_ids, student_vocab), (vocab_map.teacher_ids, teacher_vocab)))


def loss_rows(plan: CrossVocabPlan, student_rows: int) -> int:
    return plan.alignment.groups if plan.alignment is not None else student_rows


def cross_vocab_parts(student, teacher, labels, scale, opts: LossOptions, plan: CrossVocabPlan, want_grad: bool):
    """The loss rows' parts [rows, PART_COLUMNS], for the hybrid [rows, PART_SPLIT_COLUMNS]: its matched and
    unmatched parts before their weights follow (kdfast.reduction reduces them for LossComponents); with want_grad,
    their gradient committed to `student`."""
    rows = loss_rows(plan, student.count)
    device = scale.device
    parts = torch.zeros(rows, PART_SPLIT_COLUMNS if plan.method == "hybrid" else PART_COLUMNS, device=device)
    alignment = plan.alignment
    merges = plan.method != "mapped" and alignment is not None and (
        alignment.student.extra_rows.numel() or alignment.teacher.extra_rows.numel())
    student_mass = _log_mass(student, alignment.student, rows, plan.terms.student_temperature) if merges else None
    teacher_mass = _log_mass(teacher, alignment.teacher, rows, plan.teacher_temperature) if merges else None
    mass_grad = torch.zeros(rows, device=device) if merges and want_grad else None
    # A pass that reads each row wholly before writing its gradient may write over the logits (inplace_backward).
    one_pass_mapped = plan.method == "mapped" and (fuses_mapped(opts, plan) or runs_triton_mapped(opts, device))
    # Such a pass over rows it reads where they lie takes them all in one call: a chunk bounds temporaries, and it
    # has none (on the CPU, 20 chunks of 104 rows had each started and joined the threads: 2048 rows of V_t = 40000
    # took 36-39 ms in place, 31-33 ms as one call, interleaved on a Zen 5).
    whole = one_pass_mapped and plan.chunk_rows is None and _rows_read_where_they_lie(student, teacher, alignment,
                                                                                        device)
    spans = [slice(0, rows)] if whole else chunks(rows, max(student.width, teacher.width), plan.chunk_rows, device)
    for span in spans:
        student_index = span if alignment is None else alignment.student.base[span]
        teacher_index = span if alignment is None else alignment.teacher.base[span]
        count = span.stop - span.start
        chunk_labels = labels[span] if labels is not None else None
        student_logits = student.read(student_index)
        teacher_logits = teacher.read(teacher_index)
        grad = student.grad_buffer(student_index, count, may_overwrite=one_pass_mapped) if want_grad else None
        if plan.method == "mapped":
            parts[span] = _mapped_chunk(student_logits, teacher_logits, chunk_labels, scale, grad, opts, plan)
        else:
            masses = (student_mass[span], teacher_mass[span]) if merges else None
            chunk_mass_grad = _uld_chunk(student_logits, teacher_logits, chunk_labels, scale, grad, opts, plan,
                                         parts[span], masses)
            if mass_grad is not None:
                mass_grad[span] = chunk_mass_grad
        if grad is not None:
            student.commit(student_index, grad)
    if mass_grad is not None:
        _merged_rows_grad(student, alignment.student, mass_grad, plan.terms.student_temperature)
    return parts


def _rows_read_where_they_lie(student: LogitRows, teacher: LogitRows, alignment, device) -> bool:
    """Whether the one-pass "mapped" kernels copy nothing a chunk: logits given (the linear form computes a chunk's
    by its GEMMs), rows taken as slices (no alignment's gather), on the CPU float32 rows one after another
    (`_fused_mapped` converts others, and its 16-bit gradient, a chunk at a time), on Triton columns of stride 1
    (`_triton_mapped`)."""
    if alignment is not None or not (isinstance(student, LogitRows) and isinstance(teacher, LogitRows)):
        return False
    tensors = [student.logits, teacher.logits] + ([student.grad] if student.grad is not None else [])
    if torch.device(device).type == "cpu":
        return all(x.dtype == torch.float32 and x.is_contiguous() for x in tensors)
    return all(x.stride(-1) == 1 for x in tensors)


def chunks(rows: int, width: int, chunk_rows: int | None = None, device=None) -> list[slice]:
    elements = CHUNK_ELEMENTS if device is None or torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS
    step = chunk_rows or max(1, elements // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def fuses_mapped(opts: LossOptions, plan: CrossVocabPlan) -> bool:
    """Whether method "mapped" runs as one C++ pass per row (`_fused_mapped`): every divergence on the CPU. Under
    forward KL a student whose every column is matched has nowhere to spread the teacher's rest (the loss is
    infinite): the sparse kernel takes it."""
    return (plan.native and plan.rest is not None
            and (opts.effective_divergence != Divergence.FORWARD_KL or bool(plan.rest[0].numel())))


def runs_triton_mapped(opts: LossOptions, device) -> bool:
    """Whether method "mapped" runs on the Triton kernel (`_triton_mapped`): where the sparse rows would."""
    return resolve_backend(opts.backend, device, sparse=True) == "triton"


def _mapped_chunk(student_logits, teacher_logits, labels, scale, grad, opts: LossOptions, plan: CrossVocabPlan):
    """The chunk's parts and gradient: on the CPU one C++ pass per row (`_fused_mapped`), on Triton one program per
    row (`_triton_mapped`), every divergence; elsewhere (and forward KL against a student whose every column is
    matched) the sparse rows kernel: the teacher's log-probs at T_t gathered at the matched columns, its rest given.
    With an alignment it compares the groups' base rows (a divergence needs normalised rows: no merges)."""
    vocab_map = plan.vocab_map
    grad_rows = grad.unsqueeze(0) if grad is not None else None
    if fuses_mapped(opts, plan):
        return _fused_mapped(student_logits, teacher_logits, labels, scale, grad, opts, plan)
    if runs_triton_mapped(opts, student_logits.device):
        return _triton_mapped(student_logits, teacher_logits, labels, scale, grad, opts, plan)
    count, matched = student_logits.shape[0], vocab_map.matched
    # The torch backend's algebra takes float64 log-probs, the native kernels float32 ones; either way the teacher's
    # rest is given (tail="given"), summed over its own unmatched columns.
    exact = resolve_backend(opts.backend, student_logits.device, sparse=True) == "torch"
    teacher_rest = plan.rest[1] if plan.rest is not None else complement_columns(
        vocab_map.teacher_ids, teacher_logits.shape[-1], teacher_logits.device)
    log_p = mapped_teacher_log_probs(teacher_logits, vocab_map.teacher_ids, teacher_rest, plan.teacher_temperature,
                                     torch.float64 if exact else torch.float32)
    sparse = SparseOptions(**{name: getattr(opts, name) for name in LossOptions.FIELD_NAMES}, tail="given")
    targets = SparseTargets(vocab_map.student_ids.expand(1, count, matched), log_p.unsqueeze(0))
    parts = device_rows(sparse, student_logits.device)(student_logits.unsqueeze(0), targets, labels, scale,
                                                       grad_rows, sparse)
    if matched == student_logits.shape[-1] and opts.has_kd:
        parts[:, PART_KD] += _lone_teacher_rest_term(log_p[:, -1], labels, opts)
    return parts


def mapped_teacher_log_probs(teacher_logits, teacher_ids, rest_columns, temperature: float, dtype) -> torch.Tensor:
    """[rows, K + 1]: log softmax(t / T_t) at the map's K teacher columns, then the log of the teacher's rest, summed
    over its unmatched columns `rest_columns` (-inf: none), in `dtype`. The sparse kernels take that rest as given
    (tail="given"): as 1 - sum(p) of float32 log-probs, which share their normaliser's rounding, it was wrong by ~1e-7
    (measured on the C++ sparse kernel: a reverse KL whose teacher rest is 4e-6 came out 6e-3 off the float64
    reference, 1e-4 at a rest of 2e-4)."""
    teacher = teacher_logits.to(dtype)
    if temperature != 1.0:
        teacher = teacher / temperature
    rest = torch.logsumexp(teacher.index_select(1, rest_columns), dim=-1, keepdim=True)
    return torch.cat([teacher.index_select(1, teacher_ids), rest], dim=-1) - torch.logsumexp(teacher, -1, keepdim=True)


def _lone_teacher_rest_term(log_rest, labels, opts: LossOptions) -> torch.Tensor:
    """The divergence's term of the teacher's rest where the student matches every column, so that its own rest is
    empty (Q_r = 0): the sparse algebra drops a rest no student bucket meets (there it is the rounding of ids that
    cover the row), but a map's teacher holds real mass off the map. A constant in the student's logits (no
    gradient): JSD(beta) -beta P_r log beta, skew forward KL -P_r log beta, TVD P_r / 2, the reverse KLs 0 (q log q
    at q = 0); forward KL is refused for such a map (infinite)."""
    rest = log_rest.double().exp()
    divergence, beta = opts.effective_divergence, opts.beta
    if divergence == Divergence.JSD:
        term = -beta * math.log(beta) * rest
    elif divergence == Divergence.SKEW_FORWARD_KL:
        term = -math.log(beta) * rest
    elif divergence == Divergence.TVD:
        term = 0.5 * rest
    else:
        term = torch.zeros_like(rest)
    if labels is not None:
        term = torch.where(labels == opts.ignore_index, 0.0, term)
    return term.float()


def _fused_mapped(student_logits, teacher_logits, labels, scale, grad, opts: LossOptions, plan: CrossVocabPlan):
    """The divergence and CE in one C++ pass per row (csrc/cpu/mapped_rows.cpp), each model's row read from memory
    once and the gradient written once. Forward KL: the teacher's rest mass P_r spread over the student's unmatched
    columns as the student spreads its own, target_j = P_r q_j / Q_r, makes the bucket KL a dense one whose gradient
    q - target is the bucket KL's (d/dz of -P_r log Q_r puts exactly that at each rest column), the target never
    written; the others: the sparse algebra's buckets, the teacher's log P gathered through the map."""
    direct = grad is None or (grad.dtype == torch.float32 and grad.is_contiguous())
    into = grad if direct else torch.empty(grad.shape)
    settings = [opts.temperature, plan.teacher_temperature, opts.kd_scale, opts.ce_weight, float(scale),
                float(opts.beta)]
    parts = torch.ops.kdfast_cpu.mapped_rows(
        teacher_logits.float().contiguous(), student_logits.float().contiguous(), plan.vocab_map.student_ids,
        plan.vocab_map.teacher_ids, *plan.rest, labels, into, opts.ignore_index, int(opts.effective_divergence),
        settings)
    if into is not grad:  # a 16-bit gradient, or rows with a stride (in place): the pass wrote float32 rows
        grad.copy_(into)
    return parts


def _triton_mapped(student_logits, teacher_logits, labels, scale, grad, opts: LossOptions, plan: CrossVocabPlan):
    """Every divergence in one Triton program per row (kernels/mapped.py): the teacher's dense row read through the
    map, its matched columns streamed block by block (the sparse kernel holds its K ids as one block, and a map's
    K ~ V fits no GPU's registers); no log-softmax of the teacher or gathered copy is written."""
    from kdfast.kernels.mapped import mapped_forward_rows

    student, teacher = (logits if logits.stride(-1) == 1 else logits.contiguous()
                        for logits in (student_logits, teacher_logits))
    tables = mapped_tables(plan, student.shape[-1], teacher.shape[-1], student.device)
    direct = grad is None or grad.stride(-1) == 1
    into = grad if direct else torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    parts = mapped_forward_rows(student, teacher, tables, labels, scale, into, opts, plan.teacher_temperature)
    if into is not grad:
        grad.copy_(into)
    return parts


def _uld_chunk(student_logits, teacher_logits, labels, scale, grad, opts: LossOptions, plan: CrossVocabPlan, parts,
               masses):
    """Fills the chunk's parts (CE family from the dense kernel, then the GOLD row losses) and its gradient; returns
    d loss / d student log-mass per row when the rows merge tokens."""
    if opts.has_ce:
        ce_only = opts.replace(kd_weight=0.0)
        parts[:, :PART_COLUMNS].copy_(device_rows(ce_only, student_logits.device)(
            student_logits.unsqueeze(0), student_logits.unsqueeze(0), labels, scale,
            grad.unsqueeze(0) if grad is not None else None, ce_only))
    elif grad is not None and not opts.has_kd:
        grad.zero_()
    if not opts.has_kd:
        return None
    terms = plan.terms
    teacher_probs = terms.teacher_probs(teacher_logits)
    if masses is not None:
        teacher_probs.mul_(masses[1].exp()[:, None])
    if terms.native:
        return _native_uld_chunk(student_logits, teacher_probs, labels, scale, grad, opts, terms, parts, masses)
    with torch.enable_grad():
        logits = student_logits.detach().float().requires_grad_(grad is not None)
        student_mass = masses[0].detach().requires_grad_(grad is not None) if masses is not None else None
        losses, entropy, split = terms.row_losses(logits, teacher_probs, student_mass)
        if labels is not None:
            kept = labels != opts.ignore_index
            losses = torch.where(kept, losses, torch.zeros_like(losses))
            entropy = torch.where(kept, entropy, torch.zeros_like(entropy))
            split = torch.where(kept[:, None], split, torch.zeros_like(split)) if split is not None else None
        mass_grad = None
        if grad is not None:
            inputs = (logits,) if student_mass is None else (logits, student_mass)
            found = torch.autograd.grad(losses.sum() * (scale * opts.kd_scale), inputs)
            if opts.has_ce:
                grad += found[0].to(grad.dtype)
            else:  # the first gradient these rows get: written, not added to a zeroed buffer
                grad.copy_(found[0])
            mass_grad = found[1] if student_mass is not None else None
    parts[:, PART_KD] = losses.detach()
    parts[:, PART_ENTROPY] = entropy
    if split is not None:
        parts[:, PART_MATCHED:] = split
    return mass_grad


def _native_uld_chunk(student_logits, teacher_probs, labels, scale, grad, opts: LossOptions, terms: UldTerms, parts,
                      masses):
    """The C++ pass (csrc/cpu/uld_rows.cpp): loss, entropy and the gradient of a chunk in one pass per row; ignored
    rows are skipped there (row scale 0)."""
    row_scale = (labels != opts.ignore_index).float() if labels is not None else None
    mass_grad = torch.empty(student_logits.shape[0]) if masses is not None and grad is not None else None
    direct = grad is None or (grad.dtype == torch.float32 and grad.is_contiguous())
    into = grad if direct else torch.empty(grad.shape)
    losses, entropy, split = terms.native_rows(student_logits, teacher_probs,
                                               masses[0] if masses is not None else None, row_scale, into, mass_grad,
                                               float(scale) * opts.kd_scale, accumulate=opts.has_ce and into is grad)
    if into is not grad and opts.has_ce:  # a 16-bit gradient: the pass wrote float32
        grad.add_(into)
    elif into is not grad:
        grad.copy_(into)
    parts[:, PART_KD] = losses
    parts[:, PART_ENTROPY] = entropy
    if split.shape[1]:  # the hybrid's parts before their weights
        parts[:, PART_MATCHED:] = split
    return mass_grad


def _merged_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """(log q(id) per row at the temperature, floored at log 1e-8 as GOLD floors q; q itself) for merged tokens."""
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_q.gather(1, ids[:, None]).squeeze(1), log_q


def _log_mass(source, side: SideRows, rows: int, temperature: float) -> torch.Tensor:
    """Per group, the sum of its merged tokens' floored log-probs (0 for a group of one token)."""
    mass = torch.zeros(rows, device=side.base.device)
    for span in chunks(side.extra_rows.numel(), source.width):
        token_logprobs, _ = _merged_token_logprobs(source.read(side.extra_rows[span]), side.extra_ids[span],
                                                   temperature)
        mass.index_add_(0, side.extra_groups[span], token_logprobs.clamp_min(_LOG_FLOOR))
    return mass


def _merged_rows_grad(student, side: SideRows, mass_grad: torch.Tensor, temperature: float) -> None:
    """d loss / d z at each merged token's row: g (onehot(id) - q) / T, g its group's d loss / d log-mass (0 where
    the floor held the log-prob: the clamp passes no gradient)."""
    for span in chunks(side.extra_rows.numel(), student.width):
        index, ids = side.extra_rows[span], side.extra_ids[span]
        token_logprobs, log_q = _merged_token_logprobs(student.read(index), ids, temperature)
        factor = torch.where(token_logprobs > _LOG_FLOOR, mass_grad[side.extra_groups[span]], 0.0) / temperature
        grad = log_q.exp_().mul_(-factor[:, None])
        grad.scatter_add_(1, ids[:, None], factor[:, None])
        buffer = student.grad_buffer(index, grad.shape[0])
        buffer.copy_(grad)
        student.commit(index, buffer)
