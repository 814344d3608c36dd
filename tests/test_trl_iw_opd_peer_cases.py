"""TRL's own test cases for its IW-OPD trainer (huggingface/trl tests/experimental/test_iw_opd_trainer.py, from a TRL
main newer than the installed 1.16) ported onto kdfast's `IWOPDTrainer`: each case that exercises the loss, with its
inputs and its expectations, run on kdfast's `compute_loss` and, where a TRL loss is there to compare with, against
TRL 1.16's `compute_loss` on the same trainer and batch. Where the upstream case calls a loss helper on logits
(`_compute_iw_opd_loss`, `generalized_jsd_loss`), kdfast's row-level loss runs with an identity head, so that the
hidden states are the logits. Upstream's tiny Qwen2 and Hub dataset become this suite's offline tiny Llamas, word
tokenizer and word-token conversations.

Ported:
- test_iw_opd_prefix_weights_and_loss: its hand-computed prefix weights, loss, metrics and `num_items_in_batch`
  division, on kdfast's IW-OPD rows (vocabulary 4, its numbers) and through `compute_loss` (a served teacher).
- test_iw_opd_uses_cached_rollout_logprobs: its loss from cached rollout log-probs, and TRL's buffer of mixed prompt
  lengths (`_store_completions_in_buffer`) through `compute_loss`.
- test_iw_opd_server_path_uses_actual_logprobs, test_loss_normalizes_by_num_items_in_batch (each loss_top_k),
  test_sampled_mode_matches_between_local_and_external_teachers, test_iw_opd_train_runs_with_local_teacher,
  test_distillation_trainer_train_runs_with_local_teacher.
- TestIWOPDTrainerServerPath.test_reverse_kl_finite_grad_with_ragged_batch (each batch size and accumulation): its
  training run, and its ragged batch's loss and gradients against TRL's.
- TestGetTeacherTokenLogprobsFromServer and TestServerReverseKLPaddingMask: their ragged server answer (-inf past a
  short completion) through `compute_loss`, at their beta 1 and at 0.5 and 0.
- TestGeneralizedJSDLoss: uniform, edge cases, output shape, beta values, temperature, symmetry, identical inputs;
  and TRL's `generalized_jsd_loss` against kdfast's over the whole vocabulary and top-k supports.

Not ported:
- test_distillation_config_rejects_* and test_distillation_config_requires_teacher_server_url: `IWOPDConfig`'s
  validation; kdfast's trainer takes TRL's config class unchanged, and no loss runs. (The two about Liger: TRL 1.16
  has no Liger path.)
- test_distillation_trainer_with_liger: Liger's fused JSD, which TRL 1.16 lacks (and it needs an accelerator).
- test_build_teacher_request_inputs, test_init_with_eval_dataset and
  test_repeat_batch_dataloader_delegates_set_epoch_via_getattr: TRL's request building, constructor and data loader,
  which kdfast does not override; no loss.
- TestGeneralizedJSDLoss.test_reduction_methods: the shapes of TRL's reductions ("none", "mean", "sum") of its
  [B, T, V] tensor; kdfast's row-level loss is a sum over rows, which the trainer divides (the `num_items_in_batch`
  cases here test that division).
- TestGetTeacherTokenLogprobsFromServer's and TestServerReverseKLPaddingMask's direct calls of TRL's helpers (its
  server getter, `_add_tail_bucket`, `_jsd_divergence`) alone: kdfast's loss calls the first and replaces the others;
  their inputs are ported through `compute_loss` instead."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_trl_iw_opd import CHAT_TEMPLATE, VOCAB, _assert_same_as_trl, _loss_metrics_gradients, _saved
from tiny_models import tiny_llama, word_tokenizer

pytest.importorskip("trl.experimental.iw_opd")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.iw_opd import IWOPDConfig
    from trl.experimental.iw_opd import IWOPDTrainer as TRLIWOPDTrainer
    from trl.experimental.iw_opd.iw_opd_trainer import build_teacher_request_inputs

from kdfast.integrations.iw_opd import IWOPDSettings, KeptRows, iw_opd_rows, local_divergence_sum  # noqa: E402
from kdfast.integrations.trl import IWOPDTrainer  # noqa: E402
from kdfast.top_k_support import HeadMap  # noqa: E402

# Upstream's zen conversations, in this vocabulary's words: (prompt, answer).
CONVERSATIONS = [("w2 w3", "w20 w21 w22"), ("w4 w5 w6", "w23 w24 w25 w26 w27"), ("w7", "w28"), ("w8 w9", "w29 w30")]
# Upstream's `_variable_length_dataset`: a one-token answer and a long one.
RAGGED_CONVERSATIONS = [("w2 w3 w4", "w5"), ("w6 w7 w8 w9 w10", " ".join(f"w{i}" for i in range(11, 27)))]


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    """A tiny student (hidden 32) and a teacher of another hidden size (48), each saved with the shared tokenizer."""
    root = tmp_path_factory.mktemp("iw_opd_peer")
    return _saved(root / "student", tiny_llama(32, vocab=VOCAB)), _saved(root / "teacher", tiny_llama(48, seed=1))


def _dataset(conversations):
    from datasets import Dataset

    return Dataset.from_list([{"messages": [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": answer}]}
                              for prompt, answer in conversations])


def _trainer(student, teacher, tmp_path, cls=IWOPDTrainer, conversations=CONVERSATIONS, evaluate=False, **config):
    """Upstream's `_make_args` (batch 2, lmbda 0: the dataset's own completions, the "jsd" objective, max_length 128,
    32 completion tokens) with `config` over it; `teacher` a path, or None with a served one; `evaluate`: the
    conversations are the evaluation set too."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    max_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=False,
                    lmbda=0.0, distillation_objective="jsd", max_length=128, max_completion_length=32, seed=0,
                    logging_steps=1)
    settings.update(config)
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.chat_template = CHAT_TEMPLATE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=student, teacher_model=teacher, args=IWOPDConfig(**settings),
                      train_dataset=_dataset(conversations),
                      eval_dataset=_dataset(conversations) if evaluate else None, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which most cases here call past
    return trainer


