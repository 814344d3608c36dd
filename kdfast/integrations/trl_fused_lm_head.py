"""TRL's fused LM head on kdfast. TRL 1.16's `add_fused_lm_head` (`trl.trainer.utils`), which its GRPO, RLOO, DPO, KTO
and SFT trainers put on their models, scores each completion token's log-prob (and entropy) with its own
`ChunkedLogProbFunction`, looked up by name on every call. `patch_trl_fused_lm_head()` puts `KdfastChunkedLogProb`
under that name: the same call and five outputs, computed by `kdfast.linear_token_logprobs` (with a frozen head, as
under LoRA, d hidden in the forward: two GEMMs rather than TRL's three). Calls that ask for what kdfast's kernel does
not compute (`log_sum_sq_probs`, `mean_logits`, `is_top1`: SFT's and KTO's metrics) go to TRL's own function, as do
calls whose backward would have to gather a ZeRO-3 head again (a head that learns under ZeRO-3: TRL's backward
re-enters its gather, kdfast's recomputes from the weight it saved)."""

from __future__ import annotations

import torch

from kdfast.token_logprobs import linear_token_logprobs

# What kdfast's kernel computes of TRL's outputs.
KDFAST_OUTPUTS = frozenset({"log_probs", "entropy"})


def _trl_utils():
    import trl.trainer.utils as trl_utils

    return trl_utils


def _trl_function():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction


def _head_learns_under_zero3(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not any(t is not None and t.requires_grad for t in (weight, bias)):
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


class KdfastChunkedLogProb:
    """Stands in for TRL's `ChunkedLogProbFunction`: `apply` takes its arguments and returns its five outputs (log
    q(token) per row, the entropy, `log_sum_sq_probs`, `mean_logits`, `is_top1`; None where not asked for)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        if not set(outputs) <= KDFAST_OUTPUTS or _head_learns_under_zero3(weight, bias):
            return _trl_function().apply(hidden, weight, bias, targets, temperature, chunk_size,
                                         final_logit_softcapping, logit_scale, outputs)
        with_entropy = "entropy" in outputs
        # TRL's chunk_size is its vocabulary tile; kdfast sizes its row chunks from its own memory budget.
        result = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                       logit_scale=1.0 if logit_scale is None else logit_scale,
                                       softcap=final_logit_softcapping, return_entropy=with_entropy)
        logprobs, entropy = result if with_entropy else (result, None)
        return logprobs, entropy, None, None, None


def patch_trl_fused_lm_head(enabled: bool = True) -> None:
    """Route every TRL fused LM head (models patched by `add_fused_lm_head`, before or after this call) through
    kdfast (`enabled=False`: back to TRL's own function)."""
    trl_utils = _trl_utils()
    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        raise RuntimeError("this TRL has no fused LM head (trl.trainer.utils._ChunkedLogProbFunction, TRL >= 1.16)")
    trl_utils._ChunkedLogProbFunction = KdfastChunkedLogProb if enabled else _trl_function()
