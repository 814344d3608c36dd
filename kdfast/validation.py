"""Input checks: every bad input is a ValueError naming the argument and what was expected."""

from __future__ import annotations

import os

import torch

from kdfast.options import LossOptions

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [..., vocab], got {type(logits).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 logits, got dtype {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape [tokens, vocab] or [batch, seq, vocab], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocab dimension of at least 1, got {tuple(logits.shape)}")


def check_pair(student_logits, teacher_logits, opts: LossOptions) -> None:
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher_logits vocab size {teacher_logits.shape[-1]} != student_logits vocab size "
                         f"{student_logits.shape[-1]}: both models must score the same vocabulary")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is on "
                         f"{student_logits.device}: both must be on the same device")
    if teacher_logits.requires_grad and opts.has_kd:
        raise ValueError("teacher_logits requires grad, but the teacher is a constant in kdfast: pass "
                         "teacher_logits.detach() (or compute the teacher under torch.no_grad())")


def _label_check_costs_no_sync(labels: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # a data-dependent branch would break the graph; the kernels mark NaN
        return False
    return labels.device.type == "cpu" or os.environ.get("KDFAST_CHECK_LABELS") == "1"


def check_labels(labels, student_logits, opts: LossOptions) -> None:
    if labels is None:
        if opts.has_ce:
            raise ValueError(f"ce_weight={opts.ce_weight} needs labels (int64 of shape "
                             f"{tuple(student_logits.shape[:-1])}); pass labels or set ce_weight=0")
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64 token ids), got dtype {labels.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    if labels.device != student_logits.device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {student_logits.device}")
    # Reading the labels' range on a GPU is a host sync, which DESIGN.md keeps out of the loss: there the
    # kernels mark such rows NaN instead, and KDFAST_CHECK_LABELS=1 turns the (syncing) check on.
    if opts.has_ce and labels.numel() and _label_check_costs_no_sync(labels):
        vocab = student_logits.shape[-1]
        bad = ((labels < 0) | (labels >= vocab)) & (labels != opts.ignore_index)
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={opts.ignore_index} "
                             f"when ce_weight > 0; found {first}")


def check_num_items(num_items_in_batch) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        return
    if not isinstance(num_items_in_batch, (int, float)) or num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be a positive number, got {num_items_in_batch!r}")
