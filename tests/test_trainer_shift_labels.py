"""DistillationTrainer on batches that carry `shift_labels` (already shifted, as transformers' causal LM loss takes
them: a collator's, or context parallelism's, whose split sequence's last position predicts the next split's first
token): the loss scores every position against them, with one teacher or routed teachers; shift_labels that are the
labels shifted give the labels' loss; a sparse teacher's label-aligned rows refuse them."""

import pytest
import torch
from tiny_models import reference_loss, student_and_teacher, tiny_llama, token_batch, training_args

from kdfast.integrations.transformers import DistillationTrainer
from kdfast.reference import distill_loss_reference

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def shifted(labels):
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


def with_next_split(batch):
    """shift_labels of a sequence split where the batch's ends: each row's last position predicts a token of the next
    split (here arbitrary ids), which `labels[:, 1:]` cannot say."""
    labels = shifted(batch["labels"])
    labels[:, -1] = torch.arange(3, 3 + labels.shape[0])
    return {**batch, "shift_labels": labels}


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_shift_labels_that_are_the_labels_shifted_give_their_loss(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path), **SETTINGS)
    batch = token_batch()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, {**batch, "shift_labels": shifted(batch["labels"])})
    torch.testing.assert_close(loss.double(), reference_loss(student, teacher, batch, **SETTINGS), rtol=1e-5,
                               atol=1e-6)


def test_every_position_is_scored_against_shift_labels(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path), **SETTINGS)
    batch = with_next_split(token_batch())
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=31)
        expected = distill_loss_reference(logits(student, batch), logits(teacher, batch), batch["shift_labels"],
                                          num_items_in_batch=31, **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_routed_teachers_against_shift_labels(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    teachers = [teacher, tiny_llama(48, seed=2)]
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=training_args(tmp_path), **SETTINGS)
    batch = {**with_next_split(token_batch()), "teacher_id": torch.tensor([1, 0, 0, 1])}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        first, second = (logits(model, batch) for model in teachers)
        routed = torch.where(batch["teacher_id"][:, None, None] == 0, first, second)
        expected = distill_loss_reference(logits(student, batch), routed, batch["shift_labels"], **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_sparse_teacher_refuses_shift_labels(tmp_path):
    student, _ = student_and_teacher()
    batch = token_batch()
    rows = [{"input_ids": ids, "labels": labels, "teacher_ids": torch.zeros(len(ids), 2, dtype=torch.long),
             "teacher_logprobs": torch.full((len(ids), 2), -0.7)}
            for ids, labels in zip(batch["input_ids"], batch["labels"])]
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), train_dataset=rows)
    collated = trainer.data_collator(rows)
    with pytest.raises(ValueError, match="takes labels, not shift_labels"):
        trainer.compute_loss(trainer.model, {**collated, "shift_labels": shifted(collated["labels"])})
