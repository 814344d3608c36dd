"""TRL's stable `DistillationTrainer` (on-policy distillation; TRL >= 1.16) on kdfast: its loss, TRL's generalized JSD
between the teacher's and the student's softmaxes at `temperature` over the completion tokens, comes from kdfast's
fused linear loss instead of TRL's chunked kernels. `chunked_divergence_loss` is a drop-in for TRL's
`_chunked_divergence_loss` (same arguments, same `(loss, entropy_sum, n_valid)`); the trainer overrides only
`_compute_loss`, so generation, `num_items_in_batch`, the wrapper redirection and the logged entropy stay TRL's."""

from __future__ import annotations

import torch

from kdfast.integrations.causal_lm import head_settings, output_head
from kdfast.integrations.sharding import whole_head
from kdfast.linear_loss import fused_linear_loss
from kdfast.options import LossOptions

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
    if num_items_in_batch is None:
        # Clamped as TRL clamps it: a fully masked batch is a differentiable 0, not 0 / 0.
        loss = total / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    return loss, parts.entropy, n_valid


class DistillationTrainer(_TRLDistillationTrainer):
    """TRL's `DistillationTrainer` (same arguments, `trl.DistillationConfig`) whose loss is kdfast's fused linear one:
    the same loss, logged entropy and gradients as TRL's, with each model's logit scale and softcap read as TRL reads
    them. Generation (and everything else) is TRL's."""

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


# The inputs TRL's `_get_last_hidden_state` passes on to a vision-language model's backbone.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
