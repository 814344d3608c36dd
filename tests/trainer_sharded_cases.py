"""What each rank runs in tests/test_trainer_sharded.py: `DistillationTrainer` (one teacher, sharded or replicated,
several, sparse, of another tokenizer, given by a folder, vision-language models on images, packed examples), kdfast's
TRL `GKDTrainer`, its subclasses of TRL's stable `DistillationTrainer` and of its `SDFTTrainer`, and TRL's fused LM
head on kdfast under accelerate's FSDP2 plugin or DeepSpeed ZeRO-3 (set up by `TrainingArguments`, as `accelerate
launch` with such a config sets them up), 2 gloo ranks on CPU, each taking half of every batch. The loss of each step,
every parameter's gradient in the first step and the parameters after 3 SGD steps equal an unsharded student's trained
on the whole batch in the same process.

The gradient is read from the first step's update, (before - after) / lr, because DeepSpeed's step runs inside
its backward (no hook sees the whole gradient before it); for FSDP2 that is the same number.

accelerate picks FSDP or DeepSpeed only on accelerator devices (a CPU run becomes DDP), so `allow_sharding_on_cpu`
keeps the plugin the Trainer passes; everything after (the plugin's sharding of each layer, the embeddings and the
head, DeepSpeed's engines, the Trainer's code paths for each) is accelerate's, DeepSpeed's (its CPU accelerator) and
the Trainer's own."""

from __future__ import annotations

import functools
import os
import pathlib

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


def _whole(param):
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


class _FirstStepParameters(TrainerCallback):
    """Keeps every parameter's whole value after the first optimizer step."""

    params = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.params is None:
            self.params = {name: _whole(p) for name, p in model.named_parameters()}


def _recording_losses(trainer):
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


def _reference_run(student, batch, batch_loss):
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


def _train_and_compare(trainer, expected, teacher_sharded=None, float32_reference=None):
    """`float32_reference`: where the reference is float64, the first gradients and final parameters a float32 run of
    the same reference reached; each first gradient and final parameter is then allowed twice that run's largest
    distance from float64 (float32's own rounding, and its drift over the steps), where it exceeds the common
    tolerance."""
    from torch.distributed.fsdp import FSDPModule

    expected_losses, expected_grads, expected_params = expected
    initial = {name: _whole(p) for name, p in trainer.model.named_parameters()}
    callback = _FirstStepParameters()
    trainer.add_callback(callback)
    losses = _recording_losses(trainer)
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
        torch.testing.assert_close(_whole(param), expected_params[name], rtol=1e-5, atol=atol,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


def _args(tmp_path, setup, **overrides):
    from tiny_models import training_args

    return training_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=2, optim="sgd", learning_rate=LR,
                         max_grad_norm=0.0, lr_scheduler_type="constant", **setup, **overrides)


def distillation_case(tmp_path, setup, *, sparse: bool, shard_teacher: bool = True):
    from fsdp2_cases import sparse_inputs
    from tiny_models import as_examples, student_and_teacher, token_batch

    from kdfast.integrations.causal_lm import batch_distill_loss, batch_sparse_distill_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions
    from kdfast.sparse_options import SparseOptions

    student, teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    if sparse:
        batch = sparse_inputs(teacher, batch)
        opts = SparseOptions(**SETTINGS)
        batch_loss = lambda model, inputs: batch_sparse_distill_loss(model, inputs, opts)  # noqa: E731
    else:
        opts = LossOptions(**SETTINGS)
        batch_loss = lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts)  # noqa: E731
    expected = _reference_run(student_and_teacher(head_scale=4.0)[0], batch, batch_loss)
    trainer = DistillationTrainer(model=student, teacher_model=None if sparse else teacher,
                                  args=_args(tmp_path, setup), train_dataset=as_examples(batch),
                                  shard_teacher=shard_teacher, **SETTINGS)
    _train_and_compare(trainer, expected, teacher_sharded=None if sparse else shard_teacher)
    # An evaluation's parts, summed over the processes as its loss is gathered, add up to its loss.
    metrics = trainer.evaluate(as_examples(batch))
    total = SETTINGS["kd_weight"] * SETTINGS["temperature"] ** 2 * metrics["eval_kd_loss"] + \
        SETTINGS["ce_weight"] * metrics["eval_ce_loss"]
    torch.testing.assert_close(total, metrics["eval_loss"], rtol=1e-5, atol=1e-7)


