"""Cut Cross-Entropy's vocab-parallel cases (apple/ml-cross-entropy: tests/test_vocab_parallel.py) on kdfast's
vocab-parallel fused linear CE term, over torch.distributed (gloo, CPU); its other cases are in
tests/test_cce_peer_cases.py, whose module docstring says how CCE's arguments map onto kdfast's.

How CCE's vocab parallelism maps onto kdfast:
- CCE's `VocabParallelOptions.from_vocab(V)` gives rank r the contiguous range of its `partition_n_into_range(V, r,
  world)`: V // world tokens each, one more on the first V % world ranks. kdfast takes each rank's range as
  `vocab_range` beside the `process_group`; its default (equal shards) needs V to be a multiple of the world, which
  CCE's 507 over 4 ranks is not, so the ranges are computed here as CCE's helper computes them (127, 127, 127, 126).
- `reduce_e_grad=True` (CCE's default: d e summed over the ranks) is kdfast's `reduce_hidden_grad=True` (its
  default): every rank gets the whole d e.
- kdfast's counterpart of CCE's function is `kdfast.linear_cross_entropy` (no teacher).
- CCE's z-loss (`return_lse=True`, then `compute_z_loss(lse, targets)`, added to the "mean" loss) is kdfast's
  `z_loss_weight=1` under "mean": the same objective.

Inputs: CCE's. (N, V, D) = (252, 507, 123), e = randn(N, D) / sqrt(D) and c = randn(V, D) drawn in the dtype, targets
uniform in [0, V) with 20% (a permutation's first fifth) set to -100 when ignored rows are asked for, e viewed as 4
sequences; 4 ranks. Every rank draws them from the same generator seeded 0 (CCE broadcasts rank 0's).

Expectations: CCE's. Each rank's vocab-parallel call and the full-vocabulary call on the same rank (the same
backend: CCE compares each implementation with itself) give the same gradients, this rank's rows of d c and the
whole d e, within `allclose(atol=tol)` (rtol 1e-5): tol 1e-3 for float16, 1e-2 for bfloat16, and here 1e-5 for
float32, which CCE does not run. The loss is compared the same way (CCE reads the gradients alone).

Cases: CCE's product, dtype x ignored rows x z-loss, with float32 added and every backend that runs on the CPU in
place of CCE's impl axis ("torch_compile", "cce_exact"); 4 ranks (CCE's nprocs). Under Triton's interpreter (about
a second a case on each rank) the rows are cut to 12 (4 sequences of 3) and half the product runs: each dtype with and
without ignored rows, the z-loss on with them for float32 and bfloat16 and without them for float16, so that every
pair of values of any two axes still meets.

Not ported: test_partition_n_into_range, a test of CCE's helper that computes the ranges: kdfast has none (the caller
passes each rank's `vocab_range`, or takes the default equal shards); its formula is `cce_range` here, and every case
passes the ranges it gives to kdfast, which checks that they tile the vocabulary (it raises otherwise). CCE's skip of
its "cce" impl without CUDA (every backend here runs on the CPU).
"""

import itertools

import pytest
import torch
import torch.distributed as dist
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases

import kdfast

IGNORE = -100
WORLD = 4
SHAPE = (252, 507, 123)
INTERPRETED = not torch.cuda.is_available()
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors


def cce_range(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """CCE's partition: contiguous, the first vocab % world ranks one token more."""
    size, extra = divmod(vocab, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def cases() -> dict:
    listed = {}
    for backend in VP_BACKENDS:
        for i, (dtype, ignored, z_loss) in enumerate(itertools.product(TOLERANCE, (False, True), (True, False))):
            if backend == "triton" and INTERPRETED and (i // 4 + ignored + z_loss) % 2:
                continue  # the interpreter's half (module docstring)
            name = (f"{str(dtype).removeprefix('torch.')}-{'ignored' if ignored else 'no_ignored'}-"
                    f"{'z_loss' if z_loss else 'no_z_loss'}-{backend}")
            listed[name] = (backend, dtype, ignored, z_loss)
    return listed


def _linear_ce(e, c, targets, settings, **group):
    return kdfast.linear_cross_entropy(e, c, targets, **settings, **group)


def vp_case(backend, dtype, ignored, z_loss):
    rank, world = dist.get_rank(), dist.get_world_size()
    n, v, d = SHAPE
    if backend == "triton" and INTERPRETED:
        n = 12
    gen = torch.Generator().manual_seed(0)
    e = torch.randn((n, d), generator=gen, dtype=dtype) / d**0.5
    c = torch.randn((v, d), generator=gen, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignored:
        targets[torch.randperm(n, generator=gen)[: int(0.2 * n)]] = IGNORE
    e, targets = e.view(4, -1, d), targets.view(4, -1)
    start, stop = cce_range(v, rank, world)
    settings = dict(z_loss_weight=1.0 if z_loss else 0.0, backend=backend)  # reduction: "mean", CCE's default

    e_vp, c_vp = e.clone().requires_grad_(True), c[start:stop].clone().requires_grad_(True)
    loss_vp = _linear_ce(e_vp, c_vp, targets, settings, process_group=dist.group.WORLD, vocab_range=(start, stop),
                         reduce_hidden_grad=True)
    loss_vp.backward()
    e_full, c_full = e.clone().requires_grad_(True), c.clone().requires_grad_(True)
    loss = _linear_ce(e_full, c_full, targets, settings)
    loss.backward()

    tol = TOLERANCE[dtype]
    for what, mine, full in (("loss", loss_vp, loss), ("d c shard", c_vp.grad, c_full.grad[start:stop]),
                             ("d e", e_vp.grad, e_full.grad)):
        assert mine is not None, f"{what}: no gradient"
        assert torch.allclose(mine, full, atol=tol), f"{what}: {(mine - full).abs().max().item()=} beyond {tol}"


def cases_to_run() -> dict:
    return {name: (vp_case, *args) for name, args in cases().items()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases_to_run, WORLD, tmp_path_factory.mktemp("cce_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_vocab_parallel(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed
