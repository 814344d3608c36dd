"""Triton kernel of method "mapped" (a teacher of another vocabulary; docs/DESIGN.md, "Teachers with another
tokenizer"): the sparse teacher's bucket algebra (kernels/sparse.py) with the teacher's dense row read through the map
instead of K (id, log-prob) pairs, so that the matched tokens (tens of thousands) are streamed block by block: the
sparse kernel holds its K pairs as one block and compares them pairwise, which no GPU holds at K ~ V. One program per
row, every divergence, FUSED only (the cross-vocabulary loss has no vocab shards).

Each matched student column is one bucket (a map pairs distinct columns) and the rest of each side one more: the
teacher's P_r and the student's Q_r are summed over their own unmatched columns (no 1 - sum that cancels), with the
sparse kernel's floors (the teacher's rest under reverse KL, the student's rest's log). A student whose every column
is matched has an empty rest (Q_r = 0) against the teacher's real P_r.

pass T   the teacher's max, then its exps' sum and its unmatched columns' sum (at T_t)       # read teacher row
pass S   the student's max and its largest matched logit (the bucket the scores are centred on), then its exps'
         sums: all, the unmatched columns', CE's at T = 1, sum e log e without a gradient    # read student row twice
pass B   the buckets: the divergence and D = sum_b Q_b (h_b - h_ref), the teacher's log P gathered through the map
pass G   the gradient q_j (h_j - D) (forward KL: q_j sum P - P_j, off the map q_j (sum P - P_r / Q_r)) and CE;
         the student's entropy on the way                                                     # read, write row
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast.kernel_abi import PART_COLUMNS
from kdfast.kernels.distill import (
    FORWARD_KL,
    FUSED,
    REVERSE_KL,
    _ce_target,
    _finite_or_zero,
    _load,
    _store_outputs,
    _store_skipped_row,
    launch_config,
)
from kdfast.kernels.divergence_terms import weighted
from kdfast.kernels.sparse import SMALLEST_NORMAL, STUDENT_FLOOR_LOG, TEACHER_FLOOR, _scores


@triton.jit
def _bucket_log_p(t_row, column, matched, inv_tt, ref_t, log_sum_t):
    """The teacher's log P (at T_t) at each student column's matched teacher column, -inf off the map."""
    t = tl.load(t_row + tl.where(matched, column, 0), mask=matched, other=float("-inf")).to(tl.float32)
    return tl.where(matched, t * inv_tt - ref_t - log_sum_t, float("-inf"))


@triton.jit
def _bucket_block(s_row, t_row, column_ptr, cols, mask, ref, inv_t, log_z, inv_tt, ref_t, log_sum_t):
    """A block of student columns: their logits, whether each is on the map, the student's log q (at T) and the
    teacher's log P (at T_t, -inf off the map)."""
    s = _load(s_row, cols, mask)
    column = tl.load(column_ptr + cols, mask=mask, other=-1)
    matched = column >= 0
    return s, matched, (s - ref) * inv_t - log_z, _bucket_log_p(t_row, column, matched, inv_tt, ref_t, log_sum_t)


