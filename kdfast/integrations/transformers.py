"""`DistillationTrainer`: a `transformers.Trainer` whose loss is kdfast's fused distillation loss between the
student and a frozen teacher, computed from both decoders' last hidden states and LM-head weights, so neither
model's logits are ever built for the whole batch."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import Trainer

from kdfast.integrations.causal_lm import batch_distill_loss, run_through_wrapper
from kdfast.options import LossOptions
from kdfast.validation import check_chunk_settings


def _floating_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


class DistillationTrainer(Trainer):
    """`Trainer(model=student, ...)` plus `teacher_model` and the loss settings of `kdfast.linear_distill_loss`:
    `total = kd_weight · T² · divergence + ce_weight · CE` per kept token, averaged over the batch's label tokens
    (`num_items_in_batch`, so gradient accumulation gives the loss of the whole accumulated batch).

    Batches need `input_ids`, `labels` (-100 where ignored; unshifted, as `DataCollatorForLanguageModeling`
    gives them) and optionally `attention_mask`. The teacher runs in eval mode under no_grad, on the student's
    device and dtype. `vocab_size` is the tokenizer's vocabulary both models share (default: the length of
    `processing_class` when given); LM-head rows past it are padding and are dropped.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *, divergence="forward_kl", temperature=1.0,
                 kd_weight=0.5, ce_weight=0.5, beta=0.5, t2_scale=True, chunk_size="auto", backend="auto",
                 vocab_size=None, **trainer_kwargs):
        if teacher_model is None:
            raise ValueError("teacher_model is required: the model the student learns from")
        # Validated before the Trainer's own (slow) set-up, so a bad setting fails at once.
        self.distill_options = LossOptions(divergence=divergence, beta=beta, temperature=temperature,
                                           kd_weight=kd_weight, ce_weight=ce_weight, t2_scale=t2_scale,
                                           reduction="mean", backend=backend)
        check_chunk_settings(None, chunk_size)
        self.chunk_size = chunk_size
        super().__init__(model=model, args=args, **trainer_kwargs)
        tokenizer = self.processing_class
        if vocab_size is None and tokenizer is not None and hasattr(tokenizer, "__len__"):
            vocab_size = len(tokenizer)
        self.vocab_size = vocab_size
        self.teacher_model = self._placed_teacher(teacher_model)
        # compute_loss divides by num_items_in_batch: have the Trainer count it (over the shifted labels) and take
        # the loss as already normalised for gradient accumulation whenever it is given.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    def _placed_teacher(self, teacher):
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            return self._deepspeed_teacher(teacher)
        if getattr(teacher, "hf_device_map", None) is None:  # a model spread by device_map stays where it is
            teacher = teacher.to(device=self.args.device, dtype=_floating_dtype(self.model))
        return teacher

    def _deepspeed_teacher(self, teacher):
        """The teacher as an inference engine with the student's ZeRO stage (stage 3 shards it too; other stages
        keep a full copy on each rank), and no optimizer."""
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        return engine.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("DistillationTrainer needs `labels` in every batch (token ids, -100 where ignored), "
                             "e.g. from DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        student = self.accelerator.unwrap_model(model)
        loss = run_through_wrapper(model, student, functools.partial(self._student_loss, student), inputs,
                                   num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def _student_loss(self, student, inputs, num_items_in_batch):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        # Mixed precision comes from the Trainer's settings: the model's own (autocast-wrapped) forward is skipped.
        with self.accelerator.autocast():
            return batch_distill_loss(student, teacher, inputs, self.distill_options, chunk_size=self.chunk_size,
                                      vocab_size=self.vocab_size, num_items_in_batch=num_items_in_batch)
