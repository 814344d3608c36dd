"""Cut Cross-Entropy's own cases (apple/ml-cross-entropy: tests/test_cce_loss_forward.py and
tests/test_cce_loss_backward.py; its tests/test_vocab_parallel.py is ported in
tests/test_cce_peer_cases_vocab_parallel.py) on kdfast's fused linear CE term, every backend.

How CCE's `linear_cross_entropy(e, c, targets, bias, ignore_index, softcap, reduction, shift, ...)` maps onto kdfast:
- It is `kdfast.linear_cross_entropy(e, c, targets, bias=bias, softcap=softcap, reduction=..., ignore_index=...)`
  (the fused linear loss with no teacher; this port first ran it as `linear_distill_loss` with kd_weight=0 and a zero
  teacher head, which kdfast then projected for nothing in every chunk). `reduction="none"` gives each row's CE
  shaped like the targets, 0 on an ignored row, as CCE's does: the counterpart. `kdfast.linear_token_logprobs`
  (-log q(target) per row) is the other per-token form, but it has no ignore_index and its 16-bit logits are rounded
  at other points than torch's reference (the comment in test_loss_forward): the float32 forward cases check it on
  the kept rows too.
- CCE's softcap is `tanh(z / softcap) * softcap` after the bias: kdfast's `softcap`, applied in the same order.
- `shift`: kdfast has none (its trainers shift before the call). The inputs are shifted here as CCE's reference
  shifts them, `e[:, :-shift]` and `targets[:, shift:]`, and passed to kdfast as those views.
- CCE's z-loss cases (`return_lse=True`, then `compute_z_loss(lse, targets, shift)`, mean(lse^2) over the kept
  rows, added to the reduced CE) are kdfast's `z_loss_weight=1`: weight * lse^2 per kept row, inside the loss and
  reduced with it. For "mean" and "sum" (divided by the kept count, as CCE's test does) that is CCE's objective.
  For "none" CCE averages its per-row CE over all rows and adds the z mean over the kept rows; kdfast's rows hold
  CE + lse^2 together, so the objective here is their mean over all rows (the z part weighed 1 / rows, not 1 / kept)
  and the reference computes the same.
- `impl` ("cce", "cce_exact", "torch_compile"): CCE's implementations; kdfast's backends take that axis's place.

Inputs: CCE's. (N, V, D) in (256, 512, 128), (252, 507, 128), (252, 507, 123) (a block multiple, then an odd
vocabulary, then an odd hidden size too); e = randn(N, D) / sqrt(D) and c = randn(V, D) drawn in the dtype, the
first min(N, V) // 2 rows of c set to those of e (large label logits), bias = randn(V) * 0.01 (forward, partials) or
0.02 (backward), targets uniform in [0, V) with 20% of them (a random permutation's first fifth) set to -100, e
viewed as 4 sequences; shift 2 (forward) or 1 (backward); softcap 20. CCE's order of draws, from one generator
seeded 0 per case on the CPU (CCE seeds CUDA's).

Expectations: CCE's. Each per-token loss (forward) and each gradient element (backward) is compared with a truth
computed by torch from the same rounded inputs (CCE: float32; here float64), and kdfast's error must be no larger
than that of torch's own computation in the inputs' dtype (CCE's reference: the head in the dtype, the CE in
float32) plus CCE's tolerance: forward 1e-5 (float32), 1e-3 (float16), 1e-2 (bfloat16); backward 5e-4, 1e-3, 1e-2.
The backward objective is CCE's: the loss ("sum" divided by the kept count of the shifted targets, in the reference
as in kdfast's call; CCE's test divides its own call's sum by the unshifted targets' count, 1.6% larger with shift 1,
a difference its tolerances hide), its mean, plus the z-loss. The gradients must exist exactly where requested: e, c and
the bias in the backward cases; in the partial cases (CCE's test_loss_partials: only e and the bias, only c, only
the bias) only those, and here their values are checked as well. CCE's float32 backward reference runs its GEMMs in
TF32 on its GPU ("high" precision); on the CPU they are float32, a smaller allowance. The reference's softcap is
computed in float32 and rounded once to the dtype, as CCE's compiled softcapping computes it.

Cases: CCE's full products (144 forward and 864 backward rows an implementation) are cut to every 11th and
every 59th row of them: 14 and 15 rows in which every pair of values of any two axes appears together
(`_covering`, asserted below). dtypes: float32, float16 and bfloat16, all three run on kdfast's CPU kernels. Under
Triton's interpreter (no GPU) the rows are cut to 12 (4 sequences of 3; V and D kept).

Not ported: `filter_eps`, `accum_e_fp32`, `accum_c_fp32`, `filter_e_grad`, `filter_c_grad` (CCE's kernel's own
gradient filtering and accumulation settings; kdfast filters no gradient and sums the head's gradient over its chunks
in float32; CCE's tests leave them at their defaults); `return_lse` itself (kdfast returns no log-sum-exp; it enters
only through the z-loss); CCE's skip of bfloat16 without CUDA (every dtype runs on the CPU here). CCE's tests of its
internal kernels and helpers (test_cce_lse.py, test_cce_indexed_dot.py, test_compute_z_loss.py) are not part of this
port.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for

import kdfast

IGNORE = -100
F64, FP32, FP16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
INTERPRETED = not torch.cuda.is_available()
SHAPES = ((256, 512, 128), (252, 507, 128), (252, 507, 123))
DTYPES = (FP32, FP16, BF16)
FORWARD_TOL = {FP32: 1e-5, FP16: 1e-3, BF16: 1e-2}
BACKWARD_TOL = {FP32: 5e-4, FP16: 1e-3, BF16: 1e-2}


def _covering(axes: dict, stride: int) -> list:
    """Every `stride`-th row of the axes' full product (in itertools order), checked to hold every pair of values of
    any two axes (module docstring); each row a pytest.param named by its values."""
    values = list(axes.values())
    rows = list(itertools.product(*values))[::stride]
    for (i, a), (j, b) in itertools.combinations(enumerate(values), 2):
        missing = set(itertools.product(a, b)) - {(row[i], row[j]) for row in rows}
        assert not missing, f"stride {stride}: axes {i}, {j} never meet at {missing}"
    return [pytest.param(*row, id="-".join(map(_value_id, axes, row))) for row in rows]


def _value_id(name, value) -> str:
    if isinstance(value, bool) or value is None:
        return name if value else f"no_{name}"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return f"{name}{value:g}" if isinstance(value, (int, float)) else str(value)


FORWARD_ROWS = _covering(dict(dtype=DTYPES, softcap=(None, 20.0), bias=(True, False), shift=(0, 2),
                              ignored=(False, True), shape=SHAPES), 11)
BACKWARD_ROWS = _covering(dict(dtype=DTYPES, softcap=(None, 20.0), bias=(False, True), shift=(0, 1),
                               ignored=(False, True), reduction=("none", "mean", "sum"), z_loss=(True, False),
                               shape=SHAPES), 59)


# ----------------------------------------------------------------------------------------------------------------
# Inputs, CCE's reference, kdfast's call
# ----------------------------------------------------------------------------------------------------------------


def cce_inputs(backend, shape, dtype, *, bias, bias_scale, invalids, bias_first):
    """CCE's construction (module docstring); `bias_first`: the bias drawn before the targets (CCE's forward and
    partial tests) or after them (its backward test). Returns e [4, N / 4, D], c, bias or None, targets [4, N / 4]."""
    n, v, d = shape
    if backend == "triton" and INTERPRETED:
        n = 12
    gen = torch.Generator().manual_seed(0)
    e = torch.randn((n, d), generator=gen, dtype=dtype) / d**0.5
    c = torch.randn((v, d), generator=gen, dtype=dtype)
    c[: min(n, v) // 2] = e[: min(n, v) // 2]

    def draw_bias():
        return torch.randn(v, generator=gen, dtype=dtype) * bias_scale if bias else None

    b = draw_bias() if bias_first else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if invalids:
        targets[torch.randperm(n, generator=gen)[: int(0.2 * n)]] = IGNORE
    if not bias_first:
        b = draw_bias()
    return e.view(4, -1, d), c, b, targets.view(4, -1)


def shifted(e, targets, shift):
    return (e[:, :-shift], targets[:, shift:]) if shift else (e, targets)


def reference_logits(e, c, bias, softcap):
    """CCE's reference head in the leaves' own precision; the CE runs in float32 (float64 for the truth)."""
    logits = e.flatten(0, -2) @ c.T
    if bias is not None:
        logits = logits + bias
    wide = F64 if logits.dtype == F64 else FP32
    if softcap is not None:  # CCE's softcapping is compiled: float32 inside, one rounding to the logits' dtype
        logits = (torch.tanh(logits.to(wide) / softcap) * softcap).to(logits.dtype)
    return logits.to(wide)


def reference_objective(e, c, bias, targets, softcap, shift, reduction, z_loss):
    """CCE's backward objective (module docstring) for leaves in one precision."""
    e, targets = shifted(e, targets, shift)
    logits = reference_logits(e, c, bias, softcap)
    flat = targets.flatten()
    kept = flat != IGNORE
    loss = F.cross_entropy(logits, flat, ignore_index=IGNORE, reduction=reduction)
    if reduction == "sum":
        loss = loss / kept.count_nonzero()
    loss = loss.mean()
    if z_loss:
        z_rows = torch.where(kept, torch.logsumexp(logits, dim=-1) ** 2, 0.0)
        loss = loss + (z_rows.mean() if reduction == "none" else z_rows.sum() / kept.count_nonzero())
    return loss


