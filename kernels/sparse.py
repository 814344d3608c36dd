"""Triton kernel of a sparse teacher (docs/DESIGN.md, "A sparse teacher"; kdfast/sparse_math.py states the same math
in PyTorch): one program per row of the student's logits, with the teacher's K (id, log-prob) pairs as one block.

groups   the entries of each column (an id listed twice is two buckets of one column): a [K, K] comparison
pass 0   FUSED / STATS: the row's max;  # read row
pass 1   the tempered exps' sum in float64, and the same exps at the distinct ids (computed alike), so that the
         student's mass outside the ids is their difference to float64's precision (never a float32 total minus a
         float32 part); CE's own sum; without a gradient to write, sum e log e (the student's entropy);  # read row
buckets  the teacher's K + 1 buckets (its rest in float64) against the student's: the divergence, the gradient at
         the ids' columns (a column's entries summed), the factor q_j is multiplied by at every other column
last     the gradient, q * factor + CE everywhere, then (after a barrier) the ids' columns; q log q (the student's
         entropy) in the pass that reads q anyway;  # read row, write row
SUMS and GRADIENT take the global log-sum-exps in place of passes 0 and 1; the shard at col_offset 0 adds the rest.
SUMS without a gradient to write sums q log q in a read of its own (with a smoothed CE's sum).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast.kernel_abi import PART_COLUMNS, STAT_COLUMNS, Phase
from kdfast.kernels.distill import (
    COLUMNS,
    FORWARD_KL,
    FUSED,
    GRADIENT,
    REVERSE_KL,
    STATS,
    SUM_ENTROPY,
    SUMS,
    _ce_target,
    _finite_or_zero,
    _load,
    _q_log_q,
    _store_outputs,
    _store_skipped_row,
    launch_config,
)
from kdfast.kernels.divergence_terms import mixture_term_and_score, weighted
from kdfast.sparse_math import SCORE_CONSTANT
from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG, TEACHER_REST_FLOOR

RENORMALIZE = tl.constexpr(2)
GIVEN = tl.constexpr(3)  # the rest's log-prob given, a row's log-prob K (kdfast/sparse_options.py)
TEACHER_FLOOR = tl.constexpr(TEACHER_REST_FLOOR)
STUDENT_FLOOR_LOG = tl.constexpr(STUDENT_REST_FLOOR_LOG)
# float32's smallest normal number (2^-126, the least literal Triton keeps float32): a sum's log is taken at least
# here, not at 1e-30, which raised a student's rest between e^-87.3 and e^-69 of its largest probability to e^-69
# (up to 18 nats of log Q_r under forward KL).
SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _scores(log_q, log_p, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """Per-bucket divergence terms and scores h (reverse KL and the mixtures)."""
    if DIVERGENCE == REVERSE_KL:
        terms = weighted(tl.exp(log_q), log_q - log_p)
        h = log_q - log_p
    else:
        terms, h = mixture_term_and_score(log_q, log_p, tl.exp(log_q), tl.exp(log_p), beta, log_beta, log_1m_beta,
                                           DIVERGENCE)
    return terms, h


# A rest below this share of the row's float64 sum is summed again over its own columns: total - (the exps at the
# ids) keeps ~1e-16 of the total, so a rest of 1e-16 cancelled to nothing and one of 1e-10 kept 4 digits.
EXACT_REST_BELOW = tl.constexpr(2.0**-24)
EXACT_COLUMNS = tl.constexpr(32)  # columns per step of that pass: a [32, BLOCK_K] comparison with the ids


@triton.jit
def _outside_logits(s_row, cols, vocab, local_ids, first):
    """The block's logits, -inf at the columns an id holds (each column compared with the K ids) and past the row."""
    held = tl.sum(tl.where((cols[:, None] == local_ids[None, :]) & first[None, :], 1, 0), axis=1) > 0
    return tl.load(s_row + cols, mask=(cols < vocab) & (held == 0), other=float("-inf")).to(tl.float32)


