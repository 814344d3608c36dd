"""The peers' tensor-parallel (vocab-parallel) per-token log-prob and entropy tests, run on
`kdfast.linear_token_logprobs(..., process_group=...)`: each rank holds its rows of the head, the hidden states and
token ids are the same on every rank. The peers ran them on torchrun/NCCL or spawned gloo ranks; here every case runs
on gloo ranks on the CPU (tests/rank_cases.py), 2 ranks, and AReaL's also on 4 as its test does. Each case holds
kdfast to the peer's own reference computation (float32, as the peer writes it) at the peer's tolerances, and to the
same computation in float64. Backends: PyTorch and C++; the Triton interpreter (slow) on one small case a peer.
Where the peer's logits come without a head, the head is an identity's rows [start, stop) and the hidden states are
the whole logits (the same on every rank): this rank's logits are then exactly the peer's shard, and with
`reduce_hidden_grad=False` this rank's d hidden is the peer's d logits shard in its columns, zeros elsewhere.

verl, tests/utils/test_special_linear_cross_entropy_tp.py (its fused `linear_cross_entropy(hidden, weight, labels,
T, "none", tp_group)`), against the peer's TP torch reference (`TorchEntropyTP`: logits all-gathered, float32). The
peer all-reduces each rank's bf16 d hidden outside its kernel; here kdfast sums the ranks' float32 parts (its default)
and the reference sums its parts before the cast to bf16 (`verl_tp_reference` says why):
- verify_all_negative_logits (32 tokens, hidden 128, 1153 rows a rank, bf16, every logit near -334, the ranks'
  shards offset by 0.25, labels over every rank, linspace upstreams): `verl-all_negative_logits-*`, its sizes kept.
  The peer's kernel keeps its tiles' logits in float32 (a bf16 logit at 334 is off by up to 1): `fp32_logits=True`.
- verify_kernel_correctness (its five model shapes, bf16, T = 1.5, upstreams g_entropy in [-0.5, 0.5] and
  g_logprobs in [-1, 1]): `verl-verify_kernel_correctness-*`, the hidden sizes kept, the tokens cut 16-fold and the
  rows a rank 64-fold as tests/test_verl_peer_cases.py cuts them, one draw rather than five. Hidden states, labels and
  upstreams are drawn alike on every rank (the peer broadcasts rank 0's), each rank's shard from a seed of its own (the
  peer's per-rank seed). The peer draws its labels below its per-rank vocab_size, so every token lies in rank 0's
  shard; kept (the all-negative case spreads them). Its tolerances (log-probs atol 1e-1, rtol 1e-2; gradients 2e-2,
  4e-2) are loose: float64 holds kdfast to those the peer's single-rank test holds its kernel to.
- Left out: verify_torch_itself (the peer's TP torch reference against its own single-rank one) and the storage and
  latency checks (printed, never asserted).

slime, tests/test_ppo_logprob_entropy.py, ..._matches_unfused_reference_vocab_parallel (2 ranks, vocabulary 6 in two
equal shards, its four cases of keep mask x entropy x chunk_size -1 or 2, its weights of log-probs and entropy):
`slime-*`, through the fused kernel with the identity head, the row chunks of 2 as the peer's (-1: "auto", one chunk).
As tests/test_slime_peer_cases.py does (which ran these cases through the logits form `distill_loss`): the masked
log-probs take a second call on logits masked at -1e30 (the identity head's stand-in for -inf), the entropy the
unmasked call's, expectations the peer's formulas in float64 within 1e-6 (the peer's own float32 reference repeats its
reduction order to 1e-8, which kdfast's order does not), and kdfast's whole-shard-masked case.

OpenRLHF, tests/loss_parallel/ (pull request 1176; tests/test_openrlhf_peer_cases.py ran these on `distill_loss`):
test_loss_parallel_compute_token_log_probs_sharded (T = 0.7, an ignored row whose log-prob is 0, upstream
linspace(0.3, 1.3)) and ..._compute_entropy_sharded (upstream linspace(0.1, 1.1)), its uneven shards (3, 2) of 5 as
`vocab_range`, `temperature=0.7` and `ignore_index=-100` as kdfast's own: `openrlhf-*`, at the peer's rtol 1e-5,
atol 1e-6. The entropy test has no labels: kdfast is given token 0 and its log-probs are not used.

AReaL: its vocab-parallel log-prob tests (inclusionAI/AReaL's areal/tests/torchrun/run_fsdp_vocab_parallel.py, and
areal-project/AReaL's tests/torchrun/run_vocab_parallel.py, which adds cases; torchrun on NCCL at 2 and 4 ranks),
each rank's equal shard left to kdfast's default `vocab_range`: `areal-*` at both world sizes.
- test_vocab_parallel_logprobs, ..._logprobs_entropy, ..._with_temperature (T = 0.7), ..._numerical_stability (logits
  x 100), ..._gradient and ..._gradient_correctness (sum of the log-probs, and of log-probs + entropy),
  ..._different_shapes ([T, V] and [B, S, V]): their shapes, seeds and tolerances, with the identity head. The seeds
  are the peer's, drawn on the CPU (the peer draws on its GPU: other numbers). test_vocab_parallel_gradient asserts only
  that a gradient of the right shape without NaN exists; here it is held to the reference as well.
- test_inplace_vocab_parallel_logprobs_entropy (13 tokens, vocabulary 3072, T = 0.7, chunks of 5, weighted log-probs,
  the entropy read only): kdfast's `entropy_grad=False` with a frozen head, its two-GEMM path. Left out: its counts of
  all-reduce calls and its in-place reuse of the logits' storage (the peer's implementation).
- test_chunked_lm_head_tensor_and_sequence_parallel (a bf16 head of 16 x 32 a rank, T = 0.7, chunks of 3, weighted
  log-probs, fp32 logits): `fp32_logits=True`. With sequence parallelism each rank holds its rows of the input: kdfast
  is given them all-gathered, and the peer's reduce-scatter of d input is this rank's rows of kdfast's summed d hidden.
  Without it the peer draws a different input on every rank (its seed is the rank's), which a TP head is never given:
  every rank takes rank 0's. d input: the peer's reference rounds d logits to bf16 and multiplies in bf16, up to 2%
  off float64 at rows that cancel, past its own 2e-5; kdfast's is held to float64 within half a bf16 unit (correctly
  rounded) instead. Log-probs, entropy and d weight at the peer's tolerances.
- tests/torchrun/run_lce_tp2.py, _test_tp2_correctness (2 ranks; a head and hidden states drawn randn x 0.02, the
  log-probs' sum + 0.5 x the entropy's, against the full head in float32): (128, 512, 8192) float32 as the peer, and
  (256, 1024, 32000) bf16 cut to 64 tokens for the CPU.
- Left out: run_vocab_parallel.py's tests of Megatron's ColumnParallelLinear swapped for AReaL's head (its outputs,
  no log-prob) and of its packed-gradient storage (an implementation's counters); _test_tp2_performance (timings)."""