def reference_grads(tensors, wanted, targets, softcap, shift, reduction, z_loss, precision):
    """The gradients of CCE's objective for (e, c, bias), computed from leaves in `precision` on the CPU; None where
    a tensor is absent or not wanted."""
    leaves = [t.detach().to(precision).requires_grad_(w) if t is not None else None for t, w in zip(tensors, wanted)]
    reference_objective(*leaves, targets, softcap, shift, reduction, z_loss).backward()
    return [leaf.grad if leaf is not None else None for leaf in leaves]


def kdfast_ce(e, c, bias, targets, softcap, backend, **settings):
    """CCE's linear_cross_entropy on kdfast's."""
    return kdfast.linear_cross_entropy(e, c, targets, bias=bias, softcap=softcap, backend=backend, **settings)


def kdfast_objective(out, targets, reduction):
    """CCE's test reduces the loss as its reference does: "sum" divided by the kept count, then the mean."""
    if reduction == "sum":
        out = out / (targets != IGNORE).count_nonzero()
    return out.mean()


def assert_no_worse(mine, truth, ref, tol, what):
    """CCE's check: kdfast's error against the truth, element by element, at most torch's in the dtype plus tol."""
    mine, truth, ref = (t.detach().cpu().double().flatten() for t in (mine, truth, ref))
    excess = (mine - truth).abs() - (ref - truth).abs() - tol
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (f"{what}: error beyond torch's plus {tol} by {excess[worst].item():.3g} at "
                                       f"{worst}: kdfast {mine[worst].item()!r}, truth {truth[worst].item()!r}, "
                                       f"torch in the dtype {ref[worst].item()!r}")


