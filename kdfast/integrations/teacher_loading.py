"""A teacher given by name (a Hugging Face Hub id or a local folder), loaded as TRL's DistillationTrainer loads one:
the class its config names, with the caller's `from_pretrained` keywords."""

from __future__ import annotations

import contextlib
import os

import torch

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def is_model_name(teacher) -> bool:
    return isinstance(teacher, (str, os.PathLike))


def load_teacher(name, init_kwargs: dict | None, dtype: torch.dtype, *, replicated_under=None):
    """The model at `name`: the transformers class its config's `architectures` names (a vision-language model's
    own, say), else `AutoModelForCausalLM` (remote code included where `trust_remote_code` is given). Loaded in
    `dtype` (the student's) unless `init_kwargs` gives `dtype` ("auto": the checkpoint's; or a name of
    DTYPE_NAMES). Under DeepSpeed ZeRO-3 arguments transformers partitions a model as it loads it (zero.Init);
    `replicated_under` (those arguments' HfTrainerDeepSpeedConfig) loads it whole instead, for a teacher kept whole on
    every process."""
    import transformers

    kwargs = dict(init_kwargs or {})
    chosen = kwargs.setdefault("dtype", dtype)
    if isinstance(chosen, str) and chosen != "auto":
        if chosen not in DTYPE_NAMES:
            raise ValueError(f"teacher_model_init_kwargs['dtype'] must be a torch.dtype, 'auto' or one of "
                             f"{DTYPE_NAMES}, got {chosen!r}")
        kwargs["dtype"] = getattr(torch, chosen)
    config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=kwargs.get("trust_remote_code", False))
    named = [getattr(transformers, arch) for arch in (config.architectures or []) if hasattr(transformers, arch)]
    architecture = named[0] if named else transformers.AutoModelForCausalLM
    with _unpartitioned(replicated_under) if replicated_under is not None else contextlib.nullcontext():
        return architecture.from_pretrained(name, **kwargs)


@contextlib.contextmanager
def _unpartitioned(deepspeed_config):
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(deepspeed_config)
