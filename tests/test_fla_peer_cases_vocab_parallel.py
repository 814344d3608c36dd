"""flash-linear-attention's vocab-parallel fused linear cross-entropy test (fla-org/flash-linear-attention, FLA:
tests/modules/test_cross_entropy_parallel.py, its version of commit 6a9fcbd6; a pull request's file, not in FLA's main
history as of 2026-08-22) on kdfast.linear_cross_entropy(process_group=...), over torch.distributed (gloo, CPU,
tests/rank_cases.py). Its other fused-loss tests, and how FLA's settings map onto kdfast's, are in
tests/test_fla_peer_cases.py.

How FLA's vocab parallelism maps onto kdfast: FusedLinearCrossEntropyLoss(process_group=, reduction=, label_smoothing=,
logit_scale=, logit_softcapping=)(x, target, local_weight, local_bias), each rank holding rows [rank * local_vocab,
(rank + 1) * local_vocab) of the head and bias, x and the global targets the same on every rank:
kdfast.linear_cross_entropy(x, local_weight, target, bias=local_bias, label_smoothing=, logit_scale=, softcap=,
reduction=, process_group=) with its default vocab_range (equal contiguous shards in rank order) and
reduce_hidden_grad=True (d x summed over the ranks: FLA's expected d x is the full reference's). FLA's world sizes 1, 2
and 4 (one NCCL spawn each) run here in one spawn of 4 ranks: the 1- and 2-rank groups are gloo sub-groups of its first
ranks, whose other ranks skip those cases.

Inputs: FLA's, in its order of draws (seed 42; FLA draws on its GPU, here from a CPU generator): x randn(1, N, H) in the
dtype, weight randn(V, H) / sqrt(H) in float32 cast, the bias randn(V) in the dtype for the options with one, targets
randint(V, (1, N)) with every 7th -100 and the first four the shards' edges (0, local_vocab - 1, local_vocab, V - 1),
the vocabulary V being world x local_vocab. Options: "plain" (no bias); "combined" (a bias, label smoothing 0.1,
logit_scale 0.3, softcap 3); "ignored" (every target -100); "confident" (bf16, "mean", local_vocab 67: x one-hot in
column 0, the last head row 12 there, every target V - 1, the label's probability about 0.998). H 64 kept; N 63 cut to
21 (the group's first rank computes the full-vocabulary reference and its float64 twin and sends them to the others;
4 ranks on 2 cores); local_vocab 67 and 4103 kept, 65539 cut to 8195 (past a power of two by 3 as FLA's is, 3 of
kdfast's Triton kernel's 4096-column blocks).

Expectations: FLA's: the loss and the gradients of twice it finite, and FLA's assert_close (ratio 1e-2, err_atol 1e-6, 0
for "confident") on the loss, d x and this rank's rows of d weight and d bias against FLA's reference, torch's
cross-entropy of the head's logits computed in the dtype, upcast, scaled, capped and smoothed; with every row ignored
FLA's reference is 0 and so are its gradients: kdfast's are held to exactly 0. Beside them, float64 on the same inputs
as in tests/test_fla_peer_cases.py; for bf16 d x on more than one rank torch's error is that of the ranks' sum as kdfast
forms it, each shard's product and their sum in bf16 (`sharded_dx`; kdfast's all-reduce sums bf16 partials, FLA's
reference has one GEMM). Where a bf16 case with a softcap fails only by kdfast's rounding point (ROUNDING_POINTS in
tests/test_fla_peer_cases.py: the capped logits kept in bf16), which every check then confirms against FLA's
reference with it, it is xfailed; the ranks report it as a KnownDisagreement.

Cases: FLA's product, world x local_vocab x dtype x option x reduction, and its "confident" case on each world size: on
the C++ backend every row but those of the largest shards on 4 ranks, of which 3 (each value of the other axes once:
`LARGEST_ON_4`); on the PyTorch backend the rows in which every pair of values of any two axes meets (`pairwise`) and
"confident"; under Triton's interpreter the pairwise rows of local_vocab 67. Not "confident" there: its gradient is one
value repeated over identical rows, which the interpreter truncates where a GPU rounds (0.40% from float64 in d weight
against torch's chance 0.083%).

Left out: FLA's "l2" and "l2_tie" options (use_l2warp, l2_penalty_factor: FLA's L2Wrap, a penalty on each row's largest
logit added in backward; kdfast has none); the allow_reduced_precision axis of its version of commit 3060ab67 (a CUDA
matmul setting); test_fused_linear_cross_entropy_parallel_ascend_rejection (FLA's Ascend backend).
"""

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases
from test_fla_peer_cases import (
    FLA_RATIO,
    GRAD64_RTOL,
    LOSS64_RTOL,
    ROUNDING_POINTS,
    UNIT_ROUNDOFF,
    Findings,
    check64,
    fla_close,
    grad_factor,
)
from test_flash_attn_peer_cases import pairwise

