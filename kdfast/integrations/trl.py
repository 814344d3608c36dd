"""TRL's generalized JSD (GKD) on kdfast: `generalized_jsd_loss` with the signature and results of
`trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`, and a `GKDTrainer` whose loss comes from the hidden states
through `linear_distill_loss`, so on-policy GKD never builds either model's logits."""

from __future__ import annotations

import functools
import warnings

import torch

from kdfast.integrations.causal_lm import batch_distill_loss, run_through_wrapper
from kdfast.loss import distill_loss
from kdfast.options import LossOptions

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
    try:
        from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
    except ImportError:  # TRL before GKD moved to trl.experimental
        from trl import GKDTrainer as _TRLGKDTrainer

_TRL_IGNORE_INDEX = -100  # TRL masks exactly this label value


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's loss: JSD with weight beta (beta 0 is KL(teacher‖student), 1 is KL(student‖teacher)) of the
    softmaxes at `temperature`, summed over the vocabulary, over the rows whose label is not -100, then
    divided by `num_items_in_batch` when given, else reduced by `reduction`: "batchmean" (per kept row, or per
    `student_logits.size(0)` without labels), "sum", or "mean" (per element: kept rows × vocab). Any other
    reduction returns TRL's elementwise [rows, vocab] terms, which are a full-vocabulary tensor by definition,
    so TRL computes them. The loss is float32 here, whatever the logits' dtype (TRL's is the logits' dtype)."""
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return _TRLGKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                                   reduction)
    total = distill_loss(student_logits, teacher_logits, labels, divergence="jsd", beta=beta,
                         temperature=temperature, t2_scale=False, ignore_index=_TRL_IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if labels is not None:
        kept_rows = (labels != _TRL_IGNORE_INDEX).sum()
    else:
        kept_rows = torch.tensor(student_logits.numel() // student_logits.shape[-1], device=total.device)
    if reduction == "batchmean":
        return total / (kept_rows.clamp_min(1) if labels is not None else max(student_logits.size(0), 1))
    # "mean" is over every element of the masked [rows, vocab] terms; like TRL it is NaN with no kept row.
    return total / (kept_rows * student_logits.shape[-1])


class GKDTrainer(_TRLGKDTrainer):
    """TRL's `GKDTrainer` (same arguments, on-policy sampling with probability `lmbda`, `seq_kd`) whose loss is
    kdfast's fused one: JSD with `args.beta` at temperature 1 (TRL's `temperature` is its sampling temperature
    and does not enter its loss), per label token or per `num_items_in_batch`, computed from both models' last
    hidden states and LM-head weights."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        loss = run_through_wrapper(model, student, functools.partial(self._student_loss, student), inputs,
                                   num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _student_loss(self, student, inputs, num_items_in_batch):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        options = LossOptions(divergence="jsd", beta=self.beta, temperature=1.0, t2_scale=False,
                              ignore_index=_TRL_IGNORE_INDEX, reduction="mean")
        with self.accelerator.autocast():
            return batch_distill_loss(student, teacher, inputs, options, num_items_in_batch=num_items_in_batch)
