"""Input checks: every bad input is a ValueError naming the argument and what was expected."""

from __future__ import annotations

import math
import os

import torch

from kdfast.options import LossOptions, is_finite_number
from kdfast.shared_vocab import check_vocab_size, mismatch_hint

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [..., vocab], got {type(logits).__name__}"
                         + _several_teachers_hint(name, logits))
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 logits, got dtype {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape [tokens, vocab] or [batch, seq, vocab], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocab dimension of at least 1, got {tuple(logits.shape)}")


def check_pair(student_logits, teacher_logits, opts: LossOptions) -> None:
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    student_width, teacher_width = student_logits.shape[-1], teacher_logits.shape[-1]
    if opts.vocab_size is not None:
        check_vocab_size(opts.vocab_size, student_logits=student_width, teacher_logits=teacher_width)
    elif teacher_width != student_width:
        raise ValueError(f"teacher_logits vocab size {teacher_width} != student_logits vocab size {student_width}: "
                         f"both models must score the same vocabulary" + mismatch_hint(student_width, teacher_width))
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                         f"{tuple(student_logits.shape)}" + (" but for the vocabulary" if opts.vocab_size else ""))
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
    check_labels_for(labels, tuple(student_logits.shape[:-1]), opts.vocab_size or student_logits.shape[-1],
                     student_logits.device, opts, "the logits")


def check_labels_for(labels, lead_shape: tuple, vocab: int, device, opts: LossOptions, what: str) -> None:
    """labels: integer, shaped `lead_shape` (one per row of `what`), on `device`, and in [0, vocab)."""
    if labels is None:
        if opts.needs_labels:
            raise ValueError(f"ce_weight={opts.ce_weight} needs labels (int64 of shape "
                             f"{tuple(lead_shape)}); pass labels or set ce_weight=0")
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64 token ids), got dtype {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {what}' leading shape "
                         f"{tuple(lead_shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {what} are on {device}")
    # Reading the labels' range on a GPU is a host sync, which docs/DESIGN.md keeps out of the loss: there the CUDA
    # kernels stop the step with a device-side assert (Triton's mark such rows NaN), and KDFAST_CHECK_LABELS=1 turns
    # the (syncing) check on.
    if opts.needs_labels and labels.numel() and _label_check_costs_no_sync(labels):
        bad = ((labels < 0) | (labels >= vocab)) & (labels != opts.ignore_index)
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={opts.ignore_index} "
                             f"when ce_weight > 0; found {first}")


def check_row_weights(row_weights, lead_shape: tuple, device, opts) -> None:
    """The per-row weights of the fused linear loss: None, or finite floats shaped as the hidden states' rows."""
    if row_weights is None:
        return
    if opts.reduction == "none":
        raise ValueError("row_weights needs reduction='mean' or 'sum'; with reduction='none' multiply the returned "
                         "per-row losses instead")
    if not isinstance(row_weights, torch.Tensor) or not row_weights.is_floating_point():
        raise ValueError(f"row_weights must be a floating-point tensor of shape {list(lead_shape)} (the hidden "
                         f"states' leading shape), got {type(row_weights).__name__}"
                         f"{' of dtype ' + str(row_weights.dtype) if isinstance(row_weights, torch.Tensor) else ''}")
    if tuple(row_weights.shape) != tuple(lead_shape):
        raise ValueError(f"row_weights must have shape {list(lead_shape)} (the hidden states' leading shape), got "
                         f"{list(row_weights.shape)}")
    if row_weights.device != device:
        raise ValueError(f"row_weights must be on {device} (the hidden states' device), got {row_weights.device}")
    # A host sync, left out of a compiled graph (where it would be a data-dependent branch).
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(row_weights).all()):
        raise ValueError("row_weights must be finite; found NaN or inf")


def flat_row_weights(row_weights) -> torch.Tensor | None:
    """Checked row weights as the chunks take them: [N] float32, without a gradient (a weight is a constant)."""
    return None if row_weights is None else row_weights.detach().reshape(-1).to(torch.float32)


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


def _several_teachers_hint(name: str, value) -> str:
    """Where a list of teachers reached a one-teacher argument: the functions that take several."""
    if not (name.startswith("teacher_") and isinstance(value, (list, tuple))):
        return ""
    return ("; several teachers are kdfast.multi_teacher_distill_loss (logits), linear_multi_teacher_distill_loss "
            "(hidden states and heads) or linear_student_multi_teacher_distill_loss (the teachers' logits beside the "
            "student's head)")


