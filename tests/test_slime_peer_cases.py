"""slime's (THUDM/slime) CPU tests of its fused per-token log-prob and entropy calculation
(`calculate_log_probs_and_entropy(logits, tokens, tp_group, with_entropy, chunk_size, log_prob_keep_mask)`,
slime/utils/ppo_utils.py), tests/test_ppo_logprob_entropy.py, their inputs and expectations run on kdfast.

What slime computes: per row, log q(token) and (with_entropy) the entropy of q = softmax(logits), at T = 1. With a
keep mask (an engine's top-p set replayed) the log-prob's softmax runs over the kept columns and the token's own,
the others at -inf, while the entropy stays the full row's. The gradient of sum(w_lp * log-prob) + sum(w_H *
entropy) with its weights [0.25, -0.5, 1.5] and [0.55, -0.2, 1.8] (and -0.75, 0.4 on the 4-row vocab-parallel
input). kdfast's two counterparts:
- `linear_token_logprobs(hidden, eye(V), tokens, return_entropy=True)`, the fused per-token log-prob kernel, with an
  identity head so that the hidden states are the logits and d hidden is the peer's d logits; the masked log-probs
  take a second call on the logits with the masked columns at -1e30 (-inf would meet the identity head's zeros in
  the GEMM, NaN; exp(-1e30 - max) is 0 in float32 as exp(-inf) is), the entropy the unmasked call's. The peer's
  chunk_size splits the rows (-1: one chunk), as kdfast's does: -1 is kdfast's "auto" (one chunk at these sizes).
- the logits form `distill_loss(..., kd_weight=0, ce_weight=1, reduction="none")`, whose per-row CE is -log q(token)
  (it takes the peer's -inf as it is), and H(q) = log V - KL(q || uniform), its reverse KL against a teacher of zero
  logits, differentiable; the vocab-parallel cases below run on it with a vocab-sharded process group (and on the
  fused kernel's vocab-parallel form, `linear_token_logprobs(process_group=...)`, in
  tests/test_token_logprobs_vocab_parallel_peer_cases.py).

Ported:
- test_calculate_log_probs_and_entropy_matches_unfused_reference_single_rank (chunk_size -1, 1, 2, 8 x keep mask x
  entropy, the peer's [3, 4] logits and tokens [3, 0, 1] whose mask leaves out the token on two rows):
  `test_single_rank_linear` on every CPU backend (the Triton interpreter on the chunkless cases), and the same without
  the chunk axis in the logits form, `test_single_rank_logits`.
- ..._handles_empty_input: `test_empty_input` (no rows: log-probs and entropy of shape (0,)).
- ..._matches_unfused_reference_vocab_parallel (2 ranks on gloo, vocabulary 6 in two equal shards, its four
  parametrised cases): the logits form with `process_group`, each rank's shard of the logits (and of the mask),
  `test_vocab_parallel`. kdfast's logits form has no row chunks: the peer's chunk_size axis leaves its call as is
  (tests/test_token_logprobs_vocab_parallel_peer_cases.py runs these cases, chunks included, on the fused kernel).
  kdfast's addition, `kdfast_whole_shard_masked`: a keep mask that leaves one rank's whole shard of a row at -inf
  (the top-p set and the token all on the other rank), which the peer's mask never does; that rank's share of the
  row's normaliser is then 0 (its log-sum-exp -inf), and log-probs, entropy and gradient are still float64's.

Tolerance: the peer asserts atol 1e-8, rtol 0 against a float32 reference that repeats its own reduction order,
below a float32 rounding of its values (up to ~4). kdfast's order is its own, so it is held to the peer's formula in
float64 within 1e-6 (a few float32 units in the last place), loss and gradient.

Left out: tests/test_ppo_logprob_entropy_gpu.py (the same function against Megatron's fused vocab-parallel CE on
CUDA, its TP=2 case on two GPUs: needs Megatron-LM, its expectations are Megatron's). slime's on-policy distillation
(slime/rollout/on_policy_distillation.py, the OPD KL penalty in its advantages) has no unit test, only an end-to-end
run (tests/test_qwen2.5_0.5B_opd_sglang.py: a model, SGLang and GPUs). The policy-loss, KL-metric and CP-invariance
tests take per-token log-probs, no logits."""

