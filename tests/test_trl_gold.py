"""kdfast's GOLD (`kdfast.integrations.trl_gold`) against TRL's. Two byte-level BPE tokenizers of different sizes are
trained here on a small text (they share most token strings and split words differently); batches are built by TRL's
own pieces (its dataset preparation, `DataCollatorForChatML`, `build_teacher_inputs_from_texts`). On them kdfast's
`ULDLoss` gives TRL's `ULDLoss` loss and student-logit gradient for plain and hybrid ULD, extended and positional
alignment, both merges, EOS skips, temperatures, weights, and samples with nothing to score, and sets the hybrid's
`last_matched_loss` / `last_unmatched_loss` to TRL's values; the trainer's loss and parameter gradients equal TRL's
trainer's on one batch, and two off-policy steps of `train()` train and log (the matched/unmatched split included)
as TRL's do."""

import copy
import dataclasses
import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.gold")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gold import GOLDConfig
    from trl.experimental.gold import GOLDTrainer as TRLGOLDTrainer
    from trl.experimental.gold.gold_trainer import ULDLoss as TRLULDLoss
    from trl.experimental.gold.gold_trainer import build_teacher_inputs_from_texts
    from trl.experimental.utils import DataCollatorForChatML

from kdfast.demo.corpus import EOS, train_tokenizer  # noqa: E402
from kdfast.integrations.trl_gold import GOLDTrainer, ULDLoss  # noqa: E402

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TEXT = ["the quick brown fox jumps over the lazy dog while the cat watches from the garden wall",
        "distillation moves knowledge from a large teacher model into a smaller student model",
        "tokenizers split words into pieces, and two tokenizers split the same words differently",
        "the student learns the teacher's distribution over the next token at every position"]
CHATS = [("what does a teacher do", "the teacher distills its knowledge into the student"),
         ("say something quick", "quick brown foxes jump over lazy dogs"),
         ("tell me about tokenizers", "tokenizers split words differently, naïve café")]
PLAIN = [("Question: who learns? Answer:", " the student learns from the teacher"),
         ("Complete: the lazy", " dog watches the garden")]


def bpe_tokenizer(texts, vocab_size):
    tokenizer = train_tokenizer(texts, vocab_size)  # byte-level BPE, EOS as pad
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    """The student's (about 330 tokens) and the teacher's (about 380, trained on other text: other merges)."""
    return bpe_tokenizer(TEXT * 3, 330), bpe_tokenizer(TEXT[1:] * 3 + [" ".join(CHATS[0]) + " words"], 380)


def gold_config(tmp_path, **settings):
    options = dict(output_dir=str(tmp_path), use_uld_loss=True, report_to=[], use_cpu=True, max_length=128,
                   max_completion_length=32, per_device_train_batch_size=2, lmbda=0.0, save_strategy="no",
                   logging_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True)
    options.update(settings)
    return GOLDConfig(**options)


def chat_examples(pairs=CHATS):
    return [{"prompt": [{"role": "user", "content": prompt}],
             "completion": [{"role": "assistant", "content": completion}]} for prompt, completion in pairs]


def prepared(examples, tokenizer, config):
    """The dataset rows TRL's GOLD trainer collates (its own preparation: ids, byte offsets, original texts)."""
    from datasets import Dataset

    dataset = TRLGOLDTrainer._prepare_dataset_with_original_text(None, Dataset.from_list(examples), tokenizer, config,
                                                                 False, None, "train")
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def batch(tokenizers, tmp_path_factory):
    """Five samples as GOLD's collator and teacher builder make them: three chats, two plain prompt/completion pairs
    (their EOS appended by GOLD). The teacher sees samples 1 and 2 without their prompts (their answers start at 0,
    as after front truncation: "bayesian" drops the leading span, in sample 2 a group of three student tokens and one
    teacher token); sample 4's answer is masked on both sides (nothing to score)."""
    student_tokenizer, teacher_tokenizer = tokenizers
    config = gold_config(tmp_path_factory.mktemp("gold"))
    rows = prepared(chat_examples(), student_tokenizer, config)
    rows += prepared([{"prompt": p, "completion": c} for p, c in PLAIN], student_tokenizer, config)
    student = DataCollatorForChatML(tokenizer=student_tokenizer, max_length=128)(rows)
    prompts = list(student["original_prompt_text"])
    prompts[1] = prompts[2] = ""
    teacher_ids, teacher_labels, _, teacher_offsets = build_teacher_inputs_from_texts(
        teacher_tokenizer, prompts, list(student["original_completion_text"]), use_extended_uld=True)
    student["labels"][4] = -100
    teacher_labels[4] = -100
    return dict(student_labels=student["labels"], teacher_labels=teacher_labels, student_input_ids=student["input_ids"],
                teacher_input_ids=teacher_ids, student_byte_offsets=student["byte_offsets"],
                teacher_byte_offsets=teacher_offsets)


