"""TRL's own test cases for its AsyncDistillationTrainer's loss (huggingface/trl, tests/experimental/
test_async_distillation_trainer.py at 0574139 and tests/experimental/test_async_loss_normalization.py at 6333b4a),
ported: TRL's inputs and expectations, kdfast's `chunked_jsd_loss` (TRL's `_chunked_jsd_loss` signature) or kdfast's
trainer under test, each test naming the TRL test it ports.

Ported: TestNarrowTop1ActualSupport (the narrowed support is TRL's, unchanged; its masks fed to kdfast's loss, held
to a float64 divergence written from the definition), TestSparseGeneralizedJSDMatchesFullVocabReference,
TestPerTeacherStats, TestAsyncDistillationTrainer's test_train and test_train_with_nonzero_beta (on the CPU, with the
tiny model of tests/tiny_models.py and TRL's stub rollout worker and weight transfer) and
test_accumulated_gradients_match_full_batch (distillation side).

TRL's narrowing cases give a top-1 of -0.1 and an actual token of -2.0 together (0.905 + 0.135 = 1.04 > 1), no one
distribution's: TRL floors that row's rest at 1 - exp(-1e-7) and trains on it; kdfast refuses it with a ValueError
naming teacher_logprobs (README, "Served and multi-teacher"), which these tests assert, and takes the same cases with
the actual token at -2.5 (0.987) to TRL's other expectations. Values are held to kdfast's documented rest (none below
0), not to TRL's floor.

Skipped, as kdfast does not change them: TestPackingAwareBatching, TestMetricReduction, TestRolloutWorkerProtocol,
TestParseTeacherLogprobs, TestWorkerMetrics, TestMultiTeacherRouting, TestEpochStop, TestRolloutStateCheckpoint,
TestRolloutRequestModel and TestAsyncDistillationTrainerPeft (batching, collation, metric reduction, the rollout
worker, vLLM requests, checkpoint/resume, LoRA weight sync), TestBetaRange (TRL's config validation) and
test_init_minimal / test_resume_from_checkpoint (TRL's construction and checkpointing). From the normalization file:
test_window_token_count, test_aux_loss_keeps_its_scale (GRPO only), test_rank_average_matches_full_batch and
test_trainer_optimizer_step_matches_full_batch: they test a window-wide token count (`get_batch_samples` summing
`global_n_tokens`) that the installed TRL 1.16.0 does not have; its trainer, which kdfast's inherits, divides each
micro-batch by its own count. test_accumulated_gradients_match_full_batch holds there only for equal counts: ported
for those; for unequal ones kdfast's trainer is held to TRL 1.16's. TRL has no async case for temperature, logit scale,
softcap, bias or the entropies: tests/test_trl_async_distillation.py compares those with TRL's."""

import math
import os
import queue
import warnings
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_llama, word_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.async_distillation")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import PretrainedConfig, Trainer, TrainingArguments
    from trl.experimental.async_distillation import AsyncDistillationConfig
    from trl.experimental.async_distillation import AsyncDistillationTrainer as TRLTrainer
    from trl.experimental.async_distillation import async_distillation_trainer as trl_async
    from trl.experimental.async_distillation.async_rollout_worker import RolloutSample
    from trl.experimental.server_distillation.server_distillation_trainer import (
        _jsd_divergence as trl_dense_jsd_divergence,
    )
    from trl.models.utils import _ForwardRedirection

import kdfast.integrations.trl_async as kdfast_async  # noqa: E402
from kdfast.integrations.trl_async import AsyncDistillationTrainer, chunked_jsd_loss  # noqa: E402

NEG_INF = float("-inf")
TEACHER_TOP_K = 4
# TRL's narrowing cases put a top-1 of -0.1 and an actual token of -2.0 in one row: held probabilities 0.905 + 0.135 =
# 1.04. TRL's loss floors that row's rest and trains on it (its tests assert it runs, finite); kdfast's sparse loss
# refuses any row above 1 + 1e-2 (kdfast/validation.py), so chunked_jsd_loss raises where TRL's `_chunked_jsd_loss`
# returns. The same cases with the actual token at -2.5 are one distribution's rows.
TRLS_ACTUAL_LOGPROB, ONE_DISTRIBUTIONS_ACTUAL_LOGPROB = -2.0, -2.5


