"""DistillationTrainer and kdfast's TRL GKDTrainer under accelerate's FSDP2 plugin and under DeepSpeed ZeRO-3 (its CPU
accelerator), 2 gloo ranks on CPU (tests/trainer_sharded_cases.py): each step's loss, the first step's gradients and
the parameters after 3 steps equal an unsharded student's, with the teacher sharded, replicated, or sparse (dataset
columns), and for vision-language models on batches with images; kdfast's TRL SDFTTrainer (its teacher sharded by TRL)
against TRL's loss helpers; kdfast's TRL IWOPDTrainer against its objective from an unsharded pair's logits; TRL's
fused LM head patched onto kdfast under a plain Trainer; and a model whose own loss is kdfast's (`patch_causal_lm`)
under a plain Trainer. Each case of each set-up is reported as its own test."""

import pytest
import trainer_sharded_cases
from rank_cases import failures, free_port, spawn_deepspeed_ranks

WORLD = 2
SETUPS = ("fsdp2", "zero3")


@pytest.fixture(scope="module", params=SETUPS)
def outcomes(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"trainer_{request.param}")
    return spawn_deepspeed_ranks(_worker, WORLD, folder, free_port(), request.param, str(folder))


def _worker(rank, world, port, setup, folder, outs):
    trainer_sharded_cases.run_all(rank, world, port, setup, folder, outs[rank])


@pytest.mark.parametrize("case", list(trainer_sharded_cases.CASES))
def test_case_on_every_rank(outcomes, case):
    failed = failures(outcomes, case)
    assert not failed, failed
