"""TRL's `ServerDistillationTrainer` (a teacher behind a vLLM server that returns its top-k log-probs per completion
token) on kdfast: where TRL's loss is the forward KL over the K ids plus the rest (beta = 0, `loss_add_tail`), it is
computed by `linear_sparse_distill_loss` from the student's last hidden states, so the student's logits are never
built for the batch. TRL's other server losses (beta > 0: its top-1 reverse-KL estimate; no tail: both sides
renormalised over the K ids) are not kdfast's contract, and run as TRL computes them."""

from __future__ import annotations

import functools
import warnings

import torch

from kdfast.integrations.causal_lm import last_hidden_state, sparse_distill_from_hidden
from kdfast.integrations.sharding import run_through_wrapper
from kdfast.sparse_options import SparseOptions

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
    try:
        from trl.experimental.server_distillation import ServerDistillationTrainer as _TRLServerDistillationTrainer
    except ImportError as error:
        raise ImportError("kdfast.integrations.trl_server needs a TRL with trl.experimental.server_distillation "
                          "(TRL 1.x)") from error

_TRL_IGNORE_INDEX = -100


class ServerDistillationTrainer(_TRLServerDistillationTrainer):
    """TRL's `ServerDistillationTrainer` (same arguments and config). With `beta=0` and `loss_add_tail=True` its
    loss, the forward KL between the teacher's K + 1 buckets and the student's at `temperature`, per completion
    token, is kdfast's fused sparse loss (tail="bucket", no T² factor, as TRL's); other settings use TRL's own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.beta != 0 or not self.loss_add_tail or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        student = self.accelerator.unwrap_model(model)
        loss = run_through_wrapper(model, student, functools.partial(self._fused_loss, student), inputs)
        # TRL's server path averages over the batch's own completion tokens, then scales for accumulation itself.
        if self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _fused_loss(self, student, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        completion_labels = torch.where(completion_mask.bool(), completion_ids,
                                        torch.full_like(completion_ids, _TRL_IGNORE_INDEX))
        inputs = {**inputs, "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                  "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
                  "labels": torch.cat([torch.full_like(prompt_ids, _TRL_IGNORE_INDEX), completion_labels], dim=1),
                  "prompt_attention_mask": prompt_mask}
        prompt_length = self._compute_prompt_length(inputs)
        teacher = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        logprobs, ids = teacher["topk_logprobs"], teacher["topk_token_ids"]
        length = logprobs.shape[1]
        held = logprobs > float("-inf")  # the server pads missing entries with -inf
        ids = torch.where(held, ids, torch.full_like(ids, -1))
        logprobs = torch.where(held, logprobs, torch.zeros_like(logprobs))
        options = SparseOptions(divergence="forward_kl", temperature=self.temperature, t2_scale=False,
                                ignore_index=_TRL_IGNORE_INDEX, reduction="mean", tail="bucket")
        with self.accelerator.autocast():
            hidden = last_hidden_state(student, inputs["input_ids"], inputs["attention_mask"])
            hidden = hidden[:, prompt_length - 1:-1][:, :length]
            return sparse_distill_from_hidden(student, hidden, ids, logprobs,
                                              inputs["labels"][:, prompt_length:][:, :length], options)
