"""How much each of several teachers counts in each row, as normalised log-weights [rows, M] (float32): uniform, M
static numbers, a per-row tensor [..., M] (a routing one-hot), each row's teacher (`kdfast.teacher_routing`),
"confidence" (w_m proportional to the teacher's probability of the label at T = 1) or "min_ce" (all weight on the
teacher with the lowest cross-entropy on the label, the lowest index on ties). Log-weights, because a mixture is a
log-sum-exp of log w_m + log p_m and a zero weight is then -inf, which drops that teacher exactly."""

from __future__ import annotations

import math
import numbers
import os

import torch

from kdfast.options import LossOptions, is_finite_number
from kdfast.teacher_routing import is_routing, routing_log_weights

WEIGHT_MODES = ("confidence", "min_ce")
_CHUNK_ELEMENTS = 1 << 22  # a teacher's rows read a chunk at a time: 16 MiB of float32 temporaries


def _checks_cost_no_sync(device: torch.device) -> bool:
    """The data checks need the host: free on the CPU; on a GPU only when asked for (as the labels' check)."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or os.environ.get("KDFAST_CHECK_LABELS") == "1"


def row_log_weights(weights, count: int, labels, lead_shape: tuple, opts: LossOptions, device,
                    label_logprobs) -> torch.Tensor:
    """[rows, M] log-weights, each row's summing to 1 in probability. `label_logprobs()`: [rows, M] each teacher's
    log-probability of the label at T = 1 (0 at ignored rows), asked for only by the modes that need it."""
    rows = math.prod(lead_shape)
    if weights is None:  # the same in every row: an expanded row (stride 0), as static weights
        return torch.full((count,), -math.log(count), device=device).expand(rows, count)
    if is_routing(weights, lead_shape):
        return routing_log_weights(weights, count, device, _checks_cost_no_sync(weights.device))
    if isinstance(weights, str):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be None, {count} numbers, a tensor [..., {count}], each row's teacher "
                             f"(an integer tensor [...]) or one of {WEIGHT_MODES}, got {weights!r}")
        if labels is None:
            raise ValueError(f"weights={weights!r} weighs the teachers by their probability of the label: it needs "
                             "labels")
        label_logprob = label_logprobs()
        if weights == "confidence":
            return torch.log_softmax(label_logprob, dim=-1)
        best = label_logprob.argmax(dim=-1, keepdim=True)  # the first of equal maxima: the lowest index
        return torch.full_like(label_logprob, -math.inf).scatter_(-1, best, 0.0)
    _check_numbers(weights, count)
    # Numbers are checked and normalised on the host, then copied: no device sync for static weights.
    weights = torch.as_tensor(weights, dtype=torch.float32,
                              device=weights.device if isinstance(weights, torch.Tensor) else "cpu").detach()
    if lead_shape and weights.shape == (*lead_shape, count):
        return _per_row(weights.to(device).reshape(rows, count), labels, opts)
    if weights.shape != (count,):
        raise ValueError(f"weights must hold {count} numbers (one per teacher) or be a tensor {(*lead_shape, count)} "
                         f"(one row of {count} per token) or each row's teacher (an integer tensor "
                         f"{tuple(lead_shape)}), got shape {tuple(weights.shape)}")
    if _checks_cost_no_sync(weights.device) and (not bool(torch.isfinite(weights).all()) or
                                                 bool((weights < 0).any()) or not float(weights.sum()) > 0):
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
    return (weights / weights.sum()).log().to(device).expand(rows, count)


def _check_numbers(weights, count: int) -> None:
    """M numbers as Python gives them, checked in Python: also while a compiler traces the call (a tensor's values are
    read on the host only where that costs no sync and breaks no graph)."""
    if not isinstance(weights, (list, tuple)) or len(weights) != count or \
            not all(isinstance(value, numbers.Real) and not isinstance(value, bool) for value in weights):
        return
    values = [float(value) for value in weights]
    if not all(is_finite_number(value) and value >= 0 for value in values) or not sum(values) > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {values}")


def check_trainer_weights(weights, count: int) -> None:
    """A trainer's `teacher_weights` where it is built, not at its first step after every teacher's forward: None, a
    mode, or `count` finite numbers >= 0 that are not all 0 (per-row weights come from a `teacher_id` column)."""
    if weights is None:
        return
    if isinstance(weights, str):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"teacher_weights must be None, {count} numbers or one of {WEIGHT_MODES}, got "
                             f"{weights!r}")
        return
    try:
        values = torch.as_tensor(weights, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"teacher_weights must be None, {count} numbers or one of {WEIGHT_MODES}, got "
                         f"{weights!r}") from None
    if values.shape != (count,):
        raise ValueError(f"teacher_weights must hold {count} numbers (one per teacher), got shape "
                         f"{tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or not float(values.sum()) > 0:
        raise ValueError(f"teacher_weights must be finite, >= 0 and not all 0, got {values.tolist()}")


def static_shares(weights, count: int) -> tuple | None:
    """Each teacher's normalised weight when every row has the same weights and the host knows them (None, numbers,
    a CPU tensor [M]); else None. The average gives the CE to the heaviest teacher's call without a device sync."""
    if weights is None:
        return (1.0 / count,) * count
    if isinstance(weights, torch.Tensor):
        # A tensor's values are read on the host: not while a compiler traces it (its rows' weights serve then).
        if weights.device.type != "cpu" or weights.shape != (count,) or torch.compiler.is_compiling():
            return None
        weights = weights.tolist()
    if isinstance(weights, str) or len(weights) != count or \
            not all(isinstance(value, (int, float)) for value in weights):
        return None
    total = math.fsum(weights)
    return tuple(value / total for value in weights) if total > 0 else None


