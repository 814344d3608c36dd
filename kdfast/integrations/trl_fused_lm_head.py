"""TRL's fused LM head on kdfast. TRL 1.16's `add_fused_lm_head` (`trl.trainer.utils`), which its GRPO, RLOO, DPO, KTO
and SFT trainers put on their models, scores each completion token's log-prob (and entropy) with its own
`ChunkedLogProbFunction`, looked up by name on every call. `patch_trl_fused_lm_head()` puts `KdfastChunkedLogProb`
under that name: the same call and five outputs, computed by `kdfast.linear_token_logprobs` (with SFT's, DPO's and
KTO's metrics `is_top1`, `mean_logits` and `log_sum_sq_probs` read from the same chunks). A frozen head takes d hidden
in the forward, two GEMMs rather than TRL's three, when the entropy (every trainer but DPO's reference asks for it)
will get no gradient: GRPO reads it for its metric and its high-entropy mask, and differentiates it only with its
entropy bonus. Which it is shows only in the backward, so by default the patch learns it: frozen heads take the
two-GEMM path until a gradient reaches an entropy the patch returned, and recompute as TRL does from then on (that
first backward is exact too, at one GEMM more). Under ZeRO-3 TRL gathers the head for the forward and kdfast's
backward gathers it again where it recomputes, as TRL's does."""

from __future__ import annotations

from kdfast.token_logprobs import METRICS, linear_token_outputs

# TRL 1.16's five outputs, all computed by kdfast; a call asking for any other (a later TRL's) goes to TRL's function.
KDFAST_OUTPUTS = frozenset({"log_probs", "entropy", *METRICS})


def _trl_utils():
    import trl.trainer.utils as trl_utils

    return trl_utils


def _trl_function():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction


class KdfastChunkedLogProb:
    """Stands in for TRL's `ChunkedLogProbFunction`: `apply` takes its arguments and returns its five outputs (log
    q(token) per row, the entropy, `log_sum_sq_probs`, `mean_logits`, `is_top1`; None where not asked for).
    `entropy_grad`: whether the entropy is expected to get a gradient, True, False or "auto" (False until one
    reaches an entropy returned since the last `patch_trl_fused_lm_head`, True after); `entropy_grad_seen` records
    that."""

    entropy_grad: bool | str = "auto"
    entropy_grad_seen: bool = False

    @classmethod
    def _expects_entropy_grad(cls) -> bool:
        return cls.entropy_grad_seen if cls.entropy_grad == "auto" else cls.entropy_grad

    @classmethod
    def _note_entropy_grad(cls, grad):
        # Autograd calls an output's hook whenever its node runs, with None when that output got no gradient.
        if grad is not None:
            cls.entropy_grad_seen = True

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        if not set(outputs) <= KDFAST_OUTPUTS:
            return _trl_function().apply(hidden, weight, bias, targets, temperature, chunk_size,
                                         final_logit_softcapping, logit_scale, outputs)
        with_entropy = "entropy" in outputs
        # TRL's chunk_size is its vocabulary tile; kdfast sizes its row chunks from its own memory budget.
        expected = KdfastChunkedLogProb._expects_entropy_grad()
        logprobs, entropy, metrics = linear_token_outputs(
            hidden, weight, targets, bias=bias, temperature=temperature,
            logit_scale=1.0 if logit_scale is None else logit_scale, softcap=final_logit_softcapping,
            return_entropy=with_entropy, entropy_grad=expected, metrics=[m for m in METRICS if m in outputs])
        if with_entropy and entropy.requires_grad and not expected and KdfastChunkedLogProb.entropy_grad == "auto":
            entropy.register_hook(KdfastChunkedLogProb._note_entropy_grad)
        return (logprobs, entropy, metrics.get("log_sum_sq_probs"), metrics.get("mean_logits"),
                metrics.get("is_top1"))


def patch_trl_fused_lm_head(enabled: bool = True, *, entropy_grad: bool | str = "auto") -> None:
    """Route every TRL fused LM head (models patched by `add_fused_lm_head`, before or after this call) through
    kdfast (`enabled=False`: back to TRL's own function). `entropy_grad`: whether the entropy a frozen head returns
    will get a gradient (True: GRPO's entropy bonus is on; False: it is only read), or "auto" to learn it anew from
    the backwards (module docstring); a wrong guess is exact, one GEMM dearer than the right one."""
    if not (isinstance(entropy_grad, bool) or entropy_grad == "auto"):
        raise ValueError(f"entropy_grad must be True, False or 'auto', got {entropy_grad!r}")
    trl_utils = _trl_utils()
    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        raise RuntimeError("this TRL has no fused LM head (trl.trainer.utils._ChunkedLogProbFunction, TRL >= 1.16)")
    KdfastChunkedLogProb.entropy_grad, KdfastChunkedLogProb.entropy_grad_seen = entropy_grad, False
    trl_utils._ChunkedLogProbFunction = KdfastChunkedLogProb if enabled else _trl_function()
