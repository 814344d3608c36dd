"""What each rank runs in tests/test_trainer_sharded.py: `DistillationTrainer` (one teacher, sharded or replicated,
several, sparse, of another tokenizer, given by a folder, vision-language models on images, packed examples) and a
model patched by `patch_causal_lm` here, the TRL trainers' cases from tests/trainer_sharded_trl_cases.py, under
accelerate's FSDP2 plugin or DeepSpeed ZeRO-3 (set up by `TrainingArguments`, as `accelerate launch` with such a
config sets them up), 2 gloo ranks on CPU, each taking half of every batch. The loss of each step, every parameter's
gradient in the first step and the parameters after 3 SGD steps equal an unsharded student's trained on the whole
batch in the same process (how: tests/sharded_training.py)."""

from __future__ import annotations

import functools
import os
import pathlib

import torch
import torch.distributed as dist
from sharded_training import (
    FSDP2,
    SETTINGS,
    STEPS,
    ZERO3,
    allow_sharding_on_cpu,
    reference_run,
    train_and_compare,
    trainer_args,
)
from trainer_sharded_trl_cases import (
    trl_distillation_case,
    trl_fused_head_case,
    trl_gkd_case,
    trl_iw_opd_case,
    trl_sdft_case,
)


def distillation_case(tmp_path, setup, *, sparse: bool, shard_teacher: bool = True, teacher_logits: str = "auto",
                      ensemble: bool = False):
    """`teacher_logits="own"`: the teacher's own forward (its hooks gathering a sharded teacher's parameters) gives
    its logits, the student's head fused; `ensemble`: the teacher a module averaging two models' logits (no head)."""
    from fsdp2_cases import sparse_inputs
    from tiny_models import LogitEnsemble, as_examples, student_and_teacher, token_batch

    from kdfast.integrations.causal_lm import batch_distill_loss, batch_sparse_distill_loss
    from kdfast.integrations.teacher_logits import batch_distill_from_teacher_logits
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions
    from kdfast.sparse_options import SparseOptions

    student, teacher = student_and_teacher(head_scale=4.0)
    teacher = LogitEnsemble() if ensemble else teacher
    batch = token_batch()
    if sparse:
        batch = sparse_inputs(teacher, batch)
        opts = SparseOptions(**SETTINGS)
        batch_loss = lambda model, inputs: batch_sparse_distill_loss(model, inputs, opts)  # noqa: E731
    else:
        opts = LossOptions(**SETTINGS)
        loss_fn = batch_distill_from_teacher_logits if teacher_logits == "own" or ensemble else batch_distill_loss
        batch_loss = lambda model, inputs: loss_fn(model, teacher, inputs, opts)  # noqa: E731
    expected = reference_run(student_and_teacher(head_scale=4.0)[0], batch, batch_loss)
    trainer = DistillationTrainer(model=student, teacher_model=None if sparse else teacher,
                                  args=trainer_args(tmp_path, setup), train_dataset=as_examples(batch),
                                  shard_teacher=shard_teacher, teacher_logits=teacher_logits, **SETTINGS)
    train_and_compare(trainer, expected, teacher_sharded=None if sparse else shard_teacher)
    # An evaluation's parts, summed over the processes as its loss is gathered, add up to its loss.
    metrics = trainer.evaluate(as_examples(batch))
    total = SETTINGS["kd_weight"] * SETTINGS["temperature"] ** 2 * metrics["eval_kd_loss"] + \
        SETTINGS["ce_weight"] * metrics["eval_ce_loss"]
    torch.testing.assert_close(total, metrics["eval_loss"], rtol=1e-5, atol=1e-7)


def multi_teacher_case(tmp_path, setup, *, routed: bool = False, shard_teacher: bool = True, ensemble: bool = False):
    """Two teacher models of different hidden sizes, weighed 1:3, each sharded as the student is (or replicated). Or
    routed by a `teacher_id` column in which one teacher has a single example, so that a rank has none of its: a
    sharded teacher still runs its forward with the other ranks, a replicated one runs on its own examples alone.
    `ensemble`: the second teacher a module averaging two models' logits (no head), distilled through them."""
    from tiny_models import LogitEnsemble, as_examples, student_and_teacher, tiny_llama, token_batch

    from kdfast.integrations.causal_lm import batch_multi_teacher_loss
    from kdfast.integrations.transformers import DistillationTrainer
    from kdfast.options import LossOptions

    student, teacher = student_and_teacher(head_scale=4.0)
    teachers = [teacher, LogitEnsemble() if ensemble else tiny_llama(48, seed=2)]
    weights, opts = [1.0, 3.0], LossOptions(**SETTINGS)
    batch = token_batch()
    if routed:
        batch["teacher_id"], weights = torch.tensor([0, 0, 1, 0]), None
    expected = reference_run(student_and_teacher(head_scale=4.0)[0], batch,
                             lambda model, inputs: batch_multi_teacher_loss(model, teachers, inputs, opts,
                                                                            weights=weights,
                                                                            own_logits_of=[False, ensemble]))
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=trainer_args(tmp_path, setup),
                                  train_dataset=as_examples(batch), teacher_weights=weights,
                                  shard_teacher=shard_teacher, **SETTINGS)
    train_and_compare(trainer, expected)


