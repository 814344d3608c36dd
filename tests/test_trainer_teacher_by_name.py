"""DistillationTrainer with a teacher given by name (a local folder here; a Hub id loads the same way): loaded as
TRL's DistillationTrainer loads one (the class its config names, `teacher_model_init_kwargs` for `from_pretrained`), it
gives the loss of the same model given as an object; a vision-language teacher loads as its own class; several
teachers by name and by object mix; bad keywords are refused."""

import pytest
import torch
from tiny_models import student_and_teacher, tiny_llama, token_batch, training_args
from vision_batches import model_logits, vision_models, with_labels

from kdfast.integrations.transformers import DistillationTrainer

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def saved(model, folder):
    model.save_pretrained(folder)
    return str(folder)


def loss_of(tmp_path, student, teacher, batch, **settings):
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                  **{**SETTINGS, **settings})
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch), trainer


def test_a_teacher_folder_gives_the_loss_of_the_model_object(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    expected, _ = loss_of(tmp_path, student, teacher, batch)
    loss, trainer = loss_of(tmp_path, student, saved(teacher, tmp_path / "teacher"), batch)
    assert type(trainer.teacher_model) is type(teacher) and not trainer.teacher_model.training
    assert not any(param.requires_grad for param in trainer.teacher_model.parameters())
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_init_kwargs_reach_from_pretrained(tmp_path):
    """The keywords are from_pretrained's (here the attention implementation); the loaded teacher is put in the
    student's dtype whatever it loaded in."""
    student, teacher = student_and_teacher(head_scale=4.0)
    folder = saved(teacher, tmp_path / "teacher")
    _, trainer = loss_of(tmp_path, student, folder, token_batch(),
                         teacher_model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    assert trainer.teacher_model.config._attn_implementation == "eager"
    assert trainer.teacher_model.dtype == torch.float32


def test_a_vision_language_teacher_loads_as_its_own_class(tmp_path):
    (student, teacher), make_batch = vision_models("qwen2_vl")
    batch = with_labels(make_batch(student, seed=3))
    loss, trainer = loss_of(tmp_path, student, saved(teacher, tmp_path / "teacher"), batch)
    assert type(trainer.teacher_model) is type(teacher)
    from kdfast.reference import distill_loss_reference

    with torch.no_grad():
        expected = distill_loss_reference(model_logits(student, batch), model_logits(teacher, batch),
                                          batch["labels"][:, 1:], **SETTINGS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_teachers_by_name_and_by_object_mix(tmp_path):
    student, teacher = student_and_teacher(head_scale=4.0)
    second = tiny_llama(48, seed=2)
    batch = token_batch()
    expected, _ = loss_of(tmp_path, student, {"big": teacher, "small": second}, batch,
                          teacher_weights={"big": 1.0, "small": 3.0})
    loss, trainer = loss_of(tmp_path, student, {"big": saved(teacher, tmp_path / "big"), "small": second}, batch,
                            teacher_weights={"big": 1.0, "small": 3.0})
    assert trainer.teacher_names == ["big", "small"]
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_bad_init_kwargs_are_refused(tmp_path):
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match="teacher_model_init_kwargs are from_pretrained keywords for a teacher given"):
        DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                            teacher_model_init_kwargs={"dtype": "bfloat16"})
    with pytest.raises(ValueError, match=r"teacher_model_init_kwargs\['dtype'\] must be .*got 'half'"):
        DistillationTrainer(model=student, teacher_model=saved(teacher, tmp_path / "teacher"),
                            args=training_args(tmp_path), teacher_model_init_kwargs={"dtype": "half"})