import functools

import pytest
import test_openrlhf_peer_cases as openrlhf
import test_slime_peer_cases as slime
import test_verl_peer_cases as verl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases

import kdfast

WORLDS = (2, 4)
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors
FAST_BACKENDS = [backend for backend in VP_BACKENDS if backend != "triton"]
TRITON = [backend for backend in VP_BACKENDS if backend == "triton"]  # the interpreter: one small case a peer


def group():
    return dict(process_group=dist.group.WORLD)


def close(what, found, expected, atol, rtol):
    torch.testing.assert_close(found.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda message: f"{what}: {message}")


def equal_shard(vocab):
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank * (vocab // world), (rank + 1) * (vocab // world)


def columns_of(grad, start, stop):
    """This rank's columns of an identity head's d hidden (each rank's part, `reduce_hidden_grad=False`): the peer's
    d logits shard; the other columns must be 0."""
    outside = torch.ones(grad.shape[-1], dtype=torch.bool)
    outside[start:stop] = False
    assert bool((grad[..., outside] == 0).all()), "d hidden outside this rank's columns is not 0"
    return grad[..., start:stop]


# ---------------------------------------------------------------------------------------------------------------
# verl: tests/utils/test_special_linear_cross_entropy_tp.py
# ---------------------------------------------------------------------------------------------------------------

VERL_VALUES = (1e-1, 1e-2)  # verify_kernel_correctness's (atol, rtol) of log-probs and entropy
VERL_GRADS = (2e-2, 4e-2)  # and of the gradients (both of its tests)
VERL_NEGATIVE_VALUES = (1e-3, 1e-3)  # verify_all_negative_logits's


def verl_tp_reference(hidden, weight, labels, temperature, g_logprobs, g_entropy, precision):
    """The peer's TorchEntropyTP in `precision` (float32: the peer's; float64: the truth): this rank's logits
    all-gathered into whole rows and divided by T; log-probs -CE(labels), entropy logsumexp - sum q z; this rank's
    columns of d logits into d hidden and d weight (the leaves' dtype). The ranks' d hidden parts are summed before
    the cast: the peer's autograd casts each part to bf16 first, and in the all-negative case column 0 of d hidden is
    -334 x each rank's d-logit sum, parts of a hundred or more that cancel to near 0, where a bf16 part is up to half
    a unit (0.5) off. Summed in bf16 (the peer's reference; kdfast's `reduce_hidden_grad=False` parts all-reduced so),
    both were 0.5 off float64 at one element of 4096, 1.0 apart. kdfast's default sums float32 parts."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, head = hidden.reshape(-1, hidden.shape[-1]).to(precision), weight.to(precision)
    local = rows @ head.T
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    whole = torch.cat(parts, -1).requires_grad_(True)
    logits = whole / temperature
    entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    logprobs = -F.cross_entropy(logits, labels.reshape(-1), reduction="none")
    (d_whole,) = torch.autograd.grad((entropy, logprobs), whole, (g_entropy.to(precision), g_logprobs.to(precision)))
    d_local = d_whole[:, rank * head.shape[0]:(rank + 1) * head.shape[0]]
    d_hidden = d_local @ head
    dist.all_reduce(d_hidden)
    cast = hidden.dtype if precision == torch.float32 else precision
    return (logprobs.detach(), entropy.detach(), d_hidden.to(cast).view(hidden.shape),
            (d_local.T @ rows).to(cast))


def verl_kdfast(hidden, weight, labels, temperature, g_logprobs, g_entropy, backend):
    """The peer's kernel call and backward, on kdfast; d hidden summed over the ranks by kdfast (its default)."""
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logprobs, entropy = kdfast.linear_token_logprobs(hidden, weight, labels, temperature=temperature,
                                                     return_entropy=True, fp32_logits=True, backend=backend,
                                                     **group())
    logprobs, entropy = logprobs.reshape(-1), entropy.reshape(-1)  # the peer's outputs: one per token
    d_hidden, d_weight = verl.combined_grads(logprobs, entropy, hidden, weight, g_entropy, g_logprobs)
    return logprobs.detach(), entropy.detach(), d_hidden, d_weight


def verl_compare(found, peer, truth, values_tolerance, truth_tolerances):
    names = (("log-probs", "logprobs"), ("entropy", "entropy"), ("d hidden", "grads"), ("d weight", "grads"))
    for index, ((name, key), mine, theirs, exact) in enumerate(zip(names, found, peer, truth)):
        assert bool(mine.isfinite().all()), f"{name} is not finite"
        verl.assert_close(name, mine, theirs, values_tolerance if index < 2 else VERL_GRADS, exact)
        verl.assert_close(f"{name} against float64", mine.double(), exact, truth_tolerances[key])


def verl_all_negative_logits(backend):
    """Every logit -334 + linspace(-1, 1) (+ 0.25 on rank 1): a max reduction that starts at 0, or a rank's maximum
    taken for the row's, would show. Token t is id 137 t mod 2306 (both ranks')."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, hidden_size, local_vocab = 32, 128, 1153
    hidden = torch.zeros((1, tokens, hidden_size), dtype=torch.bfloat16)
    hidden[..., :2] = 1
    weight = torch.zeros((local_vocab, hidden_size), dtype=torch.bfloat16)
    weight[:, 0] = -334
    weight[:, 1] = torch.linspace(-1, 1, local_vocab, dtype=torch.bfloat16)
    weight[:, 1] += 0.25 * rank
    labels = (torch.arange(tokens) * 137 % (local_vocab * world)).unsqueeze(0)
    g_logprobs, g_entropy = torch.linspace(-0.5, 0.5, tokens), torch.linspace(0.5, -0.5, tokens)
    inputs = (hidden, weight, labels, 1.0, g_logprobs, g_entropy)
    peer = verl_tp_reference(*inputs, torch.float32)
    truth = verl_tp_reference(*inputs, torch.float64)
    found = verl_kdfast(*inputs, backend)
    verl_compare(found, peer, truth, VERL_NEGATIVE_VALUES, verl.TOLERANCES[torch.bfloat16])


@functools.cache
def verl_shape_case(index):
    """The inputs of shape `index`, the peer's reference and float64's (drawn once per rank, for every backend)."""
    tokens, hidden_size, local_vocab = verl.CPU_SHAPES[index]
    generator = torch.Generator().manual_seed(index)
    hidden = verl.uniform((1, tokens, hidden_size), -0.5, 0.5, generator, torch.bfloat16)
    labels = torch.randint(0, local_vocab, (1, tokens), generator=generator)
    g_entropy = verl.uniform((tokens,), -0.5, 0.5, generator, torch.bfloat16)
    g_logprobs = verl.uniform((tokens,), -1.0, 1.0, generator, torch.bfloat16)
    own = torch.Generator().manual_seed(1000 + 10 * index + dist.get_rank())
    weight = verl.uniform((local_vocab, hidden_size), -0.5, 0.5, own, torch.bfloat16)
    inputs = (hidden, weight, labels, verl.TEMPERATURE, g_logprobs, g_entropy)
    return inputs, verl_tp_reference(*inputs, torch.float32), verl_tp_reference(*inputs, torch.float64)


def verl_verify_kernel_correctness(index, backend):
    inputs, peer, truth = verl_shape_case(index)
    verl_compare(verl_kdfast(*inputs, backend), peer, truth, VERL_VALUES, verl.TOLERANCES[torch.bfloat16])


def verl_cases() -> dict:
    listed = {}
    for backend in FAST_BACKENDS + TRITON:
        listed[f"verl-all_negative_logits-{backend}"] = lambda b=backend: verl_all_negative_logits(b)
        if backend == "triton":
            continue  # the interpreter: the small case alone
        for index in range(len(verl.CPU_SHAPES)):
            listed[f"verl-verify_kernel_correctness-shape{index}-{backend}"] = (
                lambda i=index, b=backend: verl_verify_kernel_correctness(i, b))
    return listed


# ---------------------------------------------------------------------------------------------------------------
# slime: tests/test_ppo_logprob_entropy.py, ..._vocab_parallel
# ---------------------------------------------------------------------------------------------------------------

SLIME_CHUNKS = {"unmasked_entropy_no_chunks": "auto", "masked_entropy_chunks": 2,
                "masked_logprob_only_no_chunks": "auto", "unmasked_logprob_only_chunks": 2,
                "kdfast_whole_shard_masked": 2}


def slime_case(name, backend):
    masked, with_entropy = slime.VP_CASES[name]
    whole_shard = masked == "whole_shard"
    mask = slime.VP_WHOLE_SHARD_MASK if whole_shard else slime.VP_MASK if masked else None
    tokens = slime.VP_WHOLE_SHARD_TOKENS if whole_shard else slime.VP_TOKENS
    start, stop = equal_shard(slime.VP_LOGITS.shape[-1])
    head = torch.eye(slime.VP_LOGITS.shape[-1])[start:stop]
    logits = slime.VP_LOGITS.clone().requires_grad_(True)
    settings = dict(chunk_size=SLIME_CHUNKS[name], backend=backend, reduce_hidden_grad=False, **group())
    entropy = None
    if mask is None and with_entropy:
        log_probs, entropy = kdfast.linear_token_logprobs(logits, head, tokens, return_entropy=True, **settings)
    else:
        given = slime.log_prob_logits(logits, tokens, mask, slime.LINEAR_MASKED)
        log_probs = kdfast.linear_token_logprobs(given, head, tokens, **settings)
        if with_entropy:
            entropy = kdfast.linear_token_logprobs(logits, head, tokens, return_entropy=True, **settings)[1]
    total = (log_probs * slime.VP_WEIGHTS[0]).sum()
    if with_entropy:
        total = total + (entropy * slime.VP_WEIGHTS[1]).sum()
    total.backward()
    expected_log_probs, expected_entropy, expected_grad = slime.reference64(slime.VP_LOGITS, tokens, mask,
                                                                            with_entropy, slime.VP_WEIGHTS)
    slime.close("log-probs", log_probs.detach(), expected_log_probs)
    if with_entropy:
        slime.close("entropy", entropy.detach(), expected_entropy)
    slime.close("d logits shard", columns_of(logits.grad, start, stop), expected_grad[:, start:stop])


def slime_cases() -> dict:
    listed = {f"slime-{name}-{backend}": (lambda n=name, b=backend: slime_case(n, b))
              for backend in FAST_BACKENDS for name in SLIME_CHUNKS}
    listed.update({f"slime-masked_entropy_chunks-{backend}": lambda b=backend: slime_case("masked_entropy_chunks", b)
                   for backend in TRITON})
    return listed


# ---------------------------------------------------------------------------------------------------------------
# OpenRLHF: tests/loss_parallel/test_loss_parallel_compute_{token_log_probs,entropy}_sharded.py
# ---------------------------------------------------------------------------------------------------------------

def openrlhf_head():
    start, stop = openrlhf.SHARDS[dist.get_rank()]
    return torch.eye(openrlhf.VOCAB)[start:stop], dict(vocab_range=(start, stop), reduce_hidden_grad=False, **group())


def openrlhf_token_log_probs(backend):
    full, temperature = openrlhf.REFERENCE - 0.25, 0.7
    labels = torch.tensor([[0, 3, openrlhf.IGNORE], [4, 1, 2]])
    upstream = torch.linspace(0.3, 1.3, steps=labels.numel()).view_as(labels)
    head, settings = openrlhf_head()
    hidden = full.clone().requires_grad_(True)
    log_probs = kdfast.linear_token_logprobs(hidden, head, labels, temperature=temperature,
                                             ignore_index=openrlhf.IGNORE, backend=backend, **settings)
    (log_probs * upstream).sum().backward()
    assert log_probs[0, 2].item() == 0.0, "the ignored row's log-prob is 0"
    for precision in (torch.float32, torch.float64):  # the peer's _reference_token_log_probs, then float64
        reference = full.to(precision).clone().requires_grad_(True)
        log_q = torch.log_softmax(reference / temperature, -1)
        picked = log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected = torch.where(labels != openrlhf.IGNORE, picked, torch.zeros_like(picked))
        (expected * upstream.to(precision)).sum().backward()
        openrlhf.close(f"log-probs ({precision})", log_probs.detach(), expected.detach())
        openrlhf.close(f"d logits shard ({precision})", columns_of(hidden.grad, *settings["vocab_range"]),
                       openrlhf.shard_of(reference.grad, dist.get_rank()))


def openrlhf_entropy(backend):
    full = openrlhf.REFERENCE + 0.4
    upstream = torch.linspace(0.1, 1.1, steps=6).view(2, 3)
    head, settings = openrlhf_head()
    hidden = full.clone().requires_grad_(True)
    _, entropy = kdfast.linear_token_logprobs(hidden, head, torch.zeros(2, 3, dtype=torch.long), return_entropy=True,
                                              backend=backend, **settings)
    (entropy * upstream).sum().backward()
    for precision in (torch.float32, torch.float64):  # the peer's _reference_entropy, then float64
        reference = full.to(precision).clone().requires_grad_(True)
        expected = -(F.softmax(reference, -1) * F.log_softmax(reference, -1)).sum(-1)
        (expected * upstream.to(precision)).sum().backward()
        openrlhf.close(f"entropy ({precision})", entropy.detach(), expected.detach())
        openrlhf.close(f"d logits shard ({precision})", columns_of(hidden.grad, *settings["vocab_range"]),
                       openrlhf.shard_of(reference.grad, dist.get_rank()))


def openrlhf_cases() -> dict:
    listed = {}
    for backend in FAST_BACKENDS:
        listed[f"openrlhf-token_log_probs-{backend}"] = lambda b=backend: openrlhf_token_log_probs(b)
        listed[f"openrlhf-entropy-{backend}"] = lambda b=backend: openrlhf_entropy(b)
    listed.update({f"openrlhf-token_log_probs-{backend}": lambda b=backend: openrlhf_token_log_probs(b)
                   for backend in TRITON})
    return listed


# ---------------------------------------------------------------------------------------------------------------
# AReaL: tests/torchrun/run_vocab_parallel.py (run_fsdp_vocab_parallel.py before) and run_lce_tp2.py
# ---------------------------------------------------------------------------------------------------------------

def areal_logits(shape, seed, scale=1.0):
    """The peer's draw: torch.manual_seed(seed), randn(shape) (x scale), randint(0, V, shape[:-1])."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator) * scale
    return logits, torch.randint(0, shape[-1], shape[:-1], generator=generator)


def areal_reference(logits, labels, temperature=1.0):
    """The peer's reference_logprobs_entropy, in the dtype of `logits`."""
    log_q = torch.log_softmax(logits / temperature, -1)
    return log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_q.exp() * log_q).sum(-1)


