"""A teacher distilled through its own forward's logits: for a teacher whose forward does more before its logits than
its LM head, logit scale and softcap (a head that normalises its rows, logits scaled by a name no config shares), the
trainer runs the teacher's whole forward under no_grad and fuses the student's head alone
(`kdfast.linear_student_distill_loss`). The teacher's [batch, seq, V] logits then exist for the step, in its dtype;
the student's never do.

`teacher_logits` of the trainers, for each teacher model: "head" distils the teacher's head fused, and refuses at the
first batch a teacher whose own logits differ from the head's (kdfast.integrations.head_check); "own" always takes its
own logits; "auto" (the default) takes the head where the check passes and the own logits, with a warning, where it does
not. A teacher that is no causal LM with a linear head (an ensemble's module, a wrapped model of another library: any
module whose forward takes `input_ids` and `attention_mask` and returns the logits, or an output with `.logits`) has its
own logits taken under "auto" and "own", and is refused by name under "head"."""

from __future__ import annotations

import logging

import torch

from kdfast.integrations.causal_lm import (
    decoder_inputs,
    final_softcap,
    last_hidden_state,
    logit_scale,
    output_head,
    own_logits,
    scored_positions,
)
from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.sharding import whole_head
from kdfast.linear_logits_teacher import fused_linear_student_loss
from kdfast.options import LossOptions

MODES = ("auto", "head", "own")
_OWN_LOGITS = "_kdfast_own_logits"  # on a teacher model "auto" found its own logits for
logger = logging.getLogger(__name__)


def check_mode(teacher_logits, *, teacher_models: bool) -> None:
    """A known mode; "own" only for teacher models (one or several)."""
    if teacher_logits not in MODES:
        raise ValueError(f"teacher_logits must be one of {MODES}, got {teacher_logits!r}")
    if teacher_logits == "own" and not teacher_models:
        raise ValueError("teacher_logits='own' needs teacher_model (one model or several), not a teacher cache or a "
                         "served teacher")


def uses_own_logits(mode: str, teacher, inputs) -> bool:
    """Whether this teacher is distilled through its own logits: "own" always; "head" never (a teacher whose own
    logits differ from its head's is refused by `check_head_map`); "auto" where that check refuses it (the verdict
    kept on the model; a model the check passed is marked by it, and one it could not check on this batch, whose
    images it cannot probe alone, is checked again at the next)."""
    if mode == "own" or teacher.__dict__.get(_OWN_LOGITS):
        return True
    if not has_linear_head(teacher):
        if mode == "head":
            raise ValueError(f"teacher_logits='head' but the teacher ({type(teacher).__name__}) has no "
                             f"get_output_embeddings() LM head to fuse: pass teacher_logits='own' (or 'auto') to "
                             f"distil it through its forward's logits")
        teacher.__dict__[_OWN_LOGITS] = True
        return True
    if mode == "head":
        check_head_map(teacher, inputs)
        return False
    try:
        check_head_map(teacher, inputs)
    except ValueError as refusal:
        logger.warning("%s; the teacher's own forward gives its logits instead ([batch, seq, vocab] for each step; "
                       "the student's head stays fused). teacher_logits='own' says so without the check, 'head' "
                       "refuses such a teacher.", refusal)
        teacher.__dict__[_OWN_LOGITS] = True
        return True
    return False


def has_linear_head(model) -> bool:
    """Whether the model names an LM head with a weight, as a Hugging Face causal LM does (`get_output_embeddings`)."""
    getter = getattr(model, "get_output_embeddings", None)
    return callable(getter) and isinstance(getattr(getter(), "weight", None), torch.Tensor)


def batch_distill_from_teacher_logits(student, teacher, inputs, options: LossOptions, *, chunk_size="auto",
                                      fp32_logits=False, num_items_in_batch=None):
    """The loss of one batch: the student's last hidden states through its head, fused, against the teacher's own
    logits (its forward under no_grad), position i predicting `inputs["labels"][:, i + 1]` (`scored_positions`).
    Called under the caller's autocast."""
    input_ids, attention_mask, extra = inputs["input_ids"], inputs.get("attention_mask"), decoder_inputs(inputs)
    positions, labels = scored_positions(inputs)
    student_hidden = last_hidden_state(student, input_ids, attention_mask, extra)[:, positions]
    with torch.no_grad():
        # The teacher's own forward, hooks and all: an FSDP2 or ZeRO-3 teacher gathers its parameters itself.
        teacher_logits = own_logits(teacher, input_ids, attention_mask, extra)[:, positions]
    head = output_head(student)
    with whole_head(student, head):
        return fused_linear_student_loss(student_hidden, head.weight, teacher_logits.detach(), labels, options,
                                         student_bias=head.bias, softcap=final_softcap(student),
                                         logit_scale=logit_scale(student), chunk_size=chunk_size,
                                         fp32_logits=fp32_logits, num_items_in_batch=num_items_in_batch)