def logits_for(batch, tokenizers, seed=0, scale=3.0):
    """Random logits (sharper than a tiny model's): the teacher's 5 columns wider than its tokenizer, as a model's
    padded vocabulary is."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*batch["student_input_ids"].shape, len(tokenizers[0]), generator=generator) * scale
    teacher = torch.randn(*batch["teacher_input_ids"].shape, len(tokenizers[1]) + 5, generator=generator) * scale
    return student, teacher


def loss_and_grad(loss_cls, config, tokenizers, batch, logits):
    loss_fn = loss_cls(config, student_tokenizer=tokenizers[0], teacher_tokenizer=tokenizers[1])
    student = logits[0].clone().requires_grad_()
    loss = loss_fn(student_logits=student, teacher_logits=logits[1], **batch)
    loss.sum().backward()
    return loss.detach(), student.grad, loss_fn


def assert_same_split(loss_fn, trl_loss_fn):
    """The hybrid's matched/unmatched parts TRL's trainer logs: set by both or by neither, and equal."""
    for name in ("last_matched_loss", "last_unmatched_loss"):
        assert hasattr(loss_fn, name) == hasattr(trl_loss_fn, name), name
        if hasattr(trl_loss_fn, name):
            found, expected = getattr(loss_fn, name), getattr(trl_loss_fn, name).detach()
            assert found.shape == expected.shape == () and not found.requires_grad
            torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-8, msg=name)


def assert_same_as_trl(config, tokenizers, batch, logits=None):
    logits = logits_for(batch, tokenizers) if logits is None else logits
    loss, grad, loss_fn = loss_and_grad(ULDLoss, config, tokenizers, batch, logits)
    expected, expected_grad, trl_loss_fn = loss_and_grad(TRLULDLoss, config, tokenizers, batch, logits)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    error = (grad - expected_grad).norm() / expected_grad.norm().clamp_min(1e-30)
    assert error <= 1e-5, f"student-logit gradient: relative L2 error {error:.2e}"
    assert_same_split(loss_fn, trl_loss_fn)
    return loss


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    return gold_config(tmp_path_factory.mktemp("config"))


@pytest.mark.parametrize("temperatures, ce_weight", [((1.0, 1.0), 0.0), ((2.0, 0.5), 0.5)])
@pytest.mark.parametrize("skip_eos", [True, False])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("extended", [True, False])
@pytest.mark.parametrize("hybrid", [False, True])
def test_loss_and_gradient_equal_trls(base_config, tokenizers, batch, hybrid, extended, merge, skip_eos,
                                      temperatures, ce_weight):
    config = dataclasses.replace(base_config, uld_use_hybrid_loss=hybrid, use_extended_uld=extended,
                                 uld_token_merge_strategy=merge, uld_skip_student_eos=skip_eos,
                                 uld_skip_teacher_eos=skip_eos, uld_student_temperature=temperatures[0],
                                 uld_teacher_temperature=temperatures[1], uld_crossentropy_weight=ce_weight)
    assert float(assert_same_as_trl(config, tokenizers, batch)) > 0


@pytest.mark.parametrize("settings", [
    {"beta": 0.0}, {"beta": 1.0},
    {"beta": 0.3, "uld_hybrid_matched_weight": 0.7, "uld_hybrid_unmatched_weight": 0.2},
    {"uld_distillation_weight": 0.6, "uld_skip_student_eos": False, "uld_crossentropy_weight": 0.25}])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("extended", [True, False])
def test_hybrid_divergences_and_weights_equal_trls(base_config, tokenizers, batch, extended, merge, settings):
    config = dataclasses.replace(base_config, uld_use_hybrid_loss=True, use_extended_uld=extended,
                                 uld_token_merge_strategy=merge, **settings)
    assert_same_as_trl(config, tokenizers, batch)


@pytest.mark.parametrize("hybrid", [False, True])
def test_samples_with_nothing_to_score(base_config, tokenizers, batch, hybrid):
    """A teacher answer that is only its EOS (skipped), and a batch whose answers are all masked (TRL's [1]-shaped
    zero, with a zero gradient)."""
    config = dataclasses.replace(base_config, uld_use_hybrid_loss=hybrid, uld_token_merge_strategy="bayesian")
    short = {name: value.clone() for name, value in batch.items()}
    teacher_answer = (short["teacher_labels"][0] != -100).nonzero().squeeze(1)
    short["teacher_labels"][0, teacher_answer[:-1]] = -100
    assert_same_as_trl(config, tokenizers, short)
    empty = {name: value.clone() for name, value in batch.items()}
    empty["student_labels"].fill_(-100)
    empty["teacher_labels"].fill_(-100)
    loss = assert_same_as_trl(config, tokenizers, empty)
    assert loss.shape == (1,) and float(loss) == 0.0


def test_bad_input_is_a_clear_value_error(base_config, tokenizers, batch):
    logits = logits_for(batch, tokenizers)
    loss_fn = ULDLoss(dataclasses.replace(base_config, uld_use_hybrid_loss=True), student_tokenizer=tokenizers[0],
                      teacher_tokenizer=tokenizers[1])

    def call(**changes):
        return loss_fn(**{"student_logits": logits[0], "teacher_logits": logits[1], **batch, **changes})

    with pytest.raises(ValueError, match="Byte offsets are required"):
        call(teacher_byte_offsets=None)
    with pytest.raises(ValueError, match=r"student_labels must be a tensor \[batch, seq\]"):
        call(student_labels=batch["student_labels"][:, 1:])
    with pytest.raises(ValueError, match=r"teacher_byte_offsets must be \[batch, seq, 2\]"):
        call(teacher_byte_offsets=batch["teacher_byte_offsets"][:, :, :1])
    with pytest.raises(ValueError, match="must be the same samples"):
        call(teacher_logits=logits[1][:3], teacher_labels=batch["teacher_labels"][:3],
             teacher_input_ids=batch["teacher_input_ids"][:3], teacher_byte_offsets=batch["teacher_byte_offsets"][:3])
    backwards = batch["student_byte_offsets"].clone()
    answer = (batch["student_labels"][0] != -100).nonzero().squeeze(1)
    backwards[0, answer] = backwards[0, answer].flip(0)
    with pytest.raises(ValueError, match="sample 0 of the batch: student_offsets"):
        call(student_byte_offsets=backwards)
    with pytest.raises(ValueError, match="teacher_logits"):  # narrower than the teacher's vocabulary
        call(teacher_logits=logits[1][..., :300])


def tiny_llama(vocab, seed, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=0,
                         bos_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # sharper distributions than the initialisation's near-uniform ones
    return model


@pytest.fixture(scope="module")
def trainers(tokenizers, tmp_path_factory):
    """TRL's trainer and kdfast's on the same models, data and config (hybrid, extended, "bayesian")."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("trainer")
    student_tokenizer, teacher_tokenizer = tokenizers
    teacher_tokenizer.save_pretrained(root / "teacher")
    student, teacher = tiny_llama(len(student_tokenizer), 0, 2), tiny_llama(len(teacher_tokenizer), 1)
    dataset = Dataset.from_list(chat_examples(CHATS + [(c, p) for p, c in CHATS[:1]]))
    config = gold_config(root, teacher_tokenizer_name_or_path=str(root / "teacher"), uld_use_hybrid_loss=True,
                         uld_token_merge_strategy="bayesian", uld_crossentropy_weight=0.2, max_steps=2,
                         learning_rate=1e-2, logging_strategy="steps", logging_steps=1)

    def build(trainer_cls):
        return trainer_cls(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=config,
                           train_dataset=dataset, processing_class=student_tokenizer)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(TRLGOLDTrainer), build(GOLDTrainer)


