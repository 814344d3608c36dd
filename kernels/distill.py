"""Triton distillation row kernel (docs/DESIGN.md, "Algorithms" and "Shards and phases"): one program per row,
vocab streamed in blocks, in any phase.

pass 1  FUSED / STATS: online max / sum-exp of the student at T, the teacher at T and the student at 1 (CE), the
        student's running argmax r with the teacher's logit there, the centred sum that gives reverse KL without
        another pass, and (FUSED) the sum of e log e that gives the student's entropy;  # read 2 x row
pass 2  per-element loss terms (SUMS: and q log q); forward/reverse KL also write the gradient;
        # read 2 x row (+ write row)
pass 3  FUSED JSD and skews only: their gradient needs D = sum(q * d) from pass 2;  # read 2 x row, write row
SUMS and GRADIENT take the global log-sum-exps instead of pass 1 and run pass 2 alone.
Several teachers (FUSED, MIX_TEACHERS): a pre-pass reads each teacher's row once for its max and sum-exp, and each
pass's teacher block is their mixture, M rows read (kernels/mixture.py).
Memory traffic for forward KL in bf16: 2 + 2 + 2 + 2 (reads) + 2 (write) = 10 bytes per element.
The gradient is (kd_scale / T) * dL/da plus the CE family's soft * softmax(s) - label * onehot - uniform (the CE's
smoothed target and the z-loss; kernel_abi.h), times the reduction's scale;
dL/da = q * (d - D) with d = h - h_r (h = dL/dq) centred on the student's argmax r (forward KL: q - p).
Log-probabilities are (x - max) / T - log z, never x / T - (log z + max), which would round every one of them
by the size of |max| / T.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast import kernel_abi
from kdfast.kernel_abi import PART_COLUMNS, STAT_COLUMNS, Divergence, Phase
from kdfast.kernels.divergence_terms import mixture_term_and_score, weighted
from kdfast.kernels.mixture import mixed_teacher, mixture_prepass, own_divergence

FORWARD_KL = tl.constexpr(int(Divergence.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(Divergence.REVERSE_KL))
JSD = tl.constexpr(int(Divergence.JSD))
SKEW_FORWARD_KL = tl.constexpr(int(Divergence.SKEW_FORWARD_KL))
TVD = tl.constexpr(int(Divergence.TVD))
FUSED = tl.constexpr(int(Phase.FUSED))
STATS = tl.constexpr(int(Phase.STATS))
SUMS = tl.constexpr(int(Phase.SUMS))
GRADIENT = tl.constexpr(int(Phase.GRADIENT))
COLUMNS = tl.constexpr(STAT_COLUMNS)
PARTS = tl.constexpr(PART_COLUMNS)
PART_KD = tl.constexpr(kernel_abi.PART_KD)
PART_CE = tl.constexpr(kernel_abi.PART_CE)
PART_Z = tl.constexpr(kernel_abi.PART_Z)
PART_CORRECT = tl.constexpr(kernel_abi.PART_CORRECT)
PART_ENTROPY = tl.constexpr(kernel_abi.PART_ENTROPY)
SUM_ENTROPY = tl.constexpr(kernel_abi.SUM_ENTROPY)
MAX_BLOCK_V = 4096


@triton.jit
def _finite_or_zero(reference):
    return tl.where((reference == float("-inf")) | (reference == float("inf")), 0.0, reference)


@triton.jit
def _fold_e_log_e(acc, z, alpha, shift, e, d):
    """The running sum_j e_j d_j (e_j = exp(d_j), d_j = (s_j - ref) / T, z = sum_j e_j) when the reference moves
    to the new running max: each earlier d_j gains shift = (old ref - new ref) / T and each e_j the factor alpha.
    The row's sum q log q is then acc / z - log z."""
    carried = tl.where(z == 0.0, 0.0, z * shift)
    return alpha * (acc + carried) + tl.sum(weighted(e, d), axis=0)


@triton.jit
def _q_log_q(log_q, mask):
    """A block's terms q log q of the entropy, from log q: 0 where q = 0 (a -inf logit, a masked lane)."""
    return tl.where(mask, weighted(tl.exp(log_q), log_q), 0.0)


