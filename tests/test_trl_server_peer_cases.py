"""TRL's own test cases for its ServerDistillationTrainer (huggingface/trl, tests/experimental/
test_server_distillation_trainer.py) for the behaviours kdfast's subclass shares with it, ported: TRL's inputs and
expectations, kdfast's trainer (or the support and fused-loss functions its `compute_loss` calls) under test, each
test naming the TRL test it ports. Where cheap, TRL's own trainer on the same inputs is a second oracle.

Ported: test_build_teacher_request_inputs (the request kdfast's compute_loss makes, and its loss on an empty
completion), TestGetTeacherTokenLogprobsFromServer, TestServerReverseKLPaddingMask (its sparse loss at beta 1 also in
tests/test_sparse_peer_cases_more.py; here through the subclass's support functions at three betas),
TestServerDistillationTrainerRaggedGrad and TestServerVsLocalTeacher (in that file until TRL removed its local top-1
path, #6455; the local teacher's loss is rebuilt here from TRL's own sparse top-1 method).

Skipped, as kdfast does not change them: test_config_rejects_* and test_config_requires_server_url (TRL's config
validation; kdfast takes TRL's config as is), test_iw_opd_server_path_uses_actual_logprobs (an objective TRL 1.16 no
longer has) and test_loss_normalizes_by_num_items_in_batch[loss_top_k=1] (TRL's removed local top-1 path; the server
path normalizes locally by design). TRL has no case for the missing-logprob errors; tests/test_trl_server_distillation
.py compares those with TRL's.

TRL's models and tokenizer are Hub ones; here the tiny models and word tokenizer of tests/tiny_models.py."""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, student_and_teacher, tiny_llama, word_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.server_distillation")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.server_distillation import ServerDistillationConfig, build_teacher_request_inputs
    from trl.experimental.server_distillation import ServerDistillationTrainer as TRLTrainer

from kdfast import linear_sparse_distill_loss  # noqa: E402
from kdfast.integrations.trl_server import (  # noqa: E402
    ServerDistillationTrainer,
    server_topk_support,
    top1_actual_support,
)

NEG_INF = float("-inf")
# TRL's ragged answer names tokens up to 9217: a student with a vocabulary past it (still tiny: hidden 32).
WIDE_VOCAB = 9280


class RecordingTeacherClient:
    """TRL's RecordingTeacherClient: stands in for VLLMClient, records each request and answers `result` (a dict, or a
    function of the request)."""

    def __init__(self, *args, **kwargs):
        self.calls, self.result = [], None

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs, temperature):
        request = {"sequences": sequences, "prompt_lengths": prompt_lengths, "top_logprobs": top_logprobs,
                   "temperature": temperature}
        self.calls.append(request)
        return self.result(**request) if callable(self.result) else self.result


def ragged_server_response():
    """TRL's `_ragged_server_response`: two samples with completions of 1 and 3 tokens, top_k = 1."""
    return {"logprobs": [[[-2.3]], [[-1.1], [-0.4], [-3.0]]],
            "logprob_token_ids": [[[90]], [[90], [9217], [100]]],
            "actual_logprobs": [[[-2.3]], [[-1.1], [-0.4], [-3.0]]]}


def canned_teacher_logprobs(**request):
    """TRL's `_canned_teacher_logprobs`: per sample, -1 - 0.05 i at completion token i, the top-k ids the token
    itself."""
    top_k = request.get("top_logprobs", 1)
    logprobs, token_ids, actual = [], [], []
    for seq, prompt_length in zip(request["sequences"], request["prompt_lengths"]):
        completion_length = len(seq) - prompt_length
        logprobs.append([[-1.0 - 0.05 * i] * top_k for i in range(completion_length)])
        token_ids.append([[int(seq[prompt_length + i])] * top_k for i in range(completion_length)])
        actual.append([[-1.0 - 0.05 * i] for i in range(completion_length)])
    return {"logprobs": logprobs, "logprob_token_ids": token_ids, "actual_logprobs": actual}


