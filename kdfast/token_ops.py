"""Per-token log-probs (`linear_token_logprobs`) as two torch.library custom ops, so that a torch.compile'd step traces
through them whole (`fullgraph=True` included) instead of breaking its graph there.

`kdfast::token_logprobs_forward` runs the forward's chunk loop (the log-probs, the entropy, the metrics asked for,
and a frozen head's d hidden per unit gradient), `kdfast::token_logprobs_backward` the backward's (every chunk's
logits again, for a head that learns or an entropy differentiated); both are `kdfast.token_logprobs`' own loops,
with the backend resolved inside the op and the head's map and GEMM dtype as plain arguments (an op's schema takes
no dataclass). Eager calls keep `TokenLogprobsFunction`, whose backward also reuses the forward's last chunk of
logits: an op's outputs cannot carry that chunk, so the compiled backward recomputes it (one chunk's GEMM more). Nor
does the compiled backward gather a ZeRO-3 head again, as the eager one does (the op sees tensors, not DeepSpeed's
parameters)."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.linear_chunks import Wanted
from kdfast.linear_function import gemm_dtype
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions

# Per-row metrics a caller may ask for besides the log-probs and the entropy (TRL's fused head's names; none has a
# gradient): whether the token is the argmax of the mapped logits (the first one on ties, as torch.argmax), their mean
# over the vocabulary, and log sum_j q_j^2 (DPO's WPO weights).
METRICS = ("is_top1", "mean_logits", "log_sum_sq_probs")


# kdfast.token_logprobs imports this module: its loops and records are imported when an op runs.
def _plan(scale, softcap, temperature, chunk_size, settings, metrics, device):
    from kdfast.token_logprobs import TokenPlan

    opts = LossOptions.decode(settings)
    return TokenPlan(LogitMap(scale, softcap if softcap > 0 else None, temperature), chunk_size or "auto",
                     device_rows(opts, device), opts, metrics=frozenset(metrics))


def _rows(hidden, weight, bias, token_ids, gemm, fp32_logits):
    from kdfast.token_logprobs import Rows

    return Rows(hidden, weight, bias, token_ids, gemm, fp32_logits)


# Scalars and tensors only in the schemas (no lists): torch 2.4's schema inference takes no builtin `list[...]`.
@torch.library.custom_op("kdfast::token_logprobs_forward", mutates_args=())
def token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           token_ids: torch.Tensor, scale: float, softcap: float, temperature: float,
                           gemm: torch.dtype, fp32_logits: bool, chunk_size: int, direct: bool, is_top1: bool,
                           mean_logits: bool,
                           log_sum_sq_probs: bool, settings: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [N, H], the head [V, H] (+ bias [V]) and token ids [N] int64: log q(token) and the entropy
    [N] float32, with `direct` d hidden per unit gradient of each log-prob [N, H] float32, and the metrics asked for
    ([N]: is_top1 bool, the others float32); an empty tensor for each output not asked for. Softcap 0: none;
    `chunk_size` 0: "auto"."""
    from kdfast.token_logprobs import _forward_chunks

    asked = [name for name, wanted in zip(METRICS, (is_top1, mean_logits, log_sum_sq_probs)) if wanted]
    plan = _plan(scale, softcap, temperature, chunk_size, settings, asked, hidden.device)
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        logprobs, entropy, _, direction, metrics = _forward_chunks(
            _rows(hidden, weight, bias, token_ids, gemm, fp32_logits), plan, False, direct)
    # A fresh empty tensor (of the output's dtype) per output not asked for: an op's outputs may not alias each other.
    return (logprobs, entropy, direction if direction is not None else hidden.new_empty(0, dtype=torch.float32),
            *(metrics[name] if name in metrics else hidden.new_empty(0, dtype=_metric_dtype(name)) for name in METRICS))


def _metric_dtype(name: str) -> torch.dtype:
    return torch.bool if name == "is_top1" else torch.float32


@token_logprobs_forward.register_fake
def _(hidden, weight, bias, token_ids, scale, softcap, temperature, gemm, fp32_logits, chunk_size, direct, is_top1,
      mean_logits, log_sum_sq_probs, settings):
    def rows(wanted, name=None):
        return hidden.new_empty(hidden.shape[0] if wanted else 0, dtype=_metric_dtype(name))

    return (rows(True), rows(True), hidden.new_empty(hidden.shape if direct else (0,), dtype=torch.float32),
            *(rows(wanted, name) for name, wanted in zip(METRICS, (is_top1, mean_logits, log_sum_sq_probs))))


