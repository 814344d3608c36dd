"""kdfast's TRL `DistillationTrainer` with `teacher_logits`: a teacher whose head normalises its rows (TRL's kernel
would read the head's weight and distil other logits) is distilled through its own forward's logits under "auto",
with a warning, equal to the float64 loss of both models' own logits at the completion tokens; "own" equals the fused
head where the two agree (loss, logged entropy, every gradient); "head" refuses such a teacher; among several teachers
each is decided alone, also routed by `teacher_id` (a teacher with no sequence of the batch included); two on-policy
training steps run."""

import copy
import logging

import pytest
import torch
from test_head_check import norm_head_llama
from test_trl_distillation import _completion_batch
from test_trl_multi_teacher import _loss_and_grads, _trainer
from tiny_models import student_and_teacher, tiny_llama

from kdfast.reference import distill_loss_reference, multi_teacher_distill_loss_reference

SETTINGS = dict(divergence="jsd", t2_scale=False, reduction="sum")


def own_logits64(model, batch):
    """The model's own float64 logits at the positions that predict the completion tokens, as the trainer takes
    them, and the mask of the tokens in the loss."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, :-1][:, -keep:]


def test_auto_distils_the_own_logits_of_a_teacher_whose_head_is_not_all(tmp_path, caplog):
    student = student_and_teacher(head_scale=30.0)[0]
    teacher = norm_head_llama()
    batch = _completion_batch()
    trainer = _trainer(tmp_path, student, teacher, beta=0.3, temperature=2.0)
    with caplog.at_level(logging.WARNING, logger="kdfast.integrations.teacher_logits"):
        loss = trainer.compute_loss(trainer.model, batch)
    assert "own logits differ" in caplog.text
    mask = batch["completion_mask"].bool()
    expected = distill_loss_reference(own_logits64(student, batch)[mask], own_logits64(teacher, batch)[mask],
                                      beta=0.3, temperature=2.0, **SETTINGS) / batch["num_items_in_batch"]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="LlamaForCausalLM's own logits differ"):
        _trainer(tmp_path, copy.deepcopy(student), norm_head_llama(), teacher_logits="head").compute_loss(
            trainer.model, batch)


@pytest.mark.parametrize("teachers", [1, 2])
def test_own_logits_equal_the_fused_heads_where_they_agree(tmp_path, teachers):
    student, teacher = student_and_teacher(head_scale=30.0)
    models = [teacher, tiny_llama(48, seed=2, final_logit_softcapping=5.0)][:teachers]
    batch = _completion_batch()
    results = [_loss_and_grads(_trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(models[0]) if teachers == 1
                                        else copy.deepcopy(models), beta=0.5, teacher_logits=mode), batch)
               for mode in ("own", "head")]
    (loss, entropy, grads), (expected, expected_entropy, expected_grads) = results
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert entropy == pytest.approx(expected_entropy, rel=1e-5)
    for name, grad in grads.items():  # (the teachers' logits from their whole forward or their heads: fp32 apart)
        error = (grad - expected_grads[name]).norm() / expected_grads[name].norm().clamp(min=1e-30)
        assert error <= 1e-4, f"{name}.grad: relative L2 error {error:.2e}"


@pytest.mark.parametrize("combine, weights", [("mixture", [1.0, 3.0]), ("average", "confidence")])
def test_several_teachers_each_take_their_head_or_their_own_logits(tmp_path, combine, weights):
    student = student_and_teacher(head_scale=30.0)[0]
    models = [student_and_teacher(head_scale=30.0)[1], norm_head_llama()]
    batch = _completion_batch()
    trainer = _trainer(tmp_path, student, models, beta=0.3, temperature=2.0, teacher_weights=weights,
                       teacher_combine=combine)
    loss = trainer.compute_loss(trainer.model, batch)
    mask = batch["completion_mask"].bool()
    expected = multi_teacher_distill_loss_reference(
        own_logits64(student, batch)[mask], [own_logits64(model, batch)[mask] for model in models],
        batch["completion_ids"][mask] if isinstance(weights, str) else None, weights=weights, combine=combine,
        beta=0.3, temperature=2.0, **SETTINGS) / batch["num_items_in_batch"]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", [[1, 0, 1], [0, 0, 0]])
def test_routed_sequences_reach_a_teacher_of_own_logits(tmp_path, route):
    """Each sequence's one teacher; in the second case the teacher of own logits has no sequence at all."""
    student = student_and_teacher(head_scale=30.0)[0]
    models = [student_and_teacher(head_scale=30.0)[1], norm_head_llama()]
    batch = {**_completion_batch(), "teacher_id": torch.tensor(route)}
    trainer = _trainer(tmp_path, student, models, beta=0.5)
    loss = trainer.compute_loss(trainer.model, batch)
    student_logits, mask = own_logits64(student, batch), batch["completion_mask"].bool()
    teacher_logits = [own_logits64(model, batch) for model in models]
    expected = sum(distill_loss_reference(student_logits[row][mask[row]], teacher_logits[index][row][mask[row]],
                                          beta=0.5, **SETTINGS) for row, index in enumerate(route))
    torch.testing.assert_close(loss.double(), expected / batch["num_items_in_batch"], rtol=1e-5, atol=1e-6)


def test_two_on_policy_steps_with_a_teacher_of_own_logits(tmp_path):
    student = student_and_teacher()[0]
    trainer = _trainer(tmp_path, student, norm_head_llama(), max_steps=2, learning_rate=1e-3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))


def test_a_bad_mode_is_refused_where_the_trainer_is_built(tmp_path):
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match=r"teacher_logits must be one of \('auto', 'head', 'own'\)"):
        _trainer(tmp_path, student, teacher, teacher_logits="logits")
