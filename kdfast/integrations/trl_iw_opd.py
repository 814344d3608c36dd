"""TRL's importance-weighted on-policy distillation trainer, `trl.experimental.iw_opd.IWOPDTrainer` (TRL >= 1.16), on
kdfast. TRL forwards both models over prompt and completion, keeps their [B, T, V] logits and takes a log-softmax
of each; here only the decoders run, and the completion tokens' objective (IW-OPD's weighted sampled-token advantage,
or the generalized JSD over the whole vocabulary or a top-k support) comes from their hidden states and heads through
kdfast's kernels (`kdfast.integrations.iw_opd`). Generation, the rollout buffer, the teacher's set-up, the
normalisation (per kept token, or `num_items_in_batch`), the logged metrics and the division for gradient
accumulation are TRL's. A teacher served by vLLM (`use_teacher_server=True`) returns its top-k and the sampled tokens'
log-probs: the student's side of each objective is kdfast's too."""

from __future__ import annotations

import warnings

import torch

from kdfast.integrations.causal_lm import head_map, last_hidden_state, output_head
from kdfast.integrations.compiled_loss import entered_model
from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.iw_opd import (
    IWOPDSettings,
    KeptRows,
    iw_opd_rows,
    local_divergence_sum,
    served_divergence_sum,
    token_logprobs,
)
from kdfast.integrations.sharding import run_through_wrapper, whole_heads
from kdfast.integrations.trl_server import server_topk_support, top1_actual_support
from kdfast.top_k_support import HeadMap

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
    try:
        from trl.experimental.iw_opd import IWOPDTrainer as _TRLIWOPDTrainer
    except ImportError as error:
        raise ImportError("kdfast.integrations.trl.IWOPDTrainer needs TRL >= 1.16 (trl.experimental.iw_opd)") \
            from error

_TRL_IGNORE_INDEX = -100


