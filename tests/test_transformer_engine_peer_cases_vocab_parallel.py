"""NVIDIA TransformerEngine's `parallel_cross_entropy(..., dist_process_group=group)` on `kdfast.cross_entropy(...,
process_group=group)`, over torch.distributed (gloo, CPU, tests/rank_cases.py). The peer's test file
(tests/pytorch/test_parallel_cross_entropy.py) passes None as the group in every call: here its
TestParallelCrossEntropy cases run as they are but over 2 ranks, each holding its shard of the vocabulary, against
the same expectations. How the rest of its settings map onto kdfast's is in tests/test_transformer_engine_peer_cases.py.

The peer's vocab parallelism (transformer_engine/pytorch/triton/cross_entropy.py and its kernels): each rank passes
(*, V / world) logits, equal shards, rank r holding the global columns [r V / world, (r + 1) V / world); the targets
are global ids on every rank; each rank's (max, sum of exp, target logit) are all-gathered and merged, label
smoothing divides by n_cols x world (the global V), and every rank returns the global loss and its own columns'
gradient. kdfast's `process_group` with its default `vocab_range` (equal contiguous shards), the same definitions.

Cases: each peer test once, at the iteration tests/test_transformer_engine_peer_cases.py runs under Triton's
interpreter (batch 1, V 64000 or 128000 in turn, swap_dim in turn: shards of 32000 and 64000 columns), SQ cut to 12
(8 under the interpreter, where 2 of the tests run: the bf16 one and the smoothed one); on the C++ and PyTorch
backends, 2 ranks. Inputs drawn alike on every rank (the same seeded generators), each rank keeping its columns.

Expectations: the single-process file's, on this rank's columns: the squared loss (global, the same on every rank)
and this rank's gradient at the peer's dtype_tols against its reference (torch in the logits' dtype over the full
logits), the loss before squaring within 1e-6 of float64 and the gradient within the float64 allowance.
"""

import pytest
import torch.distributed as dist
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases
from test_flash_attn_peer_cases import FP32, IGNORE, INTERPRETED, LOSS64_TOL, assert_close, assert_within
from test_transformer_engine_peer_cases import INTERPRETED_SQ, PEER_TESTS, PEER_TOL, SQ, VOCABS, expected

import kdfast

WORLD = 2
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors
INTERPRETED_TESTS = ("test_bfloat16_input", "test_label_smoothing")


def cases() -> dict:
    """{name: (backend, test, swap, batch, vocab)}: each peer test once, on every CPU backend but Triton's interpreter,
    which takes INTERPRETED_TESTS."""
    listed = {}
    for index, (test, (_, swaps, *_)) in enumerate(PEER_TESTS.items()):
        swap, batch, vocab = swaps[index % len(swaps)], 1, VOCABS[index % 2]
        for backend in VP_BACKENDS:
            if backend == "triton" and INTERPRETED and test not in INTERPRETED_TESTS:
                continue
            listed[f"{test}-{backend}-{'SQxB' if swap else 'BxSQ'}-B{batch}-V{vocab}"] = (backend, test, swap, batch,
                                                                                          vocab)
    return listed


def vp_case(backend, test, swap, batch, vocab):
    """On a rank: kdfast over this rank's shard, its squared loss and this rank's columns of its gradient against the
    peer's reference and float64 (module docstring)."""
    interpreted = backend == "triton" and INTERPRETED
    truth = expected(test, swap, batch, vocab, INTERPRETED_SQ if interpreted else SQ, truncating=interpreted)
    dtype = PEER_TESTS[test][0]
    rank = dist.get_rank()
    start, stop = rank * vocab // WORLD, (rank + 1) * vocab // WORLD
    leaf = truth.logits[..., start:stop].contiguous().requires_grad_(True)
    loss = kdfast.cross_entropy(leaf, truth.target, label_smoothing=truth.smoothing, reduction=truth.reduction,
                                ignore_index=IGNORE, backend=backend, process_group=dist.group.WORLD)
    assert loss.dtype == FP32
    assert loss.shape == (() if truth.reduction == "mean" else truth.target.shape)
    assert_close("loss (float64)", loss, truth.loss64, **LOSS64_TOL)
    squared = loss.square()
    (squared if truth.reduction == "mean" else squared.sum()).backward()
    assert leaf.grad.dtype == dtype
    grad = leaf.grad.reshape(-1, stop - start)
    assert_close("squared loss (peer)", squared.reshape(-1), truth.peer_loss.reshape(-1), **PEER_TOL[dtype])
    assert_close("this rank's gradient (peer)", grad, truth.peer_grad[:, start:stop], **PEER_TOL[dtype])
    assert_within("this rank's gradient (float64)", grad, truth.grad64[:, start:stop],
                  truth.grad64_allowance[:, start:stop])


def cases_to_run() -> dict:
    return {name: (vp_case, *args) for name, args in cases().items()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases_to_run, WORLD, tmp_path_factory.mktemp("transformer_engine_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_parallel_cross_entropy_dist_process_group(outcomes, case):
    """A TestParallelCrossEntropy case under dist_process_group: its outcome on every rank."""
    failed = failures(outcomes, case)
    assert not failed, failed
