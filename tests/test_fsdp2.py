"""The trainers' fused loss on an FSDP2-sharded student, 2 gloo ranks on CPU (tests/fsdp2_cases.py): the loss, every
parameter's gradient and the parameters after 3 optimizer steps equal the unsharded student's, with a dense and a
sparse teacher. Each case is reported as its own test."""

import fsdp2_cases
import pytest
from rank_cases import failures, spawn_ranks

WORLD = 2


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    return spawn_ranks(_worker, WORLD, folder, str(folder / "store"))


def _worker(rank, world, store, outs):
    fsdp2_cases.run_all(rank, world, store, outs[rank])


@pytest.mark.parametrize("case", list(fsdp2_cases.CASES))
def test_case_on_every_rank(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed
