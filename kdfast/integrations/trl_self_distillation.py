"""TRL's self-distillation trainers, `trl.experimental.sdft.SDFTTrainer` and `trl.experimental.sdpo.SDPOTrainer`
(TRL >= 1.16), on kdfast. TRL forwards the student on its prompt and the teacher (the student itself, its base
weights or an EMA copy) on the prompt with privileged context, keeps both models' [B, T, V] logits of the completion
and compares them token by token; here only the decoders run, and the completion tokens' objective comes from their
hidden states and heads through kdfast's kernels (`kdfast.integrations.self_distillation`). Generation, the teacher's
set-up and its updates, the batches, the normalisation (each sequence's mean, then the batch's), the logged metrics
and the division for gradient accumulation are TRL's. A teacher served by vLLM (`use_teacher_server=True`) returns its
top-k and token log-probs: the student's side of that objective is kdfast's too."""

from __future__ import annotations

import torch

from kdfast.integrations.causal_lm import head_map, last_hidden_state, output_head
from kdfast.integrations.compiled_loss import entered_model
from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.self_distillation import (
    SelfDistillationSettings,
    ServedTeacher,
    self_distillation_rows,
    served_self_distillation_rows,
)
from kdfast.integrations.sharding import run_through_wrapper, whole_heads
from kdfast.token_logprobs import linear_token_logprobs
from kdfast.top_k_support import HeadMap

try:
    from trl.experimental.sdft import SDFTTrainer as _TRLSDFTTrainer
    from trl.experimental.sdpo import SDPOTrainer as _TRLSDPOTrainer
except ImportError as error:
    raise ImportError("kdfast.integrations.trl.SDFTTrainer / SDPOTrainer need TRL >= 1.16 (trl.experimental.sdft, "
                      "trl.experimental.sdpo)") from error