def _server_trainer(model_paths, tmp_path, monkeypatch, client, **config):
    """Upstream's `_make_server_trainer`: TRL's VLLMClient replaced by `client`."""
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "VLLMClient", lambda *args, **kwargs: client)
    trainer = _trainer(model_paths[0], None, tmp_path, use_teacher_server=True,
                       teacher_model_server_url="http://localhost:8000", **config)
    assert trainer.teacher_client is client
    return trainer


def _make_batch(trainer, rows=2):
    """Upstream's `_make_batch`: TRL's collator over the first examples."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])


class _RecordingTeacherClient:
    """Upstream's RecordingTeacherClient: records each request and answers `result` (or `result(**request)`)."""

    def __init__(self, result=None):
        self.calls, self.result = [], result

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs, temperature):
        request = dict(sequences=sequences, prompt_lengths=prompt_lengths, top_logprobs=top_logprobs,
                       temperature=temperature)
        self.calls.append(request)
        return self.result(**request) if callable(self.result) else self.result


def _canned_teacher_logprobs(**kwargs):
    """Upstream's: ragged per-sample log-probs -1 - 0.05 i for each completion's own tokens."""
    top_k = kwargs.get("top_logprobs", 1)
    logprobs, token_ids, actual = [], [], []
    for seq, plen in zip(kwargs["sequences"], kwargs["prompt_lengths"], strict=True):
        comp_len = len(seq) - plen
        logprobs.append([[-1.0 - 0.05 * i] * top_k for i in range(comp_len)])
        token_ids.append([[int(seq[plen + i])] * top_k for i in range(comp_len)])
        actual.append([[-1.0 - 0.05 * i] for i in range(comp_len)])
    return {"logprobs": logprobs, "logprob_token_ids": token_ids, "actual_logprobs": actual}


def _build_server_result(teacher_logits, inputs, temperature=1.0):
    """Upstream's: a vLLM answer from a local teacher's logits (its top-1 and the sampled tokens' log-probs)."""
    _, _, completion_lengths = build_teacher_request_inputs(inputs["input_ids"], inputs["attention_mask"],
                                                            prompt_attention_mask=inputs.get("prompt_attention_mask"),
                                                            labels=inputs.get("labels"))
    label_mask = inputs["labels"] != -100
    actual_logprobs, logprobs, logprob_token_ids = [], [], []
    for i, comp_len in enumerate(completion_lengths):
        if comp_len == 0:
            for answer in (actual_logprobs, logprobs, logprob_token_ids):
                answer.append([])
            continue
        comp_start = int(torch.nonzero(label_mask[i], as_tuple=False)[0].item())
        sample_logits = teacher_logits[i, comp_start - 1:comp_start - 1 + comp_len, :]
        sample_log_probs = F.log_softmax(sample_logits / temperature, dim=-1)
        comp_tokens = inputs["input_ids"][i, comp_start:comp_start + comp_len]
        top1_ids = sample_logits.argmax(dim=-1, keepdim=True)
        actual_logprobs.append(sample_log_probs.gather(-1, comp_tokens.unsqueeze(-1)).tolist())
        logprobs.append(sample_log_probs.gather(-1, top1_ids).tolist())
        logprob_token_ids.append(top1_ids.tolist())
    return {"actual_logprobs": actual_logprobs, "logprobs": logprobs, "logprob_token_ids": logprob_token_ids}