def _check_floating(name: str, tensor, shape_text: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(tensor).__name__}"
                         + _several_teachers_hint(name, tensor))
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got dtype {tensor.dtype}")


def check_linear_student(student_hidden, student_weight, student_bias, softcap, chunk_size,
                         fp32_logits=False, prefix="student_") -> None:
    """hidden [..., H_s], weight [V, H_s], bias [V]; the chunk settings. `prefix`: of the arguments' names (""
    where the function has no teacher: `linear_cross_entropy`'s hidden, weight and bias)."""
    hidden_name, weight_name, size = f"{prefix}hidden", f"{prefix}weight", "hidden_s" if prefix else "hidden"
    _check_floating(hidden_name, student_hidden, f"[..., {size}]")
    _check_floating(weight_name, student_weight, f"[vocab, {size}]")
    if student_hidden.dim() < 2:
        raise ValueError(f"{hidden_name} must have shape [tokens, {size}] or [batch, seq, {size}], got "
                         f"{tuple(student_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"{weight_name} must have shape [vocab, {student_hidden.shape[-1]}] (the hidden size of "
                         f"{hidden_name}), got {tuple(student_weight.shape)}")
    _check_bias(f"{prefix}bias", student_bias, student_weight.shape[0])
    _check_one_device(student_hidden, student_weight, student_bias)
    check_chunk_settings(softcap, chunk_size, fp32_logits)


def check_linear_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                        teacher_bias, softcap, chunk_size, opts: LossOptions, fp32_logits=False,
                        routed: bool = False) -> None:
    """Shapes [..., H_s] / [V, H_s] / [V] for the student and [..., H_t] / [V, H_t] / [V] for the teacher. `routed`:
    the teacher's hidden states may also be [n, H_t], the rows routed to it (their count checked with the routing)."""
    _check_floating("teacher_hidden", teacher_hidden, "[..., hidden_t]")
    _check_floating("teacher_weight", teacher_weight, "[vocab, hidden_t]")
    check_linear_student(student_hidden, student_weight, student_bias, softcap, chunk_size, fp32_logits)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1] and not (routed and teacher_hidden.dim() == 2):
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])}: one teacher row per token")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher_weight must have shape [vocab, {teacher_hidden.shape[-1]}] (the teacher hidden "
                         f"size), got {tuple(teacher_weight.shape)}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight vocab size {teacher_weight.shape[0]} != student_weight vocab size "
                         f"{student_weight.shape[0]}: both heads must score the same vocabulary"
                         + mismatch_hint(student_weight.shape[0], teacher_weight.shape[0]))
    _check_bias("teacher_bias", teacher_bias, student_weight.shape[0])
    _check_one_device(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    for name, tensor in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                         ("teacher_bias", teacher_bias)):
        if tensor is not None and tensor.requires_grad and opts.has_kd:
            raise ValueError(f"{name} requires grad, but the teacher is a constant in kdfast: pass "
                             f"{name}.detach() (or compute the teacher under torch.no_grad())")


def _check_bias(name: str, bias, vocab: int) -> None:
    if bias is not None:
        _check_floating(name, bias, f"[{vocab}]")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"{name} must have shape [{vocab}] (the vocab size), got {tuple(bias.shape)}")


def _check_one_device(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"every hidden state, weight and bias must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")


