"""A training step under DistillationTrainer needs less peak memory than TRL's GKD loss path, which builds both
models' full logits: measured at a vocabulary of 32k (process peak RSS beyond what was held before the step)."""

import warnings

import pytest
import torch
from tiny_models import student_and_teacher, token_batch, training_args, word_tokenizer

from kdfast.integrations.transformers import DistillationTrainer
from kdfast.memory import extra_peak_bytes

VOCAB = 32_000
ROWS, LENGTH = 4, 256


def _step_peak(trainer):
    batch = token_batch(ROWS, LENGTH, vocab=VOCAB)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop
    trainer.training_step(trainer.model, dict(batch))  # warm-up: kernel load, parameter gradients allocated
    return extra_peak_bytes(lambda: trainer.training_step(trainer.model, dict(batch)), torch.device("cpu"))


def test_step_peak_is_below_trls_gkd(tmp_path):
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    from datasets import Dataset

    student, teacher = student_and_teacher(vocab=VOCAB)
    args = training_args(tmp_path, beta=0.5, lmbda=0.0, bf16=False, config_cls=trl_gkd.GKDConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_trainer = trl_gkd.GKDTrainer(model=student, teacher_model=teacher, args=args,
                                         processing_class=word_tokenizer(),
                                         train_dataset=Dataset.from_dict({"messages": [[]]}))
    trl_peak = _step_peak(trl_trainer)

    student, teacher = student_and_teacher(vocab=VOCAB)
    kdfast_trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                         divergence="jsd", beta=0.5, kd_weight=1.0, ce_weight=0.0)
    kdfast_peak = _step_peak(kdfast_trainer)
    one_logits_tensor = ROWS * (LENGTH - 1) * VOCAB * 4
    print(f"extra peak per step: TRL GKD {trl_peak / 2**20:.0f} MiB, kdfast {kdfast_peak / 2**20:.0f} MiB")
    # TRL holds several fp32 [tokens, vocab] tensors per model; kdfast one chunk plus the head's gradient.
    assert trl_peak > 3 * one_logits_tensor, "the comparison lost its subject: TRL's path should build logits"
    assert kdfast_peak < trl_peak / 3, (kdfast_peak, trl_peak)