class _FusedSelfDistillation:
    """What SDFT and SDPO share: the models' hidden states over the completion and the fused objective on them."""

    def _loss_mask(self, inputs) -> torch.Tensor:
        raise NotImplementedError

    def _distillation_settings(self) -> SelfDistillationSettings:
        args = self.args
        return SelfDistillationSettings(args.distillation_mode, float(args.distillation_alpha),
                                        args.distillation_topk, bool(args.distillation_add_tail),
                                        args.distillation_is_clip, float(self.temperature))

    def _fused_losses(self, model, inputs, *, distillation: bool, policy_logprobs: bool, served: bool = False):
        """(the self-distillation loss, TRL-normalised, or None; the student's log-probs at T of the completion
        tokens [B, L] with their gradient, or None). `served`: the teacher's log-probs come from TRL's vLLM server."""
        settings = self._distillation_settings() if distillation else None
        wrapper, student = entered_model(self, model)
        teacher = None
        if distillation:
            teacher = self._served_teacher(inputs) if served else self._teacher_hidden(inputs)
        return run_through_wrapper(wrapper, student, self._student_losses, student, inputs, teacher, settings,
                                   policy_logprobs)

    def _served_teacher(self, inputs) -> dict:
        """TRL's server answer for the batch: the top-k ids and log-probs [B, L, K] and the realised tokens' log-probs
        [B, L] (-inf past each completion), after TRL's weight sync where the step moved on."""
        # Buffered batches are reused across optimizer steps, so the server's weights may lag the student's: TRL
        # pushes them before scoring, every rank waiting for the main one's push.
        if self.state.global_step != self._last_loaded_step:
            self.vllm_generation.sync_weights()
            self.accelerator.wait_for_everyone()
            self._last_loaded_step = self.state.global_step
        return self._get_teacher_token_logprobs_from_server(inputs, inputs["completion_ids"].shape[1])

    def _teacher_hidden(self, inputs) -> torch.Tensor:
        """The teacher's decoder output at the positions that predict the completion, [B, L, H_t], no gradient."""
        wrapper = self.teacher_model
        teacher = self.accelerator.unwrap_model(wrapper)
        length = inputs["completion_ids"].shape[1]
        probe = {"input_ids": inputs["teacher_input_ids"], "attention_mask": inputs["teacher_attention_mask"]}

        def hidden(ids, mask):
            return last_hidden_state(teacher, ids, mask)[:, :-1][:, -length:]

        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            with self.accelerator.autocast():
                check_head_map(teacher, probe)
            return run_through_wrapper(wrapper, teacher, hidden, probe["input_ids"], probe["attention_mask"])

    def _student_losses(self, student, inputs, teacher, settings, policy_logprobs):
        """`teacher`: its hidden states [B, L, H_t] (a local teacher), or the server's answer (a dict)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        with self.accelerator.autocast():
            check_head_map(student, {"input_ids": ids, "attention_mask": mask})
        hidden = last_hidden_state(student, ids, mask)[:, :-1][:, -completion_ids.shape[1]:]
        student_head = output_head(student)
        local = settings is not None and not isinstance(teacher, dict)
        teacher_model = self.accelerator.unwrap_model(self.teacher_model) if local else None
        teacher_head = output_head(teacher_model) if local else None
        with whole_heads(student, student_head, [teacher_model] if local else [], [teacher_head] if local else []):
            student_map = head_map(student, student_head, self.temperature)
            distillation = None
            if local:
                teacher_map = head_map(teacher_model, teacher_head, self.temperature, frozen=True)
                distillation = self._distillation(student_map, hidden, inputs, settings, (teacher, teacher_map))
            elif settings is not None:
                distillation = self._distillation(student_map, hidden, inputs, settings, teacher)
            logprobs = self._token_logprobs(student_map, hidden, completion_ids, completion_mask) \
                if policy_logprobs else None
        return distillation, logprobs

    def _distillation(self, student: HeadMap, hidden, inputs, settings, teacher):
        """TRL's self-distillation loss over the kept completion tokens and its logged metrics. `teacher`: (its hidden
        states, its head) or the server's answer."""
        loss_mask = self._loss_mask(inputs)
        mode = "train" if self.model.training else "eval"
        served = isinstance(teacher, dict)
        if served:
            required = loss_mask.bool()
            if bool((required & ~torch.isfinite(teacher["actual_logprobs"])).any()):
                raise ValueError("Teacher server returned no logprob for a required completion token.")
        if not bool(loss_mask.any()):
            if served:
                self._metrics[mode]["self_distillation/server_logprob_abs_diff"].append(0.0)
            self._log_self_distillation_metric(mode, 0.0)
            # Attached to the student's graph (its decoder and its head), so backward gives zeros, as TRL's does.
            zero = hidden.sum() + student.weight.sum()
            return zero * 0.0
        kept = loss_mask.reshape(-1).nonzero().squeeze(1)

        def rows(tensor):
            return tensor.reshape(-1, *tensor.shape[2:]).index_select(0, kept)

        # TRL's normalisation: each token over its sequence's kept count (at least 1), then the mean over sequences.
        per_sequence = 1.0 / (loss_mask.sum(-1).clamp(min=1).float() * loss_mask.shape[0])
        row_weights = rows(loss_mask.float() * per_sequence[:, None])
        old = inputs.get("old_per_token_logps")
        old = rows(old) if old is not None else None
        count = loss_mask.sum().clamp(min=1)
        token_ids = rows(inputs["completion_ids"])
        if served:
            answer = ServedTeacher(rows(teacher["topk_token_ids"]), rows(teacher["topk_logprobs"]),
                                   rows(teacher["actual_logprobs"]))
            loss, metric_sum, student_logprobs = served_self_distillation_rows(
                rows(hidden), student, answer, token_ids, row_weights, settings, old)
            # How far the student's scores of the realised tokens are from the server's (stale weights show here).
            distance = (student_logprobs - answer.token_logprobs).abs().sum() / count
            self._metrics[mode]["self_distillation/server_logprob_abs_diff"].append(
                self.accelerator.gather(distance).mean().item())
        else:
            teacher_hidden, teacher_head = teacher
            loss, metric_sum = self_distillation_rows(rows(hidden), student, rows(teacher_hidden), teacher_head,
                                                      token_ids, row_weights, settings, old)
        self._log_self_distillation_metric(mode, self.accelerator.gather(metric_sum / count).mean().item())
        return loss

    @staticmethod
    def _token_logprobs(student: HeadMap, hidden, completion_ids, completion_mask) -> torch.Tensor:
        """log q(token) at T of the completion tokens [B, L] (0 where the mask is), with their gradient."""
        flat_mask = completion_mask.reshape(-1) != 0
        kept = flat_mask.nonzero().squeeze(1)
        values = linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept), student.weight,
                                       completion_ids.reshape(-1).index_select(0, kept), bias=student.bias,
                                       temperature=student.temperature, logit_scale=student.scale,
                                       softcap=student.softcap)
        full = torch.zeros(flat_mask.shape[0], dtype=values.dtype, device=values.device)
        return full.index_put((kept,), values).view(completion_mask.shape)

    def _accumulation_scaled(self, loss):
        return loss / (self.current_gradient_accumulation_steps if self.model.training else 1.0)


