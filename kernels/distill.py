"""Triton distillation row kernel (DESIGN.md, "Algorithms"): one program per row, vocab streamed in blocks.

pass 1  online max / sum-exp for the student at T, the teacher at T, the student at 1 (CE, when T != 1),
        and the centred sum that gives reverse KL without another pass;  # read 2 x row
pass 2  per-element loss terms; forward/reverse KL also write the gradient;  # read 2 x row (+ write row)
pass 3  JSD and the skews only: their gradient needs sum_j u_j from pass 2;  # read 2 x row, write row
Memory traffic for forward KL in bf16: 2 + 2 + 2 + 2 (reads) + 2 (write) = 10 bytes per element.
The gradient is (kd_scale / T) * dL/da + ce_weight * (softmax(s) - onehot(label)), times the reduction's
scale; dL/da_j = u_j - q_j * sum(u) with u_j = q_j * dL/dq_j (forward KL: u = -p, sum(u) = -1).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Divergence codes: kdfast/options.py DIVERGENCES.
FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL = 0, 1, 2, 3, 4
MAX_BLOCK_V = 4096


@triton.jit
def _weighted(prob, log_ratio):
    # 0 * anything = 0: a zero probability adds nothing, even against log 0 = -inf.
    return tl.where(prob == 0.0, 0.0, prob * log_ratio)


@triton.jit
def _log_add_exp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    # log(1 + x) with tl.log: libdevice's log1p is not available under the interpreter.
    result = tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
    # On a GPU maximum / minimum drop a NaN operand (the interpreter keeps it); the row's loss must see it.
    return tl.where((a != a) | (b != b), a + b, result)


@triton.jit
def _online_update(m_old, z_old, block_values):
    """New running max (safe: never -inf as a reference) and sum of exp relative to it."""
    m_new = tl.maximum(m_old, tl.max(block_values, axis=0))
    alpha = tl.where(m_old == m_new, 1.0, tl.exp(m_old - m_new))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    z_new = z_old * alpha + tl.sum(tl.exp(block_values - ref), axis=0)
    return m_new, z_new, alpha


@triton.jit
def _kd_terms(ls, lt, q, p, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """Per-element divergence terms and u = q * dL/dq, for the divergences that need a sum of u."""
    if DIVERGENCE == 2:  # JSD
        lm = _log_add_exp(lt + log_beta, ls + log_1m_beta)
        q_term = _weighted(q, ls - lm)
        terms = beta * _weighted(p, lt - lm) + (1.0 - beta) * q_term
        u = (1.0 - beta) * q_term
    elif DIVERGENCE == 3:  # skew forward KL: KL(p || b p + (1 - b) q)
        lm = _log_add_exp(lt + log_beta, ls + log_1m_beta)
        terms = _weighted(p, lt - lm)
        # q * p / m in log space: q may underflow where p / m is huge (beta = 0: m = q).
        u = tl.where(lm == float("-inf"), 0.0, -(1.0 - beta) * tl.exp(ls + lt - lm))
    else:  # skew reverse KL: KL(q || (1 - b) p + b q)
        lm = _log_add_exp(ls + log_beta, lt + log_1m_beta)
        terms = _weighted(q, ls - lm)
        # beta * q / m as exp(log beta + ls - lm): at beta = 0, q / m may overflow (0 * inf).
        u = _weighted(q, ls - lm - tl.exp(ls - lm + log_beta))
    return terms, u


@triton.jit
def _log_probs(row_ptr, cols, mask, inv_t, log_z):
    """Loads a block of logits (fp32 right after the load) and returns them, log-probabilities at T, probs."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    log_prob = x * inv_t - log_z
    return x, log_prob, tl.exp(log_prob)


@triton.jit
def _ce_grad(s, q, log_z_c, cols, label, ce_coef, CE_OWN_STATS: tl.constexpr):
    """ce_weight * (softmax(s) - onehot(label)), times the row scale; softmax(s) is q when T = 1."""
    ce_prob = q
    if CE_OWN_STATS:
        ce_prob = tl.exp(s - log_z_c)
    return ce_coef * (ce_prob - tl.where(cols == label, 1.0, 0.0))


