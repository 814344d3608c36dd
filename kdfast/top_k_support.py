"""A student's own top-k support, from its hidden states and LM head, without logits for all rows at once: the
divergence over the K tokens the student itself ranks highest (TRL's self-distillation trainers, SDFT and SDPO, in
their default "topk_logits" mode) needs per row the K ids, the student's logits there (with a gradient) and the
teacher's logits at the same ids.

`top_k_support` and `logits_at` run a head chunk by chunk without a gradient (one GEMM per chunk); `LogitsAtIds`
then gives the student's K logits a gradient whose backward touches only the K rows of the head each row selected:
K x H products per row where the dense backward of a [N, V] logit tensor costs V x H (2 x 320 fewer for K = 100 of
a 32k vocabulary). The renormalised divergence over the K tokens has no gradient outside them: the full softmax's
log-sum-exp cancels out of it, so no other logit is needed in backward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.logit_maps import LogitMap
from kdfast.zero3 import gathered

# Elements of one chunk's [rows, V] logits, or of its [rows, K, H] gathered head rows in backward (64 MiB float32).
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class HeadMap:
    """A head and what the model does to its output before the softmax: the bias, times `scale`, Gemma-2's softcap
    c * tanh(z / c), then the division by `temperature`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def logit_map(self) -> LogitMap:
        return LogitMap(self.scale, self.softcap, self.temperature)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The mapped logits [n, V] in float32 from a GEMM in the head's dtype (as the model's forward makes them)."""
        raw = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        return self.logit_map.apply_(raw)

    def slope(self, mapped: torch.Tensor) -> torch.Tensor:
        """d mapped / d GEMM output at the mapped values: scale / T, times 1 - tanh^2 under a softcap (the tanh read
        back from the mapped value, c / T * tanh)."""
        slope = self.logit_map.slope
        if self.softcap is None:
            return torch.full_like(mapped, slope)
        tanh = mapped * (self.temperature / self.softcap)
        return (1.0 - tanh * tanh) * slope


def _chunk_rows(columns: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(columns, 1))


def _chunks(hidden: torch.Tensor, head: HeadMap):
    """(rows, their mapped logits) chunk by chunk."""
    step = _chunk_rows(head.weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        part = slice(start, start + step)
        yield part, head.logits(hidden[part])


def _row_statistics(logits, part, token_ids, lse, token_logprobs) -> None:
    """The chunk's log-sum-exp and log q(token), where asked for (None: not; each a pass over the chunk)."""
    if lse is None:
        return
    lse[part] = torch.logsumexp(logits, dim=-1)
    if token_logprobs is not None:
        token_logprobs[part] = logits.gather(1, token_ids[part, None]).squeeze(1) - lse[part]


def _outputs(hidden, token_ids, with_lse):
    empty = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    lse = torch.empty_like(empty) if with_lse or token_ids is not None else None
    return lse, torch.empty_like(empty) if token_ids is not None else None


@torch.no_grad()
def top_k_support(hidden: torch.Tensor, head: HeadMap, k: int, token_ids: torch.Tensor | None = None, *,
                  with_lse: bool = False):
    """Per row of `hidden` [N, H]: the ids [N, k] of the k largest mapped logits (torch.topk's order), those logits
    [N, k], the log-sum-exp of the row [N] where `with_lse` or `token_ids` asks for it (else None) and, where
    `token_ids` [N] are given, log q(token) [N] (else None)."""
    if not 0 < k <= head.weight.shape[0]:
        raise ValueError(f"k must lie in [1, {head.weight.shape[0]}] (the head's vocabulary), got {k}")
    ids = torch.empty(hidden.shape[0], k, dtype=torch.int64, device=hidden.device)
    values = torch.empty(hidden.shape[0], k, dtype=torch.float32, device=hidden.device)
    lse, token_logprobs = _outputs(hidden, token_ids, with_lse)
    for part, logits in _chunks(hidden, head):
        top = torch.topk(logits, k, dim=-1)
        values[part], ids[part] = top.values, top.indices
        _row_statistics(logits, part, token_ids, lse, token_logprobs)
    return ids, values, lse, token_logprobs


