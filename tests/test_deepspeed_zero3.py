"""The trainers' fused loss, and a per-row one, on a student in a real DeepSpeed ZeRO-3 engine, 2 gloo ranks on CPU
(tests/deepspeed_cases.py): loss, gradients and 3 optimizer steps equal the unsharded student's."""

import deepspeed_cases
import pytest
from rank_cases import failures, free_port, spawn_deepspeed_ranks

WORLD = 2


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_deepspeed_ranks(_worker, WORLD, tmp_path_factory.mktemp("zero3"), free_port())


def _worker(rank, world, port, outs):
    deepspeed_cases.run_all(rank, world, port, outs[rank])


@pytest.mark.parametrize("case", list(deepspeed_cases.CASES))
def test_case_on_every_rank(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed
