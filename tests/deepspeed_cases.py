"""What each rank runs in tests/test_deepspeed_zero3.py: a tiny LLaMA student in a real DeepSpeed ZeRO-3 engine (its
CPU accelerator, gloo) takes the trainers' fused loss, entered through the engine as DistillationTrainer enters it
(the partitioned LM-head weights gathered for the loss only), against the same student unsharded in the same
process. Every rank runs the same batch, so the averaged gradients are the single process's."""

from __future__ import annotations

import os

import torch

STEPS = 3
LR = 0.5
SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def _steps_against_unsharded(batch_loss, zero_optimization):
    """Loss, every parameter's gradient after one step, and the parameters after 3 SGD steps of the student in a
    ZeRO-3 engine equal the unsharded student's; `batch_loss(student, teacher, batch)` is entered through the
    engine."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from tiny_models import student_and_teacher, token_batch

    from kdfast.integrations.sharding import run_through_wrapper

    student, teacher = student_and_teacher(head_scale=4.0)
    reference, _ = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    # No gradient clipping (DeepSpeed's default clips at norm 1), so that a step is the plain SGD one.
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": zero_optimization, "gradient_clipping": 0.0,
              "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=config)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        loss = run_through_wrapper(engine, student, lambda inputs: batch_loss(student, teacher, inputs), batch)
        expected = batch_loss(reference, teacher, batch)
        engine.backward(loss)
        expected.backward()
        torch.testing.assert_close(loss, expected, msg=lambda m, step=step: f"loss at step {step}: {m}")
        if step == 0:
            for (name, param), ref in zip(student.named_parameters(), reference.parameters()):
                torch.testing.assert_close(safe_get_full_grad(param), ref.grad, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, name=name: f"gradient of {name}: {m}")
        engine.step()
        optimizer.step()
        optimizer.zero_grad()
    for (name, param), ref in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(safe_get_full_fp32_param(param), ref.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


def steps_case():
    """The trainers' loss (`batch_distill_loss`), ZeRO-3's default settings."""
    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.options import LossOptions

    opts = LossOptions(**SETTINGS)
    _steps_against_unsharded(lambda student, teacher, batch: batch_distill_loss(student, teacher, batch, opts),
                             {"stage": 3})


def per_row_case():
    """`linear_distill_loss` with reduction="none", its rows weighed: the backward runs the chunks again from the
    head, no parameter persistent (under the default every one of this tiny model's is kept whole). Entered through
    the engine, the head stays whole (active for the engine's module) until the step, so the backward's own gather
    (tests/test_zero3_per_row.py) finds nothing to do here; a forced release of it is refused by DeepSpeed."""
    import kdfast
    from kdfast.integrations.causal_lm import last_hidden_state
    from kdfast.integrations.sharding import whole_head

    def batch_loss(student, teacher, batch):
        hidden = last_hidden_state(student, batch["input_ids"], batch["attention_mask"])[:, :-1]
        with torch.no_grad():
            teacher_hidden = last_hidden_state(teacher, batch["input_ids"], batch["attention_mask"])[:, :-1]
        labels = batch["labels"][:, 1:]
        with whole_head(student, student.lm_head):
            rows = kdfast.linear_distill_loss(hidden, student.lm_head.weight, teacher_hidden,
                                              teacher.lm_head.weight.detach(), labels, reduction="none", chunk_size=16,
                                              **SETTINGS)
        weights = torch.linspace(0.5, 1.5, rows.numel()).reshape(rows.shape)
        return (rows * weights).sum() / labels.ne(-100).sum()

    _steps_against_unsharded(batch_loss, {"stage": 3, "stage3_param_persistence_threshold": 0})


CASES = {"zero3-steps": steps_case, "zero3-per-row": per_row_case}


def run_all(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from rank_cases import run_cases

    deepspeed.init_distributed(dist_backend="gloo")
    run_cases(CASES, out_path)
    torch.distributed.destroy_process_group()
