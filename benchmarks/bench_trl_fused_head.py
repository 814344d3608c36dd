"""TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, the scoring forward of its GRPO, RLOO, DPO, KTO and SFT
trainers) for `bench_trl.py`: a one-layer causal LM's fused forward + backward as GRPO asks for it (the log-probs and
the entropy of the completion tokens; TRL's loss plus 0.01 times the summed entropy, GRPO's entropy bonus, or the loss
alone with the entropy only read, GRPO's default) or as SFT does (is_top1 too, the entropy read), on TRL's own
`ChunkedLogProbFunction` against the same model with `kdfast.integrations.trl.patch_trl_fused_lm_head()`. The head
learns, or is frozen as under LoRA. A frozen head's patch is told whether the entropy gets a gradient
(`entropy_grad`): what its default learns in the first step, which is one GEMM dearer when the bonus is on. The model
is float32 on every device (TRL's logits are float32 whatever the heads' dtype); its backbone (one layer) is the same
work on both sides.

What is compared: the loss, the summed entropy, the gradient reaching the backbone (its last norm's weight: d hidden
flows through it) and the head's gradient.
"""

from __future__ import annotations

import torch
from bench_trl_async import importable

# What each trainer asks its fused head for (TRL 1.16): GRPO's log-probs and entropy; SFT's also is_top1, its
# token accuracy.
TRAINER_OUTPUTS = {"GRPO": ("log_probs", "entropy"), "SFT": ("log_probs", "entropy", "is_top1")}


def _modules():
    """TRL's fused head and kdfast's patch (ImportError without either)."""
    from trl.trainer.utils import add_fused_lm_head

    from kdfast.integrations.trl import patch_trl_fused_lm_head
    return add_fused_lm_head, patch_trl_fused_lm_head


def fused_head_available() -> bool:
    return importable(_modules)


def _model(args, outputs):
    """A one-layer Llama of the benchmark's hidden size and vocabulary, seeded, with TRL's fused head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    add_fused_lm_head, _ = _modules()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                         intermediate_size=2 * args.hidden, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    add_fused_lm_head(model, temperature=args.temperature, outputs=outputs)
    return model.to(args.device)


def fused_head_contenders(args, frozen_head: bool, entropy_bonus: bool = True, trainer: str = "GRPO") -> dict:
    """"TRL" / "kdfast" -> zero-argument callable: (loss, summed entropy, the backbone's last norm's gradient, the
    head's gradient or None) of one fused forward + backward over `args.tokens` scored tokens in 4 sequences, the
    head asked for what `trainer` asks it for (SFT: no entropy bonus)."""
    _, patch = _modules()
    model = _model(args, TRAINER_OUTPUTS[trainer])
    model.lm_head.weight.requires_grad_(not frozen_head)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (4, max(args.tokens // 4, 1) + 1), generator=generator).to(args.device)

    def step(on_kdfast: bool):
        def call():
            patch(on_kdfast, entropy_grad=entropy_bonus)
            try:
                model.zero_grad(set_to_none=True)
                out = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
                (out.loss + 0.01 * out.entropy.sum() if entropy_bonus else out.loss).backward()
            finally:
                patch(False)
            head = model.lm_head.weight.grad
            return (out.loss.detach(), out.entropy.detach().sum(), model.model.norm.weight.grad.clone(),
                    None if head is None else head.clone())
        return call

    return {"TRL": step(False), "kdfast": step(True)}