def multi_teacher_case(tmp_path, setup, *, routed: bool = False, shard_teacher: bool = True):
    """Two teacher models of different hidden sizes, weighed 1:3, each sharded as the student is (or replicated). Or
    routed by a `teacher_id` column in which one teacher has a single example, so that a rank has none of its: a
    sharded teacher still runs its forward with the other ranks, a replicated one runs on its own examples alone."""
    from tiny_models import as_examples, student_and_teacher, tiny_llama, token_batch

    from kdfast.integrations.causal_lm import batch_multi_teacher_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions

    student, teacher = student_and_teacher(head_scale=4.0)
    teachers, weights, opts = [teacher, tiny_llama(48, seed=2)], [1.0, 3.0], LossOptions(**SETTINGS)
    batch = token_batch()
    if routed:
        batch["teacher_id"], weights = torch.tensor([0, 0, 1, 0]), None
    expected = _reference_run(student_and_teacher(head_scale=4.0)[0], batch,
                              lambda model, inputs: batch_multi_teacher_loss(model, teachers, inputs, opts,
                                                                             weights=weights))
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=_args(tmp_path, setup),
                                  train_dataset=as_examples(batch), teacher_weights=weights,
                                  shard_teacher=shard_teacher, **SETTINGS)
    _train_and_compare(trainer, expected)


def cross_tokenizer_case(tmp_path, setup):
    """A teacher of another tokenizer (GOLD's hybrid), sharded as the student is. The texts are of two kinds, each
    tokenizer the coarser on one, so each rank's aligned groups per label token differ: the KD term divides by the
    whole batch's groups, counted over the ranks."""
    from datasets import Dataset
    from test_cross_tokenizer_trainer import MIXED, TEXTS, models

    from kdfast.demo.corpus import train_tokenizer
    from kdfast.integrations.cross_tokenizer import CrossTokenizerCollator, batch_cross_vocab_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.vocab_map import VocabMap

    tokenizers = train_tokenizer(TEXTS[:60], 300), train_tokenizer(TEXTS[60:], 360)
    texts = MIXED[:2] + MIXED[3:5]
    vocab_map = VocabMap.from_tokenizers(*tokenizers)
    batch = CrossTokenizerCollator(*tokenizers)([{"text": text} for text in texts])
    student, teacher = models(*tokenizers)
    expected = _reference_run(models(*tokenizers)[0], batch,
                              lambda model, inputs: batch_cross_vocab_loss(model, teacher, inputs, vocab_map,
                                                                           **SETTINGS)[0])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, teacher_tokenizer=tokenizers[1],
                                  processing_class=tokenizers[0], args=_args(tmp_path, setup),
                                  train_dataset=Dataset.from_dict({"text": texts}), **SETTINGS)
    _train_and_compare(trainer, expected, teacher_sharded=True)


