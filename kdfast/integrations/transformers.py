"""`DistillationTrainer`: a `transformers.Trainer` whose loss is kdfast's fused distillation loss, computed from the
student's last hidden states and LM-head weight, against a frozen teacher model (its hidden states and head) or a
sparse teacher (a teacher cache, or dataset columns of top-k ids and log-probs), so no model's logits are ever
built for the whole batch."""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
from transformers import Trainer

from kdfast.integrations.causal_lm import (
    batch_distill_loss,
    batch_multi_teacher_loss,
    batch_sparse_distill_loss,
)
from kdfast.integrations.compiled_loss import check_compile_supported, compiled, entered_model
from kdfast.integrations.cross_tokenizer import (
    GROUPS_IN_BATCH,
    TEXT_COLUMN,
    add_groups_in_batch,
    batch_cross_vocab_loss,
    trainer_settings,
)
from kdfast.integrations.fused_causal_lm import patch_causal_lm  # noqa: F401 (exported here)
from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.logged_parts import LoggedParts
from kdfast.integrations.served_teacher import ServedTeacherLoader, served_teacher
from kdfast.integrations.sharding import fsdp2_sharded_teacher, run_through_wrapper
from kdfast.integrations.sparse_teacher import (
    SERVED_TEMPERATURE,
    TEACHER_COLUMNS,
    sparse_options,
    sparse_training_data,
)
from kdfast.integrations.teacher_loading import is_model_name, load_teacher
from kdfast.integrations.teacher_logits import batch_distill_from_teacher_logits, check_mode, uses_own_logits
from kdfast.integrations.teacher_names import (
    TeacherIdCollator,
    check_dataset_teacher_ids,
    named_teachers,
    weights_in_order,
)
from kdfast.integrations.vision_inputs import IMAGE_KEYS
from kdfast.multi_teacher import COMBINES
from kdfast.options import LossOptions
from kdfast.teacher_cache.collate import SparseTeacherCollator
from kdfast.teacher_weights import check_trainer_weights
from kdfast.validation import check_chunk_settings


def _floating_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