def on(tensor, device, grad=False):
    return tensor.detach().clone().to(device).requires_grad_(grad) if tensor is not None else None


# ----------------------------------------------------------------------------------------------------------------
# tests/test_cce_loss_forward.py (test_loss_forward)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, softcap, has_bias, shift, invalids, shape", FORWARD_ROWS)
def test_loss_forward(backend, dtype, softcap, has_bias, shift, invalids, shape):
    device = device_for(backend)
    e, c, bias, targets = cce_inputs(backend, shape, dtype, bias=has_bias, bias_scale=0.01, invalids=invalids,
                                     bias_first=True)
    e_s, t_s = shifted(e, targets, shift)

    def per_token(precision):
        leaves = [t.to(precision) if t is not None else None for t in (e_s, c, bias)]
        rows = F.cross_entropy(reference_logits(*leaves, softcap), t_s.flatten(), ignore_index=IGNORE,
                               reduction="none")
        return rows.view(t_s.shape)

    truth, ref, tol = per_token(F64), per_token(dtype), FORWARD_TOL[dtype]
    # The views of the device's copies, as CCE's call gets them.
    e_d, t_d = shifted(on(e, device), targets.to(device), shift)
    c_d, b_d = on(c, device), on(bias, device)
    with torch.no_grad():
        loss = kdfast_ce(e_d, c_d, b_d, t_d, softcap, backend, reduction="none")
    assert loss.shape == t_s.shape
    assert_no_worse(loss, truth, ref, tol, "reduction='none' loss")
    kept = t_s != IGNORE
    assert bool((loss.cpu()[~kept] == 0).all()), "an ignored row's loss is not 0"
    if dtype == FP32:
        # The other per-token form, on the kept rows. In 16 bits it rounds elsewhere than torch's reference: one
        # addmm gives the softcap's argument (z + b) / c, rounded once, where torch rounds z, then z + b. Element by
        # element the two errors then differ by up to about half a 16-bit ulp of a logit, beyond CCE's 1e-3 at
        # float16 (0.0019 against torch's 0.0002 in one row of the float16 softcap case; over all its rows the mean
        # error is 1.6e-4, torch's 1.9e-4): a bound for a kernel that keeps float32 logits, as CCE's does.
        with torch.no_grad():
            logprobs = kdfast.linear_token_logprobs(e_d, c_d, t_d.clamp(min=0), bias=b_d, softcap=softcap,
                                                    backend=backend)
        assert_no_worse(-logprobs.cpu()[kept], truth[kept], ref[kept], tol, "linear_token_logprobs")


