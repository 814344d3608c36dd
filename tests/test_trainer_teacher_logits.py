"""DistillationTrainer with a teacher distilled through its own forward's logits (`teacher_logits`): "auto" takes them,
with a warning, for a teacher whose forward does more before its logits than its head (a head that normalises its
rows, logits scaled by a name no config shares), and the loss is the float64 one on both models' own logits; "own"
takes them for any teacher (equal to the fused head's loss where the two agree); "head" refuses such a teacher
(tests/test_head_check.py); the student's head is fused throughout; a teacher that is any module returning logits
(an ensemble) is distilled through them; several teachers each take their head or their own logits in one fused
loss (routed examples too); bad settings are refused by name."""

import copy
import logging

import pytest
import torch
from test_head_check import norm_head_llama, scaled_llama
from tiny_models import (
    VOCAB,
    LogitEnsemble,
    reference_loss,
    student_and_teacher,
    tiny_llama,
    token_batch,
    training_args,
    word_tokenizer,
)

from kdfast.integrations.transformers import DistillationTrainer
from kdfast.reference import distill_loss_reference, multi_teacher_distill_loss_reference

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


@pytest.mark.parametrize("make", [norm_head_llama, scaled_llama], ids=lambda make: make.__name__)
def test_auto_takes_the_own_logits_of_a_teacher_whose_head_is_not_all(tmp_path, make, caplog):
    student, _ = student_and_teacher(head_scale=4.0)
    teacher = make()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path), **SETTINGS)
    batch = token_batch()
    with caplog.at_level(logging.WARNING, logger="kdfast.integrations.teacher_logits"):
        loss = trainer.compute_loss(trainer.model, batch)
    assert "own logits differ" in caplog.text and "teacher_logits='own'" in caplog.text
    torch.testing.assert_close(loss.double(), reference_loss(student, teacher, batch, **SETTINGS), rtol=1e-5,
                               atol=1e-6)
    loss.backward()  # the student's head and decoder get their gradients through the fused head
    assert student.lm_head.weight.grad is not None and student.model.layers[0].mlp.up_proj.weight.grad is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdfast.integrations.teacher_logits"):
        trainer.compute_loss(trainer.model, batch)
    assert not caplog.text, "the verdict is kept: one warning per teacher"