def _zero_student_head(trainer):
    """Upstream's IW-OPD cases take the student's logits to be zeros: log q(t) = -log V for every token."""
    with torch.no_grad():
        trainer.model.lm_head.weight.zero_()


def _assert_gradients_finite(trainer):
    gradients = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert gradients and all(bool(torch.isfinite(gradient).all()) for gradient in gradients)


# ── IW-OPD ──────────────────────────────────────────────────────────────────────────────────────────────────────────

def _iw_opd_rows(student_logits, completion_tokens, labels, teacher_actual_logprobs, gamma, rollout_logprobs=None,
                 num_items_in_batch=None):
    """kdfast's counterpart of TRL's `_compute_iw_opd_loss(student_logits, ...)` (temperature 1, epsilon 1e-8): its
    IW-OPD rows over the kept tokens with an identity head (the hidden states are the logits), divided as TRL divides
    (by `num_items_in_batch` where given, else by the kept tokens). Returns the loss and the kept tokens' weights."""
    rows = KeptRows(labels)
    settings = IWOPDSettings("iw_opd", 1.0, 1, True, gamma=gamma, epsilon=1e-8)
    denominator = num_items_in_batch if num_items_in_batch is not None else rows.count
    rollout = rows.of(rollout_logprobs) if rollout_logprobs is not None else None
    loss, (_, _, weights) = iw_opd_rows(rows.of(student_logits), HeadMap(torch.eye(student_logits.shape[-1])),
                                        rows.of(completion_tokens), rows.of(teacher_actual_logprobs), rows, settings,
                                        denominator, rollout)
    return loss, rows.of(weights)


def test_iw_opd_prefix_weights_and_loss_are_upstreams_numbers():
    """Upstream's case, its numbers: weights 1 + 0.5 (1 - the sequence's |a| before the token / its total), the loss
    -log q sum(w a) / 4 over the kept tokens, or / 8 given as `num_items_in_batch`. (Upstream reads the extreme weights
    from the logged metrics; the trainer's metrics are asserted through `compute_loss` below.)"""
    student_logits = torch.zeros(2, 3, 4, requires_grad=True)
    completion_tokens = torch.tensor([[0, 1, 2], [1, 2, 3]])
    labels = torch.tensor([[0, 1, 2], [1, -100, -100]])
    student_logprob = -math.log(4)
    teacher_actual_logprobs = torch.tensor([[student_logprob + 0.2, student_logprob - 0.3, student_logprob + 0.5],
                                            [student_logprob + 0.4, float("-inf"), float("-inf")]])
    loss, weights = _iw_opd_rows(student_logits, completion_tokens, labels, teacher_actual_logprobs, gamma=0.5)

    advantages = torch.tensor([[0.2, -0.3, 0.5], [0.4, 0.0, 0.0]])
    expected_weights = torch.tensor([[1.5, 1.4, 1.25], [1.5, 1.0, 1.0]])
    expected = -student_logprob * (expected_weights * advantages).sum() / 4
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(weights, torch.tensor([1.5, 1.4, 1.25, 1.5]))
    assert (float(weights.max()), float(weights.min())) == pytest.approx((1.5, 1.25))

    loss_ga = _iw_opd_rows(student_logits, completion_tokens, labels, teacher_actual_logprobs, gamma=0.5,
                           num_items_in_batch=8)[0]
    torch.testing.assert_close(loss_ga, expected * 4 / 8)
    loss.backward()
    assert student_logits.grad is not None and bool(torch.isfinite(student_logits.grad).all())


def test_iw_opd_cached_rollout_logprobs_give_the_advantages():
    """Upstream's case, its numbers: at gamma 0 the advantage is the teacher's log-prob less the cached rollout's
    (not the student's current -log 4)."""
    student_logits = torch.zeros(1, 2, 4, requires_grad=True)
    rollout_logprobs = torch.tensor([[-0.5, -0.25]])
    teacher_actual_logprobs = torch.tensor([[-0.2, -0.05]])
    loss = _iw_opd_rows(student_logits, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), teacher_actual_logprobs,
                        gamma=0.0, rollout_logprobs=rollout_logprobs)[0]
    expected = math.log(4) * (teacher_actual_logprobs - rollout_logprobs).sum() / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert bool(torch.isfinite(student_logits.grad).all())