def cross_tokenizer_case(tmp_path, setup, *, teacher_logits: str = "auto"):
    """A teacher of another tokenizer (GOLD's hybrid), sharded as the student is. The texts are of two kinds, each
    tokenizer the coarser on one, so each rank's aligned groups per label token differ: the KD term divides by the
    whole batch's groups, counted over the ranks. `teacher_logits="own"`: the sharded teacher's whole forward gives
    its logits."""
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
    expected = reference_run(models(*tokenizers)[0], batch,
                             lambda model, inputs: batch_cross_vocab_loss(model, teacher, inputs, vocab_map,
                                                                          **SETTINGS)[0])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, teacher_tokenizer=tokenizers[1],
                                  processing_class=tokenizers[0], args=trainer_args(tmp_path, setup),
                                  train_dataset=Dataset.from_dict({"text": texts}), teacher_logits=teacher_logits,
                                  **SETTINGS)
    train_and_compare(trainer, expected, teacher_sharded=True)



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
    expected = reference_run(student(), batch, lambda model, inputs: model(**inputs).loss)
    model = fused_causal_lm.patch_causal_lm(student())
    calls, original = [], fused_causal_lm.linear_cross_entropy
    fused_causal_lm.linear_cross_entropy = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        trainer = Trainer(model=model, args=trainer_args(tmp_path, setup), train_dataset=as_examples(batch))
        train_and_compare(trainer, expected)
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
    expected = reference_run(vision_models("llava")[0][0], batch,
                             lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    examples = [{key: value[row] for key, value in batch.items()} for row in range(4)]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trainer_args(tmp_path, setup),
                                  train_dataset=examples, data_collator=default_data_collator, **SETTINGS)
    train_and_compare(trainer, expected, teacher_sharded=True)


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
    expected = reference_run(student_and_teacher(head_scale=4.0)[0], whole,
                             lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trainer_args(tmp_path, setup),
                                  train_dataset=[{"input_ids": row} for row in rows],
                                  data_collator=DataCollatorWithFlattening(), **SETTINGS)
    train_and_compare(trainer, expected, teacher_sharded=True)


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
    expected = reference_run(student_and_teacher(head_scale=4.0)[0], batch,
                             lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    trainer = DistillationTrainer(model=student, teacher_model=str(folder), args=trainer_args(tmp_path, setup),
                                  train_dataset=as_examples(batch), shard_teacher=shard_teacher, **SETTINGS)
    train_and_compare(trainer, expected, teacher_sharded=shard_teacher)




CASES = {"sharded-teacher": functools.partial(distillation_case, sparse=False),
         "replicated-teacher": functools.partial(distillation_case, sparse=False, shard_teacher=False),
         "sparse-teacher": functools.partial(distillation_case, sparse=True),
         "sharded-teacher, own logits": functools.partial(distillation_case, sparse=False, teacher_logits="own"),
         "sharded-teacher, a module's logits": functools.partial(distillation_case, sparse=False, ensemble=True),
         "multi-teacher": multi_teacher_case,
         "multi-teacher, routed": functools.partial(multi_teacher_case, routed=True),
         "multi-teacher, routed, replicated": functools.partial(multi_teacher_case, routed=True, shard_teacher=False),
         "multi-teacher, routed, a module's logits": functools.partial(multi_teacher_case, routed=True, ensemble=True),
         "cross-tokenizer": cross_tokenizer_case,
         "cross-tokenizer, own logits": functools.partial(cross_tokenizer_case, teacher_logits="own"),
         "trl-gkd": trl_gkd_case,
         "trl-distillation": trl_distillation_case,
         "trl-distillation, routed teachers": functools.partial(trl_distillation_case, routed=True),
         "trl-distillation, routed teachers, own logits": functools.partial(trl_distillation_case, routed=True,
                                                                            teacher_logits="own"),
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
