"""TRL on kdfast. GKD: `generalized_jsd_loss` with the signature and results of
`trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`, and a `GKDTrainer` whose loss comes from the hidden states
through `linear_distill_loss`, so on-policy GKD never builds either model's logits. TRL's stable
`DistillationTrainer` and its drop-in `chunked_divergence_loss`: kdfast.integrations.trl_distillation; GOLD's
cross-tokenizer `GOLDTrainer` and `ULDLoss`: kdfast.integrations.trl_gold; the self-distillation `SDFTTrainer` and
`SDPOTrainer`: kdfast.integrations.trl_self_distillation; IW-OPD's `IWOPDTrainer`: kdfast.integrations.trl_iw_opd;
the fused LM head of TRL's GRPO, RLOO, DPO, KTO and SFT trainers (`patch_trl_fused_lm_head`):
kdfast.integrations.trl_fused_lm_head; all reachable from here."""

from __future__ import annotations

import functools
import warnings

import torch

from kdfast.integrations.causal_lm import batch_distill_loss
from kdfast.integrations.compiled_loss import check_compile_supported, compiled, entered_model
from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.sharding import fsdp2_sharded_teacher, run_through_wrapper
from kdfast.integrations.teacher_logits import batch_distill_from_teacher_logits, check_mode, uses_own_logits
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
    hidden states and LM-head weights. Under accelerate's FSDP2 plugin the teacher is sharded as the student is
    (`shard_teacher=True`, the default; TRL keeps a whole copy per process) or kept whole (`shard_teacher=False`).
    `teacher_logits` as kdfast's `DistillationTrainer` takes it: by default a teacher whose own logits are not its
    head's (TRL's trainer takes its own forward's) is distilled through them, the student's head still fused."""

    def __init__(self, *args, shard_teacher=True, teacher_logits="auto", **kwargs):
        check_mode(teacher_logits, teacher_models=True)
        self.teacher_logits = teacher_logits
        super().__init__(*args, **kwargs)
        check_compile_supported(self)
        if shard_teacher and self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            self.teacher_model = fsdp2_sharded_teacher(self.accelerator,
                                                       self.accelerator.unwrap_model(self.teacher_model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        wrapper, student = entered_model(self, model)  # under torch_compile the loss compiles (compiled_loss.py)
        loss = run_through_wrapper(wrapper, student, functools.partial(self._student_loss, student), inputs,
                                   num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and the gradients are averaged over processes: the
            # factor makes N processes train as one process on the whole batch (TRL's own compute_loss does not
            # apply it).
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def _student_loss(self, student, inputs, num_items_in_batch):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        with self.accelerator.autocast():
            # Each one's own logits against the loss's, once (outside the compile); a teacher that fails it may be
            # distilled through its own logits.
            check_head_map(student, inputs)
            own = uses_own_logits(self.teacher_logits, teacher, inputs)
            # One settings record while beta stays: a compiled loss's guards then hold from step to step.
            if getattr(self, "_loss_options", None) is None or self._loss_options.beta != self.beta:
                self._loss_options = gkd_options(self.beta)
            batch_loss = batch_distill_from_teacher_logits if own else batch_distill_loss
            return compiled(self, batch_loss)(student, teacher, inputs, self._loss_options,
                                              num_items_in_batch=num_items_in_batch)


def gkd_options(beta: float) -> LossOptions:
    """TRL's GKD loss as kdfast settings: JSD with `beta` at temperature 1, no T², per label token."""
    return LossOptions(divergence="jsd", beta=beta, temperature=1.0, t2_scale=False, ignore_index=_TRL_IGNORE_INDEX,
                       reduction="mean")


def __getattr__(name):
    # TRL's stable DistillationTrainer (TRL >= 1.16) on kdfast, imported when asked for, so that an older TRL still
    # gets the GKD integration above.
    if name in ("DistillationTrainer", "chunked_divergence_loss"):
        from kdfast.integrations import trl_distillation

        return getattr(trl_distillation, name)
    if name in ("GOLDTrainer", "ULDLoss"):  # TRL's cross-tokenizer GOLD on kdfast
        from kdfast.integrations import trl_gold

        return getattr(trl_gold, name)
    if name in ("SDFTTrainer", "SDPOTrainer"):  # TRL's self-distillation trainers on kdfast
        from kdfast.integrations import trl_self_distillation

        return getattr(trl_self_distillation, name)
    if name == "IWOPDTrainer":  # TRL's importance-weighted on-policy distillation on kdfast
        from kdfast.integrations import trl_iw_opd

        return trl_iw_opd.IWOPDTrainer
    if name in ("patch_trl_fused_lm_head", "KdfastChunkedLogProb"):  # TRL's fused LM head (GRPO, RLOO, ...)
        from kdfast.integrations import trl_fused_lm_head

        return getattr(trl_fused_lm_head, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
