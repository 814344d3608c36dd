"""flash-attention's tensor-parallel cross-entropy tests (Dao-AILab/flash-attention: tests/losses/
test_cross_entropy_parallel.py, and tests/losses/test_cross_entropy_parallel_large_vocab.py, which the peer removed in
its commit aaa14741, "Simplify the case of large vocab with Tensor Parallel"; ported from its last version) on
`kdfast.CrossEntropyLoss(process_group=...)`, over torch.distributed (gloo, CPU, tests/rank_cases.py). How the peer's
settings map onto kdfast's (logit_scale, precomputed_lse, the z-loss) is in tests/test_flash_attn_peer_cases.py.

The peer's vocab parallelism: each rank holds its contiguous equal shard of the vocabulary's columns (apex's
scatter_to_tensor_model_parallel_region of the full logits), the labels are global ids on every rank, label smoothing
is over the whole vocabulary (its kernel divides by world x shard size) and the z-loss uses the global log-sum-exp:
kdfast's `process_group` with its default `vocab_range` (equal contiguous shards), the same definitions.

Inputs: the peer's, drawn alike on every rank as the peer's seed 0 makes them (here from one CPU generator in the
peer's order; the peer draws on its GPU): logits randn(rows, V) * 10 in the dtype, labels uniform in [0, V), 10 rows
(a permutation's first 10) set to -100, the per-row upstream randn_like(loss). Vocabularies 50264 and 262144 kept,
2 ranks (the peer's world size; shards of 25132 and 131072 columns); the rows cut from the peer's 1024 to 16, and to
12 under Triton's interpreter: 10 of them still ignored.

Expectations: the peer's, reduction="none": each row's loss against torch's per-row cross-entropy with label
smoothing of the upcast (scaled) full logits plus lse_square_scale * lse^2, 0 on ignored rows, at rtol 1e-5, atol
1e-6; this rank's columns of the logits' gradient at the peer's tolerances: test_cross_entropy_parallel.py's rtol 1e-5,
atol 2e-5 for float32, 1e-3, 1e-4 for float16, 1e-2, 3e-3 for bfloat16; the large-vocab file's the same but for
float32's atol, 1e-6. The peer's reference, torch's float32 computation (its gradient cast to the logits' dtype), is
computed in float64 and rounded to float32 and the dtype, as in tests/test_flash_attn_peer_cases.py: torch's float32
backward on the CPU sums the smoothed targets' 262144 weights in float32 and was 2.4e-4 off float64 at the columns
where p is near 1 (V = 262144, smoothing 0.9), past the peer's own 2e-5 and 1e-6 (single-process kdfast: within 2e-7).
The upstream is per row, so the gradient's scale is the peer's whatever the row count: its atol is kept as it is.
Beside them, kdfast against float64 on the same rounded inputs: each row's loss within 1e-6 relative; the gradient
within `grad64_allowance`, its float32 part 1e-5 relative here (p = exp(z - lse) in float32 is good to about 2^-24
|z - lse|, up to 100 with these logits x 10; 5.6e-6 seen), and p below float32's smallest normal number (the far
tail of these logits) allowed to be 0.
With `inplace_backward` the shard passed holds the gradient afterwards; without it, it is left as it was.

Cases: test_cross_entropy_parallel.py's product, vocab x smoothing x logit_scale x inplace_backward x dtype at its
one lse_square_scale, 1e-2 (48, precompute_lse folded), and the large-vocab file's, lse_square_scale x smoothing x
inplace_backward x dtype at V = 262144 and no logit scale (24). Its 12 with lse_square_scale 1e-2 are the parallel
file's V = 262144, logit_scale 1 cases, the same inputs and settings: run once, named for both files and held to both
tolerances (`parallel+large_vocab-*`); 60 cases a backend, on the C++ and PyTorch backends, and under Triton's
interpreter the pairwise rows of them (8, `pairwise`).

Left out: the peer's world_size 1 (commented out in its parametrization; tests/test_flash_attn_peer_cases.py runs
one process), apex's model-parallel state set-up and teardown (kdfast takes the process group itself).
"""