def above_one(logps, mask) -> bool:
    """Whether a row's held teacher probabilities sum above kdfast's slack over 1 (TRL's rows of 1.04)."""
    return bool((torch.where(mask, logps.double().exp(), 0.0).sum(-1) > 1.01).any())


def identity_head_loss(logits, ids, logps, mask, beta, teacher_id_idx=None, num_teachers=1, chunk_size=4):
    """kdfast's chunked_jsd_loss with an identity head, so that the hidden states are the student's logits (TRL's
    narrowing cases draw the student's logits directly)."""
    eye = torch.eye(logits.shape[-1])
    return chunked_jsd_loss(logits, eye, None, 1.0, None, ids, logps, mask, beta, 1.0, True, teacher_id_idx,
                            num_teachers, chunk_size)


def per_row_divergences(logits, ids, logps, mask, beta):
    """Each row's divergence: with one teacher per row, the per-teacher sums are the rows'."""
    rows = logits.shape[0]
    stats = identity_head_loss(logits, ids, logps, mask, beta, torch.arange(rows), rows)[4]
    return stats.view(rows, 3)[:, 1]


def reference_bucket_divergence(logits, ids, logps, beta):
    """Per row, float64, from the definition: the generalized JSD (beta 0 forward KL, 1 reverse KL) between the
    teacher's K + 1 buckets, its probabilities at `ids` (distinct; -1 padding) then the rest 1 - sum p, and the
    student's softmax at `ids` then its mass outside them. The teacher's rest as kdfast documents it: none below 0,
    at least 1e-7 under reverse KL's logarithm."""
    held = ids >= 0
    q = torch.where(held, logits.double().softmax(-1).gather(-1, ids.clamp_min(0)), 0.0)
    p = torch.where(held, logps.double().exp(), 0.0)
    p_rest = (1 - p.sum(-1, keepdim=True)).clamp_min(1e-7 if beta == 1 else 0.0)
    q, p = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1), torch.cat([p, p_rest], -1)

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if beta in (0, 1):  # the mixture's ends, where its formula is 0: TRL's forward and reverse KL
        return kl(p, q) if beta == 0 else kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def narrowed_rows(ids, logps, actual, beta):
    """TRL's `_narrow_top1_actual_support` on TRL's [1, T, K] inputs, flattened to the [T, K'] rows the loss takes."""
    narrow_ids, narrow_logps, mask = trl_async._narrow_top1_actual_support(ids, logps, actual, ids != -1, beta)
    return narrow_ids[0], narrow_logps[0], mask[0]


# --------------------------------------------------------------------------------------------------------------------
# TestNarrowTop1ActualSupport: TRL's narrowed supports through kdfast's loss
# --------------------------------------------------------------------------------------------------------------------

# TRL's cases, named by TRL's test: its candidates, actual token and beta; the mask TRL asserts; what that mask keeps.
NARROW_CASES = [
    pytest.param([5, 3, 9, -1], [-0.1, -1.0, -2.0, NEG_INF], 9, 0.5, [True, True], [5, 9], [-0.1, -2.0],
                 id="test_top1_and_actual_both_valid_and_distinct"),
    pytest.param([5, 3, 9, -1], [-0.1, -1.0, -2.5, NEG_INF], 9, 0.5, [True, True], [5, 9], [-0.1, -2.5],
                 id="test_top1_and_actual_both_valid_and_distinct, one distribution"),
    pytest.param([5, 3, 9, -1], [-0.1, -1.0, -2.0, NEG_INF], 5, 0.5, [True, False], [5], [-0.1],
                 id="test_actual_token_same_as_top1_is_deduplicated"),
    pytest.param([5, 3, -1, -1], [-0.1, -1.0, NEG_INF, NEG_INF], 42, 0.5, [True, False], [5], [-0.1],
                 id="test_actual_token_missing_from_reported_candidates"),
    pytest.param([-1, 9, -1, -1], [NEG_INF, -2.0, NEG_INF, NEG_INF], 9, 0.5, [False, True], [9], [-2.0],
                 id="test_top1_missing_but_actual_present"),
    pytest.param([5, 3, 9, -1], [-0.1, -1.0, -2.0, NEG_INF], 9, 1.0, [True], [9], [-2.0],
                 id="test_beta_one_drops_teacher_top1_entirely"),
    # No teacher signal: nothing left but the rest, 1 on both sides, so no divergence and no gradient.
    pytest.param([5, 3, -1, -1], [-0.1, -1.0, NEG_INF, NEG_INF], 42, 1.0, [False], [-1], [NEG_INF],
                 id="test_beta_one_actual_token_missing"),
]


