"""DistillationTrainer on tiny random Llama models: its loss is the float64 reference's, training lowers it,
gradient accumulation is exact, and PEFT, gradient checkpointing, bf16 autocast, tied embeddings, softcapping and
padded vocabularies work."""

import copy

import pytest
import torch
from tiny_models import (
    VOCAB,
    as_examples,
    reference_loss,
    student_and_teacher,
    tiny_llama,
    token_batch,
    training_args,
)

from kdfast.integrations.transformers import DistillationTrainer

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def make_trainer(tmp_path, student, teacher, train=None, args=None, **settings):
    return DistillationTrainer(model=student, teacher_model=teacher, args=args or training_args(tmp_path),
                               train_dataset=train, **{**SETTINGS, **settings})


@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_equals_float64_reference(tmp_path, num_items):
    student, teacher = student_and_teacher()
    batch = token_batch()
    trainer = make_trainer(tmp_path, student, teacher)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    expected = reference_loss(student, teacher, batch, num_items_in_batch=num_items, **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradients_equal_float64_reference_with_tied_embeddings(tmp_path):
    student, teacher = student_and_teacher(tie_word_embeddings=True)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    batch = token_batch()
    trainer = make_trainer(tmp_path, student, teacher)
    trainer.compute_loss(trainer.model, batch).backward()
    student64 = copy.deepcopy(student).double()
    student64.zero_grad()
    reference_loss_value = _reference_with_model(student64, teacher, batch)
    reference_loss_value.backward()
    for (name, param), param64 in zip(student.named_parameters(), student64.parameters()):
        torch.testing.assert_close(param.grad.double(), param64.grad, rtol=1e-4, atol=1e-6, msg=name)


def _reference_with_model(student64, teacher, batch):
    from kdfast.reference import distill_loss_reference

    logits = student64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = copy.deepcopy(teacher).double()(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]).logits[:, :-1]
    return distill_loss_reference(logits, teacher_logits, batch["labels"][:, 1:], **SETTINGS)


def test_training_steps_lower_the_loss(tmp_path):
    student, teacher = student_and_teacher()
    batch = token_batch()
    args = training_args(tmp_path, max_steps=12, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = make_trainer(tmp_path, student, teacher, train=as_examples(batch), args=args)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch).item()
    assert after < 0.8 * before, (before, after)


def _one_step_weights(tmp_path, batch_size, accumulation):
    student, teacher = student_and_teacher()
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=batch_size, optim="sgd",
                         gradient_accumulation_steps=accumulation, learning_rate=1.0, max_grad_norm=0.0,
                         lr_scheduler_type="constant")
    # Rows of different lengths: a per-micro-batch mean would weight them wrongly.
    trainer = make_trainer(tmp_path, student, teacher, train=as_examples(token_batch()), args=args)
    initial = copy.deepcopy(student.state_dict())
    trainer.train()
    return {name: value - initial[name] for name, value in student.state_dict().items()}


def test_gradient_accumulation_1x4_equals_4x1(tmp_path):
    whole = _one_step_weights(tmp_path, batch_size=4, accumulation=1)
    accumulated = _one_step_weights(tmp_path, batch_size=1, accumulation=4)
    assert any(update.abs().max() > 1e-4 for update in whole.values()), "the step changed nothing"
    for name, update in whole.items():
        torch.testing.assert_close(accumulated[name], update, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        student, teacher = student_and_teacher()
        trainer = make_trainer(tmp_path, student, teacher)
        if checkpointing:
            # transformers 5 renamed it; older releases have only the first name.
            enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
            enable()
            assert student.model.gradient_checkpointing
        student.train()
        trainer.compute_loss(trainer.model, token_batch()).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs_the_decoders_in_bf16(tmp_path):
    student, teacher = student_and_teacher()
    batch = token_batch()
    trainer = make_trainer(tmp_path, student, teacher, args=training_args(tmp_path, bf16=True))
    seen = []
    hook = student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss = trainer.compute_loss(trainer.model, batch)
    hook.remove()
    # The loss's forward, after the first batch's check of the student's own logits (two forwards on a few tokens).
    assert seen == [torch.bfloat16] * 3, "the Trainer's bf16 setting must reach the student's decoder"
    assert loss.dtype == torch.float32
    expected = reference_loss(student, teacher, batch, **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=3e-2, atol=3e-2)


def test_peft_lora_student_trains_only_its_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    student, teacher = student_and_teacher()
    lora = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    batch = token_batch()
    trainer = make_trainer(tmp_path, lora, teacher)
    loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss.double(), reference_loss(lora, teacher, batch, **SETTINGS), rtol=1e-5, atol=1e-6)
    loss.backward()
    trained = {name for name, p in lora.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in name for name in trained), trained


