"""flash-attention's cross-entropy test (Dao-AILab/flash-attention: tests/losses/test_cross_entropy.py, its
`flash_attn.losses.cross_entropy.CrossEntropyLoss`) on `kdfast.CrossEntropyLoss`, every backend. Its tensor-parallel
tests (tests/losses/test_cross_entropy_parallel.py and the removed test_cross_entropy_parallel_large_vocab.py) are
ported in tests/test_flash_attn_peer_cases_vocab_parallel.py.

How flash-attn's settings map onto kdfast's:
- `label_smoothing`, `ignore_index`, `inplace_backward`, `reduction`: kdfast's settings of the same names, with the
  same meaning (torch's label smoothing over the whole vocabulary; "mean" over the kept rows).
- `lse_square_scale` (z-loss, lse(logits)^2 added per kept row and reduced as the loss): kdfast's `z_loss_weight`.
- `return_z_loss=True` returns (loss, z_loss) with z_loss = lse_square_scale * lse^2 reduced as the loss, for logging
  only (no gradient): kdfast's `return_components=True` returns (loss, kdfast.LossComponents), whose `z_loss` is lse^2
  before its weight, reduced as the loss and detached: the peer's z_loss is `z_loss_weight * parts.z_loss`. Where the
  weight is 0 the peer returns zeros and kdfast None (it does not compute it); asserted as such.
- `logit_scale` (the peer's kernel multiplies the float32-upcast logits by it before everything else): kdfast's logits
  form has no such setting and takes the logits as they are (its fused linear form folds a logit scale into its GEMM).
  The port passes `logits.float() * logit_scale`, the peer's own upcast product, so that kdfast sees the logits the
  peer's kernel sees (the product rounded to bfloat16 moves the loss by 3e-5 relative, past the peer's 1e-5); the
  gradient reaches the 16-bit leaf through autograd's product, rounded once to its dtype as the peer's kernel stores
  it. With `inplace_backward` kdfast writes the gradient over that float32 product's storage.
- `precomputed_lse`: kdfast takes none (it computes the log-sum-exp in its one pass). The peer passes it only where
  logit_scale is 1 and smoothing 0 (it skips the other cases), and there its result is the one without it: those
  cases are the precompute_lse=False ones, run once.

Inputs: the peer's draws in its order from one CPU generator seeded 0 (the peer seeds 0 and draws on its GPU: other
numbers): logits randn(rows, V) in the dtype, labels uniform in [0, V), then 10 rows (a permutation's first 10) set
to -100 when there are more than 10 rows, then the upstream gradient randn_like(loss). Vocabularies 50257 and 128256
kept (the peer's "larger than 64k" split); the rows cut from the peer's 1024 to 16384 (by dtype and setting, sized to
its GPU's memory) to 24 (14 kept), and to 12 under Triton's interpreter (about 75 ms a row off a GPU).

Expectations: the peer's. The loss against torch's cross-entropy with label smoothing of the upcast (scaled) logits
plus lse_square_scale * mean(lse^2) over the kept rows at rtol 1e-5, atol 1e-6 for every dtype; the returned z-loss
and the logits' gradient at rtol 1e-5, atol 1e-6 for float32 and 1e-3, 1e-4 for float16 and bfloat16. The peer's
reference is that computation in float32 (its gradient then cast to the logits' dtype); here it is computed in
float64 and rounded to float32 and to the dtype, the values the peer's GPU reference approximates to float32's
rounding: torch's float32 cross-entropy on the CPU sums the smoothed targets' V weights in float32 in its backward and
was 2.4e-4 off float64 at V = 262144 (tests/test_flash_attn_peer_cases_vocab_parallel.py), past the peer's 2e-5.
The gradient's atol is scaled by the peer's kept rows over the 14 kept here: the entries are upstream x
(p - target) / kept rows, 72 to 1170 times larger here than at the peer's 1014 to 16374 kept rows, and the atol
scaled by the same ratio means what it means there (rtol kept). Unscaled, kdfast's bfloat16 gradient fails it at
some label columns: kdfast stores its gradient in the logits' dtype in the forward and multiplies it by the upstream
in the backward, two roundings where the peer's kernel rounds once, one bfloat16 unit (9.8e-4 at 0.195) from the peer's
reference against its 3e-4 (within the peer's tolerance at its own shape: checked once at 4096 x 128256).
Beside them, kdfast against float64 on the same rounded inputs: the loss and z-loss within 1e-6 relative; the
gradient within 4e-6 relative of each entry and of the label smoothing's term it cancels (float32 statistics), p
below float32's smallest normal number allowed to be 0, plus for 16-bit logits half a unit of the dtype at each of
kdfast's roundings (`grad64_allowance`; a whole unit at the first under Triton's interpreter, which converts float32
to bfloat16 by truncation where a GPU rounds to nearest). With `inplace_backward` the logits passed hold the gradient
afterwards; without it they are left as they were.

Cases: the peer's product, vocab x smoothing x logit_scale x lse_square_scale x return_z_loss x inplace_backward x
dtype (192 once precompute_lse is folded), on the C++ backend; on the PyTorch backend and under Triton's interpreter
9 of its rows in which every pair of values of any two axes meets (`pairwise`); every row where a GPU runs Triton and
CUDA.

Left out: nothing else; the peer's file has this one test.
"""