def areal_identity_case(logits, labels, backend, tolerance, with_entropy=False, weights=None, temperature=1.0,
                        **settings):
    """kdfast on this rank's equal shard of an identity head (kdfast's default vocab_range); with `weights` (of the
    log-probs, and of the entropy or None: not differentiated) the backward, this rank's d logits against the
    reference's columns. `tolerance` (rtol, atol) holds against the peer's float32 reference and float64 alike."""
    start, stop = equal_shard(logits.shape[-1])
    hidden = logits.clone().requires_grad_(weights is not None)
    outputs = kdfast.linear_token_logprobs(hidden, torch.eye(logits.shape[-1])[start:stop], labels,
                                           temperature=temperature, return_entropy=with_entropy, backend=backend,
                                           reduce_hidden_grad=False, **group(), **settings)
    outputs = outputs if with_entropy else (outputs,)
    for name, value in zip(("log-probs", "entropy"), outputs):
        assert value.shape == labels.shape and bool(value.isfinite().all()), f"{name}: NaN or Inf, or wrong shape"
    if weights is not None:
        areal_weighted(outputs, weights).backward()
        assert hidden.grad is not None and bool(hidden.grad.isfinite().all()), "d logits: none, NaN or Inf"
    rtol, atol = tolerance
    for precision in (torch.float32, torch.float64):
        reference = logits.to(precision).clone().requires_grad_(weights is not None)
        expected = areal_reference(reference, labels, temperature)
        for name, value, wanted in zip(("log-probs", "entropy"), outputs, expected):
            close(f"{name} ({precision})", value.detach(), wanted.detach(), atol, rtol)
        if weights is not None:
            areal_weighted(expected, weights).backward()
            close(f"d logits shard ({precision})", columns_of(hidden.grad, start, stop),
                  reference.grad[..., start:stop], atol, rtol)


