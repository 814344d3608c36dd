"""DistillationTrainer with a teacher of another tokenizer (`teacher_tokenizer=`): the collator's alignment covers the
text, `batch_cross_vocab_loss` equals the loss of both models' full logits (`kdfast.cross_vocab_distill_loss` plus
torch's CE) in value and student gradients, the trainer trains and logs kd_loss / ce_loss, and bad settings are
refused naming the argument. Two byte-level BPE tokenizers of different sizes, each trained on one kind of text, so
each vocabulary holds tokens the other lacks and groups merge tokens on both sides."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, training_args

import kdfast
from kdfast.demo.corpus import train_tokenizer
from kdfast.integrations.cross_tokenizer import CrossTokenizerCollator, batch_cross_vocab_loss
from kdfast.integrations.transformers import DistillationTrainer

TEXTS = [f"def shape_{i}(size, name='ßeta'):\n    return size * {i} + len(name)  # côté {i % 7}\n" for i in range(60)]
TEXTS += [f"class Point{i}:\n    x = {i * 3}; y = 'naïve {i}'\n" for i in range(60)]
MIXED = TEXTS[:3] + TEXTS[60:63]  # each tokenizer the coarser on one half
SETTINGS = dict(divergence="forward_kl", beta=0.5, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


@pytest.fixture(scope="module")
def tokenizers():
    return train_tokenizer(TEXTS[:60], 300), train_tokenizer(TEXTS[60:], 360)


def models(student_tokenizer, teacher_tokenizer):
    # The teacher's head is padded past its tokenizer: the loss must leave those rows out.
    return (tiny_llama(32, layers=1, vocab=len(student_tokenizer), seed=0),
            tiny_llama(32, layers=1, vocab=len(teacher_tokenizer) + 3, seed=1))


def rows_of_sample(side, sample, alignment):
    mine = alignment.sample == sample
    extra = mine[side.extra_groups] if side.extra_groups.numel() else side.extra_groups.bool()
    return sorted(side.base[mine].tolist() + side.extra_rows[extra].tolist())


@pytest.mark.parametrize("max_length", [None, 12])
def test_the_alignment_covers_the_text(tokenizers, max_length):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer, max_length)([{"text": t} for t in MIXED])
    alignment = batch["alignment"]
    if max_length is None:
        assert alignment.student.extra_rows.numel() and alignment.teacher.extra_rows.numel(), "no merges: weak test"
    first_groups = []
    for prefix, tokenizer, side in (("", student_tokenizer, alignment.student),
                                    ("teacher_", teacher_tokenizer, alignment.teacher)):
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        texts = []
        for b in range(ids.shape[0]):
            count = int(mask[b].sum())
            assert max_length is None or count <= max_length
            # Every token after the first group (which holds the first token, that no row predicts, and is dropped)
            # is predicted by row b * L + k - 1, in exactly one group.
            rows = rows_of_sample(side, b, alignment)
            first = count - len(rows)
            assert rows == [b * ids.shape[1] + k - 1 for k in range(first, count)]
            texts.append(tokenizer.decode(ids[b, :first]))
        first_groups.append(texts)
    assert first_groups[0] == first_groups[1], "the dropped first groups cover the same text on both sides"
    assert any(len(text) > 1 for text in first_groups[0])
    for b in range(6):
        kept_s, kept_t = batch["attention_mask"][b].bool(), batch["teacher_attention_mask"][b].bool()
        student_text = student_tokenizer.decode(batch["input_ids"][b, kept_s])
        teacher_text = teacher_tokenizer.decode(batch["teacher_input_ids"][b, kept_t])
        assert student_text == teacher_text, "both sides must keep the same text"
        assert student_text == MIXED[b] or max_length is not None
    assert batch["labels"].eq(-100).equal(batch["attention_mask"].eq(0))


def eager_loss(student, teacher, batch, vocab_map, method, **settings):
    """The same loss from both models' full logits: kdfast's logits form over the groups plus torch's CE."""
    kd_weight, ce_weight = settings.pop("kd_weight"), settings.pop("ce_weight")
    vocab_s, vocab_t = vocab_map.student_size, vocab_map.teacher_size
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                 attention_mask=batch["teacher_attention_mask"]).logits[..., :vocab_t]
    kd = kdfast.cross_vocab_distill_loss(logits.reshape(-1, vocab_s), teacher_logits.reshape(-1, vocab_t),
                                         vocab_map=vocab_map, alignment=batch["alignment"], method=method, **settings)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab_s), batch["labels"][:, 1:].reshape(-1))
    return kd_weight * kd + ce_weight * ce


