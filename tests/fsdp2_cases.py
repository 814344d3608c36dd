"""What each rank runs in tests/test_fsdp2.py: a tiny LLaMA student sharded with FSDP2 (`fully_shard` on each decoder
layer and on the model) takes the trainers' fused loss (kdfast.integrations.causal_lm, entered through the model's
own forward as DistillationTrainer enters it), against the same student unsharded in the same process."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

STEPS = 3


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _loss_fn(student, teacher, sparse: bool, opts):
    from kdfast.integrations.causal_lm import batch_distill_loss, batch_sparse_distill_loss

    if sparse:
        return lambda inputs: batch_sparse_distill_loss(student, inputs, opts)
    return lambda inputs: batch_distill_loss(student, teacher, inputs, opts)


def sparse_inputs(teacher, batch, k=8):
    """The teacher's top-k log-probs at T = 2 as a sparse teacher's batch columns (row j: token j's distribution)."""
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    top = (logits / 2.0).log_softmax(-1).topk(k, dim=-1)
    shift = lambda t: torch.cat([t[:, :1], t[:, :-1]], dim=1)  # noqa: E731 (row j + 1 holds token j's prediction)
    return {**batch, "teacher_ids": shift(top.indices), "teacher_logprobs": shift(top.values)}


def _shard(model, head_unit: bool):
    """`fully_shard` on each decoder layer, on the LM head alone when `head_unit` (no forward of the head ever runs,
    so only the loss unshards it), and on the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model)


def steps_case(sparse: bool, head_unit: bool = False, shard_teacher: bool = False):
    """Loss, every parameter's gradient after one step, and the parameters after 3 SGD steps equal the unsharded
    student's."""
    from tiny_models import student_and_teacher, token_batch

    from kdfast.integrations.sharding import run_through_wrapper
    from kdfast.options import LossOptions
    from kdfast.sparse_options import SparseOptions

    settings = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)
    opts = SparseOptions(**settings) if sparse else LossOptions(**settings)
    student, teacher = student_and_teacher(head_scale=4.0)
    reference, reference_teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    if sparse:
        batch = sparse_inputs(teacher, batch)
    _shard(student, head_unit)
    if shard_teacher:
        _shard(teacher, head_unit)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in (student, reference)]
    for step in range(STEPS):
        loss = run_through_wrapper(student, student, _loss_fn(student, teacher, sparse, opts), batch)
        expected = _loss_fn(reference, reference_teacher, sparse, opts)(batch)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss, expected, msg=f"loss at step {step}")
        if step == 0:
            for (name, param), ref in zip(student.named_parameters(), reference.parameters()):
                torch.testing.assert_close(_full(param.grad), ref.grad, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, name=name: f"gradient of {name}: {m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for (name, param), ref in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(_full(param.detach()), ref.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


def direct_decoder_call_case():
    """What the integration avoids: the decoder called outside the root's forward meets sharded embeddings."""
    from tiny_models import student_and_teacher, token_batch
    from torch.distributed.fsdp import fully_shard

    student, _ = student_and_teacher()
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    try:
        student.get_decoder()(input_ids=token_batch()["input_ids"])
    except RuntimeError as error:
        assert "DTensor" in str(error), error
        return
    raise AssertionError("the decoder ran outside the root's forward: the integration's redirect may be unneeded")


CASES = {"dense-teacher": functools.partial(steps_case, False), "sparse-teacher": functools.partial(steps_case, True),
         "head-in-its-own-unit": functools.partial(steps_case, False, head_unit=True),
         "sharded-teacher-head-in-its-own-unit": functools.partial(steps_case, False, head_unit=True,
                                                                   shard_teacher=True),
         "sparse-teacher-head-in-its-own-unit": functools.partial(steps_case, True, head_unit=True),
         "decoder-outside-root-forward": direct_decoder_call_case}


def run_all(rank, world, store_path, out_path):
    from rank_cases import run_cases

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    run_cases(CASES, out_path)
    dist.destroy_process_group()