def test_peft_adapter_on_the_lm_head_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    student, teacher = student_and_teacher()
    lora = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    trainer = make_trainer(tmp_path, lora, teacher)
    with pytest.raises(ValueError, match="LM head carries a PEFT adapter"):
        trainer.compute_loss(trainer.model, token_batch())


def test_gemma2_softcapping_is_read_from_the_config(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma(hidden, seed):
        torch.manual_seed(seed)
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=16, final_logit_softcapping=2.0, pad_token_id=0))

    student, teacher = gemma(32, 0), gemma(64, 1)
    batch = token_batch()
    trainer = make_trainer(tmp_path, student, teacher)
    loss = trainer.compute_loss(trainer.model, batch)
    # The reference uses the models' own logits, which Gemma-2 softcaps; a cap of 2 changes the loss a lot.
    torch.testing.assert_close(loss.double(), reference_loss(student, teacher, batch, **SETTINGS), rtol=1e-5,
                               atol=1e-6)


def test_vocab_padding_rows_are_dropped(tmp_path):
    student = tiny_llama(32, vocab=VOCAB, seed=0)
    teacher = tiny_llama(64, vocab=VOCAB + 32, seed=1)  # the teacher's head padded by 32 rows
    batch = token_batch()
    trainer = make_trainer(tmp_path, student, teacher, vocab_size=VOCAB)
    loss = trainer.compute_loss(trainer.model, batch)
    expected = reference_loss(student, teacher, batch, vocab=VOCAB, **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    student, teacher = tiny_llama(32, vocab=VOCAB), tiny_llama(64, vocab=VOCAB + 32)
    trainer = make_trainer(tmp_path, student, teacher)
    with pytest.raises(ValueError, match="pass vocab_size"):
        trainer.compute_loss(trainer.model, token_batch())
    trainer = make_trainer(tmp_path, student, teacher, vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match="do not share that vocabulary"):
        trainer.compute_loss(trainer.model, token_batch())


def test_bad_settings_and_batches_are_clear_errors(tmp_path):
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match="a teacher is required"):
        DistillationTrainer(model=student, args=training_args(tmp_path))
    with pytest.raises(ValueError, match="temperature"):
        make_trainer(tmp_path, student, teacher, temperature=0.0)
    trainer = make_trainer(tmp_path, student, teacher)
    batch = token_batch()
    del batch["labels"]
    with pytest.raises(ValueError, match="needs `labels`"):
        trainer.compute_loss(trainer.model, batch)


def test_teacher_is_frozen_in_eval_mode_on_the_students_dtype(tmp_path):
    student, teacher = student_and_teacher()
    student.to(torch.bfloat16)
    trainer = make_trainer(tmp_path, student, teacher)
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in trainer.teacher_model.parameters())


def test_evaluate_reports_the_distillation_loss(tmp_path):
    student, teacher = student_and_teacher()
    batch = token_batch()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                  eval_dataset=as_examples(batch), **SETTINGS)
    metrics = trainer.evaluate()
    expected = reference_loss(student, teacher, batch, **SETTINGS).item()
    assert abs(metrics["eval_loss"] - expected) < 1e-4 * max(1.0, abs(expected)), (metrics, expected)
    kd = reference_loss(student, teacher, batch, **{**SETTINGS, "kd_weight": 1.0, "ce_weight": 0.0,
                                                    "t2_scale": False}).item()
    ce = reference_loss(student, teacher, batch, **{**SETTINGS, "kd_weight": 0.0, "ce_weight": 1.0}).item()
    assert metrics["eval_kd_loss"] == pytest.approx(kd, rel=1e-4)
    assert metrics["eval_ce_loss"] == pytest.approx(ce, rel=1e-4)
    assert 0.0 <= metrics["eval_token_accuracy"] <= 1.0 and metrics["eval_entropy"] > 0


