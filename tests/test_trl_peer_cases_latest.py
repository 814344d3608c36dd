"""TRL's newest test cases for behaviour kdfast shares with it that kdfast's earlier ports (tests/test_trl_*peer*.py,
tests/test_peer_jsd_cases.py, tests/test_sparse_peer_cases*.py) do not have yet: TRL's inputs, tolerances and
expectations, kdfast's code under test, each test naming the TRL test it ports.

Multi-teacher distillation, huggingface/trl tests/test_distillation_trainer.py at 34874dc (the same text, 118,721
characters, is stored at 2436fa1 beside tests/distributed/test_distillation_trainer_multi_teacher.py; another
revision, c485cd2, takes the teachers as a separate `teacher_models=` argument): TestDistillationTrainerMultiTeacher,
a mapping of teachers as the `teacher_model` argument, a `teacher_id` column routing each row to one of them, and
per-teacher metrics. TRL's teachers are two checkpoints saved from its tiny student fixture with every weight scaled
by 1.05 and 0.95; here the same of tests/tiny_models.py's tiny Llama, passed as paths (so kdfast loads the second
one itself), the word tokenizer and made-up word prompts standing in for TRL's Hub model and zen prompts. TRL logs
`teacher_jsd/<id>` and `teacher_token_frac/<id>`; kdfast the same quantities as `divergence/teacher_<id>` (each
teacher's divergence per token it scored) and `tokens/teacher_<id>` (its share of the tokens), read here under
kdfast's names. Ported: test_single_entry_matches_teacher_model, test_same_teacher_twice_matches_teacher_model,
test_two_teachers_log_per_teacher_metrics (in two parts), test_teacher_id_routing_errors (an unknown ID),
test_unknown_teacher_id_in_eval_dataset_is_rejected, test_unknown_teacher_id_in_an_iterable_dataset_is_rejected_
while_training, test_teacher_id_column_is_optional_with_one_teacher, test_teacher_vocab_size_must_match_student,
test_teacher_jsd_is_the_token_weighted_window_mean (on real models: TRL stubs `_forward_redirection` with a 4-tuple
that kdfast's loss does not return), test_empty_teacher_model_mapping_is_rejected,
test_mapping_argument_wins_over_the_config_teacher, test_gradient_accumulation_matches_teacher_model,
test_evaluation_with_multiple_teachers and test_evaluation_loss_does_not_scale_with_the_number_of_groups.

These cases found four places where kdfast's trainer answered otherwise than TRL expects, fixed since: a one-entry
mapping ran kdfast's several-teacher kernel (now the single teacher's arithmetic, bitwise); a teacher that scored no
token in a window was logged with divergence 0.0 (now left out) and the window's divergence was the mean of its
micro-batches' means (now per token over the window); a mapping's other teachers' vocabularies and the datasets'
`teacher_id`s were checked only when a step reached them (now where the trainer is built).

Left out of TestDistillationTrainerMultiTeacher, as TRL features kdfast does not have: the teacher manifest and its
checks on resume (test_checkpoint_manifest_is_written_before_the_parent_serializes, test_resume_checks_teacher_
manifest, test_resume_requires_a_teacher_manifest), per-teacher loading options and the refusal of quantized or
dispatched teachers (test_per_teacher_init_kwargs, test_rejects_unsupported_teacher_kwargs,
test_accepts_inert_teacher_kwargs, test_rejects_unsupported_per_teacher_override,
test_accepts_common_option_every_teacher_overrides, test_rejects_preloaded_quantized_teacher,
test_rejects_quantized_teacher_checkpoint), per-teacher scoring time (test_per_teacher_scoring_time_is_logged), the
one-teacher-at-a-time device memory bound (test_teacher_memory_bounded_by_largest_teacher, an accelerator), a
mapping given in the config or on the command line (test_config_parses_a_json_object_teacher_and_keeps_a_plain_id,
test_teachers_from_the_config_mapping: TRL 1.16's trainer does not read `teacher_model_name_or_path`, and kdfast
takes TRL's config as is), test_cached_hub_teacher_loads_offline (the Hub) and test_rejects_vlm_student (kdfast
routes a VLM's teachers over every sequence rather than refusing it); and test_teacher_id_routing_errors' case of no
`teacher_id` column with two teachers, which kdfast answers by design with their mixture, 1/M each (README, "Several
teachers at once").
tests/distributed/test_distillation_trainer_multi_teacher.py (two gloo ranks against one process, a DTensor student
head with unequal teacher groups per rank) is what tests/trainer_sharded_trl_cases.py's trl_distillation_case runs on
kdfast's trainer already (two routed teachers, a rank without the second's rows, under FSDP2 and ZeRO-3 on two gloo
ranks, each step's loss, gradients and parameters against an unsharded student and TRL's float64 loss).

TRL's experimental trainer, tests/experimental/test_distillation_trainer.py at f2cd577 (TRL's main, the stored
snapshot): test_num_items_in_batch_counts_the_tokens_trained_on, whose denominator (the completion tokens of the
whole accumulation window) TRL 1.16's stable trainer computes too and kdfast's applies: here on kdfast's trainer,
with one teacher and with two routed ones. The rest of that file's new cases test the experimental trainer's own
generation batch (test_generated_batch_emits_completion_mask / _prompt_and_completion_ids, Liger, dataloader
set_epoch), which kdfast does not subclass; its TestGeneralizedJSDLoss is GKD's, ported in tests/test_peer_jsd_cases.py.

TRL's kernels, tests/test_kernels.py at 01c5a6d: TestChunkedLogProbFunction.test_backward_frozen_head (the rest of
that class is in tests/test_trl_token_logprob_peer_cases.py), run as that file runs its cases: on kdfast's stand-in
`KdfastChunkedLogProb.apply` (learning afresh whether the entropy gets a gradient) and on
`kdfast.linear_token_outputs` in rows of 17 told the entropy is only read (its two-GEMM frozen-head path, exact
also where a gradient reaches the entropy after all).

Nothing new to port (checked against the stored snapshot of TRL's main, f2cd577, and every branch in it):
tests/experimental/test_server_distillation_trainer.py changed after the ported cases only in its dataset (prompt
only; tests/test_trl_server_peer_cases.py already trains on prompts) and its imports (78ebc98, 06c50c9);
tests/experimental/test_gold_trainer.py's last change on main is 9a7518a, ported in tests/test_trl_peer_cases_newer.py
(unmerged branches add privileged-context, Liger-evaluation, collation and sequence-KD trainer cases, no loss-level
ones); tests/experimental/test_async_distillation_trainer.py is not on TRL's main, and its newest stored version,
361edd3, is a subset of the 0574139 one tests/test_trl_async_peer_cases.py ports; tests/test_kernels.py's
TestLogProbEntropy tests a function kdfast does not have."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, word_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from accelerate.utils import set_seed  # noqa: E402

from kdfast.integrations import trl_distillation  # noqa: E402
from kdfast.integrations.trl import DistillationTrainer  # noqa: E402
from kdfast.integrations.trl_fused_lm_head import KdfastChunkedLogProb  # noqa: E402
from kdfast.token_logprobs import linear_token_outputs  # noqa: E402

PROMPTS = ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10", "w11", "w12 w13 w14", "w15 w16", "w17 w18 w19", "w20"]


# --------------------------------------------------------------------------------------------------------------------
# TestDistillationTrainerMultiTeacher (tests/test_distillation_trainer.py at 34874dc)
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student():
    """TRL's student fixture: a tiny causal LM (here tests/tiny_models.py's Llama, hidden 32, vocabulary 96)."""
    return tiny_llama(32, seed=0)


def _save_teacher(student, path, scale=None, head_scale=None, **config):
    """TRL's _save_teacher: a standalone checkpoint of the student fixture with every weight scaled by `scale` (or
    another model of the same family where `config` is given, its head scaled by `head_scale`)."""
    model = copy.deepcopy(student) if not config else tiny_llama(32, **config)
    with torch.no_grad():
        for parameter in model.parameters() if scale is not None else ():
            parameter.mul_(scale)
        if head_scale is not None:
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(student, tmp_path_factory):
    """TRL's two teacher checkpoints, rescaled copies of the student (an unscaled copy would be the student itself)."""
    directory = tmp_path_factory.mktemp("multi-teacher")
    return {"a": _save_teacher(student, directory / "a", scale=1.05),
            "b": _save_teacher(student, directory / "b", scale=0.95)}


