"""TRL's own trainer cases for its self-distillation trainers, run on kdfast's `SDFTTrainer` and `SDPOTrainer`: the
`train()` and `evaluate()` flows (generation, reward scoring, the teacher's reprompt, buffered batches, rollout
log-probs, EMA and PEFT teachers) inside which kdfast's `compute_loss` runs, with upstream's inputs and expectations.

Ported from huggingface/trl tests/experimental/test_sdpo_trainer.py (TestSDPOTrainer): test_train,
test_train_without_successful_rollouts, test_train_populates_old_log_probs_for_distillation_clipping_when_misaligned,
test_evaluation_uses_num_generations_eval_for_teacher_grouping,
test_teacher_reprompt_preserves_curly_braces_in_solution_and_feedback,
test_train_with_conversational_prompts_preserves_context, test_train_with_feedback_only_reprompts_teacher,
test_train_warns_when_sdpo_rewards_are_flat, test_train_preserves_teacher_completion_attention_mask, and
test_train_with_positional_config_argument.

Ported from huggingface/trl tests/experimental/test_sdft_trainer.py (TestSDFTTrainer): test_train,
test_train_rejects_none_privileged_context, test_train_with_generate_from_teacher,
test_train_with_chat_template_kwargs, test_train_with_peft_model, test_train_with_peft_model_and_ema_teacher_sync,
test_train_populates_old_log_probs_for_distillation_clipping_when_misaligned,
test_train_with_generate_from_teacher_skips_old_log_probs_for_distillation_clipping,
test_train_reuses_buffered_generation_batches.

Adapted: the Hub models (trl-internal-testing/tiny-Qwen2ForCausalLM-2.5, tiny-Qwen3ForCausalLM,
tiny-Qwen2ForSequenceClassification-2.5) are tiny randomly initialised models of the same families built here, with a
byte-level tokenizer (so that decoded teacher prompts hold upstream's text exactly) and a small Jinja chat template;
the trl-internal-testing/zen dataset is a few prompts built here; steps are capped (`max_steps`) to keep the file
fast, and a few cases take a second step where upstream's one would leave kdfast's loss zero or its teacher the same
as the student (each says so). Where upstream trains with AdamW, these train with SGD and a large learning rate, and
TRL's own trainer runs the same case on the same seed: each parameter's update must equal TRL's (Adam moves every
parameter by about the learning rate whatever its gradient, so only SGD makes that comparison say something about the
loss).

Not ported: test_trust_remote_code (both files; a Hub model with custom code, and the loss never runs),
test_init_with_eval_dataset (both; construction only, no loss), test_vllm_config_defaults_match_reference_trainers
(SDPO; config defaults, no loss), test_liger_loss_matches_non_liger_loss (both; TRL 1.16's trainers have no Liger
loss path, and the test needs an accelerator), test_server_loss_finite_with_masked_and_padded_rows (both;
already ported in test_trl_self_distillation.py)."""

import logging
import warnings

import pytest
import torch
from transformers import TrainerCallback

pytest.importorskip("trl.experimental.sdft")
pytest.importorskip("trl.experimental.sdpo")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.sdft import SDFTConfig
    from trl.experimental.sdft import SDFTTrainer as TRLSDFTTrainer
    from trl.experimental.sdpo import SDPOConfig
    from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer

from kdfast.integrations.trl import SDFTTrainer, SDPOTrainer  # noqa: E402

# A chat template that keeps every message's role and content, with Qwen3's `enable_thinking` switch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def byte_tokenizer():
    """Every byte a token (ids 2..257) after <pad> (0) and </s> (1): any text round-trips through it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, **{char: index + 2 for index, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


VOCAB = len(byte_tokenizer())
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=1)


def _tiny(family):
    import transformers

    torch.manual_seed(0)
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8))
    if family == "qwen2-reward":
        return transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(**SMALL, num_labels=1))
    # Qwen2.5's tiny test model ties its head to the embedding, as Qwen2.5's small models do.
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny models' paths, saved with the tokenizer (TRL builds the frozen or EMA teacher from the path). The
    heads are sharpened so that the distributions are far from uniform and the teacher's context matters."""
    paths = {}
    for family in ("qwen2", "qwen3", "qwen2-reward"):
        model = _tiny(family)
        with torch.no_grad():
            if family == "qwen2-reward":  # scores spread over several units: some pass SDPO's threshold of 1.0
                model.score.weight.mul_(200.0)
            else:
                model.get_output_embeddings().weight.mul_(8.0)
        path = tmp_path_factory.mktemp(family) / "model"
        model.save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        paths[family] = str(path)
    return paths