def areal_weighted(outputs, weights):
    """sum(w * log-probs) (+ sum(w_H * entropy)); a weight of 1 is the peer's .sum()."""
    total = (outputs[0] * weights[0]).sum()
    return total if weights[1] is None else total + (outputs[1] * weights[1]).sum()


# The peer's tests: (shape, seed, logit scale, (rtol, atol), settings). Its gradient tests take the log-probs' sum,
# then the sum of log-probs + entropy: two cases each.
STRICT, LOOSE, SUMS, BOTH_SUMS = (1e-5, 1e-5), (1e-4, 1e-4), (1.0, None), (1.0, 1.0)
AREAL_IDENTITY = {
    "logprobs": ((4, 16, 1024), 42, 1.0, STRICT, {}),
    "logprobs_entropy": ((4, 16, 1024), 123, 1.0, STRICT, dict(with_entropy=True)),
    "with_temperature": ((2, 8, 512), 456, 1.0, STRICT, dict(temperature=0.7)),
    "numerical_stability": ((2, 8, 512), 789, 100.0, LOOSE, dict(with_entropy=True)),
    "gradient": ((2, 4, 128), 999, 1.0, STRICT, dict(weights=SUMS)),
    "gradient_entropy": ((2, 4, 128), 999, 1.0, STRICT, dict(with_entropy=True, weights=BOTH_SUMS)),
    "gradient_correctness": ((2, 4, 128), 42, 1.0, STRICT, dict(weights=SUMS)),
    "gradient_correctness_entropy": ((2, 4, 128), 42, 1.0, STRICT, dict(with_entropy=True, weights=BOTH_SUMS)),
    "different_shapes_1d": ((64, 512), 111, 1.0, STRICT, {}),
    "different_shapes_2d": ((32, 512), 222, 1.0, STRICT, {}),
    "different_shapes_3d": ((4, 16, 512), 333, 1.0, STRICT, {}),
}


