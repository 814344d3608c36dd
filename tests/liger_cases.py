"""What the ports of Liger-Kernel's own cases share (tests/test_liger_*_cases.py). Liger-Kernel's cases
(linkedin/Liger-Kernel: test/transformers/test_jsd.py, test_kl_div.py, test_tvd.py,
test_fused_linear_jsd.py, test_cross_entropy.py, test_fused_linear_cross_entropy.py, and
test/chunked_loss/test_jsd_loss.py) for the behaviours kdfast shares, run on every kdfast backend.

Liger's inputs are kept (its seeds, its input scales: randn logits, rand heads and hidden states; its betas,
temperatures, ignore_index values and their placement, its dtypes and tolerances), and so are its expectations:
its torch references, written again here and evaluated in float64 from the very same (rounded) inputs.

How Liger's settings map onto kdfast:
- Liger's generalized JSD is beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, P the teacher
  (target), Q the student (input); beta = 0 is forward KL(P || Q), beta = 1 reverse KL(Q || P). That is kdfast's
  `divergence="jsd"` (TRL's convention) with the same beta and the arguments in the same places. Liger never
  multiplies by T^2: `t2_scale=False`.
- Liger's JSD and KL-div take log-probabilities; kdfast takes logits. Log-probabilities are logits whose softmax is
  themselves, so the loss is the same; kdfast's gradient is with respect to logits (through the softmax), so the
  references apply log_softmax to the inputs before Liger's formula: the same value, and the gradient a logits API
  owes. The teacher is renormalised the same way (bf16/fp16 log-probabilities sum to 1 only approximately).
- Liger's cross-entropy (plain and fused linear) is kdfast's CE term alone: `kd_weight=0, ce_weight=1` (the teacher
  is then unused: any tensor of the right shape), `label_smoothing`, and `z_loss_weight` for `lse_square_scale`.
  Liger returns the weighted z-loss; kdfast's `parts.z_loss` is before its weight.
- Liger's chunked JSD distillation loss (weight_hard_loss * CE + weight_soft_loss * JSD at T, each a mean over the
  kept rows) is `ce_weight=weight_hard_loss, kd_weight=weight_soft_loss, t2_scale=False`.
- `distill_loss` has no softcap; kdfast applies one in its fused linear forms, so Liger's logits-level softcap
  cases run through `linear_distill_loss` with an identity head (hidden states = the logits, weight = I: the GEMM
  is exact and d hidden = d logits), the vocabulary cut to 2048 for the [V, V] identity.
- Liger's fused linear references compute the logits in the inputs' dtype (a bf16 GEMM rounds them), cast them to
  float32 (autograd casts their gradient back to the dtype on the way down), and go on in float32. Here the logits
  are rounded the same way, the rest is float64, and the logits' gradient is rounded to the dtype before the head.
  With a bias, the GEMM is rounded and then the sum with the bias, as Liger's kernels and kdfast's compute it (and
  as HF's distillation reference writes it); Liger's FLCE reference uses nn.Linear, one rounding, a difference of a
  16-bit ulp in some logits that its tolerance absorbs over 1024 tokens but not over the few tokens here.

Tolerances: Liger's, per dtype. Liger compares two float32 computations; here the expectation is float64, and a
float32 sum over 32000 columns is itself ~1e-6 off it (torch's own float32 KLDivLoss rows are 1.4e-6 off), so with
float32 inputs the reference is also evaluated in float32 and kdfast may be as far from float64 as that is, plus
Liger's tolerance: the bound Liger's check against its float32 reference implies (the triangle inequality).

Cases: Liger's full cartesian products (about 460 cases a backend) take many minutes under Triton's interpreter,
so each test takes a covering set of Liger's parameter rows: every value of every axis appears, with shapes and
dtypes rotated among them. Shapes: B and V kept, T cut to 8 (C++ and PyTorch backends; 2 where a 16-bit GEMM or
the identity head runs, slow on a CPU); under Triton's interpreter (about 30 ms a row) B * T cut to 4 and a
vocabulary over 4096 to a tenth. Cases without a kdfast counterpart (predicted tokens, token scaling, accum_dtype,
KLDivLoss's log_target=True fed probabilities, TVD's bf16 rows) are not ported. Per-class CE weights (Liger's
`weight` and `ce_weight`) are kdfast's `class_weights` of `kdfast.cross_entropy` and `linear_cross_entropy`.
"""


import torch
import torch.nn.functional as F

INTERPRETED = not torch.cuda.is_available()
BF16, FP16, FP32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def sized(backend, B, T, V=None, t_cap=8):
    """Liger's (B, T, V) cut to a CPU run (module docstring; `t_cap` 2 for the fused linear cases, whose 16-bit GEMMs
    are slow on a CPU); at least 4 rows, so that Liger's ignore_index placement (1 to B*T//2 - 1 rows) has room."""
    if backend == "triton" and INTERPRETED:
        B, T = min(B, 2), (4 if B == 1 else 2)
        if V is not None and V > 4096:
            V = V // 10
    else:
        T = min(T, t_cap)
        if B * T < 4:
            T = -(-4 // B)
    return B, T, V


def close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), atol=atol, rtol=rtol)


