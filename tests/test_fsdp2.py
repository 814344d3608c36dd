"""The trainers' fused loss on an FSDP2-sharded student, 2 gloo ranks on CPU (tests/fsdp2_cases.py): the loss, every
parameter's gradient and the parameters after 3 optimizer steps equal the unsharded student's, with a dense and a
sparse teacher. Each case is reported as its own test."""

import fsdp2_cases
import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    outs = [str(folder / f"rank{rank}.pt") for rank in range(WORLD)]
    context = mp.start_processes(_worker, args=(WORLD, str(folder / "store"), outs), nprocs=WORLD, join=False,
                                 start_method="spawn")
    while not context.join(timeout=300):
        pass
    return [torch.load(out) for out in outs]


def _worker(rank, world, store, outs):
    fsdp2_cases.run_all(rank, world, store, outs[rank])


@pytest.mark.parametrize("case", list(fsdp2_cases.CASES))
def test_case_on_every_rank(outcomes, case):
    failed = {rank: results[case] for rank, results in enumerate(outcomes) if results[case] is not None}
    assert not failed, "\n".join(f"rank {rank}:\n{error}" for rank, error in failed.items())