def areal_identity(name, backend):
    shape, seed, scale, tolerance, settings = AREAL_IDENTITY[name]
    areal_identity_case(*areal_logits(shape, seed, scale), backend, tolerance, **settings)


def areal_inplace(backend):
    """test_inplace_vocab_parallel_logprobs_entropy: logits [13, 3072], labels and randn(13) log-prob weights from
    seed 444, T = 0.7, chunks of 5; the entropy read, not differentiated."""
    generator = torch.Generator().manual_seed(444)
    logits = torch.randn(13, 3072, generator=generator)
    labels = torch.randint(0, 3072, (13,), generator=generator)
    weights = (torch.randn(13, generator=generator), None)
    areal_identity_case(logits, labels, backend, (1e-5, 2e-5), with_entropy=True, weights=weights, temperature=0.7,
                        chunk_size=5, entropy_grad=False)


def areal_chunked_lm_head(sequence_parallel, backend):
    """test_chunked_lm_head_tensor_and_sequence_parallel: a bf16 head [32, 16] a rank, 4 input rows a rank (seeds
    5000 + rank), labels and loss weights from seed 6000, T = 0.7, chunks of 3, the log-probs' weighted sum."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden_size, local_vocab, local_rows, temperature = 16, 32, 4, 0.7
    generator = torch.Generator().manual_seed(5000 + rank)
    local_input = torch.randn(local_rows, 1, hidden_size, dtype=torch.bfloat16, generator=generator)
    weight = torch.randn(local_vocab, hidden_size, dtype=torch.bfloat16, generator=generator)
    if sequence_parallel:
        parts = [torch.empty_like(local_input) for _ in range(world)]
        dist.all_gather(parts, local_input)
        total_input = torch.cat(parts, 0)
    else:  # a TP head's input is the same on every rank: rank 0's
        total_input = local_input.clone()
        dist.broadcast(total_input, 0)
    generator = torch.Generator().manual_seed(6000)
    labels = torch.randint(local_vocab * world, (total_input.shape[0], 1), generator=generator)
    loss_weights = torch.randn(total_input.shape[0], generator=generator)
    mine = slice(rank * local_rows, (rank + 1) * local_rows) if sequence_parallel else slice(None)

    hidden, head = total_input.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logprobs, entropy = kdfast.linear_token_logprobs(hidden, head, labels, temperature=temperature, chunk_size=3,
                                                     return_entropy=True, entropy_grad=False, fp32_logits=True,
                                                     backend=backend, **group())
    (logprobs.reshape(-1) * loss_weights).sum().backward()

    rows = total_input.reshape(-1, hidden_size)
    for precision in (torch.float32, torch.float64):
        local = rows.to(precision) @ weight.to(precision).T  # the peer's mm(out_dtype=float32) of bf16 values
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        whole = torch.cat(parts, -1).requires_grad_(True)
        expected_logprobs, expected_entropy = areal_reference(whole, labels.reshape(-1), temperature)
        (expected_logprobs * loss_weights.to(precision)).sum().backward()
        d_logits = whole.grad[:, rank * local_vocab:(rank + 1) * local_vocab]
        if precision == torch.float32:  # the peer's: d logits rounded to bf16, bf16 products
            d_logits = d_logits.to(torch.bfloat16)
        tag = f" ({precision})"
        close("log-probs" + tag, logprobs.reshape(-1).detach(), expected_logprobs.detach(), 2e-5, 1e-5)
        close("entropy" + tag, entropy.reshape(-1).detach(), expected_entropy.detach(), 2e-5, 1e-5)
        close("d weight" + tag, head.grad, d_logits.T @ rows.to(d_logits.dtype), 3e-2, 5e-3)
        if precision == torch.float64:  # d input: correctly rounded, half a bf16 unit (8 bits) (module docstring)
            d_input = d_logits @ weight.double()
            dist.all_reduce(d_input)
            close("d input rows" + tag, hidden.grad[mine].reshape(-1, hidden_size), d_input[mine], 1e-5, 2 ** -8)


@functools.cache
def areal_lce_tp2_case(num_tokens, hidden_size, vocab, dtype):
    """_test_tp2_correctness's draws (seed 42) and, per precision, the peer's _run_full_reference of the log-probs'
    sum + 0.5 x the entropy's on the full head (float32; then float64): drawn once per rank for every backend."""
    generator = torch.Generator().manual_seed(42)
    hidden = torch.randn(num_tokens, hidden_size, dtype=dtype, generator=generator) * 0.02
    labels = torch.randint(0, vocab, (num_tokens,), generator=generator)
    weight_full = torch.randn(vocab, hidden_size, dtype=dtype, generator=generator) * 0.02
    start, stop = equal_shard(vocab)
    expected = {}
    for precision in (torch.float32, torch.float64):
        # The peer's leaves keep the inputs' dtype (their grads too), its logits float32 of their values.
        leaf = dtype if precision == torch.float32 else precision
        ref_hidden = hidden.to(leaf).clone().requires_grad_(True)
        ref_weight = weight_full.to(leaf).clone().requires_grad_(True)
        logprobs, entropy = areal_reference(ref_hidden.to(precision) @ ref_weight.to(precision).T, labels)
        (logprobs.sum() + 0.5 * entropy.sum()).backward()
        expected[precision] = (logprobs.detach(), entropy.detach(), ref_hidden.grad, ref_weight.grad[start:stop])
    return hidden, labels, weight_full[start:stop].clone(), expected


