"""kdfast's TRL IW-OPD trainer against TRL's own: on the same batch, TRL's `compute_loss` (both models' [B, T, V]
logits) and kdfast's (hidden states through the fused kernels) give the same loss, the same logged metrics and the
same gradient of every student parameter, for the IW-OPD objective (with and without cached rollout log-probs) and
the generalized JSD over the whole vocabulary or each top-k support TRL offers, against a local teacher and a served
one; a training step through TRL's own generation equals TRL's step."""

import warnings

import pytest
import torch
from helpers import assert_same_trainer_outcome
from tiny_models import skip_head_check, tiny_llama, word_tokenizer

pytest.importorskip("trl.experimental.iw_opd")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.iw_opd import IWOPDConfig
    from trl.experimental.iw_opd import IWOPDTrainer as TRLIWOPDTrainer

from kdfast.integrations.trl import IWOPDTrainer  # noqa: E402

VOCAB = 96
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _saved(path, model):
    with torch.no_grad():  # a sharpened head: distributions far from uniform, gradients well above rounding
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    """A tiny student (hidden 32) and a teacher of another hidden size (48), each saved with the shared tokenizer
    (TRL loads the teacher's to check that it is the student's)."""
    root = tmp_path_factory.mktemp("iw_opd")
    return _saved(root / "student", tiny_llama(32, vocab=VOCAB)), _saved(root / "teacher", tiny_llama(48, seed=1))


def _trainer(cls, model_paths, tmp_path, *, teacher=True, peft_config=None, **config):
    from datasets import Dataset

    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, max_length=16,
                    max_completion_length=6, bf16=False)
    settings.update(config)
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": text}] for text in
                                              ("w2 w3", "w4 w5 w6", "w7", "w8 w9", "w10", "w11 w12 w13")]})
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.chat_template = CHAT_TEMPLATE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model_paths[0], teacher_model=model_paths[1] if teacher else None,
                      args=IWOPDConfig(**settings), processing_class=tokenizer, train_dataset=dataset,
                      peft_config=peft_config)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which these tests call past
    return trainer


def _batch(rows=3, prompt=4, completion=6, seed=0, rollout=False):
    """An on-policy batch as TRL's buffer hands it to compute_loss: left-padded prompts (one shorter), completions
    after them (one ended early), labels -100 outside the completions."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, VOCAB, (rows, prompt), generator=generator)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[2, 0] = 0
    completion_ids = torch.randint(2, VOCAB, (rows, completion), generator=generator)
    completion_mask = torch.ones(rows, completion, dtype=torch.long)
    completion_mask[1, 3:] = 0
    labels = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, -100))
    batch = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
             "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
             "labels": torch.cat([torch.full_like(prompt_ids, -100), labels], 1),
             "prompts": prompt_ids, "prompt_attention_mask": prompt_mask}
    if rollout:  # vLLM's log-probs of the sampled tokens, cached at the full sequence's width
        batch["rollout_logprobs"] = -4.5 + torch.randn(rows, prompt + completion, generator=generator)
    return batch


def _loss_metrics_gradients(trainer, compute_loss, batch, num_items_in_batch=None):
    trainer.model.zero_grad()
    trainer.model.train()
    trainer._metrics["train"].clear()
    loss = compute_loss(trainer, trainer.model, batch, num_items_in_batch=num_items_in_batch)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()
                 if parameter.grad is not None}
    return loss.detach(), {key: list(values) for key, values in trainer._metrics["train"].items()}, gradients


def _assert_same_as_trl(trainer, batch, num_items_in_batch=None, rtol=1e-5):
    expected = _loss_metrics_gradients(trainer, TRLIWOPDTrainer.compute_loss, batch, num_items_in_batch)
    actual = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch, num_items_in_batch)
    assert_same_trainer_outcome(actual, expected, rtol)
    return expected


IW_OPD_CASES = [
    dict(),  # IWOPDConfig's defaults: the IW-OPD objective, gamma 0.5
    dict(iw_opd_gamma=0.0, temperature=0.7),
    dict(iw_opd_gamma=2.0, temperature=1.3),
]


@pytest.mark.parametrize("rollout", [False, True], ids=["own-logprobs", "cached-rollout-logprobs"])
@pytest.mark.parametrize("case", IW_OPD_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items())
                         or "defaults")
def test_iw_opd_loss_metrics_and_gradients_equal_trl(model_paths, tmp_path, case, rollout):
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path, **case)
    expected = _assert_same_as_trl(trainer, _batch(rollout=rollout))
    assert float(expected[0]) != 0.0
    assert "iw_opd/mean_weight" in expected[1]


@pytest.mark.parametrize("layout", ["a-group-per-sequence", "sequence-past-a-chunk"])
def test_iw_opd_over_several_chunks_equals_trl(model_paths, tmp_path, monkeypatch, layout):
    """Without rollout log-probs, whole sequences go through the head a group per chunk (here each its own: three
    chunks of one call), or, a sequence being longer than a chunk may be, through `linear_token_logprobs`, weighted
    after."""
    from kdfast.integrations import iw_opd

    monkeypatch.setattr(iw_opd, "MIN_GROUP_ROWS", 1)
    monkeypatch.setattr(iw_opd, "CHUNK_BUDGET_BYTES", {"cpu": 2 * VOCAB * 4})  # 2 rows: no two sequences fit
    if layout == "sequence-past-a-chunk":
        monkeypatch.setattr(iw_opd, "LONGEST_CHUNK_FACTOR", 0)
    chunks = []
    weighted_nll = iw_opd.linear_weighted_nll
    monkeypatch.setattr(iw_opd, "linear_weighted_nll", lambda *args, **kwargs: chunks.append(kwargs["chunk_size"])
                        or weighted_nll(*args, **kwargs))
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path)
    _assert_same_as_trl(trainer, _batch())
    assert chunks == ([(6, 3, 6)] if layout == "a-group-per-sequence" else [])  # one call, a chunk per sequence


@pytest.mark.parametrize("case", [dict(), dict(distillation_objective="jsd", loss_top_k=8, beta=0.5)],
                         ids=["iw_opd", "jsd-top-8"])
def test_lora_student_equals_trl(model_paths, tmp_path, case):
    """A PEFT student (its head frozen: the weighted cross-entropy pass takes d hidden alone)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path, peft_config=config, **case)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an adapter that has learnt something
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    expected = _assert_same_as_trl(trainer, _batch())
    assert expected[2] and all("lora" in name for name in expected[2])