@torch.no_grad()
def top_k_and_logits_at(hidden: torch.Tensor, head: HeadMap, k: int, ids: torch.Tensor, *, with_lse: bool = False):
    """`top_k_support`'s ids and logits [N, k] and `logits_at`'s values at `ids` [N, K] in one pass over the head
    (a union of two models' top-k needs the teacher's logits at both sets of ids). Returns (top ids, their logits,
    the logits at `ids`, the log-sum-exp [N] where `with_lse`, else None)."""
    if not 0 < k <= head.weight.shape[0]:
        raise ValueError(f"k must lie in [1, {head.weight.shape[0]}] (the head's vocabulary), got {k}")
    top_ids = torch.empty(hidden.shape[0], k, dtype=torch.int64, device=hidden.device)
    top_values = torch.empty(hidden.shape[0], k, dtype=torch.float32, device=hidden.device)
    values = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
    lse, _ = _outputs(hidden, None, with_lse)
    for part, logits in _chunks(hidden, head):
        top = torch.topk(logits, k, dim=-1)
        top_values[part], top_ids[part] = top.values, top.indices
        values[part] = logits.gather(1, ids[part])
        _row_statistics(logits, part, None, lse, None)
    return top_ids, top_values, values, lse


@torch.no_grad()
def logits_at(hidden: torch.Tensor, head: HeadMap, ids: torch.Tensor, token_ids: torch.Tensor | None = None, *,
              with_lse: bool = False):
    """The mapped logits [N, K] of `hidden` [N, H] at `ids` [N, K]; each row's log-sum-exp [N] and log q(token) [N]
    as `top_k_support` gives them (None where not asked for)."""
    values = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
    lse, token_logprobs = _outputs(hidden, token_ids, with_lse)
    for part, logits in _chunks(hidden, head):
        values[part] = logits.gather(1, ids[part])
        _row_statistics(logits, part, token_ids, lse, token_logprobs)
    return values, lse, token_logprobs


class LogitsAtIds(torch.autograd.Function):
    """The student's mapped logits at `ids`, already computed (`values`, from `top_k_support`), with their gradient
    into the hidden states, the head's weight and its bias through only the selected head rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, values, head: HeadMap):
        ctx.save_for_backward(hidden, weight, ids, values)
        ctx.head, ctx.bias_dtype = head, bias.dtype if bias is not None else None
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, ids, values = ctx.saved_tensors
        # A ZeRO-3 head, whole in the forward (gathered by the caller), may be partitioned again by now.
        with gathered(weight):
            return LogitsAtIds._gradients(ctx, grad_values, hidden, weight, ids, values)

    @staticmethod
    def _gradients(ctx, grad_values, hidden, weight, ids, values):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        raw_grad = grad_values.float() * ctx.head.slope(values)  # d loss / d GEMM output at the K ids
        d_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        step = _chunk_rows(ids.shape[1] * weight.shape[1])
        for start in range(0, hidden.shape[0], step):
            part = slice(start, start + step)
            chosen, grad = ids[part], raw_grad[part]
            if want_hidden:  # sum_k g_k W[id_k]
                rows = weight.index_select(0, chosen.reshape(-1)).float().view(*chosen.shape, -1)
                d_hidden[part] = torch.bmm(grad.unsqueeze(1), rows).squeeze(1)
            if want_weight:  # W[id_k] += g_k h
                products = grad.unsqueeze(-1) * hidden[part].float().unsqueeze(1)
                d_weight.index_add_(0, chosen.reshape(-1), products.reshape(-1, weight.shape[1]))
        d_bias = None
        if want_bias:
            d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            d_bias.index_add_(0, ids.reshape(-1), raw_grad.reshape(-1))
            d_bias = d_bias.to(ctx.bias_dtype)
        return (d_hidden.to(hidden.dtype) if d_hidden is not None else None,
                d_weight.to(weight.dtype) if d_weight is not None else None, d_bias, None, None, None)


def student_logits_at(hidden: torch.Tensor, head: HeadMap, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` (the student's mapped logits at `ids`) with their gradient to `hidden`, `head.weight` and
    `head.bias`."""
    return LogitsAtIds.apply(hidden, head.weight, head.bias, ids, values, head)
