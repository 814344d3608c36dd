"""TRL's stable `DistillationTrainer` (on-policy distillation; TRL >= 1.16) on kdfast: its loss, TRL's generalized JSD
between the teacher's and the student's softmaxes at `temperature` over the completion tokens, comes from kdfast's
fused linear loss instead of TRL's chunked kernels. `chunked_divergence_loss` is a drop-in for TRL's
`_chunked_divergence_loss` (same arguments, same `(loss, entropy_sum, n_valid)`); the trainer overrides only
`_compute_loss`, so generation, `num_items_in_batch`, the wrapper redirection and the logged entropy stay TRL's."""

from __future__ import annotations

import contextlib
import sys

import torch

from kdfast.integrations.causal_lm import final_softcap, head_settings, logit_scale, output_head
from kdfast.integrations.sharding import whole_head
from kdfast.linear_loss import fused_linear_loss
from kdfast.linear_multi_teacher import fused_linear_multi_teacher_loss
from kdfast.multi_teacher import COMBINES
from kdfast.options import LossOptions
from kdfast.teacher_weights import check_trainer_weights

try:
    from trl import DistillationTrainer as _TRLDistillationTrainer
except ImportError as error:
    raise ImportError("kdfast.integrations.trl.DistillationTrainer needs TRL >= 1.16 (trl.DistillationTrainer)") \
        from error


def trl_jsd_options(beta: float, temperature: float) -> LossOptions:
    """TRL's loss as kdfast settings: generalized JSD with `beta` (0 forward KL, 1 reverse KL) at `temperature`, no
    T² factor, summed over the rows (TRL divides by its own count)."""
    return LossOptions(divergence="jsd", beta=beta, temperature=temperature, t2_scale=False, reduction="sum",
                       return_components=True)


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0, *, chunk_size="auto",
                            backend="auto"):
    """TRL's `_chunked_divergence_loss` on kdfast: hidden states [B, K, H_s] / [B, K, H_t] aligned with the completion
    tokens, heads [V, H_s] / [V, H_t] (+ biases), `completion_mask` [B, K] (nonzero: a token in the loss). Returns the
    loss (the divergence summed over the masked-in tokens, divided by `num_items_in_batch` when given, else by their
    count, at least 1), the sum of the student's entropy at `temperature` over them (detached), and their count.
    Only the masked-in tokens are projected. The teacher is a constant."""
    valid = completion_mask.reshape(-1) != 0
    kept = valid.nonzero().squeeze(1)
    student = student_hidden_states.reshape(-1, student_hidden_states.shape[-1]).index_select(0, kept)
    teacher = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1]).index_select(0, kept)
    options = trl_jsd_options(beta, temperature).replace(backend=backend)
    total, parts = fused_linear_loss(
        student, student_lm_head_weight, teacher.detach(), teacher_lm_head_weight.detach(), None, options,
        student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias.detach() if teacher_lm_head_bias is not None else None,
        student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale, chunk_size=chunk_size)
    n_valid = valid.sum()
    return _divided(total, n_valid, num_items_in_batch), parts.entropy, n_valid


