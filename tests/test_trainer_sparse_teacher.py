"""DistillationTrainer against a sparse teacher: dataset columns of top-k ids and log-probs, or a teacher cache. The
loss is the float64 reference's (and, with every id stored, the dense teacher's own loss); training runs end to end
through the Trainer's column handling and collator; a cache that does not fit the student is refused before
training."""

import datasets
import pytest
import torch
from tiny_models import VOCAB, student_and_teacher, token_batch, training_args, word_tokenizer

from kdfast.integrations.transformers import DistillationTrainer
from kdfast.reference import distill_loss_reference, sparse_distill_loss_reference
from kdfast.teacher_cache import SparseTeacherCollator, build_teacher_cache
from kdfast.teacher_cache.targets import top_k_targets

SETTINGS = dict(divergence="forward_kl", temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def teacher_targets(teacher, batch, k, temperature=2.0):
    """Label-aligned rows (row j: the teacher's distribution of token j; row 0 padding), as a cache stores them."""
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, logprobs = top_k_targets(logits[:, :-1], k, temperature)
    pad_ids, pad_logprobs = torch.full_like(ids[:, :1], -1), torch.zeros_like(logprobs[:, :1])
    return torch.cat([pad_ids, ids], 1), torch.cat([pad_logprobs, logprobs], 1)


def examples_with_targets(batch, ids, logprobs):
    return [{"input_ids": batch["input_ids"][row], "attention_mask": batch["attention_mask"][row],
             "labels": batch["labels"][row], "teacher_ids": ids[row], "teacher_logprobs": logprobs[row]}
            for row in range(batch["input_ids"].shape[0])]


def sparse_trainer(tmp_path, student, train, **settings):
    return DistillationTrainer(model=student, args=training_args(tmp_path), train_dataset=train,
                               **{**SETTINGS, **settings})


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_loss_from_dataset_columns_equals_float64_reference(tmp_path, tail):
    student, teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    ids, logprobs = teacher_targets(teacher, batch, k=5)
    trainer = sparse_trainer(tmp_path, student, examples_with_targets(batch, ids, logprobs), tail=tail)
    collated = trainer.data_collator(examples_with_targets(batch, ids, logprobs))
    loss = trainer.compute_loss(trainer.model, collated)
    with torch.no_grad():
        logits = student.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student.float()
    expected = sparse_distill_loss_reference(logits[:, :-1], ids[:, 1:], logprobs[:, 1:], batch["labels"][:, 1:],
                                             tail=tail, **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_every_id_stored_is_the_dense_teachers_loss(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    ids, logprobs = teacher_targets(teacher, batch, k=VOCAB)
    trainer = sparse_trainer(tmp_path, student, examples_with_targets(batch, ids, logprobs))
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples_with_targets(batch, ids, logprobs)))
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    dense = distill_loss_reference(logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], **SETTINGS)
    torch.testing.assert_close(loss.double(), dense, rtol=1e-4, atol=1e-5)


def test_trains_from_a_datasets_table_through_the_trainers_column_filter(tmp_path):
    student, teacher = student_and_teacher()
    batch = token_batch(rows=8)
    ids, logprobs = teacher_targets(teacher, batch, k=4)
    rows = [{key: value.tolist() for key, value in example.items()}
            for example in examples_with_targets(batch, ids, logprobs)]
    table = datasets.Dataset.from_list(rows)
    args = training_args(tmp_path, max_steps=6, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=table, **SETTINGS)
    collated = SparseTeacherCollator()(rows)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, collated).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, collated).item()
    assert after < before, (before, after)


@pytest.fixture
def cache_and_tokenizer(tmp_path):
    """A cache of the tiny teacher at T=2 over 8 windows of 12 tokens, made with the word tokenizer."""
    _, teacher = student_and_teacher()
    tokenizer = word_tokenizer()
    windows = torch.randint(2, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3))
    cache = build_teacher_cache(teacher, windows, tmp_path / "cache", tokenizer=tokenizer, k=6, temperature=2.0,
                                windows_per_shard=3, show_progress=False)
    return cache, tokenizer, windows


def test_trains_on_a_teacher_cache(tmp_path, cache_and_tokenizer):
    cache, tokenizer, windows = cache_and_tokenizer
    student, _ = student_and_teacher()
    args = training_args(tmp_path, max_steps=8, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, args=args, teacher_cache=cache.folder, processing_class=tokenizer,
                                  **SETTINGS)
    assert len(trainer.train_dataset) == 8 and trainer.vocab_size == VOCAB
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert torch.equal(batch["input_ids"], windows[:4])
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch).item()
    assert after < before, (before, after)


def test_a_cache_that_does_not_fit_is_refused_before_training(tmp_path, cache_and_tokenizer):
    cache, tokenizer, windows = cache_and_tokenizer
    student, teacher = student_and_teacher()
    args = training_args(tmp_path)

    def trainer(**settings):
        return DistillationTrainer(model=student, args=args, **{**SETTINGS, "teacher_cache": cache.folder,
                                                                "processing_class": tokenizer, **settings})

    with pytest.raises(ValueError, match="another tokenizer"):
        trainer(processing_class=word_tokenizer(VOCAB - 1))
    rows = [{"input_ids": row} for row in windows]
    trainer(train_dataset=rows)  # the cache's own windows, in order
    with pytest.raises(ValueError, match="row 1 of the training data differs from window 1"):
        trainer(train_dataset=[rows[0], rows[2], *rows[2:]])
    with pytest.raises(ValueError, match="row 0 .*11 vs 12 tokens"):
        trainer(train_dataset=[{"input_ids": row[:-1]} for row in windows])
    with pytest.raises(ValueError, match="log-probs at temperature 2.0 but the loss's temperature is 1.0"):
        trainer(temperature=1.0)
    assert trainer(temperature=1.0, tail="renormalize").distill_options.teacher_temperature == 2.0
    with pytest.raises(ValueError, match="pass one teacher, not teacher_model and teacher_cache"):
        trainer(teacher_model=teacher)
    with pytest.raises(ValueError, match="a teacher is required"):
        DistillationTrainer(model=student, args=args, train_dataset=[{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="missing \\['teacher_ids', 'teacher_logprobs'\\]"):
        trainer().compute_loss(student, token_batch())