@pytest.mark.parametrize("method,divergence", [("hybrid", "jsd"), ("uld", "forward_kl"), ("mapped", "reverse_kl")])
def test_the_loss_equals_the_full_logits_loss(tokenizers, method, divergence):
    student_tokenizer, teacher_tokenizer = tokenizers
    student, teacher = models(*tokenizers)
    vocab_map = kdfast.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    batch = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer, 20)([{"text": t} for t in MIXED])
    assert batch["alignment"].student.extra_rows.numel() and batch["alignment"].teacher.extra_rows.numel()
    settings = {**SETTINGS, "divergence": divergence}
    reference_student = copy.deepcopy(student)
    loss, parts = batch_cross_vocab_loss(student, teacher, batch, vocab_map, method=method, **settings)
    loss.backward()
    expected = eager_loss(reference_student, teacher, batch, vocab_map, method, **settings)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, param), reference in zip(student.named_parameters(), reference_student.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert parts.kd is not None and parts.ce is not None
    # One of two equal micro-batches of an accumulated batch: half the loss.
    count, groups = batch["labels"][:, 1:].ne(-100).sum(), batch["alignment"].groups
    halved, _ = batch_cross_vocab_loss(student, teacher, batch, vocab_map, method=method, **settings,
                                       num_items_in_batch=2 * count, groups_in_batch=torch.tensor(2 * groups))
    torch.testing.assert_close(halved, loss.detach() / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["hybrid", "uld", "mapped"])
def test_micro_batches_add_up_to_the_accumulated_batch(tokenizers, method):
    """Each tokenizer is the coarser on one half of MIXED, so the two halves have different groups per label token:
    the KD term must divide by the accumulated batch's groups, the CE by its label tokens."""
    student_tokenizer, teacher_tokenizer = tokenizers
    student, teacher = models(*tokenizers)
    vocab_map = kdfast.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    collate = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer)
    whole = collate([{"text": t} for t in MIXED])
    halves = [collate([{"text": t} for t in MIXED[:3]]), collate([{"text": t} for t in MIXED[3:]])]
    ratios = [half["alignment"].groups / half["labels"][:, 1:].ne(-100).sum().item() for half in halves]
    assert abs(ratios[0] - ratios[1]) > 0.05, f"groups per label token {ratios}: a weak test"
    count = whole["labels"][:, 1:].ne(-100).sum()
    groups = torch.tensor(whole["alignment"].groups)
    reference_student = copy.deepcopy(student)
    expected, _ = batch_cross_vocab_loss(reference_student, teacher, whole, vocab_map, method=method, **SETTINGS)
    expected.backward()
    summed = sum(batch_cross_vocab_loss(student, teacher, half, vocab_map, method=method, **SETTINGS,
                                        num_items_in_batch=count, groups_in_batch=groups)[0] for half in halves)
    summed.backward()
    torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-6)
    for (name, param), reference in zip(student.named_parameters(), reference_student.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="groups_in_batch"):
        batch_cross_vocab_loss(student, teacher, whole, vocab_map, num_items_in_batch=count)


def trainer_for(tmp_path, tokenizers, args_overrides=None, **settings):
    import datasets

    student_tokenizer, teacher_tokenizer = tokenizers
    student, teacher = models(student_tokenizer, teacher_tokenizer)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    args = training_args(tmp_path, max_steps=3, learning_rate=1e-2, logging_strategy="steps", logging_steps=1,
                         **(args_overrides or {}))
    return DistillationTrainer(model=student, teacher_model=teacher, teacher_tokenizer=teacher_tokenizer,
                               processing_class=student_tokenizer, args=args, train_dataset=data,
                               eval_dataset=data.select(range(4)), **{**SETTINGS, **settings})