@triton.jit
def _load(row_ptr, cols, mask):
    """A block of logits, float32 right after the load (the interpreter computes bfloat16 arithmetic wrongly)."""
    return tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _teacher(t_row, cols, mask, mix_offsets_ptr, mix_row, teachers, inv_t, MIX_TEACHERS: tl.constexpr,
             MIX_ONCE: tl.constexpr):
    """A block of the teacher's logits: the one teacher's, or the mixture's in logit units (kernels/mixture.py)."""
    if MIX_TEACHERS:
        t = mixed_teacher(t_row, mix_offsets_ptr, mix_row, teachers, cols, mask, inv_t, MIX_ONCE)
    else:
        t = _load(t_row, cols, mask)
    return t


@triton.jit
def _ce_grad(s, q, ref_c, log_z_c, cols, local_label, soft_coef, label_coef, uniform_coef,
             CE_FROM_TEMPERED: tl.constexpr):
    """The CE family's gradient, times the row scale: soft * softmax(s) - label * onehot(label) - uniform
    (kernel_abi.h, CeCoefficients: the CE's smoothed target and the z-loss); softmax(s) is q when T = 1."""
    ce_prob = q
    if not CE_FROM_TEMPERED:
        ce_prob = tl.exp((s - ref_c) - log_z_c)
    return soft_coef * ce_prob - tl.where(cols == local_label, label_coef, 0.0) - uniform_coef


@triton.jit
def _ce_target(in_range, s_label, ref, s_acc, label_smoothing, inv_global_vocab, SMOOTH: tl.constexpr):
    """The CE target's logit relative to ref: the label's, or (1 - eps) s_label + eps mean(s) with label smoothing
    (s_acc: a block of partial sums of s - ref)."""
    target = tl.where(in_range, s_label - ref, 0.0)
    if SMOOTH:
        target = (1.0 - label_smoothing) * target + label_smoothing * inv_global_vocab * tl.sum(s_acc, axis=0)
    return target


@triton.jit
def _store_outputs(out_ptr, row, kd, row_d, target, log_z_c, lse_c, hit, z_loss_weight, q_log_q,
                   HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, PHASE: tl.constexpr):
    """FUSED: the row's parts (kernel_abi.PART_COLUMNS); SUMS: [divergence terms, D, the CE target's logit,
    sum q log q]. q_log_q: sum_j q_j log q_j over these columns of the student's distribution (at T with KD, else
    at T = 1), 0 without either."""
    if PHASE == FUSED:
        kd_part = 0.0
        if HAS_KD:  # (without KD a kernel's divergence statistics may be 0 / 0)
            kd_part = kd
        ce = 0.0
        z = 0.0
        if HAS_CE:
            # log sum exp(s) - target = log z - (target - max), the difference taken first.
            ce = log_z_c - target
            z = tl.where(z_loss_weight != 0.0, lse_c * lse_c, 0.0)
        tl.store(out_ptr + row * PARTS + PART_KD, kd_part)
        tl.store(out_ptr + row * PARTS + PART_CE, ce)
        tl.store(out_ptr + row * PARTS + PART_Z, z)
        tl.store(out_ptr + row * PARTS + PART_CORRECT, tl.where(hit, 1.0, 0.0))
        entropy = 0.0
        if HAS_KD or HAS_CE:
            entropy = -q_log_q
        tl.store(out_ptr + row * PARTS + PART_ENTROPY, entropy)
    elif PHASE == SUMS:
        tl.store(out_ptr + row * COLUMNS, kd)
        tl.store(out_ptr + row * COLUMNS + 1, row_d)
        tl.store(out_ptr + row * COLUMNS + 2, target)
        tl.store(out_ptr + row * COLUMNS + SUM_ENTROPY, q_log_q)


@triton.jit
def _store_skipped_row(out_ptr, row, poisoned, PHASE: tl.constexpr):
    """An ignored row's outputs (0), or a fused row's with a label or id out of range (NaN: it poisons the total)."""
    if PHASE == FUSED:
        empty = tl.where(poisoned, float("nan"), 0.0)
        tl.store(out_ptr + row * PARTS + PART_KD, empty)
        tl.store(out_ptr + row * PARTS + PART_CE, empty)
        tl.store(out_ptr + row * PARTS + PART_Z, empty)
        tl.store(out_ptr + row * PARTS + PART_CORRECT, 0.0)
        tl.store(out_ptr + row * PARTS + PART_ENTROPY, empty)
    elif PHASE != GRADIENT:
        for column in tl.static_range(COLUMNS):
            tl.store(out_ptr + row * COLUMNS + column, 0.0)


