"""DistillationTrainer with several teacher models (of different hidden sizes): its loss is the float64 reference of the
models' logits for each combine mode and weights, a `teacher_id` column routes each example to its teacher (whose
model alone runs on it), training runs, and settings for several teachers are refused with one."""

import copy

import pytest
import torch
from tiny_models import VOCAB, as_examples, student_and_teacher, tiny_llama, token_batch, training_args

from kdfast.integrations.transformers import DistillationTrainer
from kdfast.reference import distill_loss_reference, multi_teacher_distill_loss_reference

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def teachers():
    return [student_and_teacher()[1], tiny_llama(48, seed=2, final_logit_softcapping=20.0)]


def logits64(model, batch):
    with torch.no_grad():
        return copy.deepcopy(model).double()(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits[:, :-1]


@pytest.mark.parametrize("combine, weights", [("mixture", None), ("mixture", [1.0, 3.0]), ("average", "min_ce"),
                                              ("average", "confidence")])
def test_loss_equals_the_reference_of_the_models_logits(tmp_path, combine, weights):
    student, models = student_and_teacher()[0], teachers()
    batch = token_batch()
    trainer = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path),
                                  teacher_weights=weights, teacher_combine=combine, **SETTINGS)
    loss = trainer.compute_loss(trainer.model, batch)
    expected = multi_teacher_distill_loss_reference(logits64(student, batch), [logits64(t, batch) for t in models],
                                                    batch["labels"][:, 1:], weights=weights, combine=combine,
                                                    **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_teacher_id_column_routes_each_example(tmp_path):
    student, models = student_and_teacher()[0], teachers()
    batch = {**token_batch(), "teacher_id": torch.tensor([1, 0, 0, 1])}
    trainer = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path), **SETTINGS)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=30)
    student_logits, labels = logits64(student, batch), batch["labels"][:, 1:]
    per_example = [distill_loss_reference(student_logits[row], logits64(models[int(teacher)], batch)[row],
                                          labels[row], reduction="sum", **SETTINGS)
                   for row, teacher in enumerate(batch["teacher_id"])]
    torch.testing.assert_close(loss.double(), sum(per_example) / 30, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_id", [[1, 0, 0, 1], [1, 1, 1, 1]])
def test_a_routed_teacher_runs_on_its_own_examples_alone(tmp_path, teacher_id):
    student, models = student_and_teacher()[0], teachers()
    sizes = [[], []]
    for index, model in enumerate(models):
        model.model.register_forward_hook(lambda module, args, kwargs, out, index=index: sizes[index].append(
            kwargs["input_ids"].shape[0]), with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path), **SETTINGS)
    loss, parts = trainer._batch_loss(trainer.model, models, {**token_batch(), "teacher_id": torch.tensor(teacher_id)},
                                      None)
    assert sizes == [[teacher_id.count(0)] if 0 in teacher_id else [], [teacher_id.count(1)]]
    # Each teacher's share of the divergence: its own examples' (the shares add up to it).
    torch.testing.assert_close(parts.teachers.sum(), parts.kd)
    assert (parts.teachers[0] == 0) == (0 not in teacher_id)


@pytest.mark.parametrize("teacher_id,match", [
    (torch.tensor([1, 0, 2, 1]), r"teacher_id column must index the 2 teachers \(0..1\), got values from 0 to 2"),
    (torch.tensor([1, -1, 0, 1]), r"teacher_id column must index the 2 teachers \(0..1\), got values from -1 to 1"),
    (torch.tensor([1.0, 0.0, 0.0, 1.0]), "teacher_id column must hold integer teacher indices"),
])
def test_a_teacher_id_outside_the_teachers_is_a_clear_error(tmp_path, teacher_id, match):
    # Before, torch's one_hot said "Class values must be smaller than num_classes", after every teacher's forward.
    student, models = student_and_teacher()[0], teachers()
    trainer = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path), **SETTINGS)
    with pytest.raises(ValueError, match=match):
        trainer.compute_loss(trainer.model, {**token_batch(), "teacher_id": teacher_id})


