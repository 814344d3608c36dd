"""Liger-Kernel's mini-model convergence tests, ported onto kdfast.patch_causal_lm: every model family Liger trains
there, trained twice from the same seed, once as it is and once with its loss computed by kdfast's fused linear
cross-entropy through the one generic LM-head hook; the two runs' per-step losses, eval top-k log-probs and final
parameters compared with Liger's own tolerances (tests/test_fused_causal_lm.py holds one step of a few families, with
sharpened heads, to tight gradient tolerances; this is the breadth and the training loop).

Ported from Liger-Kernel (linkedin/Liger-Kernel at ead96b6, 2026-08-21):
- test/convergence/fp32/test_mini_models.py: test_mini_model and run_mini_model, every MINI_MODEL_SETUPS family with
  its parametrize row (lr, dtype, loss / logprobs / param atol and rtol; mini_smollm3's row is bf16 there too). Also
  the rows Liger skips or comments out: mini_qwen3_next, mini_qwen3_5 and mini_qwen3_5_moe (skipped there:
  flash-linear-attention has no float32 and torch's gated delta rule is too slow at its size; tiny here, they run
  torch's) and mini_mixtral (commented out as flaky; its commented row's tolerances).
- test/convergence/fp32/test_mini_models_multimodal.py: its vision-language MINI_MODEL_SETUPS and rows, run on their
  text path (no pixel values) with their vision towers built small; gradient checkpointing on, as there. Its rows
  that Liger skips as flaky (llava, qwen3_vl) or xfails for its image processor's dtype (llama4) run here.
- test/convergence/bf16/test_mini_models.py: its whole table (its configs are the fp32 file's but for its own
  mini_gemma4_text and Falcon-H1's eager attention), with the rows it comments out: mini_mixtral, and mini_gemma2
  ("not passing within the tolerance range" with Liger's kernels).
- test/utils.py: get_logprobs / get_topk (the eval logits' top-20 float32 log-probs), assert_verbose_allclose
  (|expected - actual| <= atol + rtol * |actual|), set_seed (each run's model built after seeding 42),
  simple_collate_fn (labels and the already shifted shift_labels both passed).

How Liger's settings map onto kdfast's:
- Liger's patched run swaps in its fused linear CE and its RMSNorm / RoPE / SwiGLU / GeGLU kernels; here only the
  loss changes: `patch_causal_lm(model)` with its defaults (mean over the kept labels, ignore_index -100, the logit
  scale and softcap read from the config). Liger's tolerances, which also absorb its other kernels, are kept as
  they are.
- Liger runs without its fused linear CE for mini_granite3 ("not supported") and for the multimodal file's llama4,
  mllama, paligemma, paligemma2, gemma3, gemma4, qwen2_vl, qwen2_5_vl and llava: kdfast's patch covers them all.
- The configs keep every field of Liger's that changes the logit map or the head: tie_word_embeddings and the
  defaults Liger leaves (Gemma-2's and PaliGemma-2's final_logit_softcapping 30, Granite's logits_scaling 1,
  Falcon-H1's lm_head_multiplier 1; mini_gemma4_text sets its softcap 30). None of Liger's heads has a bias. Also
  kept: the MoE router settings (experts per token, norm_topk_prob, routed scaling, shared experts, aux-loss
  coefficients, DeepSeek-V4's hash routing; expert counts cut to 4, expert widths to 24-64), special token ids,
  activations, attention implementations and Granite's attention dropout 0.1 (the two runs draw the same dropout
  masks: the patch draws no random numbers). Sizes are cut for the CPU: hidden 32, intermediate 64, 2 layers
  (layer-type lists cut to match; DeepSeek-V4 keeps Liger's 4 tiny layers), 2 heads / 1 KV head, head_dim 16 (GLM-4V:
  one head of 32, for its rope sections), vision towers of 1 layer (LLaVA's 2: it reads the second to last) of width
  32, rope sections cut to the head, and Liger's vocabularies / 64 (32000 -> 500, 32064 -> 501, 32768 -> 512,
  49280 -> 770), which still gives the top-20 log-probs a vocabulary to choose from.
- Liger trains 32 AdamW steps (its lr per family) on tiny Shakespeare tokenized, 16 rows a batch, and evaluates one
  more batch. That dataset is not here: each step is a seeded random batch of 4 rows of 24 tokens (ids 32 up to the
  vocabulary's last 8, clear of every family's special and image tokens), rows padded to different lengths (attention
  mask 0 and labels -100 there, pad id 0); 6 steps, Liger's lr. Even steps pass labels and shift_labels as Liger's
  collate does, odd steps labels alone, so both of the patch's label paths train.
- Liger's eval call passes skip_logits=False to make its patched forward build logits; kdfast's patch runs the
  model's own forward in eval mode, so the eval batch goes in unchanged. Its loss is the last of the compared losses.
- bf16: the model cast with `.to(torch.bfloat16)` as Liger casts it (float32 models are left as built: the cast would
  make Llama-4's complex rotary buffer real), `accum_dtype=torch.float32` passed to every training call of both runs
  as Liger passes it (its fused linear CE's knob; the model's own loss and kdfast's patch pass it by).

Beyond Liger: every patched training step must return `logits is None` (the fused path ran, no logits built) and
every unpatched one logits; the steps must move some parameter; and the first step's gradients must agree, parameter
by parameter (FIRST_GRADIENT_RTOL). At this size the models stay near uniform over a random vocabulary, so in 6 steps
Liger's lr 1e-5 rows and bf16 rows cannot see a wrong gradient, nor its loosest rows (bf16, Qwen3-VL-MoE,
HunYuan-MoE) a loss off by a shifted or unmasked label; AdamW cannot see a gradient off by a common factor at all.
The gradient check sees each of these in every row. The logit maps are near identity here (softcap 30, scale 1, logits
about 0.1): tests/test_fused_causal_lm.py holds the maps to their values.

The configs, cut to size, are in tests/liger_mini_models.py.

Left out: nothing of the three files' model lists (transformers 5.25 builds them all). Not ported: Liger's
test_mini_models_with_logits.py (its patched models without the fused loss), the multimodal file's image inputs and
processors, mini_pixtral (a vision encoder, no LM head).
"""