import functools
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases
from test_flash_attn_peer_cases import (
    BF16,
    FP16,
    FP32,
    IGNORE,
    IGNORED_ROWS,
    INTERPRETED,
    LOSS64_TOL,
    as_peers,
    assert_close,
    assert_within,
    float32_error,
    grad64_allowance,
    pairwise,
)

import kdfast

WORLD = 2
ROWS, INTERPRETED_ROWS = 16, 12
DTYPES = (FP16, FP32, BF16)  # the peer's order
PARALLEL_VOCABS, LARGE_VOCAB = (50264, 256 * 1024), 256 * 1024
# Per dtype (rtol, atol) of the gradient: test_cross_entropy_parallel.py's, and the large-vocab file's.
PARALLEL_TOL = {FP32: (1e-5, 2e-5), FP16: (1e-3, 1e-4), BF16: (1e-2, 3e-3)}
LARGE_VOCAB_TOL = {FP32: (1e-5, 1e-6), FP16: (1e-3, 1e-4), BF16: (1e-2, 3e-3)}
PEER_LOSS_TOL = dict(rtol=1e-5, atol=1e-6)  # both files', every dtype
GRAD64_RTOL = 1e-5
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors


def sources(vocab, logit_scale, lse_square_scale) -> tuple:
    """The peer files a case comes from."""
    parallel = lse_square_scale == 1e-2
    large_vocab = vocab == LARGE_VOCAB and logit_scale == 1.0
    return (("parallel",) if parallel else ()) + (("large_vocab",) if large_vocab else ())


def rows_of_peers() -> list:
    """(vocab, smoothing, logit_scale, lse_square_scale, inplace_backward, dtype) of every case, each once, in an
    order that keeps the cases sharing inputs beside one another."""
    parallel = [(vocab, smoothing, scale, 1e-2, inplace, dtype) for vocab, dtype, smoothing, scale, inplace
                in itertools.product(PARALLEL_VOCABS, DTYPES, (0.0, 0.9), (1.0, 0.7), (False, True))]
    large_vocab = [(LARGE_VOCAB, smoothing, 1.0, lse, inplace, dtype) for dtype, lse, smoothing, inplace
                   in itertools.product(DTYPES, (0.0, 1e-2), (0.0, 0.9), (False, True))]
    return list(dict.fromkeys(parallel + large_vocab))


def cases() -> dict:
    """{name: (backend, *row)}: every row on the C++ and PyTorch backends, the pairwise rows under the interpreter."""
    rows = rows_of_peers()
    interpreted = set(pairwise(rows)) if INTERPRETED else set(rows)
    listed = {}
    for row in rows:
        vocab, smoothing, scale, lse, inplace, dtype = row
        for backend in VP_BACKENDS:
            if backend == "triton" and row not in interpreted:
                continue
            name = (f"{'+'.join(sources(vocab, scale, lse))}-{backend}-V{vocab}-smoothing{smoothing:g}-scale{scale:g}-"
                    f"lse_sq{lse:g}-{'' if inplace else 'no_'}inplace-{str(dtype).removeprefix('torch.')}")
            listed[name] = (backend, *row)
    return listed