import functools
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for

import kdfast

IGNORE = -100
FP16, FP32, BF16, F64 = torch.float16, torch.float32, torch.bfloat16, torch.float64
INTERPRETED = not torch.cuda.is_available()
ROWS, INTERPRETED_ROWS, IGNORED_ROWS = 24, 12, 10
AXES = dict(vocab=(50257, 128256), smoothing=(0.0, 0.9), logit_scale=(1.0, 0.7), lse_square_scale=(0.0, 1e-2),
            return_z_loss=(False, True), inplace_backward=(False, True), dtype=(FP16, FP32, BF16))
# The peer's: the loss for every dtype; the z-loss and the gradient by dtype.
PEER_LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
PEER_TOL = {FP32: dict(rtol=1e-5, atol=1e-6), FP16: dict(rtol=1e-3, atol=1e-4), BF16: dict(rtol=1e-3, atol=1e-4)}
# kdfast's float32 statistics against float64 on the same inputs (module docstring): the loss and z-loss relative,
# the gradient relative to its size plus that of the label smoothing's term.
LOSS64_TOL = dict(rtol=1e-6, atol=0.0)
GRAD64_RTOL = 4e-6
MANTISSA_BITS = {FP16: 10, BF16: 7}


def pairwise(rows: list) -> list:
    """Some of `rows` (tuples, one value an axis) in which every pair of values of any two axes that `rows` hold meets:
    chosen greedily, each time the first row that meets the most pairs not yet met."""

    def pairs(row):
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}

    unmet, chosen = set().union(*map(pairs, rows)), []
    while unmet:
        best = max(rows, key=lambda row: len(pairs(row) & unmet))
        chosen.append(best)
        unmet -= pairs(best)
    return chosen


def case_id(backend, vocab, smoothing, logit_scale, lse_square_scale, return_z_loss, inplace_backward, dtype):
    return (f"{backend}-V{vocab}-smoothing{smoothing:g}-scale{logit_scale:g}-lse_sq{lse_square_scale:g}-"
            f"{'' if return_z_loss else 'no_'}return_z_loss-{'' if inplace_backward else 'no_'}inplace-"
            f"{str(dtype).removeprefix('torch.')}")


def cases() -> list:
    """The product with the inputs' axes outermost and the backend innermost, so that consecutive cases share the
    cached inputs and expectations (`expected`); its pairwise rows on the torch backend and under Triton's interpreter
    (CI's time: the C++ backend, the CPU's default, and a GPU's backends run the whole product)."""
    product = list(itertools.product(*AXES.values()))
    covering = pairwise(product)
    listed = []
    for row in sorted(product, key=lambda r: (r[0], str(r[6]), *r[1:6])):
        for backend in BACKENDS:
            if (backend == "torch" or (backend == "triton" and INTERPRETED)) and row not in covering:
                continue
            listed.append(pytest.param(backend, *row, id=case_id(backend, *row)))
    return listed


def peer_rows(dtype, logit_scale, lse_square_scale) -> int:
    """The peer's batch_size * seqlen: 1 or 4 sequences (float32 or not), of 4096 tokens or 1024 (with a z-loss or a
    logit scale)."""
    return (1 if dtype == FP32 else 4) * (4096 if lse_square_scale == 0.0 and logit_scale == 1.0 else 1024)


