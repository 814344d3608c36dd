"""Vocab-parallel distillation over torch.distributed (gloo, CPU): 2 and 3 ranks, equal and uneven shards. Each
case runs on every rank (tests/vocab_parallel_cases.py) against the single-process full-vocabulary result;
both world sizes run once per session in spawned processes, and each case is reported as its own test."""

import pytest
import torch
import vocab_parallel_cases
from rank_cases import spawn_ranks

WORLDS = (2, 3)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    results = {}
    for world in WORLDS:
        folder = tmp_path_factory.mktemp(f"world{world}")
        for rank, outcome in enumerate(spawn_ranks(_worker, world, folder, str(folder / "store"))):
            for name, error in outcome.items():
                results[(world, name, rank)] = error
    return results


def _worker(rank, world, store, outs):
    vocab_parallel_cases.run_all(rank, world, store, outs[rank])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(vocab_parallel_cases.cases(2)))
def test_case_on_every_rank(outcomes, world, case):
    errors = {rank: outcomes[(world, case, rank)] for rank in range(world)}
    failed = {rank: error for rank, error in errors.items() if error is not None}
    assert not failed, "\n".join(f"rank {rank}:\n{error}" for rank, error in failed.items())


def test_vocab_range_without_group_is_refused():
    import kdfast

    with pytest.raises(ValueError, match="vocab_range needs a process_group"):
        kdfast.distill_loss(torch.randn(2, 5), torch.randn(2, 5), vocab_range=(0, 5))


def test_group_without_init_is_refused():
    import kdfast

    with pytest.raises(ValueError, match="not initialized"):
        kdfast.distill_loss(torch.randn(2, 5), torch.randn(2, 5), process_group=object())