class TRLServerLoss:
    """TRL's server loss methods, bound to just the attributes they read (no trainer, no model)."""

    reverse_kl_top_1_mode = "sampled"
    _compute_server_sparse_top_1_divergence_loss = TRLTrainer._compute_server_sparse_top_1_divergence_loss
    _compute_server_forward_kl_loss = TRLTrainer._compute_server_forward_kl_loss
    _compute_sparse_top_1_divergence_loss = TRLTrainer._compute_sparse_top_1_divergence_loss
    _get_reverse_kl_top_1_tokens = TRLTrainer._get_reverse_kl_top_1_tokens
    _reduce_divergence_loss = staticmethod(TRLTrainer._reduce_divergence_loss)

    def __init__(self, beta, loss_add_tail=True):
        self.beta, self.loss_add_tail = beta, loss_add_tail


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    """`make_trainer(cls, student, **config)`: TRL's or kdfast's trainer, its client a RecordingTeacherClient."""
    import trl.generation.vllm_client

    monkeypatch.setattr(trl.generation.vllm_client, "VLLMClient", RecordingTeacherClient)

    def make(cls, student, vocab=VOCAB, train_dataset=None, **settings):
        args = ServerDistillationConfig(output_dir=str(tmp_path), teacher_model_server_url="http://localhost:8000",
                                        report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                                        disable_tqdm=True, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=student, args=args, processing_class=word_tokenizer(vocab), train_dataset=train_dataset)
        # Set by train() per optimizer step; both trainers divide a training loss by it (train() resets it).
        trainer.current_gradient_accumulation_steps = 2
        return trainer

    return make


def trl_and_kdfast_trainers(make_trainer, vocab=VOCAB, **settings):
    """TRL's trainer and kdfast's, with the same settings and equal tiny students (the same seed)."""
    return (make_trainer(TRLTrainer, tiny_llama(vocab=vocab), vocab=vocab, **settings),
            make_trainer(ServerDistillationTrainer, tiny_llama(vocab=vocab), vocab=vocab, **settings))


