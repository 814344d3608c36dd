"""prime-rl's (PrimeIntellect-ai/prime-rl) tests of its fused LM head and of the log-prob, entropy and KL side of its RL
loss, their inputs, expectations and tolerances, with kdfast as the thing under test.

What prime-rl computes (src/prime_rl/trainer/models/layers/lm_head.py): `FusedOutputLinear(hidden, labels,
temperature)` flattens [b, s] tokens, walks them in chunks of `chunk_size` rows (and the vocabulary in tiles of
min(V, 8192) with an online log-sum-exp) and returns per token log q(label) and the entropy of q = softmax(hidden @
W.T / t), t a per-token temperature tensor [b, s], without logits. Its backward differentiates the log-probs only
(an entropy gradient is refused: the entropy is a metric, as `compute_entropy` computes it under no_grad); the head has
no bias. `VanillaOutputLinear` returns the logits, whose log-probs the trainer takes with `selective_log_softmax` and
`compute_entropy` (src/prime_rl/trainer/rl/loss.py). The Gemma variant (lm_head_gemma.py) caps the float32 logits,
softcap * tanh(z / softcap), before the temperature. kdfast's counterpart is `linear_token_logprobs(hidden, W, labels,
temperature=t, return_entropy=True, entropy_grad=False, chunk_size=...)`: `chunk_size` is rows per chunk in both
(kdfast spreads the rows evenly over the chunks; its chunks hold every column of their rows), `entropy_grad=False`
is the peer's no-gradient entropy, and `softcap=` is the Gemma head's cap (kdfast's order, softcap then temperature,
is prime-rl's). kdfast takes one temperature per call: the peer's tests all pass a uniform tensor, which the port reads
as its one value (and checks it is uniform); a per-token temperature is hidden / t_i with temperature 1
(`test_per_token_temperature_by_prescaled_hidden`, kdfast's addition; the Gemma head caps before dividing, so that
form does not serve it).

tests/unit/train/rl/test_fused_lm_head.py:
- test_fused_lm_head_matches_full_logits_forward_and_backward_cpu (b 2, s 4, h 8, V 37, t 1.7, chunk 3, seed 0;
  the backward of log-probs.sum() into hidden and head): `test_fused_lm_head_matches_full_logits`, the peer's float32
  baseline and a float64 one, both at its atol 1e-5, every backend; `kdfast_gemma_softcap` runs the same on the Gemma
  head's map with a cap of 5 (its logits reach ~8 here), which prime-rl does not test.
- test_fused_lm_head_frozen_weight_backward_cpu: `test_fused_lm_head_frozen_weight_backward`; kdfast takes d hidden
  in the forward there (no chunk recomputed, `backward_chunks_counted`), and the head gets no gradient.
- test_fused_lm_head_requires_labels (an assertion error without labels): kdfast refuses missing token ids with a
  ValueError naming them, `test_fused_lm_head_requires_labels`.
- test_fused_vs_vanilla_integration (fp16 hidden and head, seed 42, t 1.7, chunk 3; the vanilla logits are the fp16
  product, then divided in float32; rtol 1e-3, atol 1e-4): `test_fused_vs_vanilla_integration`, kdfast by default
  (which rounds (x W) / t to fp16 once, where the peer rounds x W) and with `fp32_logits=True`, which is also held to
  float64 within 1e-5.
- test_fused_lm_head_correct_shift (b 2, s 16, h 32, V 50, t 1.5, chunk 13, seed 999; labels shifted left, the
  fused log-probs shifted right with 0 at position 0, against the inference convention at atol 1e-4):
  `test_fused_lm_head_correct_shift`, plus float64 within 1e-5.
- test_inject_prime_lm_head_fused and test_hf_model_fused_vs_vanilla_matches (GPU: a 2-layer Llama, hidden 128, V
  1000, 2 x 64 tokens, t 1.5, chunk 32, bf16 autocast; log-probs and entropy of shape [2, 64], the fused head against
  the vanilla bf16 logits at rtol 1e-3, atol 1e-4): `test_hf_model_fused_vs_vanilla_matches`, the same randomly
  initialised Llama (transformers') on the CPU under bf16 autocast (the Triton interpreter: 2 x 16 tokens), its
  decoder's last hidden state and its LM head's weight into kdfast.
- Left out: test_vanilla_lm_head_returns_logits and test_inject_prime_lm_head_vanilla (an nn.Linear's logits: no
  kdfast call), test_full_model_fused_vs_vanilla (skipped upstream: NaNs in bf16 with FlashAttention 3).

tests/unit/train/rl/test_loss.py (GPU-marked; here on the CPU): the RL loss takes per-token log-probs, not logits.
- test_entropy_loss (`compute_entropy` of randn [10, 10, 10] has shape [10, 10]): `test_entropy_loss`, kdfast's
  entropy of the same logits from `cross_entropy(..., return_components="per_row")` (a metric, as the peer's) and from
  the fused head with an identity head, held to float64 within 1e-6.
- test_ce_component_matches_masked_nll / test_ce_component_applies_weights (the CE component: -sum of w * log-prob over
  ce_weights != 0, divided by ce_scale; expectations 0.15 and 0.03 at atol 1e-6) and
  test_empty_components_keep_backward_valid (every weight 0: a loss of exactly 0 and a zero gradient): the trainer
  log-probs [-0.1, -0.5, -0.2] are made by kdfast from two-column logits [a, 0] whose label column has that log-prob
  (a = -log(expm1(-log q))); the component is `kdfast.cross_entropy` with the zero-weight rows at ignore_index and
  `num_items_in_batch=ce_scale` (its "nll" metric the plain mean), or reduction "none" times the weights.
- Left out, the policy-gradient arithmetic on given log-probs, not kdfast's: test_grpo_loss, test_gspo_loss,
  test_setup_rl_loss_fn_with_custom_config, test_explicit_rl_weights_match_absent_stream,
  test_disjoint_components_in_one_sequence, test_overlapping_components_sum (DPPO masks, importance ratios, the
  ref-KL advantage of on-policy distillation, component normalisation).

tests/unit/train/models/test_nemotron_h_kl.py (GPU: two bf16 NemotronH models, V 256, hidden 256, one perturbed,
their log-probs through the vanilla head, the mismatch KL r - log r - 1 with r = exp(log q_policy - log q_ref) over
the tokens past the first). The model is prime-rl's (Mamba, MoE and FlashAttention layers, CUDA kernels), not kdfast's:
the stand-in is a bf16 Llama of the peer's sizes (V 256, hidden 256, 4 heads, 2 KV heads, head dim 64, MLP 512), two
layers, perturbed as the peer perturbs (every parameter plus scale * randn); every log-prob comes from kdfast's fused
head on the decoder's last hidden state (labels shifted left, log-probs shifted right with log(1/V) at position 0).
Ported: test_kl_zero_when_identical, test_kl_positive_after_perturbation, test_kl_increases_with_larger_perturbation,
test_kl_mismatch_formula_sanity, test_kl_logprob_alignment and test_kl_backward_through_policy with their
expectations; the peer's KL metric is its DPPO loss's `unmasked_mismatch_kl`, whose trust-region mask (policy
arithmetic) is left out: the port takes the mean over the loss mask. test_kl_with_fused_lm_head (fused against
vanilla, chunk 16, t 1, max difference below 1e-2): `test_kl_with_fused_lm_head`; the peer's vanilla log-probs are
`selective_log_softmax` of bf16 logits, whose output is bf16: half an ulp is 1/64 at |log q| in [4, 8), wider than
the 1e-2 asked (on this stand-in its compiled form, as prime-rl runs it, is 0.0155 from the float32 log-softmax of
the same logits, eager bf16 log_softmax on the CPU 0.030). The port takes the log-softmax of the same bf16 logits in
float32 for the peer's 1e-2, and in float64 within 1e-5 (kdfast at T = 1 rounds the same bf16 logits).

tests/unit/orchestrator/test_prefill_logprobs.py (an inference server's prompt log-probs parsed from a faked HTTP
response): nothing kdfast computes. prime-rl has no tests/pipeline/Distill (that folder is alibaba/ROLL's: see
tests/test_roll_peer_cases.py); its on-policy distillation is the ref-KL loss above on sampled-token log-probs.

Tolerances: the peer's own, against its float32 computation; beside them kdfast against the same math in float64."""

