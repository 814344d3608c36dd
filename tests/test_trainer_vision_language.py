"""DistillationTrainer on vision-language batches: the images reach the student's and every teacher's multimodal
backbone (as TRL's DistillationTrainer passes them), so the loss and the student's gradients (its vision tower's
included) are those of the two models' own logits with the images; routed teachers run on every example; a text
model given images, and a teacher that saw text alone, are refused by name. Tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA and Gemma-3 models from Liger-Kernel's mini-model configs."""

import copy

import pytest
import torch
import transformers
from tiny_models import tiny_llama, training_args
from vision_batches import FAMILIES, model_logits, vision_models, with_labels

from kdfast.integrations.transformers import DistillationTrainer
from kdfast.reference import distill_loss_reference, sparse_distill_loss_reference

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def make_trainer(tmp_path, student, teacher, **settings):
    return DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                               **{**SETTINGS, **settings})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_and_gradients_equal_the_models_own_logits_with_images(tmp_path, family):
    (student, teacher), make_batch = vision_models(family)
    batch = with_labels(make_batch(student, seed=3))
    reference_student = copy.deepcopy(student)
    trainer = make_trainer(tmp_path, student, teacher)
    student.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    reference_student.train()
    with torch.no_grad():
        teacher_logits = model_logits(teacher, batch)
    expected = distill_loss_reference(model_logits(reference_student, batch), teacher_logits, batch["labels"][:, 1:],
                                      **SETTINGS)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    vision_grads = 0
    for (name, param), reference in zip(student.named_parameters(), reference_student.parameters()):
        if reference.grad is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        # In L2: the vision tower's long chain moves single small elements by float32 rounding (and an attention key
        # bias's gradient is rounding alone: the softmax ignores it).
        error, size = (param.grad - reference.grad).norm().item(), reference.grad.norm().item()
        assert error <= 1e-4 * size + 1e-6, (name, error, size)
        vision_grads += any(part in name for part in ("vision", "visual", "multi_modal_projector")) and size > 1e-4
    assert vision_grads, "no gradient reached the student's vision tower or projector: the images were not seen"


def test_the_images_change_the_loss(tmp_path):
    """The loss is not the text decoder's on the placeholders: other images, another loss."""
    (student, teacher), make_batch = vision_models("qwen2_vl")
    batch = with_labels(make_batch(student, seed=3))
    trainer = make_trainer(tmp_path, student, teacher)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        other = trainer.compute_loss(trainer.model, {**batch, "pixel_values": batch["pixel_values"].flip(0)})
    assert abs(loss.item() - other.item()) > 1e-4, (loss.item(), other.item())


@pytest.mark.parametrize("combine", ["mixture", "average"])
def test_routed_teachers_see_the_images_of_every_example(tmp_path, combine):
    """A teacher_id column routes each example to one teacher; the images are not split by example (Qwen's patches
    of every image are one tensor), so each teacher runs on the whole batch and its rows are taken."""
    (student, *teachers), make_batch = vision_models("qwen2_vl", count=2)
    batch = {**with_labels(make_batch(student, seed=5)), "teacher_id": torch.tensor([1, 0])}
    trainer = make_trainer(tmp_path, student, teachers, teacher_combine=combine)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        first, second = (model_logits(teacher, batch) for teacher in teachers)
        routed = torch.where(batch["teacher_id"][:, None, None] == 0, first, second)
        expected = distill_loss_reference(model_logits(student, batch), routed, batch["labels"][:, 1:], **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_mixed_teachers_see_the_images(tmp_path):
    from kdfast.reference import multi_teacher_distill_loss_reference

    (student, *teachers), make_batch = vision_models("llava", count=2)
    batch = with_labels(make_batch(student, seed=7))
    trainer = make_trainer(tmp_path, student, teachers, teacher_weights=[0.25, 0.75])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        expected = multi_teacher_distill_loss_reference(
            model_logits(student, batch), [model_logits(teacher, batch) for teacher in teachers],
            batch["labels"][:, 1:], weights=[0.25, 0.75], **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_sparse_teachers_columns_with_the_students_images(tmp_path):
    """Top-k rows of a vision-language teacher given as dataset columns: the student sees the batch's images."""
    from kdfast.teacher_cache.targets import top_k_targets

    (student, teacher), make_batch = vision_models("gemma3")
    batch = with_labels(make_batch(student, seed=9))
    with torch.no_grad():
        ids, logprobs = top_k_targets(model_logits(teacher, batch), 6, 2.0)
    # Row j the teacher's distribution of token j: row 0 padding.
    ids = torch.cat([torch.full_like(ids[:, :1], -1), ids], 1)
    logprobs = torch.cat([torch.zeros_like(logprobs[:, :1]), logprobs], 1)
    batch = {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}
    examples = [{key: value[row] for key, value in batch.items()} for row in range(2)]
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path), train_dataset=examples,
                                  divergence="forward_kl", temperature=2.0, kd_weight=0.7, ce_weight=0.4)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        expected = sparse_distill_loss_reference(model_logits(student, batch), ids[:, 1:], logprobs[:, 1:],
                                                 batch["labels"][:, 1:], divergence="forward_kl", temperature=2.0,
                                                 kd_weight=0.7, ce_weight=0.4)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_text_teacher_given_images_is_refused(tmp_path):
    (student,), make_batch = vision_models("llava", count=0)
    teacher = tiny_llama(vocab=student.config.text_config.vocab_size, seed=1)
    trainer = make_trainer(tmp_path, student, teacher)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM's backbone LlamaModel takes no \['pixel_values'\]"):
        trainer.compute_loss(trainer.model, with_labels(make_batch(student, seed=1)))


