"""The loss contract written as plain, differentiable PyTorch: the truth for tests and the eager baseline.

Readable rather than fast: it materialises every [tokens x vocab] intermediate. Tests run it in float64;
benchmarks run it in float32 as "what a user would write in eager PyTorch" (and under torch.compile).
"""

from __future__ import annotations

import math

import torch

from kdfast.logit_maps import LogitMap, logit_maps
from kdfast.options import LossOptions


def _xlogx_ratio(prob: torch.Tensor, log_prob: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """prob * (log_prob - log_other) with 0 * log 0 = 0, so -inf logits add nothing instead of NaN.

    The difference is masked before the product so that no NaN reaches the gradient either.
    """
    diff = torch.where(prob == 0, torch.zeros_like(prob), log_prob - log_other)
    return prob * diff


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) as a log-sum-exp of log-probabilities (never log of underflowed sums)."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    # A column where both are -inf (a token both models mask) is -inf, with a zero gradient: logsumexp's own
    # backward there is 0 * exp(-inf - -inf), NaN.
    both_zero = (log_a == -math.inf) & (log_b == -math.inf)
    log_a, log_b = log_a.masked_fill(both_zero, 0.0), log_b.masked_fill(both_zero, 0.0)
    mixed = torch.logsumexp(torch.stack([log_a + log_w, log_b + log_1mw]), dim=0)
    return mixed.masked_fill(both_zero, -math.inf)


def divergence_rows(student_logits, teacher_logits, divergence: str, beta: float, temperature: float):
    """Per-row divergence of the temperature-softened distributions, shape [...]."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    return divergence_of(log_p, log_q, divergence, beta)


def divergence_of(log_p, log_q, divergence: str, beta: float):
    """The divergence between two distributions given by their log-probabilities over the last dimension."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        terms = _xlogx_ratio(p, log_p, log_q)
    elif divergence == "reverse_kl":
        terms = _xlogx_ratio(q, log_q, log_p)
    elif divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * _xlogx_ratio(p, log_p, log_m) + (1 - beta) * _xlogx_ratio(q, log_q, log_m)
    elif divergence == "skew_forward_kl":
        terms = _xlogx_ratio(p, log_p, _log_mixture(log_p, log_q, beta))
    elif divergence == "skew_reverse_kl":
        terms = _xlogx_ratio(q, log_q, _log_mixture(log_q, log_p, beta))
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(-1)


def _trl_convention(divergence: str, beta: float) -> str:
    """TRL's generalized JSD at its ends: beta = 0 is forward KL and beta = 1 reverse KL (the mixture formula
    alone would give 0 there); the skews at beta = 0 are the plain KLs (as LossOptions.effective_divergence)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    if beta == 0.0 and divergence in ("skew_forward_kl", "skew_reverse_kl"):
        return divergence.removeprefix("skew_")
    return divergence


def distill_loss_reference(student_logits, teacher_logits, labels=None, *, num_items_in_batch=None,
                           dtype: torch.dtype | None = torch.float64, **options) -> torch.Tensor:
    """The contract of `kdfast.distill_loss`, computed naively in `dtype` (None: the inputs' dtype)."""
    opts = LossOptions(**{k: v for k, v in options.items() if k not in ("inplace_backward", "backend")})
    if dtype is not None:
        student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)
    if opts.vocab_size is not None:  # padding columns: in neither softmax (their gradient is then 0)
        student_logits, teacher_logits = student_logits[..., :opts.vocab_size], teacher_logits[..., :opts.vocab_size]
    kd = None
    if opts.has_kd:
        kd = divergence_rows(student_logits, teacher_logits, _trl_convention(opts.divergence, opts.beta), opts.beta,
                             opts.temperature)
    return _reduced_reference(student_logits, kd, labels, opts, num_items_in_batch)