def _per_row(weights: torch.Tensor, labels, opts: LossOptions) -> torch.Tensor:
    totals = weights.sum(-1, keepdim=True)
    if _checks_cost_no_sync(weights.device):
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and >= 0 in every row")
        kept = torch.ones_like(totals[:, 0], dtype=torch.bool) if labels is None else \
            labels.reshape(-1) != opts.ignore_index
        empty = (totals[:, 0] <= 0) & kept
        if bool(empty.any()):
            raise ValueError(f"weights are all 0 in row {int(empty.nonzero()[0])}: each kept row needs a teacher")
    # An ignored row's weights do not matter: uniform keeps its (dropped) terms finite.
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(totals > 0, weights / totals.clamp(min=torch.finfo(torch.float32).tiny), uniform).log()


@torch.no_grad()
def label_logprobs(teacher_chunks, count: int, labels: torch.Tensor, width: int, opts: LossOptions,
                   shard=None) -> torch.Tensor:
    """[rows, M]: each teacher's log-probability of the label at T = 1 over the shared columns (0 at ignored rows).
    `teacher_chunks(index, start, stop)` gives teacher `index`'s logits [stop - start, >= width] for those rows. With
    a vocab `shard` (kdfast.distributed.VocabShard) they are its `width` columns and the labels global ids: each row's
    log-sum-exp and label logit come from the ranks' exchange (every rank takes the same chunks of rows)."""
    flat = labels.reshape(-1)
    keep = flat != opts.ignore_index
    offset = shard.start if shard is not None else 0
    held = keep & (flat >= offset) & (flat < offset + width)
    column = torch.where(held, flat - offset, torch.zeros_like(flat)).clamp(0, width - 1)
    out = torch.zeros(flat.numel(), count, device=flat.device)
    step = max(1, _CHUNK_ELEMENTS // (shard.vocab if shard is not None else width))
    for index in range(count):
        for start in range(0, flat.numel(), step):
            stop = min(start + step, flat.numel())
            logits = teacher_chunks(index, start, stop)[:, :width].float()
            picked = logits.gather(-1, column[start:stop, None])[:, 0]
            if shard is None:
                out[start:stop, index] = picked - torch.logsumexp(logits, dim=-1)
            else:
                out[start:stop, index] = _shard_label_logprob(logits, picked, held[start:stop], shard.group)
    return torch.where(keep[:, None], out, torch.zeros_like(out))


def _shard_label_logprob(logits, picked, held, group) -> torch.Tensor:
    """log p(label) over every rank's columns: the row's max over the ranks, then one sum of [rows, 2] (the sum of
    exps under that max, and the label's logit from the one rank that holds it)."""
    from kdfast.distributed import all_reduce_max, all_reduce_sum

    top = all_reduce_max(logits.amax(-1), group)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))
    sums = torch.stack([(logits - top[:, None]).exp().sum(-1), torch.where(held, picked, 0.0)], dim=-1)
    total, label_logit = all_reduce_sum(sums, group).unbind(-1)
    return label_logit - top - total.log()
