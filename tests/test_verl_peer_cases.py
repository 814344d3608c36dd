"""verl's tests of its fused per-token log-probs + entropy kernel (`linear_cross_entropy(hidden, weight, labels,
temperature, reduction)` -> (log-probs, entropy), verl/utils/kernel/linear_cross_entropy.py) and of the helpers beside
it, ported to kdfast's counterpart `kdfast.linear_token_logprobs(..., return_entropy=True)` (and
`linear_token_outputs` for a metric): the peer's inputs, its gradient upstreams and its tolerances against its own
float32 torch reference, written with kdfast's API.

verl's tests/utils/test_linear_cross_entropy.py:
- TestLinearCrossEntropy.verify_correctness (five shapes of real models, bf16 hidden and head drawn uniform in [-0.5,
  0.5], random labels, T = 1.5; one backward of (entropy, log-probs) with upstreams g_entropy uniform in [-0.5, 0.5]
  and g_logprobs uniform in [-1, 1] into hidden and head): `test_verify_correctness`. The peer runs on a GPU; here on
  the CPU with the hidden sizes kept (they set the logits' scale), the tokens cut 16-fold and the vocabularies
  64-fold, one draw rather than five, in bf16 with the peer's kernel tolerances and kdfast's `fp32_logits=True` (the
  peer's kernel keeps its tiles' logits in float32; kdfast's default rounds them to bf16 as TRL does, 0.013-0.056 off
  the float64 log-probs at these shapes: `test_bf16_logits_rounded_by_default_miss_the_peers_tolerance`) and in
  float32 with those it holds its float32 fused torch path (`FusedLinearForPPO`) to, on kdfast's PyTorch and C++
  backends; the Triton kernel (its interpreter off a GPU, slow) on the third shape cut further, in float32.
- test_lce_non_divisible_vocab_padding (one logit 3, the others -15 after T = 1.5, vocab 152064 and 149 * 1024; a
  padded vocabulary tile would add phantom mass): `test_non_divisible_vocab_padding`, the vocabularies kept, 8 tokens
  and a hidden size of 64 rather than 512 and 3584 (only column 0 is non-zero), plus an odd vocab for kdfast's own
  tails; bf16 and float32 on the PyTorch and C++ backends, the Triton interpreter on 152064 in float32.
- verify_per_sample_correctness, verify_uniform_tensor_matches_scalar and test_lce_per_sample_temperature (from a
  pull request of the peer, not in its main branch: a per-token temperature tensor, uniform in [0.5, 2]): kdfast takes
  one temperature per call (a tensor is refused, checked here), so a per-token temperature is the peer kernel's own
  prescale, hidden / T_i rounded to the input dtype with T = 1: `test_per_token_temperature_by_prescaled_hidden`,
  `test_uniform_prescale_matches_scalar_temperature`, on the peer's third shape cut as above.
- Left out: verify_correctness's comparisons among verl's own torch paths (`logprobs_from_logits`,
  `entropy_from_logits`, `FusedLinearForPPO`) and check_storage / the latencies (printed, never asserted; kdfast's
  peak memory is tests/test_token_logprobs.py's). The peer's `reduction` is "none" in all its tests, kdfast's only
  form (it has no reduction argument); its labels have no ignore index, nor have kdfast's token ids.

verl's tests/utils/test_special_linear_cross_entropy_tp.py (test_linear_cross_entropy_tp.py before): its cases split
the head's vocabulary over a torchrun process group (NCCL); they run on `linear_token_logprobs(process_group=...)` over
gloo ranks in tests/test_token_logprobs_vocab_parallel_peer_cases.py (verify_torch_itself, which checks the peer's own
TP torch reference, is left out there).

verl's tests/utils/test_cann_linear_ce_on_cpu.py (the NPU path's chunked CE + entropy backward, on the CPU):
test_chunked_ce_entropy_backward_matches_torch and its CE-only twin (zero entropy upstream): `test_chunked_backward`,
`test_logprobs_only_backward`, at the peer's sizes and tolerances; the peer's chunks tile the vocabulary, kdfast's
the rows. The device-policy and TP vocab-range tests (test_should_use_cann_*, test_resolve_vocab_range_*) test the
peer's NPU dispatch: left out.

verl's tests/utils/test_torch_functional.py: main has no test of `logprobs_from_logits` / `entropy_from_logits`
(the old tests/gpu_utility cases of `logprobs_from_logits_v2` compared two verl functions on materialised logits and
were removed). Its test_calculate_sum_pi_squared_from_logits[_extreme_values] compute sum q^2, kdfast's
`log_sum_sq_probs` metric: `test_sum_pi_squared`, with an identity head so that hidden are the logits; float32 only
(kdfast refuses float64 inputs), the extreme case held to the rounding of a float32 log-sum-exp where the peer's
float64 asks 1e-10.

verl's on-policy distillation (verl/trainer/distillation), tests/workers:
- test_chunked_topk_log_probs_on_cpu.py (log_softmax(logits) gathered at K teacher ids per token): kdfast's per-token
  log-probs with each row's hidden state repeated K times, ids [..., K]: `test_topk_logprobs_*`; the vocab of
  152064 kept with fewer tokens (cut below); the small-vocab cases with an identity head, so that d hidden is the
  peer's d logits. test_numerical_equivalence_low_precision_on_gpu (bf16/fp16 against torch's log_softmax on a GPU)
  is left out: kdfast's float32 outputs in bf16 are tests/test_token_logprobs.py's.
- test_distillation_topk_symmetry_on_cpu.py and test_megatron_distillation_only_on_cpu.py: left out. They test the
  engines' plumbing of the distillation outputs and the top-k overlap diagnostics (overlap count, overlap token
  advantage), which kdfast does not compute; none asserts a loss value. verl's top-k forward KL, sum_k p_k (log p_k -
  log q_k), neither renormalises p nor adds a rest bucket (kdfast's `tail` modes do one or the other).
- tests/utils/test_special_megatron_kl_loss_tp.py: left out (Megatron tensor parallelism on GPUs, and that same
  unnormalised loss with a `log_prob_min_clamp` that kdfast has no counterpart of)."""

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast
from kdfast.token_logprobs import linear_token_outputs

FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # the Triton interpreter runs a cut-down case of its own
TEMPERATURE = 1.5  # the peer's default

# The peer's shapes (tokens, hidden, vocab) of verify_correctness, and the CPU's cut: tokens / 16, vocab / 64.
PEER_SHAPES = [(1937, 3584, 152064), (2169, 896, 151936), (1530, 2048, 32256), (1388, 4096, 102400),
               (8192, 4096, 102400)]
CPU_SHAPES = [(tokens // 16, hidden, vocab // 64) for tokens, hidden, vocab in PEER_SHAPES]

# (atol, rtol) of log-probs, entropy and the gradients against the float32 reference: in bf16 the peer's Triton
# kernel's, in float32 those of its float32 fused torch path.
TOLERANCES = {
    torch.bfloat16: {"logprobs": (1e-3, 2e-4), "entropy": (5e-3, 5e-4), "grads": (2e-2, 4e-2)},
    torch.float32: {"logprobs": (1e-4, 1e-4), "entropy": (1e-4, 1e-4), "grads": (1e-2, 1e-4)},
}
# The per-token temperature's (the peer's pull request): the kernel pays one more bf16 rounding, the prescale.
PER_TOKEN_TOLERANCES = {
    torch.bfloat16: {"logprobs": (5e-3, 5e-3), "entropy": (5e-2, 1e-2), "grads": (3e-2, 4e-2)},
    torch.float32: TOLERANCES[torch.float32],
}


def uniform(shape, low, high, generator, dtype=torch.float32):
    return torch.empty(shape).uniform_(low, high, generator=generator).to(dtype)


def peer_inputs(tokens, hidden_size, vocab, dtype, seed=0, device="cpu"):
    """The peer's draws: hidden [1, tokens, H] and head [V, H] uniform in [-0.5, 0.5] (requiring grad), labels
    [1, tokens]; the upstreams g_entropy uniform in [-0.5, 0.5] and g_logprobs in [-1, 1], [tokens]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = uniform((1, tokens, hidden_size), -0.5, 0.5, generator, dtype).to(device).requires_grad_()
    weight = uniform((vocab, hidden_size), -0.5, 0.5, generator, dtype).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)
    g_entropy = uniform((tokens,), -0.5, 0.5, generator, dtype).to(device)
    g_logprobs = uniform((tokens,), -1.0, 1.0, generator, dtype).to(device)
    return hidden, weight, labels, g_entropy, g_logprobs


def reference(hidden, weight, labels, temperature, precision=torch.float32):
    """The peer's torch reference: logits of the inputs upcast (to float32, or float64 to judge both), divided by the
    temperature (a number, or one per token); log q(label) and q's entropy per token, flattened."""
    logits = hidden.reshape(-1, hidden.shape[-1]).to(precision) @ weight.to(precision).T
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(precision)[:, None]
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    return log_q.gather(-1, labels.reshape(-1, 1)).squeeze(-1), -(log_q.exp() * log_q).sum(-1)


def kdfast_outputs(hidden, weight, labels, temperature, backend, chunk_size="auto", fp32_logits=False):
    logprobs, entropy = kdfast.linear_token_logprobs(hidden, weight, labels, temperature=temperature,
                                                     return_entropy=True, chunk_size=chunk_size, backend=backend,
                                                     fp32_logits=fp32_logits)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == labels.shape
    return logprobs.reshape(-1), entropy.reshape(-1)


def combined_grads(logprobs, entropy, hidden, weight, g_entropy, g_logprobs):
    """The peer's one backward of both outputs into hidden and the head."""
    return torch.autograd.grad((entropy, logprobs), (hidden, weight),
                               (g_entropy.to(entropy.dtype), g_logprobs.to(logprobs.dtype)))


def assert_close(name, found, expected, tolerance, truth=None):
    """assert_close at the peer's (atol, rtol); on failure also each side's largest distance to float64 `truth`."""
    atol, rtol = tolerance
    try:
        torch.testing.assert_close(found, expected, atol=atol, rtol=rtol)
    except AssertionError as error:
        if truth is not None:
            ours, theirs = ((t.double() - truth).abs().max().item() for t in (found, expected))
            raise AssertionError(f"{name}: {error}\nlargest distance to float64: kdfast {ours:.3g}, the peer's "
                                 f"float32 reference {theirs:.3g}") from None
        raise AssertionError(f"{name}: {error}") from None


def float64_truth(hidden, weight, labels, temperature, g_entropy, g_logprobs):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    logprobs, entropy = reference(*leaves, labels, temperature, torch.float64)
    grads = combined_grads(logprobs, entropy, *leaves, g_entropy.double(), g_logprobs.double())
    return logprobs.detach(), entropy.detach(), *grads


def check_against_reference(hidden, weight, labels, g_entropy, g_logprobs, temperature, kdfast_temperature,
                            backend, tolerances, prescale=None, fp32_logits=False):
    """kdfast's outputs and combined gradients against the peer's float32 reference at `tolerances`; `prescale`
    maps hidden to what kdfast is given (the per-token temperature's hidden / T_i)."""
    given = prescale(hidden) if prescale is not None else hidden
    logprobs, entropy = kdfast_outputs(given, weight, labels, kdfast_temperature, backend, fp32_logits=fp32_logits)
    found = (logprobs, entropy, *combined_grads(logprobs, entropy, hidden, weight, g_entropy, g_logprobs))
    ref_logprobs, ref_entropy = reference(hidden, weight, labels, temperature)
    expected = (ref_logprobs, ref_entropy,
                *combined_grads(ref_logprobs, ref_entropy, hidden, weight, g_entropy, g_logprobs))
    truth = float64_truth(hidden, weight, labels, temperature, g_entropy, g_logprobs)
    names = (("log-probs", "logprobs"), ("entropy", "entropy"), ("d hidden", "grads"), ("d weight", "grads"))
    for (name, key), mine, theirs, exact in zip(names, found, expected, truth):
        assert mine.dtype == theirs.dtype, name
        assert_close(name, mine.cpu(), theirs.cpu(), tolerances[key], exact.cpu())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", range(len(CPU_SHAPES)))
def test_verify_correctness(case, dtype, backend):
    """verify_correctness: T = 1.5, one backward of (entropy, log-probs) with the peer's random upstreams. The peer's
    kernel keeps its tiles' logits in float32: kdfast's `fp32_logits=True`."""
    inputs = peer_inputs(*CPU_SHAPES[case], dtype, seed=case, device=device_for(backend))
    check_against_reference(*inputs, TEMPERATURE, TEMPERATURE, backend, TOLERANCES[dtype], fp32_logits=True)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bf16_logits_rounded_by_default_miss_the_peers_tolerance(backend):
    """Without `fp32_logits` kdfast rounds each chunk's logits to bf16 (TRL's rounding): at the first shape's logit
    size (|z / T| up to ~16) that moves the log-probs by about 0.02, past the peer's 1e-3."""
    inputs = peer_inputs(*CPU_SHAPES[0], torch.bfloat16, seed=0, device=device_for(backend))
    with pytest.raises(AssertionError, match="log-probs"):
        check_against_reference(*inputs, TEMPERATURE, TEMPERATURE, backend, TOLERANCES[torch.bfloat16])


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_verify_correctness_triton():
    """The third shape's cut (hidden 2048, vocab 504) with 16 tokens, for the Triton interpreter."""
    inputs = peer_inputs(16, *CPU_SHAPES[2][1:], torch.float32, seed=2, device=device_for("triton"))
    check_against_reference(*inputs, TEMPERATURE, TEMPERATURE, "triton", TOLERANCES[torch.float32])


# Every vocab and dtype on the fast backends; the Triton interpreter the peer's non-divisible vocab in float32.
PADDING_CASES = [(vocab, dtype, backend) for backend in FAST_BACKENDS for dtype in (torch.bfloat16, torch.float32)
                 for vocab in (152064, 149 * 1024, 151937)]
PADDING_CASES += [(152064, torch.float32, "triton")] if "triton" in BACKENDS else []
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.mark.parametrize("vocab,dtype,backend", PADDING_CASES, ids=lambda v: DTYPE_IDS.get(v, str(v)))
def test_non_divisible_vocab_padding(vocab, dtype, backend):
    """test_lce_non_divisible_vocab_padding: every token's logit 3 at label 0, -15 elsewhere (after T = 1.5); mass
    from beyond the vocabulary would move log q by ~0.8. 152064 % 1024 = 512, 149 * 1024 the control; 151937 is odd.
    The logits are exact in bf16 too."""
    tokens, hidden_size, device = 8, 64, device_for(backend)
    weight = torch.zeros(vocab, hidden_size, dtype=dtype)
    weight[:, 0] = -15.0 * TEMPERATURE
    weight[0, 0] = 3.0 * TEMPERATURE
    hidden = torch.zeros(1, tokens, hidden_size, dtype=dtype)
    hidden[..., 0] = 1.0
    labels = torch.zeros(1, tokens, dtype=torch.long)
    logprobs, entropy = kdfast_outputs(hidden.to(device), weight.to(device), labels.to(device), TEMPERATURE, backend)
    ref_logprobs, ref_entropy = reference(hidden, weight, labels, TEMPERATURE)
    assert_close("log-probs", logprobs.cpu(), ref_logprobs, (1e-3, 1e-3))
    assert_close("entropy", entropy.cpu(), ref_entropy, (1e-3, 1e-3))


def per_token_prescale(temperatures):
    """The peer kernel's per-token temperature: hidden / T_i in float32, rounded back to the input dtype."""
    return lambda hidden: (hidden.float() / temperatures[:, None]).to(hidden.dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_per_token_temperature_by_prescaled_hidden(dtype, backend):
    """verify_per_sample_correctness: temperatures uniform in [0.5, 2] per token against the float32 reference that
    divides each row's logits by its own; values and the combined gradients (through the prescale) at the peer's
    tolerances."""
    device = device_for(backend)
    hidden, weight, labels, g_entropy, g_logprobs = peer_inputs(*CPU_SHAPES[2], dtype, seed=7, device=device)
    temperatures = uniform((hidden.shape[1],), 0.5, 2.0, torch.Generator().manual_seed(8)).to(device)
    check_against_reference(hidden, weight, labels, g_entropy, g_logprobs, temperatures, 1.0, backend,
                            PER_TOKEN_TOLERANCES[dtype], prescale=per_token_prescale(temperatures))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_uniform_prescale_matches_scalar_temperature(dtype, backend):
    """verify_uniform_tensor_matches_scalar: every token at T = 1.5 by the prescale equals the number 1.5, to the
    peer's tolerances (the kernel's in bf16, where the prescale rounds hidden once more; its fused path's in
    float32). kdfast itself takes no tensor temperature: it refuses one, naming the argument."""
    device = device_for(backend)
    hidden, weight, labels, *_ = peer_inputs(*CPU_SHAPES[2], dtype, seed=9, device=device)
    with torch.no_grad():
        scalar = kdfast_outputs(hidden, weight, labels, TEMPERATURE, backend)
        uniform_t = torch.full((hidden.shape[1],), TEMPERATURE, device=device)
        prescaled = kdfast_outputs(per_token_prescale(uniform_t)(hidden), weight, labels, 1.0, backend)
    tolerances = PER_TOKEN_TOLERANCES[dtype]
    assert_close("log-probs", prescaled[0], scalar[0], tolerances["logprobs"])
    assert_close("entropy", prescaled[1], scalar[1], tolerances["entropy"])
    with pytest.raises(ValueError, match="temperature"):
        kdfast.linear_token_logprobs(hidden, weight, labels, temperature=uniform_t, backend=backend)


def cann_inputs(tokens, hidden_size, vocab, seed, device):
    """test_cann_linear_ce_on_cpu's draws: float32 hidden and head uniform in [-0.5, 0.5], the upstreams g_logprobs
    in [-1, 1] and g_entropy in [-0.5, 0.5]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = uniform((tokens, hidden_size), -0.5, 0.5, generator).to(device).requires_grad_()
    weight = uniform((vocab, hidden_size), -0.5, 0.5, generator).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    g_logprobs = uniform((tokens,), -1.0, 1.0, generator).to(device)
    g_entropy = uniform((tokens,), -0.5, 0.5, generator).to(device)
    return hidden, weight, labels, g_logprobs, g_entropy


# 24 rows in three chunks or one (the peer's vocab of 96 in tiles of 32, or one of 128 or 2048); Triton: one setting.
CHUNKED_CASES = [(chunk_size, temperature, backend) for backend in FAST_BACKENDS for temperature in (1.0, 1.5)
                 for chunk_size in (8, "auto")]
CHUNKED_CASES += [(8, 1.5, "triton")] if "triton" in BACKENDS else []


@pytest.mark.parametrize("chunk_size,temperature,backend", CHUNKED_CASES)
def test_chunked_backward(chunk_size, temperature, backend):
    """test_chunked_ce_entropy_backward_matches_torch: 24 tokens, hidden 64, vocab 96; d hidden and d weight of the
    combined backward against float32 autograd through matmul, CE and entropy at 1e-4."""
    hidden, weight, labels, g_logprobs, g_entropy = cann_inputs(24, 64, 96, 0, device_for(backend))
    logprobs, entropy = kdfast_outputs(hidden, weight, labels, temperature, backend, chunk_size)
    found = combined_grads(logprobs, entropy, hidden, weight, g_entropy, g_logprobs)
    expected = combined_grads(*reference(hidden, weight, labels, temperature), hidden, weight, g_entropy, g_logprobs)
    for name, mine, theirs in zip(("d hidden", "d weight"), found, expected):
        assert_close(name, mine, theirs, (1e-4, 1e-4))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("form", ["logprobs-alone", "zero-entropy-upstream"])
def test_logprobs_only_backward(form, backend):
    """test_chunked_ce_entropy_backward_ce_only_matches_torch: 16 tokens, hidden 48, vocab 64, T = 1, the entropy's
    upstream zero (the peer's form), or the log-probs asked for alone; rows in chunks of 6 (the peer: vocab by 40)."""
    hidden, weight, labels, g_logprobs, _ = cann_inputs(16, 48, 64, 1, device_for(backend))
    if form == "logprobs-alone":
        logprobs = kdfast.linear_token_logprobs(hidden, weight, labels, chunk_size=6, backend=backend)
        found = torch.autograd.grad(logprobs, (hidden, weight), g_logprobs)
    else:
        logprobs, entropy = kdfast_outputs(hidden, weight, labels, 1.0, backend, chunk_size=6)
        found = combined_grads(logprobs, entropy, hidden, weight, torch.zeros_like(g_logprobs), g_logprobs)
    expected = torch.autograd.grad(reference(hidden, weight, labels, 1.0)[0], (hidden, weight), g_logprobs)
    for name, mine, theirs in zip(("d hidden", "d weight"), found, expected):
        assert_close(name, mine, theirs, (1e-4, 1e-4))


def sum_sq_probs(logits, backend="auto"):
    """sum q^2 per row from kdfast's log_sum_sq_probs, the logits passed as hidden states of an identity head."""
    vocab = logits.shape[-1]
    token_ids = torch.zeros(logits.shape[:-1], dtype=torch.long)
    _, _, metrics = linear_token_outputs(logits, torch.eye(vocab), token_ids, metrics=("log_sum_sq_probs",),
                                         backend=backend)
    return metrics["log_sum_sq_probs"].double().exp()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(8, 17), (3, 5, 32), (1, 1024)])
def test_sum_pi_squared(shape, backend):
    """test_calculate_sum_pi_squared_from_logits (float32; randn * 5 logits): against softmax squared and summed,
    at 1e-5, and inside (0, 1]."""
    torch.manual_seed(0)
    logits = torch.randn(*shape) * 5.0
    found = sum_sq_probs(logits, backend)
    expected = torch.softmax(logits.double(), dim=-1).pow(2).sum(dim=-1)
    assert found.shape == expected.shape
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
    assert bool((found > 0).all()) and bool((found <= 1.0 + 1e-5).all())


def test_sum_pi_squared_extreme_values():
    """test_calculate_sum_pi_squared_from_logits_extreme_values: logits of +-1000 stay finite. The peer asks 1e-10 of
    float64 inputs, which kdfast refuses; in float32 a log-sum-exp near 1000 is stored to 2^-24 * 1000, twice that in
    log sum q^2 (the peer's own exp(lse(2z) - 2 lse(z)) in float32 is 3.9e-5 off here, kdfast 1.3e-5)."""
    logits = torch.tensor([[1000.0, 1001.0, 999.0], [-1000.0, -999.0, -998.0]])
    found = sum_sq_probs(logits)
    assert bool(torch.isfinite(found).all())
    torch.testing.assert_close(found, torch.softmax(logits.double(), dim=-1).pow(2).sum(-1), atol=0,
                               rtol=2 * 1001 * 2.0**-24)


def topk_inputs(batch, tokens, vocab, k, seed, identity_head):
    """The peer's randn logits [B, T, V] and ids [B, T, K]: with `identity_head` the logits are the hidden states of an
    identity head; otherwise hidden [B, T, 16] and a head scaled so that the logits are again ~N(0, 1)."""
    torch.manual_seed(seed)
    if identity_head:
        hidden, weight = torch.randn(batch, tokens, vocab), torch.eye(vocab)
    else:
        hidden, weight = torch.randn(batch, tokens, 16), torch.randn(vocab, 16) / 4.0
    return hidden, weight, torch.randint(0, vocab, (batch, tokens, k))


def topk_logprobs(hidden, weight, ids, chunk_size="auto"):
    """log q at each of a row's K ids: the row's hidden state once per id."""
    repeated = hidden.unsqueeze(-2).expand(*ids.shape, hidden.shape[-1])
    return kdfast.linear_token_logprobs(repeated, weight, ids, chunk_size=chunk_size)


def topk_reference(hidden, weight, ids):
    logits = hidden.double() @ weight.double().T
    return torch.log_softmax(logits, dim=-1).gather(-1, ids)


# (B, T, V, K): the peer's (2, 16, 128, 4) as is; (2, 32, 152064, 8) and (2, 32, 152064, 64) with fewer tokens.
@pytest.mark.parametrize("batch,tokens,vocab,k", [(2, 16, 128, 4), (1, 8, 152064, 8), (1, 4, 152064, 64)])
def test_topk_logprobs_numerical_equivalence(batch, tokens, vocab, k):
    """test_numerical_equivalence: log_softmax gathered at the ids, 5e-6."""
    hidden, weight, ids = topk_inputs(batch, tokens, vocab, k, 42, identity_head=vocab <= 1024)
    found = topk_logprobs(hidden, weight, ids)
    assert found.shape == (batch, tokens, k) and found.dtype == torch.float32
    assert (found.double() - topk_reference(hidden, weight, ids)).abs().max().item() <= 5e-6


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 99999999])
def test_topk_logprobs_chunk_size_invariance(chunk_size):
    """test_chunk_size_invariance: (2, 64, 152064, 32) cut to (1, 4, 152064, 8), 32 rows; kdfast's chunks are rows
    (one per chunk, seven chunks of 5 or fewer, all in one) against a single chunk, 5e-6."""
    hidden, weight, ids = topk_inputs(1, 4, 152064, 8, 123, identity_head=False)
    single = topk_logprobs(hidden, weight, ids, chunk_size=99999999)
    assert (topk_logprobs(hidden, weight, ids, chunk_size) - single).abs().max().item() <= 5e-6