def _reduced_reference(student_logits, kd, labels, opts: LossOptions, num_items_in_batch):
    """kd_scale * kd + ce_weight * CE + z_loss_weight * log(Z)^2 per row, ignored rows dropped, then the
    reduction."""
    lead_shape = student_logits.shape[:-1]
    keep = _kept_rows(student_logits, labels, opts)
    rows = torch.zeros(lead_shape, dtype=student_logits.dtype, device=student_logits.device)
    if opts.has_kd:
        rows = rows + opts.kd_scale * kd
    if opts.ce_weight != 0.0:
        safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
        log_probs = torch.log_softmax(student_logits, dim=-1)
        ce = -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        # PyTorch's label smoothing: the target (1 - eps) onehot + eps / V
        eps = opts.label_smoothing
        ce = (1 - eps) * ce - eps * log_probs.mean(-1) if eps else ce
        rows = rows + opts.ce_weight * ce
    if opts.z_loss_weight != 0.0:  # PaLM's z-loss: log(Z)^2 of the student at T = 1
        rows = rows + opts.z_loss_weight * torch.logsumexp(student_logits, dim=-1) ** 2
    return _reduce_rows(rows, keep, opts, num_items_in_batch)


def _kept_rows(student_logits, labels, opts: LossOptions):
    keep = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    return keep if labels is None else labels != opts.ignore_index


def _reduce_rows(rows, keep, opts: LossOptions, num_items_in_batch):
    """Per-row values, ignored rows dropped, reduced as the loss is."""
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if opts.reduction == "none":
        return rows
    total = rows.sum()
    if opts.reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / keep.sum().clamp(min=1)


def student_entropy_reference(student_logits, labels=None, *, num_items_in_batch=None,
                              dtype: torch.dtype | None = torch.float64, **options) -> torch.Tensor:
    """`LossComponents.entropy` computed naively: -sum_j q_j log q_j of q = softmax(student / T) (T = 1 for a loss
    without a divergence: the CE's), per kept row, reduced as the loss is. Any loss's settings are taken (the
    sparse teacher's too: the student's row is dense whatever the teacher)."""
    opts = LossOptions(**{k: v for k, v in options.items() if k in LossOptions.FIELD_NAMES})
    student = student_logits.to(dtype) if dtype is not None else student_logits
    if opts.vocab_size is not None:
        student = student[..., :opts.vocab_size]
    log_q = torch.log_softmax(student / (opts.temperature if opts.has_kd else 1.0), dim=-1)
    q = log_q.exp()
    entropy = -torch.where(q == 0, torch.zeros_like(q), q * log_q).sum(-1)  # 0 * log 0 = 0: -inf logits add nothing
    return _reduce_rows(entropy, _kept_rows(student, labels, opts), opts, num_items_in_batch)


def linear_distill_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                                  student_bias=None, teacher_bias=None, softcap=None, student_softcap=None,
                                  teacher_softcap=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
                                  chunk_size=None, dtype: torch.dtype | None = torch.float64,
                                  **options) -> torch.Tensor:
    """The contract of `kdfast.linear_distill_loss`: full logits of both heads (bias, scale, softcap), then the
    logits-level reference (`chunk_size` is accepted and ignored: the reference has no chunks)."""
    student_map, teacher_map = logit_maps(softcap, student_softcap, teacher_softcap, student_logit_scale,
                                          teacher_logit_scale)

    def head_logits(hidden, weight, bias, logit_map):
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        return logit_map.reference(logits)

    return distill_loss_reference(head_logits(student_hidden, student_weight, student_bias, student_map),
                                  head_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_map), labels,
                                  dtype=dtype, **options)


