"""alibaba/ROLL's tests of its per-token log-probs and entropy, their inputs, expectations and tolerances, with kdfast
as the thing under test.

What ROLL computes (roll/utils/functionals.py): `log_probs_from_logits(logits, labels)`, log_softmax of the float32
logits gathered at the labels, and `entropy_from_logits(logits)`, logsumexp - sum(softmax * logits), differentiable
(the actor's entropy loss backpropagates through it). Its strategies' `op_compute_log_probs(logits, input_ids,
attention_mask)` shift the ids left for labels (0 where the mask is 0, and 0 appended), take the log-probs of every
position, drop the last and multiply by attention_mask[:, 1:]; `op_compute_entropy` does the same with the entropy.
`agg_loss(loss_mat, loss_mask, mode)` reduces -log-probs ("token-mean": the sum over the mask's count of tokens;
"seq-mean-token-sum": each sequence's sum, averaged over the sequences).

kdfast's counterparts: the logits as hidden states with an identity head, `linear_token_logprobs(logits, eye(V),
labels, ignore_index=-100, return_entropy=True)`, so that d hidden is ROLL's d logits; the mask's zeros become
ignore_index rows, to which kdfast gives 0 and no gradient where ROLL multiplies by 0. The logits form:
`-kdfast.cross_entropy(logits, labels, reduction="none")` for the log-probs and its
`return_components="per_row"` entropy (a metric, no gradient). With a model's hidden states and head,
`linear_token_logprobs(hidden, head.weight, labels)`, and ROLL's two agg modes as `linear_cross_entropy`'s
reductions: "token-mean" its mean over the kept rows, "seq-mean-token-sum" its mean with `num_items_in_batch` = the
number of sequences.

Ported:
- tests/distributed/strategy/test_fsdp_strategy_collection.py, test_op_compute_log_probs_matches_manual (logits [1,
  3, 2], the last position masked; `torch.allclose` at its defaults, rtol 1e-5 and atol 1e-8) and
  test_op_compute_entropy_masks_prompt (logits [1, 4, 2], the last position masked): `test_op_compute_log_probs`
  and `test_op_compute_entropy`, each on the fused and the logits form and every backend, with the peer's tolerance,
  and, kdfast's addition, values and the gradient of a weighted sum against float64 within 1e-6 (the peer tests
  values only).
- tests/distributed/strategy/context_parallel/test_fsdp2_cp_grad_equivalence.py (2 GPUs, NCCL: an Embedding(97,
  32) + Linear(32, 97) model, 2 x 8 tokens after manual_seed(1234), -log-probs through agg_loss in "token-mean" and
  "seq-mean-token-sum"; context parallel 2, each rank its half of the sequence and Ulysses-gathered log-probs, against
  context parallel 1: loss within 1e-6, gradients at atol 1e-6): `test_cp_grad_equivalence`, in one CPU process:
  the sequence's two halves are two kdfast calls into one model (the gather a concatenation, the gradients of the
  shared parameters summed by autograd where ROLL scales and all-reduces them), against the whole sequence in one
  call, at the peer's tolerances; both against float64 within 1e-6 absolute and relative (float32's rounding of
  a loss of ~33), and the loss also as `linear_cross_entropy` with the agg mode's reduction. The model is drawn on
  the CPU as the peer draws it (its state before `.cuda()`); its ids come from the CPU's generator rather than
  CUDA's.

Left out, nothing kdfast computes or no test with an expectation:
- tests/pipeline/Distill/test_distill_on_prompt.py: the distillation pipeline's dataset preprocessing with a real
  tokenizer (printed, not asserted). ROLL's distillation losses (roll/pipeline/distill/various_divergence.py: forward,
  reverse, adaptive, skewed and JS divergences) have no test in the repository.
- tests/distributed/strategy/log_probs/* and test_megatron_remove_padding.py: Ray pipelines of 0.5B-7B models
  comparing engines' log-probs (written to files, logged, not asserted against values); tests/models/
  test_hf_num_logits_to_keep.py: a 7B model's logits with and without num_logits_to_keep (a script, CUDA).
- test_fsdp2_cp_vlm_rmpad_equivalence.py, test_fsdp2_cp_qwen3_hf*_equivalence.py, test_fsdp2_cp_ulysses_equivalence.py:
  a model's attention under Ulysses sequence parallelism on several GPUs, not the log-probs' computation.
- tests/test_ref_worker_type_consistency.py (the source of the pipeline's LoRA branch inspected), tests/utils/
  test_compute_advantage.py and tests/agentic/test_segment_masked_mean.py (advantages and masked means of given
  values). `compute_approx_kl` (k1, abs, mse, k3 on given log-probs) has no test."""