@triton.jit
def mapped_fwd_kernel(
    student_ptr, teacher_ptr, column_ptr, unmatched_ptr, labels_ptr, grad_ptr, out_ptr, grad_scale_ptr,
    vocab, teacher_vocab, student_stride, teacher_stride, grad_stride,
    inv_t, inv_tt, beta, log_beta, log_1m_beta, kd_scale, ce_weight, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, CE_FROM_TEMPERED: tl.constexpr,
    HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, COVERED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # COVERED: every student column is matched, so the student's rest bucket is empty (Q_r = 0; the teacher's P_r is
    # real mass off the map, and its term a constant of the row).
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_stride
    t_row = teacher_ptr + row * teacher_stride
    g_row = grad_ptr + row * grad_stride
    offsets = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    keep = True
    label_in_range = False
    local_label = -1
    poisoned = False
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        local_label = label
        label_in_range = (label >= 0) & (label < vocab)
        if HAS_CE:
            poisoned = keep & (label_in_range == 0)
    row_scale = 0.0
    if WRITE_GRAD:
        row_scale = tl.load(grad_scale_ptr)

    if keep & (poisoned == 0):
        s_label = 0.0
        if HAS_LABELS:
            s_label = tl.load(s_row + tl.where(label_in_range, local_label, 0)).to(tl.float32)
        # ---- pass T: the teacher at T_t ----
        ref_t = 0.0
        log_sum_t = 0.0
        log_p_rest = NEG_INF
        if HAS_KD:
            m_t = NEG_INF
            for start in range(0, teacher_vocab, BLOCK_V):
                cols = start + offsets
                m_t = tl.maximum(m_t, tl.max(_load(t_row, cols, cols < teacher_vocab), axis=0))
            ref_t = _finite_or_zero(m_t) * inv_tt
            sum_t = tl.zeros([BLOCK_V], dtype=tl.float32)
            rest_t = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, teacher_vocab, BLOCK_V):
                cols = start + offsets
                mask = cols < teacher_vocab
                e = tl.exp(_load(t_row, cols, mask) * inv_tt - ref_t)
                sum_t += e
                rest_t += tl.where(tl.load(unmatched_ptr + cols, mask=mask, other=0) != 0, e, 0.0)
            total_t = tl.sum(sum_t, axis=0)
            log_sum_t = tl.log(total_t)
            rest_p = tl.sum(rest_t, axis=0) / total_t
            if DIVERGENCE == REVERSE_KL:
                rest_p = tl.maximum(rest_p, TEACHER_FLOOR)
            log_p_rest = tl.where(rest_p > 0.0, tl.log(tl.maximum(rest_p, SMALLEST_NORMAL)), NEG_INF)
        # ---- pass S: the student at T (at T = 1 without KD) ----
        m = NEG_INF
        m_matched = NEG_INF  # the largest matched logit and its first column
        at_matched = 0
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            s = _load(s_row, cols, mask)
            m = tl.maximum(m, tl.max(s, axis=0))
            if HAS_KD and (DIVERGENCE != FORWARD_KL):
                on_map = tl.load(column_ptr + cols, mask=mask, other=-1) >= 0
                block = tl.where(on_map, s, NEG_INF)
                block_max = tl.max(block, axis=0)
                block_at = start + tl.argmax(block, axis=0)
                at_matched = tl.where(block_max > m_matched, block_at, at_matched)
                m_matched = tl.maximum(m_matched, block_max)
        ref = _finite_or_zero(m)
        ENTROPY: tl.constexpr = HAS_KD or HAS_CE
        z = tl.zeros([BLOCK_V], dtype=tl.float32)
        z_rest = tl.zeros([BLOCK_V], dtype=tl.float32)
        z_c = tl.zeros([BLOCK_V], dtype=tl.float32)
        e_log_e = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            s = _load(s_row, cols, mask)
            e = tl.exp((s - ref) * inv_t)
            z += e
            if HAS_KD and not COVERED:
                z_rest += tl.where(tl.load(column_ptr + cols, mask=mask, other=0) < 0, e, 0.0)
            if ENTROPY and not WRITE_GRAD:
                e_log_e += weighted(e, (s - ref) * inv_t)
            if HAS_CE and not CE_FROM_TEMPERED:
                z_c += tl.exp(s - ref)
        total = tl.sum(z, axis=0)
        log_z = tl.log(total)
        log_z_c = log_z
        if HAS_CE and not CE_FROM_TEMPERED:
            log_z_c = tl.log(tl.sum(z_c, axis=0))
        q_log_q = 0.0
        if ENTROPY and not WRITE_GRAD:
            q_log_q = tl.sum(e_log_e, axis=0) / total - log_z
        log_rest = NEG_INF  # log Q_r, floored as the sparse kernel floors it (a constant there)
        floored = False
        if HAS_KD and not COVERED:
            rest_sum = tl.sum(z_rest, axis=0)
            log_rest = tl.where(rest_sum > 0.0, tl.log(tl.maximum(rest_sum, SMALLEST_NORMAL)), NEG_INF) - log_z
            floored = log_rest <= STUDENT_FLOOR_LOG
            log_rest = tl.maximum(log_rest, STUDENT_FLOOR_LOG)
        # ---- pass B: the buckets ----
        kd = 0.0
        row_d = 0.0
        h_ref = 0.0
        p_total = 0.0
        rest_factor = 0.0
        if HAS_KD:
            q_rest = tl.exp(log_rest)
            kd_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            d_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            if DIVERGENCE == FORWARD_KL:
                p_rest = tl.exp(log_p_rest)
                p_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    cols = start + offsets
                    s, matched, log_q, log_p = _bucket_block(s_row, t_row, column_ptr, cols, cols < vocab, ref, inv_t,
                                                             log_z, inv_tt, ref_t, log_sum_t)
                    p = tl.exp(log_p)
                    kd_acc += tl.where(matched, weighted(p, log_p - log_q), 0.0)
                    p_acc += p
                # (a floored rest moves no logit: P_r leaves sum(P), its columns get no target)
                p_total = tl.sum(p_acc, axis=0) + tl.where(floored, 0.0, p_rest)
                kd = tl.sum(kd_acc, axis=0) + weighted(p_rest, log_p_rest - log_rest)
                rest_factor = p_total - tl.where((q_rest > 0.0) & (floored == 0),
                                                 p_rest / tl.where(q_rest > 0.0, q_rest, 1.0), 0.0)
            else:
                rest_term, rest_h = _scores(log_rest, log_p_rest, beta, log_beta, log_1m_beta, DIVERGENCE)
                # Centred on the student's largest bucket (as the sparse kernel centres): its score is then exactly 0.
                star_column = tl.load(column_ptr + at_matched)
                star_log_q = (m_matched - ref) * inv_t - log_z
                star_log_p = _bucket_log_p(t_row, star_column, star_column >= 0, inv_tt, ref_t, log_sum_t)
                star_term, star_h = _scores(star_log_q, star_log_p, beta, log_beta, log_1m_beta, DIVERGENCE)
                h_ref = tl.where(log_rest > star_log_q, rest_h, star_h)
                for start in range(0, vocab, BLOCK_V):
                    cols = start + offsets
                    s, matched, log_q, log_p = _bucket_block(s_row, t_row, column_ptr, cols, cols < vocab, ref, inv_t,
                                                             log_z, inv_tt, ref_t, log_sum_t)
                    terms, h = _scores(log_q, log_p, beta, log_beta, log_1m_beta, DIVERGENCE)
                    kd_acc += tl.where(matched, terms, 0.0)
                    d_acc += tl.where(matched, weighted(tl.exp(log_q), h - h_ref), 0.0)
                kd = tl.sum(kd_acc, axis=0) + rest_term
                row_d = tl.sum(d_acc, axis=0) + weighted(q_rest, rest_h - h_ref)
                rest_factor = tl.where(q_rest > 0.0, rest_h - h_ref - row_d, 0.0)
        # ---- pass G: the gradient ----
        lse_c = ref + log_z_c
        if WRITE_GRAD:
            kd_coef = row_scale * kd_scale * inv_t
            ce_coef = row_scale * ce_weight
            entropy_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                mask = cols < vocab
                if HAS_KD:
                    s, matched, log_q, log_p = _bucket_block(s_row, t_row, column_ptr, cols, mask, ref, inv_t, log_z,
                                                             inv_tt, ref_t, log_sum_t)
                else:
                    s = _load(s_row, cols, mask)
                    log_q = (s - ref) * inv_t - log_z
                q = tl.exp(log_q)
                if ENTROPY:
                    entropy_acc += tl.where(mask, weighted(q, log_q), 0.0)
                grad = tl.zeros([BLOCK_V], dtype=tl.float32)
                if HAS_KD:
                    if DIVERGENCE == FORWARD_KL:
                        on_map = q * p_total - tl.exp(log_p)
                    else:
                        terms, h = _scores(log_q, log_p, beta, log_beta, log_1m_beta, DIVERGENCE)
                        on_map = weighted(q, h - h_ref - row_d)
                    off_map = weighted(q, tl.zeros([BLOCK_V], dtype=tl.float32) + rest_factor)
                    grad = kd_coef * tl.where(matched, on_map, off_map)
                if HAS_CE:
                    ce_prob = q
                    if not CE_FROM_TEMPERED:
                        ce_prob = tl.exp((s - ref) - log_z_c)
                    grad += ce_coef * ce_prob - tl.where(cols == local_label, ce_coef, 0.0)
                tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)
            if ENTROPY:
                q_log_q = tl.sum(entropy_acc, axis=0)
        target = _ce_target(label_in_range, s_label, ref, z, 0.0, 0.0, False)
        _store_outputs(out_ptr, row, kd, row_d, target, log_z_c, lse_c, label_in_range & (s_label >= ref), 0.0,
                       q_log_q, HAS_KD, HAS_CE, FUSED)
    else:
        _store_skipped_row(out_ptr, row, poisoned, FUSED)  # a label out of range poisons the total
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < vocab)