JSD_CASES = [
    dict(loss_top_k=0, beta=0.0),
    dict(loss_top_k=0, beta=0.5),
    dict(loss_top_k=0, beta=1.0, temperature=1.5),
    dict(loss_top_k=1, beta=1.0),  # the mixed top-1 at beta 1: the sampled token alone, with its tail
    dict(loss_top_k=1, beta=0.5),  # the teacher's top-1 and the sampled token
    dict(loss_top_k=1, beta=0.5, reverse_kl_top_1_mode="argmax", lmbda=0.5),
    dict(loss_top_k=1, beta=0.5, loss_add_tail=False),
    dict(loss_top_k=1, beta=0.0),  # the teacher's top-1 and its tail
    dict(loss_top_k=8, beta=0.0),
    dict(loss_top_k=8, beta=0.0, loss_add_tail=False),
    dict(loss_top_k=8, beta=1.0),
    dict(loss_top_k=8, beta=1.0, loss_add_tail=False, temperature=0.8),
    dict(loss_top_k=8, beta=0.5),  # the union of both top-8s
    dict(loss_top_k=8, beta=0.3, loss_add_tail=False),
    dict(loss_top_k=VOCAB, beta=0.5),  # a support as large as the vocabulary: TRL's full path
]


@pytest.mark.parametrize("case", JSD_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_jsd_loss_and_gradients_equal_trl(model_paths, tmp_path, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns where reverse_kl_top_1_mode has no effect
        trainer = _trainer(IWOPDTrainer, model_paths, tmp_path, distillation_objective="jsd", **case)
    expected = _assert_same_as_trl(trainer, _batch())
    assert float(expected[0]) != 0.0


@pytest.mark.parametrize("case", [dict(), dict(distillation_objective="jsd", loss_top_k=8, beta=0.5)],
                         ids=["iw_opd", "jsd-top-8"])
def test_num_items_in_batch_divides_as_trl(model_paths, tmp_path, case):
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path, **case)
    _assert_same_as_trl(trainer, _batch(), num_items_in_batch=torch.tensor(23))


@pytest.mark.parametrize("case", [dict(), dict(distillation_objective="jsd", loss_top_k=0, beta=0.5)],
                         ids=["iw_opd", "jsd"])
def test_batch_without_kept_tokens_is_a_differentiable_zero(model_paths, tmp_path, case):
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path, **case)
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, metrics, gradients = _loss_metrics_gradients(trainer, IWOPDTrainer.compute_loss, batch)
    assert float(loss) == 0.0
    assert gradients and all(bool((gradient == 0).all()) for gradient in gradients.values())
    assert float(TRLIWOPDTrainer.compute_loss(trainer, trainer.model, batch)) == 0.0


