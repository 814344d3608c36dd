"""What the sharded trainer cases share (tests/trainer_sharded_cases.py, tests/trainer_sharded_trl_cases.py): the
sharding set-ups, an unsharded reference run, and the comparison of a sharded run with it.

The gradient is read from the first step's update, (before - after) / lr, because DeepSpeed's step runs inside
its backward (no hook sees the whole gradient before it); for FSDP2 that is the same number.

accelerate picks FSDP or DeepSpeed only on accelerator devices (a CPU run becomes DDP), so `allow_sharding_on_cpu`
keeps the plugin the Trainer passes; everything after (the plugin's sharding of each layer, the embeddings and the
head, DeepSpeed's engines, the Trainer's code paths for each) is accelerate's, DeepSpeed's (its CPU accelerator) and
the Trainer's own."""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

STEPS = 3
LR = 0.5
SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)
FSDP2 = dict(use_cpu=True, fsdp=True,
             fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
# "auto" values are the Trainer's (batch size, clipping 0 = max_grad_norm); SGD is "untested" with ZeRO. Persistence
# threshold 0: no parameter persistent, however small (under the default every parameter of these tiny models is, and
# ZeRO-3 keeps a persistent parameter whole once fetched, where the others are released after each use).
ZERO3 = dict(use_cpu=True, deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                                       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                       "zero_allow_untested_optimizer": True})



def allow_sharding_on_cpu():
    """Keeps the FSDP or DeepSpeed plugin the Trainer passes where accelerate, on CPU, would run plain DDP (it picks
    either only on accelerator devices; without `use_cpu` it would see one process, not two). What the original
    does with each plugin on a GPU is done here."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is None and deepspeed_plugin is None and getattr(self, "kept_sharding", None) is not None:
            # A later plain AcceleratorState() (TRL's trainers call accelerate's set_seed, which makes one) reads the
            # process's type again: the plugin's stays.
            self.distributed_type = self.kept_sharding
            return
        if fsdp_plugin is not None:
            self.distributed_type = self.kept_sharding = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
        elif deepspeed_plugin is not None:
            self.distributed_type = self.kept_sharding = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin

    AcceleratorState.__init__ = init


def whole_value(param):
    """A parameter's whole value on this rank: a DTensor's full tensor, a ZeRO-3 partition's gathered fp32 one (or
    the partition gathered, for a frozen parameter)."""
    if hasattr(param, "ds_id"):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full
        with deepspeed.zero.GatheredParameters([param]):  # a frozen parameter: no fp32 copy in the optimizer
            return param.detach().clone()
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()


class FirstStepParameters(TrainerCallback):
    """Keeps every parameter's whole value after the first optimizer step."""

    params = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.params is None:
            self.params = {name: whole_value(p) for name, p in model.named_parameters()}


def recording_losses(trainer):
    """Each training compute_loss result of the trainer, detached, in order (an evaluation's, which returns its
    outputs too, left out)."""
    losses, compute_loss = [], trainer.compute_loss

    def recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        if not kwargs.get("return_outputs"):
            losses.append(loss.detach().clone())
        return loss

    trainer.compute_loss = recorded
    return losses


def reference_run(student, batch, batch_loss):
    """`student` (unsharded) trained on the whole batch: each step's loss, the first step's gradients, the final
    parameters."""
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    losses, first_grads = [], None
    for _ in range(STEPS):
        loss = batch_loss(student, batch)
        loss.backward()
        losses.append(loss.detach())
        if first_grads is None:
            # A frozen parameter's "gradient" as the sharded run reads it from its update: zero.
            first_grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for name, p in student.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, first_grads, {name: p.detach() for name, p in student.named_parameters()}


def train_and_compare(trainer, expected, teacher_sharded=None, float32_reference=None):
    """`float32_reference`: where the reference is float64, the first gradients and final parameters a float32 run of
    the same reference reached; each first gradient and final parameter is then allowed twice that run's largest
    distance from float64 (float32's own rounding, and its drift over the steps), where it exceeds the common
    tolerance."""
    from torch.distributed.fsdp import FSDPModule

    expected_losses, expected_grads, expected_params = expected
    initial = {name: whole_value(p) for name, p in trainer.model.named_parameters()}
    callback = FirstStepParameters()
    trainer.add_callback(callback)
    losses = recording_losses(trainer)
    trainer.train()
    if trainer.is_fsdp_enabled:
        assert isinstance(trainer.model, FSDPModule), type(trainer.model)
        if teacher_sharded is not None:
            assert isinstance(trainer.teacher_model, FSDPModule) == teacher_sharded, type(trainer.teacher_model)
    else:
        assert trainer.is_deepspeed_enabled
        if teacher_sharded is not None:
            teacher_partitioned = any(hasattr(p, "ds_id") for p in trainer.teacher_model.parameters())
            assert teacher_partitioned == teacher_sharded
    # Each rank's loss is its tokens' sum over the whole batch's count times the world size (the gradients are
    # averaged over ranks): their mean is the whole batch's loss.
    step_losses = torch.stack(losses)
    dist.all_reduce(step_losses)
    torch.testing.assert_close(step_losses / dist.get_world_size(), torch.stack(expected_losses), rtol=1e-5,
                               atol=1e-6)
    for name, after in callback.params.items():
        # The difference of two fp32 parameters is exact to their rounding: a few ulps of the parameter, over lr.
        atol = 1e-7 + 4 * torch.finfo(torch.float32).eps * initial[name].abs().max().item() / LR
        if float32_reference is not None:
            atol = max(atol, 2 * (float32_reference[1][name] - expected_grads[name]).abs().max().item())
        torch.testing.assert_close((initial[name] - after) / LR, expected_grads[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    for name, param in trainer.model.named_parameters():
        atol = 1e-6
        if float32_reference is not None:
            atol = max(atol, 2 * (float32_reference[2][name] - expected_params[name]).abs().max().item())
        torch.testing.assert_close(whole_value(param), expected_params[name], rtol=1e-5, atol=atol,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


def trainer_args(tmp_path, setup, **overrides):
    from tiny_models import training_args

    return training_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=2, optim="sgd", learning_rate=LR,
                         max_grad_norm=0.0, lr_scheduler_type="constant", **setup, **overrides)



def completion_batch(generator):
    """Four generated sequences as TRL's on-policy trainers hand them to compute_loss: prompts of 3 tokens,
    completions of 5 (the second one ended after 3)."""
    batch = {"prompt_ids": torch.randint(2, 96, (4, 3), generator=generator),
             "prompt_mask": torch.ones(4, 3, dtype=torch.long),
             "completion_ids": torch.randint(2, 96, (4, 5), generator=generator),
             "completion_mask": torch.ones(4, 5, dtype=torch.long)}
    batch["completion_mask"][1, 3:] = 0
    return batch