def grpo_batch(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """A batch in the GRPO key layout both trainers' compute_loss reads."""
    return {"prompt_ids": torch.tensor(prompt_ids), "prompt_mask": torch.tensor(prompt_mask),
            "completion_ids": torch.tensor(completion_ids), "completion_mask": torch.tensor(completion_mask)}


def sequence_layout(batch):
    """What TRL's compute_loss rebuilds from the GRPO keys: input_ids, attention_mask, labels and the prompt mask."""
    completion_labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return {"input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            "labels": torch.cat([torch.full_like(batch["prompt_ids"], -100), completion_labels], dim=1),
            "prompt_attention_mask": batch["prompt_mask"]}


# --------------------------------------------------------------------------------------------------------------------
# test_build_teacher_request_inputs: the request kdfast's compute_loss makes
# --------------------------------------------------------------------------------------------------------------------

# TRL's three cases in the GRPO layout kdfast's compute_loss takes (left-padded prompts, right-padded completions; the
# first case's prompt_attention_mask TRL derives from the labels, which here is the prompt mask itself).
REQUEST_CASES = {
    "variable_prompt_lengths": (grpo_batch([[0, 0, 10, 11, 12], [30, 31, 32, 33, 34]], [[0, 0, 1, 1, 1], [1] * 5],
                                           [[20, 21], [40, 41]], [[1, 1], [1, 1]]),
                                [[10, 11, 12, 20, 21], [30, 31, 32, 33, 34, 40, 41]], [3, 5]),
    "padded_on_policy_completions": (grpo_batch([[0, 0, 10, 11, 12], [30, 31, 32, 33, 34]],
                                                [[0, 0, 1, 1, 1], [1] * 5], [[20, 21, 0, 0], [40, 41, 0, 0]],
                                                [[1, 1, 0, 0], [1, 1, 0, 0]]),
                                     [[10, 11, 12, 20, 21], [30, 31, 32, 33, 34, 40, 41]], [3, 5]),
    "empty_completion": (grpo_batch([[10, 11, 12]], [[1, 1, 1]], [[0]], [[0]]), [[10, 11, 12]], [3]),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_compute_loss_requests_trimmed_sequences(make_trainer, case, beta):
    """test_build_teacher_request_inputs: kdfast rebuilds the sequence layout itself before TRL's request is built, so
    the request it makes must be TRL's expected sequences and prompt lengths; the teacher's answer (TRL's canned one)
    then gives TRL's loss, 0 with a valid gradient path on the empty completion (TRL's clamp_min(1), no 0/0)."""
    batch, expected_sequences, expected_prompt_lengths = REQUEST_CASES[case]
    theirs, ours = trl_and_kdfast_trainers(make_trainer, beta=beta, loss_top_k=1)
    for trainer in (theirs, ours):
        trainer.teacher_client.result = canned_teacher_logprobs
    our_loss = ours.compute_loss(ours.model, batch)
    (request,) = ours.teacher_client.calls
    assert request["sequences"] == expected_sequences
    assert request["prompt_lengths"] == expected_prompt_lengths
    assert request["top_logprobs"] == 1
    torch.testing.assert_close(our_loss, theirs.compute_loss(theirs.model, batch), rtol=1e-5, atol=1e-7)
    our_loss.backward()
    if case == "empty_completion":
        assert our_loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in ours.model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------------------------------
# TestGetTeacherTokenLogprobsFromServer: the -inf sentinel at padding, as kdfast's loss receives it
# --------------------------------------------------------------------------------------------------------------------

def ragged_batch():
    """TRL's inputs (input_ids [[10, 11, 90, 0, 0], [10, 11, 90, 9217, 100]], prompt length 2) in the GRPO layout."""
    return grpo_batch([[10, 11], [10, 11]], [[1, 1], [1, 1]], [[90, 0, 0], [90, 9217, 100]],
                      [[1, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_variable_lengths_use_neg_inf_sentinel_at_padding(make_trainer, beta):
    """TestGetTeacherTokenLogprobsFromServer.test_variable_lengths_use_neg_inf_sentinel_at_padding: the answer kdfast's
    compute_loss gets for TRL's ragged response has TRL's shapes, values and -inf padding; kdfast's support keeps the
    real positions and turns the padding into empty columns (id -1); its loss and gradients are TRL's."""
    theirs, ours = trl_and_kdfast_trainers(make_trainer, vocab=WIDE_VOCAB, beta=beta, loss_top_k=1)
    answers = []
    getter = ours._get_teacher_token_logprobs_from_server

    def recording_getter(inputs, prompt_length):
        answers.append(getter(inputs, prompt_length))
        return answers[-1]

    ours._get_teacher_token_logprobs_from_server = recording_getter
    for trainer in (theirs, ours):
        trainer.teacher_client.result = ragged_server_response()
    batch = ragged_batch()
    our_loss = ours.compute_loss(ours.model, batch)

    (out,) = answers
    assert out["actual_logprobs"].shape == (2, 3)
    assert out["topk_logprobs"].shape == (2, 3, 1)
    assert out["actual_logprobs"][0, 0].item() == pytest.approx(-2.3, rel=1e-5)
    assert out["actual_logprobs"][1, 0].item() == pytest.approx(-1.1, rel=1e-5)
    assert out["actual_logprobs"][1, 2].item() == pytest.approx(-3.0, rel=1e-5)
    assert out["actual_logprobs"][0, 1].item() == NEG_INF  # sample 0 is 1 token long
    assert out["actual_logprobs"][0, 2].item() == NEG_INF
    assert out["topk_logprobs"][0, 1, 0].item() == NEG_INF
    assert torch.isfinite(out["actual_logprobs"][1, :]).all()

    # kdfast's support: the padding's -inf never reaches the loss (id -1, log-prob 0); the real rows are the server's.
    labels = sequence_layout(batch)["labels"][:, 2:]
    if beta == 0:
        ids, logprobs = server_topk_support(out)
    else:
        ids, logprobs = top1_actual_support(out, batch["completion_ids"], labels, beta)
    assert torch.equal(ids[0, 1:], torch.full_like(ids[0, 1:], -1))
    assert torch.equal(logprobs[0, 1:], torch.zeros_like(logprobs[0, 1:]))
    # Each real row's teacher top-1 is its completion token, so at 0 < beta < 1 the second column counts once (-1).
    assert ids[1, :, 0].tolist() == [90, 9217, 100]
    assert (ids[..., 1:] == -1).all()
    torch.testing.assert_close(logprobs[1, :, 0], torch.tensor([-1.1, -0.4, -3.0]))

    assert torch.isfinite(our_loss)
    torch.testing.assert_close(our_loss, theirs.compute_loss(theirs.model, batch), rtol=1e-5, atol=1e-7)
    our_loss.backward()
    theirs.compute_loss(theirs.model, batch).backward()
    for (name, mine), trl_param in zip(ours.model.named_parameters(), theirs.model.parameters()):
        assert torch.isfinite(mine.grad).all(), name
        torch.testing.assert_close(mine.grad, trl_param.grad, rtol=1e-4, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# TestServerReverseKLPaddingMask: -inf teacher log-probs at padded positions, through kdfast's fused loss
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_mask_keeps_forward_and_backward_finite(beta):
    """TestServerReverseKLPaddingMask.test_mask_keeps_forward_and_backward_finite (TRL's beta is 1; 0 and 0.5 take
    the same padding through the other supports): TRL's getter output (sample 0 one token long, -inf after) and labels,
    a random student. kdfast's support and fused loss, as its compute_loss calls them: a finite loss and finite
    gradients, none at the padded positions, and the value TRL's own server loss gives for the same student."""
    teacher_topk = torch.tensor([[[-2.3], [NEG_INF], [NEG_INF]], [[-1.1], [-0.4], [-3.0]]])
    labels = torch.tensor([[90, -100, -100], [90, 9217, 100]])
    completion_tokens = labels.clamp_min(0)  # the padding's token id is 0, as in the batch
    teacher = {"topk_logprobs": teacher_topk, "actual_logprobs": teacher_topk[..., 0],
               "topk_token_ids": completion_tokens[..., None].clone()}
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 16, generator=generator, requires_grad=True)
    weight = torch.randn(9218, 16, generator=generator, requires_grad=True)  # a vocabulary holding id 9217

    if beta == 0:
        ids, logprobs = server_topk_support(teacher)
    else:
        ids, logprobs = top1_actual_support(teacher, completion_tokens, labels, beta)
    assert torch.isfinite(logprobs).all()
    loss = linear_sparse_distill_loss(hidden, weight, ids, logprobs, labels, divergence="jsd", beta=beta,
                                      t2_scale=False, tail="bucket")
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.equal(hidden.grad[0, 1:], torch.zeros_like(hidden.grad[0, 1:]))  # labels -100: out of the loss

    student_log_probs = F.log_softmax(hidden.detach() @ weight.detach().t(), dim=-1)
    trl_loss = TRLServerLoss(beta)
    if beta == 0:
        expected = trl_loss._compute_server_forward_kl_loss(teacher, student_log_probs, labels)
    else:
        expected = trl_loss._compute_server_sparse_top_1_divergence_loss(teacher, student_log_probs,
                                                                         completion_tokens, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# TestServerDistillationTrainerRaggedGrad: training steps on ragged completions, with and without accumulation
# --------------------------------------------------------------------------------------------------------------------

def train_ragged(make_trainer, cls, bs, ga):
    """TRL's `_run_one_step`: reverse KL (beta 1) with the tail, the canned teacher, two prompts of different lengths
    (TRL's two chat prompts; plain ones here, the word tokenizer has no chat template), on-policy completions of up to
    32 tokens. Returns the logged steps and how many times kdfast's fused loss ran."""
    from datasets import Dataset

    trainer = make_trainer(cls, tiny_llama(), train_dataset=Dataset.from_dict({"prompt": ["w2 w3 w4 w5", "w6 w7"]}),
                           per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=1e-4,
                           max_completion_length=32, loss_top_k=1, beta=1.0, loss_add_tail=True, logging_steps=1,
                           seed=0)
    trainer.teacher_client.result = canned_teacher_logprobs
    fused_calls = []
    if cls is ServerDistillationTrainer:
        fused_loss = trainer._fused_loss
        trainer._fused_loss = lambda *args: fused_calls.append(1) or fused_loss(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [record for record in trainer.state.log_history if "grad_norm" in record], len(fused_calls)


@pytest.mark.parametrize(("bs", "ga"), [(1, 2), (2, 1)])
def test_reverse_kl_finite_grad_with_ragged_batch(make_trainer, bs, ga):
    """TestServerDistillationTrainerRaggedGrad.test_reverse_kl_finite_grad_with_ragged_batch: every logged step's loss
    and grad norm are finite (no -inf from the padding leaks into backward). TRL's trainer on the same seeded run is
    the oracle for the values, its loss divided by the accumulation steps as kdfast's is."""
    records, fused_calls = train_ragged(make_trainer, ServerDistillationTrainer, bs, ga)
    assert records, "expected at least one grad_norm log entry during training"
    assert fused_calls == len(records) * ga  # one micro-batch per accumulation step, every one kdfast's fused loss
    # The completions differ in length (one stops at eos), so the answers are ragged.
    assert any(record["completions/min_length"] < record["completions/max_length"] for record in records)
    for record in records:
        assert math.isfinite(record["grad_norm"]), f"grad_norm={record['grad_norm']} leaked -inf into backward"
        assert math.isfinite(record["loss"])
    trl_records, _ = train_ragged(make_trainer, TRLTrainer, bs, ga)
    for mine, trl_record in zip(records, trl_records, strict=True):
        assert mine["loss"] == pytest.approx(trl_record["loss"], rel=1e-4)
        assert mine["grad_norm"] == pytest.approx(trl_record["grad_norm"], rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# TestServerVsLocalTeacher: the served top-1 loss equals the local teacher's
# --------------------------------------------------------------------------------------------------------------------

def server_result_from_teacher(teacher_logits, inputs, temperature=1.0):
    """TRL's `_build_server_result`: what the server answers for a local teacher's logits, per sample its top-1 and
    its log-prob of each completion token over the completion's own tokens."""
    _, _, completion_lengths = build_teacher_request_inputs(inputs["input_ids"], inputs["attention_mask"],
                                                            prompt_attention_mask=inputs["prompt_attention_mask"],
                                                            labels=inputs["labels"])
    label_mask = inputs["labels"] != -100
    result = {"actual_logprobs": [], "logprobs": [], "logprob_token_ids": []}
    for row, completion_length in enumerate(completion_lengths):
        start = int(label_mask[row].nonzero()[0].item())
        logits = teacher_logits[row, start - 1:start - 1 + completion_length]
        log_probs = F.log_softmax(logits / temperature, dim=-1)
        tokens = inputs["input_ids"][row, start:start + completion_length]
        top1_ids = logits.argmax(dim=-1, keepdim=True)
        result["actual_logprobs"].append(log_probs.gather(-1, tokens[:, None]).tolist())
        result["logprobs"].append(log_probs.gather(-1, top1_ids).tolist())
        result["logprob_token_ids"].append(top1_ids.tolist())
    return result


def local_teacher_loss(student, teacher, inputs, beta, temperature=1.0):
    """TRL's former local path (`_compute_local_sparse_top_1_divergence_loss`): both models' full logits, the
    teacher's argmax as its top-1 and the completion's own token, through TRL's sparse top-1 method."""
    full_lengths = inputs["attention_mask"].sum(dim=1)
    prompt_length = int((full_lengths - (inputs["labels"] != -100).sum(dim=1)).min())
    window = slice(prompt_length - 1, -1)
    student_logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, window]
    teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, window]
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    top1_ids = teacher_logits.argmax(dim=-1)
    completion_tokens = inputs["input_ids"][:, prompt_length:]
    return TRLServerLoss(beta)._compute_sparse_top_1_divergence_loss(
        student_log_probs=F.log_softmax(student_logits / temperature, dim=-1), teacher_top1_token_ids=top1_ids,
        teacher_top1_logprobs=teacher_log_probs.gather(-1, top1_ids[..., None])[..., 0],
        reverse_token_ids=completion_tokens,
        reverse_teacher_logprobs=teacher_log_probs.gather(-1, completion_tokens[..., None])[..., 0],
        labels=inputs["labels"][:, prompt_length:])


def mixed_length_batch(teacher):
    """Prompts of 3 and 5 tokens (left-padded), completions of 6 and 4 (right-padded); completion tokens 0, 2 and 4
    the teacher's top-1, as sampled tokens often are (the support's two ids one column there)."""
    generator = torch.Generator().manual_seed(0)
    batch = grpo_batch([[0, 0, 1, 1, 1], [1] * 5], [[0, 0, 1, 1, 1], [1] * 5], [[0] * 6, [0] * 6],
                       [[1] * 6, [1, 1, 1, 1, 0, 0]])
    batch["prompt_ids"] = torch.randint(2, VOCAB, (2, 5), generator=generator) * batch["prompt_mask"]
    batch["completion_ids"] = torch.randint(2, VOCAB, (2, 6), generator=generator) * batch["completion_mask"]
    for position in (0, 2, 4):  # left to right: each choice changes the teacher's later answers
        inputs = sequence_layout(batch)
        with torch.no_grad():
            logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        batch["completion_ids"][:, position] = logits[:, 4 + position].argmax(dim=-1)
    batch["completion_ids"] *= batch["completion_mask"]
    return batch


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_sampled_mode_matches_between_local_and_external_teachers(make_trainer, beta):
    """TestServerVsLocalTeacher.test_sampled_mode_matches_between_local_and_external_teachers (TRL's beta is 0.5; 1,
    the actual token alone, is the other top-1 support): kdfast's served loss, from TRL's simulated server answer for
    the teacher's logits, equals the local teacher's top-1 loss, and its request is TRL's (the trimmed sequences,
    top_logprobs 1). TRL's student and teacher are one Hub model (a loss of ~0); distinct tiny models here."""
    student, teacher = student_and_teacher(head_scale=4.0)  # sharp heads: a loss well above fp32 noise
    trainer = make_trainer(ServerDistillationTrainer, student, beta=beta, loss_top_k=1)
    batch = mixed_length_batch(teacher)
    inputs = sequence_layout(batch)
    expected_sequences, expected_prompt_lengths, _ = build_teacher_request_inputs(
        inputs["input_ids"], inputs["attention_mask"], prompt_attention_mask=inputs["prompt_attention_mask"],
        labels=inputs["labels"])
    assert len(set(expected_prompt_lengths)) == 2  # completions start at an offset in the loss's window
    trainer.model.eval()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        trainer.teacher_client.result = server_result_from_teacher(teacher_logits, inputs, trainer.temperature)
        server_loss = trainer.compute_loss(trainer.model, batch)
        local_loss = local_teacher_loss(trainer.model, teacher, inputs, beta, trainer.temperature)
    (request,) = trainer.teacher_client.calls
    assert request["sequences"] == expected_sequences
    assert request["prompt_lengths"] == expected_prompt_lengths
    assert request["top_logprobs"] == 1
    assert local_loss > 1e-3
    torch.testing.assert_close(server_loss, local_loss, rtol=1e-5, atol=1e-6)