@triton.jit
def distill_fwd_kernel(
    # data ptrs
    student_ptr, teacher_ptr, labels_ptr, grad_ptr, loss_ptr, grad_scale_ptr,
    # shapes
    rows_per_batch, vocab,
    # strides (elements)
    student_stride_b, student_stride_r, teacher_stride_b, teacher_stride_r, grad_stride_b, grad_stride_r,
    # loss settings
    inv_t, beta, log_beta, log_1m_beta, kd_scale, ce_weight, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, CE_OWN_STATS: tl.constexpr,
    HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch_index = row // rows_per_batch
    row_index = row % rows_per_batch
    s_row = student_ptr + batch_index * student_stride_b + row_index * student_stride_r
    t_row = teacher_ptr + batch_index * teacher_stride_b + row_index * teacher_stride_r
    g_row = grad_ptr + batch_index * grad_stride_b + row_index * grad_stride_r
    offsets = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    label = 0
    keep = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
    label_ok = (label >= 0) & (label < vocab)
    safe_label = tl.where(label_ok, label, 0)
    row_scale = 0.0
    if WRITE_GRAD:
        row_scale = tl.load(grad_scale_ptr)

    if keep:
        # Read before any pass writes the gradient over the logits (inplace_backward).
        s_label = tl.load(s_row + safe_label).to(tl.float32)
        # ---- pass 1: running statistics ----
        m_s = NEG_INF
        z_s = 0.0
        m_t = NEG_INF
        z_t = 0.0
        m_c = NEG_INF
        z_c = 0.0
        rkl_acc = 0.0  # sum exp(a - m_s) * ((a - m_s) - (b - m_t)), kept centred on the running maxima
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
            a = s * inv_t
            if HAS_KD:
                b = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
                m_s_old = m_s
                m_t_old = m_t
                z_s_old = z_s
                m_s, z_s, alpha_s = _online_update(m_s, z_s, a)
                m_t, z_t, _ = _online_update(m_t, z_t, b)
                if DIVERGENCE == 1:
                    ref_s = tl.where(m_s == NEG_INF, 0.0, m_s)
                    ref_t = tl.where(m_t == NEG_INF, 0.0, m_t)
                    shift_s = tl.where(m_s == m_s_old, 0.0, m_s - m_s_old)
                    shift_t = tl.where(m_t == m_t_old, 0.0, m_t - m_t_old)
                    carried = tl.where(z_s_old == 0.0, 0.0, z_s_old * (shift_t - shift_s))
                    e_s = tl.exp(a - ref_s)
                    block_terms = _weighted(e_s, (a - ref_s) - (b - ref_t))
                    rkl_acc = alpha_s * (rkl_acc + carried) + tl.sum(block_terms, axis=0)
            if HAS_CE and CE_OWN_STATS:
                m_c, z_c, _ = _online_update(m_c, z_c, s)
        log_z_s = tl.log(z_s) + tl.where(m_s == NEG_INF, 0.0, m_s)  # log-normaliser of a
        log_z_t = tl.log(z_t) + tl.where(m_t == NEG_INF, 0.0, m_t)
        if CE_OWN_STATS:
            log_z_c = tl.log(z_c) + tl.where(m_c == NEG_INF, 0.0, m_c)
        else:
            log_z_c = log_z_s
        if HAS_KD:
            reverse_kl = rkl_acc / z_s - tl.log(z_s) + tl.log(z_t)
        else:
            reverse_kl = 0.0

        # ---- pass 2: loss terms (and the gradient of the two-pass divergences) ----
        kd_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        u_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        kd_coef = row_scale * kd_scale * inv_t
        ce_coef = row_scale * ce_weight
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            mask = cols < vocab
            s, ls, q = _log_probs(s_row, cols, mask, inv_t, log_z_s)
            grad_kd = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_KD:
                _, lt, p = _log_probs(t_row, cols, mask, inv_t, log_z_t)
                if DIVERGENCE == 0:
                    kd_acc += tl.where(mask, _weighted(p, lt - ls), 0.0)
                    grad_kd = q - p
                elif DIVERGENCE == 1:
                    grad_kd = _weighted(q, ls - lt - reverse_kl)
                else:
                    terms, u = _kd_terms(ls, lt, q, p, beta, log_beta, log_1m_beta, DIVERGENCE)
                    kd_acc += tl.where(mask, terms, 0.0)
                    u_acc += tl.where(mask, u, 0.0)
            if WRITE_GRAD and (DIVERGENCE == 0 or DIVERGENCE == 1 or not HAS_KD):
                grad = kd_coef * grad_kd
                if HAS_CE:
                    grad += _ce_grad(s, q, log_z_c, cols, safe_label, ce_coef, CE_OWN_STATS)
                tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)
        kd = tl.sum(kd_acc, axis=0)
        if DIVERGENCE == 1:
            kd = reverse_kl
        u_sum = tl.sum(u_acc, axis=0)

        # ---- pass 3: gradient of JSD and the skews, which needs sum(u) ----
        if WRITE_GRAD and HAS_KD and DIVERGENCE >= 2:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                mask = cols < vocab
                s, ls, q = _log_probs(s_row, cols, mask, inv_t, log_z_s)
                _, lt, p = _log_probs(t_row, cols, mask, inv_t, log_z_t)
                _, u = _kd_terms(ls, lt, q, p, beta, log_beta, log_1m_beta, DIVERGENCE)
                grad = kd_coef * (u - q * u_sum)
                if HAS_CE:
                    grad += _ce_grad(s, q, log_z_c, cols, safe_label, ce_coef, CE_OWN_STATS)
                tl.store(g_row + cols, grad.to(g_row.dtype.element_ty), mask=mask)

        loss = 0.0
        if HAS_KD:
            loss += kd_scale * kd
        if HAS_CE:
            # Out-of-range labels are refused on the host where that costs no sync; here they poison the row.
            ce = tl.where(label_ok, log_z_c - s_label, float("nan"))
            loss += ce_weight * ce
        tl.store(loss_ptr + row, loss)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < vocab)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a few KB per block keeps several 16-byte loads in flight per thread."""
    block = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))
    return block, (8 if block >= 2048 else 4)


def distill_forward_rows(student, teacher, labels, grad_scale, grad, *, divergence_code: int, beta: float,
                         temperature: float, kd_scale: float, ce_weight: float, ignore_index: int,
                         has_kd: bool, has_ce: bool) -> torch.Tensor:
    """Launches one program per row of the [batch, rows, vocab] views; returns float32 loss rows."""
    batch, rows_per_batch, vocab = student.shape
    rows = batch * rows_per_batch
    loss_rows = torch.empty(rows, dtype=torch.float32, device=student.device)
    if rows == 0:
        return loss_rows
    block_v, num_warps = launch_config(vocab)
    write_grad = grad is not None
    grad_arg = grad if write_grad else student  # never written when WRITE_GRAD is off
    distill_fwd_kernel[(rows,)](
        student, teacher, labels if labels is not None else loss_rows, grad_arg, loss_rows, grad_scale,
        rows_per_batch, vocab,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        grad_arg.stride(0), grad_arg.stride(1),
        1.0 / temperature, float(beta),
        math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf,
        float(kd_scale), float(ce_weight), int(ignore_index),
        DIVERGENCE=divergence_code, HAS_KD=has_kd, HAS_CE=has_ce,
        # CE needs its own max/sum unless it can reuse the student's statistics at T = 1.
        CE_OWN_STATS=has_ce and (temperature != 1.0 or not has_kd),
        HAS_LABELS=labels is not None, WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss_rows