import copy
import math

import pytest
import torch
from conftest import BACKENDS, device_for
from transformers import LlamaConfig, LlamaForCausalLM

import kdfast

FAST_BACKENDS = [backend for backend in BACKENDS if not (backend == "triton" and device_for(backend) == "cpu")]
ATOL = 1e-5  # the peer's, and kdfast's against float64 where the peer's is looser


def uniform_temperature(temperature: torch.Tensor) -> float:
    """The peer's per-token temperature tensor as kdfast's one temperature per call (its tests pass uniform ones)."""
    value = temperature.flatten()[0].item()
    assert torch.all(temperature == value)
    return value


def peer_baseline(hidden, weight, labels, temperature, softcap=None, dtype=None):
    """The peer's `_baseline_logprobs_and_entropy` (and the Gemma vanilla head's cap), in `dtype` (default the
    inputs'): log q(label) and the entropy, differentiable to hidden and weight."""
    if dtype is not None:
        hidden, weight, temperature = hidden.to(dtype), weight.to(dtype), temperature.to(dtype)
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_q = torch.log_softmax(logits / temperature.unsqueeze(-1), dim=-1)
    return log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_q.exp() * log_q).sum(-1)


def baseline_with_grads(hidden, weight, labels, temperature, softcap=None, dtype=None, weight_grad=True):
    """(log-probs, entropy, d hidden, d weight) of the peer's baseline, backward of log-probs.sum()."""
    hidden = hidden.detach().to(dtype or hidden.dtype).requires_grad_(True)
    weight = weight.detach().to(dtype or weight.dtype).requires_grad_(weight_grad)
    log_probs, entropy = peer_baseline(hidden, weight, labels, temperature, softcap, dtype)
    log_probs.sum().backward()
    return log_probs.detach(), entropy.detach(), hidden.grad, weight.grad


