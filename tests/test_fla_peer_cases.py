"""flash-linear-attention's fused-loss tests (fla-org/flash-linear-attention, FLA: tests/modules/test_cross_entropy.py
and tests/modules/test_kl_div.py, their versions of commit 794f183c, 2026-05-02, still the newest on 2026-08-22) on
kdfast.cross_entropy, kdfast.linear_cross_entropy and kdfast.linear_distill_loss, every backend. FLA's
tests/modules/test_cross_entropy_parallel.py is ported in tests/test_fla_peer_cases_vocab_parallel.py.

How FLA's modules map onto kdfast (fla/modules/fused_cross_entropy.py, fused_linear_cross_entropy.py, fused_kl_div.py):
- FusedCrossEntropyLoss(reduction="mean")(logits, target): the per-row loss in float32, 0 on ignored rows, summed and
  divided by the kept rows: kdfast.cross_entropy(logits, target). Its `logit_scale` (the float32-upcast logits times it,
  first) and `logit_softcapping` (then softcap * tanh(logits / softcap)) have no counterpart in kdfast's logits-level
  loss: where FLA's tests use them, the test applies them to the logits itself, in float32 as FLA's kernel does, and
  passes the float32 result; the gradient reaches the bf16 leaf through autograd.
- FusedLinearCrossEntropyLoss(logit_scale=, logit_softcapping=, reduction=)(x, target, weight, bias): the same loss of
  F.linear(x, weight, bias), scaled then capped: kdfast.linear_cross_entropy(x, weight, target, bias=, logit_scale=,
  softcap=), which applies the bias, the scale and the cap in that order. Its reference in FLA's test,
  FusedCrossEntropyLoss(logit_scale=) of F.linear's bf16 logits, is computed here by torch (F.cross_entropy of those
  logits upcast, scaled, capped in float32), and run as well on kdfast.cross_entropy with the test scaling the logits,
  FLA's pairing of its two losses. FLA's `accumulate_grad_in_fp32` (its weight and bias gradients summed over its chunks
  in float32 or in their dtype) has no counterpart: kdfast sums them in float32; both values are one call, run once.
  FLA's kernel takes its 1024 and 2048 rows in chunks; kdfast's chunk_size="auto" would take the cut rows in one, so
  chunk_size=8 is passed: several chunks, the last ragged.
- FusedKLDivLoss("batchmean")(x, target_x, x_weight, target_weight): F.kl_div(log_softmax(x @ x_weight.T),
  softmax(target_x @ target_weight.T), "batchmean"), the forward KL from the target (teacher) head's distribution to the
  student's, summed over the vocabulary and divided by the rows (its kernel's b_loss / N): kdfast.linear_distill_loss(x,
  x_weight, target_x, target_weight, divergence="forward_kl", reduction="mean"), whose "mean" without labels divides by
  the rows and whose t2_scale multiplies by T^2 = 1 at temperature 1. A teacher that requires grad: FLA raises
  RuntimeError ("frozen teacher"), kdfast ValueError ("... the teacher is a constant").

Inputs: FLA's, in its order of draws after torch.manual_seed(42), here from one CPU generator seeded 42 (FLA draws on
the CPU too and moves the tensors to its device: at its sizes the same numbers): randn in float32 cast to the dtype,
targets randint(0, V, (B, T)) shifted left by one with -100 at the end of each sequence; then `do`, randn_like(ref) (FLA
draws it on its device, with that device's generator: another number here). Sizes cut for a 2-core CPU, the test ids
naming FLA's: B 2 kept; the cross-entropy tests' T 512 and 1024 to 31 and 62 (7 and 14 under Triton's interpreter, about
0.1 s a row), odd so that the chunks of 8 are ragged; D 1024 and 2048 to 64 and 128; V 32000 and 100000 to 3203 and
10009 (odd, their ratio kept); the KL test's T 16 and 32 kept. With D cut by 16 the logits of randn x and weight have a
standard deviation of 8 to 11 rather than FLA's 32 to 45: the softmax is still peaked, and softcap 30 bends them less.

Expectations: FLA's assert_close (fla/utils/_testing.py, as it runs outside FLA's CI, where a miss only warns): a
largest difference within 1e-6 passes, else the error ratio RMS(ref - tri) / RMS(ref) below 1e-2 (computed here in
float64), on o and d logits, on o, dx, dw and db, on o, dx and dw. Beside it, float64 on the same inputs: the
logits-level tests' float32 loss within 1e-5 relative, and each d logits entry within
tests/test_flash_attn_peer_cases.py's `grad64_allowance` (float32 statistics, half a bf16 unit at each of kdfast's two
roundings, the stored gradient and its product with `do`, a whole unit for the first under Triton's interpreter, which
truncates where a GPU rounds; one rounding of the float32 gradient where the test capped the logits); the float32 KL's
loss within 1e-5 relative and its gradients within 1e-4 relative L2; the 16-bit results (the fused linear loss in bf16,
the KL in float16 and bfloat16) within twice the relative L2 error of torch's own computation of FLA's reference from
float64 (four times under Triton's interpreter: `grad_factor`), the loss within the larger of that and the dtype's unit
roundoff (one number, whose error can be small by chance: torch's was down to 1/79 of kdfast's).

Found: kdfast's 16-bit fused linear loss rounded a head's GEMM output to bf16 and then added the bias in bf16, where
F.linear (FLA's reference, and every model's head) rounds once with the bias inside: on these peaked softmaxes its
gradients were up to an error ratio of 3.0e-2 from FLA's reference (5.3e-2 at FLA's own T 512, D 1024, V 32000 on the
C++ backend) and 1.1 to 2.6 times torch's error from float64. Fixed: the bias (and a logit scale) ride in the GEMM's
beta and alpha, one rounding (kdfast/linear_chunks.py `_logits_into`); every case without a softcap passes.

A disagreement (ROUNDING_POINTS): with a softcap, kdfast's 16-bit fused linear loss (fp32_logits=False, its default)
keeps each chunk's capped logits in bf16, rounded once more after the cap it takes in float32; FLA caps in float32 and
keeps the result. Where that alone puts a case past a check (3 of the 8 softcap shapes here: d x 2-9% past twice
torch's error from float64; FLA's own criterion passes), every check runs again against torch's computation of FLA's
reference with kdfast's rounding point (the capped logits rounded to bf16); only if all pass is the case xfailed,
naming the checks that failed; any other failure fails. With fp32_logits=True (not FLA's case) kdfast's error from
float64 is below torch's.

Cases: FLA's products on the C++ and PyTorch backends (the logits tests' D axis enters no tensor: each case once); under
Triton's interpreter 2 rows of each cross-entropy test in which every value of each axis appears, 1 of each softcap test
and 3 of the KL test (T 16, V 32000, each dtype). The KL test's dtypes are FLA's float32 and float16 with bfloat16
added, the dtype of its versions before commit c83e6b88 (2025-04-03).

Left out: FLA's skips (Intel GPUs), its CI and compile-mode path of assert_close (misses only warn), and the D axis of
its logits-level tests (unused there).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from test_flash_attn_peer_cases import assert_within, float32_error, grad64_allowance

import kdfast

IGNORE = -100
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
INTERPRETED = not torch.cuda.is_available()
SEED, B = 42, 2
# FLA's sizes, and the ones run here (module docstring).
T_CE = {512: 31, 1024: 62}
T_CE_INTERPRETED = {512: 7, 1024: 14}  # Triton's interpreter: ~0.1 s a row
D_CUT = {1024: 64, 2048: 128}
V_CUT = {32000: 3203, 100000: 10009}
T_KL = {16: 16, 32: 32}
CHUNK = 8
SOFTCAP = 30.0
FLA_RATIO, FLA_ERR_ATOL = 1e-2, 1e-6
LOSS64_RTOL, GRAD64_RTOL = 1e-5, 1e-4
TORCH_FACTOR, INTERPRETED_FACTOR = 2.0, 4.0
UNIT_ROUNDOFF = {BF16: 2.0**-8, FP16: 2.0**-11}  # half the spacing of the dtype's numbers at 1, relative
ROUNDING_POINTS = ("kdfast's 16-bit fused linear loss keeps its chunk's capped logits in bf16, rounded once more "
                   "after the float32 cap, where FLA's reference caps in float32 and keeps the result; against the "
                   "same reference with kdfast's rounding point every check passes (module docstring)")


def params(rows, names, interpreted_rows) -> list:
    """pytest params (backend, *row): every row on the C++ and PyTorch backends (and a GPU's), `interpreted_rows`
    under Triton's interpreter."""
    listed = []
    for row in rows:
        for backend in BACKENDS:
            if backend == "triton" and INTERPRETED and row not in interpreted_rows:
                continue
            name = "-".join(f"{n}{str(v).removeprefix('torch.')}" for n, v in zip(names, row))
            listed.append(pytest.param(backend, *row, id=f"{backend}-{name}"))
    return listed


def as64(tensor):
    return tensor.detach().cpu().double()


def fla_close(what, ref, tri, ratio=FLA_RATIO, err_atol=FLA_ERR_ATOL):
    """FLA's assert_close (fla/utils/_testing.py) outside its CI: a largest difference within err_atol passes;
    otherwise (no NaN) FLA's error ratio, the RMS of the difference over the RMS of the reference (+ 1e-8), below
    `ratio`. Computed in float64 (FLA's in the tensors' dtype)."""
    ref, tri = as64(ref), as64(tri)
    assert ref.shape == tri.shape, f"{what}: shape {tuple(tri.shape)}, FLA's reference {tuple(ref.shape)}"
    difference = ref - tri
    largest = difference.abs().max().item()
    if largest <= err_atol:
        return
    root_n = ref.numel() ** 0.5
    found = (difference.norm() / root_n / (ref.norm() / root_n + 1e-8)).item()
    assert found < ratio, f"{what}: FLA's error ratio {found:.3g} (largest difference {largest:.3g}), not below {ratio}"


def rel_l2(found, truth) -> float:
    truth = as64(truth)
    return ((as64(found) - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def check64(what, found, truth, rtol, torch_value=None, factor=TORCH_FACTOR):
    """kdfast against float64 on the same inputs, relative L2: within `rtol`, or where `torch_value` is given (a
    16-bit result) within the larger of `rtol` and `factor` times the error of torch's own computation."""
    error = rel_l2(found, truth)
    allowed = rtol if torch_value is None else max(rtol, factor * rel_l2(torch_value, truth))
    assert error <= allowed, f"{what}: {error:.3g} relative L2 from float64, allowed {allowed:.3g}"


def grad_factor(backend) -> float:
    """TORCH_FACTOR for a 16-bit gradient; twice it under Triton's interpreter, which truncates the 16-bit gradient
    kdfast's kernel stores where a GPU rounds to nearest: up to a whole unit where rounding moves half, and always
    one way, so that it adds up in d weight's and d bias's sums over the rows."""
    return INTERPRETED_FACTOR if backend == "triton" and INTERPRETED else TORCH_FACTOR


def sequence_length(backend, T) -> int:
    return (T_CE_INTERPRETED if backend == "triton" and INTERPRETED else T_CE)[T]


def shifted_targets(gen, V, T):
    """FLA's targets: uniform ids [B, T], shifted left by one with -100 at the end of each sequence, flattened."""
    target = torch.randint(0, V, (B, T), generator=gen)
    return torch.cat((target[..., 1:], torch.full_like(target[..., :1], IGNORE)), -1).flatten()


def leaves(device, *tensors):
    return [t.detach().clone().to(device).requires_grad_(True) for t in tensors]


class Findings:
    """The failed checks of a case, gathered so that a known disagreement can be told from any other failure."""

    def __init__(self):
        self.failed = []

    def run(self, check, *args):
        try:
            check(*args)
        except AssertionError as error:
            self.failed.append(str(error))


# ---------------------------------------------------------------------------------------------------------------
# tests/modules/test_cross_entropy.py: the logits-level loss
# ---------------------------------------------------------------------------------------------------------------

LOGITS_ROWS = list(itertools.product(T_CE, V_CUT))
LOGITS_INTERPRETED = [(512, 100000), (1024, 32000)]


def logits_case(backend, T, V, softcap):
    """FLA's logits-level case: bf16 logits, its shifted targets, "mean"; its reference torch's cross-entropy (of the
    logits capped in float32 where `softcap` is given, on both sides), cast to bf16, backward under a randn `do`."""
    T, V = sequence_length(backend, T), V_CUT[V]
    gen = torch.Generator().manual_seed(SEED)
    logits = torch.randn(B * T, V, generator=gen).to(BF16)
    target = shifted_targets(gen, V, T)

    def capped(z):
        return z if softcap is None else softcap * torch.tanh(z.float() / softcap)

    (leaf,) = leaves("cpu", logits)
    ref = F.cross_entropy(capped(leaf), target).to(BF16)
    do = torch.randn((), generator=gen, dtype=ref.dtype)  # randn_like(ref)
    ref.backward(do)

    device = device_for(backend)
    (tri_leaf,) = leaves(device, logits)
    loss = kdfast.cross_entropy(capped(tri_leaf), target.to(device), backend=backend)
    assert loss.shape == () and loss.dtype == FP32
    tri = loss.to(BF16)
    tri.backward(do.to(device))
    assert tri_leaf.grad.dtype == BF16
    fla_close(" o", ref, tri)
    fla_close("dl", leaf.grad, tri_leaf.grad)

    # kdfast takes these logits (or their capped float32 values) as given: its float32 loss is held to float64's on
    # them, and each entry of its gradient to float64's within float32's statistics and its roundings to bf16.
    (leaf64,) = leaves("cpu", logits.double())
    loss64 = F.cross_entropy(leaf64 if softcap is None else softcap * torch.tanh(leaf64 / softcap), target)
    loss64.backward(do.double())
    check64("loss (float64)", loss, loss64, LOSS64_RTOL)
    upstream = abs(do.item())
    float32 = float32_error(leaf64.grad, 0.0, upstream / int((target != IGNORE).sum()))
    # bf16 logits: kdfast stores d logits in bf16 and scales them by `do` (two roundings, the first a truncation
    # under Triton's interpreter); capped float32 logits: autograd's one rounding of the float32 gradient.
    allowance = grad64_allowance(leaf64.grad, BF16, float32, upstream, 2 if softcap is None else 1,
                                 backend == "triton" and INTERPRETED)
    assert_within("d logits (float64)", tri_leaf.grad, leaf64.grad.float(), allowance.float())


@pytest.mark.parametrize("backend, T, V", params(LOGITS_ROWS, ("T", "V"), LOGITS_INTERPRETED))
def test_fused_cross_entropy(backend, T, V):
    """test_fused_cross_entropy (bf16, "mean"; its D axis enters no tensor: each case once)."""
    logits_case(backend, T, V, None)


@pytest.mark.parametrize("backend, T, V", params(LOGITS_ROWS, ("T", "V"), LOGITS_INTERPRETED[:1]))
def test_fused_cross_entropy_softcap(backend, T, V):
    """test_fused_cross_entropy_softcap (softcap 30): kdfast's logits-level loss has no softcap; the test caps the
    logits in float32 as FLA's reference does and passes them (module docstring)."""
    logits_case(backend, T, V, SOFTCAP)


# ---------------------------------------------------------------------------------------------------------------
# tests/modules/test_cross_entropy.py: the fused linear loss
# ---------------------------------------------------------------------------------------------------------------

LINEAR_ROWS = list(itertools.product(T_CE, D_CUT, V_CUT, (1.0, 0.5)))
LINEAR_INTERPRETED = [(512, 1024, 100000, 0.5), (1024, 2048, 32000, 1.0)]
SOFTCAP_ROWS = list(itertools.product(T_CE, D_CUT, V_CUT))


def linear_reference(x, weight, bias, target, do, head):
    """FLA's reference: its logits-level loss (the logits upcast to float32, times logit_scale, softcapped: `head`)
    of the head's bf16 logits F.linear(x, weight, bias), by torch; its loss and gradients under `do`."""
    inputs = leaves("cpu", x, weight, bias)
    loss = F.cross_entropy(head(F.linear(*inputs)), target)
    loss.backward(do)
    return [loss.detach()] + [t.grad for t in inputs]


def linear_case(backend, T, D, V, scale, softcap):
    """FLA's fused linear case: x, target, weight, bias in its order (bf16), "mean", a randn `do`; FLA's reference
    (`linear_reference`), kdfast's logits-level loss on the same logits, then kdfast.linear_cross_entropy: FLA's
    criterion on o, dx, dw, db, then float64's (module docstring)."""
    T, D, V = sequence_length(backend, T), D_CUT[D], V_CUT[V]
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(B * T, D, generator=gen).to(BF16)
    target = shifted_targets(gen, V, T)
    weight = torch.randn(V, D, generator=gen).to(BF16)
    bias = torch.randn(V, generator=gen).to(BF16)

    def head(logits):  # FLA's logits kernel: upcast, times logit_scale, then the softcap
        logits = logits.float() * scale
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

    do = torch.randn((), generator=gen).to(BF16)  # randn_like(ref): ref is float32; cast
    ref = linear_reference(x, weight, bias, target, do, head)

    device = device_for(backend)
    target_d, do_d = target.to(device), do.to(device)
    # FLA's reference with kdfast's logits-level loss in place of FLA's: the test scales (and caps) the logits.
    paired = leaves(device, x, weight, bias)
    paired_logits = head(F.linear(*paired))
    paired_loss = kdfast.cross_entropy(paired_logits, target_d, backend=backend)
    paired_loss.backward(do_d)
    for what, expected, found in zip((" o", "dx", "dw", "db"), ref, [paired_loss] + [t.grad for t in paired]):
        fla_close(f"{what} (kdfast's logits-level loss)", expected, found)
    logits64 = paired_logits.detach().cpu().double()
    check64("kdfast's logits-level loss (float64)", paired_loss, F.cross_entropy(logits64, target), LOSS64_RTOL)

    h, w, b = leaves(device, x, weight, bias)
    tri = kdfast.linear_cross_entropy(h, w, target_d, bias=b, logit_scale=scale, softcap=softcap, chunk_size=CHUNK,
                                      backend=backend)
    assert tri.shape == () and tri.dtype == FP32
    tri.backward(do_d)
    found = [tri, h.grad, w.grad, b.grad]
    assert all(g.dtype == BF16 for g in found[1:])

    inputs64 = leaves("cpu", x.double(), weight.double(), bias.double())
    logits64 = F.linear(*inputs64) * scale
    loss64 = F.cross_entropy(logits64 if softcap is None else softcap * torch.tanh(logits64 / softcap), target)
    loss64.backward(do.double())
    truth = [loss64] + [t.grad for t in inputs64]

    def checks(expected, name=""):
        findings = Findings()
        for what, e, f in zip((" o", "dx", "dw", "db"), expected, found):
            findings.run(fla_close, f"{what}{name}", e, f)
        # bf16: the loss within the larger of bf16's unit roundoff and twice torch's error, the gradients within twice
        # torch's error (FLA's reference computed by torch: bf16 GEMMs, float32 loss).
        for what, f, t, e in zip(("loss", "dx", "dw", "db"), found, truth, expected):
            if what == "loss":
                findings.run(check64, f"loss (float64{name})", f, t, UNIT_ROUNDOFF[BF16], e)
            else:
                findings.run(check64, f"{what} (float64{name})", f, t, GRAD64_RTOL, e, grad_factor(backend))
        return findings.failed

    failed = checks(ref)
    if not failed:
        return
    assert softcap is not None, "\n".join(failed)
    # The known disagreement (ROUNDING_POINTS): every check again, against torch's computation of FLA's reference with
    # kdfast's rounding point; all must pass.
    def kdfast_head(logits):
        return head(logits).to(BF16).float()

    kdfast_points = linear_reference(x, weight, bias, target, do, kdfast_head)
    others = checks(kdfast_points, ", FLA's reference with kdfast's rounding points")
    assert not others, "\n".join(failed + others)
    pytest.xfail("; ".join(failed) + f": {ROUNDING_POINTS}")


@pytest.mark.parametrize("backend, T, D, V, scale", params(LINEAR_ROWS, ("T", "D", "V", "scale"), LINEAR_INTERPRETED))
def test_fused_linear_cross_entropy(backend, T, D, V, scale):
    """test_fused_linear_cross_entropy (bf16, "mean", a bias; its accumulate_grad_in_fp32 axis folded: module
    docstring)."""
    linear_case(backend, T, D, V, scale, None)


@pytest.mark.parametrize("backend, T, D, V", params(SOFTCAP_ROWS, ("T", "D", "V"), [(512, 2048, 100000)]))
def test_fused_linear_cross_entropy_softcap(backend, T, D, V):
    """test_fused_linear_cross_entropy_softcap (softcap 30, bf16, "mean", a bias)."""
    linear_case(backend, T, D, V, 1.0, SOFTCAP)


# ---------------------------------------------------------------------------------------------------------------
# tests/modules/test_kl_div.py
# ---------------------------------------------------------------------------------------------------------------

KL_ROWS = list(itertools.product(T_KL, D_CUT, V_CUT, (FP32, FP16, BF16)))
KL_INTERPRETED = [(16, 1024, 32000, FP16), (16, 2048, 32000, BF16), (16, 1024, 32000, FP32)]


@pytest.mark.parametrize("backend, T, D, V, dtype", params(KL_ROWS, ("T", "D", "V", ""), KL_INTERPRETED))
def test_fused(backend, T, D, V, dtype):
    """test_fused: FusedKLDivLoss("batchmean")(x, target_x, x_weight, target_weight) is
    kdfast.linear_distill_loss(x, x_weight, target_x, target_weight) (forward KL, "mean" over the rows; its
    accumulate_grad_in_fp32 axis folded)."""
    T, D, V = T_KL[T], D_CUT[D], V_CUT[V]
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(B * T, D, generator=gen).to(dtype)
    x_weight = torch.randn(V, D, generator=gen).to(dtype)
    target_x = torch.randn(B * T, D, generator=gen).to(dtype)
    target_weight = torch.randn(V, D, generator=gen).to(dtype)

    def kl_div(x, x_weight, target_x, target_weight):
        return F.kl_div(F.linear(x, x_weight).log_softmax(-1), F.linear(target_x, target_weight).softmax(-1),
                        reduction="batchmean")

    inputs = leaves("cpu", x, x_weight)
    ref = kl_div(*inputs, target_x, target_weight).to(dtype)
    do = torch.randn((), generator=gen, dtype=ref.dtype)  # randn_like(ref)
    ref.backward(do)

    device = device_for(backend)
    h, w = leaves(device, x, x_weight)
    loss = kdfast.linear_distill_loss(h, w, target_x.to(device), target_weight.to(device), divergence="forward_kl",
                                      reduction="mean", chunk_size=CHUNK, backend=backend)
    assert loss.shape == () and loss.dtype == FP32
    tri = loss.to(dtype)
    tri.backward(do.to(device))
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    fla_close("  o", ref, tri)
    fla_close(" dx", inputs[0].grad, h.grad)
    fla_close(" dw", inputs[1].grad, w.grad)

    inputs64 = leaves("cpu", x.double(), x_weight.double())
    loss64 = kl_div(*inputs64, target_x.double(), target_weight.double())
    loss64.backward(do.double())
    if dtype == FP32:
        check64("loss (float64)", loss, loss64, LOSS64_RTOL)
        for what, found, truth in zip(("dx", "dw"), (h, w), inputs64):
            check64(f"{what} (float64)", found.grad, truth.grad, GRAD64_RTOL)
        return
    # 16-bit heads: as the linear cross-entropy's, against torch's computation of FLA's reference, all in the dtype.
    check64("loss (float64)", loss, loss64, UNIT_ROUNDOFF[dtype], ref)
    for what, found, truth, torch_leaf in zip(("dx", "dw"), (h, w), inputs64, inputs):
        check64(f"{what} (float64)", found.grad, truth.grad, GRAD64_RTOL, torch_leaf.grad, grad_factor(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_rejects_trainable_teacher(backend):
    """test_fused_rejects_trainable_teacher: FLA raises RuntimeError("... frozen teacher ...") when the teacher's
    hidden states or head require grad; kdfast raises ValueError naming the tensor (its teacher is a constant)."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 4, generator=gen).to(device)
    weight = torch.randn(8, 4, generator=gen).to(device)
    target_x = torch.randn(2, 4, generator=gen).to(device).requires_grad_(True)
    target_weight = torch.randn(8, 4, generator=gen).to(device)
    with pytest.raises(ValueError, match="teacher_hidden requires grad, but the teacher is a constant"):
        kdfast.linear_distill_loss(x, weight, target_x, target_weight, backend=backend)
    target_x = target_x.detach()
    target_weight = target_weight.requires_grad_(True)
    with pytest.raises(ValueError, match="teacher_weight requires grad, but the teacher is a constant"):
        kdfast.linear_distill_loss(x, weight, target_x, target_weight, backend=backend)