def test_a_teacher_that_saw_text_alone_is_refused_on_images(tmp_path):
    """A served teacher's prompt log-probs are of the text alone (the local stand-in of a vLLM server)."""
    from kdfast.teacher_cache.local_server import serving

    (student,), make_batch = vision_models("llava", count=0)
    vocab = student.config.text_config.vocab_size
    with serving(tiny_llama(vocab=vocab, seed=1), api="vllm", vocab_size=vocab) as url:
        trainer = DistillationTrainer(model=student, args=training_args(tmp_path), teacher_server=url)
        with pytest.raises(ValueError, match=r"\['pixel_values'\]\) but the teacher given by teacher_server sees"):
            trainer.compute_loss(trainer.model, with_labels(make_batch(student, seed=1)))


def test_training_steps_on_image_examples(tmp_path):
    """trainer.train() through the Trainer's column filter and default collator: the images reach the loss and
    the student's vision tower learns."""
    (student, teacher), make_batch = vision_models("llava")
    batch = with_labels(make_batch(student, seed=11))
    examples = [{key: value[row] for key, value in batch.items()} for row in range(2)]
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=examples,
                                  data_collator=transformers.default_data_collator, **SETTINGS)
    vision = {name: param.detach().clone() for name, param in student.named_parameters() if "vision" in name}
    trainer.train()
    assert any(not torch.equal(param, vision[name]) for name, param in student.named_parameters() if name in vision)


def test_trls_trainer_on_kdfast_equals_trls_own_with_images(tmp_path):
    """kdfast's TRL DistillationTrainer passes the images as TRL's own does: the same loss, logged entropy and
    gradients on a completion batch whose prompts hold an image."""
    import warnings

    trl = pytest.importorskip("trl")
    if not hasattr(trl, "DistillationTrainer"):
        pytest.skip("TRL before 1.16 has no stable DistillationTrainer")
    from datasets import Dataset
    from test_trl_distillation import loss_entropy_and_gradients
    from tiny_models import word_tokenizer

    from kdfast.integrations.trl import DistillationTrainer as TRLDistillationTrainer

    (student, teacher), make_batch = vision_models("qwen2_vl")
    images = make_batch(student, seed=13)
    prompt, completion = images["input_ids"][:, :5], images["input_ids"][:, 5:]
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 4:] = 0
    batch = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
             "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum().float(),
             **{key: images[key] for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}}
    results = []
    for cls in (trl.DistillationTrainer, TRLDistillationTrainer):
        config = trl.DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                                        disable_tqdm=True, max_completion_length=4, bf16=False, beta=0.5,
                                        temperature=2.0, per_device_train_batch_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=config,
                          processing_class=word_tokenizer(), train_dataset=Dataset.from_dict({"prompt": ["w2"] * 2}))
        results.append(loss_entropy_and_gradients(trainer, dict(batch)))
    (expected, expected_entropy, expected_grads), (loss, entropy, grads) = results
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert entropy == pytest.approx(expected_entropy, rel=1e-4)
    assert any("visual" in name and grad is not None and grad.any() for name, grad in grads.items())
    for name, grad in grads.items():
        if expected_grads[name] is None:
            assert grad is None or not grad.any(), name
            continue
        error, size = (grad - expected_grads[name]).norm().item(), expected_grads[name].norm().item()
        assert error <= 1e-4 * size + 1e-6, (name, error, size)


def test_a_peft_student_sees_the_images(tmp_path):
    """A LoRA student: the images reach the multimodal backbone under the adapter's wrapper."""
    peft = pytest.importorskip("peft")
    (student, teacher), make_batch = vision_models("qwen2_5_vl")
    student = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    batch = with_labels(make_batch(student.get_base_model(), seed=15))
    trainer = make_trainer(tmp_path, student, teacher)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        expected = distill_loss_reference(model_logits(student, batch), model_logits(teacher, batch),
                                          batch["labels"][:, 1:], **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