@pytest.mark.parametrize(("ids", "logps", "actual", "beta", "expected_mask", "kept_ids", "kept_logps"), NARROW_CASES)
def test_narrowed_support_counts_what_trl_keeps(ids, logps, actual, beta, expected_mask, kept_ids, kept_logps):
    """TestNarrowTop1ActualSupport's six support cases: TRL's narrowing gives the mask TRL asserts, and kdfast's loss
    (value and logit gradient) over that narrowed support is the divergence over the candidates the mask keeps: a
    duplicated actual token counted once, a missing one or a missing top-1 not counted at all."""
    narrow_ids, narrow_logps, mask = narrowed_rows(torch.tensor([[ids]]), torch.tensor([[logps]]),
                                                   torch.tensor([[actual]]), beta)
    assert mask.tolist() == [expected_mask]
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))  # 64: past the missing token 42
    if above_one(narrow_logps, mask):
        with pytest.raises(ValueError, match="teacher_logprobs"):
            identity_head_loss(logits, narrow_ids, narrow_logps, mask, beta)
        return
    mine = logits.clone().requires_grad_()
    loss = identity_head_loss(mine, narrow_ids, narrow_logps, mask, beta)[0]
    loss.backward()
    reference = logits.double().requires_grad_()
    expected = reference_bucket_divergence(reference, torch.tensor([kept_ids]), torch.tensor([kept_logps]), beta).sum()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mine.grad.double(), reference.grad, rtol=1e-5, atol=1e-7)


def two_positions(actual_logprob: float):
    """TRL's two positions: a top-1 with the actual token at rank 3 (its log-prob `actual_logprob`), and a top-1 that
    is the actual token."""
    return (torch.tensor([[[5, 3, 9, -1], [7, -1, -1, -1]]]),
            torch.tensor([[[-0.1, -1.0, actual_logprob, NEG_INF], [-0.05, NEG_INF, NEG_INF, NEG_INF]]]),
            torch.tensor([[9, 7]]))