def areal_lce_tp2(num_tokens, hidden_size, vocab, dtype, backend):
    """_test_tp2_correctness: d hidden kdfast's sum over the ranks (its default), as the peer's kernel returns it."""
    hidden, labels, weight, expected = areal_lce_tp2_case(num_tokens, hidden_size, vocab, dtype)
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logprobs, entropy = kdfast.linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend=backend,
                                                     **group())
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    tolerance = 2e-4 if dtype == torch.float32 else 3e-2  # the peer's rtol = atol
    for precision, wanted in expected.items():
        names = ("log-probs", "entropy", "d hidden", "d weight shard")
        for name, found, value in zip(names, (logprobs, entropy, hidden.grad, weight.grad), wanted):
            close(f"{name} ({precision})", found.detach(), value, tolerance, tolerance)


def areal_cases(world) -> dict:
    listed = {}
    for backend in FAST_BACKENDS:
        for name in AREAL_IDENTITY:
            listed[f"areal-{name}-{backend}"] = lambda n=name, b=backend: areal_identity(n, b)
        listed[f"areal-inplace_logprobs_entropy-{backend}"] = lambda b=backend: areal_inplace(b)
        for sequence_parallel in (False, True):
            listed[f"areal-chunked_lm_head-{'sp' if sequence_parallel else 'tp'}-{backend}"] = (
                lambda s=sequence_parallel, b=backend: areal_chunked_lm_head(s, b))
        if world == 2:  # the peer's launcher runs it on 2 ranks only
            listed[f"areal-lce_tp2-fp32-{backend}"] = lambda b=backend: areal_lce_tp2(128, 512, 8192, torch.float32, b)
            listed[f"areal-lce_tp2-bf16-{backend}"] = lambda b=backend: areal_lce_tp2(64, 1024, 32000, torch.bfloat16,
                                                                                      b)
    if world == 2:
        listed.update({f"areal-gradient_correctness_entropy-{backend}":
                       lambda b=backend: areal_identity("gradient_correctness_entropy", b) for backend in TRITON})
    return listed