def _divided(total, n_valid, num_items_in_batch):
    """The summed divergence over `num_items_in_batch`, else over the tokens, clamped as TRL clamps it: a fully masked
    batch is a differentiable 0, not 0 / 0."""
    if num_items_in_batch is None:
        return total / n_valid.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_multi_teacher_divergence_loss(student_hidden_states, teacher_hidden_states: list, student_lm_head_weight,
                                          teacher_lm_head_weights: list, completion_mask, beta,
                                          num_items_in_batch=None, student_lm_head_bias=None,
                                          teacher_lm_head_biases=None, student_logit_scale=1.0,
                                          teacher_logit_scales=1.0, student_final_logit_softcapping=None,
                                          teacher_final_logit_softcappings=None, temperature=1.0, *, weights=None,
                                          combine="mixture", completion_ids=None, chunk_size="auto", backend="auto"):
    """`chunked_divergence_loss` against several teachers (lists, one entry per teacher; hidden sizes may differ),
    mixed or averaged with `weights` as `kdfast.linear_multi_teacher_distill_loss` takes them (per-row weights:
    [B, K, M]; "confidence" and "min_ce" weigh each teacher by its probability of the completion's token,
    `completion_ids` [B, K]). Returns TRL's triple and each teacher's own divergence summed over the tokens ([M],
    detached)."""
    valid = completion_mask.reshape(-1) != 0
    kept = valid.nonzero().squeeze(1)
    student = student_hidden_states.reshape(-1, student_hidden_states.shape[-1]).index_select(0, kept)
    teachers = [hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept).detach() for hidden in teacher_hidden_states]
    if isinstance(weights, torch.Tensor) and weights.dim() > 1:
        weights = weights.reshape(-1, weights.shape[-1]).index_select(0, kept.to(weights.device))
    labels = None
    if isinstance(weights, str):  # the teachers' confidence in the tokens the policy sampled
        if completion_ids is None:
            raise ValueError(f"weights={weights!r} weighs each teacher by its probability of the completion's token: "
                             "pass completion_ids")
        labels = completion_ids.reshape(-1).to(kept.device).index_select(0, kept)
    options = trl_jsd_options(beta, temperature).replace(backend=backend)
    total, parts = fused_linear_multi_teacher_loss(
        student, student_lm_head_weight, teachers, [weight.detach() for weight in teacher_lm_head_weights], labels,
        options, student_bias=student_lm_head_bias,
        teacher_bias=[b.detach() if b is not None else None for b in teacher_lm_head_biases or [None] * len(teachers)],
        weights=weights, combine=combine, student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcappings, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scales, chunk_size=chunk_size)
    n_valid = valid.sum()
    return _divided(total, n_valid, num_items_in_batch), parts.entropy, n_valid, parts.teachers