import math

import pytest
import torch
import torch.distributed as dist
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases

import kdfast

ATOL = 1e-6
LINEAR_MASKED = -1e30  # the identity head's stand-in for -inf (module docstring)
CHUNKS = {-1: "auto", 1: 1, 2: 2, 8: 8}  # the peer's chunk_size -> kdfast's (rows per chunk)
CPU_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]
FAST_BACKENDS = [backend for backend in CPU_BACKENDS if backend != "triton"]

SINGLE_LOGITS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 0.5, 2.0], [-1.0, 3.0, 2.0, 0.0]])
SINGLE_MASK = torch.tensor([[False, True, True, False],  # the token, 3, left out
                            [False, True, False, True],  # the token, 0, left out
                            [True, True, False, False]])
SINGLE_TOKENS = torch.tensor([3, 0, 1])
SINGLE_WEIGHTS = (torch.tensor([0.25, -0.5, 1.5]), torch.tensor([0.55, -0.2, 1.8]))  # (log-prob, entropy)

VP_WORLD = 2
VP_LOGITS = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5, -1.0],
                          [4.0, 1.0, 0.5, 2.0, 3.0, 0.0],
                          [-1.0, 3.0, 2.0, 0.0, 1.0, 5.0],
                          [0.2, -0.4, 1.7, -2.0, 3.3, 0.0]])
VP_MASK = torch.tensor([[False, True, False, True, False, False],  # token 5 left out
                        [False, True, False, False, True, False],  # token 0 left out
                        [True, False, True, False, False, True],  # token 3 left out
                        [False, True, False, True, False, False]])  # token 2 left out
VP_TOKENS = torch.tensor([5, 0, 3, 2])
# kdfast's addition: a top-p set inside one rank's shard leaves every column of the other rank's shard at -inf (rows 0
# and 1: rank 0's, rows 2 and 3: rank 1's), so that rank's log-sum-exp of the row is -inf.
VP_WHOLE_SHARD_MASK = torch.tensor([[False, False, False, True, True, False],
                                    [False, False, False, False, True, True],
                                    [True, True, False, False, False, False],
                                    [False, True, False, False, False, False]])
VP_WHOLE_SHARD_TOKENS = torch.tensor([5, 4, 0, 2])
VP_WEIGHTS = (torch.tensor([0.25, -0.5, 1.5, -0.75]), torch.tensor([0.55, -0.2, 1.8, 0.4]))


def log_prob_logits(logits, tokens, mask, fill):
    """The peer's masked logits: the left-out columns at `fill`, the token's own column always kept."""
    if mask is None:
        return logits
    keep = mask.clone()
    keep[torch.arange(tokens.numel()), tokens] = True
    return logits.masked_fill(~keep, fill)


def reference64(logits, tokens, mask, with_entropy, weights):
    """The peer's expectations in float64: (log-probs, entropy or None, d logits of the weighted sum)."""
    leaf = logits.double().requires_grad_(True)
    log_q = torch.log_softmax(log_prob_logits(leaf, tokens, mask, float("-inf")), -1)
    log_probs = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    total = (log_probs * weights[0].double()).sum()
    entropy = None
    if with_entropy:
        full = torch.log_softmax(leaf, -1)
        entropy = -(full.exp() * full).sum(-1)
        total = total + (entropy * weights[1].double()).sum()
    total.backward()
    return log_probs.detach(), None if entropy is None else entropy.detach(), leaf.grad


def close(what, found, expected):
    torch.testing.assert_close(found.double().cpu(), expected.cpu(), atol=ATOL, rtol=0,
                               msg=lambda message: f"{what}: {message}")


