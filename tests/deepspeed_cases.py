"""What each rank runs in tests/test_deepspeed_zero3.py: a tiny LLaMA student in a real DeepSpeed ZeRO-3 engine (its
CPU accelerator, gloo) takes the trainers' fused loss, entered through the engine as DistillationTrainer enters it
(the partitioned LM-head weights gathered for the loss only), against the same student unsharded in the same
process. Every rank runs the same batch, so the averaged gradients are the single process's."""

from __future__ import annotations

import os

import torch

STEPS = 3
LR = 0.5


def steps_case():
    """Loss, every parameter's gradient after one step, and the parameters after 3 SGD steps equal the unsharded
    student's."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from tiny_models import student_and_teacher, token_batch

    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.integrations.sharding import run_through_wrapper
    from kdfast.options import LossOptions

    opts = LossOptions(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)
    student, teacher = student_and_teacher(head_scale=4.0)
    reference, _ = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    # No gradient clipping (DeepSpeed's default clips at norm 1), so that a step is the plain SGD one.
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}, "gradient_clipping": 0.0,
              "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=config)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        loss = run_through_wrapper(engine, student, lambda inputs: batch_distill_loss(student, teacher, inputs, opts),
                                   batch)
        expected = batch_distill_loss(reference, teacher, batch, opts)
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


CASES = {"zero3-steps": steps_case}


def run_all(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from rank_cases import run_cases

    deepspeed.init_distributed(dist_backend="gloo")
    run_cases(CASES, out_path)
    torch.distributed.destroy_process_group()