def _prefix_batch():
    """Upstream's prefix case as a batch: 2-token prompts, then completions of 3 tokens and of 1 (then padding)."""
    input_ids = torch.tensor([[10, 11, 2, 3, 4], [12, 13, 3, 0, 0]])
    return {"input_ids": input_ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
            "labels": torch.tensor([[-100, -100, 2, 3, 4], [-100, -100, 3, -100, -100]]),
            "prompts": input_ids[:, :2], "prompt_attention_mask": torch.ones(2, 2, dtype=torch.long)}


def test_iw_opd_prefix_case_through_compute_loss_equals_upstream_and_trl(model_paths, tmp_path, monkeypatch):
    """The same case through `compute_loss`: the student's head zeroed (log q = -log V), the teacher server answering
    -log V + the upstream advantages for each completion (row 1 one token long: TRL pads it with -inf). The loss,
    weights and gradients are upstream's (V = 96 here) and TRL's; `num_items_in_batch` 8 halves it."""
    student_logprob = -math.log(VOCAB)
    advantages = [[0.2, -0.3, 0.5], [0.4]]
    tokens = [[2, 3, 4], [3]]
    served = [[[student_logprob + a] for a in row] for row in advantages]
    client = _RecordingTeacherClient({"actual_logprobs": served, "logprobs": served,
                                      "logprob_token_ids": [[[t] for t in row] for row in tokens]})
    trainer = _server_trainer(model_paths, tmp_path, monkeypatch, client, distillation_objective="iw_opd", lmbda=1.0)
    _zero_student_head(trainer)
    batch = _prefix_batch()

    expected = -student_logprob * (torch.tensor([1.5, 1.4, 1.25, 1.5]) * torch.tensor([0.2, -0.3, 0.5, 0.4])).sum() / 4
    loss, metrics, _ = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["iw_opd/max_weight"] == pytest.approx([1.5])
    assert metrics["iw_opd/min_weight"] == pytest.approx([1.25])
    _assert_gradients_finite(trainer)
    assert client.calls[0]["sequences"] == [[10, 11, 2, 3, 4], [12, 13, 3]]
    assert client.calls[0]["prompt_lengths"] == [2, 2]
    _assert_same_as_trl(trainer, batch)
    loss_ga = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch, num_items_in_batch=8)[0]
    torch.testing.assert_close(loss_ga, expected * 4 / 8, rtol=1e-5, atol=1e-6)
    _assert_same_as_trl(trainer, batch, num_items_in_batch=8)


def test_iw_opd_uses_the_rollout_logprobs_trl_buffers(model_paths, tmp_path, monkeypatch):
    """Upstream's buffer case: TRL's `_store_completions_in_buffer` with prompts of 1 and 2 tokens stores the rollout
    log-probs at the full sequence's width (so the labels' slice keeps them aligned); `compute_loss` on that buffered
    batch takes its advantages from them: at gamma 0 and a zeroed student head, log V times the teacher's log-probs
    less the rollout's, per kept token, as TRL's."""
    served = [[[-0.2], [-0.05], [-0.6]], [[-0.35]]]
    client = _RecordingTeacherClient({"actual_logprobs": served, "logprobs": served,
                                      "logprob_token_ids": [[[11], [12], [13]], [[14]]]})
    trainer = _server_trainer(model_paths, tmp_path, monkeypatch, client, distillation_objective="iw_opd", lmbda=1.0,
                              iw_opd_gamma=0.0, max_completion_length=3)
    _zero_student_head(trainer)
    trainer._buffered_inputs, trainer._buffered_text_logs = [None], [None]
    trainer._store_completions_in_buffer(
        slices=[{}], on_policy_indices=[0], local_slice_indices=[0, 0],
        local_prompts=[torch.tensor([5]), torch.tensor([6, 7])], completion_ids=[[11, 12, 13], [14]],
        logprobs=[[[-0.1], [-0.2], [-0.3]], [[-0.4]]], logprob_token_ids=[[[11], [12], [13]], [[14]]])
    batch = trainer._buffered_inputs[0]
    trainer._buffered_inputs = None  # as compute_loss is called outside train()
    assert batch["rollout_logprobs"].shape == batch["labels"].shape
    prompt_length = trainer._compute_prompt_length(batch)
    assert prompt_length == 1
    labels, rollout = batch["labels"][:, prompt_length:], batch["rollout_logprobs"][:, prompt_length:]
    expected_rollout = {(0, 11): -0.1, (0, 12): -0.2, (0, 13): -0.3, (1, 14): -0.4}
    assert int((labels != -100).sum()) == 4
    for row, col in (labels != -100).nonzero().tolist():
        assert float(rollout[row, col]) == pytest.approx(expected_rollout[(row, int(labels[row, col]))])

    loss = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch)[0]
    advantages = torch.tensor([-0.2, -0.05, -0.6, -0.35]) - torch.tensor([-0.1, -0.2, -0.3, -0.4])
    torch.testing.assert_close(loss, math.log(VOCAB) * advantages.sum() / 4, rtol=1e-5, atol=1e-6)
    _assert_same_as_trl(trainer, batch)