@pytest.mark.parametrize("method", ["hybrid", "uld"])
def test_the_trainer_trains_and_logs_the_parts(tmp_path, tokenizers, method):
    trainer = trainer_for(tmp_path, tokenizers, cross_vocab=method)
    before = [param.detach().clone() for param in trainer.model.parameters()]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        assert "kd_loss" in entry and "ce_loss" in entry
        # GOLD's hybrid splits its divergence into the matched tokens' and the rest's, logged under TRL's names.
        split = {"matched_loss", "unmatched_loss"} & entry.keys()
        assert split == ({"matched_loss", "unmatched_loss"} if method == "hybrid" else set())
        if split:
            assert entry["matched_loss"] >= 0 and entry["unmatched_loss"] >= 0
    assert any(not param.equal(old) for param, old in zip(trainer.model.parameters(), before))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, tokenizers):
    """Two micro-batches of 3 texts, one SGD step: the update is the whole batch's gradient (the Trainer counts the
    accumulated batch's label tokens; the trainer its aligned groups)."""
    import datasets

    student_tokenizer, teacher_tokenizer = tokenizers
    student, teacher = models(*tokenizers)
    reference = copy.deepcopy(student)
    vocab_map = kdfast.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    whole = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer)([{"text": t} for t in MIXED])
    batch_cross_vocab_loss(reference, teacher, whole, vocab_map, **SETTINGS)[0].backward()
    learning_rate = 0.5
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                         optim="sgd", learning_rate=learning_rate, max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, teacher_tokenizer=teacher_tokenizer,
                                  processing_class=student_tokenizer, args=args,
                                  train_dataset=datasets.Dataset.from_dict({"text": MIXED}), **SETTINGS)
    trainer.train()
    for (name, param), before in zip(student.named_parameters(), reference.parameters()):
        slack = 4 * torch.finfo(torch.float32).eps * before.abs().max().item() / learning_rate
        torch.testing.assert_close((before.detach() - param.detach()) / learning_rate, before.grad, rtol=1e-4,
                                   atol=1e-6 + slack, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_bad_settings_name_the_argument(tmp_path, tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    student, teacher = models(student_tokenizer, teacher_tokenizer)
    args = training_args(tmp_path)
    cases = [(dict(teacher_tokenizer=teacher_tokenizer, cross_vocab="gold"), "cross_vocab"),
             (dict(cross_vocab="uld"), "teacher_tokenizer"),
             (dict(teacher_tokenizer=teacher_tokenizer, teacher_model=[teacher, teacher]), "teacher_tokenizer"),
             (dict(teacher_tokenizer=teacher_tokenizer, processing_class=None), "processing_class"),
             (dict(teacher_tokenizer=teacher_tokenizer, cross_vocab="uld", divergence="jsd"), "cross_vocab"),
             (dict(teacher_tokenizer=teacher_tokenizer, label_smoothing=0.1), "label_smoothing")]
    for settings, name in cases:
        kwargs = dict(model=student, teacher_model=teacher, args=args, processing_class=student_tokenizer)
        with pytest.raises(ValueError, match=name):
            DistillationTrainer(**{**kwargs, **settings})


def test_compiled_steps_are_one_graph_and_equal_the_eager_ones(tmp_path, tokenizers):
    # The cross-vocabulary op, and the CE over every row (padding weighed 0) where a mask's rows would be data.
    from torch._dynamo.utils import counters

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        # The backend is the Trainer's from its arguments (accelerate's dynamo plugin is made with the Trainer): set
        # on trainer.args afterwards it went unread, and inductor compiled the steps (60 of the test's 80 s).
        overrides = dict(optim="sgd", max_grad_norm=0.0, torch_compile=compiled,
                         **({"torch_compile_backend": "aot_eager"} if compiled else {}))
        trainer = trainer_for(tmp_path / str(compiled), tokenizers, args_overrides=overrides, cross_vocab="hybrid")
        assert not compiled or trainer.accelerator.state.dynamo_plugin.to_kwargs()["backend"] == "aot_eager"
        trainer.train()
        results.append(([param.detach().clone() for param in trainer.model.parameters()],
                        counters["stats"]["unique_graphs"], dict(counters["graph_break"])))
    (eager, eager_graphs, _), (compiled, compiled_graphs, breaks) = results
    assert eager_graphs == 0 and compiled_graphs >= 1 and breaks == {}
    for after, expected in zip(compiled, eager):
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