@pytest.mark.parametrize("actual_logprob", [TRLS_ACTUAL_LOGPROB, ONE_DISTRIBUTIONS_ACTUAL_LOGPROB])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_narrowed_support_feeds_kdfasts_loss(beta, actual_logprob):
    """test_narrow_support_feeds_add_tail_bucket_and_jsd_divergence_without_error (beta 0.5) and its beta-one twin:
    TRL's narrowed support taken by kdfast's loss as it is, each row's divergence finite and, by Gibbs' inequality,
    not negative (TRL's -1e-5 slack); here also the definition's value. TRL's row of 1.04 (beta 0.5): refused."""
    ids, logps, mask = narrowed_rows(*two_positions(actual_logprob), beta)
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    if above_one(logps, mask):
        with pytest.raises(ValueError, match="teacher_logprobs"):
            per_row_divergences(logits, ids, logps, mask, beta)
        return
    rows = per_row_divergences(logits, ids, logps, mask, beta)
    assert torch.isfinite(rows).all()
    assert (rows >= -1e-5).all()
    # The rows' kept candidates: [5, 9] and [7] (beta 0.5, the top-1 7 deduplicated), [9] and [7] (beta 1).
    kept_ids = torch.where(mask, ids, -1)
    torch.testing.assert_close(rows.double(), reference_bucket_divergence(logits, kept_ids, logps, beta),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("actual_logprob", [TRLS_ACTUAL_LOGPROB, ONE_DISTRIBUTIONS_ACTUAL_LOGPROB])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_padded_positions_keep_forward_and_backward_finite(beta, actual_logprob):
    """test_padded_positions_keep_forward_and_backward_finite: a ragged batch whose second sample's first position is
    all -1 / -inf padding. TRL drops that position (`has_teacher_signal`) before its loss; kdfast's, given it anyway,
    stays finite, adds nothing for it and sends it no gradient, so dropping it or not is the same loss. TRL's rows of
    1.04 (beta 0.5): refused."""
    ids = torch.tensor([[[5, 3, 9, -1], [-1, -1, -1, -1]], [[5, 3, 9, -1], [7, 2, 4, -1]]])
    logps = torch.tensor([[[-0.1, -1.0, actual_logprob, NEG_INF], [NEG_INF] * 4],
                          [[-0.1, -1.0, actual_logprob, NEG_INF], [-0.05, -1.2, -2.5, NEG_INF]]])
    narrow_ids, narrow_logps, mask = trl_async._narrow_top1_actual_support(ids, logps, torch.tensor([[9, 0], [9, 7]]),
                                                                          ids != -1, beta)
    narrow_ids, narrow_logps, mask = narrow_ids.flatten(0, 1), narrow_logps.flatten(0, 1), mask.flatten(0, 1)
    has_teacher_signal = mask.any(-1)
    assert has_teacher_signal.tolist() == [True, False, True, True]
    raw_student = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    if above_one(narrow_logps, mask):
        with pytest.raises(ValueError, match="teacher_logprobs"):
            identity_head_loss(raw_student, narrow_ids, narrow_logps, mask, beta)
        return
    loss = identity_head_loss(raw_student, narrow_ids, narrow_logps, mask, beta)[0]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(raw_student.grad).all()
    assert not raw_student.grad[~has_teacher_signal].any()
    kept = identity_head_loss(raw_student.detach()[has_teacher_signal], narrow_ids[has_teacher_signal],
                              narrow_logps[has_teacher_signal], mask[has_teacher_signal], beta)[0]
    torch.testing.assert_close(loss.detach(), kept)


# --------------------------------------------------------------------------------------------------------------------
# TestSparseGeneralizedJSDMatchesFullVocabReference
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_vocab_support_matches_dense_reference(beta):
    """test_forward_kl_matches_full_vocab_generalized_jsd_loss: the whole vocabulary as the "top-k" leaves no rest,
    so the sparse loss is the dense one: TRL's dense `_jsd_divergence` (ServerDistillationTrainer's, `support_mask`
    None), batchmean, to TRL's default tolerance. TRL pins beta 0; its dense reference takes 0.5 and 1 alike. The
    teacher's rest is float32 rounding here, below TRL's 1e-7 floor: kdfast adds nothing for it (the student's ids
    cover its row), its documented behaviour."""
    generator = torch.Generator().manual_seed(0)  # TRL's torch.manual_seed(0): the same draws
    batch, seq_len, vocab_size = 2, 5, 32
    student_logits = torch.randn(batch, seq_len, vocab_size, generator=generator)
    teacher_logits = torch.randn(batch, seq_len, vocab_size, generator=generator)
    student_log_probs, teacher_log_probs = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    reference = trl_dense_jsd_divergence(student_log_probs, teacher_log_probs, beta=beta).sum() / (batch * seq_len)
    teacher_topk_logprobs, teacher_topk_ids = teacher_log_probs.topk(vocab_size, dim=-1)
    mask = torch.ones_like(teacher_topk_ids, dtype=torch.bool)
    loss = identity_head_loss(student_logits.flatten(0, 1), teacher_topk_ids.flatten(0, 1),
                              teacher_topk_logprobs.flatten(0, 1), mask.flatten(0, 1), beta)[0]
    torch.testing.assert_close(loss / (batch * seq_len), reference)


# --------------------------------------------------------------------------------------------------------------------
# TestPerTeacherStats
# --------------------------------------------------------------------------------------------------------------------

def make_teacher_topk(vocab_size, actual_token_ids, top_k, seed):
    """TRL's `_make_teacher_topk`: per position a random teacher's top-k, the actual token swapped in last if
    outside it (the server reports it whatever its rank)."""
    generator = torch.Generator().manual_seed(seed)
    ids, logprobs = [], []
    for actual_id in actual_token_ids:
        log_probs = torch.log_softmax(torch.randn(vocab_size, generator=generator), dim=-1)
        top_logprobs, top_ids = log_probs.topk(top_k)
        top_ids_list, top_logprobs_list = top_ids.tolist(), top_logprobs.tolist()
        if actual_id not in top_ids_list:
            top_ids_list[-1] = actual_id
            top_logprobs_list[-1] = log_probs[actual_id].item()
        ids.append(top_ids_list)
        logprobs.append(top_logprobs_list)
    return ids, logprobs


NUM_POSITIONS, HIDDEN_SIZE, VOCAB_SIZE, NUM_TEACHERS = 10, 8, 32, 2
TEACHER_ID_IDX = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 0])  # interleaved: each teacher's rows across chunks