import kdfast

BF16, FP32 = torch.bfloat16, torch.float32
IGNORE = -100
INTERPRETED = not torch.cuda.is_available()
WORLD = 4  # one spawn; the world sizes 1 and 2 run on sub-groups of its first ranks
WORLDS = (1, 2, 4)
N, H = 21, 64
LOCAL_VOCABS = {67: 67, 4103: 4103, 65539: 8195}  # FLA's, and the ones run here (module docstring)
OPTIONS = ("plain", "combined", "ignored")
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors
# FLA's product, and its one extra case.
ROWS = list(itertools.product(WORLDS, LOCAL_VOCABS, (BF16, FP32), OPTIONS, ("mean", "sum")))
CONFIDENT = [(world, 67, BF16, "confident", "mean") for world in WORLDS]
# The C++ backend runs every row but FLA's largest shards on 4 ranks, where these (every value of the other axes).
LARGEST_ON_4 = [(4, 65539, BF16, "combined", "mean"), (4, 65539, FP32, "plain", "sum"),
                (4, 65539, BF16, "ignored", "sum")]
CPP_ROWS = {row for row in ROWS if row[:2] != (4, 65539)} | set(LARGEST_ON_4) | set(CONFIDENT)
PYTORCH_ROWS = set(pairwise(ROWS)) | set(CONFIDENT)
INTERPRETED_ROWS = set(pairwise([row for row in ROWS if row[1] == 67]))  # (module docstring)


def case_name(backend, world, local_vocab, dtype, option, reduction) -> str:
    return f"{backend}-world{world}-local_vocab{local_vocab}-{str(dtype).removeprefix('torch.')}-{option}-{reduction}"


def cases() -> dict:
    """{name: (backend, *row)}: FLA's rows (the inputs' axes outer, so that the backends of a row share its cached
    reference), every row on the C++ backend, `PYTORCH_ROWS` on PyTorch's, `INTERPRETED_ROWS` under the interpreter."""
    listed = {}
    for row in ROWS + CONFIDENT:
        for backend in VP_BACKENDS:
            if backend == "torch" and row not in PYTORCH_ROWS or backend == "cpu" and row not in CPP_ROWS:
                continue
            if backend == "triton" and INTERPRETED and row not in INTERPRETED_ROWS:
                continue
            listed[case_name(backend, *row)] = (backend, *row)
    return listed


def fla_draws(world, local_vocab, dtype, option):
    """FLA's inputs, in its order of draws (seed 42): x [1, N, H] in the dtype, weight randn(V, H) / sqrt(H) cast,
    the bias where the option has one, targets with every 7th -100 and the first four at the shards' edges; then the
    option's changes. Returns x, weight, bias or None, target, and FLA's settings for the option."""
    V = world * local_vocab
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(1, N, H, generator=gen, dtype=dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=gen, dtype=dtype) if option == "combined" else None
    target = torch.randint(V, (1, N), generator=gen)
    target[:, ::7] = IGNORE
    target[0, :4] = torch.tensor([0, local_vocab - 1, min(local_vocab, V - 1), V - 1])
    if option == "ignored":
        target.fill_(IGNORE)
    if option == "confident":
        x.zero_()
        x[..., 0] = 1
        weight.zero_()
        weight[-1, 0] = 12
        target.fill_(V - 1)
    settings = dict(label_smoothing=0.1, logit_scale=0.3, softcap=3.0) if option == "combined" else {}
    return x, weight, bias, target, settings