def trl_gkd_case(tmp_path, setup):
    """kdfast's TRL GKDTrainer (off-policy, lmbda 0) with its teacher sharded. Rows of equal length, so that each
    process's share of the tokens is the same."""
    import warnings

    from datasets import Dataset
    from tiny_models import student_and_teacher, token_batch, word_tokenizer
    from transformers import default_data_collator
    from trl.experimental.gkd import GKDConfig

    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.integrations.trl import GKDTrainer, gkd_options

    student, teacher = student_and_teacher(head_scale=4.0)
    batch = token_batch()
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch["labels"] = batch["input_ids"].clone()
    opts = gkd_options(beta=0.5)
    expected = _reference_run(student_and_teacher(head_scale=4.0)[0], batch,
                              lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    args = _args(tmp_path, setup, config_cls=GKDConfig, beta=0.5, lmbda=0.0, max_new_tokens=4, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's experimental-namespace warning
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=word_tokenizer(),
                             train_dataset=Dataset.from_dict({k: v.tolist() for k, v in batch.items()}),
                             data_collator=default_data_collator)
    _train_and_compare(trainer, expected, teacher_sharded=True)


def _completion_batch(generator):
    """Four generated sequences as TRL's on-policy trainers hand them to compute_loss: prompts of 3 tokens,
    completions of 5 (the second one ended after 3)."""
    batch = {"prompt_ids": torch.randint(2, 96, (4, 3), generator=generator),
             "prompt_mask": torch.ones(4, 3, dtype=torch.long),
             "completion_ids": torch.randint(2, 96, (4, 5), generator=generator),
             "completion_mask": torch.ones(4, 5, dtype=torch.long)}
    batch["completion_mask"][1, 3:] = 0
    return batch


def trl_distillation_case(tmp_path, setup, *, routed: bool = False):
    """kdfast's subclass of TRL's stable DistillationTrainer against TRL's loss (float64, from full logits) on an
    unsharded student. Generation is TRL's and not under test here: each step trains on one fixed batch of
    completions (each rank its half), which TRL's `_prepare_inputs` would otherwise generate. `routed`: two teachers
    by name, each sequence routed to one by its `teacher_id` (rank 0's half has none of the second's: a sharded
    teacher still runs its forward with the other rank)."""
    import warnings

    from datasets import Dataset
    from tiny_models import student_and_teacher, tiny_llama, word_tokenizer
    from trl import DistillationConfig

    from kdfast.integrations.trl import DistillationTrainer
    from kdfast.reference import distill_loss_reference

    student, teacher = student_and_teacher(head_scale=4.0)
    generator = torch.Generator().manual_seed(0)
    batch = _completion_batch(generator)
    count = batch["completion_mask"].sum().float()
    teachers = [teacher, tiny_llama(48, seed=2)] if routed else [teacher]
    if routed:
        batch["teacher_id"] = torch.tensor([0, 0, 1, 0])

    def hidden(model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -5:]

    def batch_loss(model, inputs):  # TRL's loss on full logits: JSD at T = 2 summed over the completion tokens
        kept = inputs["completion_mask"].bool()
        route = inputs.get("teacher_id", torch.zeros(kept.shape[0], dtype=torch.long))
        with torch.no_grad():
            each = torch.stack([hidden(model, inputs) @ model.lm_head.weight.t() for model in teachers])
            teacher_logits = each[route, torch.arange(kept.shape[0])][kept]
        student_logits = hidden(model, inputs)[kept] @ model.lm_head.weight.t()
        return distill_loss_reference(student_logits, teacher_logits, divergence="jsd", beta=0.5, temperature=2.0,
                                      t2_scale=False, reduction="sum").float() / count

    expected = _reference_run(student_and_teacher(head_scale=4.0)[0], batch, batch_loss)

    class FixedCompletions(DistillationTrainer):
        def _prepare_inputs(self, generation_batch):
            half = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
            return {**{key: value[half] for key, value in batch.items()}, "num_items_in_batch": count}

    args = _args(tmp_path, setup, config_cls=DistillationConfig, beta=0.5, temperature=2.0, max_completion_length=5,
                 bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedCompletions(model=student, teacher_model=dict(zip("ab", teachers)) if routed else teacher,
                                   args=args, processing_class=word_tokenizer(),
                                   train_dataset=Dataset.from_dict({"prompt": ["w2 w3"] * 8}))
    _train_and_compare(trainer, expected)


def trl_fused_head_case(tmp_path, setup, *, head_learns: bool, entropy_bonus: bool):
    """TRL's fused LM head (`add_fused_lm_head`, GRPO's scoring forward) patched onto kdfast, its loss (TRL's: the
    completion tokens' mean -log q, with 0.1 times their summed entropy as GRPO's entropy bonus adds it) trained by
    a plain Trainer, every variant on kdfast. Under ZeRO-3 TRL gathers the head for the forward; a frozen head
    without the bonus takes d hidden there, while a head that learns, or an entropy differentiated, is recomputed in
    a backward that gathers the head again. Under FSDP2 TRL reads the head as a full tensor."""
    from tiny_models import as_examples, tiny_llama, token_batch
    from transformers import Trainer
    from trl.trainer.utils import add_fused_lm_head

    from kdfast.integrations import trl_fused_lm_head
    from kdfast.integrations.trl import patch_trl_fused_lm_head

    temperature = 0.7

    def student():
        model = tiny_llama(32)
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)  # peaked rows, as the other cases' heads
        model.lm_head.weight.requires_grad_(head_learns)
        return model

    def batch_loss(model, inputs):  # TRL's fused loss from the model's full logits
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        labels = inputs["labels"][:, 1:]
        kept = labels.ne(-100)
        log_q = (logits[kept] / temperature).log_softmax(-1)
        loss = -log_q.gather(-1, labels[kept][:, None]).sum() / kept.sum()
        return loss - 0.1 * (log_q.exp() * log_q).sum() / kept.sum() if entropy_bonus else loss

    batch = token_batch()
    expected = _reference_run(student(), batch, batch_loss)

    class FusedHeadTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs, fused_lm_head=True, num_items_in_batch=num_items_in_batch)
            loss = out.loss + 0.1 * out.entropy.sum() / num_items_in_batch if entropy_bonus else out.loss
            return loss * self.accelerator.num_processes  # as the Trainer scales a loss over the whole batch's tokens

    model = student()
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    calls, original = [], trl_fused_lm_head.linear_token_outputs
    trl_fused_lm_head.linear_token_outputs = lambda *a, **k: calls.append(1) or original(*a, **k)
    patch_trl_fused_lm_head()
    try:
        trainer = FusedHeadTrainer(model=model, args=_args(tmp_path, setup), train_dataset=as_examples(batch))
        _train_and_compare(trainer, expected)
    finally:
        patch_trl_fused_lm_head(False)
        trl_fused_lm_head.linear_token_outputs = original
    assert calls, "the fused head's log-probs came from kdfast"


