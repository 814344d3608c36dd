"""The Trainer's `torch_compile` for a loss computed outside the model's forward (`DistillationTrainer`, kdfast's TRL
`GKDTrainer` and `ServerDistillationTrainer`). With `torch_compile=True` the Trainer (through accelerate) compiles the
model's forward, which they skip: they run the decoders and read the LM heads themselves. So the wrapper they enter is
the one beneath torch.compile's (DDP's, or the model), and the loss's own computation is compiled instead, with the
Trainer's backend and mode. Under FSDP or DeepSpeed the loss also gathers and unshards heads itself, which is not
traced: torch_compile is refused there."""

from __future__ import annotations

import torch
from accelerate.utils import is_compiled_module


def entered_model(trainer, model):
    """(the wrapper to enter the loss through, torch.compile's taken off; the bare student) for compute_loss's
    `model`."""
    wrapper = model._orig_mod if is_compiled_module(model) else model
    return wrapper, trainer.accelerator.unwrap_model(model, keep_torch_compile=False)


def compiled(trainer, fn):
    """`fn` through torch.compile with the Trainer's backend and mode when `torch_compile` is set (once per trainer
    and function), else `fn`."""
    if not trainer.args.torch_compile:
        return fn
    cache = trainer.__dict__.setdefault("_kdfast_compiled_losses", {})
    key = getattr(fn, "__func__", fn)  # a bound method's function: one entry per trainer
    if key not in cache:
        cache[key] = torch.compile(fn, **trainer.accelerator.state.dynamo_plugin.to_kwargs())
    return cache[key]


def check_compile_supported(trainer) -> None:
    if trainer.args.torch_compile and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError(f"torch_compile=True is not supported with FSDP or DeepSpeed by {type(trainer).__name__}: "
                         "its loss runs outside the model's forward, which the Trainer compiles; set "
                         "torch_compile=False there")