def reference(x, weight, bias, target, settings, reduction, precision, kdfast_points=False):
    """FLA's reference: the head's logits in the inputs' dtype (`precision` float64: the truth), upcast, times
    logit_scale, softcapped, torch's cross-entropy with label smoothing; 0 with every row ignored. The loss, the
    gradients of twice it (FLA's upstream) for x, weight and the bias, and for the head's logits (in `precision`).
    `kdfast_points`: the capped logits rounded to the dtype, as kdfast's 16-bit chunk keeps them (ROUNDING_POINTS)."""
    wide = torch.float64 if precision == torch.float64 else FP32
    inputs = [t.detach().to(precision).requires_grad_(True) for t in (x, weight, bias) if t is not None]
    raw = F.linear(*inputs)
    logits = raw.to(wide) * settings.get("logit_scale", 1.0)
    if "softcap" in settings:
        logits = settings["softcap"] * torch.tanh(logits / settings["softcap"])
        if kdfast_points:
            logits = logits.to(x.dtype).to(wide)
    if (target == IGNORE).all():
        loss = logits.sum() * 0
    else:
        smoothing = settings.get("label_smoothing", 0.0)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=smoothing, reduction=reduction)
    *grads, d_raw = torch.autograd.grad(loss * 2, [*inputs, raw])
    return [loss.detach(), *grads], d_raw


def sharded_dx(d_raw, weight, world, local_vocab):
    """torch's d x as the ranks form it: each shard's product in the dtype, the ranks' sum in the dtype."""
    total = None
    for rank in range(world):
        rows = slice(rank * local_vocab, (rank + 1) * local_vocab)
        part = d_raw[..., rows] @ weight[rows]
        total = part if total is None else total + part
    return total


def expected(world, local_vocab, dtype, option, reduction):
    """The draws, FLA's reference (float32 on the dtype's logits) and float64's; and torch's d x summed over the
    shards in the dtype (`sharded_dx`)."""
    x, weight, bias, target, settings = fla_draws(world, local_vocab, dtype, option)
    args = (x, weight, bias, target, settings, reduction)
    ref, d_raw = reference(*args, dtype)
    return args, ref, reference(*args, torch.float64)[0], sharded_dx(d_raw, weight, world, local_vocab)


