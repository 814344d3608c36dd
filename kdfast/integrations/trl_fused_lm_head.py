"""TRL's fused LM head on kdfast. TRL 1.16's `add_fused_lm_head` (`trl.trainer.utils`), which its GRPO, RLOO, DPO, KTO
and SFT trainers put on their models, scores each completion token's log-prob (and entropy) with its own
`ChunkedLogProbFunction`, looked up by name on every call. `patch_trl_fused_lm_head()` puts `KdfastChunkedLogProb`
under that name: the same call and five outputs, computed by `kdfast.linear_token_logprobs` (a frozen head asked for
the log-probs alone takes d hidden in the forward: two GEMMs rather than TRL's three; GRPO and RLOO also ask for the
entropy, which may get a gradient, so their backward recomputes as TRL's does). Calls that ask for what kdfast's
kernel does not compute (`log_sum_sq_probs`, `mean_logits`, `is_top1`: SFT's and KTO's metrics) go to TRL's own
function, as do calls whose backward would read a ZeRO-3 head again (a head that learns, or the entropy returned:
TRL's backward re-enters its gather, kdfast's would recompute from the weight it saved, partitioned by then)."""

from __future__ import annotations

from kdfast.token_logprobs import linear_token_logprobs

# What kdfast's kernel computes of TRL's outputs.
KDFAST_OUTPUTS = frozenset({"log_probs", "entropy"})


def _trl_utils():
    import trl.trainer.utils as trl_utils

    return trl_utils


def _trl_function():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction


def _backward_reads_a_zero3_head(hidden, weight, bias, outputs) -> bool:
    """Whether kdfast's backward would recompute from the head (a head that learns, or the entropy returned: all
    but a frozen head's d hidden taken in the forward) while ZeRO-3 partitions it after the forward."""
    head_learns = any(t is not None and t.requires_grad for t in (weight, bias))
    return (head_learns or (hidden.requires_grad and "entropy" in outputs)) and _zero3_enabled()


def _zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


class KdfastChunkedLogProb:
    """Stands in for TRL's `ChunkedLogProbFunction`: `apply` takes its arguments and returns its five outputs (log
    q(token) per row, the entropy, `log_sum_sq_probs`, `mean_logits`, `is_top1`; None where not asked for)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        if not set(outputs) <= KDFAST_OUTPUTS or _backward_reads_a_zero3_head(hidden, weight, bias, outputs):
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