import pytest
import torch
from liger_mini_models import (
    mini_deepseek_v4,
    mini_exaone4,
    mini_falcon_h1,
    mini_falcon_h1_eager,
    mini_gemma1,
    mini_gemma1_1,
    mini_gemma2,
    mini_gemma3_text,
    mini_gemma4_text,
    mini_glm4,
    mini_glm4v,
    mini_glm4v_moe,
    mini_gpt_oss,
    mini_granite3,
    mini_hunyuan_v1,
    mini_hunyuan_v1_moe,
    mini_internvl,
    mini_llama3,
    mini_llama4,
    mini_llava,
    mini_ministral,
    mini_mistral,
    mini_mixtral,
    mini_mllama,
    mini_nemotron,
    mini_olmo2,
    mini_olmo3,
    mini_phi3,
    mini_qwen2,
    mini_qwen2_5_vl,
    mini_qwen2_vl,
    mini_qwen3,
    mini_qwen3_5,
    mini_qwen3_5_moe,
    mini_qwen3_moe,
    mini_qwen3_next,
    mini_qwen3_vl,
    mini_qwen3_vl_moe,
    mini_smollm3,
    mm_gemma3,
    mm_gemma4,
    mm_internvl,
    mm_llama4,
    mm_llava,
    mm_mllama,
    mm_paligemma,
    mm_paligemma2,
    mm_qwen2_5_vl,
    mm_qwen2_vl,
    mm_qwen3_5,
    mm_qwen3_5_moe,
    mm_qwen3_vl,
    mm_qwen3_vl_moe,
    mm_smolvlm2,
)

from kdfast.integrations.transformers import patch_causal_lm

STEPS = 6
ROWS, LENGTH = 4, 24
SEED = 42  # Liger's set_seed(42)
TOP_K = 20  # Liger's get_topk


# Liger's parametrize rows: (model, lr, dtype, loss_atol, loss_rtol, logprobs_atol, logprobs_rtol, param_atol,
# param_rtol). Most of its fp32 rows share one set of tolerances.
FP32 = torch.float32
BF16 = torch.bfloat16
TIGHT = (1e-8, 1e-5, 5e-3, 1e-5, 5e-3, 1e-5)
QWEN_VL = (1e-5, 1e-1, 5e-3, 1e-5, 5e-3, 1e-5)  # Liger: "slightly larger tolerances ... after bug fix to qwen2_vl"
GEMMA = (1e-8, 1e-4, 5e-3, 1e-5, 5e-3, 1e-5)
LLAMA3 = (1e-8, 2e-5, 5e-3, 1e-5, 5e-3, 1e-5)

FP32_ROWS = [
    (mini_llama4, 1e-4, FP32, (1e-8, 1e-3, 5e-3, 1e-3, 5e-3, 1e-5)),
    (mini_llama3, 1e-4, FP32, LLAMA3),
    (mini_llava, 1e-4, FP32, TIGHT),
    (mini_mllama, 1e-4, FP32, TIGHT),
    (mini_gemma3_text, 1e-5, FP32, (1e-8, 1e-4, 5e-2, 1e-5, 5e-3, 1e-5)),
    (mini_qwen2, 1e-4, FP32, TIGHT),
    (mini_qwen3, 1e-4, FP32, TIGHT),
    (mini_qwen3_moe, 1e-5, FP32, (1e-5, 1e-3, 5e-3, 1e-2, 5e-3, 1e-5)),
    (mini_gpt_oss, 1e-5, FP32, TIGHT),
    (mini_qwen2_vl, 1e-4, FP32, QWEN_VL),
    (mini_qwen2_5_vl, 1e-4, FP32, QWEN_VL),
    (mini_qwen3_vl, 1e-4, FP32, QWEN_VL),
    (mini_qwen3_vl_moe, 1e-4, FP32, (1e-5, 1e-1, 2e-1, 2e-1, 5e-3, 1e-5)),
    (mini_olmo2, 1e-4, FP32, TIGHT),
    (mini_olmo3, 1e-4, FP32, TIGHT),
    (mini_glm4, 1e-4, FP32, TIGHT),
    (mini_glm4v, 1e-4, FP32, TIGHT),
    (mini_glm4v_moe, 1e-4, FP32, (1e-8, 5e-3, 2e-1, 2e-1, 5e-3, 1e-5)),
    (mini_phi3, 1e-4, FP32, TIGHT),
    (mini_mistral, 1e-4, FP32, TIGHT),
    (mini_ministral, 1e-4, FP32, TIGHT),
    (mini_mixtral, 1e-4, FP32, (5e-4, 1e-4, 5e-3, 1e-5, 1e-2, 1e-5)),  # Liger's commented-out row
    (mini_gemma1, 1e-5, FP32, (1e-8, 1e-4, 5e-2, 1e-5, 5e-3, 1e-5)),
    (mini_gemma1_1, 1e-4, FP32, GEMMA),
    (mini_gemma2, 1e-4, FP32, GEMMA),
    (mini_granite3, 1e-4, FP32, (1e-8, 1e-4, 4e-2, 1e-5, 5e-3, 1e-5)),
    (mini_smollm3, 1e-4, BF16, (1e-3, 1e-2, 1e-1, 1e-2, 1e-2, 1e-2)),  # bf16 in Liger's fp32 table
    (mini_internvl, 1e-4, FP32, TIGHT),
    (mini_falcon_h1, 1e-5, FP32, (1e-8, 1e-4, 4e-2, 1e-5, 5e-3, 1e-5)),
    (mini_qwen3_next, 1e-5, FP32, TIGHT),  # this and the next two: skipped in Liger (no float32 in fla)
    (mini_qwen3_5_moe, 1e-5, FP32, TIGHT),
    (mini_qwen3_5, 1e-5, FP32, TIGHT),
    (mini_hunyuan_v1, 1e-4, FP32, TIGHT),
    (mini_hunyuan_v1_moe, 1e-5, FP32, (1e-5, 2e-3, 7e-1, 1e-2, 5e-3, 1e-5)),
    (mini_deepseek_v4, 1e-5, FP32, (1e-5, 2e-3, 1e-1, 1e-2, 5e-3, 1e-5)),
    (mini_exaone4, 1e-5, FP32, TIGHT),
    (mini_nemotron, 1e-4, FP32, LLAMA3),
]