def rows_for(backend: str) -> int:
    return INTERPRETED_ROWS if backend == "triton" and INTERPRETED else ROWS


def peer_draws(rows: int, vocab: int, dtype):
    """The peer's logits, labels (10 ignored when there are more than 10 rows) and upstream gradient, in its order."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if rows > IGNORED_ROWS:
        labels[torch.randperm(rows, generator=gen)[:IGNORED_ROWS]] = IGNORE
    upstream = torch.randn((), generator=gen)
    return logits, labels, upstream


def peer_loss(logits, labels, smoothing, logit_scale, lse_square_scale):
    """The peer's reference in float64: torch's CE with label smoothing of the upcast (scaled) logits, plus
    lse_square_scale times the kept rows' mean lse^2; returns (loss, z-loss or None)."""
    scaled = logits.double()
    if logit_scale != 1.0:
        scaled = scaled * logit_scale
    loss = F.cross_entropy(scaled, labels, ignore_index=IGNORE, label_smoothing=smoothing)
    if lse_square_scale == 0.0:
        return loss, None
    z_loss = lse_square_scale * torch.logsumexp(scaled, dim=-1)[labels != IGNORE].square().mean()
    return loss + z_loss, z_loss


def as_peers(value64, dtype=FP32):
    """A float64 expectation as the peer's float32 reference holds it: rounded to float32, and a gradient to the
    logits' dtype (module docstring)."""
    return value64.float().to(dtype).double()


@functools.lru_cache(maxsize=2)
def expected(rows, vocab, dtype, smoothing, logit_scale, lse_square_scale, truncating):
    """The draws; the loss, z-loss and gradient (of the loss times the upstream) in float64 and as the peer's
    reference holds them; each gradient entry's allowances (`truncating`: Triton's interpreter, `grad64_allowance`).
    Cached: the cases beside one another share their inputs."""
    logits, labels, upstream = peer_draws(rows, vocab, dtype)
    leaf = logits.double().requires_grad_(True)
    loss64, z64 = peer_loss(leaf, labels, smoothing, logit_scale, lse_square_scale)
    loss64.backward(upstream.double())
    grad64, loss64 = leaf.grad, loss64.detach()
    z64 = None if z64 is None else z64.detach()
    grad_peer = as_peers(grad64, dtype)
    kept = int((labels != IGNORE).sum())
    # The peer's atol at its gradient's scale, 1 / its kept rows (module docstring).
    peer_atol = PEER_TOL[dtype]["atol"] * (peer_rows(dtype, logit_scale, lse_square_scale) - IGNORED_ROWS) / kept
    lse = torch.logsumexp(logits.double() * logit_scale, dim=-1, keepdim=True)
    weight = abs(upstream.item()) * logit_scale / kept  # d loss / d logits' factor on (p - target) in a row
    float32 = float32_error(grad64, smoothing / vocab * weight, weight * (1 + 2 * lse_square_scale * lse).abs())
    roundings = 2 if logit_scale == 1.0 else 1  # 16-bit logits given as they are, or float32 ones (docstring)
    return SimpleNamespace(
        logits=logits, labels=labels, upstream=upstream, loss64=loss64, z64=z64, loss_peer=as_peers(loss64),
        z_peer=None if z64 is None else as_peers(z64), grad_peer=grad_peer.float(),
        grad_peer_allowance=(peer_atol + PEER_TOL[dtype]["rtol"] * grad_peer.abs()).float(), grad64=grad64.float(),
        grad64_allowance=grad64_allowance(grad64, dtype, float32, upstream.item(), roundings, truncating).float())


def spacing(values, dtype):
    """The distance between consecutive `dtype` numbers at each of `values` (float64), subnormals included."""
    magnitude = values.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - MANTISSA_BITS[dtype])


def float32_error(grad64, cancelling, p_factor, rtol=GRAD64_RTOL):
    """The error of kdfast's float32 statistics: `rtol` of each gradient entry and of `cancelling` (the label
    smoothing's term in it, which p cancels), and float32's smallest normal number times `p_factor` (the entry's
    factor on p: upstream x logit_scale x (1 + 2 lse_square_scale lse) / kept rows), below which p may be 0."""
    return rtol * (grad64.abs() + cancelling) + p_factor * torch.finfo(FP32).tiny