@pytest.mark.parametrize("head_learns", [False, True])
def test_topk_logprobs_gradient(head_learns):
    """test_gradient_correctness (2, 16, 1024, 8), rows in chunks of 4: the gradient of the sum into the logits (the
    identity head's hidden states) within 1e-5 of the reference's; with test_gradient_flows_through_slice_assignment's
    checks (an output tracked by autograd, a finite non-zero gradient). A frozen head takes kdfast's two-GEMM path."""
    hidden, weight, ids = topk_inputs(2, 16, 1024, 8, 7, identity_head=True)
    ours = hidden.clone().requires_grad_()
    theirs = hidden.double().requires_grad_()
    weight = weight.clone().requires_grad_(head_learns)
    found = topk_logprobs(ours, weight, ids, chunk_size=4)
    assert not found.is_leaf and found.requires_grad
    expected = torch.log_softmax(theirs, dim=-1).gather(-1, ids)
    assert (found.double() - expected).abs().max().item() <= 5e-6
    found.sum().backward()
    expected.sum().backward()
    assert bool(torch.isfinite(ours.grad).all()) and bool((ours.grad.abs() > 0).any())
    assert (ours.grad.double() - theirs.grad).abs().max().item() <= 1e-5
    if head_learns:  # d W = d logits^T hidden, the identity head's own gradient
        torch.testing.assert_close(weight.grad.double(), theirs.grad.reshape(-1, 1024).T @ hidden.reshape(-1, 1024)
                                   .double(), atol=1e-4, rtol=1e-5)


def test_topk_logprobs_small_chunk_and_empty_input():
    """test_handles_small_chunk_size ((1, 1, 100, 5), one row per chunk) and test_empty_input (no tokens: [0, 0, K]
    float32)."""
    hidden, weight, ids = topk_inputs(1, 1, 100, 5, 0, identity_head=True)
    found = topk_logprobs(hidden, weight, ids, chunk_size=1)
    assert (found.double() - topk_reference(hidden, weight, ids)).abs().max().item() <= 5e-6
    empty = topk_logprobs(torch.empty(0, 0, 1024), torch.eye(1024), torch.empty(0, 0, 8, dtype=torch.long))
    assert empty.shape == (0, 0, 8) and empty.dtype == torch.float32