def sparse_distill_loss_reference(student_logits, teacher_ids, teacher_logprobs, labels=None, *,
                                  num_items_in_batch=None, dtype: torch.dtype | None = torch.float64, **options):
    """The contract of `kdfast.sparse_distill_loss`, computed naively: the student's full softmax at T, its
    probabilities at the teacher's ids and, for tail="bucket" (or "given"), its mass outside them summed over those
    columns."""
    from kdfast.kernel_abi import Divergence
    from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG, TEACHER_REST_FLOOR, SparseOptions

    opts = SparseOptions(**{k: v for k, v in options.items() if k not in ("inplace_backward", "backend")})
    student = student_logits.to(dtype) if dtype is not None else student_logits
    if opts.vocab_size is not None:
        student = student[..., :opts.vocab_size]
    logprobs = teacher_logprobs.to(student.dtype)
    valid = teacher_ids >= 0
    ids = torch.where(valid, teacher_ids, torch.zeros_like(teacher_ids))
    log_q = torch.log_softmax(student / opts.temperature, dim=-1)
    log_q_ids = log_q.gather(-1, ids)
    minus_inf = torch.full_like(logprobs, -math.inf)
    if opts.tail == "renormalize":
        scaled = torch.where(valid, logprobs * opts.teacher_scale, minus_inf)
        total = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_p = torch.where(valid, scaled - torch.where(torch.isinf(total), torch.zeros_like(total), total), minus_inf)
        kd = _xlogx_ratio(log_p.exp(), log_p, log_q_ids).sum(-1)
        kd = torch.where(valid.any(-1), kd, torch.zeros_like(kd))  # no teacher ids: nothing to match
    else:
        given = opts.tail == "given"  # the rest's log-prob after the K
        rest_p = logprobs[..., -1:].exp() if given else None
        if given:
            logprobs, minus_inf = logprobs[..., :-1], minus_inf[..., :-1]
        p = torch.where(valid, logprobs.exp(), torch.zeros_like(logprobs))
        if not given:
            rest_p = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)  # below 0: rounding
        if opts.effective_divergence == Divergence.REVERSE_KL:  # the teacher under a log's denominator
            rest_p = rest_p.clamp_min(TEACHER_REST_FLOOR)
        hits = torch.zeros(student.shape, dtype=torch.int64, device=student.device).scatter_add(-1, ids, valid.long())
        outside = hits == 0  # True off the ids (padding ids all point at column 0: counted, not scattered)
        covered = ~outside.any(-1, keepdim=True)
        rest_q = (log_q.exp() * outside).sum(-1, keepdim=True)
        # The student's rest at least exp(-87.3365), float32's smallest normal, as a constant (its exps vanish below).
        rest_q = rest_q.clamp_min(math.exp(STUDENT_REST_FLOOR_LOG))
        # Ids that cover the row leave no rest on either side (the teacher's is then rounding); log 0 = -inf without
        # a NaN gradient.
        rest_p = torch.where(covered, torch.zeros_like(rest_p), rest_p)
        log_rest_q = torch.where(covered, torch.full_like(rest_q, -math.inf),
                                 torch.where(covered, torch.ones_like(rest_q), rest_q).log())
        log_p_buckets = torch.cat([torch.where(valid, logprobs, minus_inf), rest_p.log()], dim=-1)
        log_q_buckets = torch.cat([torch.where(valid, log_q_ids, minus_inf), log_rest_q], dim=-1)
        kd = divergence_of(log_p_buckets, log_q_buckets, _trl_convention(opts.divergence, opts.beta), opts.beta)
    return _reduced_reference(student, kd, labels, opts, num_items_in_batch)


def linear_sparse_distill_loss_reference(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, *,
                                         student_bias=None, softcap=None, logit_scale=1.0, chunk_size=None,
                                         dtype: torch.dtype | None = torch.float64, **options) -> torch.Tensor:
    """The contract of `kdfast.linear_sparse_distill_loss`: the student's full logits, then the sparse reference."""
    logits = _student_logits(student_hidden, student_weight, student_bias, logit_scale, softcap, dtype)
    return sparse_distill_loss_reference(logits, teacher_ids, teacher_logprobs, labels, dtype=dtype, **options)


