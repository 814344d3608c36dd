"""The trainers' check that each model's own logits are the fused loss's (`check_head_map`): the families kdfast reads
(a softcap, each logit-scale name, a head with a bias, the hidden states scaled before the head, a padded head, 16-bit
weights, packed examples) pass; a model whose forward does more before its logits is refused by name at the first
batch rather than distilled on other logits or failing deep inside: ModernBERT's decoder (whose get_decoder() is its
head), a head that normalises its rows (Baichuan's NormHead, remote code) and logits scaled by a name no config
shares. The check runs once per model."""

import pytest
import torch
from test_fused_causal_lm import FAMILIES
from tiny_models import VOCAB, student_and_teacher, tiny_llama, token_batch, training_args

from kdfast.integrations.head_check import check_head_map
from kdfast.integrations.transformers import DistillationTrainer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("make", FAMILIES, ids=lambda make: make.__name__)
def test_the_families_kdfast_reads_pass(make):
    torch.manual_seed(0)
    check_head_map(make(), token_batch())


def test_16_bit_weights_and_packed_examples_pass():
    model = tiny_llama().to(torch.bfloat16)
    rows = [torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(length)) for length in (7, 5)]
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": row.tolist()}
                                                                            for row in rows])
    check_head_map(model, dict(packed))


def modernbert_decoder():
    config = transformers.ModernBertDecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    return transformers.ModernBertDecoderForCausalLM(config)


class NormHead(torch.nn.Linear):
    """Baichuan 2's head: each row normalised before the product."""

    def forward(self, hidden):
        return torch.nn.functional.linear(hidden, torch.nn.functional.normalize(self.weight))


def norm_head_llama():
    model = tiny_llama()
    head = NormHead(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.data.copy_(model.lm_head.weight.data * 3.0)
    model.lm_head = head
    return model


class ScaledLogits(transformers.LlamaForCausalLM):
    """A remote-code model that scales its logits by an attribute of its own."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 4.0
        return output


def scaled_llama():
    torch.manual_seed(0)
    return ScaledLogits(tiny_llama().config)


@pytest.mark.parametrize("make", [norm_head_llama, scaled_llama], ids=lambda make: make.__name__)
def test_a_model_whose_forward_does_more_is_refused(make):
    model = make()
    with pytest.raises(ValueError, match=f"{type(model).__name__}'s own logits differ .* kdfast cannot distil"):
        check_head_map(model, token_batch())


def test_a_decoder_lookup_that_finds_the_head_is_refused():
    """ModernBERT's decoder keeps its output embeddings as `decoder`, which get_decoder() returns."""
    with pytest.raises(ValueError, match=r"ModernBertDecoderForCausalLM.get_decoder\(\) is a Linear, which does not "
                                         r"run on the input ids .* kdfast cannot distil"):
        check_head_map(modernbert_decoder(), token_batch())


def test_the_trainer_refuses_such_a_teacher_at_its_first_batch(tmp_path):
    """With teacher_logits="head" (by default the trainer takes its own logits: test_trainer_teacher_logits.py)."""
    student, _ = student_and_teacher()
    trainer = DistillationTrainer(model=student, teacher_model=norm_head_llama(), args=training_args(tmp_path),
                                  teacher_logits="head")
    with pytest.raises(ValueError, match="LlamaForCausalLM's own logits differ"):
        trainer.compute_loss(trainer.model, token_batch())


def test_the_check_runs_once_per_model_and_leaves_its_mode(tmp_path):
    student, teacher = student_and_teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path))
    student.train()
    calls = []
    hook = student.register_forward_hook(lambda *_: calls.append(student.training))
    for _ in range(2):
        trainer.compute_loss(trainer.model, token_batch())
    hook.remove()
    assert calls == [False], "one own forward, in eval mode, at the first batch"
    assert student.training


class WithoutCacheArgument(transformers.LlamaForCausalLM):
    """A remote-code forward with fixed arguments: no use_cache, no **kwargs."""

    def forward(self, input_ids=None, attention_mask=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask)


def test_a_forward_without_use_cache_is_checked():
    torch.manual_seed(0)
    check_head_map(WithoutCacheArgument(tiny_llama().config), token_batch())