def _prompts(count):
    return [PROMPTS[index % len(PROMPTS)] for index in range(count)]


def _routed_dataset(teacher_ids):
    return datasets.Dataset.from_dict({"prompt": _prompts(len(teacher_ids)), "teacher_id": teacher_ids})


def _unrouted_dataset(rows):
    """The same prompts in the same order as `_routed_dataset`, without the routing column."""
    return datasets.Dataset.from_dict({"prompt": _prompts(rows)})


def _trainer(tmp_path, student, teacher_model, train_dataset=None, eval_dataset=None, **config):
    """kdfast's DistillationTrainer as TRL builds its own in these tests (report_to none; on the CPU, TRL's
    `torch_device` here), with TRL's settings in `config`."""
    settings = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                    disable_tqdm=True)
    settings.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher_model,
                                   args=trl.DistillationConfig(**settings), processing_class=word_tokenizer(),
                                   train_dataset=train_dataset, eval_dataset=eval_dataset)


def _train(trainer, seed=None):
    if seed is not None:
        set_seed(seed)  # generation is sampled, so re-seed right before training to make runs comparable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _params(trainer):
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def _step_logs(trainer):
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs, "no training step was logged"
    return logs


# TRL's settings of test_single_entry_matches_teacher_model and test_same_teacher_twice_matches_teacher_model.
TWO_STEPS = dict(learning_rate=0.1, per_device_train_batch_size=3, max_completion_length=8, max_steps=2,
                 logging_steps=1, seed=42)