def _student_logits(hidden, weight, bias, logit_scale, softcap, dtype):
    """A student head's full logits in `dtype`: the bias, then its logit scale and softcap."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return LogitMap(logit_scale, softcap).reference(logits)


def linear_student_distill_loss_reference(student_hidden, student_weight, teacher_logits, labels=None, *,
                                          student_bias=None, softcap=None, logit_scale=1.0, chunk_size=None,
                                          dtype: torch.dtype | None = torch.float64, **options) -> torch.Tensor:
    """The contract of `kdfast.linear_student_distill_loss`: the student's full logits, then the logits-level
    reference with the teacher's logits as given."""
    student_logits = _student_logits(student_hidden, student_weight, student_bias, logit_scale, softcap, dtype)
    return distill_loss_reference(student_logits, teacher_logits, labels, dtype=dtype, **options)


def teacher_weights_reference(weights, teachers: list, labels, opts: LossOptions) -> torch.Tensor:
    """[..., M] per-row weights summing to 1 (the contract of `kdfast.teacher_weights`), in the teachers' dtype."""
    count, lead = len(teachers), teachers[0].shape[:-1]
    if weights is None:
        return torch.full((*lead, count), 1.0 / count, dtype=teachers[0].dtype, device=teachers[0].device)
    if isinstance(weights, str):
        safe = torch.where(labels != opts.ignore_index, labels, torch.zeros_like(labels))
        label_logprob = torch.stack([torch.log_softmax(t, -1).gather(-1, safe[..., None])[..., 0] for t in teachers],
                                    dim=-1)
        if weights == "confidence":
            return torch.softmax(label_logprob, dim=-1)
        onehot = torch.zeros_like(label_logprob)
        flat, out = label_logprob.reshape(-1, count), onehot.reshape(-1, count)
        for row in range(flat.shape[0]):  # the lowest CE; on ties the lowest index
            values = flat[row].tolist()
            out[row, values.index(max(values))] = 1.0
        return onehot
    weights = torch.as_tensor(weights, dtype=teachers[0].dtype, device=teachers[0].device)
    weights = weights.expand(*lead, count) if weights.shape == (count,) else weights
    return weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


def multi_teacher_distill_loss_reference(student_logits, teacher_logits, labels=None, *, weights=None,
                                         combine="mixture", num_items_in_batch=None,
                                         dtype: torch.dtype | None = torch.float64, **options) -> torch.Tensor:
    """The contract of `kdfast.multi_teacher_distill_loss`, naively in `dtype`: the mixture's log-probabilities as a
    log-sum-exp of log w_m + log p_m, or each teacher's divergence weighed."""
    opts = LossOptions(**{k: v for k, v in options.items() if k not in ("inplace_backward", "backend")})
    teachers = list(teacher_logits.unbind(0)) if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    width = opts.vocab_size or student_logits.shape[-1]
    student_logits = student_logits.to(dtype or student_logits.dtype)[..., :width]
    teachers = [teacher.to(dtype or teacher.dtype)[..., :width] for teacher in teachers]
    kd = None
    if opts.has_kd:
        row_weights = teacher_weights_reference(weights, teachers, labels, opts)
        if labels is not None:  # an ignored row may weigh every teacher 0: uniform instead (it adds nothing), not NaN
            ignored = (labels == opts.ignore_index)[..., None]
            row_weights = torch.where(ignored, torch.full_like(row_weights, 1.0 / len(teachers)), row_weights)
        divergence = _trl_convention(opts.divergence, opts.beta)
        log_q = torch.log_softmax(student_logits / opts.temperature, dim=-1)
        log_p = torch.stack([torch.log_softmax(t / opts.temperature, dim=-1) for t in teachers])  # [M, ..., V]
        moved = row_weights.movedim(-1, 0)[..., None]
        if combine == "mixture":
            kd = divergence_of(torch.logsumexp(log_p + moved.log(), dim=0), log_q, divergence, opts.beta)
        else:
            kd = sum(moved[m, ..., 0] * divergence_of(log_p[m], log_q, divergence, opts.beta)
                     for m in range(len(teachers)))
    return _reduced_reference(student_logits, kd, labels, opts, num_items_in_batch)