def close(what, found, expected, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(found.detach().to(expected.dtype).cpu(), expected.cpu(), atol=atol, rtol=rtol,
                               msg=lambda message: f"{what}: {message}")


def shift_left(ids):
    """prime-rl's shift_tensor_left: labels[i] = ids[i + 1], 0 (a valid id, shifted off later) at the end."""
    return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)


def shift_right(values, pad=0.0):
    """prime-rl's shift_tensor_right: result[i] = values[i - 1], `pad` at position 0."""
    return torch.cat([torch.full_like(values[:, :1], pad), values[:, :-1]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# tests/unit/train/rl/test_fused_lm_head.py
# ---------------------------------------------------------------------------------------------------------------


def small_inputs(device, frozen=False):
    """The peer's b 2, s 4, h 8, V 37 draws after manual_seed(0), t 1.7."""
    torch.manual_seed(0)
    b, s, h, v = 2, 4, 8, 37
    temperature = torch.full((b, s), 1.7, dtype=torch.float32)
    hidden = torch.randn(b, s, h, dtype=torch.float32)
    labels = torch.randint(0, v, (b, s), dtype=torch.long)
    weight = torch.randn(v, h, dtype=torch.float32)
    return hidden.to(device), weight.to(device), labels.to(device), temperature.to(device)


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["peer", "kdfast_gemma_softcap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_lm_head_matches_full_logits(backend, softcap):
    device = device_for(backend)
    hidden, weight, labels, temperature = small_inputs(device)
    expected = baseline_with_grads(hidden, weight, labels, temperature, softcap)
    expected64 = baseline_with_grads(hidden, weight, labels, temperature, softcap, dtype=torch.float64)

    hidden1 = hidden.clone().requires_grad_(True)
    weight1 = weight.clone().requires_grad_(True)
    log_probs, entropy = kdfast.linear_token_logprobs(hidden1, weight1, labels,
                                                      temperature=uniform_temperature(temperature), softcap=softcap,
                                                      return_entropy=True, entropy_grad=False, chunk_size=3,
                                                      backend=backend)
    assert log_probs.shape == entropy.shape == labels.shape
    log_probs.sum().backward()
    for reference in (expected, expected64):
        for what, found, value in zip(("log-probs", "entropy", "d hidden", "d weight"),
                                      (log_probs, entropy, hidden1.grad, weight1.grad), reference):
            close(what, found, value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_lm_head_frozen_weight_backward(backend, backward_chunks_counted):
    device = device_for(backend)
    hidden, weight, labels, temperature = small_inputs(device)
    expected = baseline_with_grads(hidden, weight, labels, temperature, weight_grad=False)
    expected64 = baseline_with_grads(hidden, weight, labels, temperature, dtype=torch.float64, weight_grad=False)

    hidden1 = hidden.clone().requires_grad_(True)
    frozen = torch.nn.Parameter(weight.clone(), requires_grad=False)
    log_probs, _ = kdfast.linear_token_logprobs(hidden1, frozen, labels, temperature=uniform_temperature(temperature),
                                                return_entropy=True, entropy_grad=False, chunk_size=3,
                                                backend=backend)
    log_probs.sum().backward()
    close("d hidden", hidden1.grad, expected[2])
    close("d hidden (float64)", hidden1.grad, expected64[2])
    assert frozen.grad is None
    assert not backward_chunks_counted  # d hidden came from the forward: the frozen head's two-GEMM path


def test_fused_lm_head_requires_labels():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 4)
    weight = torch.randn(9, 4)
    with pytest.raises(ValueError, match="token_ids"):
        kdfast.linear_token_logprobs(hidden, weight, None, return_entropy=True)


@pytest.mark.parametrize("fp32_logits", [False, True], ids=["fp16_logits", "fp32_logits"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_vs_vanilla_integration(backend, fp32_logits):
    device = device_for(backend)
    torch.manual_seed(42)
    b, s, h, v = 2, 4, 8, 37
    temp_value = 1.7
    temperature = torch.full((b, s), temp_value, dtype=torch.float32)
    hidden = torch.randn(b, s, h, dtype=torch.float16).to(device)
    labels = torch.randint(0, v, (b, s), dtype=torch.long).to(device)
    weight = torch.randn(v, h, dtype=torch.float16).to(device)

    # The vanilla path: the fp16 product, upcast, divided by the temperature.
    logits = (hidden @ weight.t()).float() / temp_value
    log_q = torch.log_softmax(logits, dim=-1)
    vanilla_log_probs = log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    vanilla_entropy = -(log_q.exp() * log_q).sum(-1)

    log_probs, entropy = kdfast.linear_token_logprobs(hidden, weight, labels,
                                                      temperature=uniform_temperature(temperature),
                                                      return_entropy=True, entropy_grad=False, chunk_size=3,
                                                      fp32_logits=fp32_logits, backend=backend)
    assert log_probs.dtype == entropy.dtype == torch.float32
    close("log-probs", log_probs, vanilla_log_probs, atol=1e-4, rtol=1e-3)
    close("entropy", entropy, vanilla_entropy, atol=1e-4, rtol=1e-3)
    if fp32_logits:  # the product kept in float32: float64's math on the fp16 values
        expected64 = peer_baseline(hidden, weight, labels, temperature.to(device), dtype=torch.float64)
        close("log-probs (float64)", log_probs, expected64[0])
        close("entropy (float64)", entropy, expected64[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_temperature_by_prescaled_hidden(backend):
    """kdfast's addition: the peer's [b, s] temperature tensor, not uniform, as hidden / t_i at temperature 1; the
    division is in autograd's graph, so d hidden is the peer's."""
    device = device_for(backend)
    hidden, weight, labels, _ = small_inputs(device)
    temperature = torch.linspace(0.5, 2.0, labels.numel(), device=device).reshape(labels.shape)
    expected64 = baseline_with_grads(hidden, weight, labels, temperature, dtype=torch.float64)

    hidden1 = hidden.clone().requires_grad_(True)
    weight1 = weight.clone().requires_grad_(True)
    log_probs, entropy = kdfast.linear_token_logprobs(hidden1 / temperature.unsqueeze(-1), weight1, labels,
                                                      return_entropy=True, entropy_grad=False, chunk_size=3,
                                                      backend=backend)
    log_probs.sum().backward()
    for what, found, value in zip(("log-probs", "entropy", "d hidden", "d weight"),
                                  (log_probs, entropy, hidden1.grad, weight1.grad), expected64):
        close(what, found, value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_lm_head_correct_shift(backend):
    device = device_for(backend)
    torch.manual_seed(999)
    b, s, h, v = 2, 16, 32, 50
    temp_value = 1.5
    temperature = torch.full((b, s), temp_value, dtype=torch.float32)
    hidden = torch.randn(b, s, h, dtype=torch.float32).to(device)
    weight = torch.randn(v, h, dtype=torch.float32).to(device)
    input_ids = torch.randint(0, v, (b, s), dtype=torch.long).to(device)
    labels = shift_left(input_ids)

    fused = kdfast.linear_token_logprobs(hidden, weight, labels, temperature=uniform_temperature(temperature),
                                         return_entropy=True, entropy_grad=False, chunk_size=13, backend=backend)[0]
    trainer_log_probs = shift_right(fused)

    # The inference convention: logits shifted right (zeros first), log q of the token at each position.
    logits = (hidden @ weight.t()) / temp_value
    shifted_logits = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
    inference_log_probs = torch.log_softmax(shifted_logits, -1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)

    assert torch.all(trainer_log_probs[:, 0] == 0)
    importance_ratio = trainer_log_probs[:, 1:] - inference_log_probs[:, 1:]
    close("importance ratio", importance_ratio, torch.zeros(b, s - 1), atol=1e-4)
    expected64 = shift_right(peer_baseline(hidden, weight, labels, temperature.to(device), dtype=torch.float64)[0])
    close("log-probs (float64)", trainer_log_probs, expected64)


LLAMA_CONFIG = dict(hidden_size=128, intermediate_size=256, max_position_embeddings=512, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2, vocab_size=1000, rms_norm_eps=1e-5,
                    rope_theta=10000.0, attention_bias=False, mlp_bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_model_fused_vs_vanilla_matches(backend):
    device = device_for(backend)
    torch.manual_seed(42)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG)).to(device)
    batch_size, seq_len = 2, 64 if backend in FAST_BACKENDS else 16  # the interpreter: fewer tokens
    temp_value = 1.5
    vocab = LLAMA_CONFIG["vocab_size"]
    input_ids = torch.randint(0, vocab, (batch_size, seq_len)).to(device)
    labels = torch.randint(0, vocab, (batch_size, seq_len)).to(device)
    temperature = torch.full((batch_size, seq_len), temp_value, dtype=torch.float32)

    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        hidden = model.model(input_ids=input_ids).last_hidden_state
        vanilla_logits = model.lm_head(hidden)
        log_probs, entropy = kdfast.linear_token_logprobs(hidden, model.lm_head.weight, labels,
                                                          temperature=uniform_temperature(temperature),
                                                          return_entropy=True, entropy_grad=False, chunk_size=32,
                                                          backend=backend)
    assert vanilla_logits.dtype == torch.bfloat16
    # test_inject_prime_lm_head_fused: per-token outputs, no logits
    assert log_probs.shape == entropy.shape == (batch_size, seq_len)
    log_q = torch.log_softmax(vanilla_logits.float() / temp_value, dim=-1)
    close("log-probs", log_probs, log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-4, rtol=1e-3)
    close("entropy", entropy, -(log_q.exp() * log_q).sum(-1), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# tests/unit/train/rl/test_loss.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_loss(backend):
    device = device_for(backend)
    torch.manual_seed(0)
    shifted_logits = torch.randn(10, 10, 10, dtype=torch.float32).to(device)
    tokens = torch.zeros(10, 10, dtype=torch.long, device=device)  # the entropy does not read them
    log_q64 = torch.log_softmax(shifted_logits.double(), -1)
    expected64 = -(log_q64.exp() * log_q64).sum(-1)

    _, parts = kdfast.cross_entropy(shifted_logits, tokens, reduction="none", return_components="per_row",
                                    backend=backend)
    fused_entropy = kdfast.linear_token_logprobs(shifted_logits, torch.eye(10, device=device), tokens,
                                                 return_entropy=True, entropy_grad=False, backend=backend)[1]
    for what, entropy in (("components' entropy", parts.entropy), ("fused entropy", fused_entropy)):
        assert entropy.shape == (10, 10)
        close(what, entropy, expected64, atol=1e-6)


TRAINER_LOG_PROBS = [-0.1, -0.5, -0.2]


def logits_with_log_probs(log_probs, device):
    """Rows [a, 0] whose column 0 has log-softmax `log_probs[i]`: a = -log(expm1(-log q)). Label 0 on each."""
    a = torch.tensor([-math.log(math.expm1(-value)) for value in log_probs], dtype=torch.float64)
    return torch.stack([a, torch.zeros_like(a)], dim=-1).float().to(device)


def ce_labels(weights, device):
    """The CE component's rows are ce_weights != 0 (not the loss mask): the others at ignore_index."""
    return torch.tensor([0 if weight != 0 else -100 for weight in weights], device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_component_matches_masked_nll(backend):
    device = device_for(backend)
    logits = logits_with_log_probs(TRAINER_LOG_PROBS, device)
    labels = ce_labels([1.0, 0.0, 1.0], device)
    ce_scale = 2
    loss = kdfast.cross_entropy(logits, labels, num_items_in_batch=ce_scale, backend=backend)
    nll = kdfast.cross_entropy(logits, labels, backend=backend)  # the "nll" metric: the mean over the CE rows
    # loss = -sum(member log-probs) / ce_scale = -(-0.1 - 0.2) / 2 = 0.15
    assert torch.isclose(loss.cpu(), torch.tensor(0.15), atol=1e-6)
    assert torch.isclose(nll.cpu(), torch.tensor(0.15), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_component_applies_weights(backend):
    device = device_for(backend)
    weights = [0.1, 0.0, 0.1]
    logits = logits_with_log_probs(TRAINER_LOG_PROBS, device)
    per_row = kdfast.cross_entropy(logits, ce_labels(weights, device), reduction="none", backend=backend)
    loss = (per_row * torch.tensor(weights, device=device)).sum() / 1  # ce_scale 1
    # loss = 0.1 * (0.1 + 0.2) = 0.03
    assert torch.isclose(loss.cpu(), torch.tensor(0.03), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_components_keep_backward_valid(backend):
    """Every CE weight 0: the loss is exactly 0 and backward gives the logits an exact zero gradient."""
    device = device_for(backend)
    torch.manual_seed(0)
    logits = torch.randn(6, 2, device=device, requires_grad=True)
    loss = kdfast.cross_entropy(logits, ce_labels([0.0] * 6, device), num_items_in_batch=1, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


# ---------------------------------------------------------------------------------------------------------------
# tests/unit/train/models/test_nemotron_h_kl.py, on a Llama stand-in (module docstring)
# ---------------------------------------------------------------------------------------------------------------

KL_VOCAB = 256
KL_CONFIG = dict(vocab_size=KL_VOCAB, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=128, intermediate_size=512, num_hidden_layers=2)


def kl_model(device, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**KL_CONFIG)).to(device=device, dtype=torch.bfloat16)


def perturbed(model, scale, seed):
    """A copy of `model` with every parameter moved by scale * randn (the peer's `_perturb_model`)."""
    policy = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * scale)
    return policy


def kdfast_log_probs(model, input_ids, backend, chunk_size=16):
    """The peer's `_get_logprobs_vanilla` on kdfast's fused head: labels shifted left, log-probs shifted right with
    log(1/V) at position 0."""
    hidden = model.model(input_ids=input_ids).last_hidden_state
    log_probs = kdfast.linear_token_logprobs(hidden, model.lm_head.weight, shift_left(input_ids),
                                             chunk_size=chunk_size, backend=backend)
    return shift_right(log_probs, pad=math.log(1.0 / KL_VOCAB))


def mismatch_kl(trainer, inference):
    log_ratio = trainer - inference
    return torch.exp(log_ratio) - log_ratio - 1


def loss_mask(seq_len, device):
    mask = torch.ones(seq_len, dtype=torch.bool, device=device)
    mask[0] = False  # the shifted-in pad
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_with_fused_lm_head(backend):
    device = device_for(backend)
    model = kl_model(device)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (1, 16)).to(device)
    labels = shift_left(input_ids)
    temperature = torch.ones(1, 16)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state
        vanilla_logits = model.lm_head(hidden)
        fused = kdfast.linear_token_logprobs(hidden, model.lm_head.weight, labels,
                                             temperature=uniform_temperature(temperature), chunk_size=16,
                                             backend=backend)
    assert vanilla_logits.dtype == torch.bfloat16
    # The vanilla log-probs of the same bf16 logits, taken in float32 rather than rounded to bf16 (module docstring)
    vanilla = torch.log_softmax(vanilla_logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    diff = (vanilla - fused).abs().max()
    assert diff < 1e-2, f"Vanilla vs fused logprob diff: {diff.item()}"
    expected64 = torch.log_softmax(vanilla_logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close("log-probs (float64 of the bf16 logits)", fused, expected64)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_zero_when_identical(backend):
    """The same model for trainer and inference, each log-prob its own kdfast call in chunks of different sizes."""
    device = device_for(backend)
    model = kl_model(device)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (2, 32)).to(device)
    with torch.no_grad():
        trainer = kdfast_log_probs(model, input_ids, backend, chunk_size=16)
        inference = kdfast_log_probs(model, input_ids, backend, chunk_size=7)
    mask = loss_mask(32, device)
    for row in range(2):
        kl = mismatch_kl(trainer[row], inference[row])[mask].mean()
        assert kl.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_positive_after_perturbation(backend):
    device = device_for(backend)
    ref_model = kl_model(device)
    policy_model = perturbed(ref_model, 0.05, seed=2)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (2, 32)).to(device)
    with torch.no_grad():
        ref = kdfast_log_probs(ref_model, input_ids, backend)
        policy = kdfast_log_probs(policy_model, input_ids, backend)
    mask = loss_mask(32, device)
    for row in range(2):
        kl = mismatch_kl(policy[row], ref[row])[mask].mean().item()
        assert 0 < kl < 100


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_increases_with_larger_perturbation(backend):
    device = device_for(backend)
    ref_model = kl_model(device)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (1, 32)).to(device)
    mask = loss_mask(32, device)
    with torch.no_grad():
        ref = kdfast_log_probs(ref_model, input_ids, backend)[0]
        kls = [(mismatch_kl(kdfast_log_probs(perturbed(ref_model, scale, seed=2), input_ids, backend)[0], ref)
                * mask).sum() / mask.sum() for scale in (0.01, 0.1)]
    assert kls[1] > kls[0]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_mismatch_formula_sanity(backend):
    device = device_for(backend)
    ref_model = kl_model(device)
    model = perturbed(ref_model, 0.1, seed=2)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (2, 32)).to(device)
    with torch.no_grad():
        kl = mismatch_kl(kdfast_log_probs(model, input_ids, backend), kdfast_log_probs(ref_model, input_ids, backend))
    assert (kl >= -1e-5).all()
    assert kl[0][loss_mask(32, device)].mean() > 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_logprob_alignment(backend):
    device = device_for(backend)
    model = kl_model(device)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (1, 16)).to(device)
    with torch.no_grad():
        log_probs = kdfast_log_probs(model, input_ids, backend)
    expected_pad = math.log(1.0 / KL_VOCAB)
    assert log_probs[0, 0].item() == pytest.approx(expected_pad, abs=1e-1)
    assert (log_probs[0, 1:] < 0).all()
    assert (log_probs[0, 1:] > -20).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_backward_through_policy(backend):
    """sum(mask * (log q_policy - log q_ref)^2) reaches the policy's parameters through kdfast's backward; the head's
    and the last hidden state's gradients are also held to float64 on the same bf16 tensors, within 2^-7 of the
    largest entry (at least its bf16 ulp): kdfast rounds the logits to bf16 (the default) and returns the gradient
    in bf16."""
    device = device_for(backend)
    ref_model = kl_model(device)
    policy_model = perturbed(ref_model, 0.05, seed=2)
    torch.manual_seed(1)
    input_ids = torch.randint(0, KL_VOCAB, (1, 16)).to(device)
    labels = shift_left(input_ids)
    with torch.no_grad():
        ref = kdfast_log_probs(ref_model, input_ids, backend)
    hidden = policy_model.model(input_ids=input_ids).last_hidden_state
    hidden.retain_grad()
    log_probs = kdfast.linear_token_logprobs(hidden, policy_model.lm_head.weight, labels, chunk_size=16,
                                             backend=backend)
    policy = shift_right(log_probs, pad=math.log(1.0 / KL_VOCAB))
    mask = loss_mask(16, device)
    log_ratio = policy[0] - ref[0]
    (mask * log_ratio**2).sum().backward()
    assert any(p.grad is not None and p.grad.norm().item() > 0 for p in policy_model.parameters())

    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = policy_model.lm_head.weight.detach().double().requires_grad_(True)
    log_q = torch.log_softmax(hidden64 @ weight64.t(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ratio64 = shift_right(log_q, pad=math.log(1.0 / KL_VOCAB))[0] - ref[0].double()
    (mask * ratio64**2).sum().backward()
    for what, found, expected in (("d hidden", hidden.grad, hidden64.grad),
                                  ("d weight", policy_model.lm_head.weight.grad, weight64.grad)):
        scale = expected.abs().max().item()
        close(what, found, expected, atol=scale * 2**-7)