def peer_draws(rows: int, vocab: int, dtype):
    """The peer's logits (randn * 10 in the dtype), labels (10 ignored) and per-row upstream, in its order."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen, dtype=dtype) * 10
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.randperm(rows, generator=gen)[:IGNORED_ROWS]] = IGNORE
    upstream = torch.randn(rows, generator=gen)
    return logits, labels, upstream


def peer_rows_loss(logits, labels, smoothing, logit_scale, lse_square_scale):
    """The peer's per-row reference in float64: torch's CE (reduction "none", label smoothing) of the upcast, scaled
    full logits, plus lse_square_scale * lse^2, 0 where ignored."""
    scaled = logits.double() * logit_scale
    rows = F.cross_entropy(scaled, labels, ignore_index=IGNORE, label_smoothing=smoothing, reduction="none")
    if lse_square_scale > 0.0:
        rows = rows + lse_square_scale * torch.logsumexp(scaled, dim=-1).square()
    return rows.masked_fill(labels == IGNORE, 0.0)


@functools.lru_cache(maxsize=2)
def expected(rows, vocab, dtype, smoothing, logit_scale, lse_square_scale, truncating):
    """On this rank: the draws, this rank's columns of them, the per-row losses in float64 and as the peer's
    reference holds them, and this rank's columns of the gradient likewise, with its float64 allowance."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = rank * vocab // world, (rank + 1) * vocab // world
    logits, labels, upstream = peer_draws(rows, vocab, dtype)
    leaf = logits.double().requires_grad_(True)
    loss64 = peer_rows_loss(leaf, labels, smoothing, logit_scale, lse_square_scale)
    loss64.backward(upstream.double())
    grad64, loss64 = leaf.grad[:, start:stop], loss64.detach()
    per_row = upstream.double()[:, None]
    lse = torch.logsumexp(logits.double() * logit_scale, dim=-1, keepdim=True)
    weight = per_row.abs() * logit_scale  # d loss / d logits' factor on (p - target) in each row
    float32 = float32_error(grad64, smoothing / vocab * weight, weight * (1 + 2 * lse_square_scale * lse).abs(),
                            rtol=GRAD64_RTOL)
    roundings = 2 if logit_scale == 1.0 else 1  # 16-bit logits given as they are, or float32 ones
    return SimpleNamespace(
        shard=logits[:, start:stop].contiguous(), labels=labels, upstream=upstream, loss64=loss64,
        loss_peer=as_peers(loss64), grad_peer=as_peers(grad64, dtype).float(), grad64=grad64.float(),
        grad64_allowance=grad64_allowance(grad64, dtype, float32, per_row, roundings, truncating).float())


def vp_case(backend, vocab, smoothing, logit_scale, lse_square_scale, inplace_backward, dtype):
    """On a rank: kdfast's per-row losses over this rank's shard against the peer's reference at its tolerances (both
    files' where a case is both's) and against float64, and this rank's gradient likewise (module docstring)."""
    interpreted = backend == "triton" and INTERPRETED
    truth = expected(INTERPRETED_ROWS if interpreted else ROWS, vocab, dtype, smoothing, logit_scale,
                     lse_square_scale, truncating=interpreted)
    module = kdfast.CrossEntropyLoss(label_smoothing=smoothing, z_loss_weight=lse_square_scale, reduction="none",
                                     inplace_backward=inplace_backward, backend=backend,
                                     process_group=dist.group.WORLD)
    leaf = truth.shard.clone().requires_grad_(True)  # the cached draws stay as drawn
    given = leaf if logit_scale == 1.0 else leaf.float() * logit_scale  # the peer's kernel's product
    out = module(given, truth.labels)
    assert out.shape == truth.labels.shape and out.dtype == FP32
    assert_close("per-row loss (peer)", out, truth.loss_peer, **PEER_LOSS_TOL)
    assert_close("per-row loss (float64)", out, truth.loss64, **LOSS64_TOL)

    out.backward(truth.upstream)
    assert leaf.grad.dtype == dtype
    for source in sources(vocab, logit_scale, lse_square_scale):
        rtol, atol = (PARALLEL_TOL if source == "parallel" else LARGE_VOCAB_TOL)[dtype]
        assert_close(f"this rank's gradient ({source})", leaf.grad, truth.grad_peer, rtol=rtol, atol=atol)
    assert_within("this rank's gradient (float64)", leaf.grad, truth.grad64, truth.grad64_allowance)
    if inplace_backward:
        held = given.detach() if logit_scale == 1.0 else (given.detach() * logit_scale).to(dtype)
        assert torch.equal(held, leaf.grad)
    else:
        assert torch.equal(leaf.detach(), truth.shard)


def cases_to_run() -> dict:
    return {name: (vp_case, *args) for name, args in cases().items()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases_to_run, WORLD, tmp_path_factory.mktemp("flash_attn_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_cross_entropy_loss_parallel(outcomes, case):
    """Both peer files' test_cross_entropy_loss_parallel: the case's outcome on every rank."""
    failed = failures(outcomes, case)
    assert not failed, failed