class IWOPDTrainer(_TRLIWOPDTrainer):
    """TRL's `IWOPDTrainer` (same arguments, `IWOPDConfig`) whose loss comes from kdfast: the "iw_opd" objective (its
    default; cached rollout log-probs used where the batch has them) and "jsd" with every `beta`, `loss_top_k`
    (0: the whole vocabulary), `loss_add_tail` and `reverse_kl_top_1_mode`, at the trainer's temperature and each
    model's logit scale and softcap, without [B, T, V] logits; with `use_teacher_server=True`, against the served
    teacher's top-k or token log-probs. In training, the loss is divided by the accumulation window's count of
    generated completion tokens, as TRL's stable DistillationTrainer divides it (TRL's IW-OPD takes the dataset's
    labels' count: see `_window_items`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # the caller asks for the student's logits, which the fused loss exists not to build
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._raise_if_local_teacher_tokenizer_mismatch()
        num_items_in_batch = self._window_items(num_items_in_batch)
        prompt_length = self._compute_prompt_length(inputs)
        if self.use_teacher_server:
            teacher = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        else:
            teacher = self._teacher_hidden(inputs, prompt_length)
        wrapper, student = entered_model(self, model)
        return run_through_wrapper(wrapper, student, self._student_loss, student, inputs, prompt_length, teacher,
                                   num_items_in_batch)

    def _window_items(self, num_items_in_batch):
        """The kept tokens of the accumulation window's own completions. transformers counts `num_items_in_batch`
        from the dataloader's labels, before generation replaces the completions (TRL's IW-OPD divides by that: 0
        for prompt-only data, so an infinite loss; and its loader repeats each generation batch once per
        accumulation step, so the count is that many times too large); the count over the buffered window is the
        one TRL's stable DistillationTrainer takes, over every process where the Trainer averages tokens across
        them, divided by their number (DDP averages the gradients)."""
        if not self.model.training or num_items_in_batch is None or self._buffered_inputs is None:
            return num_items_in_batch
        count = sum((batch["labels"] != _TRL_IGNORE_INDEX).sum() for batch in self._buffered_inputs)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            return self.accelerator.gather(count).sum().clamp(min=1).float() / self.accelerator.num_processes
        return count.clamp(min=1).float()

    def _settings(self) -> IWOPDSettings:
        return IWOPDSettings(self.distillation_objective, float(self.beta), int(self.loss_top_k),
                             bool(self.loss_add_tail), self.reverse_kl_top_1_mode, float(self.iw_opd_gamma),
                             float(self.iw_opd_epsilon))

    def _teacher_hidden(self, inputs, prompt_length: int) -> torch.Tensor:
        """The teacher's decoder output at the positions that predict the completion, [B, L, H_t], no gradient."""
        if self.teacher_model is None:
            raise ValueError("No teacher model or teacher server configured.")
        wrapper = self.teacher_model
        teacher = self.accelerator.unwrap_model(wrapper)
        wrapper.eval()

        def hidden(ids, mask):
            return last_hidden_state(teacher, ids, mask)[:, prompt_length - 1:-1]

        with torch.no_grad():
            check_head_map(teacher, inputs)
            return run_through_wrapper(wrapper, teacher, hidden, inputs["input_ids"], inputs["attention_mask"])

    def _student_loss(self, student, inputs, prompt_length, teacher, num_items_in_batch):
        """`teacher`: its hidden states [B, L, H_t] (a local teacher), or the server's answer (a dict)."""
        check_head_map(student, inputs)
        hidden = last_hidden_state(student, inputs["input_ids"], inputs["attention_mask"])[:, prompt_length - 1:-1]
        labels = inputs["labels"][:, prompt_length:]
        tokens = inputs["input_ids"][:, prompt_length:]
        rollout = inputs.get("rollout_logprobs")
        rollout = rollout[:, prompt_length:] if rollout is not None else None
        served = isinstance(teacher, dict)
        settings = self._settings()
        if served:
            # TRL's window: the columns the server answered for; IW-OPD needs every kept token inside it.
            length = teacher["actual_logprobs"].shape[1]
            if settings.objective == "iw_opd" and bool((labels[:, length:] != _TRL_IGNORE_INDEX).any()):
                raise ValueError("Teacher server returned fewer completion logprobs than the student completion "
                                 "length; IW-OPD requires teacher logprobs for every completion token.")
            hidden, labels, tokens = hidden[:, :length], labels[:, :length], tokens[:, :length]
            rollout = rollout[:, :length] if rollout is not None else None
        student_head = output_head(student)
        teacher_model = None if served else self.accelerator.unwrap_model(self.teacher_model)
        teachers, teacher_heads = ([], []) if served else ([teacher_model], [output_head(teacher_model)])
        with whole_heads(student, student_head, teachers, teacher_heads):
            student_map = head_map(student, student_head, self.temperature)
            teacher_map = None if served else head_map(teacher_model, teacher_heads[0], self.temperature, frozen=True)
            rows = KeptRows(labels)
            if settings.objective == "iw_opd":
                return self._iw_opd(student_map, hidden, teacher, teacher_map, tokens, rows, rollout, settings,
                                    num_items_in_batch)
            return self._divergence(student_map, hidden, teacher, teacher_map, tokens, labels, rows, settings,
                                    None if served else num_items_in_batch)

    def _iw_opd(self, student: HeadMap, hidden, teacher, teacher_map, tokens, rows: KeptRows, rollout, settings,
                num_items_in_batch):
        """TRL's `_compute_iw_opd_loss` over the kept tokens, with its metrics."""
        token_rows = rows.of(tokens)
        student_rows = rows.of(hidden)
        if isinstance(teacher, dict):
            teacher_logprobs = rows.of(teacher["actual_logprobs"])
        else:
            teacher_logprobs = token_logprobs(rows.of(teacher), teacher_map, token_rows)
        missing = int((~torch.isfinite(teacher_logprobs)).sum())
        if missing:  # TRL's message
            raise ValueError(f"Teacher logprobs are missing for required IW-OPD positions: {missing}/{rows.count}.")
        if rows.count == 0:
            return _attached_zero(hidden, student)
        loss, (advantages, magnitude, weights) = iw_opd_rows(
            student_rows, student, token_rows, teacher_logprobs, rows, settings,
            _denominator(num_items_in_batch, rows, hidden.device),
            rows.of(rollout) if rollout is not None else None)
        self._log_iw_opd(rows, advantages, magnitude, weights)
        return loss

    def _log_iw_opd(self, rows: KeptRows, advantages, magnitude, weights) -> None:
        mode = "train" if self.model.training else "eval"
        kept_weights = rows.of(weights)
        for name, value in (("mean_advantage", rows.of(advantages).mean()),
                            ("mean_abs_advantage", rows.of(magnitude).mean()), ("mean_weight", kept_weights.mean()),
                            ("min_weight", kept_weights.min()), ("max_weight", kept_weights.max())):
            self._metrics[mode][f"iw_opd/{name}"].append(value.item())

    def _divergence(self, student: HeadMap, hidden, teacher, teacher_map, tokens, labels, rows: KeptRows, settings,
                    num_items_in_batch):
        """TRL's generalized JSD per kept token, divided by `num_items_in_batch` where given (a local teacher),
        else by the kept tokens' count (a served teacher always: TRL's window may not cover every token)."""
        if rows.count == 0:
            return _attached_zero(hidden, student)
        if isinstance(teacher, dict):
            if settings.beta == 0:
                ids, logprobs = server_topk_support(teacher)
            else:
                ids, logprobs = top1_actual_support(teacher, tokens, labels, settings.beta)
            total = served_divergence_sum(rows.of(hidden), student, rows.of(ids), rows.of(logprobs), settings)
        else:
            total = local_divergence_sum(rows.of(hidden), student, rows.of(teacher), teacher_map, rows.of(tokens),
                                         settings)
        return total / _denominator(num_items_in_batch, rows, total.device)


def _denominator(num_items_in_batch, rows: KeptRows, device):
    """TRL's division: by `num_items_in_batch` where given, else by the kept tokens' count."""
    if num_items_in_batch is None:
        return rows.count
    return num_items_in_batch.to(device) if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch


def _attached_zero(hidden, student: HeadMap):
    # Attached to the student's graph (its decoder and its head), so backward gives zeros, as TRL's does.
    return (hidden.sum() + student.weight.sum()) * 0.0
