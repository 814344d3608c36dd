"""kdfast's TRL self-distillation trainers (SDFT, SDPO) against TRL's own: on the same batch, TRL's `compute_loss` (both
models' [B, T, V] logits) and kdfast's (hidden states through the fused kernels) give the same loss, the same logged
metrics and the same gradient of every student parameter, in every `distillation_mode`, with the importance ratio,
skipped and masked tokens, a temperature, SDPO's policy term and its mix; a training step through TRL's own
generation equals TRL's step; and TRL's loss-helper cases hold for kdfast's per-token objective."""

import warnings

import pytest
import torch
from helpers import assert_same_trainer_outcome
from tiny_models import skip_head_check, tiny_llama, word_tokenizer

pytest.importorskip("trl.experimental.sdft")
pytest.importorskip("trl.experimental.sdpo")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.sdft import SDFTConfig
    from trl.experimental.sdft import SDFTTrainer as TRLSDFTTrainer
    from trl.experimental.sdpo import SDPOConfig
    from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer

from kdfast.integrations.self_distillation import SelfDistillationSettings, self_distillation_rows  # noqa: E402
from kdfast.integrations.trl import SDFTTrainer, SDPOTrainer  # noqa: E402
from kdfast.top_k_support import HeadMap  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny Llama whose sharpened head gives distributions far from uniform, saved with its tokenizer (TRL builds
    the frozen teacher from the student's path)."""
    path = tmp_path_factory.mktemp("self_distillation") / "model"
    model = tiny_llama(32, vocab=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    return str(path)


def _config(cls, tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, max_completion_length=6,
                    num_generations=1, bf16=False)
    settings.update(overrides)
    return cls(**settings)


def _trainer(cls, model_path, tmp_path, **config):
    """A trainer whose frozen teacher (TRL's copy of the student's initial weights) is moved off the student, so
    that the two models differ as a teacher with privileged context would."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["w2 w3", "w4 w5 w6", "w7", "w8 w9"],
                                 "privileged_context": ["w10 w11", "w12", "w13 w14 w15", "w16"]})
    sdpo = issubclass(cls, TRLSDPOTrainer)
    config_cls = SDPOConfig if sdpo else SDFTConfig
    extra = {"reward_funcs": [lambda completions, **kwargs: [float(len(c)) for c in completions]]} if sdpo else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model_path, args=_config(config_cls, tmp_path, **config),
                      processing_class=word_tokenizer(VOCAB), train_dataset=dataset, **extra)
    if trainer.teacher_model is not trainer.model:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in trainer.teacher_model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which these tests call past
    return trainer


def _batch(rows=3, prompt=4, completion=6, seed=0, old_logprobs=False):
    """A generated batch as TRL's trainers hand it to compute_loss: the student's prompt (one left-padded), the
    completion (one ended early), and the teacher's prompt (longer: its privileged context) before the same
    completion."""
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(rows, completion, dtype=torch.long)
    completion_mask[1, 3:] = 0
    batch = {"prompt_ids": torch.randint(2, VOCAB, (rows, prompt), generator=generator),
             "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
             "completion_ids": torch.randint(2, VOCAB, (rows, completion), generator=generator),
             "completion_mask": completion_mask}
    batch["prompt_mask"][2, 0] = 0
    teacher_prompt = torch.randint(2, VOCAB, (rows, prompt + 3), generator=generator)
    batch["teacher_input_ids"] = torch.cat([teacher_prompt, batch["completion_ids"]], 1)
    batch["teacher_attention_mask"] = torch.cat([torch.ones_like(teacher_prompt), completion_mask], 1)
    if old_logprobs:  # a rollout's log-probs, some far enough off for the clip to bite
        batch["old_per_token_logps"] = -4.5 + torch.randn(rows, completion, generator=generator)
    return batch


def _loss_metrics_gradients(trainer, compute_loss, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    trainer._metrics["train"].clear()
    loss = compute_loss(trainer, trainer.model, batch)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()
                 if parameter.grad is not None}
    return loss.detach(), {key: list(values) for key, values in trainer._metrics["train"].items()}, gradients


def _assert_same_as_trl(trainer, trl_cls, batch, rtol=1e-5):
    expected = _loss_metrics_gradients(trainer, trl_cls.compute_loss, batch)
    actual = _loss_metrics_gradients(trainer, type(trainer).compute_loss, batch)
    assert_same_trainer_outcome(actual, expected, rtol)
    return expected


SDFT_CASES = [
    dict(distillation_mode="topk_logits", distillation_topk=10),  # SDFT's default: renormalised, JSD(0.5)
    dict(distillation_mode="topk_logits", distillation_topk=10, distillation_alpha=0.0),
    dict(distillation_mode="topk_logits", distillation_topk=10, distillation_alpha=1.0, distillation_add_tail=True),
    dict(distillation_mode="topk_logits", distillation_topk=25, distillation_add_tail=True),
    dict(distillation_mode="full_logits", distillation_alpha=0.0),
    dict(distillation_mode="full_logits", distillation_alpha=0.5),
    dict(distillation_mode="full_logits", distillation_alpha=1.0),
    dict(distillation_mode="sampled_token", distillation_alpha=1.0),
    dict(distillation_mode="full_logits", temperature=0.7, num_loss_tokens_to_skip=2),
    dict(distillation_mode="topk_logits", distillation_topk=10, temperature=1.3, num_loss_tokens_to_skip=1),
]


@pytest.mark.parametrize("clip", [True, False], ids=["clipped-ratio", "no-rollout-logprobs"])
@pytest.mark.parametrize("case", SDFT_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_sdft_loss_metric_and_gradients_equal_trl(model_path, tmp_path, case, clip):
    trainer = _trainer(SDFTTrainer, model_path, tmp_path, **case)
    expected = _assert_same_as_trl(trainer, TRLSDFTTrainer, _batch(old_logprobs=clip))
    assert float(expected[0]) != 0.0


def test_sdft_with_a_live_teacher_equals_trl(model_path, tmp_path):
    """The teacher is the student itself (on the teacher's prompt), its head the one being trained."""
    trainer = _trainer(SDFTTrainer, model_path, tmp_path, teacher_model_kind="live", distillation_mode="full_logits")
    assert trainer.teacher_model is trainer.model
    _assert_same_as_trl(trainer, TRLSDFTTrainer, _batch())


def test_sdft_with_a_lora_student_and_its_base_as_teacher_equals_trl(model_path, tmp_path):
    """A PEFT student whose teacher is its own base weights (TRL disables the adapter for the teacher's forward)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SDFTTrainer(model=model_path, args=_config(SDFTConfig, tmp_path, distillation_topk=10),
                              processing_class=word_tokenizer(VOCAB), peft_config=config,
                              train_dataset=Dataset.from_dict({"prompt": ["w2 w3"]}))
    trainer.current_gradient_accumulation_steps = 1
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an adapter that has learnt something, so that student and base differ
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    _assert_same_as_trl(trainer, TRLSDFTTrainer, _batch(old_logprobs=True))


def test_sdft_batch_without_kept_tokens_is_a_differentiable_zero(model_path, tmp_path):
    trainer = _trainer(SDFTTrainer, model_path, tmp_path, distillation_mode="full_logits",
                       num_loss_tokens_to_skip=6)
    loss, metrics, gradients = _loss_metrics_gradients(trainer, SDFTTrainer.compute_loss, _batch())
    assert float(loss) == 0.0
    assert metrics["self_distillation/distillation_loss"] == [0.0]
    assert gradients and all(bool((gradient == 0).all()) for gradient in gradients.values())


def test_sdft_never_builds_the_logits(model_path, tmp_path):
    """The LM head's forward (which would make [B, T, V] logits) is not called by kdfast's loss."""
    trainer = _trainer(SDFTTrainer, model_path, tmp_path, distillation_topk=10)
    skip_head_check(trainer.model)
    skip_head_check(trainer.teacher_model)
    calls = []
    for model in (trainer.model, trainer.teacher_model):
        model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    SDFTTrainer.compute_loss(trainer, trainer.model, _batch()).backward()
    assert calls == []
    TRLSDFTTrainer.compute_loss(trainer, trainer.model, _batch())
    assert len(calls) == 2  # TRL's: the student's logits and the teacher's (so the hook can see them)


def test_sdft_training_step_equals_trl(model_path, tmp_path):
    """Two steps of `train()`: TRL generates the completions (the same under the same seed) and updates the teacher's
    prompt; the parameters after them are the same with either loss."""
    results = []
    for cls in (TRLSDFTTrainer, SDFTTrainer):
        # SGD: Adam's first steps move each parameter by about the learning rate whatever its gradient's size.
        trainer = _trainer(cls, model_path, tmp_path / cls.__module__, max_steps=2, distillation_topk=10,
                           learning_rate=0.5, optim="sgd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        results.append({name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()})
    for name, parameter in results[0].items():
        torch.testing.assert_close(results[1][name], parameter, rtol=1e-4, atol=1e-5, msg=name)


def _serve_from_the_teacher(trainer, top_k):
    """TRL's server stubbed: `_get_teacher_token_logprobs_from_server` answers from the local teacher's logits of
    the teacher's prompt at the trainer's temperature (its top-k log-probs and the realised tokens', -inf and id 0
    past each completion, as TRL pads them), and the weight sync does nothing."""
    from types import SimpleNamespace

    teacher = trainer.teacher_model

    def answer(inputs, logits_to_keep):
        with torch.no_grad():
            logits = teacher(input_ids=inputs["teacher_input_ids"],
                             attention_mask=inputs["teacher_attention_mask"]).logits[:, :-1][:, -logits_to_keep:]
            logprobs = torch.log_softmax(logits / trainer.temperature, dim=-1)
        top = torch.topk(logprobs, top_k, dim=-1)
        actual = logprobs.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
        ended = inputs["completion_mask"] == 0
        return {"actual_logprobs": actual.masked_fill(ended, float("-inf")),
                "topk_logprobs": top.values.masked_fill(ended[..., None], float("-inf")),
                "topk_token_ids": top.indices.masked_fill(ended[..., None], 0)}

    trainer.use_teacher_server = True
    trainer.vllm_generation = SimpleNamespace(sync_weights=lambda: None)
    trainer._last_loaded_step = 0
    trainer._get_teacher_token_logprobs_from_server = answer
    return trainer


def _family(name):
    import transformers

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, pad_token_id=0)
    if name == "gemma2-softcap":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small, head_dim=16,
                                                                        final_logit_softcapping=2.0))
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**small, logits_scaling=0.25))


@pytest.fixture(scope="module", params=["gemma2-softcap", "granite-scaled"])
def family_path(request, tmp_path_factory):
    """A model whose forward maps its head's output before the softmax (Gemma-2's softcap, Granite's division of the
    logits by `logits_scaling`), saved with the tokenizer."""
    torch.manual_seed(0)
    model = _family(request.param)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mode", [dict(distillation_topk=10), dict(distillation_mode="full_logits"),
                                  dict(distillation_mode="sampled_token", distillation_alpha=1.0)],
                         ids=["topk", "full", "sampled"])
def test_sdft_with_each_models_logit_map_equals_trl(family_path, tmp_path, mode):
    """TRL compares the models' own logits (softcapped, scaled); kdfast applies the map each model's config names."""
    trainer = _trainer(SDFTTrainer, family_path, tmp_path, **mode)
    _assert_same_as_trl(trainer, TRLSDFTTrainer, _batch(old_logprobs=True))


def test_sdft_evaluation_loss_equals_trl(model_path, tmp_path):
    """An evaluation's compute_loss (no gradient, the models in eval mode): the same loss, logged as TRL's "eval"."""
    trainer = _trainer(SDFTTrainer, model_path, tmp_path, distillation_topk=10)
    trainer.model.eval()
    results = []
    for compute_loss in (TRLSDFTTrainer.compute_loss, SDFTTrainer.compute_loss):
        trainer._metrics["eval"].clear()
        with torch.no_grad():
            loss = compute_loss(trainer, trainer.model, _batch())
        results.append((loss, list(trainer._metrics["eval"]["self_distillation/distillation_loss"])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(results[1][1]), torch.tensor(results[0][1]), rtol=1e-5, atol=1e-6)
    assert not trainer._metrics["train"]


SERVED_CASES = [
    dict(distillation_mode="sampled_token", distillation_alpha=1.0),
    dict(distillation_mode="topk_logits", distillation_topk=10),  # renormalised over the teacher's top-k
    dict(distillation_mode="topk_logits", distillation_topk=10, distillation_alpha=0.0, distillation_add_tail=True),
    dict(distillation_mode="topk_logits", distillation_topk=20, distillation_alpha=1.0, distillation_add_tail=True,
         num_loss_tokens_to_skip=1, temperature=0.8),
]


@pytest.mark.parametrize("clip", [True, False], ids=["clipped-ratio", "no-rollout-logprobs"])
@pytest.mark.parametrize("case", SERVED_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_sdft_with_a_served_teacher_equals_trl(model_path, tmp_path, case, clip):
    """TRL's server path (`use_teacher_server`: the teacher's top-k and token log-probs from vLLM), its metric of the
    student's distance from the server's log-probs included."""
    trainer = _serve_from_the_teacher(_trainer(SDFTTrainer, model_path, tmp_path, **case),
                                      case.get("distillation_topk") or 1)
    expected = _assert_same_as_trl(trainer, TRLSDFTTrainer, _batch(old_logprobs=clip))
    assert "self_distillation/server_logprob_abs_diff" in expected[1]


def test_sdpo_with_a_served_teacher_equals_trl(model_path, tmp_path):
    trainer = _serve_from_the_teacher(_trainer(SDPOTrainer, model_path, tmp_path), 1)
    batch = _batch(old_logprobs=True)
    batch["advantages"] = torch.tensor([0.8, -1.2, 0.3])
    batch["self_distillation_mask"] = torch.tensor([1.0, 0.0, 1.0])
    _assert_same_as_trl(trainer, TRLSDPOTrainer, batch)


def test_served_teacher_missing_a_required_token_is_refused(model_path, tmp_path):
    trainer = _serve_from_the_teacher(_trainer(SDFTTrainer, model_path, tmp_path, distillation_topk=10), 10)
    served = trainer._get_teacher_token_logprobs_from_server

    def short_answer(inputs, logits_to_keep):
        answer = served(inputs, logits_to_keep)
        answer["actual_logprobs"][0, 2] = float("-inf")
        return answer

    trainer._get_teacher_token_logprobs_from_server = short_answer
    with pytest.raises(ValueError, match="no logprob for a required completion token"):
        SDFTTrainer.compute_loss(trainer, trainer.model, _batch())


SDPO_CASES = [
    dict(),  # SDPO's default: sampled-token reverse KL, all weight on the self-distillation
    dict(distillation_mode="full_logits", distillation_alpha=0.5),
    dict(distillation_mode="topk_logits", distillation_topk=10, distillation_add_tail=True),
    dict(distillation_weight=0.0),  # the policy term alone (dapo)
    dict(distillation_weight=0.0, loss_type="grpo", importance_sampling_level="sequence"),
    dict(distillation_weight=0.0, loss_type="dr_grpo"),
    dict(distillation_weight=0.4, distillation_mode="full_logits", loss_type="bnpo"),
    dict(distillation_weight=0.7, distillation_mode="topk_logits", distillation_topk=10),
]


@pytest.mark.parametrize("case", SDPO_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items())
                         or "defaults")
def test_sdpo_loss_metrics_and_gradients_equal_trl(model_path, tmp_path, case):
    trainer = _trainer(SDPOTrainer, model_path, tmp_path, **case)
    batch = _batch(old_logprobs=True)
    batch["advantages"] = torch.tensor([0.8, -1.2, 0.3])
    batch["self_distillation_mask"] = torch.tensor([1.0, 1.0, 0.0])  # the third had no successful peer
    _assert_same_as_trl(trainer, TRLSDPOTrainer, batch)


# TRL's own cases for its loss helpers (tests/experimental/test_self_distillation_trainer_behavior.py), on kdfast's
# per-token objective: with an identity head the hidden states are the logits, so TRL's probabilities go in as they
# are.

def _rows(student_probs, teacher_probs, token_ids, mode, old=None, **settings):
    student_logits, teacher_logits = torch.tensor(student_probs).log(), torch.tensor(teacher_probs).log()
    head = HeadMap(torch.eye(student_logits.shape[-1]))
    options = dict(alpha=1.0, topk=None, add_tail=False, is_clip=None, temperature=1.0)
    options.update(settings)
    weights = torch.ones(student_logits.shape[0])
    loss, metric = self_distillation_rows(student_logits, head, teacher_logits, head, torch.tensor(token_ids),
                                          weights, SelfDistillationSettings(mode, **options),
                                          torch.tensor(old).log() if old is not None else None)
    return loss, metric


def test_trl_case_full_logit_loss_matches_forward_kl():
    student, teacher = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5])
    loss, _ = _rows([[0.8, 0.2]], [[0.5, 0.5]], [0], "full_logits", alpha=0.0)
    torch.testing.assert_close(loss, (teacher * (teacher.log() - student.log())).sum())


def test_trl_case_sampled_token_loss_uses_selected_completion_ids():
    loss, _ = _rows([[0.1, 0.9], [0.7, 0.3]], [[0.4, 0.6], [0.2, 0.8]], [1, 0], "sampled_token")
    student, teacher = torch.tensor([0.9, 0.7]).log(), torch.tensor([0.6, 0.2]).log()
    torch.testing.assert_close(loss, ((student - teacher) * student).sum())


def test_trl_case_topk_loss_renormalizes_selected_student_support():
    loss, _ = _rows([[0.5, 0.3, 0.2]], [[0.2, 0.6, 0.2]], [0], "topk_logits", alpha=0.0, topk=2)
    student, teacher = torch.tensor([0.5, 0.3]), torch.tensor([0.2, 0.6])
    student, teacher = student / student.sum(), teacher / teacher.sum()
    torch.testing.assert_close(loss, (teacher * (teacher.log() - student.log())).sum())


def test_trl_case_topk_loss_can_include_tail_bucket():
    loss, _ = _rows([[0.5, 0.3, 0.2]], [[0.2, 0.6, 0.2]], [0], "topk_logits", alpha=0.0, topk=2, add_tail=True)
    student, teacher = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(loss, (teacher * (teacher.log() - student.log())).sum())


def test_trl_case_importance_sampling_clipping_caps_token_ratio():
    """TRL's case through the sampled-token objective: per-token losses times min(q / q_old, 2), logged as the
    clipped sum."""
    loss, metric = _rows([[0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.5, 0.5]], [0, 1], "sampled_token",
                         old=[0.05, 0.4], is_clip=2.0)
    student, teacher = torch.tensor([0.2, 0.4]), torch.tensor([0.5, 0.5])
    raw = (student.log() - teacher.log()) * student.log()
    expected = (raw * torch.minimum(student / torch.tensor([0.05, 0.4]), torch.tensor(2.0))).sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metric, expected)


def test_settings_refuse_what_trl_refuses():
    with pytest.raises(ValueError, match="distillation_topk"):
        SelfDistillationSettings("topk_logits", 0.5, None, False, None, 1.0)
    with pytest.raises(ValueError, match="distillation_alpha must be 1.0"):
        SelfDistillationSettings("sampled_token", 0.5, None, False, None, 1.0)
    with pytest.raises(ValueError, match="distillation_mode"):
        SelfDistillationSettings("logits", 0.5, None, False, None, 1.0)


class _RecordingTeacherClient:
    """TRL's stand-in for the vLLM server client: records the scoring requests and answers with a fixed response."""

    def __init__(self, response):
        self.response, self.calls = response, []

    def get_sequence_logprobs(self, **kwargs):
        self.calls.append(kwargs)
        return self.response


def _ragged_server_case(cls, model_path, tmp_path, second_row_logprobs):
    """TRL's test_server_loss_finite_with_masked_and_padded_rows (SDFT's and SDPO's) set-up, through TRL's own request
    and padding of the server's ragged answer: row 0 fully masked (nothing scored), row 1 shorter than the batch (its
    tail -inf); `second_row_logprobs` the top-2 of row 1's second token."""
    trainer = _trainer(cls, model_path, tmp_path, distillation_mode="topk_logits", distillation_topk=2,
                       distillation_alpha=0.5, distillation_add_tail=True, distillation_is_clip=None,
                       max_completion_length=3)
    trainer.use_teacher_server = True
    batch = {"prompt_ids": torch.tensor([[10, 11], [12, 13]]), "prompt_mask": torch.tensor([[1, 1], [1, 1]]),
             "completion_ids": torch.tensor([[14, 15, 16], [17, 18, 19]]),
             "completion_mask": torch.tensor([[0, 0, 0], [1, 1, 0]]),
             "teacher_input_ids": torch.tensor([[20, 21, 22, 14, 15, 16], [23, 24, 25, 17, 18, 19]]),
             "teacher_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])}
    response = {"actual_logprobs": [[], [[-1.1], [second_row_logprobs[0]]]],
                "logprobs": [[], [[-1.1, -1.5], second_row_logprobs]], "logprob_token_ids": [[], [[14, 15], [16, 17]]]}
    trainer.teacher_client = _RecordingTeacherClient(response)
    return trainer, batch


@pytest.mark.parametrize("cls", [SDFTTrainer, SDPOTrainer], ids=["sdft", "sdpo"])
def test_trl_case_server_loss_finite_with_masked_and_padded_rows(model_path, tmp_path, cls):
    """The loss and every gradient are finite, the request asked for the top-2, and the loss is TRL's. (TRL's case
    serves [-0.4, -0.9] for the second token, probabilities summing to 1.077: no distribution's, which TRL floors
    and trains on; kdfast refuses it by name, below. Here the second token's are [-0.6, -1.2].)"""
    trainer, batch = _ragged_server_case(cls, model_path, tmp_path, [-0.6, -1.2])
    loss = cls.compute_loss(trainer, trainer.model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in trainer.model.parameters() if p.grad is not None)
    assert trainer.teacher_client.calls[0]["top_logprobs"] == 2
    trl_class = TRLSDFTTrainer if cls is SDFTTrainer else TRLSDPOTrainer
    torch.testing.assert_close(loss.detach(), trl_class.compute_loss(trainer, trainer.model, batch).detach(),
                               rtol=1e-5, atol=1e-6)


def test_served_top_k_above_one_is_refused_with_the_tail(model_path, tmp_path):
    """TRL's own served values, [-0.4, -0.9] (0.670 + 0.407 = 1.077): with the tail bucket kdfast refuses them by
    name rather than flooring a negative rest."""
    trainer, batch = _ragged_server_case(SDFTTrainer, model_path, tmp_path, [-0.4, -0.9])
    with pytest.raises(ValueError, match=r"teacher server's top-2 log-probs of a kept token sum to 1.077"):
        SDFTTrainer.compute_loss(trainer, trainer.model, batch)