class DistillationTrainer(_TRLDistillationTrainer):
    """TRL's `DistillationTrainer` (same arguments, `trl.DistillationConfig`) whose loss is kdfast's fused linear one:
    the same loss, logged entropy and gradients as TRL's, with each model's logit scale and softcap read as TRL reads
    them. Generation (and everything else) is TRL's.

    `teacher_model` may also be a list of models: TRL prepares the first, kdfast the others the same way (a ZeRO-3 or
    FSDP engine, or accelerate's evaluation wrapper), and the divergence is to their mixture (`teacher_combine=
    "mixture"`) or the weighted sum of each one's (`"average"`), with `teacher_weights` as
    `kdfast.linear_multi_teacher_distill_loss` takes them; each teacher's own divergence per token is logged as
    `divergence/teacher_<m>`."""

    def __init__(self, model=None, teacher_model=None, args=None, *rest, teacher_weights=None,
                 teacher_combine="mixture", **kwargs):
        several = isinstance(teacher_model, (list, tuple))
        if several and not all(hasattr(teacher, "get_output_embeddings") for teacher in teacher_model):
            raise ValueError("teacher_model as a list takes loaded models (a path is TRL's to load: pass one teacher "
                             "by name, or load each first)")
        if not several and (teacher_weights is not None or teacher_combine != "mixture"):
            raise ValueError("teacher_weights and teacher_combine weigh several teachers: pass teacher_model as a "
                             "list of models")
        if teacher_combine not in COMBINES:
            raise ValueError(f"teacher_combine must be one of {COMBINES}, got {teacher_combine!r}")
        if several:
            check_trainer_weights(teacher_weights, len(teacher_model))
        super().__init__(model, teacher_model[0] if several else teacher_model, args, *rest, **kwargs)
        self.teacher_weights, self.teacher_combine = teacher_weights, teacher_combine
        self._teacher_divergences = None
        self.teacher_models = [self.teacher_model, *map(self._prepared_teacher, teacher_model[1:])] if several \
            else None

    def _prepared_teacher(self, teacher):
        """A teacher prepared as TRL prepares its own (trl.DistillationTrainer.__init__)."""
        if self.is_deepspeed_enabled:
            return sys.modules[_TRLDistillationTrainer.__module__].prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._teacher_divergences is not None:  # gathered here, outside the wrapped forward (as TRL's entropy)
            sums, tokens = self._teacher_divergences
            sums = self.accelerator.gather_for_metrics(sums.reshape(1, -1)).sum(0)
            tokens = self.accelerator.gather_for_metrics(tokens.reshape(1)).sum()
            mode = "train" if self.model.training else "eval"
            for index, total in enumerate((sums / tokens.clamp(min=1)).tolist()):
                self._metrics[mode][f"divergence/teacher_{index}"].append(total)
            self._teacher_divergences = None
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn: tool outputs are not the student's to learn
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        if self.teacher_models is not None:
            return self._several_teachers_loss(unwrapped_student, student_hidden, input_ids, attention_mask,
                                               logits_to_keep, multimodal, loss_mask, num_items_in_batch, inputs)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            # Through the teacher's own wrapper, so FSDP / DeepSpeed gather its shards for the backbone.
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)
        student_head, teacher_head = output_head(unwrapped_student), output_head(unwrapped_teacher)
        settings = head_settings(unwrapped_student, unwrapped_teacher)
        with whole_head(unwrapped_student, student_head), whole_head(unwrapped_teacher, teacher_head, frozen=True):
            device = student_head.weight.device
            loss, entropy_sum, n_valid = chunked_divergence_loss(
                student_hidden.to(device), teacher_hidden.to(device), student_head.weight, teacher_head.weight,
                loss_mask.to(device), self.beta, num_items_in_batch, student_head.bias, teacher_head.bias,
                settings["student_logit_scale"], settings["teacher_logit_scale"], settings["student_softcap"],
                settings["teacher_softcap"], self.temperature)
        return loss, entropy_sum, n_valid

    def _several_teachers_loss(self, unwrapped_student, student_hidden, input_ids, attention_mask, logits_to_keep,
                               multimodal, loss_mask, num_items_in_batch, inputs):
        unwrapped, hidden = [], []
        for teacher in self.teacher_models:
            teacher.eval()
            unwrapped.append(self.accelerator.unwrap_model(teacher))
            with torch.no_grad():
                hidden.append(self._forward_redirection(teacher, unwrapped[-1], self._get_last_hidden_state,
                                                        unwrapped[-1], input_ids, attention_mask, logits_to_keep,
                                                        **multimodal))
        student_head, heads = output_head(unwrapped_student), [output_head(teacher) for teacher in unwrapped]
        with contextlib.ExitStack() as stack:
            stack.enter_context(whole_head(unwrapped_student, student_head))
            for teacher, head in zip(unwrapped, heads):
                stack.enter_context(whole_head(teacher, head, frozen=True))
            device = student_head.weight.device
            loss, entropy_sum, n_valid, per_teacher = chunked_multi_teacher_divergence_loss(
                student_hidden.to(device), [h.to(device) for h in hidden], student_head.weight,
                [head.weight for head in heads], loss_mask.to(device), self.beta, num_items_in_batch,
                student_head.bias, [head.bias for head in heads], logit_scale(unwrapped_student),
                [logit_scale(teacher) for teacher in unwrapped], final_softcap(unwrapped_student),
                [final_softcap(teacher) for teacher in unwrapped], self.temperature, weights=self.teacher_weights,
                combine=self.teacher_combine, completion_ids=inputs["completion_ids"])
        self._teacher_divergences = (per_teacher.detach(), n_valid.detach())
        return loss, entropy_sum, n_valid


# The inputs TRL's `_get_last_hidden_state` passes on to a vision-language model's backbone.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