def _mapped_buckets(log_probs, ids, teacher_floor: bool, student: bool):
    """[..., K + 1]: the log-probs at the map's ids, then the rest's log-mass as a log-sum-exp of the columns off the
    map (not 1 - sum, which is 0 below ~1e-16): -inf where every column is matched; the teacher's at least
    TEACHER_REST_FLOOR under reverse KL's logarithm, the student's at least exp(STUDENT_REST_FLOOR_LOG), as
    `sparse_distill_loss_reference` floors them."""
    from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG, TEACHER_REST_FLOOR

    picked = log_probs[..., ids]
    off_map = torch.ones(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    off_map[ids] = False
    rest = torch.full_like(picked[..., :1], -math.inf)
    if bool(off_map.any()):  # -inf columns read as -1e4 (exp 0 in float64): a rest of them alone has gradient 0
        rest_columns = log_probs[..., off_map]
        rest = torch.where(torch.isinf(rest_columns), -1e4, rest_columns).logsumexp(-1, keepdim=True)
    if teacher_floor:  # (also an empty rest: against a student's real one; none meets a student's empty one)
        rest = rest.clamp_min(math.log(TEACHER_REST_FLOOR))
    if student and bool(off_map.any()):
        rest = rest.clamp_min(STUDENT_REST_FLOOR_LOG)
    return torch.cat([picked, rest], dim=-1)


def cross_vocab_distill_loss_reference(student_logits, teacher_logits, labels=None, *, vocab_map, method="hybrid",
                                       matched_weight=None, unmatched_weight=None, student_temperature=None,
                                       teacher_temperature=None, num_items_in_batch=None,
                                       dtype: torch.dtype | None = torch.float64, **options) -> torch.Tensor:
    """The contract of `kdfast.cross_vocab_distill_loss`, naively in `dtype`: "mapped" as the divergence between the
    two models' buckets (each matched token, and the rest), "uld" / "hybrid" as `kdfast.uld` states GOLD's."""
    from kdfast.uld import hybrid_weights, matched_divergence, sorted_l1

    options = {k: v for k, v in options.items() if k not in ("inplace_backward", "backend")}
    temperature = options.pop("temperature", 1.0)
    t_s = temperature if student_temperature is None else student_temperature
    t_t = temperature if teacher_temperature is None else teacher_temperature
    opts = LossOptions(temperature=t_s, **options)
    if dtype is not None:
        student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)
    log_q = torch.log_softmax(student_logits / t_s, dim=-1)
    log_p = torch.log_softmax(teacher_logits / t_t, dim=-1)
    s_ids, t_ids = vocab_map.student_ids, vocab_map.teacher_ids
    divergence = _trl_convention(opts.divergence, opts.beta)
    if method == "mapped":
        kd = divergence_of(_mapped_buckets(log_p, t_ids, divergence == "reverse_kl", False),
                           _mapped_buckets(log_q, s_ids, False, True), divergence, opts.beta)
    elif method == "uld":
        kd = sorted_l1(log_q.exp(), log_p.exp())
    else:
        q, p = log_q.exp(), log_p.exp()
        s_rest = torch.ones(q.shape[-1], dtype=torch.bool, device=q.device)
        s_rest[s_ids] = False
        t_rest = torch.ones(p.shape[-1], dtype=torch.bool, device=p.device)
        t_rest[t_ids] = False
        weight, rest_weight = hybrid_weights(t_ids.numel(), p.shape[-1], matched_weight, unmatched_weight)
        kd = weight * matched_divergence(q[..., s_ids], p[..., t_ids], divergence, opts.beta)
        if bool(s_rest.any()) and bool(t_rest.any()):
            kd = kd + rest_weight * sorted_l1(q[..., s_rest], p[..., t_rest])
    return _reduced_reference(student_logits, kd, labels, opts, num_items_in_batch)