def patched_causal_lm_case(tmp_path, setup):
    """A plain Trainer on a model whose own loss is kdfast's (`patch_causal_lm`): the head's input recorded inside
    the sharded forward, the head gathered (ZeRO-3) or unsharded (FSDP2) again for the fused loss, against the
    unpatched model's own loss from its full logits."""
    from tiny_models import as_examples, tiny_llama, token_batch
    from transformers import Trainer

    from kdfast.integrations import fused_causal_lm

    def student():
        model = tiny_llama(32)
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)  # peaked rows, as the other cases' heads
        return model

    batch = token_batch()
    expected = _reference_run(student(), batch, lambda model, inputs: model(**inputs).loss)
    model = fused_causal_lm.patch_causal_lm(student())
    calls, original = [], fused_causal_lm.linear_cross_entropy
    fused_causal_lm.linear_cross_entropy = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        trainer = Trainer(model=model, args=_args(tmp_path, setup), train_dataset=as_examples(batch))
        _train_and_compare(trainer, expected)
    finally:
        fused_causal_lm.linear_cross_entropy = original
    assert len(calls) == STEPS, "each step's loss came from kdfast"


def vision_language_case(tmp_path, setup):
    """LLaVA student and teacher on examples with an image each (the Trainer's default collator stacks them): the
    images reach both models' multimodal backbones on every rank, the teacher sharded as the student is."""
    from transformers import default_data_collator
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from vision_batches import vision_models, with_labels

    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions

    # A vision-language model builds its towers by from_config, which an earlier case's ZeRO-3 arguments (still
    # alive) would partition as they are built; built whole here, as the text cases' models are, for the Trainer to
    # partition.
    unset_hf_deepspeed_config()
    (student, teacher), make_batch = vision_models("llava")
    batch = with_labels(make_batch(student, seed=17, rows=4))
    opts = LossOptions(**SETTINGS)
    expected = _reference_run(vision_models("llava")[0][0], batch,
                              lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    examples = [{key: value[row] for key, value in batch.items()} for row in range(4)]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, setup),
                                  train_dataset=examples, data_collator=default_data_collator, **SETTINGS)
    _train_and_compare(trainer, expected, teacher_sharded=True)


