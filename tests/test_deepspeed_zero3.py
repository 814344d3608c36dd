"""The trainers' fused loss on a student in a real DeepSpeed ZeRO-3 engine, 2 gloo ranks on CPU
(tests/deepspeed_cases.py): loss, gradients and 3 optimizer steps equal the unsharded student's."""

import socket

import deepspeed_cases
import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero3")
    outs = [str(folder / f"rank{rank}.pt") for rank in range(WORLD)]
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), outs), nprocs=WORLD, join=False,
                                 start_method="spawn")
    while not context.join(timeout=300):
        pass
    return [torch.load(out) for out in outs]


def _worker(rank, world, port, outs):
    deepspeed_cases.run_all(rank, world, port, outs[rank])


@pytest.mark.parametrize("case", list(deepspeed_cases.CASES))
def test_case_on_every_rank(outcomes, case):
    failed = {rank: results[case] for rank, results in enumerate(outcomes) if results[case] is not None}
    assert not failed, "\n".join(f"rank {rank}:\n{error}" for rank, error in failed.items())