def test_never_builds_the_logits(model_paths, tmp_path):
    """The LM head's forward (which would make [B, T, V] logits) is not called by kdfast's loss."""
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    skip_head_check(trainer.model)
    skip_head_check(teacher)
    calls = []
    for model in (trainer.model, teacher):
        model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    IWOPDTrainer.compute_loss(trainer, trainer.model, _batch()).backward()
    assert calls == []
    TRLIWOPDTrainer.compute_loss(trainer, trainer.model, _batch())
    assert len(calls) == 2  # TRL's: the student's logits and the teacher's


class _ServedTeacher:
    """TRL's teacher server stubbed with a local teacher's answers at the trainer's temperature: per completion, the
    top-k log-probs and ids, and the sampled tokens' log-probs (as `VLLMClient.get_sequence_logprobs` returns them)."""

    def __init__(self, teacher, temperature):
        self.teacher, self.temperature = teacher, temperature

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs, temperature):
        assert temperature == self.temperature
        result = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": []}
        for sequence, start in zip(sequences, prompt_lengths, strict=True):
            ids = torch.tensor(sequence)[None]
            with torch.no_grad():
                logprobs = torch.log_softmax(self.teacher(input_ids=ids).logits[0].float() / temperature, -1)
            rows = logprobs[start - 1:-1]
            top = rows.topk(top_logprobs, dim=-1)
            result["logprobs"].append(top.values.tolist())
            result["logprob_token_ids"].append(top.indices.tolist())
            result["actual_logprobs"].append(rows.gather(1, ids[0, start:, None]).tolist())
        return result


SERVED_CASES = [
    dict(),  # IW-OPD against the server's token log-probs
    dict(distillation_objective="jsd", beta=1.0, loss_top_k=1),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=1),
    dict(distillation_objective="jsd", beta=0.0, loss_top_k=5),
    dict(distillation_objective="jsd", beta=0.0, loss_top_k=5, loss_add_tail=False),
]


@pytest.mark.parametrize("case", SERVED_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items())
                         or "iw_opd")
def test_served_teacher_equals_trl(model_paths, tmp_path, case, monkeypatch):
    import trl.generation.vllm_client as vllm_client
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(vllm_client.VLLMClient, "__init__", lambda self, *args, **kwargs: None)
    trainer = _trainer(IWOPDTrainer, model_paths, tmp_path, teacher=False, use_teacher_server=True,
                       teacher_model_server_url="http://teacher", temperature=1.2, **case)
    trainer.teacher_client = _ServedTeacher(AutoModelForCausalLM.from_pretrained(model_paths[1]), 1.2)
    expected = _assert_same_as_trl(trainer, _batch())
    assert float(expected[0]) != 0.0


class _TRLWithWindowCount(TRLIWOPDTrainer):
    """TRL's trainer dividing by the generated window's kept tokens (kdfast's count; TRL's own, from the prompt-only
    dataset's labels, is 0: its loss is infinite)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        count = sum(int((batch["labels"] != -100).sum()) for batch in self._buffered_inputs)
        return super().compute_loss(model, inputs, return_outputs, torch.tensor(float(count)))


def test_training_steps_equal_trl(model_paths, tmp_path):
    """Two steps of `train()` on prompt-only data, two accumulation steps each: TRL generates the completions (the
    same under the same seed); the parameters after them are the same with either loss, both divided by the
    window's generated tokens."""
    results = []
    for cls in (_TRLWithWindowCount, IWOPDTrainer):
        # SGD: Adam's first steps move each parameter by about the learning rate whatever its gradient's size.
        trainer = _trainer(cls, model_paths, tmp_path / cls.__name__, max_steps=2, learning_rate=0.5, optim="sgd",
                           gradient_accumulation_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
        assert losses and all(torch.isfinite(torch.tensor(losses)))
        results.append({name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()})
    for name, expected in results[0].items():
        torch.testing.assert_close(results[1][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    initial = _trainer(IWOPDTrainer, model_paths, tmp_path / "initial").model.state_dict()
    assert any(not torch.equal(initial[name], value) for name, value in results[1].items())