# ---------------------------------------------------------------------------------------------------------------
# The ranks
# ---------------------------------------------------------------------------------------------------------------

def cases(world) -> dict:
    if world == 2:
        return {**verl_cases(), **slime_cases(), **openrlhf_cases(), **areal_cases(world)}
    return areal_cases(world)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each world's ranks, spawned once at the first case that needs them."""
    runs = {}

    def of(world):
        if world not in runs:
            folder = tmp_path_factory.mktemp(f"token_logprobs_vocab_parallel_peers_{world}")
            runs[world] = spawn_gloo_cases(functools.partial(cases, world), world, folder)
        return runs[world]

    return of


def listed(peer):
    return [pytest.param(world, name, id=f"{world}ranks-{name}") for world in WORLDS for name in cases(world)
            if name.startswith(f"{peer}-")]


@pytest.mark.parametrize("world,case", listed("verl"))
def test_verl(outcomes, world, case):
    failed = failures(outcomes(world), case)
    assert not failed, failed


@pytest.mark.parametrize("world,case", listed("slime"))
def test_slime(outcomes, world, case):
    failed = failures(outcomes(world), case)
    assert not failed, failed


@pytest.mark.parametrize("world,case", listed("openrlhf"))
def test_openrlhf(outcomes, world, case):
    failed = failures(outcomes(world), case)
    assert not failed, failed


@pytest.mark.parametrize("world,case", listed("areal"))
def test_areal(outcomes, world, case):
    failed = failures(outcomes(world), case)
    assert not failed, failed