MOE_MM = (1e-7, 5e-3, 5e-2, 2e-1, 5e-3, 1e-5)
MULTIMODAL_ROWS = [
    (mm_qwen2_vl, 1e-4, FP32, TIGHT),
    (mm_llama4, 1e-4, FP32, (1e-8, 1e-5, 5e-3, 1e-5, 1e-2, 1e-2)),  # xfail in Liger: its image processor's dtype
    (mm_llava, 1e-4, FP32, TIGHT),  # skipped in Liger as flaky
    (mm_internvl, 1e-4, FP32, TIGHT),
    (mm_smolvlm2, 1e-4, FP32, TIGHT),
    (mm_qwen2_5_vl, 1e-4, FP32, TIGHT),
    (mm_qwen3_vl, 1e-4, FP32, TIGHT),  # skipped in Liger as flaky
    (mm_qwen3_vl_moe, 1e-4, FP32, MOE_MM),
    (mm_mllama, 1e-4, FP32, TIGHT),
    (mm_paligemma, 1e-4, FP32, TIGHT),
    (mm_paligemma2, 1e-4, FP32, TIGHT),
    (mm_gemma3, 1e-5, FP32, GEMMA),
    (mm_gemma4, 1e-5, FP32, GEMMA),  # non-strict xfail in Liger: near-tie top-k swaps at its size
    (mm_qwen3_5, 1e-4, FP32, TIGHT),
    (mm_qwen3_5_moe, 1e-4, FP32, MOE_MM),
]