@torch.library.custom_op("kdfast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            token_ids: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor,
                            direction: torch.Tensor, grad_logprobs: torch.Tensor | None,
                            grad_entropy: torch.Tensor | None, want_hidden: bool,
                            want_weight: bool, want_bias: bool, scale: float, softcap: float, temperature: float,
                            gemm: torch.dtype, fp32_logits: bool, chunk_size: int,
                            settings: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d hidden, d weight, d bias (each in its input's dtype; an empty tensor where not wanted) of
    sum(grad_logprobs * log q(token) + grad_entropy * entropy) over [N] rows, from every chunk's logits again; or,
    given the forward's `direction` (a frozen head's d hidden per unit gradient of each log-prob, else empty) and an
    entropy gradient that is all zeros on the CPU, direction times grad_logprobs. (A compiled backward gets zeros, not
    None, for an output nothing differentiated; on a GPU telling them apart is a host sync, so there it recomputes.)"""
    from kdfast.token_logprobs import _backward_chunks

    if grad_entropy is not None and grad_entropy.device.type == "cpu" and not bool(grad_entropy.any()):
        grad_entropy = None  # no entropy term: its pass over every chunk is skipped
    if direction.numel() and grad_logprobs is not None and grad_entropy is None:
        d_hidden = direction.mul(grad_logprobs[:, None]).to(hidden.dtype)
        return d_hidden, hidden.new_empty(0), hidden.new_empty(0)
    plan = _plan(scale, softcap, temperature, chunk_size, settings, (), hidden.device)
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        rows = _rows(hidden, weight, bias, token_ids, gemm, fp32_logits)
        d_hidden, d_weight, d_bias = _backward_chunks(rows, plan, Wanted(want_hidden, want_weight, want_bias),
                                                      logprobs, entropy, grad_logprobs, grad_entropy, None)
    return (d_hidden if d_hidden is not None else hidden.new_empty(0),
            d_weight.to(weight.dtype) if d_weight is not None else hidden.new_empty(0),
            d_bias.to(bias.dtype) if d_bias is not None else hidden.new_empty(0))


@token_logprobs_backward.register_fake
def _(hidden, weight, bias, token_ids, logprobs, entropy, direction, grad_logprobs, grad_entropy, want_hidden,
      want_weight, want_bias, *settings):
    return (torch.empty_like(hidden) if want_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if want_weight else hidden.new_empty(0),
            torch.empty_like(bias) if want_bias else hidden.new_empty(0))


def compiled_token_outputs(hidden, weight, bias, token_ids, logit_map: LogitMap, chunk_size, opts: LossOptions,
                           return_entropy: bool, entropy_grad: bool, metrics: frozenset, fp32_logits: bool):
    """`TokenLogprobsFunction`'s outputs through the ops: (log-probs, entropy, *METRICS' values, empty where not
    asked for). An entropy not returned is no differentiable output (its gradient then is None, not zeros)."""
    map_args = (logit_map.scale, logit_map.softcap or 0.0, logit_map.temperature, gemm_dtype(hidden, weight),
                fp32_logits, 0 if chunk_size == "auto" else int(chunk_size), opts.encoded())
    return CompiledTokenLogprobsFunction.apply(hidden, weight, bias, token_ids, map_args,
                                               (return_entropy, return_entropy and entropy_grad),
                                               tuple(name in metrics for name in METRICS))


class CompiledTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, map_args: tuple, entropy_flags: tuple, asked: tuple):
        ctx.set_materialize_grads(False)  # an output with no gradient (the entropy, often) costs nothing
        lead_shape = hidden.shape[:-1]
        flat, ids = hidden.reshape(-1, hidden.shape[-1]), token_ids.reshape(-1).long()
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        # d hidden in the forward: the head frozen and only the log-probs expected to get a gradient.
        returned, entropy_grad_expected = entropy_flags
        direct = wanted[0] and not wanted[1] and not wanted[2] and not entropy_grad_expected
        scale, softcap, temperature, gemm, fp32_logits, chunk_size, settings = map_args
        logprobs, entropy, direction, *metrics = token_logprobs_forward(
            flat, weight, bias, ids, scale, softcap, temperature, gemm, fp32_logits, chunk_size, direct, *asked,
            settings)
        ctx.wanted, ctx.direct, ctx.map_args, ctx.hidden_shape = wanted, direct, map_args, hidden.shape
        ctx.save_for_backward(flat, weight, bias, ids, logprobs, entropy, direction)
        # Marked as returned (views of the op's outputs): the metrics, and an entropy the caller does not get.
        outputs = [logprobs.view(lead_shape), entropy.view(lead_shape),
                   *(value.view(lead_shape) if wanted else value for value, wanted in zip(metrics, asked))]
        ctx.mark_non_differentiable(*outputs[2:], *([] if returned else outputs[1:2]))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_metrics):
        hidden, weight, bias, ids, logprobs, entropy, direction = ctx.saved_tensors
        grads = [grad.reshape(-1).float() if grad is not None else None for grad in (grad_logprobs, grad_entropy)]
        if ctx.direct and grads[1] is None:
            d_hidden = direction.mul(grads[0][:, None]).to(hidden.dtype)
            return d_hidden.view(ctx.hidden_shape), None, None, None, None, None, None
        d_hidden, d_weight, d_bias = token_logprobs_backward(
            hidden, weight, bias, ids, logprobs, entropy, direction, *grads, *ctx.wanted, *ctx.map_args)
        return (d_hidden.view(ctx.hidden_shape) if ctx.wanted[0] else None, d_weight if ctx.wanted[1] else None,
                d_bias if ctx.wanted[2] else None, None, None, None, None)
