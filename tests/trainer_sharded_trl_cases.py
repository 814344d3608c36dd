"""The TRL trainers' sharded cases that tests/trainer_sharded_cases.py runs on each rank: kdfast's TRL `GKDTrainer`,
its subclasses of TRL's stable `DistillationTrainer` (one teacher and routed ones), of its `SDFTTrainer` and of the
IW-OPD trainer, and TRL's fused LM head on kdfast, each against an unsharded reference (tests/sharded_training.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from sharded_training import completion_batch, reference_run, train_and_compare, trainer_args


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
    expected = reference_run(student_and_teacher(head_scale=4.0)[0], batch,
                             lambda model, inputs: batch_distill_loss(model, teacher, inputs, opts))
    args = trainer_args(tmp_path, setup, config_cls=GKDConfig, beta=0.5, lmbda=0.0, max_new_tokens=4, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's experimental-namespace warning
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=word_tokenizer(),
                             train_dataset=Dataset.from_dict({k: v.tolist() for k, v in batch.items()}),
                             data_collator=default_data_collator)
    train_and_compare(trainer, expected, teacher_sharded=True)



def trl_distillation_case(tmp_path, setup, *, routed: bool = False, teacher_logits: str = "auto"):
    """kdfast's subclass of TRL's stable DistillationTrainer against TRL's loss (float64, from full logits) on an
    unsharded student. Generation is TRL's and not under test here: each step trains on one fixed batch of
    completions (each rank its half), which TRL's `_prepare_inputs` would otherwise generate. `routed`: two teachers
    by name, each sequence routed to one by its `teacher_id` (rank 0's half has none of the second's: a sharded
    teacher still runs its forward with the other rank). `teacher_logits="own"`: each teacher's whole forward, through
    its wrapper, gives its logits (the student's head fused)."""
    import warnings

    from datasets import Dataset
    from tiny_models import student_and_teacher, tiny_llama, word_tokenizer
    from trl import DistillationConfig

    from kdfast.integrations.trl import DistillationTrainer
    from kdfast.reference import distill_loss_reference

    student, teacher = student_and_teacher(head_scale=4.0)
    generator = torch.Generator().manual_seed(0)
    batch = completion_batch(generator)
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

    expected = reference_run(student_and_teacher(head_scale=4.0)[0], batch, batch_loss)

    class FixedCompletions(DistillationTrainer):
        def _prepare_inputs(self, generation_batch):
            half = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
            return {**{key: value[half] for key, value in batch.items()}, "num_items_in_batch": count}

    args = trainer_args(tmp_path, setup, config_cls=DistillationConfig, beta=0.5, temperature=2.0,
                        max_completion_length=5, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedCompletions(model=student, teacher_model=dict(zip("ab", teachers)) if routed else teacher,
                                   args=args, processing_class=word_tokenizer(), teacher_logits=teacher_logits,
                                   train_dataset=Dataset.from_dict({"prompt": ["w2 w3"] * 8}))
    train_and_compare(trainer, expected)


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
    expected = reference_run(student(), batch, batch_loss)

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
        trainer = FusedHeadTrainer(model=model, args=trainer_args(tmp_path, setup), train_dataset=as_examples(batch))
        train_and_compare(trainer, expected)
    finally:
        patch_trl_fused_lm_head(False)
        trl_fused_lm_head.linear_token_outputs = original
    assert calls, "the fused head's log-probs came from kdfast"




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
    batch = completion_batch(generator)
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
    expected = reference_run(reference, batch, batch_loss)

    class FixedCompletions(SDFTTrainer):
        def _prepare_inputs(self, generation_batch):
            half = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
            return {key: value[half] for key, value in batch.items()}

    # The student loaded whole before the arguments set ZeRO-3 up (a path would be partitioned as it loads, before
    # the comparison reads its initial values); TRL builds the teacher from its folder, partitioned.
    student = LlamaForCausalLM.from_pretrained(folder)
    args = trainer_args(tmp_path, setup, config_cls=SDFTConfig, distillation_mode=mode, distillation_topk=10,
                        distillation_alpha=0.5, max_completion_length=5, num_generations=1, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedCompletions(model=student, args=args, processing_class=word_tokenizer(),
                                   train_dataset=Dataset.from_dict({"prompt": ["w2 w3"] * 8,
                                                                    "privileged_context": ["w4"] * 8}))
    train_and_compare(trainer, expected, teacher_sharded=True)


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
    completion = completion_batch(torch.Generator().manual_seed(4))
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

    losses, grads, params = reference_run(LlamaForCausalLM.from_pretrained(tmp_path / "student").double(), batch,
                                          batch_loss)
    expected = ([loss.float() for loss in losses], {name: grad.float() for name, grad in grads.items()},
                {name: param.float() for name, param in params.items()})
    # The same reference in float32: its parameters after the steps drift from float64's by up to 2.4e-6 (the
    # embedding; 1.1e-6 in a v_proj, measured on an Intel Xeon), past the common 1e-6 the sharded run is held to;
    # its first gradients by up to 2.9e-6 (the embedding, whose largest is 8.4): on an AMD EPYC the sharded run's
    # embedding gradient missed the common tolerance by 1.4e-7 in one element whose terms cancel.
    teacher = teacher.float()
    float32_reference = reference_run(LlamaForCausalLM.from_pretrained(tmp_path / "student"), batch, batch_loss)

    class FixedCompletions(IWOPDTrainer):
        def _prepare_inputs(self, generation_batch):
            half = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
            self._buffered_inputs = [{key: value[half] for key, value in batch.items()}]
            return self._buffered_inputs[0]

    # The student loaded whole before the arguments set ZeRO-3 up (a path would be partitioned as it loads, before
    # the comparison reads its initial values); TRL builds the teacher from its folder.
    student = LlamaForCausalLM.from_pretrained(tmp_path / "student")
    args = trainer_args(tmp_path, setup, config_cls=IWOPDConfig, max_length=16, max_completion_length=5, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedCompletions(model=student, teacher_model=str(tmp_path / "teacher"), args=args,
                                   processing_class=tokenizer,
                                   train_dataset=Dataset.from_dict({"messages": [[{"role": "user",
                                                                                   "content": "w2 w3"}]] * 8}))
    train_and_compare(trainer, expected, float32_reference=float32_reference)