def packed_sequences_case(tmp_path, setup):
    """Examples of different lengths packed by DataCollatorWithFlattening (each rank packs its own), the teacher
    sharded as the student is: their positions reach both models on every rank."""
    from tiny_models import VOCAB, student_and_teacher
    from transformers import DataCollatorWithFlattening

    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions

    generator = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (7, 5, 9, 4)]
    student, teacher = student_and_teacher(head_scale=4.0)
    opts = LossOptions(**SETTINGS)
    whole = dict(DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": row} for row in rows]))
    expected = _reference_run(student_and_teacher(head_scale=4.0)[0], whole,
                              lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, setup),
                                  train_dataset=[{"input_ids": row} for row in rows],
                                  data_collator=DataCollatorWithFlattening(), **SETTINGS)
    _train_and_compare(trainer, expected, teacher_sharded=True)


def teacher_by_path_case(tmp_path, setup, *, shard_teacher: bool = True):
    """The teacher given as a saved folder, loaded by the trainer after its set-up: under ZeRO-3 transformers
    partitions it as it loads it (zero.Init), or loads it whole for a replicated teacher."""
    from tiny_models import as_examples, student_and_teacher, token_batch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions

    unset_hf_deepspeed_config()  # an earlier case's ZeRO-3 arguments: the reference's models are built whole
    student, teacher = student_and_teacher(head_scale=4.0)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)  # rank 0 writes it (the earlier cases set up the process group)
    dist.barrier()
    batch, opts = token_batch(), LossOptions(**SETTINGS)
    expected = _reference_run(student_and_teacher(head_scale=4.0)[0], batch,
                              lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    trainer = DistillationTrainer(model=student, teacher_model=str(folder), args=_args(tmp_path, setup),
                                  train_dataset=as_examples(batch), shard_teacher=shard_teacher, **SETTINGS)
    _train_and_compare(trainer, expected, teacher_sharded=shard_teacher)


def trl_sdft_case(tmp_path, setup, *, mode: str):
    """kdfast's subclass of TRL's SDFTTrainer, the student and TRL's frozen teacher (its initial weights, loaded from
    the student's folder and sharded as TRL shards it) both sharded, against TRL's own loss helper on the logits of
    an unsharded pair. Each step trains on one fixed batch (each rank its half) whose teacher prompts differ from the
    student's, as privileged context makes them; generation is TRL's and not under test here."""
    import warnings

    from datasets import Dataset
    from tiny_models import tiny_llama, word_tokenizer
    from transformers import LlamaForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from trl.experimental.sdft import SDFTConfig
    from trl.experimental.sdft.loss_utils import (
        compute_full_logit_self_distillation_loss,
        compute_topk_self_distillation_loss,
    )

    from kdfast.integrations.trl import SDFTTrainer

    unset_hf_deepspeed_config()  # an earlier case's ZeRO-3 arguments: the reference's models are built whole
    model = tiny_llama(32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    if not dist.is_initialized():  # (run alone; the Trainer joins this group as it would an earlier case's)
        dist.init_process_group("gloo")
    folder = tmp_path / "model"
    if dist.get_rank() == 0:  # transformers writes a model from rank 0 alone where a process group exists
        model.save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
    dist.barrier()
    generator = torch.Generator().manual_seed(3)
    batch = _completion_batch(generator)
    teacher_prompts = torch.randint(2, 96, (4, 6), generator=generator)
    batch["teacher_input_ids"] = torch.cat([teacher_prompts, batch["completion_ids"]], 1)
    batch["teacher_attention_mask"] = torch.cat([torch.ones_like(teacher_prompts), batch["completion_mask"]], 1)
    teacher = tiny_llama(32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)

    def logits(network, ids, mask):
        return network(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -5:]

    def batch_loss(student, inputs):  # TRL's loss: each sequence's mean over its tokens, then the batch's mean
        student_logits = logits(student, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1))
        with torch.no_grad():
            teacher_logits = logits(teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"])
        if mode == "topk_logits":
            per_token = compute_topk_self_distillation_loss(student_logits, teacher_logits, distillation_topk=10,
                                                            distillation_alpha=0.5, distillation_add_tail=False)
        else:
            per_token = compute_full_logit_self_distillation_loss(student_logits, teacher_logits,
                                                                  distillation_alpha=0.5)
        mask = inputs["completion_mask"]
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()

    reference = tiny_llama(32)
    with torch.no_grad():
        reference.lm_head.weight.mul_(8.0)
    expected = _reference_run(reference, batch, batch_loss)

    class FixedCompletions(SDFTTrainer):
        def _prepare_inputs(self, generation_batch):
            half = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
            return {key: value[half] for key, value in batch.items()}

    # The student loaded whole before the arguments set ZeRO-3 up (a path would be partitioned as it loads, before
    # the comparison reads its initial values); TRL builds the teacher from its folder, partitioned.
    student = LlamaForCausalLM.from_pretrained(folder)
    args = _args(tmp_path, setup, config_cls=SDFTConfig, distillation_mode=mode, distillation_topk=10,
                 distillation_alpha=0.5, max_completion_length=5, num_generations=1, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedCompletions(model=student, args=args, processing_class=word_tokenizer(),
                                   train_dataset=Dataset.from_dict({"prompt": ["w2 w3"] * 8,
                                                                    "privileged_context": ["w4"] * 8}))
    _train_and_compare(trainer, expected, teacher_sharded=True)


def trl_iw_opd_case(tmp_path, setup):
    """kdfast's subclass of TRL's IWOPDTrainer (its default IW-OPD objective), the student and TRL's teacher (built
    from its folder and prepared as TRL prepares it) both sharded, against the objective from the logits of an
    unsharded pair. Each step trains on one fixed batch of completions (each rank its half, of different token
    counts: the loss is divided by the window's count over both ranks); generation is TRL's and not under test."""
    import warnings

    from datasets import Dataset
    from tiny_models import tiny_llama, word_tokenizer
    from transformers import LlamaForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from trl.experimental.iw_opd import IWOPDConfig

    from kdfast.integrations.trl import IWOPDTrainer

    unset_hf_deepspeed_config()  # an earlier case's ZeRO-3 arguments: the reference's models are built whole
    if not dist.is_initialized():  # (run alone; the Trainer joins this group as it would an earlier case's)
        dist.init_process_group("gloo")
    models = {"student": tiny_llama(32), "teacher": tiny_llama(48, seed=1)}
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    for name, model in models.items():
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        if dist.get_rank() == 0:  # transformers writes a model from rank 0 alone where a process group exists
            model.save_pretrained(tmp_path / name)
            tokenizer.save_pretrained(tmp_path / name)
    dist.barrier()
    completion = _completion_batch(torch.Generator().manual_seed(4))
    labels = torch.where(completion["completion_mask"].bool(), completion["completion_ids"], -100)
    batch = {"input_ids": torch.cat([completion["prompt_ids"], completion["completion_ids"]], 1),
             "attention_mask": torch.cat([completion["prompt_mask"], completion["completion_mask"]], 1),
             "labels": torch.cat([torch.full_like(completion["prompt_ids"], -100), labels], 1),
             "prompts": completion["prompt_ids"], "prompt_attention_mask": completion["prompt_mask"]}
    # The reference in float64: an embedding row's gradient sums terms that cancel, and float32 logits put one
    # element of it 3e-4 off.
    teacher = LlamaForCausalLM.from_pretrained(tmp_path / "teacher").double()

    def batch_loss(student, inputs):  # IW-OPD from both models' log-softmaxes, gamma 0.5, per kept token
        def logprobs(network):
            logits = network(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            return torch.log_softmax(logits[:, 2:-1], -1).gather(-1, inputs["input_ids"][:, 3:, None])[..., 0]

        valid = inputs["labels"][:, 3:] != -100
        student_logprobs = logprobs(student)
        with torch.no_grad():
            advantage = torch.where(valid, logprobs(teacher) - student_logprobs, 0.0)
        before = advantage.abs().cumsum(1) - advantage.abs()
        weight = 1 + 0.5 * (1 - before / advantage.abs().sum(1, keepdim=True))
        return -(torch.where(valid, weight * advantage * student_logprobs, 0.0)).sum() / valid.sum()

    losses, grads, params = _reference_run(LlamaForCausalLM.from_pretrained(tmp_path / "student").double(), batch,
                                           batch_loss)
    expected = ([loss.float() for loss in losses], {name: grad.float() for name, grad in grads.items()},
                {name: param.float() for name, param in params.items()})
    # The same reference in float32: its parameters after the steps drift from float64's by up to 2.4e-6 (the
    # embedding; 1.1e-6 in a v_proj, measured on an Intel Xeon), past the common 1e-6 the sharded run is held to;
    # its first gradients by up to 2.9e-6 (the embedding, whose largest is 8.4): on an AMD EPYC the sharded run's
    # embedding gradient missed the common tolerance by 1.4e-7 in one element whose terms cancel.
    teacher = teacher.float()
    float32_reference = _reference_run(LlamaForCausalLM.from_pretrained(tmp_path / "student"), batch, batch_loss)

    class FixedCompletions(IWOPDTrainer):
        def _prepare_inputs(self, generation_batch):
            half = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
            self._buffered_inputs = [{key: value[half] for key, value in batch.items()}]
            return self._buffered_inputs[0]

    # The student loaded whole before the arguments set ZeRO-3 up (a path would be partitioned as it loads, before
    # the comparison reads its initial values); TRL builds the teacher from its folder.
    student = LlamaForCausalLM.from_pretrained(tmp_path / "student")
    args = _args(tmp_path, setup, config_cls=IWOPDConfig, max_length=16, max_completion_length=5, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedCompletions(model=student, teacher_model=str(tmp_path / "teacher"), args=args,
                                   processing_class=tokenizer,
                                   train_dataset=Dataset.from_dict({"messages": [[{"role": "user",
                                                                                   "content": "w2 w3"}]] * 8}))
    _train_and_compare(trainer, expected, float32_reference=float32_reference)


CASES = {"sharded-teacher": functools.partial(distillation_case, sparse=False),
         "replicated-teacher": functools.partial(distillation_case, sparse=False, shard_teacher=False),
         "sparse-teacher": functools.partial(distillation_case, sparse=True),
         "multi-teacher": multi_teacher_case,
         "multi-teacher, routed": functools.partial(multi_teacher_case, routed=True),
         "multi-teacher, routed, replicated": functools.partial(multi_teacher_case, routed=True, shard_teacher=False),
         "cross-tokenizer": cross_tokenizer_case,
         "trl-gkd": trl_gkd_case,
         "trl-distillation": trl_distillation_case,
         "trl-distillation, routed teachers": functools.partial(trl_distillation_case, routed=True),
         "trl-fused-head, frozen": functools.partial(trl_fused_head_case, head_learns=False, entropy_bonus=False),
         "trl-fused-head, frozen, entropy bonus": functools.partial(trl_fused_head_case, head_learns=False,
                                                                    entropy_bonus=True),
         "trl-fused-head, head learns": functools.partial(trl_fused_head_case, head_learns=True, entropy_bonus=True),
         "patched-causal-lm": patched_causal_lm_case,
         "vision-language": vision_language_case,
         "packed-sequences": packed_sequences_case,
         "teacher-by-path": teacher_by_path_case,
         "teacher-by-path, replicated": functools.partial(teacher_by_path_case, shard_teacher=False),
         # (the full-vocabulary mode is the fused linear loss that the trl-distillation cases shard already)
         "trl-sdft, top-k": functools.partial(trl_sdft_case, mode="topk_logits"),
         "trl-iw-opd": trl_iw_opd_case}


def run_all(rank, world, port, setup_name, folder, out_path):
    from rank_cases import run_cases

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    setup = {"fsdp2": FSDP2, "zero3": ZERO3}[setup_name]
    allow_sharding_on_cpu()
    folder = pathlib.Path(folder)
    run_cases({name: functools.partial(case, folder / name, setup) for name, case in CASES.items()}, out_path)
    if dist.is_initialized():
        dist.destroy_process_group()