class CaptureCallback(TrainerCallback):
    """Upstream's SelfDistillationCaptureCallback (both files'): records what TRL's self-distillation events carry."""

    def __init__(self):
        self.teacher_input_text = None
        self.teacher_input_texts = []
        self.self_distillation_masks = []
        self.teacher_attention_mask = None
        self.completion_mask = None
        self.old_per_token_logps = None
        self.prompt_ids = None
        self.generation_prompts = None
        self.generation_batch_build_count = 0

    def on_teacher_context_built(self, processing_class=None, teacher_input_ids=None, teacher_attention_mask=None,
                                 completion_mask=None, self_distillation_mask=None, **kwargs):
        texts = [processing_class.decode(ids, skip_special_tokens=True) for ids in teacher_input_ids]
        if self.teacher_input_text is None:
            self.teacher_input_text = texts[0]
        self.teacher_input_texts.extend(texts)
        if self.teacher_attention_mask is None:
            self.teacher_attention_mask = teacher_attention_mask.detach().cpu()
            self.completion_mask = completion_mask.detach().cpu()
        self.self_distillation_masks.append(self_distillation_mask.detach().cpu())

    def on_self_distillation_batch_prepared(self, old_per_token_logps=None, prompt_ids=None, **kwargs):
        if self.old_per_token_logps is None and old_per_token_logps is not None:
            self.old_per_token_logps = old_per_token_logps.detach().cpu()
        if self.prompt_ids is None and prompt_ids is not None:
            self.prompt_ids = prompt_ids.detach().cpu()

    def on_generation_prompts_selected(self, generation_prompts=None, **kwargs):
        if self.generation_prompts is None:
            self.generation_prompts = generation_prompts

    def on_generation_batch_built(self, **kwargs):
        self.generation_batch_build_count += 1


def _dataset(**columns):
    from datasets import Dataset

    return Dataset.from_dict(columns)


def _trainer(cls, model, tmp_path, dataset, *, callbacks=(), peft_config=None, reward_funcs=None,
             eval_dataset=None, **config):
    """`cls` on upstream's settings (`config`) with the CPU, no reports and a step's log; SGD unless `optim` says."""
    sdpo = issubclass(cls, TRLSDPOTrainer)
    settings = dict(output_dir=str(tmp_path / f"{cls.__module__}.{cls.__name__}"), report_to=[], use_cpu=True,
                    bf16=False, save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=0.1,
                    optim="sgd")
    settings.update(config)
    extra = dict(reward_funcs=reward_funcs) if sdpo else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = (SDPOConfig if sdpo else SDFTConfig)(**settings)
        return cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                   processing_class=byte_tokenizer(), callbacks=list(callbacks), peft_config=peft_config, **extra)