def test_trainer_loss_and_gradients_equal_trls(trainers):
    trl_trainer, trainer = trainers
    assert isinstance(trainer.uld_loss_fn, ULDLoss) and type(trl_trainer.uld_loss_fn) is TRLULDLoss
    assert trainer.uld_loss_fn.method == "hybrid"
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    results = []
    for each in (trainer, trl_trainer):
        each.model.zero_grad()
        loss = each.compute_loss(each.model, inputs)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in each.model.named_parameters()}))
    (loss, grads), (expected, expected_grads) = results
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    # The hybrid's matched/unmatched split of the last sample, which TRL's compute_loss adds to its logs.
    assert hasattr(trl_trainer.uld_loss_fn, "last_matched_loss")
    assert_same_split(trainer.uld_loss_fn, trl_trainer.uld_loss_fn)
    for name, grad in grads.items():
        error = (grad - expected_grads[name]).norm() / expected_grads[name].norm().clamp_min(1e-30)
        assert error <= 1e-4, f"{name}.grad: relative L2 error {error:.2e}"


def test_two_training_steps_train_as_trls(trainers):
    """Off-policy (lmbda=0) steps: the student changes, the run's mean loss is TRL's trainer's (same seed, same
    batches), and so is each step's log, the hybrid's matched_loss / unmatched_loss included."""
    results, logs, before = [], [], {}
    for each in trainers:
        each.model.zero_grad()  # the gradients of the test above must not reach the first step
        before = {name: p.detach().clone() for name, p in each.model.named_parameters()}
        results.append(each.train().training_loss)
        assert each.state.global_step == 2
        changed = [name for name, p in each.model.named_parameters() if not torch.equal(p.detach(), before[name])]
        assert "lm_head.weight" in changed and len(changed) > len(before) // 2
        logs.append([entry for entry in each.state.log_history if "loss" in entry])
    expected, loss = results
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert loss == pytest.approx(expected, rel=1e-4)
    expected_logs, found_logs = logs
    assert len(found_logs) == len(expected_logs) == 2
    for found, wanted in zip(found_logs, expected_logs):
        assert {"matched_loss", "unmatched_loss"} <= set(wanted) and set(found) == set(wanted)
        for name in ("loss", "matched_loss", "unmatched_loss"):
            # TRL rounds them to 4 decimals: one unit of the last place apart at most
            assert found[name] == pytest.approx(wanted[name], abs=1.5e-4), name