BF16_LOOSE = (1e-2, 5e-2, 1e-1, 1e-2, 1e-2, 1e-2)
BF16_TIGHT = (1e-2, 1e-2, 1e-1, 1e-2, 1e-2, 1e-2)
BF16_ROWS = [
    (mini_llama4, 1e-5, BF16, (5e-2, 4e-1, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_llama3, 1e-5, BF16, BF16_LOOSE),
    (mini_llava, 1e-5, BF16, (1e-2, 5e-2, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_granite3, 1e-5, BF16, BF16_LOOSE),
    (mini_mllama, 1e-5, BF16, BF16_TIGHT),
    (mini_qwen2, 1e-5, BF16, BF16_LOOSE),
    (mini_qwen3, 1e-5, BF16, BF16_LOOSE),
    (mini_qwen3_moe, 1e-5, BF16, (5e-2, 2e-1, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_gpt_oss, 1e-5, BF16, (5e-2, 5e-2, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_qwen2_vl, 1e-5, BF16, BF16_LOOSE),
    (mini_qwen2_5_vl, 1e-5, BF16, BF16_LOOSE),
    (mini_qwen3_vl, 1e-5, BF16, BF16_LOOSE),
    (mini_qwen3_vl_moe, 1e-5, BF16, (5e-2, 1e-1, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_phi3, 1e-5, BF16, BF16_TIGHT),
    (mini_mistral, 1e-5, BF16, (5e-2, 5e-2, 1e-1, 1e-2, 1e-2, 1e-2)),
    (mini_ministral, 1e-5, BF16, (5e-2, 5e-2, 1e-1, 1e-2, 1e-2, 1e-2)),
    (mini_olmo2, 1e-5, BF16, BF16_TIGHT),
    (mini_olmo3, 1e-5, BF16, BF16_TIGHT),
    (mini_glm4, 1e-5, BF16, BF16_TIGHT),
    (mini_glm4v, 1e-5, BF16, (1e-2, 2e-2, 1e-1, 1e-2, 1e-2, 1e-2)),
    (mini_glm4v_moe, 1e-5, BF16, (5e-2, 5e-1, 1e-1, 5e-1, 2e-1, 1e-2)),
    (mini_smollm3, 1e-4, BF16, (1e-3, 1e-2, 1e-1, 1e-2, 1e-2, 1e-2)),
    (mini_internvl, 1e-4, BF16, (1e-3, 1e-2, 1e-1, 1e-2, 1e-2, 1e-2)),
    (mini_mixtral, 1e-4, BF16, (1e-3, 1e-2, 1e-1, 1e-2, 1e-1, 1e-2)),  # Liger's commented-out row
    (mini_gemma1, 1e-5, BF16, BF16_TIGHT),
    (mini_gemma1_1, 1e-5, BF16, BF16_TIGHT),
    (mini_gemma2, 1e-4, BF16, (1e-3, 1e-2, 1e-1, 1e-2, 1e-2, 1e-2)),  # commented out in Liger: it fails there
    (mini_gemma3_text, 1e-5, BF16, BF16_TIGHT),
    (mini_gemma4_text, 1e-5, BF16, (5e-2, 1e-2, 7e-1, 1e-2, 1e-2, 1e-2)),
    (mini_falcon_h1_eager, 1e-5, BF16, BF16_TIGHT),
    (mini_qwen3_next, 1e-5, BF16, (1e-2, 1e-2, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_qwen3_5_moe, 1e-5, BF16, (5e-2, 2e-1, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_qwen3_5, 1e-5, BF16, (5e-2, 2e-1, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_hunyuan_v1, 1e-5, BF16, BF16_LOOSE),
    (mini_hunyuan_v1_moe, 1e-5, BF16, (5e-2, 5e-2, 1e-1, 1e-1, 1e-2, 1e-2)),
    (mini_deepseek_v4, 1e-5, BF16, BF16_LOOSE),
    (mini_exaone4, 1e-5, BF16, BF16_LOOSE),
    (mini_nemotron, 1e-5, BF16, BF16_LOOSE),
]


def _rows(rows):
    return [pytest.param(*row, id=row[0].__name__) for row in rows]


def random_batch(seed, vocab):
    """Stands in for a batch of Liger's tokenized tiny Shakespeare: ids clear of the special tokens, rows padded to
    different lengths (id 0, mask 0, label -100 there)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(32, vocab - 8, (ROWS, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(ROWS):
        attention_mask[row, LENGTH - 3 * row:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def with_shift_labels(batch):
    """Liger's simple_collate_fn also passes the labels already shifted (transformers >= 4.54.1)."""
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:].contiguous()
    return {**batch, "shift_labels": shifted}


def run_mini_model(make, lr, dtype, patch=None, checkpointing=False, **call):
    """Liger's run_mini_model: build after seeding, AdamW steps, then the eval batch's loss and top-k log-probs
    (and here the first step's gradients, and whether the steps moved the parameters). `patch`: None for the model as
    it is, else what patches it."""
    torch.manual_seed(SEED)
    model = make()
    if dtype != torch.float32:  # (a float32 cast would make Llama-4's complex rotary buffer real)
        model = model.to(dtype)
    if checkpointing:
        # Renamed in transformers 5.x; the old name warns.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    patched = patch is not None
    if patched:
        patch(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    initial = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(STEPS):
        batch = random_batch(step, vocab)
        optimizer.zero_grad()
        output = model(**(with_shift_labels(batch) if step % 2 == 0 else batch), **call)
        # The fused path builds no logits; the model's own loss needs them.
        assert (output.logits is None) == patched, (make.__name__, step, patched)
        output.loss.backward()
        if step == 0:
            first_gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                               if parameter.grad is not None}
        optimizer.step()
        losses.append(output.loss.item())
    model.eval()
    with torch.no_grad():
        output = model(**with_shift_labels(random_batch(STEPS, vocab)))
    assert output.logits is not None, make.__name__  # eval runs the model's own forward, patched or not
    losses.append(output.loss.item())
    logprobs = torch.log_softmax(output.logits, dim=-1, dtype=torch.float32).topk(TOP_K, dim=-1).values
    moved = any(not torch.equal(start, parameter) for start, parameter in zip(initial, model.parameters()))
    return torch.tensor(losses), logprobs, model, first_gradients, moved


def assert_close_as_liger(expected, actual, atol, rtol, what):
    """Liger's assert_verbose_allclose: |expected - actual| <= atol + rtol * |actual|, NaN and inf where the other
    has them."""
    expected, actual = expected.detach().float(), actual.detach().float()
    assert expected.shape == actual.shape, what
    bad = ~torch.isclose(expected, actual, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        worst = (expected - actual).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} mismatched (atol {atol}, rtol {rtol}); "
                             f"first at {index}: {expected[index].item()} vs {actual[index].item()}; largest "
                             f"difference {worst:.3g}")


# The first step's gradients (beyond Liger): float32 agrees to ~2e-5 at worst (DeepSeek-V4's hyper-connection head);
# bf16 to ~9e-3 (where the model and kdfast each round the logits' gradient: about 2 units of bf16's 2^-8).
FIRST_GRADIENT_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def assert_same_first_gradients(own, fused, rtol, name):
    """Beyond Liger: the first step's gradient of every parameter, to `rtol` of its norm, or of 1e-4 of the largest
    parameter gradient's where its own is smaller (numerically zero gradients, such as DeepSeek-V4's hash-routed
    gates, are rounding alone). AdamW's steps hide a gradient wrong by a common factor, and Liger's bf16 tolerances
    hide most of what a wrong loss does in a few steps; this hides neither."""
    assert own.keys() == fused.keys(), name  # the same parameters reached by the loss
    largest = max(gradient.double().norm() for gradient in own.values())
    for param_name, gradient in own.items():
        scale = max(gradient.double().norm(), 1e-4 * largest)
        error = ((fused[param_name].double() - gradient.double()).norm() / scale).item()
        assert error < rtol, f"{name} [First gradients] {param_name}: relative error {error:.3g}"


def check_mini_model(make, lr, dtype, tolerances, patch=patch_causal_lm, **options):
    """Liger's test_mini_model: the plain run first, then the patched one, compared step by step."""
    loss_atol, loss_rtol, logprobs_atol, logprobs_rtol, param_atol, param_rtol = tolerances
    own_losses, own_logprobs, own, own_gradients, moved = run_mini_model(make, lr, dtype, **options)
    losses, logprobs, fused, gradients, _ = run_mini_model(make, lr, dtype, patch=patch, **options)
    name = make.__name__
    assert moved, f"{name}: the steps changed no parameter"
    assert_close_as_liger(own_losses, losses, loss_atol, loss_rtol, f"{name} [Loss]")
    assert_close_as_liger(own_logprobs, logprobs, logprobs_atol, logprobs_rtol, f"{name} [Top k logprobs]")
    checked = 0
    for (param_name, expected), (_, actual) in zip(own.named_parameters(), fused.named_parameters()):
        assert_close_as_liger(expected, actual, param_atol, param_rtol, f"{name} [Model parameters] {param_name}")
        checked += 1
    assert checked == len(list(own.parameters())) > 0
    assert_same_first_gradients(own_gradients, gradients, FIRST_GRADIENT_RTOL[dtype], name)


@pytest.mark.parametrize("make, lr, dtype, tolerances", _rows(FP32_ROWS))
def test_mini_model(make, lr, dtype, tolerances):
    check_mini_model(make, lr, dtype, tolerances)


@pytest.mark.parametrize("make, lr, dtype, tolerances", _rows(MULTIMODAL_ROWS))
def test_mini_model_multimodal_text_path(make, lr, dtype, tolerances):
    check_mini_model(make, lr, dtype, tolerances, checkpointing=True)


@pytest.mark.parametrize("make, lr, dtype, tolerances", _rows(BF16_ROWS))
def test_mini_model_bf16(make, lr, dtype, tolerances):
    check_mini_model(make, lr, dtype, tolerances, accum_dtype=torch.float32)


def test_the_comparison_sees_a_loss_off_by_a_part_in_ten_thousand():
    """Liger's llama3 tolerances at this size catch a small change in the loss: a z-loss of weight 1e-5 adds
    1e-5 * lse^2 (lse about log 500), some 6e-5 of the loss."""
    with pytest.raises(AssertionError, match=r"\[Loss\]"):
        check_mini_model(mini_llama3, 1e-4, FP32, LLAMA3,
                         patch=lambda model: patch_causal_lm(model, z_loss_weight=1e-5))


def test_the_first_gradients_see_what_liger_bf16_tolerances_miss():
    """Label smoothing 0.1 moves the near-uniform models' loss by about 1e-3, within Liger's bf16 loss tolerance,
    and their bf16 parameters too little to see; it moves the gradient by about a tenth."""
    with pytest.raises(AssertionError, match=r"\[First gradients\]"):
        check_mini_model(mini_llama3, 1e-5, BF16, BF16_LOOSE, accum_dtype=torch.float32,
                         patch=lambda model: patch_causal_lm(model, label_smoothing=0.1))