@functools.lru_cache(maxsize=1)
def expected_on_the_group(world, *row):
    """`expected`, shared by a row's backends, computed by the group's first rank and sent to the others: each rank
    computing the same references was most of this file's time (4 ranks on 2 cores). Its exception, if any, is sent
    too, so that no rank waits for a result that will not come."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = expected(world, *row)
        except Exception as error:  # noqa: BLE001 (re-raised on every rank)
            box[0] = error
    if world > 1:
        dist.broadcast_object_list(box, src=0, group=GROUPS[world])
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def vp_case(backend, world, local_vocab, dtype, option, reduction):
    """On the ranks of a `world`-rank group: kdfast.linear_cross_entropy over this rank's rows of the head (and bias),
    d x summed over the ranks; FLA's criterion against its reference (the loss, d x, and this rank's rows of d weight
    and d bias), then float64's (module docstring)."""
    group = GROUPS[world]
    if dist.get_rank() >= world:
        return
    rank = dist.get_rank(group)
    args, ref, truth, torch_dx = expected_on_the_group(world, local_vocab, dtype, option, reduction)
    x, weight, bias, target, settings = args[:5]
    start, end = rank * local_vocab, (rank + 1) * local_vocab
    device = device_for(backend)
    local = [x.clone(), weight[start:end].clone()] + ([bias[start:end].clone()] if bias is not None else [])
    local = [t.to(device).requires_grad_(True) for t in local]
    local_bias = local[2] if bias is not None else None
    tri = kdfast.linear_cross_entropy(local[0], local[1], target.to(device), bias=local_bias,
                                      logit_scale=settings.get("logit_scale", 1.0), softcap=settings.get("softcap"),
                                      label_smoothing=settings.get("label_smoothing", 0.0), reduction=reduction,
                                      backend=backend, process_group=group)
    assert tri.shape == () and tri.dtype == FP32
    found = [tri, *torch.autograd.grad(tri * 2, local)]
    for value in found:
        assert torch.isfinite(value).all()

    def mine(values):  # the loss, the whole d x, and this rank's rows of d weight and d bias
        return [values[0], values[1]] + [v[start:end] for v in values[2:]]

    names = ("loss", "dx", "dw", "db")
    if option == "ignored":  # FLA's reference: 0, and no gradient; kdfast's exactly so
        for what, value in zip(names, found):
            assert not value.any(), f"{what}: not 0 with every row ignored"
        return
    err_atol = 0.0 if option == "confident" else 1e-6  # FLA's

    def checks(reference_values, sharded, name=""):
        findings = Findings()
        for what, e, f in zip(names, mine(reference_values), found):
            findings.run(fla_close, f"{what}{name}", e, f, FLA_RATIO, err_atol)
        # 16-bit: against torch's error as in tests/test_fla_peer_cases.py; for d x, torch's sum over the shards in
        # the dtype, as the ranks' all-reduce sums kdfast's (world > 1).
        for what, e, t, f in zip(names, mine(reference_values), mine(truth), found):
            if dtype == FP32:
                findings.run(check64, f"{what} (float64)", f, t, LOSS64_RTOL if what == "loss" else GRAD64_RTOL)
            elif what == "loss":
                findings.run(check64, f"loss (float64{name})", f, t, UNIT_ROUNDOFF[BF16], e)
            else:
                findings.run(check64, f"{what} (float64{name})", f, t, GRAD64_RTOL, sharded if what == "dx" else e,
                             grad_factor(backend))
        return findings.failed

    failed = checks(ref, torch_dx)
    if not failed:
        return
    if dtype == FP32 or "softcap" not in settings:
        raise AssertionError("\n".join(failed))
    # kdfast's 16-bit rounding point (ROUNDING_POINTS): every check again against the reference with it.
    points, d_raw = reference(*args, dtype, kdfast_points=True)
    others = checks(points, sharded_dx(d_raw, weight, world, local_vocab),
                    ", FLA's reference with kdfast's rounding points")
    assert not others, "\n".join(failed + others)
    raise KnownDisagreement("; ".join(failed) + f": {ROUNDING_POINTS}")


class KnownDisagreement(Exception):
    """Raised on a rank for a case that fails only by ROUNDING_POINTS: the test then xfails with its text."""


GROUPS = {}


def cases_to_run() -> dict:
    """On each rank: the sub-groups of the world sizes (made by every rank, in one order), then the cases."""
    GROUPS.update({world: dist.new_group(list(range(world))) for world in WORLDS if world < WORLD})
    GROUPS[WORLD] = dist.group.WORLD
    return {name: (vp_case, *args) for name, args in cases().items()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases_to_run, WORLD, tmp_path_factory.mktemp("fla_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_fused_linear_cross_entropy_parallel(outcomes, case):
    """test_fused_linear_cross_entropy_parallel's case, its outcome on every rank of its group."""
    failed = failures(outcomes, case)
    texts = [results[case] for results in outcomes if results[case] is not None]
    known = f"{KnownDisagreement.__name__}: "
    if texts and all(known in text for text in texts):
        pytest.xfail(texts[0].rsplit(known, 1)[1].strip())
    assert not failed, failed