def test_iw_opd_server_path_uses_actual_logprobs(model_paths, tmp_path, monkeypatch):
    """Upstream's case: IW-OPD against a server's canned token log-probs of TRL's collated batch is finite and asks
    for the top-1; here its loss, metrics and gradients are also TRL's."""
    client = _RecordingTeacherClient(_canned_teacher_logprobs)
    trainer = _server_trainer(model_paths, tmp_path, monkeypatch, client, distillation_objective="iw_opd", lmbda=1.0)
    batch = _make_batch(trainer)
    loss = IWOPDTrainer.compute_loss(trainer, trainer.model, batch)
    assert torch.isfinite(loss)
    assert client.calls[0]["top_logprobs"] == 1
    _assert_same_as_trl(trainer, batch)


def test_iw_opd_train_runs_with_local_teacher(model_paths, tmp_path):
    """Upstream's case: one on-policy step (TRL generates up to 8 tokens) with a local teacher; the loss is finite and
    the IW-OPD weights are logged. Not compared with TRL's step: kdfast deliberately divides an on-policy loss by the
    generated tokens' count (`_window_items`), where TRL takes transformers' count of the dataset answers' tokens,
    which generation replaced (tests/test_trl_iw_opd.py compares training steps at kdfast's count)."""
    trainer = _trainer(*model_paths, tmp_path, distillation_objective="iw_opd", lmbda=1.0, max_completion_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.train()
    assert math.isfinite(result.metrics["train_loss"])
    assert any("iw_opd/mean_weight" in record for record in trainer.state.log_history)


# ── JSD through compute_loss ────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("loss_top_k", [0, 1])
def test_loss_normalizes_by_num_items_in_batch(model_paths, tmp_path, loss_top_k):
    """Upstream's case (TRL issue #4719): with `num_items_in_batch` the loss is sum / num_items_in_batch (the local
    kept-token count: the per-token mean; twice it: half), over the whole vocabulary and on the mixed top-1, a
    teacher the student perturbed; each as TRL's."""
    trainer = _trainer(model_paths[0], model_paths[0], tmp_path, beta=0.5, loss_top_k=loss_top_k)
    torch.manual_seed(0)
    with torch.no_grad():  # diverged from the student, so that the loss is well above rounding
        for parameter in trainer.teacher_model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    batch = _make_batch(trainer)
    prompt_length = trainer._compute_prompt_length(batch)
    num_valid = (batch["labels"][:, prompt_length:] != -100).sum()

    trainer.model.eval()
    with torch.no_grad():
        losses = [IWOPDTrainer.compute_loss(trainer, trainer.model, batch, num_items_in_batch=count)
                  for count in (None, num_valid, num_valid * 2)]
        expected = [TRLIWOPDTrainer.compute_loss(trainer, trainer.model, batch, num_items_in_batch=count)
                    for count in (None, num_valid, num_valid * 2)]
    assert float(losses[0]) > 1e-3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses[2], losses[0] / 2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_sampled_mode_matches_between_local_and_external_teachers(model_paths, tmp_path, monkeypatch):
    """Upstream's case: the mixed top-1 (beta 0.5) against a local teacher, and against a server answering that
    teacher's top-1 and sampled-token log-probs, give the same loss; the request is TRL's trimmed sequences and asks
    for the top-1. Here each loss is also TRL's."""
    client = _RecordingTeacherClient()
    local = _trainer(*model_paths, tmp_path / "local", beta=0.5, loss_top_k=1, reverse_kl_top_1_mode="sampled")
    server = _server_trainer(model_paths, tmp_path / "server", monkeypatch, client, beta=0.5, loss_top_k=1)
    batch = _make_batch(local)
    sequences, prompt_lengths, _ = build_teacher_request_inputs(batch["input_ids"], batch["attention_mask"],
                                                                prompt_attention_mask=batch["prompt_attention_mask"],
                                                                labels=batch["labels"])
    local.teacher_model.eval()
    with torch.no_grad():
        teacher_logits = local.teacher_model(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits
    client.result = _build_server_result(teacher_logits, batch, temperature=local.temperature)
    losses = [_loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch)[0] for trainer in (local, server)]
    assert client.calls[0]["sequences"] == sequences
    assert client.calls[0]["prompt_lengths"] == prompt_lengths
    assert client.calls[0]["top_logprobs"] == 1
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    _assert_same_as_trl(local, batch)
    _assert_same_as_trl(server, batch)


def test_distillation_trainer_train_runs_with_local_teacher(model_paths, tmp_path):
    """Upstream's case: 4 off-policy steps with an evaluation and a checkpoint every 2; the losses are logged. Here the
    training losses and gradient norms are also TRL's: off policy, with one accumulation step, kdfast's divisor (the
    window's kept tokens) is transformers' count. (The evaluation loss is TRL's own in both: transformers asks
    `compute_loss` for the outputs too, which kdfast leaves to TRL.)"""
    logged = []
    for cls in (TRLIWOPDTrainer, IWOPDTrainer):
        output = tmp_path / cls.__module__
        trainer = _trainer(*model_paths, output, cls=cls, dataloader_drop_last=True, eval_strategy="steps",
                           max_steps=4, eval_steps=2, save_strategy="steps", save_steps=2, per_device_eval_batch_size=2,
                           evaluate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = trainer.train()
        history = trainer.state.log_history
        assert history[-1]["train_loss"] is not None and result.metrics["train_loss"] >= 0.0
        assert any(record.get("eval_loss") is not None for record in history)
        assert (output / "checkpoint-2" / "model.safetensors").exists()
        logged.append(torch.tensor([[record["loss"], record["grad_norm"]] for record in history if "loss" in record]))
    assert logged[1].shape == (4, 2)
    torch.testing.assert_close(logged[1], logged[0], rtol=1e-4, atol=1e-6)


# ── A ragged server answer ──────────────────────────────────────────────────────────────────────────────────────────

def _ragged_server_response():
    """Upstream's: completions of 1 and 3 tokens, the top-1 the sampled token. Its ids 9217 and 100 (past this
    vocabulary of 96) are 92 and 95 here."""
    return {"logprobs": [[[-2.3]], [[-1.1], [-0.4], [-3.0]]],
            "logprob_token_ids": [[[90]], [[90], [92], [95]]],
            "actual_logprobs": [[[-2.3]], [[-1.1], [-0.4], [-3.0]]]}


def _ragged_batch():
    """Upstream's TestGetTeacherTokenLogprobsFromServer batch (ids remapped as above): no prompt mask, so the prompt
    lengths come from the labels (2, the loss's window from there)."""
    return {"input_ids": torch.tensor([[10, 11, 90, 0, 0], [10, 11, 90, 92, 95]]),
            "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "labels": torch.tensor([[-100, -100, 90, -100, -100], [-100, -100, 90, 92, 95]])}


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_ragged_server_answer_gives_finite_loss_and_gradients(model_paths, tmp_path, monkeypatch, beta):
    """Upstream's padding-mask cases through `compute_loss`: TRL's getter pads the 1-token completion's answer with
    -inf (asserted as upstream asserts it), which neither the loss nor a gradient sees; the top-1 with the tail bucket,
    at upstream's beta 1 (reverse KL, the sampled token), the mixed top-1 (0.5) and the forward KL (0); as TRL's."""
    client = _RecordingTeacherClient(_ragged_server_response())
    trainer = _server_trainer(model_paths, tmp_path, monkeypatch, client, beta=beta, loss_top_k=1, loss_add_tail=True)
    answers = []
    getter = trainer._get_teacher_token_logprobs_from_server

    def recorded(inputs, aligned_prompt_length):
        answers.append(getter(inputs, aligned_prompt_length))
        return answers[-1]

    trainer._get_teacher_token_logprobs_from_server = recorded
    batch = _ragged_batch()
    loss = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch)[0]
    assert torch.isfinite(loss) and float(loss) > 0.0
    _assert_gradients_finite(trainer)
    actual, top = answers[0]["actual_logprobs"], answers[0]["topk_logprobs"]
    assert actual.shape == (2, 3) and top.shape == (2, 3, 1)
    torch.testing.assert_close(actual[:, 0], torch.tensor([-2.3, -1.1]))
    assert float(actual[1, 2]) == pytest.approx(-3.0)
    assert actual[0, 1:].tolist() == [float("-inf")] * 2 and float(top[0, 1, 0]) == float("-inf")
    assert bool(torch.isfinite(actual[1]).all())
    _assert_same_as_trl(trainer, batch)


def _ragged_server_trainer(model_paths, tmp_path, monkeypatch, cls=IWOPDTrainer, **config):
    """Upstream's TestIWOPDTrainerServerPath set-up: reverse KL on the top-1 with the tail (the sampled token), off
    policy, against a server answering its canned log-probs, on a one-token answer and a long one."""
    client = _RecordingTeacherClient(_canned_teacher_logprobs)
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "VLLMClient", lambda *args, **kwargs: client)
    settings = dict(learning_rate=1e-4, max_length=64, max_prompt_length=32, max_completion_length=32,
                    use_teacher_server=True, teacher_model_server_url="http://fake-teacher.invalid:8000", loss_top_k=1,
                    beta=1.0, lmbda=0.0, distillation_objective="jsd", loss_add_tail=True, max_steps=-1)
    settings.update(config)
    return _trainer(model_paths[0], None, tmp_path, cls=cls, conversations=RAGGED_CONVERSATIONS, **settings)


def test_ragged_server_batch_loss_and_gradients_equal_trl(model_paths, tmp_path, monkeypatch):
    """Upstream's ragged batch (one 1-token completion, one of 16) collated by TRL: the loss and every gradient are
    finite, and TRL's."""
    trainer = _ragged_server_trainer(model_paths, tmp_path, monkeypatch)
    batch = _make_batch(trainer)
    completions = (batch["labels"] != -100).sum(1).tolist()
    assert completions == [1, 16]
    loss = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch)[0]
    assert torch.isfinite(loss)
    _assert_gradients_finite(trainer)
    _assert_same_as_trl(trainer, batch)