import copy

import pytest
import torch
from conftest import BACKENDS, device_for

import kdfast

# kdfast against float64: float32's rounding, of values of order 1 (atol) and of the larger losses (a summed
# sequence's -log-probs reach ~33, whose float32 ulp is 3.8e-6)
ATOL64 = RTOL64 = 1e-6
FORMS = ["fused", "logits"]


def close(what, found, expected, atol=ATOL64, rtol=RTOL64):
    torch.testing.assert_close(found.detach().to(expected.dtype).cpu(), expected.detach().cpu(), atol=atol,
                               rtol=rtol, msg=lambda message: f"{what}: {message}")


def kdfast_labels(input_ids, attention_mask):
    """ROLL's shifted labels, its masked positions as kdfast's ignored rows rather than 0 times a log-prob."""
    return input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)


def roll_expected(logits, input_ids, attention_mask, what, dtype=torch.float32):
    """ROLL's op_compute_log_probs / op_compute_entropy (non-CP path) in `dtype`, differentiable to `logits`."""
    log_q = torch.log_softmax(logits.to(dtype), dim=-1)
    if what == "entropy":
        values = -(log_q.exp() * log_q).sum(-1)
    else:
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, 0)
        labels = torch.cat([labels, torch.zeros_like(labels[:, :1])], dim=1)
        values = log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return values[:, :-1] * attention_mask[:, 1:]


def kdfast_values(logits, input_ids, attention_mask, what, form, backend):
    """kdfast's log-probs or entropy of logits[:, :-1], one per label position, 0 where masked."""
    labels = kdfast_labels(input_ids, attention_mask)
    shifted = logits[:, :-1]
    if form == "fused":
        eye = torch.eye(logits.shape[-1], device=logits.device)
        log_probs, entropy = kdfast.linear_token_logprobs(shifted, eye, labels, ignore_index=-100,
                                                          return_entropy=True, backend=backend)
        return entropy if what == "entropy" else log_probs
    ce, parts = kdfast.cross_entropy(shifted, labels, reduction="none", return_components="per_row",
                                     backend=backend)
    return parts.entropy if what == "entropy" else -ce


def check_values_and_gradient(logits, input_ids, attention_mask, what, form, backend):
    device = device_for(backend)
    leaf = logits.clone().to(device).requires_grad_(True)
    found = kdfast_values(leaf, input_ids.to(device), attention_mask.to(device), what, form, backend)
    expected = roll_expected(logits, input_ids, attention_mask, what)
    assert found.shape == expected.shape and found.dtype == torch.float32
    assert torch.allclose(found.detach().cpu(), expected)  # the peer's assertion, at its default tolerances
    leaf64 = logits.double().requires_grad_(True)
    expected64 = roll_expected(leaf64, input_ids, attention_mask, what, torch.float64)
    close(what, found, expected64)
    if form == "logits" and what == "entropy":
        return  # the components' entropy is a metric, without a gradient
    upstream = torch.linspace(-1.3, 0.7, found.numel()).reshape(found.shape)  # kdfast's addition: a backward
    (found * upstream.to(device)).sum().backward()
    (expected64 * upstream.double()).sum().backward()
    close(f"d logits of the {what}", leaf.grad, leaf64.grad)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_compute_log_probs(backend, form):
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.5, -0.5]]])
    input_ids = torch.tensor([[0, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 0]])
    check_values_and_gradient(logits, input_ids, attention_mask, "log-probs", form, backend)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_compute_entropy(backend, form):
    logits = torch.tensor([[[0.0, 1.0], [1.5, 0.5], [0.3, 0.7], [1.2, 0.2]]])
    attention_mask = torch.tensor([[1, 1, 1, 0]])
    input_ids = torch.zeros_like(attention_mask)  # the entropy reads no label; kdfast's rows need one
    check_values_and_gradient(logits, input_ids, attention_mask, "entropy", form, backend)