def test_trains_with_two_teachers(tmp_path):
    student, models = student_and_teacher()[0], teachers()
    rows = [{"input_ids": row, "labels": row, "teacher_id": index % 2}
            for index, row in enumerate(torch.randint(2, VOCAB, (8, 12), generator=torch.Generator().manual_seed(4)))]
    args = training_args(tmp_path, max_steps=6, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, teacher_model=models, args=args, train_dataset=rows, **SETTINGS)
    batch = trainer.data_collator(rows[:4])
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch).item()
    assert after < before, (before, after)


def test_settings_for_several_teachers_are_refused_with_one(tmp_path):
    student, teacher = student_and_teacher()
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="teacher_weights and teacher_combine weigh several teachers"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, teacher_weights=[1.0])
    with pytest.raises(ValueError, match="teacher_combine must be one of"):
        DistillationTrainer(model=student, teacher_model=teachers(), args=args, teacher_combine="vote")
    with pytest.raises(ValueError, match="teacher_model is an empty list"):
        DistillationTrainer(model=student, teacher_model=[], args=args)


@pytest.mark.parametrize("weights,match", [
    ([1.0, 2.0, 3.0], r"teacher_weights must hold 2 numbers \(one per teacher\), got shape \(3,\)"),
    ([1.0, -2.0], r"teacher_weights must be finite, >= 0 and not all 0, got \[1.0, -2.0\]"),
    ([0.0, 0.0], "teacher_weights must be finite, >= 0 and not all 0"),
    ([float("nan"), 1.0], "teacher_weights must be finite, >= 0 and not all 0"),
    ("confident", r"teacher_weights must be None, 2 numbers or one of \('confidence', 'min_ce'\)"),
    ({"a": 1}, "teacher_weights as a dict weighs teachers by name: pass teacher_model as a dict of them"),
    ({1, 2}, "teacher_weights must be None, 2 numbers or one of"),
])
def test_bad_teacher_weights_fail_where_the_trainer_is_built(tmp_path, weights, match):
    # Before, they failed at the first step, after every teacher's forward pass.
    student = student_and_teacher()[0]
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=student, teacher_model=teachers(), args=training_args(tmp_path),
                            teacher_weights=weights)


def test_each_teachers_divergence_is_logged(tmp_path):
    student, models = student_and_teacher()[0], teachers()
    rows = [{"input_ids": row, "labels": row}
            for row in torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))]
    args = training_args(tmp_path, max_steps=2, logging_strategy="steps", logging_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=models, args=args, train_dataset=rows, **SETTINGS)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"kd_loss_teacher_0", "kd_loss_teacher_1", "kd_loss", "entropy"} <= set(entry)
                          for entry in logged)
    assert logged[0]["kd_loss_teacher_0"] != logged[0]["kd_loss_teacher_1"]


@pytest.mark.parametrize("teacher_id", [["prose", "code", "code", "prose"], [1, 0, 0, 1],
                                        [torch.tensor(1), torch.tensor(0), torch.tensor(0), torch.tensor(1)]])
def test_teachers_by_name_route_each_example_through_the_default_collator(tmp_path, teacher_id):
    # The Trainer's default collator drops a string column without a word: named routes then weighed the teachers
    # alike. Names, positions and 0-d tensors all reach the loss as positions.
    student, models = student_and_teacher()[0], teachers()
    trainer = DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]},
                                  args=training_args(tmp_path), **SETTINGS)
    examples = [{**example, "teacher_id": name} for example, name in zip(as_examples(token_batch()), teacher_id)]
    batch = trainer.data_collator(examples)
    assert batch["teacher_id"].tolist() == [1, 0, 0, 1]
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=30)
    student_logits, labels = logits64(student, batch), batch["labels"][:, 1:]
    per_example = [distill_loss_reference(student_logits[row], logits64(models[teacher], batch)[row], labels[row],
                                          reduction="sum", **SETTINGS) for row, teacher in enumerate([1, 0, 0, 1])]
    torch.testing.assert_close(loss.double(), sum(per_example) / 30, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_id,match", [
    (["prose", "poetry", "code", "prose"], r"must name one of the teachers \['code', 'prose'\] \(or be its position, "
                                           r"0..1\), got 'poetry'"),
    ([1, 2, 0, 1], r"must name one of the teachers \['code', 'prose'\] .* got 2"),
    ([True, False, False, True], "got True"),
])
def test_a_teacher_id_that_names_no_teacher_is_a_clear_error(tmp_path, teacher_id, match):
    student, models = student_and_teacher()[0], teachers()
    trainer = DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]},
                                  args=training_args(tmp_path), **SETTINGS)
    examples = [{**example, "teacher_id": name} for example, name in zip(as_examples(token_batch()), teacher_id)]
    with pytest.raises(ValueError, match=match):
        trainer.data_collator(examples)
    with pytest.raises(ValueError, match="examples \\[2\\] have no teacher_id where the others have one"):
        trainer.data_collator([*examples[:2], {key: value for key, value in examples[2].items()
                                               if key != "teacher_id"}])