def per_teacher_run(teacher_id_idx, chunk_size):
    """TestPerTeacherStats._run: TRL's inputs (forward KL, tail bucket) through kdfast's chunked_jsd_loss."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(NUM_POSITIONS, HIDDEN_SIZE, generator=generator)
    lm_head_weight = torch.randn(VOCAB_SIZE, HIDDEN_SIZE, generator=generator)
    actual_token_ids = torch.randint(VOCAB_SIZE, (NUM_POSITIONS,), generator=generator).tolist()
    ids, logprobs = make_teacher_topk(VOCAB_SIZE, actual_token_ids, TEACHER_TOP_K, seed=0)
    target_ids = torch.tensor(ids)
    return chunked_jsd_loss(hidden, lm_head_weight, None, 1.0, None, target_ids, torch.tensor(logprobs),
                            torch.ones_like(target_ids, dtype=torch.bool), 0.0, 1.0, True, teacher_id_idx,
                            NUM_TEACHERS, chunk_size)


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_stats_partition_the_batch_by_teacher(chunk_size):
    """test_stats_partition_the_batch_by_teacher: each teacher's row count, and the teachers' divergence and
    teacher-entropy sums adding up to the batch's."""
    _, jsd_sum, _, teacher_entropy_sum, per_teacher_stats = per_teacher_run(TEACHER_ID_IDX, chunk_size)
    counts, jsd_sums, entropy_sums = per_teacher_stats.view(NUM_TEACHERS, 3).T
    torch.testing.assert_close(counts, torch.bincount(TEACHER_ID_IDX).float())
    torch.testing.assert_close(jsd_sums.sum(), jsd_sum)
    torch.testing.assert_close(entropy_sums.sum(), teacher_entropy_sum)


def test_chunking_does_not_move_tokens_between_teachers():
    """test_chunking_does_not_move_tokens_between_teachers: chunks of 3 rows give the per-teacher stats of one chunk."""
    whole = per_teacher_run(TEACHER_ID_IDX, NUM_POSITIONS)[-1]
    torch.testing.assert_close(per_teacher_run(TEACHER_ID_IDX, 3)[-1], whole)


def test_single_teacher_reports_no_breakdown():
    """test_single_teacher_reports_no_breakdown: without teacher ids the per-teacher stats are all zeros."""
    assert not per_teacher_run(None, 3)[-1].any()


# --------------------------------------------------------------------------------------------------------------------
# TestAsyncDistillationTrainer: test_train, test_train_with_nonzero_beta
# --------------------------------------------------------------------------------------------------------------------

class StubRolloutWorker:
    """TRL's _StubRolloutWorker: fills the queue with scored samples at start and after each weight sync. Its samples
    here are random token sequences (3 prompt tokens, 5 completion tokens) in the word tokenizer's vocabulary, the
    teacher's candidates TRL's `_make_teacher_topk`, padded to top-k + 1 with -1 / -inf as TRL 1.16's worker does."""

    def __init__(self, samples_per_weight_sync=10):
        self.rollout_buffer, self.metrics_queue = queue.Queue(), queue.Queue()
        self._samples_per_weight_sync, self._model_version, self._count = samples_per_weight_sync, 0, 0

    def _fill_queue(self):
        for _ in range(self._samples_per_weight_sync):
            idx, self._count = self._count, self._count + 1
            tokens = torch.randint(2, VOCAB, (8,), generator=torch.Generator().manual_seed(idx)).tolist()
            ids, logprobs = make_teacher_topk(VOCAB, tokens[3:], TEACHER_TOP_K, seed=idx)
            padded_ids = np.full((8, TEACHER_TOP_K + 1), -1, dtype=np.int64)
            padded_logprobs = np.full((8, TEACHER_TOP_K + 1), NEG_INF, dtype=np.float32)
            padded_ids[3:, :TEACHER_TOP_K], padded_logprobs[3:, :TEACHER_TOP_K] = ids, logprobs
            self.rollout_buffer.put(RolloutSample(
                prompt=[], completion=[], input_ids=np.array(tokens), completion_mask=np.array([0] * 3 + [1] * 5),
                teacher_topk_ids=padded_ids, teacher_topk_logprobs=padded_logprobs,
                model_version=self._model_version, metrics={}, teacher_id="default", prompt_id=idx))

    def start(self):
        self._fill_queue()

    def update_model_version(self, version):
        self._model_version = version
        self._fill_queue()

    def stop(self):
        pass

    def check_health(self, stale_after_s):
        pass