def _train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def _trainable(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def _train_both(kdfast_cls, model, tmp_path, dataset, *, callbacks=None, **options):
    """Trains TRL's trainer and kdfast's on the same case and seed (fresh callbacks for each from `callbacks`, a
    factory): each parameter's update is TRL's to 0.1% of the largest, which is well above fp32's rounding of the
    parameters (~1e-7), and the logged losses are TRL's. Returns kdfast's trainer, its callbacks and its parameters
    before training."""
    trl_cls = TRLSDPOTrainer if kdfast_cls is SDPOTrainer else TRLSDFTTrainer
    results = []
    for cls in (trl_cls, kdfast_cls):
        made = callbacks() if callbacks else []
        trainer = _trainer(cls, model, tmp_path, dataset, callbacks=made, **options)
        before = _trainable(trainer.model)
        _train(trainer)
        after = _trainable(trainer.model)
        results.append((trainer, made, before, {name: after[name] - value for name, value in before.items()}))
    (expected, _, start, expected_updates), (actual, made, before, updates) = results
    moved = max(float(update.abs().max()) for update in expected_updates.values())
    assert moved > 1e-4, "the steps hardly moved the parameters: the comparison would say nothing"
    for name, update in expected_updates.items():
        torch.testing.assert_close(before[name], start[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(updates[name], update, rtol=1e-3, atol=1e-3 * moved, msg=name)
    _assert_same_logged_losses(actual, expected)
    return actual, made, before


def _assert_same_logged_losses(actual, expected):
    """Each logged step's loss and distillation metric are TRL's."""
    keys = ("loss", "self_distillation/distillation_loss", "self_distillation/policy_loss")
    for mine, theirs in zip(actual.state.log_history, expected.state.log_history, strict=True):
        for key in keys:
            if key in theirs:
                torch.testing.assert_close(torch.tensor(mine[key]), torch.tensor(theirs[key]), rtol=1e-4, atol=1e-6,
                                           msg=key)


def _step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "self_distillation/distillation_loss" in entry]


def _assert_changed(trainer, before, every=False):
    """Upstream's check: some trainable parameter moved (SDFT), or each that is not all zeros (SDPO's test_train)."""
    after = _trainable(trainer.model)
    changed = {name: not torch.equal(value, after[name]) for name, value in before.items()}
    if every:
        unchanged = [name for name, value in before.items() if value.sum() != 0 and not changed[name]]
        assert not unchanged, f"parameters not changed: {unchanged}"
    else:
        assert any(changed.values())


# SDPO (huggingface/trl tests/experimental/test_sdpo_trainer.py)

ZEN_PROMPTS = ["The sky is", "The quick brown fox", "Beautiful is better than", "Explicit is"]


def _zero_reward(**kwargs):
    return [0.0] * len(kwargs["prompts"])


def _first_only_reward(**kwargs):
    """Only the first sample of the batch succeeds."""
    return [1.0, 0.0][: len(kwargs["prompts"])]


def test_sdpo_train_changes_every_parameter_as_trl(models, tmp_path):
    """test_train: a reward model (loaded by TRL from its path) scores three generations per prompt; top-k
    self-distillation from successful peers, no clip."""
    trainer, (capture,), before = _train_both(
        SDPOTrainer, models["qwen2"], tmp_path, _dataset(prompt=ZEN_PROMPTS), callbacks=lambda: [CaptureCallback()],
        reward_funcs=models["qwen2-reward"], per_device_train_batch_size=3, num_generations=3, max_completion_length=8,
        distillation_mode="topk_logits", distillation_topk=5, distillation_is_clip=None, max_steps=2)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert any(bool(mask.any()) for mask in capture.self_distillation_masks), "no reprompted sample: a zero loss"
    _assert_changed(trainer, before, every=True)


def test_sdpo_positional_config_argument(models, tmp_path):
    """test_train_with_positional_config_argument: model, reward function, config and dataset given by position;
    the environment's feedback reprompts the teacher, so the step trains."""
    dataset = _dataset(prompt=["Solve 2+2."], privileged_context=["Your earlier answer used the wrong format."])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = SDPOConfig(output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=1,
                          generation_batch_size=2, num_generations=2, max_completion_length=8,
                          include_environment_feedback=True, max_steps=1, report_to=[], use_cpu=True, bf16=False,
                          save_strategy="no", disable_tqdm=True, logging_steps=1)
        trainer = SDPOTrainer(models["qwen2"], _zero_reward, args, dataset, processing_class=byte_tokenizer())
    _train(trainer)
    assert trainer.args.output_dir == str(tmp_path)
    assert trainer.args.include_environment_feedback is True
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert _step_logs(trainer)[0]["self_distillation/distillation_loss"] != 0.0


def test_sdpo_train_without_successful_rollouts_is_a_zero_loss(models, tmp_path):
    """test_train_without_successful_rollouts: no rollout succeeds, so no teacher is reprompted and the
    self-distillation (all of SDPO's loss by default) is zero, its gradient too."""
    trainer = _trainer(SDPOTrainer, models["qwen2"], tmp_path, _dataset(prompt=ZEN_PROMPTS), reward_funcs=_zero_reward,
                       per_device_train_batch_size=3, num_generations=3, max_completion_length=8,
                       distillation_is_clip=None, max_steps=2)
    before = _trainable(trainer.model)
    _train(trainer)
    assert trainer.state.log_history[-1]["train_loss"] == 0.0
    assert [entry["self_distillation/distillation_loss"] for entry in _step_logs(trainer)] == [0.0, 0.0]
    after = _trainable(trainer.model)
    assert all(torch.equal(value, after[name]) for name, value in before.items())


def test_sdpo_misaligned_accumulation_populates_old_logprobs(models, tmp_path):
    """test_train_populates_old_log_probs_for_distillation_clipping_when_misaligned: 3 accumulation steps over
    generations of 2 steps, so the rollout's log-probs are kept for the clipped ratio."""
    capture = CaptureCallback()
    trainer = _trainer(SDPOTrainer, models["qwen2"], tmp_path, _dataset(prompt=["Solve 2+2.", "Solve 3+3."]),
                       callbacks=[capture], reward_funcs=_zero_reward, per_device_train_batch_size=1,
                       gradient_accumulation_steps=3, steps_per_generation=2, num_generations=2,
                       max_completion_length=8, max_steps=1)
    _train(trainer)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert capture.old_per_token_logps is not None


def test_sdpo_misaligned_accumulation_weights_the_loss_by_the_rollout_ratio_as_trl(models, tmp_path):
    """The same set-up with one success per group (upstream's zero reward leaves the loss zero) and two optimizer
    steps: the fourth micro-step trains on a rollout sampled before the first step, so the importance ratio against
    the kept log-probs is not 1 there and weights kdfast's loss as it does TRL's. (At this seed and learning rate one
    token's ratio is about 3.2, so that SDPO's default clip, 2.0, acts too.)"""
    trainer, (capture,), _ = _train_both(
        SDPOTrainer, models["qwen2"], tmp_path, _dataset(prompt=["Solve 2+2.", "Solve 3+3."]),
        callbacks=lambda: [CaptureCallback()], reward_funcs=_first_only_reward, per_device_train_batch_size=1,
        gradient_accumulation_steps=3, steps_per_generation=2, num_generations=2, max_completion_length=8,
        max_steps=2, learning_rate=2.0)
    assert any(bool(mask.any()) for mask in capture.self_distillation_masks)
    assert capture.old_per_token_logps is not None


def _eval_rewards(**kwargs):
    prompts = kwargs["prompts"]
    if len(prompts) == 4 and prompts.count("Alpha prompt") == 2 and prompts.count("Beta prompt") == 2:
        return [1.0, 0.0, 0.0, 0.0]
    return [0.0] * len(prompts)


def test_sdpo_evaluation_groups_teachers_by_num_generations_eval(models, tmp_path):
    """test_evaluation_uses_num_generations_eval_for_teacher_grouping: evaluation groups by `num_generations_eval`
    (2), not the training's 3, so Alpha's success teaches both Alpha samples and none of Beta's; the evaluation loss
    is TRL's."""
    eval_dataset = _dataset(prompt=["Alpha prompt", "Beta prompt", "Gamma prompt", "Delta prompt"])
    options = dict(reward_funcs=_eval_rewards, eval_dataset=eval_dataset, per_device_train_batch_size=1,
                   per_device_eval_batch_size=4, generation_batch_size=3, num_generations=3, num_generations_eval=2,
                   max_completion_length=8, success_reward_threshold=0.5, dont_reprompt_on_self_success=False,
                   distillation_is_clip=None, max_steps=1)
    results = []
    for cls in (TRLSDPOTrainer, SDPOTrainer):
        capture = CaptureCallback()
        trainer = _trainer(cls, models["qwen2"], tmp_path, eval_dataset.select(range(1)), callbacks=[capture],
                           **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append((trainer.evaluate(), capture))
    (expected, _), (metrics, capture) = results

    assert capture.teacher_input_texts
    alpha_teachers = [text for text in capture.teacher_input_texts if "Alpha prompt" in text]
    beta_teachers = [text for text in capture.teacher_input_texts if "Beta prompt" in text]
    assert alpha_teachers
    assert beta_teachers
    assert any("Correct solution:" in text for text in alpha_teachers)
    assert all("Correct solution:" not in text for text in beta_teachers)
    assert metrics["eval_loss"] != 0.0
    for key in ("eval_loss", "eval_self_distillation/distillation_loss"):
        torch.testing.assert_close(torch.tensor(metrics[key]), torch.tensor(expected[key]), rtol=1e-4, atol=1e-6,
                                   msg=key)


def test_sdpo_teacher_reprompt_keeps_curly_braces(models, tmp_path):
    """test_teacher_reprompt_preserves_curly_braces_in_solution_and_feedback: the prompt's and the feedback's braces
    reach the teacher as they are (no format escaping)."""
    dataset = _dataset(prompt=["Solve f(x) = {x^2}."], privileged_context=['Feedback: use {"x": 2} as a check.'])
    trainer, (capture,), _ = _train_both(
        SDPOTrainer, models["qwen2"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        reward_funcs=_first_only_reward, per_device_train_batch_size=1, generation_batch_size=2, num_generations=2,
        max_completion_length=8, include_environment_feedback=True, success_reward_threshold=0.5,
        dont_reprompt_on_self_success=False, max_steps=1, learning_rate=1.0)
    text = capture.teacher_input_text
    assert text is not None
    assert "Solve f(x) = {x^2}." in text
    assert 'Feedback: use {"x": 2} as a check.' in text
    assert "{{" not in text
    assert "}}" not in text


def test_sdpo_conversational_prompt_keeps_its_context(models, tmp_path):
    """test_train_with_conversational_prompts_preserves_context: with `dont_reprompt_on_self_success` (default) the
    first sample skips its own success and the second is reprompted from it, the system message kept. Two steps
    (upstream: one), one per sample of the generation, so that the reprompted sample trains too."""
    dataset = _dataset(prompt=[[{"role": "system", "content": "You are a careful assistant."},
                                {"role": "user", "content": "Solve 2+2."}]])
    trainer, (capture,), _ = _train_both(
        SDPOTrainer, models["qwen2"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        reward_funcs=_first_only_reward, per_device_train_batch_size=1, generation_batch_size=2, num_generations=2,
        max_completion_length=8, distillation_is_clip=None, success_reward_threshold=0.5, max_steps=2,
        learning_rate=1.0)
    text = capture.teacher_input_text
    assert text is not None
    assert "careful assistant" in text
    assert "Solve 2+2" in text
    assert capture.self_distillation_masks
    assert capture.self_distillation_masks[0].tolist() == [0.0, 1.0]


def test_sdpo_feedback_alone_reprompts_the_teacher(models, tmp_path):
    """test_train_with_feedback_only_reprompts_teacher: no success, but the environment's feedback reprompts the
    teacher, so the sample is self-distilled."""
    dataset = _dataset(prompt=[[{"role": "system", "content": "You are a careful assistant."},
                                {"role": "user", "content": "Try the puzzle again."}]],
                       privileged_context=["Your earlier answer violated the format requirements."])
    trainer, (capture,), _ = _train_both(
        SDPOTrainer, models["qwen2"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        reward_funcs=_zero_reward, per_device_train_batch_size=1, generation_batch_size=2, num_generations=2,
        max_completion_length=8, distillation_is_clip=None, include_environment_feedback=True, max_steps=1,
        learning_rate=1.0)
    assert capture.teacher_input_text is not None
    assert "format requirements" in capture.teacher_input_text
    assert capture.self_distillation_masks
    assert capture.self_distillation_masks[0][0].item() == 1.0


def test_sdpo_flat_rewards_warn(models, tmp_path, caplog):
    """test_train_warns_when_sdpo_rewards_are_flat: flat rewards and an inactive self-distillation are warned about
    (the first step, then every `diagnostics_warning_interval`), the loss then zero."""
    trainer = _trainer(SDPOTrainer, models["qwen2"], tmp_path, _dataset(prompt=ZEN_PROMPTS), reward_funcs=_zero_reward,
                       per_device_train_batch_size=3, num_generations=3, max_completion_length=8,
                       diagnostics_warning_interval=2, max_steps=2)
    with caplog.at_level(logging.WARNING):
        _train(trainer)
    assert "Observed flat SDPO rewards across all sampled generations" in caplog.text
    assert "SDPO self-distillation is inactive because no reprompted samples were constructed" in caplog.text
    assert [entry["loss"] for entry in _step_logs(trainer)] == [0.0, 0.0]


def test_sdpo_teacher_completion_attention_mask_is_the_completion_mask(models, tmp_path):
    """test_train_preserves_teacher_completion_attention_mask: the teacher's attention over the completion is the
    student's completion mask. Two steps (upstream: one), so that the second sample, reprompted from the first's
    success, trains."""
    trainer, (capture,), _ = _train_both(
        SDPOTrainer, models["qwen2"], tmp_path, _dataset(prompt=["Solve 2+2."]), callbacks=lambda: [CaptureCallback()],
        reward_funcs=_first_only_reward, per_device_train_batch_size=1, generation_batch_size=2, num_generations=2,
        max_completion_length=8, success_reward_threshold=0.5, max_steps=2, learning_rate=1.0)
    assert capture.teacher_attention_mask is not None
    assert capture.completion_mask is not None
    length = capture.completion_mask.shape[1]
    assert torch.equal(capture.teacher_attention_mask[0, -length:], capture.completion_mask[0])


# SDFT (huggingface/trl tests/experimental/test_sdft_trainer.py)

SDFT_PROMPTS = dict(prompt=["Solve 2+2.", "Name the capital of France."],
                    privileged_context=["Example answer: 4.", "Example answer: Paris."])
ARITHMETIC = dict(prompt=["Solve 2+2.", "Solve 3+3."], privileged_context=["Example answer: 4.", "Example answer: 6."])


def test_sdft_train_changes_parameters_as_trl(models, tmp_path):
    """test_train: one step of SDFT's defaults (top-100 logits, JSD, a frozen copy of the initial student as
    teacher)."""
    trainer, _, before = _train_both(SDFTTrainer, models["qwen2"], tmp_path, _dataset(**SDFT_PROMPTS),
                                     per_device_train_batch_size=1, max_completion_length=8, max_steps=1,
                                     num_generations=1, learning_rate=1.0)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    _assert_changed(trainer, before)


def test_sdft_none_privileged_context_is_refused(models, tmp_path):
    """test_train_rejects_none_privileged_context."""
    trainer = _trainer(SDFTTrainer, models["qwen2"], tmp_path,
                       _dataset(prompt=["Solve 2+2."], privileged_context=[None]), per_device_train_batch_size=1,
                       max_completion_length=8, max_steps=1, num_generations=1)
    with pytest.raises(ValueError, match="`privileged_context` must not be None"):
        _train(trainer)


def test_sdft_generate_from_teacher_samples_with_the_teachers_prompt(models, tmp_path):
    """test_train_with_generate_from_teacher: the completion is sampled from the teacher's prompt (prompt and hint),
    the student trained on the prompt alone."""
    dataset = _dataset(prompt=["Solve 2+2.", "Solve 3+3."],
                       privileged_context=["Teacher hint: answer with 4 and explain briefly.",
                                           "Teacher hint: answer with 6 and explain briefly."])
    trainer, (capture,), _ = _train_both(
        SDFTTrainer, models["qwen2"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        per_device_train_batch_size=1, max_completion_length=8, max_steps=1, num_generations=1,
        generate_from_teacher=True, learning_rate=1.0)
    assert capture.generation_prompts == ["Solve 2+2.\n\nTeacher hint: answer with 4 and explain briefly."]
    student_prompt = trainer.processing_class.decode(capture.prompt_ids[0], skip_special_tokens=True)
    assert "Teacher hint" not in student_prompt
    assert "Solve 2+2." in student_prompt


def test_sdft_chat_template_kwargs_reach_the_template(models, tmp_path):
    """test_train_with_chat_template_kwargs: Qwen3 with `enable_thinking=False`, which the template turns into an
    empty think block in the student's prompt."""
    dataset = _dataset(prompt=[[{"role": "user", "content": "Solve 2+2."}],
                               [{"role": "user", "content": "Solve 3+3."}]],
                       privileged_context=["Teacher hint: answer with 4.", "Teacher hint: answer with 6."])
    trainer, (capture,), before = _train_both(
        SDFTTrainer, models["qwen3"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        per_device_train_batch_size=1, max_completion_length=8, max_steps=1, num_generations=1,
        chat_template_kwargs={"enable_thinking": False}, learning_rate=1.0)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    _assert_changed(trainer, before)
    student_prompt = trainer.processing_class.decode(capture.prompt_ids[0], skip_special_tokens=True)
    assert "<think>\n\n</think>" in student_prompt


def _lora():
    """Upstream's adapter. Its B starts at zero, so that a step moves it little: the PEFT cases take a larger
    learning rate."""
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])


def test_sdft_peft_student_trains_its_adapter_as_trl(models, tmp_path):
    """test_train_with_peft_model: a LoRA student whose teacher is its base weights (the adapter disabled). Two
    steps (upstream: one): at the first the adapter is still zero, so only the second tells base from student."""
    trainer, _, before = _train_both(SDFTTrainer, models["qwen2"], tmp_path, _dataset(**SDFT_PROMPTS),
                                     peft_config=_lora(), per_device_train_batch_size=1, max_completion_length=8,
                                     max_steps=2, num_generations=1, learning_rate=10.0)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert all("lora_" in name for name in before)
    _assert_changed(trainer, before)


def test_sdft_peft_student_with_ema_teacher_adapter_as_trl(models, tmp_path):
    """test_train_with_peft_model_and_ema_teacher_sync: the teacher a second ("teacher") LoRA adapter, moved towards
    the student's after each step; the second step's teacher is that EMA."""
    trainer, _, before = _train_both(SDFTTrainer, models["qwen2"], tmp_path, _dataset(**SDFT_PROMPTS),
                                     peft_config=_lora(), per_device_train_batch_size=1, max_completion_length=8,
                                     max_steps=2, num_generations=1, teacher_model_kind="ema",
                                     teacher_update_rate=0.05, teacher_sync_steps=1, learning_rate=10.0)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    _assert_changed(trainer, before)
    # The teacher adapter's B started at zero, as the student's did: the syncs have moved it towards the student's.
    teacher = [parameter for name, parameter in trainer.model.named_parameters() if "lora_B.teacher" in name]
    assert teacher and any(bool(parameter.abs().sum() > 0) for parameter in teacher)


def test_sdft_misaligned_accumulation_populates_old_logprobs(models, tmp_path):
    """test_train_populates_old_log_probs_for_distillation_clipping_when_misaligned: 3 accumulation steps over
    generations of 2 steps, so the rollout's log-probs are kept for the clipped ratio."""
    capture = CaptureCallback()
    trainer = _trainer(SDFTTrainer, models["qwen2"], tmp_path, _dataset(**ARITHMETIC), callbacks=[capture],
                       per_device_train_batch_size=1, gradient_accumulation_steps=3, steps_per_generation=2,
                       max_completion_length=8, max_steps=1, num_generations=1)
    _train(trainer)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert capture.old_per_token_logps is not None


def test_sdft_misaligned_accumulation_weights_the_loss_by_the_rollout_ratio_as_trl(models, tmp_path):
    """The same set-up over four prompts (upstream's two make an epoch of two micro-steps, each optimizer step's
    rollouts its own) and two optimizer steps: the fourth micro-step trains on a rollout sampled before the first
    optimizer step, so the importance ratio (under SDFT's default clip, 2.0) is not 1 there and weights kdfast's loss
    as it does TRL's. The learning rate is large enough for that ratio (0.993 to 1.002) to show in the update."""
    dataset = _dataset(prompt=[f"Solve {n}+{n}." for n in range(2, 6)],
                       privileged_context=[f"Example answer: {2 * n}." for n in range(2, 6)])
    trainer, (capture,), _ = _train_both(
        SDFTTrainer, models["qwen2"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        per_device_train_batch_size=1, gradient_accumulation_steps=3, steps_per_generation=2,
        max_completion_length=8, max_steps=2, num_generations=1, learning_rate=10.0)
    assert capture.old_per_token_logps is not None


def test_sdft_generate_from_teacher_skips_old_logprobs(models, tmp_path):
    """test_train_with_generate_from_teacher_skips_old_log_probs_for_distillation_clipping: the teacher sampled the
    completion, so the student's log-probs are no rollout's and the clip is not applied."""
    dataset = _dataset(prompt=["Solve 2+2.", "Solve 3+3."],
                       privileged_context=["Teacher hint: answer with 4.", "Teacher hint: answer with 6."])
    trainer, (capture,), _ = _train_both(
        SDFTTrainer, models["qwen2"], tmp_path, dataset, callbacks=lambda: [CaptureCallback()],
        per_device_train_batch_size=1, gradient_accumulation_steps=3, steps_per_generation=2,
        max_completion_length=8, max_steps=1, num_generations=1, generate_from_teacher=True, learning_rate=1.0)
    assert capture.old_per_token_logps is None


def test_sdft_buffered_generation_batch_is_reused(models, tmp_path):
    """test_train_reuses_buffered_generation_batches: two steps from one generation (`steps_per_generation=2`)."""
    trainer, (capture,), _ = _train_both(
        SDFTTrainer, models["qwen2"], tmp_path, _dataset(**ARITHMETIC), callbacks=lambda: [CaptureCallback()],
        per_device_train_batch_size=1, steps_per_generation=2, max_completion_length=8, max_steps=2,
        num_generations=1, learning_rate=1.0)
    assert capture.generation_batch_build_count == 1
    assert len(_step_logs(trainer)) == 2