def mapped_forward_rows(student, teacher, tables, labels, grad_scale, grad, opts,
                        teacher_temperature: float) -> torch.Tensor:
    """Launches one program per row of the [rows, V_s] student and [rows, V_t] teacher (rows with a stride; columns
    contiguous). `tables`: the map's (teacher_column int32 [V_s]: each student column's teacher column, -1 off the
    map; teacher_unmatched int8 [V_t]: 1 at the teacher's unmatched columns; covered: every student column matched).
    Returns the rows' float32 parts."""
    teacher_column, teacher_unmatched, covered = tables
    rows, vocab = student.shape
    out = torch.empty((rows, PART_COLUMNS), dtype=torch.float32, device=student.device)
    if rows == 0:
        return out
    if opts.label_smoothing != 0.0 or opts.z_loss_weight != 0.0:
        raise ValueError("method='mapped' on the Triton kernel takes no label_smoothing or z_loss_weight")
    block_v, num_warps = launch_config(max(vocab, teacher.shape[1]))
    write_grad = grad is not None
    grad_arg = grad if write_grad else student  # never written when WRITE_GRAD is off
    beta = opts.beta
    mapped_fwd_kernel[(rows,)](
        student, teacher, teacher_column, teacher_unmatched, labels if labels is not None else out, grad_arg, out,
        grad_scale, vocab, teacher.shape[1], student.stride(0), teacher.stride(0), grad_arg.stride(0),
        1.0 / opts.temperature if opts.has_kd else 1.0, 1.0 / teacher_temperature, float(beta),
        math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf,
        float(opts.kd_scale), float(opts.ce_weight), int(opts.ignore_index),
        DIVERGENCE=opts.divergence_code, HAS_KD=opts.has_kd, HAS_CE=opts.has_ce,
        CE_FROM_TEMPERED=opts.has_ce and (opts.temperature == 1.0 or not opts.has_kd),
        HAS_LABELS=labels is not None, WRITE_GRAD=write_grad,
        COVERED=covered,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return out
