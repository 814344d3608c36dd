"""A teacher of another tokenizer distilled through its own forward's logits (`teacher_logits`, with
`teacher_tokenizer=`): a teacher whose head normalises its rows gives, under "auto" (with a warning), the loss of both
models' full logits (`kdfast.cross_vocab_distill_loss` over the aligned groups plus torch's CE) in value and student
gradients; "own" equals the fused head for a teacher whose head is all of its logits; "head" refuses the first."""

import copy
import logging

import pytest
import torch
from test_cross_tokenizer_trainer import MIXED, SETTINGS, TEXTS, eager_loss, models
from test_head_check import NormHead
from tiny_models import training_args

import kdfast
from kdfast.demo.corpus import train_tokenizer
from kdfast.integrations.cross_tokenizer import CrossTokenizerCollator, batch_cross_vocab_loss
from kdfast.integrations.transformers import DistillationTrainer


@pytest.fixture(scope="module")
def tokenizers():
    return train_tokenizer(TEXTS[:60], 300), train_tokenizer(TEXTS[60:], 360)


def norm_head(teacher):
    """The teacher with Baichuan 2's head: each row normalised before the product (its own logits are not the
    head weight's product)."""
    head = NormHead(teacher.config.hidden_size, teacher.lm_head.weight.shape[0], bias=False)
    head.weight.data.copy_(teacher.lm_head.weight.data * 3.0)
    teacher.lm_head = head
    return teacher


@pytest.mark.parametrize("method", ["hybrid", "uld", "mapped"])
def test_the_teachers_own_logits_give_the_full_logits_loss(tokenizers, method):
    student, teacher = models(*tokenizers)
    teacher = norm_head(teacher)
    vocab_map = kdfast.VocabMap.from_tokenizers(*tokenizers)
    batch = CrossTokenizerCollator(*tokenizers, 20)([{"text": text} for text in MIXED])
    reference = copy.deepcopy(student)
    loss, _ = batch_cross_vocab_loss(student, teacher, batch, vocab_map, method=method, own_logits_of_teacher=True,
                                     **SETTINGS)
    loss.backward()
    expected = eager_loss(reference, teacher, batch, vocab_map, method, **SETTINGS)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, param), want in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def _trainer(tmp_path, tokenizers, teacher, student=None, **settings):
    student_tokenizer, teacher_tokenizer = tokenizers
    return DistillationTrainer(model=student or models(*tokenizers)[0], teacher_model=teacher,
                               teacher_tokenizer=teacher_tokenizer, processing_class=student_tokenizer,
                               args=training_args(tmp_path), **{**SETTINGS, **settings})


def test_the_trainer_takes_the_own_logits_of_a_teacher_whose_head_is_not_all(tmp_path, tokenizers, caplog):
    student, teacher = models(*tokenizers)
    teacher = norm_head(teacher)
    vocab_map = kdfast.VocabMap.from_tokenizers(*tokenizers)
    batch = CrossTokenizerCollator(*tokenizers)([{"text": text} for text in MIXED])
    trainer = _trainer(tmp_path, tokenizers, teacher, copy.deepcopy(student))
    with caplog.at_level(logging.WARNING, logger="kdfast.integrations.teacher_logits"):
        loss = trainer.compute_loss(trainer.model, batch)
    assert "own logits differ" in caplog.text and trainer._own_teacher_logits
    expected = eager_loss(student, teacher, batch, vocab_map, "hybrid", **SETTINGS)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    head_only = _trainer(tmp_path, tokenizers, norm_head(models(*tokenizers)[1]), teacher_logits="head")
    with pytest.raises(ValueError, match="own logits differ"):
        head_only.compute_loss(head_only.model, batch)


def test_own_logits_equal_the_fused_head_where_they_agree(tmp_path, tokenizers):
    student, teacher = models(*tokenizers)
    batch = CrossTokenizerCollator(*tokenizers)([{"text": text} for text in MIXED])
    losses = [_trainer(tmp_path, tokenizers, teacher, copy.deepcopy(student), teacher_logits=mode)
              for mode in ("own", "head")]
    torch.testing.assert_close(*(trainer.compute_loss(trainer.model, batch) for trainer in losses), rtol=1e-5,
                               atol=1e-6)