def grad64_allowance(grad64, dtype, float32, upstream, roundings, truncating):
    """How far kdfast's gradient may be from float64's: `float32` (`float32_error`), then for 16-bit logits its
    `roundings` to the dtype, each half a unit (module docstring): the gradient kdfast stores in the forward, at
    grad64 / upstream, and its product with the upstream; or autograd's one cast of float32 logits' gradient.
    Triton's interpreter truncates float32 to bfloat16 (a GPU rounds to nearest): a whole unit for the stored
    gradient there. `upstream` may be per row ([N, 1])."""
    if dtype == FP32:
        return float32
    final = 0.5 * spacing(grad64, dtype)
    if roundings == 1:
        return float32 + final
    stored_units = 1.0 if dtype == BF16 and truncating else 0.5
    return float32 + final + stored_units * abs(upstream) * spacing(grad64 / abs(upstream), dtype)


def assert_within(what, found, expected, allowance):
    """|found - expected| <= allowance everywhere (allclose's test with a per-entry allowance). In float32 for the
    [N, V] tensors (cheaper; the expectations rounded to float32 are within 2^-24 of float64's, far inside every
    allowance), float64 for the scalars."""
    found = found.detach().cpu().to(expected.dtype)
    excess = (found - expected).abs_().sub_(allowance).reshape(-1)
    if excess.max() <= 0:
        return
    worst = int(excess.argmax())
    raise AssertionError(
        f"{what}: {found.reshape(-1)[worst].item()!r} against {expected.reshape(-1)[worst].item()!r} at "
        f"{divmod(worst, found.shape[-1]) if found.dim() else ()}, beyond its allowance by {excess[worst].item():.3g}")


def assert_close(what, found, expected, rtol, atol):
    assert_within(what, found, expected, atol + rtol * expected.abs())


@pytest.mark.parametrize(
    "backend, vocab, smoothing, logit_scale, lse_square_scale, return_z_loss, inplace_backward, dtype", cases())
def test_cross_entropy_loss(backend, vocab, smoothing, logit_scale, lse_square_scale, return_z_loss,
                            inplace_backward, dtype):
    """test_cross_entropy_loss: kdfast's loss, returned z-loss and logits' gradient against the peer's reference at
    its tolerances and against float64 (module docstring)."""
    truth = expected(rows_for(backend), vocab, dtype, smoothing, logit_scale, lse_square_scale,
                     truncating=backend == "triton" and INTERPRETED)
    device = device_for(backend)
    module = kdfast.CrossEntropyLoss(label_smoothing=smoothing, z_loss_weight=lse_square_scale,
                                     return_components=return_z_loss, inplace_backward=inplace_backward,
                                     backend=backend)
    leaf = truth.logits.clone().to(device).requires_grad_(True)  # the cached draws stay as drawn
    given = leaf if logit_scale == 1.0 else leaf.float() * logit_scale  # the peer's kernel's product (docstring)
    out = module(given, truth.labels.to(device))
    if return_z_loss:
        out, parts = out
        if lse_square_scale == 0.0:
            assert parts.z_loss is None  # the peer's zeros: not computed
        else:
            assert not parts.z_loss.requires_grad  # the peer's is for logging: no gradient
            z_loss = lse_square_scale * parts.z_loss
            assert_close("z-loss (peer)", z_loss, truth.z_peer, **PEER_TOL[dtype])
            assert_close("z-loss (float64)", z_loss, truth.z64, **LOSS64_TOL)
    assert out.shape == () and out.dtype == FP32
    assert_close("loss (peer)", out, truth.loss_peer, **PEER_LOSS_TOL)
    assert_close("loss (float64)", out, truth.loss64, **LOSS64_TOL)

    out.backward(truth.upstream.to(device))
    assert leaf.grad.dtype == dtype
    assert_within("gradient (peer)", leaf.grad, truth.grad_peer, truth.grad_peer_allowance)
    assert_within("gradient (float64)", leaf.grad, truth.grad64, truth.grad64_allowance)
    # In place, the logits given hold their gradient (the leaf's, or the leaf's before autograd's product with the
    # scale and its rounding to the dtype); otherwise the leaf is untouched.
    if inplace_backward:
        held = given.detach() if logit_scale == 1.0 else (given.detach() * logit_scale).to(dtype)
        assert torch.equal(held, leaf.grad)
    else:
        assert torch.equal(leaf.detach().cpu(), truth.logits)