def test_single_entry_matches_teacher_model(tmp_path, student, teachers):
    """test_single_entry_matches_teacher_model: a one-entry mapping is the multi-teacher path applied to a single
    teacher, not a different algorithm: same seed, same data, same two optimizer steps, bitwise-identical losses and
    parameters."""
    dataset = _unrouted_dataset(12)
    single = _train(_trainer(tmp_path, student, teachers["a"], dataset, **TWO_STEPS), seed=42)
    mapping = _train(_trainer(tmp_path, student, {"only": teachers["a"]}, dataset, **TWO_STEPS), seed=42)
    assert _losses(mapping) == _losses(single)
    single_params, mapping_params = _params(single), _params(mapping)
    assert sorted(mapping_params) == sorted(single_params)
    for name, single_param in single_params.items():
        max_diff = (mapping_params[name] - single_param).abs().max().item()
        assert torch.equal(mapping_params[name], single_param), \
            f"Parameter {name} differs from `teacher_model=` (max abs diff {max_diff})."


def test_same_teacher_twice_matches_teacher_model(tmp_path, student, teachers):
    """test_same_teacher_twice_matches_teacher_model: the same checkpoint under two routing IDs is still one teacher;
    routing half the rows to each gives the single teacher's losses and update (plain SGD, TRL's 1e-6), and both IDs
    report their own divergence."""
    rows = 12
    single = _train(_trainer(tmp_path, student, teachers["a"], _unrouted_dataset(rows), optim="sgd", **TWO_STEPS),
                    seed=42)
    routed = _train(_trainer(tmp_path, student, {"a": teachers["a"], "b": teachers["a"]},
                             _routed_dataset(["a", "b"] * (rows // 2)), optim="sgd", **TWO_STEPS), seed=42)
    single_losses, routed_losses = _losses(single), _losses(routed)
    assert len(routed_losses) == len(single_losses) == 2
    torch.testing.assert_close(torch.tensor(routed_losses), torch.tensor(single_losses), rtol=1e-6, atol=1e-6)
    single_params, routed_params = _params(single), _params(routed)
    for name, single_param in single_params.items():
        max_diff = (routed_params[name] - single_param).abs().max().item()
        torch.testing.assert_close(routed_params[name], single_param, rtol=1e-6, atol=1e-6,
                                   msg=f"Parameter {name} diverged (max abs diff {max_diff}).")
    for entry in _step_logs(routed):
        assert "divergence/teacher_a" in entry, sorted(entry)
        assert "divergence/teacher_b" in entry, sorted(entry)


# TRL's settings of test_two_teachers_log_per_teacher_metrics.
PER_TEACHER = dict(learning_rate=0.1, per_device_train_batch_size=3, max_completion_length=8, logging_steps=1)


def test_two_teachers_log_per_teacher_metrics(tmp_path, student, teachers):
    """test_two_teachers_log_per_teacher_metrics, its first part: two different checkpoints train the student end to
    end, each teacher's divergence and token share are logged under its ID every step, the two divergences differ,
    the shares add up to 1 and every parameter moved."""
    trainer = _trainer(tmp_path, student, teachers, _routed_dataset(["a", "b"] * 6), max_steps=2, **PER_TEACHER)
    previous = _params(trainer)
    _train(trainer)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for entry in _step_logs(trainer):
        for family in ("divergence/teacher_", "tokens/teacher_"):
            for teacher_id in ("a", "b"):
                assert f"{family}{teacher_id}" in entry, f"{family}{teacher_id} missing from {sorted(entry)}"
        assert entry["divergence/teacher_a"] != entry["divergence/teacher_b"]
        assert entry["tokens/teacher_a"] + entry["tokens/teacher_b"] == pytest.approx(1.0)
    for name, param in previous.items():
        assert not torch.equal(param, trainer.model.get_parameter(name)), f"Parameter {name} has not changed."


def test_two_teachers_log_per_teacher_metrics_window_without_a_teacher(tmp_path, student, teachers):
    """test_two_teachers_log_per_teacher_metrics, its second part: a window routed to "a" only reports no divergence
    for "b" (a mean over zero tokens is undefined, so the key is omitted rather than logged as zero); its token share
    is defined and exactly 0.0."""
    trainer = _train(_trainer(tmp_path, student, teachers, _routed_dataset(["a"] * 6), max_steps=1, **PER_TEACHER))
    for entry in _step_logs(trainer):
        assert "divergence/teacher_a" in entry
        assert entry["tokens/teacher_b"] == 0.0
        assert "divergence/teacher_b" not in entry, f"unexpected divergence/teacher_b in {sorted(entry)}"


# TRL's settings of the routing-error cases.
ROUTING = dict(per_device_train_batch_size=3, max_completion_length=4, max_steps=1)


def test_teacher_id_routing_errors_unknown_id(tmp_path, student, teachers):
    """test_teacher_id_routing_errors[unknown ID]: a routing ID nobody registered, in a map-style dataset, is caught at
    construction rather than minutes into the run, by an error naming the ID, the dataset and the registered
    teachers."""
    with pytest.raises(ValueError, match="nope") as error:
        _trainer(tmp_path, student, teachers, _routed_dataset(["a", "nope"] * 3), **ROUTING)
    assert "train_dataset" in str(error.value)
    assert "['a', 'b']" in str(error.value), "the error does not list the registered teachers"


def test_unknown_teacher_id_in_eval_dataset_is_rejected(tmp_path, student, teachers):
    """test_unknown_teacher_id_in_eval_dataset_is_rejected: a dict of eval datasets is checked entry by entry at
    construction, and the error names the offending one."""
    with pytest.raises(ValueError, match="nope") as error:
        _trainer(tmp_path, student, teachers, _routed_dataset(["a", "b"] * 3),
                 {"clean": _routed_dataset(["a"]), "typo": _routed_dataset(["nope"])}, per_device_eval_batch_size=2,
                 **ROUTING)
    assert "eval_dataset['typo']" in str(error.value)


def test_unknown_teacher_id_in_an_iterable_dataset_is_rejected_while_training(tmp_path, student, teachers):
    """test_unknown_teacher_id_in_an_iterable_dataset_is_rejected_while_training: an iterable dataset cannot be scanned
    without consuming it; the per-row routing check refuses the unknown ID when its generation batch is scored (and
    names it and the registered teachers)."""
    trainer = _trainer(tmp_path, student, teachers, _routed_dataset(["a", "nope"] * 3).to_iterable_dataset(),
                       **ROUTING)
    with pytest.raises(ValueError, match=r"teachers \['a', 'b'\].*got 'nope'"):
        _train(trainer)


def test_teacher_id_column_is_optional_with_one_teacher(tmp_path, student, teachers):
    """test_teacher_id_column_is_optional_with_one_teacher: with one teacher registered the routing column may be
    absent; every row goes to that teacher."""
    trainer = _train(_trainer(tmp_path, student, {"a": teachers["a"]}, _unrouted_dataset(6), **ROUTING))
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert trainer.state.log_history[-1]["divergence/teacher_a"] > 0.0


def test_teacher_vocab_size_must_match_student(tmp_path, student, teachers):
    """test_teacher_vocab_size_must_match_student: the loss compares full next-token distributions, so a registered
    teacher over another vocabulary is rejected at construction."""
    other = _save_teacher(student, tmp_path / "other", seed=3, vocab=80)
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(tmp_path, student, {"a": teachers["a"], "other": other})


def _completion_batch(rows, completion, valid, seed):
    """TRL's compute_loss inputs: `rows` prompts of 4 tokens, completions of `completion` tokens of which the first
    `valid` (in row order) are kept."""
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(rows * completion, dtype=torch.long)
    completion_mask[:valid] = 1
    return {"prompt_ids": torch.randint(2, 96, (rows, 4), generator=generator),
            "prompt_mask": torch.ones(rows, 4, dtype=torch.long),
            "completion_ids": torch.randint(2, 96, (rows, completion), generator=generator),
            "completion_mask": completion_mask.reshape(rows, completion)}


def test_teacher_jsd_is_the_token_weighted_window_mean(tmp_path, student):
    """test_teacher_jsd_is_the_token_weighted_window_mean: the logged per-teacher divergence is the window's total
    over its total scored tokens, not a mean of per-micro-batch means. TRL stubs the loss with known statistics
    (1 token of divergence 1, then 9 of 27: 28 / 10); here two real micro-batches of 1 and 9 tokens, whose sums are
    each loss times its tokens (no num_items_in_batch: the local mean), from a teacher of sharp predictions (another
    tiny model, its head scaled by 30) so that the two micro-batches' means differ."""
    trainer = _trainer(tmp_path, student, {"a": _save_teacher(student, tmp_path / "sharp", seed=1, head_scale=30.0)})
    trainer.model.train()  # compute_loss files its metrics under the mode the student is in
    sums, counts = [], []
    for count, seed in [(1, 0), (9, 1)]:
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, _completion_batch(3, 4, count, seed))
        sums.append(loss.item() * count)
        counts.append(count)
    means = [total / count for total, count in zip(sums, counts)]
    if not abs(means[0] - means[1]) > 0.01 * max(means):  # not an AssertionError: the xfail must not take it
        pytest.fail(f"the two micro-batches' means {means} must differ for the test to tell the two averages apart")
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["divergence/teacher_a"] == pytest.approx(sum(sums) / sum(counts))


def test_empty_teacher_model_mapping_is_rejected(tmp_path, student):
    """test_empty_teacher_model_mapping_is_rejected: an empty mapping would leave every row without a teacher and train
    at a loss of exactly zero; it is refused."""
    with pytest.raises(ValueError, match="empty"):
        _trainer(tmp_path, student, {})


def test_mapping_argument_wins_over_the_config_teacher(tmp_path, student, teachers):
    """test_mapping_argument_wins_over_the_config_teacher: a mapping passed to the constructor is the one registered,
    whatever `args.teacher_model_name_or_path` names (here: its weights are teacher a's, not b's)."""
    trainer = _trainer(tmp_path, student, {"a": teachers["a"]}, teacher_model_name_or_path=teachers["b"])
    assert trainer.teacher_names == ["a"]
    assert len(trainer.teacher_models) == 1
    with torch.no_grad():
        expected = 1.05 * student.lm_head.weight
    torch.testing.assert_close(trainer.teacher_models[0].lm_head.weight.cpu(), expected)


def test_gradient_accumulation_matches_teacher_model(tmp_path, student, teachers):
    """test_gradient_accumulation_matches_teacher_model: one generation batch split into two micro-batches; the
    one-entry mapping's update is still the single teacher's, bitwise."""
    dataset = _unrouted_dataset(12)
    settings = dict(learning_rate=0.1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_completion_length=8, max_steps=2, logging_steps=1, seed=42)
    single = _train(_trainer(tmp_path, student, teachers["a"], dataset, **settings), seed=42)
    mapping = _train(_trainer(tmp_path, student, {"only": teachers["a"]}, dataset, **settings), seed=42)
    assert _losses(mapping) == _losses(single)
    single_params, mapping_params = _params(single), _params(mapping)
    for name, single_param in single_params.items():
        max_diff = (mapping_params[name] - single_param).abs().max().item()
        assert torch.equal(mapping_params[name], single_param), \
            f"Parameter {name} differs from `teacher_model=` (max abs diff {max_diff})."


# TRL's settings of the evaluation cases.
EVALUATION = dict(per_device_train_batch_size=2, max_completion_length=4, max_steps=2, logging_steps=1,
                  eval_strategy="steps", eval_steps=1)


def test_evaluation_with_multiple_teachers(tmp_path, student, teachers):
    """test_evaluation_with_multiple_teachers: an eval dataset with its own `teacher_id` column is scored per teacher,
    the per-teacher metrics are logged under the `eval_` prefix, and training still finishes."""
    trainer = _train(_trainer(tmp_path, student, teachers, _routed_dataset(["a", "b"] * 6), _routed_dataset(["a", "b"]),
                              learning_rate=0.1, per_device_eval_batch_size=2, **EVALUATION))
    eval_logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(eval_logs) >= 2, f"expected one evaluation per step, got {len(eval_logs)}"
    for entry in eval_logs:
        assert not torch.isnan(torch.tensor(entry["eval_loss"]))
    expected_keys = {f"eval_{family}{teacher_id}" for family in ("divergence/teacher_", "tokens/teacher_")
                     for teacher_id in "ab"}
    assert any(expected_keys <= set(entry) for entry in eval_logs), \
        f"no evaluation logged both teachers; last eval keys: {sorted(eval_logs[-1])}"
    assert trainer.state.log_history[-1]["train_loss"] is not None


def test_evaluation_loss_does_not_scale_with_the_number_of_groups(tmp_path, student, teachers):
    """test_evaluation_loss_does_not_scale_with_the_number_of_groups: evaluation has no num_items_in_batch, so the
    per-teacher groups share one denominator: the same rows split over two routing IDs of one checkpoint evaluate to
    the loss of a single teacher scoring them all (learning rate 0: both runs evaluate the same student)."""
    def run(train_dataset, eval_dataset, teacher_model):
        trainer = _trainer(tmp_path, student, teacher_model, train_dataset, eval_dataset, learning_rate=0.0,
                           per_device_eval_batch_size=4, seed=7, **EVALUATION)
        return [entry["eval_loss"] for entry in _train(trainer, seed=7).state.log_history if "eval_loss" in entry]

    one = run(_unrouted_dataset(8), _unrouted_dataset(4), {"only": teachers["a"]})
    two = run(_routed_dataset(["a", "b"] * 4), _routed_dataset(["a", "b"] * 2),
              {"a": teachers["a"], "b": teachers["a"]})
    assert len(two) == len(one) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# tests/experimental/test_distillation_trainer.py at f2cd577: the loss's denominator under gradient accumulation
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("routed", [False, True], ids=["one-teacher", "two-routed-teachers"])
def test_num_items_in_batch_counts_the_tokens_trained_on(tmp_path, student, teachers, monkeypatch, routed):
    """test_num_items_in_batch_counts_the_tokens_trained_on: `num_items_in_batch` is the loss's denominator, so it
    counts the completion tokens trained on, summed over the whole accumulation window (two micro-batches of two
    prompts). Recorded where kdfast applies it (its loss's division, with each micro-batch's own token count), as TRL
    records it where its loss applies it."""
    recorded = []  # (denominator applied, completion tokens in this micro-batch)
    divided = trl_distillation._divided

    def recording(total, n_valid, num_items_in_batch):
        loss = divided(total, n_valid, num_items_in_batch)
        recorded.append((num_items_in_batch, int(n_valid)))
        torch.testing.assert_close(loss, total / num_items_in_batch)  # applied as the denominator
        return loss

    monkeypatch.setattr(trl_distillation, "_divided", recording)
    teacher_model = teachers if routed else teachers["a"]
    dataset = _routed_dataset(["a", "b", "b", "a"] * 2) if routed else _unrouted_dataset(8)
    _train(_trainer(tmp_path, student, teacher_model, dataset, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, max_steps=1, max_completion_length=8, learning_rate=0.1), seed=0)
    assert len(recorded) == 2, "expected one loss reduction per accumulation step"
    denominator = recorded[0][0]
    assert denominator is not None, "the loss was not reduced by a token count"
    assert recorded[1][0] == denominator
    assert int(denominator) == sum(tokens for _, tokens in recorded)


# --------------------------------------------------------------------------------------------------------------------
# tests/test_kernels.py at 01c5a6d: TestChunkedLogProbFunction.test_backward_frozen_head
# --------------------------------------------------------------------------------------------------------------------

N, H, V = 64, 32, 128  # TRL's sizes
CHUNK_SIZE = 32  # TRL's vocabulary tile, passed as TRL's function takes it (kdfast's stand-in does not tile it)


def _reference_logprobs_and_entropy(hidden, weight, labels, temperature, logit_scale=1.0,
                                    final_logit_softcapping=None):
    """TRL's `_reference_logprobs_and_entropy`: full float32 logits in TRL's order (scale, softcap, T)."""
    logits = (hidden @ weight.t()).to(torch.float32) * logit_scale
    if final_logit_softcapping is not None:
        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
    logits = logits / temperature
    log_p = F.log_softmax(logits, dim=-1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(torch.softmax(logits, dim=-1) * log_p).sum(dim=-1)


def _rows_of_17_entropy_read(hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping=None,
                             logit_scale=1.0):
    """kdfast's own API called as TRL's function is, in chunks of 17 rows, told the entropy is only read."""
    logprobs, entropy, _ = linear_token_outputs(hidden, weight, labels, bias=bias, temperature=temperature,
                                                logit_scale=logit_scale, softcap=final_logit_softcapping,
                                                return_entropy=True, entropy_grad=False, chunk_size=17)
    return logprobs, entropy


@pytest.fixture
def fresh_entropy_guess(monkeypatch):
    """The stand-in learns process-wide whether the entropy gets a gradient: each case starts as a fresh patch does."""
    monkeypatch.setattr(KdfastChunkedLogProb, "entropy_grad", "auto")
    monkeypatch.setattr(KdfastChunkedLogProb, "entropy_grad_seen", False)


@pytest.mark.parametrize("chunked", [pytest.param(KdfastChunkedLogProb.apply, id="stand-in"),
                                     pytest.param(_rows_of_17_entropy_read, id="rows-of-17-entropy-read")])
@pytest.mark.parametrize(("temperature", "logit_scale", "final_logit_softcapping"),
                         [(1.0, 1.0, None), (0.7, 0.5, None), (0.7, 1.0, 3.0)])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.5])
def test_backward_frozen_head(fresh_entropy_guess, chunked, temperature, logit_scale, final_logit_softcapping,
                              entropy_weight):
    """TRL's test_backward_frozen_head: a frozen head (only the hidden states learn) takes the cheaper backward, unless
    the entropy needs a gradient too; d hidden of 2 sum log q(token) + w sum H is the reference's either way, to
    TRL's 1e-4."""
    torch.manual_seed(42)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H)
    labels = torch.randint(0, V, (N,))
    logprobs, entropy, *_ = chunked(hidden, weight, None, labels, temperature, CHUNK_SIZE, final_logit_softcapping,
                                    logit_scale)
    (2.0 * logprobs + entropy_weight * entropy).sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    logprobs_ref, entropy_ref = _reference_logprobs_and_entropy(hidden, weight, labels, temperature, logit_scale,
                                                                final_logit_softcapping)
    (2.0 * logprobs_ref + entropy_weight * entropy_ref).sum().backward()
    torch.testing.assert_close(grad, hidden.grad, atol=1e-4, rtol=1e-4)