@triton.jit
def distill_fwd_kernel(
    # data ptrs
    student_ptr, teacher_ptr, labels_ptr, grad_ptr, out_ptr, grad_scale_ptr, row_stats_ptr, row_totals_ptr,
    # shapes
    rows_per_batch, vocab, col_offset,
    # strides (elements)
    student_stride_b, student_stride_r, teacher_stride_b, teacher_stride_r, grad_stride_b, grad_stride_r,
    # loss settings
    inv_t, beta, log_beta, log_1m_beta, kd_scale, ce_weight, label_smoothing, inv_global_vocab, z_loss_weight,
    ignore_index,
    # several teachers (MIX_TEACHERS): element offsets of each from teacher_ptr, log-weights, the pre-pass's scratch
    mix_offsets_ptr, log_weights_ptr, log_weights_stride, mix_scratch_ptr, teachers,
    # OWN_KL (mixed teachers): each teacher's own divergence per row, [rows, teachers]
    own_ptr,
    DIVERGENCE: tl.constexpr, PHASE: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr,
    CE_FROM_TEMPERED: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    NEEDS_LABELS: tl.constexpr, SMOOTH: tl.constexpr, MIX_TEACHERS: tl.constexpr, OWN_KL: tl.constexpr,
    OWN_BLOCK: tl.constexpr, MIX_ONCE: tl.constexpr, MIX_KNOWN_STATS: tl.constexpr,
):
    # HAS_CE: the student's statistics at T = 1 (the CE term, or the z-loss alone); NEEDS_LABELS: the CE term (its
    # weight is not 0); SMOOTH: label smoothing, whose target needs sum_j s_j; MIX_TEACHERS: the teacher is p_bar
    # of several (FUSED only), each read of it mixed again from their rows; MIX_ONCE: each teacher's block read once
    # per pass; MIX_KNOWN_STATS (with MIX_ONCE, but for reverse KL, whose pass-1 reference sum reads the teacher): no
    # teacher read in pass 1, the mixture's statistics being known (its log-sum-exp at T is log sum p_bar = 0).
    row = tl.program_id(0).to(tl.int64)
    batch_index = row // rows_per_batch
    row_index = row % rows_per_batch
    s_row = student_ptr + batch_index * student_stride_b + row_index * student_stride_r
    t_row = teacher_ptr + batch_index * teacher_stride_b + row_index * teacher_stride_r
    g_row = grad_ptr + batch_index * grad_stride_b + row_index * grad_stride_r
    mix_row = mix_scratch_ptr + row * 2 * teachers
    own_row = own_ptr + row * teachers
    offsets = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    keep = True
    in_range = False  # the label's column is in this call's range
    held = False  # ... and CE takes it
    local_label = -1
    poisoned = False
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        local_label = label - col_offset
        in_range = (local_label >= 0) & (local_label < vocab)
        if HAS_CE:  # (the CE term always comes with labels: the host checks it)
            held = in_range
            if (PHASE == FUSED) and NEEDS_LABELS:
                # A whole row whose label is out of range: refused on the host where that costs no sync; NaN here.
                poisoned = keep & (held == 0)
    row_scale = 0.0
    if WRITE_GRAD:
        row_scale = tl.load(grad_scale_ptr)

    if keep & (poisoned == 0):
        s_label = 0.0
        if HAS_LABELS:
            # Read before any pass writes the gradient over the logits (inplace_backward).
            s_label = tl.load(s_row + tl.where(in_range, local_label, 0)).to(tl.float32)
        ref_s = 0.0
        log_z_s = 0.0
        ref_t = 0.0
        log_z_t = 0.0
        ref_c = 0.0
        log_z_c = 0.0
        t_ref = 0.0
        ref_index = -1
        rkl_d = 0.0
        rkl_offset = 0.0
        q_log_q = 0.0  # sum_j q_j log q_j of the student's entropy over these columns: FUSED pass 1, SUMS pass 2
        if MIX_TEACHERS and HAS_KD:
            mixture_prepass(t_row, mix_offsets_ptr, log_weights_ptr + row * log_weights_stride, mix_row, teachers,
                            vocab, inv_t, own_row, BLOCK_V, OWN_KL)
        if (PHASE == FUSED) | (PHASE == STATS):
            # ---- pass 1: running statistics (maxima in logit units) ----
            m_s = NEG_INF
            z_s = 0.0
            z_c = 0.0
            m_t = NEG_INF
            z_t = 0.0
            rkl_acc = 0.0  # sum exp((s - m_s) / T) * ((s - m_s) - (t - t_ref)) / T
            # sum e log e of the entropy's distribution: the student at T with KD, else at T = 1 (CE's statistics)
            e_log_e = 0.0
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                mask = cols < vocab
                s = _load(s_row, cols, mask)
                block_max = tl.max(s, axis=0)
                m_new = tl.maximum(m_s, block_max)
                ref_new = _finite_or_zero(m_new)
                moved = m_new != m_s
                if HAS_KD:
                    if not MIX_KNOWN_STATS:
                        t = _teacher(t_row, cols, mask, mix_offsets_ptr, mix_row, teachers, inv_t, MIX_TEACHERS,
                                     MIX_ONCE)
                        t_max_new = tl.maximum(m_t, tl.max(t, axis=0))
                    alpha_s = tl.where(moved, tl.exp((m_s - m_new) * inv_t), 1.0)
                    e_s = tl.exp((s - ref_new) * inv_t)
                    if (DIVERGENCE == REVERSE_KL) & (PHASE == FUSED):
                        at_max = tl.argmax(s, axis=0)
                        t_at_max = tl.sum(tl.where(offsets == at_max, t, 0.0), axis=0)
                        # No teacher mass at r makes reverse KL infinite anyway: any finite reference then serves.
                        t_candidate = tl.where(t_at_max == NEG_INF, _finite_or_zero(t_max_new), t_at_max)
                        t_ref_new = tl.where(block_max > m_s, t_candidate, t_ref)
                        shift = ((_finite_or_zero(m_s) - ref_new) + (t_ref_new - t_ref)) * inv_t
                        carried = tl.where(z_s == 0.0, 0.0, z_s * shift)
                        block_terms = weighted(e_s, ((s - ref_new) - (t - t_ref_new)) * inv_t)
                        rkl_acc = alpha_s * (rkl_acc + carried) + tl.sum(block_terms, axis=0)
                        t_ref = t_ref_new
                    if PHASE == FUSED:
                        shift_s = (_finite_or_zero(m_s) - ref_new) * inv_t
                        e_log_e = _fold_e_log_e(e_log_e, z_s, alpha_s, shift_s, e_s, (s - ref_new) * inv_t)
                    z_s = z_s * alpha_s + tl.sum(e_s, axis=0)
                    if not MIX_KNOWN_STATS:
                        alpha_t = tl.where(t_max_new != m_t, tl.exp((m_t - t_max_new) * inv_t), 1.0)
                        z_t = z_t * alpha_t + tl.sum(tl.exp((t - _finite_or_zero(t_max_new)) * inv_t), axis=0)
                        m_t = t_max_new
                    if (DIVERGENCE != FORWARD_KL) & (PHASE == FUSED):
                        block_index = start + tl.argmax(s, axis=0)
                        ref_index = tl.where(block_max > m_s, block_index, ref_index)
                if HAS_CE and not CE_FROM_TEMPERED:
                    alpha_c = tl.where(moved, tl.exp(m_s - m_new), 1.0)
                    e_c = tl.exp(s - ref_new)
                    if (PHASE == FUSED) and not HAS_KD:
                        e_log_e = _fold_e_log_e(e_log_e, z_c, alpha_c, _finite_or_zero(m_s) - ref_new, e_c,
                                                s - ref_new)
                    z_c = z_c * alpha_c + tl.sum(e_c, axis=0)
                m_s = m_new
            ref_s = _finite_or_zero(m_s)
            ref_t = _finite_or_zero(m_t)
            log_z_s = tl.log(z_s)
            log_z_t = tl.log(z_t)
            if MIX_KNOWN_STATS:  # T * log p_bar: reference 0, log-sum-exp 0
                ref_t = 0.0
                log_z_t = 0.0
            ref_c = ref_s
            log_z_c = tl.log(z_c)
            if CE_FROM_TEMPERED:
                log_z_c = log_z_s
            rkl_d = rkl_acc / z_s
            if HAS_KD:
                q_log_q = e_log_e / z_s - log_z_s
            elif HAS_CE:
                q_log_q = e_log_e / z_c - log_z_c
            rkl_offset = (ref_t - t_ref) * inv_t - log_z_s + log_z_t
        else:
            # SUMS / GRADIENT: the global log-sum-exps (references 0)
            log_z_s = tl.load(row_stats_ptr + row * COLUMNS)
            log_z_t = tl.load(row_stats_ptr + row * COLUMNS + 1)
            log_z_c = tl.load(row_stats_ptr + row * COLUMNS + 2)
            if CE_FROM_TEMPERED:
                log_z_c = log_z_s

        if PHASE == STATS:
            stats_s = 0.0
            stats_t = 0.0
            stats_c = 0.0
            if HAS_KD:
                stats_s = ref_s * inv_t + log_z_s
                stats_t = ref_t * inv_t + log_z_t
            if HAS_CE:
                stats_c = ref_c + log_z_c
            tl.store(out_ptr + row * COLUMNS, stats_s)
            tl.store(out_ptr + row * COLUMNS + 1, stats_t)
            tl.store(out_ptr + row * COLUMNS + 2, stats_c)
            tl.store(out_ptr + row * COLUMNS + SUM_ENTROPY, 0.0)
        else:
            total_d = 0.0
            if PHASE == GRADIENT:
                total_d = tl.load(row_totals_ptr + row * COLUMNS + 1)
            # The mixtures' score at r (fused): h_r, from s_r = the row's max.
            h_ref = 0.0
            if (DIVERGENCE >= JSD) & (PHASE == FUSED) & HAS_KD:
                if MIX_TEACHERS:
                    t_r = mixed_teacher(t_row, mix_offsets_ptr, mix_row, teachers, ref_index, ref_index >= 0, inv_t,
                                        MIX_ONCE)
                else:
                    t_r = tl.load(t_row + ref_index).to(tl.float32)
                lt_r = (t_r - ref_t) * inv_t - log_z_t
                ref_terms, h_ref = mixture_term_and_score(-log_z_s, lt_r, tl.exp(-log_z_s), tl.exp(lt_r), beta,
                                                           log_beta, log_1m_beta, DIVERGENCE)

            # ---- pass 2: loss terms (and the gradient of all but the fused mixtures) ----
            kd_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            d_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            kd_coef = row_scale * kd_scale * inv_t
            # the CE family's coefficients (kernel_abi.h, CeCoefficients); lse: the student's at T = 1
            lse_c = ref_c + log_z_c
            soft_coef = row_scale * (ce_weight + tl.where(z_loss_weight != 0.0, 2.0 * z_loss_weight * lse_c, 0.0))
            label_coef = row_scale * ce_weight * (1.0 - label_smoothing)
            uniform_coef = row_scale * ce_weight * label_smoothing * inv_global_vocab
            s_acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # sum_j (s_j - ref_c): a smoothed target's uniform part
            q_log_q_acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # SUMS (FUSED has it from pass 1)
            own_acc = tl.zeros([OWN_BLOCK], dtype=tl.float32)  # OWN_KL: each teacher's own divergence
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                mask = cols < vocab
                s = _load(s_row, cols, mask)
                ls = (s - ref_s) * inv_t - log_z_s
                q = tl.exp(ls)
                if SMOOTH:
                    s_acc += tl.where(mask, s - ref_c, 0.0)
                if PHASE == SUMS:
                    # The student's entropy at T with KD (q is at hand), else at T = 1 from the CE's statistics.
                    if HAS_KD:
                        q_log_q_acc += _q_log_q(ls, mask)
                    elif HAS_CE:
                        q_log_q_acc += _q_log_q((s - ref_c) - log_z_c, mask)
                grad_kd = tl.zeros([BLOCK_V], dtype=tl.float32)
                if HAS_KD:
                    t = _teacher(t_row, cols, mask, mix_offsets_ptr, mix_row, teachers, inv_t, MIX_TEACHERS, MIX_ONCE)
                    lt = (t - ref_t) * inv_t - log_z_t
                    p = tl.exp(lt)
                    if DIVERGENCE == FORWARD_KL:
                        kd_acc += tl.where(mask, weighted(p, lt - ls), 0.0)
                        grad_kd = q - p
                        if OWN_KL:
                            own_acc = own_divergence(t_row, mix_offsets_ptr, mix_row, own_row, teachers, cols, mask,
                                                     inv_t, ls, own_acc, beta, log_beta, log_1m_beta, OWN_BLOCK,
                                                     DIVERGENCE)
                    elif DIVERGENCE == REVERSE_KL:
                        if OWN_KL:
                            own_acc = own_divergence(t_row, mix_offsets_ptr, mix_row, own_row, teachers, cols, mask,
                                                     inv_t, ls, own_acc, beta, log_beta, log_1m_beta, OWN_BLOCK,
                                                     DIVERGENCE)
                        if PHASE == FUSED:
                            grad_kd = weighted(q, ((s - ref_s) - (t - t_ref)) * inv_t - rkl_d)
                        else:
                            kd_acc += tl.where(mask, weighted(q, ls - lt), 0.0)
                            grad_kd = weighted(q, (ls - lt) - total_d)
                    else:
                        terms, h = mixture_term_and_score(ls, lt, q, p, beta, log_beta, log_1m_beta, DIVERGENCE)
                        if OWN_KL:
                            own_acc = own_divergence(t_row, mix_offsets_ptr, mix_row, own_row, teachers, cols, mask,
                                                     inv_t, ls, own_acc, beta, log_beta, log_1m_beta, OWN_BLOCK,
                                                     DIVERGENCE)
                        d = tl.where(cols == ref_index, 0.0, h - h_ref)
                        kd_acc += tl.where(mask, terms, 0.0)
                        d_acc += tl.where(mask, weighted(q, d), 0.0)
                        grad_kd = weighted(q, d - total_d)
                writes = WRITE_GRAD and ((DIVERGENCE == FORWARD_KL) or (not HAS_KD) or (PHASE == GRADIENT)
                                         or ((DIVERGENCE == REVERSE_KL) and (PHASE == FUSED)))
                if writes:
                    grad = kd_coef * grad_kd
                    if HAS_CE:
                        grad += _ce_grad(s, q, ref_c, log_z_c, cols, local_label, soft_coef, label_coef,
                                         uniform_coef, CE_FROM_TEMPERED)
                    tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)
            kd = tl.sum(kd_acc, axis=0)
            if PHASE == SUMS:
                q_log_q = tl.sum(q_log_q_acc, axis=0)
            row_d = tl.sum(d_acc, axis=0)
            target = _ce_target(in_range, s_label, ref_c, s_acc, label_smoothing, inv_global_vocab, SMOOTH)
            if (DIVERGENCE == REVERSE_KL) & (PHASE == FUSED):
                row_d = rkl_d
                # No teacher mass where the student has some: reverse KL is +inf (the sum may have met inf - inf).
                kd = tl.where(rkl_d == float("inf"), float("inf"), rkl_d + rkl_offset)
            if (DIVERGENCE == REVERSE_KL) & (PHASE == SUMS):
                row_d = kd

            # ---- pass 3: gradient of the fused mixtures, which needs D ----
            if WRITE_GRAD and HAS_KD and (DIVERGENCE >= JSD) and (PHASE == FUSED):
                for start in range(0, vocab, BLOCK_V):
                    cols = start + offsets
                    mask = cols < vocab
                    s = _load(s_row, cols, mask)
                    t = _teacher(t_row, cols, mask, mix_offsets_ptr, mix_row, teachers, inv_t, MIX_TEACHERS, MIX_ONCE)
                    ls = (s - ref_s) * inv_t - log_z_s
                    lt = (t - ref_t) * inv_t - log_z_t
                    q = tl.exp(ls)
                    unused_terms, h = mixture_term_and_score(ls, lt, q, tl.exp(lt), beta, log_beta, log_1m_beta,
                                                              DIVERGENCE)
                    grad = kd_coef * weighted(q, tl.where(cols == ref_index, 0.0, h - h_ref) - row_d)
                    if HAS_CE:
                        grad += _ce_grad(s, q, ref_c, log_z_c, cols, local_label, soft_coef, label_coef,
                                         uniform_coef, CE_FROM_TEMPERED)
                    tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)

            if OWN_KL:
                own_index = tl.arange(0, OWN_BLOCK)
                tl.debug_barrier()  # every read of own_row's log z_m is done before it is overwritten
                tl.store(own_row + own_index, own_acc, mask=own_index < teachers)
            # ref_s: the row's largest logit (a tie counts as a hit); in SUMS ref_c is 0
            _store_outputs(out_ptr, row, kd, row_d, target, log_z_c, lse_c, in_range & (s_label >= ref_s),
                           z_loss_weight, q_log_q, HAS_KD, HAS_CE, PHASE)
    else:
        _store_skipped_row(out_ptr, row, poisoned, PHASE)  # a label out of range poisons the total
        if OWN_KL:  # as the row's divergence: 0, or NaN for a label out of range
            own_index = tl.arange(0, OWN_BLOCK)
            skipped = tl.zeros([OWN_BLOCK], dtype=tl.float32) + tl.where(poisoned, float("nan"), 0.0)
            tl.store(own_row + own_index, skipped, mask=own_index < teachers)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < vocab)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a few KB per block keeps several 16-byte loads in flight per thread."""
    block = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))
    return block, (8 if block >= 2048 else 4)


def distill_forward_rows(student, teacher, labels, grad_scale, grad, opts, call, mixture=None,
                         own_divergences=None, mix_reads_once: bool = False) -> torch.Tensor:
    """Launches one program per row of the [batch, rows, vocab] views in `call`'s phase (settings: the record
    `opts`); returns the phase's float32 outputs. `mixture`: (offsets, log_weights) of several teachers, `teacher`
    the first of them (kdfast.backends.triton_backend.mixture_forward_rows), FUSED only; `own_divergences`: a
    contiguous float32 [rows, M] where each of them gets its own forward KL per row (forward KL only);
    `mix_reads_once`: the mixture's MIX_ONCE reads (kdfast.backends.triton_backend.mixture_reads_once)."""
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
    offsets, log_weights, weights_stride, scratch, teachers = out, out, 0, out, 0  # unread without MIX_TEACHERS
    if mixture is not None:
        offsets, log_weights = mixture
        weights_stride, teachers = log_weights.stride(0), offsets.numel()
        scratch = torch.empty(rows, teachers, 2, dtype=torch.float32, device=student.device)
    own_kl = own_divergences is not None
    if own_kl and (mixture is None or not opts.has_kd or tuple(own_divergences.shape) != (rows, teachers)):
        raise ValueError(f"own_divergences: each mixed teacher's own divergence, [{rows}, {teachers}], is written for "
                         "several teachers in a call with a divergence only")
    distill_fwd_kernel[(rows,)](
        student, teacher, labels if labels is not None else out, grad_arg, out, grad_scale, stats, totals,
        rows_per_batch, vocab, int(call.col_offset),
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        grad_arg.stride(0), grad_arg.stride(1),
        1.0 / opts.temperature, float(beta),
        math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf,
        float(opts.kd_scale), float(opts.ce_weight), float(opts.label_smoothing),
        1.0 / (call.global_vocab or vocab), float(opts.z_loss_weight), int(opts.ignore_index),
        offsets, log_weights, weights_stride, scratch, teachers, own_divergences if own_kl else out,
        DIVERGENCE=opts.divergence_code, PHASE=int(call.phase), HAS_KD=opts.has_kd, HAS_CE=opts.has_ce,
        # CE reuses the student's tempered statistics at T = 1.
        CE_FROM_TEMPERED=opts.has_ce and opts.has_kd and opts.temperature == 1.0,
        HAS_LABELS=labels is not None, WRITE_GRAD=write_grad, BLOCK_V=block_v, NEEDS_LABELS=opts.needs_labels,
        SMOOTH=opts.has_ce and opts.label_smoothing != 0.0, MIX_TEACHERS=mixture is not None, OWN_KL=own_kl,
        OWN_BLOCK=triton.next_power_of_2(max(teachers, 1)) if own_kl else 1,
        MIX_ONCE=mixture is not None and mix_reads_once,
        MIX_KNOWN_STATS=mixture is not None and mix_reads_once and opts.divergence_code != int(Divergence.REVERSE_KL),
        num_warps=num_warps,
    )
    return out