@triton.jit
def _outside_log_sum_exp(s_row, vocab, local_ids, first, ref, inv_t):
    """log sum exp((s_j - ref) / T) over the columns no id holds (-inf: none), against their own max so that no exp
    underflows first (the rare row whose rest cancels in the main pass)."""
    offsets = tl.arange(0, EXACT_COLUMNS)
    top = float("-inf")
    for start in range(0, vocab, EXACT_COLUMNS):
        top = tl.maximum(top, tl.max(_outside_logits(s_row, start + offsets, vocab, local_ids, first), axis=0))
    total = tl.zeros([EXACT_COLUMNS], dtype=tl.float32)
    if top > float("-inf"):
        for start in range(0, vocab, EXACT_COLUMNS):
            total += tl.exp((_outside_logits(s_row, start + offsets, vocab, local_ids, first) - top) * inv_t)
    return (top - ref) * inv_t + tl.log(tl.sum(total, axis=0))


@triton.jit
def sparse_fwd_kernel(
    # data ptrs
    student_ptr, ids_ptr, logprobs_ptr, labels_ptr, grad_ptr, out_ptr, grad_scale_ptr, row_stats_ptr, row_totals_ptr,
    # shapes
    rows_per_batch, vocab, col_offset, topk,
    # strides (elements)
    student_stride_b, student_stride_r, ids_stride_b, ids_stride_r, lp_stride_b, lp_stride_r, grad_stride_b,
    grad_stride_r,
    # loss settings
    inv_t, beta, log_beta, log_1m_beta, kd_scale, ce_weight, label_smoothing, inv_global_vocab, z_loss_weight,
    teacher_scale, score_constant, ignore_index,
    DIVERGENCE: tl.constexpr, PHASE: tl.constexpr, TAIL: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr,
    CE_FROM_TEMPERED: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, NEEDS_LABELS: tl.constexpr, SMOOTH: tl.constexpr,
):
    # HAS_CE: the student's statistics at T = 1 (the CE term, or the z-loss alone); NEEDS_LABELS: the CE term;
    # SMOOTH: label smoothing, whose target needs sum_j s_j (kernels/distill.py).
    row = tl.program_id(0).to(tl.int64)
    batch_index = row // rows_per_batch
    row_index = row % rows_per_batch
    s_row = student_ptr + batch_index * student_stride_b + row_index * student_stride_r
    g_row = grad_ptr + batch_index * grad_stride_b + row_index * grad_stride_r
    offsets = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    # The teacher's K pairs, as one block.
    k_offsets = tl.arange(0, BLOCK_K)
    k_mask = k_offsets < topk
    ids = tl.load(ids_ptr + batch_index * ids_stride_b + row_index * ids_stride_r + k_offsets, mask=k_mask, other=-1)
    logprobs = tl.load(logprobs_ptr + batch_index * lp_stride_b + row_index * lp_stride_r + k_offsets, mask=k_mask,
                       other=NEG_INF).to(tl.float32)
    valid = ids >= 0
    local_ids = ids - col_offset
    held = valid & (local_ids >= 0) & (local_ids < vocab)
    safe_ids = tl.where(held, local_ids, 0)
    # The entries of each column: same[k, k'] (held ones only); first: the first entry of its column.
    same = (local_ids[:, None] == local_ids[None, :]) & held[:, None] & held[None, :]  # [BLOCK_K, BLOCK_K]
    first = held & (tl.sum(tl.where(same & (k_offsets[None, :] < k_offsets[:, None]), 1, 0), axis=1) == 0)
    covered = tl.sum(tl.where(first, 1, 0), axis=0) == vocab  # the ids hold every column: no rest

    keep = True
    label_in_range = False  # the label's column is in this call's range
    held_label = False  # ... and CE takes it
    local_label = -1
    poisoned = False
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        local_label = label - col_offset
        label_in_range = (local_label >= 0) & (local_label < vocab)
        if HAS_CE:
            held_label = label_in_range
            if (PHASE == FUSED) and NEEDS_LABELS:
                poisoned = keep & (held_label == 0)
    if HAS_KD and (PHASE == FUSED):
        # Ids outside [-1, V): refused on the host where that costs no sync; here the row is NaN.
        bad_ids = tl.sum(tl.where(k_mask & ((ids < -1) | (ids >= vocab)), 1, 0), axis=0)
        poisoned = poisoned | (keep & (bad_ids > 0))
    row_scale = 0.0
    if WRITE_GRAD:
        row_scale = tl.load(grad_scale_ptr)

    if keep & (poisoned == 0):
        # Read before any pass writes the gradient over the logits (inplace_backward).
        s_ids = tl.load(s_row + safe_ids, mask=held, other=NEG_INF).to(tl.float32)
        s_label = 0.0
        if HAS_LABELS:
            s_label = tl.load(s_row + tl.where(label_in_range, local_label, 0)).to(tl.float32)
        ref = 0.0
        log_z = 0.0
        log_z_c = 0.0
        log_rest = NEG_INF  # log of the student's mass outside the ids, relative to log z's reference
        s_acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # sum_j (s_j - ref): a smoothed CE target's uniform part
        # The student's entropy over these columns, from sum_j q_j log q_j: in the last pass where it writes the
        # gradient (q is at hand there, and pass 1's float64 sum already takes many registers), else in pass 1
        # (FUSED: sum_j e_j log e_j, e_j = exp((s_j - ref) / T), as log z is not yet known) or in a read of its
        # own (SUMS). Without KD the kernel runs at T = 1: the entropy's rule.
        ENTROPY: tl.constexpr = (HAS_KD or HAS_CE) and (PHASE != GRADIENT)
        q_log_q = 0.0
        if (PHASE == FUSED) | (PHASE == STATS):
            # ---- pass 0: the max ----
            m = NEG_INF
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                m = tl.maximum(m, tl.max(_load(s_row, cols, cols < vocab), axis=0))
            ref = _finite_or_zero(m)
            # ---- pass 1: the exps' sums (float64), against the final max ----
            z = tl.zeros([BLOCK_V], dtype=tl.float64)
            z_c = tl.zeros([BLOCK_V], dtype=tl.float32)
            e_log_e = 0.0
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                s = _load(s_row, cols, cols < vocab)
                e = tl.exp((s - ref) * inv_t)
                z += e.to(tl.float64)
                if ENTROPY and not WRITE_GRAD and (PHASE == FUSED):
                    e_log_e += tl.sum(weighted(e, (s - ref) * inv_t), axis=0)
                if HAS_CE and not CE_FROM_TEMPERED:
                    z_c += tl.exp(s - ref)
                if SMOOTH:
                    s_acc += tl.where(cols < vocab, s - ref, 0.0)
            total = tl.sum(z, axis=0)
            log_z = tl.log(total.to(tl.float32))
            log_z_c = tl.log(tl.sum(z_c, axis=0))
            if CE_FROM_TEMPERED:
                log_z_c = log_z
            if ENTROPY and not WRITE_GRAD:  # sum q log q = sum e (log e - log z) / z
                q_log_q = e_log_e / total.to(tl.float32) - log_z
            if HAS_KD:
                at_ids = tl.sum(tl.where(first, tl.exp((s_ids - ref) * inv_t), 0.0).to(tl.float64), axis=0)
                outside = (total - at_ids).to(tl.float32)  # <= 0 only by rounding where the ids hold ~everything
                log_rest = tl.where(outside > 0.0, tl.log(tl.maximum(outside, SMALLEST_NORMAL)), NEG_INF)
                if (outside < total.to(tl.float32) * EXACT_REST_BELOW) & (covered == 0):
                    log_rest = _outside_log_sum_exp(s_row, vocab, local_ids, first, ref, inv_t)
                # none where the ids cover the row, else at least the floor (sparse_options.py)
                log_rest = tl.where(covered, NEG_INF, tl.maximum(log_rest, STUDENT_FLOOR_LOG))
        else:
            # SUMS / GRADIENT: the global log-sum-exps (references 0); without KD the kernel runs on CE's
            log_z = tl.load(row_stats_ptr + row * COLUMNS)
            log_rest = tl.load(row_stats_ptr + row * COLUMNS + 1) - log_z
            log_z_c = tl.load(row_stats_ptr + row * COLUMNS + 2)
            if not HAS_KD:
                log_z = log_z_c
            if CE_FROM_TEMPERED:
                log_z_c = log_z
            # Read before the gradient may overwrite the row: a smoothed CE's sum (FUSED sums it in pass 1), and
            # the entropy's terms where no gradient pass reads the row.
            entropy_here: tl.constexpr = ENTROPY and not WRITE_GRAD
            if (PHASE == SUMS) and (SMOOTH or entropy_here):
                for start in range(0, vocab, BLOCK_V):
                    cols = start + offsets
                    s = _load(s_row, cols, cols < vocab)
                    if SMOOTH:
                        s_acc += tl.where(cols < vocab, s, 0.0)
                    if entropy_here:
                        q_log_q += tl.sum(_q_log_q(s * inv_t - log_z, cols < vocab), axis=0)

        if PHASE == STATS:
            stats_s = 0.0
            stats_rest = 0.0
            stats_c = 0.0
            if HAS_KD:
                stats_s = ref * inv_t + log_z
                stats_rest = ref * inv_t + log_rest
            if HAS_CE:
                stats_c = ref + log_z_c
            tl.store(out_ptr + row * COLUMNS, stats_s)
            tl.store(out_ptr + row * COLUMNS + 1, stats_rest)
            tl.store(out_ptr + row * COLUMNS + 2, stats_c)
            tl.store(out_ptr + row * COLUMNS + SUM_ENTROPY, 0.0)
        else:
            if PHASE == FUSED:
                log_rest = log_rest - log_z  # as the shards' phases have it: relative to the normaliser
            # The rest as a probability, at least float32's smallest normal, a constant there (sparse_math.py,
            # floored_rest); -inf: none.
            floored = log_rest <= STUDENT_FLOOR_LOG
            log_rest = tl.where(log_rest == NEG_INF, NEG_INF, tl.maximum(log_rest, STUDENT_FLOOR_LOG))
            # ---- the buckets: the K ids and the rest ----
            kd = 0.0
            row_d = 0.0
            rest_factor = 1.0
            id_grads = tl.zeros([BLOCK_K], dtype=tl.float32)
            if HAS_KD:
                # The teacher: log P at the ids and of the rest (float64 sum), or renormalised over the ids.
                if TAIL == RENORMALIZE:
                    scaled = tl.where(valid, logprobs * teacher_scale, NEG_INF)
                    top = tl.max(scaled, axis=0)
                    lse = top + tl.log(tl.sum(tl.where(valid, tl.exp(scaled - _finite_or_zero(top)), 0.0), axis=0))
                    log_p = tl.where(valid, scaled - lse, NEG_INF)
                    log_p_rest = NEG_INF
                else:
                    log_p = tl.where(valid, logprobs, NEG_INF)
                    if TAIL == GIVEN:
                        rest_p = tl.exp(tl.load(logprobs_ptr + batch_index * lp_stride_b + row_index * lp_stride_r
                                                + topk).to(tl.float64))
                    else:  # as computed (below 0: rounding, none)
                        rest_p = 1.0 - tl.sum(tl.where(valid, tl.exp(logprobs.to(tl.float64)), 0.0), axis=0)
                    # floored under reverse KL's log
                    if DIVERGENCE == REVERSE_KL:
                        rest_p = tl.maximum(rest_p, TEACHER_FLOOR)
                    # (the smallest normal: Triton makes smaller literals float64)
                    log_p_rest = tl.where(rest_p > 0.0, tl.log(tl.maximum(rest_p.to(tl.float32), SMALLEST_NORMAL)),
                                          NEG_INF)
                # A teacher's rest meets no student bucket where the ids cover the row: rounding, none.
                log_p_rest = tl.where(log_rest == NEG_INF, NEG_INF, log_p_rest)
                log_q = tl.where(held, (s_ids - ref) * inv_t - log_z, NEG_INF)
                owns_rest = col_offset == 0  # one shard adds the rest bucket
                if DIVERGENCE == FORWARD_KL:
                    # d/da_j = q_j sum(P) - q_j sum(P_b / Q_b) over j's buckets (sum(P) is 1 but for a renormalised
                    # row with no ids)
                    p = tl.exp(log_p)
                    p_rest = tl.exp(log_p_rest)
                    q_rest = tl.exp(log_rest)
                    # (a floored rest moves no logit: P_r leaves sum(P), its columns get no target)
                    p_total = tl.sum(p, axis=0) + tl.where(floored, 0.0, p_rest)
                    kd = tl.sum(tl.where(held, weighted(p, log_p - log_q), 0.0), axis=0)
                    kd += tl.where(owns_rest, weighted(p_rest, log_p_rest - log_rest), 0.0)
                    id_grads = tl.exp(log_q) * p_total - tl.sum(tl.where(same, p[None, :], 0.0), axis=1)
                    rest_factor = p_total - tl.where((q_rest > 0.0) & (floored == 0),
                                                     p_rest / tl.where(q_rest > 0.0, q_rest, 1.0), 0.0)
                else:
                    terms, h = _scores(log_q, log_p, beta, log_beta, log_1m_beta, DIVERGENCE)
                    rest_term, rest_h = _scores(log_rest, log_p_rest, beta, log_beta, log_1m_beta, DIVERGENCE)
                    # A column's score: its entries' scores and, per further entry, the constant the score leaves
                    # out (sparse_math.SCORE_CONSTANT). Zeros added to a lone entry keep it bit for bit.
                    extra = tl.where(first[None, :], 0.0, score_constant)
                    h = tl.sum(tl.where(same, h[None, :] + extra, 0.0), axis=1)
                    if PHASE == FUSED:  # centred on the student's largest bucket
                        largest = tl.max(log_q, axis=0)
                        at_largest = tl.argmax(log_q, axis=0)
                        h_ref = tl.where(log_rest > largest, rest_h,
                                         tl.sum(tl.where(k_offsets == at_largest, h, 0.0), axis=0))
                        h = tl.where(log_rest > largest, h - h_ref, tl.where(k_offsets == at_largest, 0.0, h - h_ref))
                        rest_h = tl.where(log_rest > largest, 0.0, rest_h - h_ref)
                    q = tl.exp(log_q)
                    q_rest = tl.exp(log_rest)
                    kd = tl.sum(tl.where(held, terms, 0.0), axis=0) + tl.where(owns_rest, rest_term, 0.0)
                    row_d = tl.sum(tl.where(first, weighted(q, h), 0.0), axis=0)  # D: once a column
                    row_d += tl.where(owns_rest, weighted(q_rest, rest_h), 0.0)
                    d = row_d
                    if PHASE == GRADIENT:
                        d = tl.load(row_totals_ptr + row * COLUMNS + 1)
                    id_grads = weighted(q, h - d)
                    rest_factor = tl.where(q_rest > 0.0, rest_h - d, 0.0)  # no column outside the ids: unused

            # ---- last pass: the gradient ----
            kd_coef = row_scale * kd_scale * inv_t
            # the CE family's coefficients (kernel_abi.h, CeCoefficients); lse: the student's at T = 1
            lse_c = ref + log_z_c
            soft_coef = row_scale * (ce_weight + tl.where(z_loss_weight != 0.0, 2.0 * z_loss_weight * lse_c, 0.0))
            label_coef = row_scale * ce_weight * (1.0 - label_smoothing)
            uniform_coef = row_scale * ce_weight * label_smoothing * inv_global_vocab
            if WRITE_GRAD:
                entropy_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    cols = start + offsets
                    mask = cols < vocab
                    s = _load(s_row, cols, mask)
                    log_q_block = (s - ref) * inv_t - log_z
                    q_block = tl.exp(log_q_block)
                    if ENTROPY:
                        entropy_acc += tl.where(mask, weighted(q_block, log_q_block), 0.0)
                    grad = tl.zeros([BLOCK_V], dtype=tl.float32)
                    if HAS_KD:
                        grad = kd_coef * weighted(q_block, tl.zeros([BLOCK_V], dtype=tl.float32) + rest_factor)
                    if HAS_CE:
                        ce_prob = q_block
                        if not CE_FROM_TEMPERED:
                            ce_prob = tl.exp((s - ref) - log_z_c)
                        grad += soft_coef * ce_prob - tl.where(cols == local_label, label_coef, 0.0) - uniform_coef
                    tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)
                if ENTROPY:
                    q_log_q = tl.sum(entropy_acc, axis=0)
                if HAS_KD:
                    tl.debug_barrier()  # the ids' columns below are written after the dense pass's
                    grad_ids = kd_coef * id_grads
                    if HAS_CE:
                        q_ids = tl.exp((s_ids - ref) * inv_t - log_z)
                        ce_ids = q_ids
                        if not CE_FROM_TEMPERED:
                            ce_ids = tl.exp((s_ids - ref) - log_z_c)
                        grad_ids += soft_coef * ce_ids - tl.where(local_ids == local_label, label_coef, 0.0) \
                            - uniform_coef
                    tl.store(g_row + safe_ids, grad_ids.to(g_row.dtype.element_ty), mask=held)

            target = _ce_target(label_in_range, s_label, ref, s_acc, label_smoothing, inv_global_vocab, SMOOTH)
            # ref: the row's largest logit (a tie counts as a hit); in SUMS it is 0
            _store_outputs(out_ptr, row, kd, row_d, target, log_z_c, lse_c, label_in_range & (s_label >= ref),
                           z_loss_weight, q_log_q, HAS_KD, HAS_CE, PHASE)
    else:
        _store_skipped_row(out_ptr, row, poisoned, PHASE)  # a label or id out of range poisons the total
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < vocab)


