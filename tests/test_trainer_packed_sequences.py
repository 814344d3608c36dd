"""DistillationTrainer on packed (padding-free) batches, as transformers' DataCollatorWithFlattening and TRL's
`padding_free=True` make them: the examples laid end to end in one row, positions restarting at each. The loss and
the student's gradients equal those of the same examples padded (each model attends within each example), with one
teacher, two mixed or routed by example, a sparse teacher's columns; training steps through the collator equal padded
ones; lengths without positions are refused."""

import copy

import pytest
import torch
from tiny_models import VOCAB, student_and_teacher, tiny_llama, training_args
from transformers import DataCollatorWithFlattening, default_data_collator

from kdfast.integrations.transformers import DistillationTrainer

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)
LENGTHS = (7, 5, 9)


def examples(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=generator) for length in LENGTHS]


def padded(rows, **columns):
    """The examples padded on the right to the longest, labels -100 on the padding; each column (a list of
    per-example tensors, [length, ...]) padded alike."""
    width = max(len(row) for row in rows)

    def pad(values, fill):
        return torch.stack([torch.cat([value, value.new_full((width - len(value), *value.shape[1:]), fill)])
                            for value in values])

    mask = pad([torch.ones_like(row) for row in rows], 0)
    ids = pad(rows, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {**batch, **{name: pad(values, fill) for name, (values, fill) in columns.items()}}


def packed(rows, **columns):
    """DataCollatorWithFlattening's batch of the examples (one row, positions restarting at each, each example's
    first label -100), each column concatenated alike."""
    batch = dict(DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": row.tolist()} for row in rows]))
    return {**batch, **{name: torch.cat(values)[None] for name, (values, _) in columns.items()}}


def loss_and_gradients(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in trainer.model.named_parameters()}


def assert_packed_equals_padded(trainer, packed_batch, padded_batch):
    loss, grads = loss_and_gradients(trainer, packed_batch)
    expected, expected_grads = loss_and_gradients(trainer, padded_batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_packing_gives_the_padded_loss_and_gradients(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path), **SETTINGS)
    rows = examples()
    assert_packed_equals_padded(trainer, packed(rows), padded(rows))
    # Not by chance: the same row read as one example (no positions) is another loss.
    single = {key: value for key, value in packed(rows).items() if key != "position_ids"}
    with torch.no_grad():
        difference = trainer.compute_loss(trainer.model, single) - trainer.compute_loss(trainer.model, packed(rows))
    assert abs(difference) > 1e-4


def test_packing_with_two_mixed_teachers(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    trainer = DistillationTrainer(model=student, teacher_model=[teacher, tiny_llama(48, seed=2)],
                                  args=training_args(tmp_path), teacher_weights=[1.0, 3.0], **SETTINGS)
    rows = examples(seed=1)
    assert_packed_equals_padded(trainer, packed(rows), padded(rows))


@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_packed_examples_routed_to_their_teachers(tmp_path, combine):
    """A teacher_id per example: in a packed row each position takes its example's teacher."""
    student, teacher = student_and_teacher(head_scale=4.0)
    trainer = DistillationTrainer(model=student, teacher_model=[teacher, tiny_llama(48, seed=2)],
                                  args=training_args(tmp_path), teacher_combine=combine, **SETTINGS)
    rows, route = examples(seed=4), torch.tensor([1, 0, 1])
    assert_packed_equals_padded(trainer, {**packed(rows), "teacher_id": route},
                                {**padded(rows), "teacher_id": route})
    with pytest.raises(ValueError, match=r"teacher_id column has 2 entries but its position_ids start 3 examples"):
        trainer.compute_loss(trainer.model, {**packed(rows), "teacher_id": route[:2]})


def test_a_routed_training_step_through_the_flattening_collator(tmp_path):
    """The trainer keeps each example's teacher_id beside the flattening collator's row."""
    student, teacher = student_and_teacher(head_scale=4.0)
    teachers, rows = [teacher, tiny_llama(48, seed=2)], examples(seed=5)
    batch = padded(rows)
    names = ["1", "0", "1"]
    whole = [{**{key: value[index] for key, value in batch.items()}, "teacher_id": names[index]}
             for index in range(len(rows))]
    expected = _one_step(tmp_path, copy.deepcopy(student), teachers, whole, default_data_collator)
    stepped = _one_step(tmp_path, copy.deepcopy(student), teachers,
                        [{"input_ids": row.tolist(), "teacher_id": name} for row, name in zip(rows, names)],
                        DataCollatorWithFlattening())
    for name, param in stepped.items():
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packing_with_a_sparse_teachers_columns(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    rows = examples(seed=2)
    with torch.no_grad():
        # Row j the teacher's distribution of token j (row 0 padding), top 5 at T = 2, per example.
        logprobs = [torch.log_softmax(teacher(input_ids=row[None]).logits[0, :-1] / 2.0, -1).topk(5) for row in rows]
    ids = [torch.cat([torch.full((1, 5), -1), top.indices]) for top in logprobs]
    values = [torch.cat([torch.zeros(1, 5), top.values]) for top in logprobs]
    columns = dict(teacher_ids=(ids, -1), teacher_logprobs=(values, 0.0))
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), divergence="forward_kl",
                                  temperature=2.0, kd_weight=0.7, ce_weight=0.4,
                                  train_dataset=[{"input_ids": row, "teacher_ids": i, "teacher_logprobs": v}
                                                 for row, i, v in zip(rows, ids, values)])
    assert_packed_equals_padded(trainer, packed(rows, **columns), padded(rows, **columns))


def _one_step(tmp_path, student, teacher, dataset, collator):
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=len(LENGTHS), optim="sgd",
                         learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=collator, **SETTINGS)
    trainer.train()
    return {name: param.detach() for name, param in student.named_parameters()}


def test_a_training_step_through_the_flattening_collator_equals_a_padded_one(tmp_path):
    """The Trainer's own count of the batch's label tokens (num_items_in_batch) and the collator's layout."""
    student, teacher = student_and_teacher(head_scale=4.0)
    rows = examples(seed=3)
    batch = padded(rows)
    whole = [{key: value[index] for key, value in batch.items()} for index in range(len(rows))]
    expected = _one_step(tmp_path, copy.deepcopy(student), teacher, whole, default_data_collator)
    stepped = _one_step(tmp_path, copy.deepcopy(student), teacher, [{"input_ids": row.tolist()} for row in rows],
                        DataCollatorWithFlattening())
    assert any(not torch.equal(stepped[name], param) for name, param in student.named_parameters())
    for name, param in stepped.items():
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lengths_without_positions_are_refused(tmp_path):
    """Flash-attention's lengths alone reach its kernels only: SDPA and eager attention would cross examples."""
    student, teacher = student_and_teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path), **SETTINGS)
    batch = dict(DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True,
                                            return_position_ids=False)([{"input_ids": row.tolist()}
                                                                        for row in examples()]))
    with pytest.raises(ValueError, match=r"holds \['cu_seq_lens_k', 'cu_seq_lens_q', .*but no position_ids"):
        trainer.compute_loss(trainer.model, batch)