# ---------------------------------------------------------------------------------------------------------------
# test_fsdp2_cp_grad_equivalence.py: context parallel 2 against 1
# ---------------------------------------------------------------------------------------------------------------

VOCAB, HIDDEN, BATCH, SEQ = 97, 32, 2, 8


def cp_model_and_batch():
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), dtype=torch.long)
    attention_mask = torch.ones((BATCH, SEQ), dtype=torch.long)
    return model, input_ids, attention_mask


def agg_loss(loss_mat, loss_mask, mode):
    """ROLL's agg_loss in its two tested modes (no weights, the batch's own token and sequence counts)."""
    if mode == "token-mean":
        return loss_mat.sum() / loss_mask.sum()
    seq_losses = (loss_mat * loss_mask).sum(-1)
    valid = (loss_mask > 0).any(-1).to(loss_mat.dtype)
    return (seq_losses * valid).sum() / (loss_mat.shape[0] + 1e-8)


def cp_run(model, input_ids, attention_mask, cp_size, mode, backend):
    """ROLL's op_compute_log_probs path for `cp_size` sequence shards (each kdfast call one shard's log-probs) and
    the agg loss of -log-probs; returns the loss and the parameters' gradients."""
    device = device_for(backend)
    model = copy.deepcopy(model).to(device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, 0)
    labels = torch.cat([labels, torch.zeros_like(labels[:, :1])], dim=1)
    shard = SEQ // cp_size
    pieces = []
    for start in range(0, SEQ, shard):
        hidden = model[0](input_ids[:, start:start + shard])
        pieces.append(kdfast.linear_token_logprobs(hidden, model[1].weight, labels[:, start:start + shard],
                                                   backend=backend))
    log_probs = torch.cat(pieces, dim=1)[:, :-1] * attention_mask[:, 1:]
    loss = agg_loss(-log_probs, attention_mask[:, 1:].long(), mode)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def float64_run(model, input_ids, attention_mask, mode):
    model = copy.deepcopy(model).double()
    logits = model(input_ids)
    labels = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = agg_loss(-(log_probs[:, :-1] * attention_mask[:, 1:]), attention_mask[:, 1:].long(), mode)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def linear_ce_run(model, input_ids, attention_mask, mode, backend):
    """The agg mode as kdfast.linear_cross_entropy's reduction over the shifted, masked labels."""
    device = device_for(backend)
    model = copy.deepcopy(model).to(device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = model[0](input_ids)[:, :-1]
    labels = kdfast_labels(input_ids, attention_mask)
    items = None if mode == "token-mean" else BATCH
    loss = kdfast.linear_cross_entropy(hidden, model[1].weight, labels, num_items_in_batch=items, backend=backend)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cp_grad_equivalence(backend, loss_agg_mode):
    model, input_ids, attention_mask = cp_model_and_batch()
    ref_loss, ref_grads = cp_run(model, input_ids, attention_mask, 1, loss_agg_mode, backend)
    cp_loss, cp_grads = cp_run(model, input_ids, attention_mask, 2, loss_agg_mode, backend)
    assert abs(ref_loss.item() - cp_loss.item()) < 1e-6
    for name in ref_grads:
        close(f"{name} (cp 2 against cp 1)", cp_grads[name], ref_grads[name], atol=1e-6, rtol=0.0)

    loss64, grads64 = float64_run(model, input_ids, attention_mask, loss_agg_mode)
    ce_loss, ce_grads = linear_ce_run(model, input_ids, attention_mask, loss_agg_mode, backend)
    for form, loss, grads in (("cp 1", ref_loss, ref_grads), ("cp 2", cp_loss, cp_grads),
                              ("linear_cross_entropy", ce_loss, ce_grads)):
        close(f"{form} loss (float64)", loss, loss64)
        for name in grads64:
            close(f"{form} {name} (float64)", grads[name], grads64[name])