def check(found, logits, tokens, mask, with_entropy, weights):
    """kdfast's (log-probs, entropy or None) of `logits` (a leaf) against the peer's, with the weighted gradient."""
    log_probs, entropy = found
    assert log_probs.shape == tokens.shape and log_probs.dtype == torch.float32
    total = (log_probs * weights[0].to(log_probs.device)).sum()
    if with_entropy:
        total = total + (entropy * weights[1].to(entropy.device)).sum()
    total.backward()
    expected_log_probs, expected_entropy, expected_grad = reference64(logits.detach().cpu(), tokens.cpu(), mask,
                                                                      with_entropy, weights)
    close("log-probs", log_probs.detach(), expected_log_probs)
    if with_entropy:
        close("entropy", entropy.detach(), expected_entropy)
    close("d logits", logits.grad, expected_grad)


def linear_outputs(logits, tokens, mask, with_entropy, chunk_size, backend):
    """The fused kernel with an identity head: the log-probs of the masked logits, the entropy of the full ones."""
    eye = torch.eye(logits.shape[-1], device=logits.device)
    settings = dict(chunk_size=chunk_size, backend=backend)
    if mask is None and with_entropy:
        return kdfast.linear_token_logprobs(logits, eye, tokens, return_entropy=True, **settings)
    masked = log_prob_logits(logits, tokens, None if mask is None else mask.to(logits.device), LINEAR_MASKED)
    log_probs = kdfast.linear_token_logprobs(masked, eye, tokens, **settings)
    entropy = None
    if with_entropy:
        entropy = kdfast.linear_token_logprobs(logits, eye, tokens, return_entropy=True, **settings)[1]
    return log_probs, entropy


def logits_form_outputs(logits, tokens, mask, with_entropy, **settings):
    """The logits form: -CE per row on the masked logits (the peer's -inf kept), log V - KL(q || uniform)."""
    masked = log_prob_logits(logits, tokens, mask, float("-inf"))
    ce = kdfast.distill_loss(masked, masked.detach(), tokens, kd_weight=0.0, ce_weight=1.0, reduction="none",
                             **settings)
    entropy = None
    if with_entropy:
        kl = kdfast.distill_loss(logits, torch.zeros_like(logits.detach()), None, divergence="reverse_kl",
                                 reduction="none", **settings)
        entropy = math.log(logits.shape[-1]) - kl
    return -ce, entropy


SINGLE_CASES = [(chunk, masked, with_entropy, backend) for backend in CPU_BACKENDS for chunk in CHUNKS
                for masked in (False, True) for with_entropy in (False, True)
                if backend != "triton" or chunk == -1]  # the interpreter: the chunkless cases


@pytest.mark.parametrize("chunk,masked,with_entropy,backend", SINGLE_CASES,
                         ids=lambda v: {False: "-", True: "+"}.get(v, str(v)) if isinstance(v, bool) else str(v))