def test_evaluations_parts_are_batch_means_as_its_loss_is(tmp_path):
    """Two evaluation batches, two teachers: the parts, each teacher's divergence among them, averaged over the
    batches as the Trainer averages eval_loss, add up to it with the loss's weights."""
    student, teacher = student_and_teacher()
    args = training_args(tmp_path, per_device_eval_batch_size=2)
    trainer = DistillationTrainer(model=student, teacher_model={"big": teacher, "small": tiny_llama(48, seed=2)},
                                  teacher_weights={"big": 1.0, "small": 3.0}, args=args,
                                  eval_dataset=as_examples(token_batch()), **SETTINGS)
    metrics = trainer.evaluate(metric_key_prefix="heldout")
    temperature = SETTINGS["temperature"]
    total = SETTINGS["kd_weight"] * temperature ** 2 * metrics["heldout_kd_loss"] + SETTINGS["ce_weight"] * \
        metrics["heldout_ce_loss"]
    assert total == pytest.approx(metrics["heldout_loss"], rel=1e-5)
    assert {"heldout_kd_loss_teacher_big", "heldout_kd_loss_teacher_small"} <= set(metrics)
    assert not trainer._logged_parts._sums, "an evaluation's parts stay out of the training logs"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_loss_parts_are_logged_beside_the_loss(tmp_path, accumulation):
    """kd_loss and ce_loss (before their weights), the student's entropy at T and token_accuracy, from the loss's own
    pass; with the weights they give the logged loss, and they equal the float64 reference's terms (no step moves
    the weights: lr 0)."""
    student, teacher = student_and_teacher()
    batch = token_batch()
    with torch.no_grad():  # labels that the student's argmax hits at every other position: accuracy near 1/2
        predicted = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    hits = torch.zeros_like(batch["labels"], dtype=torch.bool)
    hits[:, 1::2] = batch["labels"][:, 1::2] != -100
    shifted = torch.zeros_like(batch["labels"])
    shifted[:, 1:] = predicted[:, :-1]  # label j is predicted at position j - 1
    batch["labels"] = torch.where(hits, shifted, batch["labels"])
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4 // accumulation,
                         gradient_accumulation_steps=accumulation, learning_rate=0.0, logging_strategy="steps",
                         logging_steps=1)
    trainer = make_trainer(tmp_path, student, teacher, train=as_examples(batch), args=args)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    kd = reference_loss(student, teacher, batch, **{**SETTINGS, "kd_weight": 1.0, "ce_weight": 0.0,
                                                    "t2_scale": False}).item()
    ce = reference_loss(student, teacher, batch, **{**SETTINGS, "kd_weight": 0.0, "ce_weight": 1.0}).item()
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    kept = labels != -100
    accuracy = (((logits.argmax(-1) == labels) & kept).sum() / kept.sum()).item()
    log_q = (logits.double() / SETTINGS["temperature"]).log_softmax(-1)
    entropy = (-(log_q.exp() * log_q).sum(-1)[kept]).mean().item()
    for entry in logs:
        assert entry["entropy"] == pytest.approx(entropy, abs=2e-4)
        assert entry["kd_loss"] == pytest.approx(kd, abs=2e-4)
        assert entry["ce_loss"] == pytest.approx(ce, abs=2e-4)
        total = SETTINGS["kd_weight"] * SETTINGS["temperature"] ** 2 * entry["kd_loss"] + SETTINGS["ce_weight"] * \
            entry["ce_loss"]
        assert entry["loss"] == pytest.approx(total, abs=1e-3)
        assert 0.3 < entry["token_accuracy"] < 0.7
        if accumulation == 1:  # (with accumulation it is the micro-batches' mean)
            assert entry["token_accuracy"] == pytest.approx(accuracy, abs=1e-4)


def test_label_smoothing_and_z_loss_reach_the_trainers_loss(tmp_path):
    student, teacher = student_and_teacher()
    batch = token_batch()
    extra = dict(label_smoothing=0.1, z_loss_weight=1e-3)
    trainer = make_trainer(tmp_path, student, teacher, **extra)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    expected = reference_loss(student, teacher, batch, **{**SETTINGS, **extra})
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_fp32_logits_reaches_the_loss(tmp_path):
    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.options import LossOptions

    student, teacher = (model.to(torch.bfloat16) for model in student_and_teacher(head_scale=8.0))
    batch = token_batch()
    losses = {flag: make_trainer(tmp_path, student, teacher, fp32_logits=flag).compute_loss(student, batch)
              for flag in (True, False)}
    expected = batch_distill_loss(student, teacher, batch, LossOptions(**SETTINGS, reduction="mean"),
                                  fp32_logits=True)
    torch.testing.assert_close(losses[True], expected, rtol=0, atol=0)
    assert losses[True] != losses[False], "bf16 heads: float32 logits give another (closer) loss"
    with pytest.raises(ValueError, match="fp32_logits must be True or False"):
        make_trainer(tmp_path, student, teacher, fp32_logits="yes")


def test_a_text_model_given_images_is_refused(tmp_path):
    """Its backbone takes no pixel_values: a Llama decoder would drop them into its **kwargs unseen
    (vision-language models: tests/test_trainer_vision_language.py)."""
    student, teacher = student_and_teacher()
    trainer = make_trainer(tmp_path, student, teacher)
    batch = {**token_batch(), "pixel_values": torch.zeros(4, 3, 14, 14)}
    with pytest.raises(ValueError, match=r"LlamaModel takes no \['pixel_values'\]"):
        trainer.compute_loss(trainer.model, batch)