@pytest.mark.parametrize(("bs", "ga"), [(1, 2), (2, 1)])
def test_reverse_kl_finite_grad_with_ragged_batch(model_paths, tmp_path, monkeypatch, bs, ga):
    """Upstream's case: training (3 epochs of the two examples) on the ragged batch logs a finite loss and gradient
    norm at every step; here each is also TRL's (a served JSD divides by the local kept tokens in both)."""
    logged = []
    for cls in (TRLIWOPDTrainer, IWOPDTrainer):
        trainer = _ragged_server_trainer(model_paths, tmp_path / cls.__module__, monkeypatch, cls=cls,
                                         per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        records = [record for record in trainer.state.log_history if "grad_norm" in record]
        assert records
        for record in records:
            assert math.isfinite(record["grad_norm"]) and math.isfinite(record["loss"])
        logged.append(torch.tensor([[record["loss"], record["grad_norm"]] for record in records]))
    torch.testing.assert_close(logged[1], logged[0], rtol=1e-4, atol=1e-6)


# ── TestGeneralizedJSDLoss on kdfast's row-level divergence ─────────────────────────────────────────────────────────

def _kdfast_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, top_k=0, add_tail=True):
    """kdfast's generalized JSD per row of [..., V] logits: `local_divergence_sum` through identity heads (the hidden
    states are the logits), divided by the row count. The sampled tokens are the student's argmax: kdfast's rows take
    top_k 1 with beta > 0 as `compute_loss`'s mixed top-1 (the teacher's top-1 and the sampled token), which is then
    `generalized_jsd_loss`'s union of both top-1s. Returns (loss, d loss / d student logits)."""
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).detach().requires_grad_()
    teacher = teacher_logits.reshape(-1, vocab)
    head = HeadMap(torch.eye(vocab), temperature=temperature)
    settings = IWOPDSettings("jsd", beta, top_k, add_tail)
    loss = local_divergence_sum(student, head, teacher, head, student.detach().argmax(-1), settings) / student.shape[0]
    loss.backward()
    return loss.detach(), student.grad.view_as(student_logits)