# ----------------------------------------------------------------------------------------------------------------
# tests/test_cce_loss_backward.py (test_loss_backward, test_loss_partials)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, softcap, has_bias, shift, invalids, reduction, z_loss, shape", BACKWARD_ROWS)
def test_loss_backward(backend, dtype, softcap, has_bias, shift, invalids, reduction, z_loss, shape):
    device = device_for(backend)
    e, c, bias, targets = cce_inputs(backend, shape, dtype, bias=has_bias, bias_scale=0.02, invalids=invalids,
                                     bias_first=False)
    settings = (targets, softcap, shift, reduction, z_loss)
    truth = reference_grads((e, c, bias), (True,) * 3, *settings, precision=F64)
    ref = reference_grads((e, c, bias), (True,) * 3, *settings, precision=dtype)
    leaves = [on(t, device, grad=True) for t in (e, c, bias)]
    e_d, t_d = shifted(leaves[0], targets.to(device), shift)
    out = kdfast_ce(e_d, leaves[1], leaves[2], t_d, softcap, backend, reduction=reduction,
                    z_loss_weight=1.0 if z_loss else 0.0)
    kdfast_objective(out, t_d, reduction).backward()
    for name, leaf, want, ref_grad in zip(("e", "c", "bias"), leaves, truth, ref):
        if leaf is None:
            continue
        assert leaf.grad is not None, f"no gradient for {name}"
        assert leaf.grad.dtype == dtype
        assert_no_worse(leaf.grad, want, ref_grad, BACKWARD_TOL[dtype], f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bfloat16", "float32"])  # CCE's: bfloat16 alone
@pytest.mark.parametrize("compute_de, compute_dc, compute_dbias",
                         [(True, False, True), (False, True, False), (False, False, True)], ids=["e+bias", "c", "bias"])
def test_loss_partials(backend, dtype, compute_de, compute_dc, compute_dbias):
    """Gradients exactly where requested (CCE's check), and their values held to the backward cases' bound."""
    device = device_for(backend)
    e, c, bias, targets = cce_inputs(backend, SHAPES[0], dtype, bias=True, bias_scale=0.01, invalids=False,
                                     bias_first=True)
    wanted = (compute_de, compute_dc, compute_dbias)
    settings = (targets, None, 0, "mean", False)
    truth = reference_grads((e, c, bias), wanted, *settings, precision=F64)
    ref = reference_grads((e, c, bias), wanted, *settings, precision=dtype)
    leaves = [on(t, device, grad=w) for t, w in zip((e, c, bias), wanted)]
    kdfast_ce(*leaves, targets.to(device), None, backend, reduction="mean").backward()
    for name, leaf, w, want, ref_grad in zip(("e", "c", "bias"), leaves, wanted, truth, ref):
        assert (leaf.grad is not None) == w, f"{name}: gradient {'missing' if w else 'not requested'}"
        if w:
            assert_no_worse(leaf.grad, want, ref_grad, BACKWARD_TOL[dtype], f"d {name}")
