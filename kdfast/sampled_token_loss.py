"""The sampled-token estimator of on-policy distillation in one pass over a head's chunks: sum_r w_r c_r log q(t_r),
with c_r = (log q(t_r) - log p(t_r)) times a clipped importance ratio, both detached, whose gradient is the reverse
KL's estimated at the sampled tokens (TRL's SDFT / SDPO "sampled_token"; MiniLLM's and Tinker's advantage).

Each row's weight c_r depends on its own log q(t_r), which the chunk's cross-entropy kernel computes in the pass that
writes the row's gradient, q - onehot(t): the weights are formed from the kernel's per-row parts before the chunk's
gradient GEMMs (`ChunkRowWeights`), so the gradient is final in the forward, as the fused losses' are. The student's
head runs once; `linear_token_logprobs` and a weighted sum of its output would run it again in backward (its weights
known only then)."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.kernel_abi import PART_CE
from kdfast.linear_function import ChunkPlan
from kdfast.linear_loss import apply_linear
from kdfast.logit_maps import tempered_map
from kdfast.options import LossOptions


def clipped_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """TRL's importance weight, detached: exp(log q - log q_old) clamped in log space to [-20, 20], then at most
    `clip`."""
    return torch.exp((logprobs.detach() - old_logprobs.float()).clamp(-20.0, 20.0)).clamp(max=clip)


class ChunkRowWeights:
    """Row weights that `run_chunks` asks for chunk by chunk, once the chunk's parts exist: here -w_r c_r from each
    row's log q(t_r) = -CE at the map's temperature (so that the cross-entropy's loss and gradient, times them, are
    the estimator's). Keeps every row's log-prob, ratio and weight for the caller."""

    def __init__(self, row_weights, teacher_logprobs, old_logprobs, clip):
        rows = row_weights.shape[0]
        self.row_weights, self.teacher_logprobs = row_weights, teacher_logprobs
        self.old_logprobs, self.clip = old_logprobs, clip
        self.logprobs = torch.empty(rows, dtype=torch.float32, device=row_weights.device)
        self.ratio = None if old_logprobs is None else torch.empty_like(self.logprobs)
        self.tensor = torch.empty_like(self.logprobs)

    def of_chunk(self, rows: slice, parts: torch.Tensor) -> torch.Tensor:
        logprobs = -parts[:, PART_CE]
        self.logprobs[rows] = logprobs
        weight = self.row_weights[rows] * (logprobs - self.teacher_logprobs[rows])
        if self.ratio is not None:
            ratio = clipped_ratio(logprobs, self.old_logprobs[rows], self.clip)
            self.ratio[rows] = ratio
            weight = weight * ratio
        self.tensor[rows] = -weight
        return self.tensor[rows]


def linear_sampled_token_loss(hidden, weight, token_ids, teacher_logprobs, row_weights, *, bias=None,
                              temperature=1.0, logit_scale=1.0, softcap=None, clip=None, old_logprobs=None,
                              chunk_size="auto"):
    """sum_r row_weights_r * ratio_r * (log q_r - log p_r).detach() * log q_r over rows `hidden` [N, H] of the head
    `weight` [V, H] (+ `bias`), q = softmax(softcap(logit_scale * logits) / temperature) at the tokens `token_ids`
    [N], `teacher_logprobs` [N] log p; ratio_r = min(exp(log q_r - old_logprobs_r), clip) where both are given, else
    1; `chunk_size` rows a chunk ("auto": from the fused losses' memory budget). Returns (the loss, with its gradient
    to hidden, weight and bias; log q [N] detached; the ratio [N] or None)."""
    opts = LossOptions(kd_weight=0.0, ce_weight=1.0, reduction="sum")
    plan = ChunkPlan(tempered_map(logit_scale, softcap, temperature), chunk_size, device_rows(opts, hidden.device))
    weights = ChunkRowWeights(row_weights.detach().float(), teacher_logprobs.detach().float(),
                              old_logprobs.detach().float() if old_logprobs is not None and clip is not None else None,
                              clip)
    loss = apply_linear(hidden, weight, bias, token_ids, None, opts, plan, None, weights)
    return loss, weights.logprobs, weights.ratio


def linear_weighted_nll(hidden, weight, token_ids, row_weights, *, bias=None, temperature=1.0, logit_scale=1.0,
                        softcap=None, chunk_size="auto"):
    """sum_r row_weights_r * -log q(token_r), q as in `linear_sampled_token_loss`: the policy-gradient form
    -sum_r A_r log q(t_r) of a sampled-token objective, its weights (advantages, any sign) detached: a tensor [N]
    known before the pass, or an object whose `of_chunk(rows, parts)` forms a chunk's from its parts (its log q is
    -parts[:, PART_CE]) before the chunk's gradient GEMMs. One pass over the head, the gradient final in the forward.
    Returns the loss, with its gradient to hidden, weight and bias."""
    opts = LossOptions(kd_weight=0.0, ce_weight=1.0, reduction="sum")
    plan = ChunkPlan(tempered_map(logit_scale, softcap, temperature), chunk_size, device_rows(opts, hidden.device))
    if isinstance(row_weights, torch.Tensor):
        row_weights = row_weights.detach().float()
    return apply_linear(hidden, weight, bias, token_ids, None, opts, plan, None, row_weights)