def _trl_jsd(student_logits, teacher_logits, **settings):
    """TRL's `generalized_jsd_loss` ("batchmean") with every row kept: the per-row mean (without labels it would
    divide by the first dimension alone). Returns (loss, d loss / d student logits)."""
    student = student_logits.detach().requires_grad_()
    labels = torch.zeros(student_logits.shape[:-1], dtype=torch.long)
    loss = TRLIWOPDTrainer.generalized_jsd_loss(student, teacher_logits, labels=labels, **settings)
    loss.backward()
    return loss.detach(), student.grad


def _random_logits(seed=0, shape=(2, 3, 5)):
    """Upstream's setup_method: student and teacher logits [2, 3, 5] (seeded here)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)


def test_jsd_of_uniform_distributions_is_zero():
    logits = torch.ones(1, 1, 5)
    loss = _kdfast_jsd(logits, logits)[0]
    assert abs(float(loss)) < 5e-6
    torch.testing.assert_close(loss, _trl_jsd(logits, logits)[0], rtol=0, atol=1e-7)


def test_jsd_edge_cases_are_the_kls():
    """Upstream's: beta 1 is KL(student || teacher), beta 0 KL(teacher || student), on [0.1, 0.9] and [0.9, 0.1]."""
    student = torch.log(torch.tensor([[0.1, 0.9]])).unsqueeze(0)
    teacher = torch.log(torch.tensor([[0.9, 0.1]])).unsqueeze(0)
    reverse = F.kl_div(F.log_softmax(teacher, dim=-1), F.softmax(student, dim=-1), reduction="batchmean")
    forward = F.kl_div(F.log_softmax(student, dim=-1), F.softmax(teacher, dim=-1), reduction="batchmean")
    for beta, expected in ((1, reverse), (0, forward)):
        loss = _kdfast_jsd(student, teacher, beta=beta)[0]
        assert float(loss) == pytest.approx(float(expected), abs=5e-6)
        torch.testing.assert_close(loss, _trl_jsd(student, teacher, beta=beta)[0], rtol=1e-5, atol=1e-7)