def sparse_forward_rows(student, ids, logprobs, labels, grad_scale, grad, opts, call) -> torch.Tensor:
    """Launches one program per row of the [batch, rows, vocab] student views and [batch, rows, K] teacher views in
    `call`'s phase; returns the phase's float32 outputs."""
    batch, rows_per_batch, vocab = student.shape
    rows = batch * rows_per_batch
    shape = {Phase.FUSED: (rows, PART_COLUMNS), Phase.GRADIENT: (0,)}.get(call.phase, (rows, STAT_COLUMNS))
    out = torch.empty(shape, dtype=torch.float32, device=student.device)
    if rows == 0:
        return out
    block_v, num_warps = launch_config(vocab)
    write_grad = grad is not None
    grad_arg = grad if write_grad else student  # never written when WRITE_GRAD is off
    beta = opts.beta
    stats = call.row_stats if call.row_stats is not None else out
    totals = call.row_totals if call.row_totals is not None else out
    topk = ids.shape[-1]
    sparse_fwd_kernel[(rows,)](
        student, ids, logprobs, labels if labels is not None else out, grad_arg, out, grad_scale, stats, totals,
        rows_per_batch, vocab, int(call.col_offset), topk,
        student.stride(0), student.stride(1), ids.stride(0), ids.stride(1), logprobs.stride(0), logprobs.stride(1),
        grad_arg.stride(0), grad_arg.stride(1),
        1.0 / opts.temperature if opts.has_kd else 1.0, float(beta),
        math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf,
        float(opts.kd_scale), float(opts.ce_weight), float(opts.label_smoothing), 1.0 / (call.global_vocab or vocab),
        float(opts.z_loss_weight), float(opts.teacher_scale),
        SCORE_CONSTANT.get(opts.effective_divergence, 0.0), int(opts.ignore_index),
        DIVERGENCE=opts.divergence_code, PHASE=int(call.phase), TAIL=opts.tail_code, HAS_KD=opts.has_kd,
        HAS_CE=opts.has_ce,
        # CE reuses the student's tempered statistics at T = 1 (and without KD the kernel runs at T = 1).
        CE_FROM_TEMPERED=opts.has_ce and (opts.temperature == 1.0 or not opts.has_kd),
        HAS_LABELS=labels is not None, WRITE_GRAD=write_grad, BLOCK_V=block_v, NEEDS_LABELS=opts.needs_labels,
        SMOOTH=opts.has_ce and opts.label_smoothing != 0.0,
        BLOCK_K=max(16, triton.next_power_of_2(topk)), num_warps=num_warps,
    )
    return out