class StubWeightTransfer:
    """TRL's _StubWeightTransfer: drains the parameter stream like the real client, sends nothing."""

    def init_weight_transfer(self):
        pass

    def pause(self):
        pass

    def send_weights(self, iterator):
        for _ in iterator:
            pass

    def resume(self):
        pass

    def destroy(self):
        pass


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_train(student_dir, tmp_path, monkeypatch, beta):
    """test_train (beta 0, TRL's default: every parameter moves, a train_loss logged) and
    test_train_with_nonzero_beta (0.25 ... 1, the narrowed support: every logged grad_norm and loss finite), both
    asserted at every beta, for kdfast's trainer and with kdfast's loss seen to run. TRL's run is an epoch on a GPU
    with FlashAttention; here two steps on the CPU, eager attention (packed sequences attend across their boundary,
    which changes the numbers, not what is asserted), TRL's MFU lookup and vLLM client stubbed as in
    tests/test_trl_async_distillation.py."""
    from datasets import Dataset

    monkeypatch.setattr(trl_async, "get_peak_flops_per_device", lambda *args: None)
    monkeypatch.setattr(trl_async, "VLLMClient", lambda *args, **kwargs: None)
    calls = []
    monkeypatch.setattr(kdfast_async, "chunked_jsd_loss", lambda *args: calls.append(1) or chunked_jsd_loss(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = AsyncDistillationConfig(
            output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=3, teacher_top_k=TEACHER_TOP_K,
            max_completion_length=8, vllm_server_timeout=5.0, token_budget=-1, beta=beta, report_to=[], use_cpu=True,
            bf16=False, max_steps=2, logging_steps=1, save_strategy="no", disable_tqdm=True,
            model_init_kwargs={"attn_implementation": "eager", "dtype": torch.float32})
        trainer = AsyncDistillationTrainer(student_dir, args=args, train_dataset=Dataset.from_dict({"prompt": [[]]}),
                                           processing_class=word_tokenizer(), rollout_worker=StubRolloutWorker(),
                                           weight_transfer=StubWeightTransfer())
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
    trainer.train()
    assert calls
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, param in previous_trainable_params.items():
        assert not torch.equal(param, trainer.model.get_parameter(n)), f"Parameter {n} has not changed."
    log_history = [record for record in trainer.state.log_history if "grad_norm" in record]
    assert log_history
    for record in log_history:
        assert math.isfinite(record["grad_norm"]) and math.isfinite(record["loss"])


# --------------------------------------------------------------------------------------------------------------------
# test_async_loss_normalization.py: test_accumulated_gradients_match_full_batch
# --------------------------------------------------------------------------------------------------------------------

class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(2, 2)
        torch.nn.init.ones_(self.embed.weight)

    def forward(self, input_ids, position_ids, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


class TokenModel(torch.nn.Module):
    """TRL's _TokenModel: token-local (no attention), so the loss does not depend on how samples are packed."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.base_model = Backbone()
        self.lm_head = torch.nn.Linear(2, 2, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def get_output_embeddings(self):
        return self.lm_head


def token_model_trainer(cls, tmp_path, add_tail_bucket):
    """TRL's fixture: the real Trainer and Accelerator on the CPU, the async constructor (a rollout server, FA3)
    skipped."""
    trainer = cls.__new__(cls)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=2,
                             bf16=False, fp16=False)
    Trainer.__init__(trainer, model=TokenModel(), args=args, compute_loss_func="non-None value to disable scaling")
    trainer.model_accepts_loss_kwargs = False
    trainer._metrics = {"train": defaultdict(list)}
    trainer._teacher_ids = ["teacher"]
    trainer._forward_redirection = _ForwardRedirection()
    trainer.args.beta, trainer.args.teacher_temperature, trainer.args.add_tail_bucket = 0.0, 1.0, add_tail_bucket
    return trainer


def normalization_sample(n_tokens, teacher_probability, sample_id=0):
    """TRL's _sample (its GRPO-only fields left out, arrays as TRL 1.16's worker gives them): two prompt tokens and an
    inner context token outside the completion mask."""
    mask = [0, 0] + [1] * (n_tokens // 2) + [0] + [1] * (n_tokens - n_tokens // 2)
    logprobs = [math.log(teacher_probability), math.log(1 - teacher_probability)]
    return {"input_ids": np.ones(len(mask), dtype=np.int64), "completion_mask": np.array(mask),
            "teacher_topk_ids": np.array([[0, 1]] * len(mask)),
            "teacher_topk_logprobs": np.array([logprobs] * len(mask)), "teacher_id": "teacher", "prompt_id": sample_id,
            "metrics": {}}


def collate(groups):
    return trl_async.DataCollatorForRollout(pad_token_id=0, num_processes=len(groups))([groups])


def accumulation_step(trainer, batches, num_batches):
    """TRL's _step: one optimizer step's micro-batches through `training_step`, the loss and the gradients."""
    trainer.model.zero_grad()
    trainer.args.gradient_accumulation_steps = num_batches
    trainer._step_forward_tokens = trainer._step_trained_tokens = 0
    trainer._step_seq_len_weighted = trainer._step_samples = trainer._step_forward_s = 0
    trainer._step_microbatches = trainer._current_train_step_time = 0
    batches, num_items = trainer.get_batch_samples(iter(batches), num_batches, trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(batches)  # Trainer's shorter final window
    loss = sum(trainer.training_step(trainer.model, batch, num_items) for batch in batches)
    return loss, {name: param.grad.clone() for name, param in trainer.model.named_parameters()}


def full_and_accumulated(trainer, token_counts, num_batches):
    samples = [normalization_sample(token_counts[0], 0.9), normalization_sample(token_counts[1], 0.6, sample_id=1)]
    full = accumulation_step(trainer, [collate([samples])], 1)
    accumulated = accumulation_step(trainer, [collate([[sample]]) for sample in samples], num_batches)
    return full, accumulated


@pytest.mark.parametrize("add_tail_bucket", [True, False])  # True: kdfast's loss; False (TRL's fixture): TRL's
@pytest.mark.parametrize("token_counts", [(100, 100), (0, 0)])
@pytest.mark.parametrize("num_batches", [2, 4])
def test_accumulated_gradients_match_full_batch(tmp_path, token_counts, num_batches, add_tail_bucket):
    """test_accumulated_gradients_match_full_batch (distillation), the token counts for which TRL 1.16's per
    micro-batch normalization, inherited by kdfast's trainer, meets it: two samples one micro-batch each give the loss
    and gradients of both in one. Both samples' candidates cover the 2-token vocabulary, so the teacher's rest is
    rounding: kdfast adds nothing for it, TRL 1.16 floors it at 1e-7, within the default tolerance."""
    trainer = token_model_trainer(AsyncDistillationTrainer, tmp_path, add_tail_bucket)
    (reference_loss, reference_grads), (loss, grads) = full_and_accumulated(trainer, token_counts, num_batches)
    torch.testing.assert_close(loss, reference_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name])
    assert trainer._step_trained_tokens == sum(token_counts)
    assert trainer._step_microbatches == 2


@pytest.mark.parametrize("token_counts", [(100, 900), (0, 9)])
def test_unequal_token_counts_normalize_as_trl_1_16(tmp_path, token_counts):
    """test_accumulated_gradients_match_full_batch's unequal counts, which TRL 1.16 (each micro-batch over its own
    count) does not meet: kdfast's trainer, with kdfast's loss, gives TRL 1.16's loss and gradients, whole and
    accumulated."""
    mine = full_and_accumulated(token_model_trainer(AsyncDistillationTrainer, tmp_path, True), token_counts, 2)
    theirs = full_and_accumulated(token_model_trainer(TRLTrainer, tmp_path, True), token_counts, 2)
    for (my_loss, my_grads), (their_loss, their_grads) in zip(mine, theirs):
        torch.testing.assert_close(my_loss, their_loss)
        for name in their_grads:
            torch.testing.assert_close(my_grads[name], their_grads[name])