def test_single_rank_linear(chunk, masked, with_entropy, backend):
    """..._single_rank on the fused per-token kernel (ids: chunk, +/- mask, +/- entropy, backend)."""
    device = device_for(backend)
    logits = SINGLE_LOGITS.clone().to(device).requires_grad_(True)
    mask = SINGLE_MASK if masked else None
    found = linear_outputs(logits, SINGLE_TOKENS.to(device), mask, with_entropy, CHUNKS[chunk], backend)
    check(found, logits, SINGLE_TOKENS.to(device), mask, with_entropy, SINGLE_WEIGHTS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["no_entropy", "entropy"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_single_rank_logits(masked, with_entropy, backend):
    """..._single_rank on the logits form (its rows are not chunked)."""
    device = device_for(backend)
    logits = SINGLE_LOGITS.clone().to(device).requires_grad_(True)
    tokens = SINGLE_TOKENS.to(device)
    mask = SINGLE_MASK.to(device) if masked else None
    found = logits_form_outputs(logits, tokens, mask, with_entropy, backend=backend)
    check(found, logits, tokens, SINGLE_MASK if masked else None, with_entropy, SINGLE_WEIGHTS)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["no_entropy", "entropy"])
def test_empty_input(with_entropy, backend):
    """..._handles_empty_input: logits [0, 4], chunk_size 2: log-probs (and entropy) of shape (0,)."""
    logits = torch.empty((0, 4), requires_grad=True)
    tokens = torch.empty((0,), dtype=torch.long)
    outputs = kdfast.linear_token_logprobs(logits, torch.eye(4), tokens, return_entropy=with_entropy, chunk_size=2,
                                           backend=backend)
    log_probs, entropy = outputs if with_entropy else (outputs, None)
    assert log_probs.shape == (0,)
    if with_entropy:
        assert entropy.shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# ..._matches_unfused_reference_vocab_parallel: 2 ranks, each its half of the vocabulary.
# ---------------------------------------------------------------------------------------------------------------

VP_CASES = {"unmasked_entropy_no_chunks": (False, True), "masked_entropy_chunks": (True, True),
            "masked_logprob_only_no_chunks": (True, False), "unmasked_logprob_only_chunks": (False, False),
            "kdfast_whole_shard_masked": ("whole_shard", True)}


def vp_case(masked, with_entropy, backend):
    rank, world = dist.get_rank(), dist.get_world_size()
    mask, tokens = (VP_WHOLE_SHARD_MASK, VP_WHOLE_SHARD_TOKENS) if masked == "whole_shard" else (VP_MASK, VP_TOKENS)
    per_rank = VP_LOGITS.shape[-1] // world
    start, stop = rank * per_rank, (rank + 1) * per_rank
    local = VP_LOGITS[:, start:stop].clone().requires_grad_(True)
    local_mask = None
    if masked:  # the token's own column is kept on the rank that holds it: completed on the full row, then sharded
        keep = mask.clone()
        keep[torch.arange(tokens.numel()), tokens] = True
        local_mask = keep[:, start:stop]
    masked_local = local if local_mask is None else local.masked_fill(~local_mask, float("-inf"))
    settings = dict(process_group=dist.group.WORLD, vocab_range=(start, stop), backend=backend)
    ce = kdfast.distill_loss(masked_local, masked_local.detach(), tokens, kd_weight=0.0, ce_weight=1.0,
                             reduction="none", **settings)
    found_entropy = None
    if with_entropy:
        kl = kdfast.distill_loss(local, torch.zeros_like(local.detach()), None, divergence="reverse_kl",
                                 reduction="none", **settings)
        found_entropy = math.log(VP_LOGITS.shape[-1]) - kl
    log_probs = -ce
    total = (log_probs * VP_WEIGHTS[0]).sum()
    if with_entropy:
        total = total + (found_entropy * VP_WEIGHTS[1]).sum()
    total.backward()
    expected_log_probs, expected_entropy, expected_grad = reference64(VP_LOGITS, tokens, mask if masked else None,
                                                                      with_entropy, VP_WEIGHTS)
    close("log-probs", log_probs.detach(), expected_log_probs)
    if with_entropy:
        close("entropy", found_entropy.detach(), expected_entropy)
    close("d logits shard", local.grad, expected_grad[:, start:stop])


def vp_cases() -> dict:
    return {f"{name}-{backend}": (masked, with_entropy, backend) for backend in FAST_BACKENDS
            for name, (masked, with_entropy) in VP_CASES.items()}


def vp_cases_to_run() -> dict:
    return {name: (vp_case, *args) for name, args in vp_cases().items()}


@pytest.fixture(scope="module")
def vp_outcomes(tmp_path_factory):
    return spawn_gloo_cases(vp_cases_to_run, VP_WORLD, tmp_path_factory.mktemp("slime_vocab_parallel"))


@pytest.mark.parametrize("case", list(vp_cases()))
def test_vocab_parallel(vp_outcomes, case):
    failed = failures(vp_outcomes, case)
    assert not failed, failed