def test_own_equals_the_fused_head_for_a_teacher_they_agree_on(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    losses = []
    for mode in ("own", "head"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                      teacher_logits=mode, **SETTINGS)
        losses.append(trainer.compute_loss(trainer.model, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_a_teacher_module_that_returns_logits(tmp_path):
    """Any module whose forward returns the logits is distilled through them ("auto", and "own"); "head" refuses it
    by name, as it does a forward that returns no logits."""
    student, _ = student_and_teacher(head_scale=4.0)
    teacher = LogitEnsemble()
    batch = token_batch()
    with torch.no_grad():
        expected = distill_loss_reference(
            copy.deepcopy(student).double()(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits[:, :-1],
            copy.deepcopy(teacher).double()(batch["input_ids"], batch["attention_mask"])[:, :-1],
            batch["labels"][:, 1:], **SETTINGS)
    for mode in ("auto", "own"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                      teacher_logits=mode, **SETTINGS)
        loss = trainer.compute_loss(trainer.model, batch)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    trainer = DistillationTrainer(model=student, teacher_model=LogitEnsemble(), args=training_args(tmp_path),
                                  teacher_logits="head", **SETTINGS)
    with pytest.raises(ValueError, match="LogitEnsemble.* has no get_output_embeddings.* teacher_logits='own'"):
        trainer.compute_loss(trainer.model, batch)
    mute = LogitEnsemble()
    mute.forward = lambda input_ids, attention_mask=None: {"hidden": input_ids}
    trainer = DistillationTrainer(model=student, teacher_model=mute, args=training_args(tmp_path), **SETTINGS)
    with pytest.raises(ValueError, match=r"must return its logits \[batch, seq, vocab\]"):
        trainer.compute_loss(trainer.model, batch)


def test_two_training_steps_on_a_teacher_with_its_own_logits(tmp_path):
    from datasets import Dataset
    from tiny_models import as_examples

    student, _ = student_and_teacher()
    data = Dataset.from_list(as_examples(token_batch(rows=8)))
    trainer = DistillationTrainer(model=student, teacher_model=norm_head_llama(),
                                  args=training_args(tmp_path, max_steps=2), train_dataset=data, **SETTINGS)
    before = student.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, student.lm_head.weight)
    assert torch.isfinite(student.lm_head.weight).all()


def logits64(model, batch):
    with torch.no_grad():
        return copy.deepcopy(model).double()(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"])


def own_logits64(model, batch):
    output = logits64(model, batch)
    return getattr(output, "logits", output)[:, :-1]


@pytest.mark.parametrize("combine, weights", [("mixture", None), ("average", "confidence"), ("mixture", "min_ce")])
def test_several_teachers_each_through_its_head_or_its_own_logits(tmp_path, combine, weights, caplog):
    """A teacher whose head is all (fused), one whose forward does more (its own logits, with a warning) and an
    ensemble module (its own logits): the float64 loss of the three models' own logits."""
    student, teacher = student_and_teacher(head_scale=4.0)
    models = [teacher, norm_head_llama(), LogitEnsemble()]
    batch = token_batch()
    trainer = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path),
                                  teacher_weights=weights, teacher_combine=combine, **SETTINGS)
    with caplog.at_level(logging.WARNING, logger="kdfast.integrations.teacher_logits"):
        loss = trainer.compute_loss(trainer.model, batch)
    assert caplog.text.count("own logits differ") == 1, "one warning, for the teacher whose head is not all"
    assert trainer._own_teacher_logits == [False, True, True]
    expected = multi_teacher_distill_loss_reference(own_logits64(student, batch),
                                                    [own_logits64(model, batch) for model in models],
                                                    batch["labels"][:, 1:], weights=weights, combine=combine,
                                                    **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.lm_head.weight.grad is not None


@pytest.mark.parametrize("teacher_id", [[1, 0, 0, 1], [1, 1, 1, 1]])
def test_routed_examples_reach_a_teacher_of_own_logits_alone(tmp_path, teacher_id):
    """A `teacher_id` column: the ensemble (its own logits) runs on its own examples alone (none at all in the second
    case), the other teacher through its head; each example's loss is its teacher's float64 one."""
    student, teacher = student_and_teacher(head_scale=4.0)
    ensemble = LogitEnsemble()
    seen = []
    ensemble.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                   with_kwargs=True)
    batch = {**token_batch(), "teacher_id": torch.tensor(teacher_id)}
    trainer = DistillationTrainer(model=student, teacher_model=[ensemble, teacher], args=training_args(tmp_path),
                                  **SETTINGS)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=30)
    assert seen == ([teacher_id.count(0)] if 0 in teacher_id else [])
    student_logits, labels = own_logits64(student, batch), batch["labels"][:, 1:]
    teacher_logits = [own_logits64(model, batch) for model in (ensemble, teacher)]
    per_example = [distill_loss_reference(student_logits[row], teacher_logits[index][row], labels[row],
                                          reduction="sum", **SETTINGS) for row, index in enumerate(teacher_id)]
    torch.testing.assert_close(loss.double(), sum(per_example) / 30, rtol=1e-5, atol=1e-6)


def test_own_logits_of_several_teachers_equal_their_fused_heads(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    models = [teacher, tiny_llama(48, seed=2, final_logit_softcapping=20.0)]
    batch = token_batch()
    losses = []
    for mode in ("own", "head"):
        trainer = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path),
                                      teacher_logits=mode, teacher_weights=[1.0, 2.0], **SETTINGS)
        losses.append(trainer.compute_loss(trainer.model, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_two_training_steps_with_a_head_and_an_ensemble(tmp_path):
    from datasets import Dataset
    from tiny_models import as_examples

    student, teacher = student_and_teacher()
    data = Dataset.from_list(as_examples(token_batch(rows=8)))
    trainer = DistillationTrainer(model=student, teacher_model=[teacher, LogitEnsemble()],
                                  args=training_args(tmp_path, max_steps=2), train_dataset=data, **SETTINGS)
    before = student.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, student.lm_head.weight)
    assert torch.isfinite(student.lm_head.weight).all()


@pytest.mark.parametrize("change,message", [
    (dict(teacher_logits="logits"), r"teacher_logits must be one of \('auto', 'head', 'own'\)"),
    (dict(teacher_logits="own", teacher_model=None, teacher_server="http://127.0.0.1:9"),
     r"teacher_logits='own' needs teacher_model \(one model or several\), not a teacher cache or a served teacher"),
])
def test_bad_settings_are_refused(tmp_path, change, message):
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(**{"model": student, "teacher_model": teacher, "args": training_args(tmp_path),
                               "processing_class": word_tokenizer(), **change})


def test_a_teacher_of_own_logits_padded_past_the_tokenizer(tmp_path):
    """Beside a head teacher, one whose head normalises its rows and is padded 8 rows past the tokenizer: its own
    logits' columns past `vocab_size` (the tokenizer's length) are left out, as a padded head's rows are."""
    from test_head_check import NormHead

    student, teacher = student_and_teacher(head_scale=4.0)
    padded = tiny_llama(48, vocab=VOCAB + 8, seed=2)
    head = NormHead(48, VOCAB + 8, bias=False)
    head.weight.data.copy_(padded.lm_head.weight.data * 3.0)
    padded.lm_head = head
    batch = token_batch()
    trainer = DistillationTrainer(model=student, teacher_model=[teacher, padded], args=training_args(tmp_path),
                                  processing_class=word_tokenizer(), **SETTINGS)
    loss = trainer.compute_loss(trainer.model, batch)
    assert trainer._own_teacher_logits == [False, True]
    expected = multi_teacher_distill_loss_reference(
        own_logits64(student, batch), [own_logits64(model, batch)[..., :VOCAB] for model in (teacher, padded)],
        batch["labels"][:, 1:], **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