class DistillationTrainer(Trainer):
    """`Trainer(model=student, ...)` plus a teacher and the loss settings of `kdfast.linear_distill_loss`:
    `total = kd_weight · T² · divergence + ce_weight · CE` per kept token, averaged over the batch's label tokens
    (`num_items_in_batch`, so gradient accumulation gives the loss of the whole accumulated batch), plus
    `z_loss_weight · log(Z)²` and the CE's `label_smoothing` when set. The parts are logged beside the loss as
    `kd_loss`, `ce_loss`, `z_loss`, `entropy` (the student's, at T, per token) and `token_accuracy`, and an
    evaluation's metrics hold them (`eval_kd_loss`, ...).

    The teacher is one of:
    - `teacher_model`: run in eval mode under no_grad, on the student's device and dtype (a Hub id or a local folder
      is loaded, in the student's dtype, with `teacher_model_init_kwargs` for its `from_pretrained`, as TRL loads
      one); or a list of models (of any hidden sizes), or a dict of them by name, mixed
      (`teacher_combine="mixture"`) or averaged ("average") with `teacher_weights` (M numbers, a dict by name,
      "confidence" or "min_ce", as `kdfast.multi_teacher_distill_loss` takes them, checked here; without them, a
      dataset column `teacher_id`, a teacher's position or its name in the dict, routes each example to one teacher,
      else they weigh 1/M each); each teacher's own divergence is logged as `kd_loss_teacher_<m>` (its name in the
      dict);
    - `teacher_cache`: a `kdfast teacher-cache` folder (or `TeacherCache`); it is the training data unless
      `train_dataset` is given, whose rows must then be the cache's windows in order. Its tokenizer must be the
      student's (`processing_class`), and for tail="bucket" its temperature the loss's;
    - `teacher_server`: a teacher behind a vLLM server (its URL) or any `kdfast.teacher_cache.ServedTeacher`
      (SGLang, requests in flight, timeouts), asked for each batch's top-`teacher_top_k` prompt log-probs while the
      student trains on the batch before; its tokenizer is checked against the student's where the server
      tokenizes, and its log-probs are the raw model's (T = 1);
    - none of these: `train_dataset` rows carry `teacher_ids` / `teacher_logprobs` ([tokens, K] or [tokens - 1, K]:
      row j the teacher's distribution of token j), e.g. from an inference server.
    `chunk_size` and `fp32_logits` are those of `kdfast.linear_distill_loss`. `teacher_logits` (for each teacher
    model, of the student's tokenizer or another): "auto" fuses the teacher's head where its own logits are the
    head's (checked at the first batch) and otherwise, with a warning, takes its own forward's logits, the student's
    head still fused (`kdfast.linear_student_distill_loss`; with several teachers, those teachers' logits beside the
    others' heads in one `linear_multi_teacher_distill_loss`; with a `teacher_tokenizer`,
    `linear_student_cross_vocab_distill_loss`); "head" refuses such a teacher; "own" always takes its own logits. A
    teacher_model that is no causal LM (any module whose forward takes `input_ids` and `attention_mask` and returns
    logits, e.g. an ensemble's) is distilled through its logits under "auto" and "own".
    With `teacher_tokenizer` the teacher model has another tokenizer than the student's `processing_class`: rows
    with a `text` column are tokenised by both and aligned (`CrossTokenizerCollator`, the default collator), and the
    loss is `kd_weight · linear_cross_vocab_distill_loss(method=cross_vocab)` ("hybrid", "uld" or "mapped") over
    the aligned groups plus `ce_weight · CE` of the student on its own tokens (`batch_cross_vocab_loss`).
    Under FSDP2 or DeepSpeed ZeRO-3 the teacher is sharded as the student is (`shard_teacher=True`, the default) or
    replicated whole on every process (`shard_teacher=False`: faster, when it fits).
    With a sparse teacher `tail` and `teacher_temperature` are those of `kdfast.linear_sparse_distill_loss`, and the
    default collator is `SparseTeacherCollator`.

    Batches need `input_ids`, `labels` (-100 where ignored; unshifted, as `DataCollatorForLanguageModeling`
    gives them) and optionally `attention_mask`, or the `position_ids` of packed examples (`DataCollatorWithFlattening`,
    TRL's `padding_free`), which reach every model; for vision-language models the processor's image inputs
    (`pixel_values`, `image_grid_thw`, ...), which reach the student's and the teachers' multimodal backbones.
    `vocab_size` is the tokenizer's vocabulary both models share (default: the length of `processing_class` when
    given); LM-head rows past it are padding and are dropped.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *, teacher_cache=None, divergence="forward_kl",
                 temperature=1.0, kd_weight=0.5, ce_weight=0.5, beta=0.5, t2_scale=True, tail="bucket",
                 teacher_temperature=None, label_smoothing=0.0, z_loss_weight=0.0, chunk_size="auto", backend="auto",
                 vocab_size=None, shard_teacher=True, fp32_logits=False, teacher_server=None, teacher_top_k=20,
                 teacher_weights=None, teacher_combine="mixture", teacher_tokenizer=None, cross_vocab="hybrid",
                 teacher_model_init_kwargs=None, teacher_logits="auto", **trainer_kwargs):
        teacher_model, names = named_teachers(teacher_model)
        by_name = [teacher_model] if not isinstance(teacher_model, (list, tuple)) else teacher_model
        if teacher_model_init_kwargs is not None and not any(is_model_name(teacher) for teacher in by_name):
            raise ValueError("teacher_model_init_kwargs are from_pretrained keywords for a teacher given by name (a "
                             "Hub id or a folder); teacher_model names none")
        self.teacher_model_init_kwargs = teacher_model_init_kwargs
        teacher_weights = weights_in_order(teacher_weights, names)
        given = [name for name, value in (("teacher_model", teacher_model), ("teacher_cache", teacher_cache),
                                          ("teacher_server", teacher_server)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one teacher, not {' and '.join(given)}")
        if teacher_server is not None and (not isinstance(teacher_top_k, int) or teacher_top_k < 1):
            raise ValueError(f"teacher_top_k must be an int >= 1, got {teacher_top_k!r}")
        several = isinstance(teacher_model, (list, tuple))
        if several and not teacher_model:
            raise ValueError("teacher_model is an empty list: pass one teacher model or several")
        if teacher_tokenizer is not None and (teacher_model is None or several):
            raise ValueError("teacher_tokenizer needs a single teacher_model (the teacher of that tokenizer), not a "
                             "teacher cache, a served teacher or a list of models")
        if not several and (teacher_weights is not None or teacher_combine != "mixture"):
            raise ValueError("teacher_weights and teacher_combine weigh several teachers: pass teacher_model as a "
                             "list of models")
        if teacher_combine not in COMBINES:
            raise ValueError(f"teacher_combine must be one of {COMBINES}, got {teacher_combine!r}")
        check_mode(teacher_logits, teacher_models=teacher_model is not None)
        # Whether the teacher is distilled through its own forward's logits (several: a list, one per teacher):
        # decided at the first batch.
        self.teacher_logits = teacher_logits
        self._own_teacher_logits = [False] * len(teacher_model) if several else False
        if several:
            check_trainer_weights(teacher_weights, len(teacher_model))
        self.teacher_weights, self.teacher_combine = teacher_weights, teacher_combine
        check_chunk_settings(None, chunk_size, fp32_logits)
        self.chunk_size, self.shard_teacher, self.fp32_logits = chunk_size, shard_teacher, fp32_logits
        tokenizer = trainer_kwargs.get("processing_class")
        self.teacher_cache, self.served_teacher, self.teacher_top_k = None, None, teacher_top_k
        # Validated before the Trainer's own (slow) set-up, so a bad setting fails at once.
        if teacher_model is not None:
            self.distill_options = LossOptions(divergence=divergence, beta=beta, temperature=temperature,
                                               kd_weight=kd_weight, ce_weight=ce_weight, t2_scale=t2_scale,
                                               label_smoothing=label_smoothing, z_loss_weight=z_loss_weight,
                                               reduction="mean", backend=backend)
        else:
            if teacher_server is not None:
                self.served_teacher = served_teacher(teacher_server, tokenizer)
            else:
                trainer_kwargs["train_dataset"], self.teacher_cache = sparse_training_data(
                    teacher_cache, trainer_kwargs.get("train_dataset"), tokenizer)
            stored, source = ((self.teacher_cache.settings.temperature, "the teacher cache")
                              if self.teacher_cache is not None else
                              (SERVED_TEMPERATURE, "the served teacher") if self.served_teacher is not None
                              else (None, None))
            self.distill_options = sparse_options(stored, source=source, divergence=divergence, beta=beta,
                                                  temperature=temperature, teacher_temperature=teacher_temperature,
                                                  tail=tail, kd_weight=kd_weight, ce_weight=ce_weight,
                                                  t2_scale=t2_scale, backend=backend,
                                                  label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
            if trainer_kwargs.get("data_collator") is None:
                pad = getattr(tokenizer, "pad_token_id", None)
                trainer_kwargs["data_collator"] = SparseTeacherCollator(pad_token_id=pad if pad is not None else 0,
                                                                        with_teacher=self.served_teacher is None)
        self.vocab_map = None
        if teacher_tokenizer is not None or cross_vocab != "hybrid":  # a cross_vocab without one is refused there
            self.vocab_map, self.cross_settings = trainer_settings(
                teacher_tokenizer, tokenizer, cross_vocab, self.distill_options, teacher_temperature,
                {"label_smoothing": label_smoothing, "z_loss_weight": z_loss_weight, "fp32_logits": fp32_logits},
                trainer_kwargs)
        # The loss's parts come from the same pass; they are logged beside the loss (kd_loss, ce_loss, entropy, ...).
        self.distill_options = self.distill_options.replace(return_components=True)
        self.teacher_names = (names or [str(index) for index in range(len(teacher_model))]) if several else None
        self._logged_parts = LoggedParts(self.teacher_names)
        self._eval_parts = None  # an evaluation's, while it runs
        super().__init__(model=model, args=args, **trainer_kwargs)
        if several and teacher_weights is None:  # a teacher_id column routes the examples: names become positions
            self.data_collator = TeacherIdCollator(self.data_collator, self.teacher_names)
            check_dataset_teacher_ids(self.train_dataset, self.teacher_names, "train_dataset")
            check_dataset_teacher_ids(self.eval_dataset, self.teacher_names, "eval_dataset")
        check_compile_supported(self)
        tokenizer = self.processing_class
        if vocab_size is None and tokenizer is not None and hasattr(tokenizer, "__len__"):
            vocab_size = len(tokenizer)
        if self.teacher_cache is not None:
            vocab_size = self.teacher_cache.settings.vocab_size if vocab_size is None else vocab_size
            if vocab_size < self.teacher_cache.settings.vocab_size:
                raise ValueError(f"vocab_size={vocab_size} but the teacher cache's ids range over "
                                 f"{self.teacher_cache.settings.vocab_size} tokens")
        # The loss itself cuts heads padded past the tokenizer (and refuses a model narrower than it).
        self.distill_options = self.distill_options.replace(vocab_size=vocab_size)
        if isinstance(teacher_model, (list, tuple)):
            self.teacher_model = [self._placed_teacher(teacher) for teacher in teacher_model]
        else:
            self.teacher_model = self._placed_teacher(teacher_model) if teacher_model is not None else None
        # compute_loss divides by num_items_in_batch: have the Trainer count it (over the shifted labels) and take
        # the loss as already normalised for gradient accumulation whenever it is given.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    def _get_num_items_in_batch(self, batch_samples, device):
        # Where transformers 5 counts the label tokens of an accumulated batch, and of each evaluation batch.
        num_items_in_batch = super()._get_num_items_in_batch(batch_samples, device)
        self._count_groups(batch_samples, num_items_in_batch)
        return num_items_in_batch

    def get_batch_samples(self, *args, **kwargs):
        # Where transformers 4 counts them (without the method above).
        batch_samples, num_items_in_batch = super().get_batch_samples(*args, **kwargs)
        if batch_samples and GROUPS_IN_BATCH not in batch_samples[0]:
            self._count_groups(batch_samples, num_items_in_batch)
        return batch_samples, num_items_in_batch

    def _count_groups(self, batch_samples, num_items_in_batch):
        """A teacher of another tokenizer: the KD term averages over aligned groups, whose count per label token
        varies with the text, so the accumulated batch's groups are counted as the Trainer counts its label tokens
        (over every rank when it does)."""
        if self.vocab_map is not None and num_items_in_batch is not None:
            across = self.args.average_tokens_across_devices and self.args.world_size > 1
            add_groups_in_batch(batch_samples, self.args.device, self.accelerator.gather if across else None)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self.served_teacher is None:
            return loader
        return ServedTeacherLoader(loader, self.served_teacher, self.teacher_top_k, self.vocab_size)

    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        if self.served_teacher is None:
            return loader
        return ServedTeacherLoader(loader, self.served_teacher, self.teacher_top_k, self.vocab_size)

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary both models share (LM-head rows past it are padding): the loss settings' own."""
        return self.distill_options.vocab_size

    def _set_signature_columns_if_needed(self):
        # The teacher's columns are not arguments of the student's forward, but the loss needs them.
        super()._set_signature_columns_if_needed()
        # A teacher of another tokenizer: the collator tokenises the text column (other trainers' collators pad
        # token columns only, so there it stays dropped).
        text = [TEXT_COLUMN] if self.vocab_map is not None else []
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TEACHER_COLUMNS, "teacher_id",
                                                      *text]))

    def _placed_teacher(self, teacher):
        if is_model_name(teacher):
            # Loaded now, after the Trainer's set-up: under ZeRO-3 transformers then partitions it as it loads.
            whole = self.is_deepspeed_enabled and not self.shard_teacher
            teacher = load_teacher(teacher, self.teacher_model_init_kwargs, _floating_dtype(self.model),
                                   replicated_under=self.args.hf_deepspeed_config if whole else None)
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            return self._deepspeed_teacher(teacher)
        if self.shard_teacher and self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            return fsdp2_sharded_teacher(self.accelerator, teacher)
        if getattr(teacher, "hf_device_map", None) is None:  # a model spread by device_map stays where it is
            teacher = teacher.to(device=self.args.device, dtype=_floating_dtype(self.model))
        return teacher

    def _deepspeed_teacher(self, teacher):
        """The teacher as an inference engine with the student's ZeRO stage (stage 3 shards it too; other stages
        keep a full copy on each rank), and no optimizer."""
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if not self.shard_teacher or config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
        return engine

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("DistillationTrainer needs `labels` in every batch (token ids, -100 where ignored), "
                             "e.g. from DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        self._check_images(inputs)
        wrapper, student = entered_model(self, model)  # under torch_compile `_batch_loss` is what compiles
        loss = run_through_wrapper(wrapper, student, functools.partial(self._student_loss, student), inputs,
                                   num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def _check_images(self, inputs):
        """A batch with images reaches the student and teacher models' multimodal backbones; a teacher that saw
        text alone (a teacher cache, a served teacher's prompt log-probs) or a teacher of another tokenizer (the
        collator aligns text) would be matched on rows whose images it never saw, so such a batch is refused."""
        images = sorted(key for key in IMAGE_KEYS if inputs.get(key) is not None)
        textual = ("teacher_cache" if self.teacher_cache is not None else
                   "teacher_server" if self.served_teacher is not None else
                   "teacher_tokenizer" if self.vocab_map is not None else None)
        if images and textual:
            raise ValueError(f"the batch holds images ({images}) but the teacher given by {textual} sees text alone: "
                             f"distil a vision-language batch from a teacher_model (or dataset columns of teacher "
                             f"log-probs computed with the images)")

    def _student_loss(self, student, inputs, num_items_in_batch):
        teacher = self._unwrapped_teacher()
        # Mixed precision comes from the Trainer's settings: the model's own (autocast-wrapped) forward is skipped.
        with self.accelerator.autocast():
            self._check_heads(student, teacher, inputs)
            loss, parts = compiled(self, self._batch_loss)(student, teacher, inputs, num_items_in_batch)
        # Scaled as compute_loss scales the loss, so that the logged parts add up as the logged loss does.
        scale = (self.accelerator.num_processes
                 if self.args.average_tokens_across_devices and num_items_in_batch is not None else 1)
        if student.training:
            self._logged_parts.add(parts, scale)
        elif self._eval_parts is not None:
            self._eval_parts.add(parts, scale)
        return loss

    def _check_heads(self, student, teacher, inputs):
        """Each model's own logits against the fused loss's, on the first batch (`check_head_map`), outside the
        compiled loss: a teacher of another tokenizer on its own ids."""
        check_head_map(student, inputs)
        if self.vocab_map is not None:
            self._own_teacher_logits = uses_own_logits(
                self.teacher_logits, teacher, {"input_ids": inputs["teacher_input_ids"],
                                               "attention_mask": inputs.get("teacher_attention_mask")})
        elif isinstance(teacher, list):
            self._own_teacher_logits = [uses_own_logits(self.teacher_logits, each, inputs) for each in teacher]
        elif teacher is not None:
            self._own_teacher_logits = uses_own_logits(self.teacher_logits, teacher, inputs)

    def _unwrapped_teacher(self):
        """The teacher model(s) as `_batch_loss` takes them (None for a sparse teacher). Unwrapped here, outside the
        compiled loss: accelerate's unwrapping reads package metadata, which torch.compile does not trace."""
        if isinstance(self.teacher_model, list):
            return [self.accelerator.unwrap_model(teacher) for teacher in self.teacher_model]
        return self.accelerator.unwrap_model(self.teacher_model) if self.teacher_model is not None else None

    def _batch_loss(self, student, teacher, inputs, num_items_in_batch):
        """(loss, LossComponents) of one batch against `teacher` (`_unwrapped_teacher`'s)."""
        if teacher is None:
            return batch_sparse_distill_loss(student, inputs, self.distill_options, chunk_size=self.chunk_size,
                                             fp32_logits=self.fp32_logits, num_items_in_batch=num_items_in_batch)
        if isinstance(teacher, list) and len(teacher) == 1:  # one teacher by name: its arithmetic, bitwise
            batch_loss = batch_distill_from_teacher_logits if self._own_teacher_logits[0] else batch_distill_loss
            loss, parts = batch_loss(student, teacher[0], inputs, self.distill_options, chunk_size=self.chunk_size,
                                     fp32_logits=self.fp32_logits, num_items_in_batch=num_items_in_batch)
            return loss, dataclasses.replace(parts, teachers=parts.kd.reshape(1) if parts.kd is not None else None)
        if isinstance(teacher, list):
            return batch_multi_teacher_loss(student, teacher, inputs, self.distill_options,
                                            weights=self.teacher_weights, combine=self.teacher_combine,
                                            chunk_size=self.chunk_size, fp32_logits=self.fp32_logits,
                                            num_items_in_batch=num_items_in_batch,
                                            own_logits_of=self._own_teacher_logits)
        if self.vocab_map is not None:  # a teacher of another tokenizer
            return batch_cross_vocab_loss(student, teacher, inputs, self.vocab_map, chunk_size=self.chunk_size,
                                          num_items_in_batch=num_items_in_batch,
                                          groups_in_batch=inputs.get(GROUPS_IN_BATCH),
                                          own_logits_of_teacher=self._own_teacher_logits, **self.cross_settings)
        batch_loss = batch_distill_from_teacher_logits if self._own_teacher_logits else batch_distill_loss
        return batch_loss(student, teacher, inputs, self.distill_options, chunk_size=self.chunk_size,
                          fp32_logits=self.fp32_logits, num_items_in_batch=num_items_in_batch)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loop, whose metrics gain the loss's parts (`eval_kd_loss`, `eval_ce_loss`, `eval_entropy`,
        `eval_token_accuracy`, each teacher's divergence), averaged over the batches as `eval_loss` is."""
        self._eval_parts = LoggedParts(self.teacher_names)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            parts = self._eval_parts.pop_batch_means(
                (lambda tensor: self.accelerator.reduce(tensor, reduction="sum")) if self.args.world_size > 1
                else None)
        finally:
            self._eval_parts = None
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in parts.items()})
        return output

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log: the parts since the last one, averaged as the Trainer averages the loss
            steps = max(1, self.state.global_step - getattr(self, "_globalstep_last_logged", 0))
            logs = {**logs, **self._logged_parts.pop(steps)}
        return super().log(logs, *args, **kwargs)
