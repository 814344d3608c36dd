"""The trainers' loss through the wrappers distributed training puts around the student: a DDP-wrapped student gets
the same loss and gradients (its forward is entered through DDP), and under DeepSpeed ZeRO-3 the partitioned
LM-head weights are gathered for the loss (checked with a stand-in for deepspeed; no GPU cluster here)."""

import contextlib

import torch
import torch.distributed as dist
from tiny_models import student_and_teacher, token_batch, training_args

from kdfast.integrations import sharding
from kdfast.integrations.transformers import DistillationTrainer


@contextlib.contextmanager
def _single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_student_enters_through_ddp_and_matches(tmp_path):
    batch = token_batch()
    grads = []
    for wrap in (False, True):
        student, teacher = student_and_teacher()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path))
        with _single_process_group() if wrap else contextlib.nullcontext():
            model = torch.nn.parallel.DistributedDataParallel(student) if wrap else student
            calls = []
            if wrap:
                model.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(module))
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            assert calls == ([model] if wrap else []), "the loss must enter through DDP's forward"
            assert "forward" not in student.__dict__, "the student's forward must be restored"
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (plain_loss, plain_grads), (ddp_loss, ddp_grads) = grads
    torch.testing.assert_close(ddp_loss, plain_loss)
    for ddp_grad, plain_grad in zip(ddp_grads, plain_grads):
        torch.testing.assert_close(ddp_grad, plain_grad)


def test_zero3_partitioned_head_weights_are_gathered(tmp_path, zero3_gathers):
    student, teacher = student_and_teacher(tie_word_embeddings=True)
    for model in (student, teacher):
        model.lm_head.weight.ds_id = id(model)  # what ZeRO-3 marks its partitioned parameters with
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path))
    trainer.compute_loss(trainer.model, token_batch()).backward()
    assert len(zero3_gathers) == 2, "one gather per model's head"
    for params, model in zip(zero3_gathers, (student, teacher)):
        assert len(params) == 1 and params[0] is model.lm_head.weight


def test_without_zero3_nothing_is_gathered():
    student, teacher = student_and_teacher()
    assert isinstance(sharding.gathered(student.lm_head.weight, None), contextlib.nullcontext)