def _gap(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def verify(out, mine, reference, dtype, atol, rtol, upstream=None):
    """kdfast's loss `out` and, when `mine` lists tensors (None entries skipped), their gradients after
    `out.backward(upstream)`, against `reference(precision) -> (loss, leaves)` (leaves in `mine`'s order) in float64.
    With float32 inputs the reference also runs in float32 and its own distance from float64 is added to atol
    (module docstring)."""
    up = torch.ones(out.shape, dtype=F64) if upstream is None else upstream
    if mine:
        out.backward(up.to(out.dtype).to(out.device))
    results = []
    for precision in (F64, FP32) if dtype == FP32 else (F64,):
        loss, leaves = reference(precision)
        if mine:
            loss.backward(up.to(precision))
        results.append((loss.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]))
    loss64, grads64 = results[0]
    slack = (lambda i: _gap(results[1][1][i], grads64[i])) if len(results) > 1 else (lambda i: 0.0)
    close(out, loss64, atol + (_gap(results[1][0], loss64) if len(results) > 1 else 0.0), rtol)
    for i, tensor in enumerate(mine or ()):
        if tensor is not None:
            close(tensor.grad, grads64[i], atol + slack(i), rtol)


def ignore_some(labels, ignore_index, gen):
    """Liger's placement: a random count in [1, N // 2) of random rows get ignore_index."""
    count = int(torch.randint(1, labels.numel() // 2, (1,), generator=gen))
    labels[torch.randperm(labels.numel(), generator=gen)[:count]] = ignore_index
    return labels


def kept_mean(rows, labels, ignore_index):
    """Liger's reduction: the kept rows' sum over their count, 0 when none is kept (no labels: every row)."""
    if labels is None:
        return rows.mean()
    keep = labels != ignore_index
    return torch.where(keep, rows, torch.zeros_like(rows)).sum() / keep.sum().clamp(min=1)


def liger_jsd_rows(log_q, log_p, beta):
    """Liger's torch JSD (test_jsd.py's JSD module) per row: q the student, p the teacher; beta 0 and 1 the plain
    KLs, in between M = beta p + (1 - beta) q (Liger's lerp(q, p, beta))."""
    q, p = log_q.exp(), log_p.exp()
    if beta == 0.0:
        return (p * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.log(beta * p + (1 - beta) * q)
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


class _GradInDtype(torch.autograd.Function):
    """Identity; its backward rounds the gradient to `dtype` (Liger's `logits.to(float32)` of `dtype` logits)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def rounded_head(hidden, weight, bias, dtype, two_roundings=False):
    """Logits equal to Liger's reference logits (a GEMM in `dtype`, rounded to it), carrying the gradient of the
    exact head in the leaves' precision, rounded to `dtype` first. `two_roundings`: the GEMM rounded, then the bias
    added and rounded again (HF's distillation reference writes `x @ W.T + b`; nn.Linear rounds once)."""
    exact = hidden @ weight.T
    if bias is not None:
        exact = exact + bias
    with torch.no_grad():
        x, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        if two_roundings:
            low = x @ w.T
            low = low + b if b is not None else low
        else:
            low = F.linear(x, w, b)
    return _GradInDtype.apply(exact + (low.to(exact.dtype) - exact).detach(), dtype)


def as_leaf(tensor, precision):
    return tensor.detach().cpu().to(precision).requires_grad_(True) if tensor is not None else None


def leaf(tensor, device):
    return tensor.detach().clone().to(device).requires_grad_(True) if tensor is not None else None


def dev(tensor, device):
    return tensor.to(device) if tensor is not None else None


# ----------------------------------------------------------------------------------------------------------------


FL_LLAMA = (8, 128, 1024, 4096)  # Liger's fused linear (B, T, H, V)


def ce_with_z_loss(logits, labels, reduction, ignore_index, label_smoothing, lse_square_scale, weight=None):
    """Liger's CrossEntropyWithZLoss: torch's CE (per-class `weight` where given) plus lse_square_scale * lse^2 over
    the kept rows, reduced the same way (the z-loss unweighted, a mean over the kept rows); returns (total, weighted
    z-loss)."""
    ce = F.cross_entropy(logits, labels, weight=weight, reduction=reduction, ignore_index=ignore_index,
                         label_smoothing=label_smoothing)
    keep = labels != ignore_index
    lse2 = torch.where(keep, lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    z_loss = {"mean": lse2.sum() / keep.sum(), "sum": lse2.sum(), "none": lse2}[reduction]
    return ce + z_loss, z_loss


CAP = 12  # rows a case keeps under Triton's interpreter


def some_rows(backend, n, cap=CAP):
    """All n rows, or under Triton's interpreter the first cap // 2 and the last cap - cap // 2."""
    if backend != "triton" or not INTERPRETED or n <= cap:
        return torch.arange(n)
    return torch.cat([torch.arange(cap // 2), torch.arange(n - (cap - cap // 2), n)])


def rel_max_error(actual, expected):
    """The sm90 suites' measure: max |actual - expected| over max |expected|."""
    expected = expected.detach().cpu().double()
    return ((actual.detach().cpu().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-9)).item()