class SDFTTrainer(_FusedSelfDistillation, _TRLSDFTTrainer):
    """TRL's `SDFTTrainer` (same arguments, `SDFTConfig`) whose loss comes from kdfast: every `distillation_mode`
    ("topk_logits", its default, over the student's own top-k; "full_logits"; "sampled_token"), `distillation_alpha`,
    `distillation_add_tail`, `distillation_is_clip`, `num_loss_tokens_to_skip`, the temperature and each model's logit
    scale and softcap, without [B, T, V] logits; with `use_teacher_server=True`, against the served teacher's top-k
    or token log-probs."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDFTTrainer does not support returning outputs")
        loss, _ = self._fused_losses(model, inputs, distillation=True, policy_logprobs=False,
                                     served=self.use_teacher_server)
        return self._accumulation_scaled(loss)

    def _loss_mask(self, inputs) -> torch.Tensor:
        """The completion mask past the first `num_loss_tokens_to_skip` tokens."""
        mask = inputs["completion_mask"]
        if self.num_loss_tokens_to_skip > 0:
            positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
            mask = mask * (positions >= self.num_loss_tokens_to_skip).long()
        return mask


class SDPOTrainer(_FusedSelfDistillation, _TRLSDPOTrainer):
    """TRL's `SDPOTrainer` (same arguments, `SDPOConfig`) whose self-distillation loss comes from kdfast as
    `SDFTTrainer`'s does (every mode; `self_distillation_mask` per sequence), and whose policy term
    (`distillation_weight` < 1: TRL's clipped ratio of the completion tokens' log-probs times the advantages, each
    `loss_type`, token- or sequence-level importance sampling) takes the student's log-probs from
    `linear_token_logprobs`. A served teacher (`use_teacher_server=True`) scores where TRL asks it, the
    self-distillation alone."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPOTrainer does not support returning outputs")
        weight = self.args.distillation_weight
        # TRL asks the server only when the loss is the self-distillation alone; mixed, its local teacher scores.
        distillation, logprobs = self._fused_losses(model, inputs, distillation=weight != 0.0,
                                                    policy_logprobs=weight != 1.0,
                                                    served=weight == 1.0 and self.use_teacher_server)
        if weight == 1.0:
            loss = distillation
        elif weight == 0.0:
            loss = self._policy_loss(inputs, logprobs)
        else:
            loss = (1 - weight) * self._policy_loss(inputs, logprobs) + weight * distillation
        return self._accumulation_scaled(loss)

    def _loss_mask(self, inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        sequences = inputs.get("self_distillation_mask")
        return mask if sequences is None else mask * sequences.unsqueeze(1)

    def _policy_loss(self, inputs, per_token_logps) -> torch.Tensor:
        """TRL's `_compute_policy_loss` from the completion tokens' log-probs rather than from logits."""
        completion_mask = inputs["completion_mask"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = per_token_logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / \
                completion_mask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token_loss = -torch.min(ratio * advantages, clipped * advantages)
        masked = per_token_loss * completion_mask
        if self.loss_type == "grpo":
            loss = (masked.sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type in ("bnpo", "dapo"):
            loss = masked.sum() / completion_mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            loss = masked.sum() / (per_token_loss.size(0) * self.max_completion_length)
        else:
            raise ValueError(f"Unsupported loss_type: {self.loss_type}")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["self_distillation/policy_loss"].append(
            self.accelerator.gather(loss.detach()).mean().item())
        return loss