def check_chunk_settings(softcap, chunk_size, fp32_logits=False) -> None:
    if softcap is not None and not (is_finite_number(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if chunk_size != "auto" and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
                                     and chunk_size > 0):
        raise ValueError(f"chunk_size must be 'auto' or a positive int, got {chunk_size!r}")
    if not isinstance(fp32_logits, bool):
        raise ValueError(f"fp32_logits must be True or False, got {fp32_logits!r}")


def check_sparse_targets(teacher_ids, teacher_logprobs, lead_shape: tuple, vocab: int, device, opts: LossOptions,
                         what: str, labels=None) -> None:
    """teacher_ids: integer [..., K] (one row per row of `what`, -1 = padding) within [-1, vocab);
    teacher_logprobs: float of the same shape (K + 1 columns under tail="given"), on the same device, not requiring
    grad, log-probabilities in the rows the loss keeps (`labels` not ignore_index; every row without labels)."""
    if not isinstance(teacher_ids, torch.Tensor):
        raise ValueError(f"teacher_ids must be an integer torch.Tensor of shape [..., K], got "
                         f"{type(teacher_ids).__name__}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor (token ids, -1 for padding), got dtype "
                         f"{teacher_ids.dtype}")
    _check_floating("teacher_logprobs", teacher_logprobs, "[..., K]")
    if teacher_ids.dim() < 1 or tuple(teacher_ids.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"teacher_ids shape {tuple(teacher_ids.shape)} must be {what}' leading shape "
                         f"{tuple(lead_shape)} plus K: one row of K teacher ids per row")
    if teacher_ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids must hold at least one id per row (K >= 1), got {tuple(teacher_ids.shape)}")
    given = getattr(opts, "tail", None) == "given"  # the rest's log-prob after each row's K
    expected = (*teacher_ids.shape[:-1], teacher_ids.shape[-1] + 1) if given else tuple(teacher_ids.shape)
    if tuple(teacher_logprobs.shape) != expected:
        raise ValueError(f"teacher_logprobs shape {tuple(teacher_logprobs.shape)} must equal teacher_ids shape "
                         f"{tuple(teacher_ids.shape)}"
                         + (" plus one column (tail='given': the rest's log-probability last)" if given else ""))
    for name, tensor in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {what} are on {device}")
    if teacher_logprobs.requires_grad and opts.has_kd:
        raise ValueError("teacher_logprobs requires grad, but the teacher is a constant in kdfast: pass "
                         "teacher_logprobs.detach()")
    # As for labels: reading the range on a GPU is a host sync; there the kernels poison such rows with NaN.
    if opts.has_kd and teacher_ids.numel() and _label_check_costs_no_sync(teacher_ids):
        bad = (teacher_ids < -1) | (teacher_ids >= vocab)
        if bool(bad.any()):
            raise ValueError(f"teacher_ids must lie in [0, {vocab}) or be -1 (padding); found "
                             f"{teacher_ids[bad][0].item()}")
    if opts.has_kd and teacher_ids.numel() and _label_check_costs_no_sync(teacher_logprobs):
        _check_teacher_logprobs(teacher_ids, teacher_logprobs, getattr(opts, "tail", "bucket"),
                                _kept_rows(labels, lead_shape, opts))


# A row's held probabilities sum to at most 1. The slack is 16-bit storage's: bf16 moves a log-prob by up to 2^-9 of
# its size, a few parts in a thousand of the row's mass. Top-k logits passed for log-probs, the likely slip, sum far
# above it.
TEACHER_MASS_SLACK = 1e-2


def _kept_rows(labels, lead_shape: tuple, opts: LossOptions):
    """The rows the loss reads ([..., 1]), or None for all: a collator may fill the ignored ones with anything."""
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(lead_shape):
        return (labels != opts.ignore_index).unsqueeze(-1)
    return None


def _check_teacher_logprobs(teacher_ids, teacher_logprobs, tail: str, kept) -> None:
    """At held ids of kept rows (and a given rest): no NaN or +inf, and (tail="bucket", whose rest is 1 - sum p, and
    "given") a row's mass at most 1. Under tail="renormalize" the K values are normalised over the ids, so any finite
    scale is the same teacher."""
    held = teacher_ids >= 0 if kept is None else (teacher_ids >= 0) & kept
    values = teacher_logprobs.detach()
    rest = None
    if tail == "given":  # the rest's log-prob last: held as the ids are
        values, rest = values[..., :-1], values[..., -1:]
        held = torch.cat([held, held.new_ones(rest.shape) if kept is None else kept], dim=-1)
        values = torch.cat([values, rest], dim=-1)
    bad = held & (torch.isnan(values) | (values == math.inf))
    if bool(bad.any()):
        raise ValueError(f"teacher_logprobs must be log-probabilities (finite, or -inf for p = 0) at every held id"
                         f"{' and the given rest' if rest is not None else ''}; found {values[bad][0].item()}")
    if tail == "renormalize":
        return
    mass = torch.where(held, values.double().exp(), 0.0).sum(-1)
    worst = mass.max().item() if mass.numel() else 0.0
    if worst > 1.0 + TEACHER_MASS_SLACK:
        raise ValueError(f"teacher_logprobs must be log-probabilities at the loss's temperature: a row's held "
                         f"probabilities sum to {worst:.4g} > 1 (logits instead of log-probs? take log_softmax over "
                         f"the full vocabulary first, or pass tail='renormalize' for the top-k cross-entropy)")
