"""Tiny randomly initialised causal LMs, a word-level tokenizer and batches for the trainer integration tests."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

VOCAB = 96


def tiny_llama(hidden=32, layers=2, vocab=VOCAB, seed=0, **config):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=0, **config))


def student_and_teacher(vocab=VOCAB, head_scale=1.0, **student_config):
    """A student (hidden 32) and a teacher (hidden 64). At the default initialisation both predict nearly uniform
    distributions, so their KL gradient is a small difference that fp32 rounding in the models' forward
    perturbs by ~1e-3 relative; `head_scale` sharpens both heads for comparisons at tighter tolerances."""
    models = tiny_llama(32, vocab=vocab, seed=0, **student_config), tiny_llama(64, vocab=vocab, seed=1)
    if head_scale != 1.0:
        with torch.no_grad():
            for model in models:
                model.lm_head.weight.mul_(head_scale)
    return models


class LogitEnsemble(torch.nn.Module):
    """A teacher that is no causal LM: the average of two models' logits, returned as a plain tensor."""

    def __init__(self):
        super().__init__()
        self.members = torch.nn.ModuleList([tiny_llama(48, seed=2), tiny_llama(64, seed=3)])

    def forward(self, input_ids, attention_mask=None):
        return sum(member(input_ids=input_ids, attention_mask=attention_mask).logits
                   for member in self.members) / len(self.members)


def token_batch(rows=4, length=12, vocab=VOCAB, seed=0):
    """input_ids, attention_mask and labels with a padded tail per row (labels -100 there), as a
    language-modelling collator gives them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(rows):
        attention_mask[row, length - 2 * row:] = 0  # rows of different real lengths
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def as_examples(batch):
    return [{key: value[row] for key, value in batch.items()} for row in range(batch["input_ids"].shape[0])]


def training_args(tmp_path, config_cls=TrainingArguments, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                    dataloader_drop_last=False)
    settings.update(overrides)
    return config_cls(**settings)


def reference_loss(student, teacher, batch, vocab=None, **options):
    """The float64 loss from both models' full logits (their own forward, softcap included)."""
    from kdfast.reference import distill_loss_reference

    def logits(model):
        model64 = copy.deepcopy(model).double().eval()
        out = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out[:, :-1, :vocab]

    return distill_loss_reference(logits(student), logits(teacher).detach(), batch["labels"][:, 1:], **options)


def word_tokenizer(vocab=VOCAB):
    """A word-level fast tokenizer over `vocab` made-up words, with pad (id 0) and eos (id 1)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def skip_head_check(model):
    """Marks `model` as checked by the trainers' first-batch comparison of its own logits with the fused loss's
    (kdfast.integrations.head_check): for a test that counts the model's forwards, or whose model's config names a
    logit post-processing its forward does not apply (the check would rightly refuse it)."""
    from kdfast.integrations.head_check import _CHECKED

    model.__dict__[_CHECKED] = True
    return model