def test_named_teachers_train_and_log_under_their_names(tmp_path):
    student, models = student_and_teacher()[0], teachers()
    rows = [{"input_ids": row, "labels": row, "teacher_id": ("code", "prose")[index % 2]}
            for index, row in enumerate(torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(6)))]
    args = training_args(tmp_path, max_steps=2, logging_strategy="steps", logging_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]}, args=args,
                                  train_dataset=rows, **SETTINGS)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"kd_loss_teacher_code", "kd_loss_teacher_prose", "kd_loss"} <= set(entry)
                          for entry in logged)
    # Routed, each teacher's share of the divergence: the two add up to it.
    assert abs(logged[0]["kd_loss_teacher_code"] + logged[0]["kd_loss_teacher_prose"] - logged[0]["kd_loss"]) < 2e-4


def test_a_dataset_teacher_id_that_names_no_teacher_fails_where_the_trainer_is_built(tmp_path):
    # Not when that example's batch comes, minutes into a run or at the first evaluation.
    student, models = student_and_teacher()[0], teachers()
    rows = [{"input_ids": row, "labels": row, "teacher_id": name}
            for row, name in zip(torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7)),
                                 ["code", "prose", "code"])]
    typo = [{**rows[0], "teacher_id": "poetry"}]
    with pytest.raises(ValueError, match=r"train_dataset: .*\['code', 'prose'\].*got 'poetry'"):
        DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]},
                            args=training_args(tmp_path), train_dataset=rows + typo, **SETTINGS)
    with pytest.raises(ValueError, match=r"eval_dataset\['typo'\]: .*got 'poetry'"):
        DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]},
                            args=training_args(tmp_path), train_dataset=rows,
                            eval_dataset={"clean": rows, "typo": typo}, **SETTINGS)


def test_a_one_entry_dict_is_the_single_teacher_bitwise(tmp_path):
    # Not the several-teacher kernel's float32 rounding of the same math (TRL's multi-teacher trainer asks the same).
    student, teacher = student_and_teacher()
    batch = token_batch()  # no teacher_id column: one teacher needs none
    losses, grads = [], []
    for teacher_model in (teacher, {"only": teacher}):
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher_model,
                                      args=training_args(tmp_path), **SETTINGS)
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=30)
        loss.backward()
        losses.append(loss.detach())
        grads.append([parameter.grad for parameter in trainer.model.parameters()])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(one, other) for one, other in zip(*grads))
    trainer.log({"loss": losses[1].item()})
    assert trainer.state.log_history[-1]["kd_loss_teacher_only"] == trainer.state.log_history[-1]["kd_loss"]


def test_teacher_weights_by_name_weigh_named_teachers(tmp_path):
    student, models = student_and_teacher()[0], teachers()
    batch = token_batch()
    by_name = DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]},
                                  args=training_args(tmp_path), teacher_weights={"prose": 3.0, "code": 1.0},
                                  **SETTINGS)
    in_order = DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path),
                                   teacher_weights=[1.0, 3.0], **SETTINGS)
    torch.testing.assert_close(by_name.compute_loss(by_name.model, batch), in_order.compute_loss(in_order.model, batch),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"must name every teacher \['code', 'prose'\] once: missing \['prose'\], "
                                         r"unknown \['poetry'\]"):
        DistillationTrainer(model=student, teacher_model={"code": models[0], "prose": models[1]},
                            args=training_args(tmp_path), teacher_weights={"code": 1.0, "poetry": 3.0})
    with pytest.raises(ValueError, match="pass teacher_model as a dict of them"):
        DistillationTrainer(model=student, teacher_model=models, args=training_args(tmp_path),
                            teacher_weights={"code": 1.0, "prose": 3.0})