def test_jsd_is_a_scalar_and_depends_on_beta_and_temperature():
    """Upstream's output shape, beta values and temperature scaling cases."""
    student, teacher = _random_logits()
    loss = _kdfast_jsd(student, teacher)[0]
    assert torch.is_tensor(loss) and loss.shape == torch.Size([])
    assert float(_kdfast_jsd(student, teacher, beta=0)[0]) != float(_kdfast_jsd(student, teacher, beta=1)[0])
    assert float(_kdfast_jsd(student, teacher, temperature=1)[0]) != float(_kdfast_jsd(student, teacher,
                                                                                       temperature=2)[0])


def test_jsd_is_symmetric_at_beta_half_only():
    """Upstream's symmetry case. Upstream asserts TRL's two values at beta 0.5 equal exactly; kdfast computes the
    student's side and the teacher's by different paths (a gradient for one), so here they agree to rounding."""
    student, teacher = _random_logits()
    assert abs(float(_kdfast_jsd(student, teacher, beta=0.1)[0]) - float(_kdfast_jsd(teacher, student, beta=0.1)[0])) \
        > 1e-4
    torch.testing.assert_close(_kdfast_jsd(student, teacher, beta=0.5)[0], _kdfast_jsd(teacher, student, beta=0.5)[0],
                               rtol=1e-6, atol=1e-7)


def test_jsd_of_identical_inputs_is_zero():
    logits = _random_logits(seed=1)[0]
    loss, gradient = _kdfast_jsd(logits, logits)
    assert abs(float(loss)) < 5e-7
    assert float(gradient.abs().max()) < 1e-6


JSD_CASES = [
    dict(beta=0.0), dict(beta=0.5), dict(beta=1.0), dict(beta=0.1), dict(beta=0.5, temperature=2.0),
    dict(beta=0.0, top_k=1), dict(beta=0.5, top_k=1), dict(beta=1.0, top_k=1),
    dict(beta=0.0, top_k=1, add_tail=False),  # one token renormalised: TRL's "trivial zero loss" the tail prevents
    dict(beta=0.5, top_k=1, add_tail=False), dict(beta=1.0, top_k=1, add_tail=False),
    dict(beta=0.0, top_k=2), dict(beta=0.5, top_k=2), dict(beta=1.0, top_k=2),
    dict(beta=0.0, top_k=2, add_tail=False), dict(beta=0.5, top_k=2, add_tail=False),
    dict(beta=1.0, top_k=2, add_tail=False), dict(beta=0.3, top_k=3, temperature=0.7),
    dict(beta=0.5, top_k=5),  # a support as large as the vocabulary: both take the whole vocabulary
]


@pytest.mark.parametrize("case", JSD_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_jsd_and_gradient_equal_trl_generalized_jsd_loss(case):
    """TRL's `generalized_jsd_loss` on upstream's [2, 3, 5] logits against kdfast's rows: the loss and its gradient
    to the student's logits, over the whole vocabulary and over top-k supports with the tail bucket or renormalised."""
    student, teacher = _random_logits(seed=2)
    expected = _trl_jsd(student, teacher, **case)
    actual = _kdfast_jsd(student, teacher, **case)
    trivial = case.get("top_k") == 1 and case.get("add_tail") is False and case["beta"] in (0.0, 1.0)
    assert float(expected[0]) == 0.0 if trivial else float(expected[0]) > 1e-4
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-4, atol=1e-7)
