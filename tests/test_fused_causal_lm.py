"""kdfast.patch_causal_lm: a Hugging Face causal LM's own training loss (`model(..., labels=labels).loss`) computed by
the fused linear cross-entropy. Against the unpatched model (its ForCausalLMLoss on the full logits): the loss and
every parameter's gradient, for each way a model family maps its head's output to logits (none, Gemma-2's softcap,
Cohere's scale, Granite's division, MiniCPM3's division of the hidden states, Falcon-H1's multiplier, Phi's biased
head, tied embeddings, a VLM's text path, a mixture of experts whose loss adds its router loss),
`num_items_in_batch`, `shift_labels`, positional labels, 16-bit weights, a PEFT model; eval and unlabelled calls
untouched; a model whose logit map is not the one its config names refused; `transformers.Trainer` steps with
gradient accumulation equal; another loss function refused."""

import copy

import pytest
import torch
from tiny_models import VOCAB, as_examples, tiny_llama, token_batch, training_args

import kdfast
from kdfast.integrations.transformers import patch_causal_lm

transformers = pytest.importorskip("transformers")


def _small(config_cls, **settings):
    return config_cls(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=0), **settings})


def gemma2():
    config = _small(transformers.Gemma2Config, head_dim=16, final_logit_softcapping=2.0)
    return transformers.Gemma2ForCausalLM(config)


def cohere():
    return transformers.CohereForCausalLM(_small(transformers.CohereConfig, logit_scale=0.25))


def granite():
    return transformers.GraniteForCausalLM(_small(transformers.GraniteConfig, logits_scaling=4.0))


def phi():
    return transformers.PhiForCausalLM(_small(transformers.PhiConfig))


def minicpm3():
    """Divides the hidden states by `logits_scaling` (hidden_size / dim_model_base = 4) before its head, where
    Granite divides the logits: the recorded input carries the scale, so the patch must not apply it again."""
    config = _small(transformers.MiniCPM3Config, dim_model_base=8, q_lora_rank=16, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=2)
    return transformers.MiniCPM3ForCausalLM(config)


def mixtral():
    """A mixture of experts whose loss adds its router's load-balancing loss when given labels."""
    config = _small(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2,
                    output_router_logits=True, router_aux_loss_coef=0.5)
    return transformers.MixtralForCausalLM(config)


def falcon_h1():
    config = _small(transformers.FalconH1Config, lm_head_multiplier=0.5, mamba_d_ssm=32, mamba_n_heads=4,
                    mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, head_dim=16)
    return transformers.FalconH1ForCausalLM(config)


def qwen2_vl():
    """A vision-language model's text path: its head sits on the language model's output as a causal LM's does."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, spatial_patch_size=14)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
    return transformers.Qwen2VLForConditionalGeneration(config)


def llama():
    return tiny_llama()


def tied_llama():
    return tiny_llama(tie_word_embeddings=True)


FAMILIES = [llama, tied_llama, gemma2, cohere, granite, phi, falcon_h1, qwen2_vl, mixtral, minicpm3]


def own_and_patched(make):
    torch.manual_seed(0)
    model = make().train()
    if hasattr(model.get_output_embeddings(), "weight"):
        with torch.no_grad():  # sharper heads: the loss's gradient well above the models' rounding
            model.get_output_embeddings().weight.mul_(8.0)
    return model, patch_causal_lm(copy.deepcopy(model))


def assert_same_gradients(model, patched, rtol=1e-4, atol=0.0):
    """In relative L2 (`atol`: an absolute floor for gradients that are rounding alone)."""
    checked = 0
    for (name, own), (_, fused) in zip(model.named_parameters(), patched.named_parameters()):
        if own.grad is None:
            assert fused.grad is None or not fused.grad.any(), name
            continue
        size = own.grad.double().norm().item()
        error = ((fused.grad.double() - own.grad.double()).norm()).item()
        assert error < rtol * size + atol, (name, error / max(size, 1e-30))
        checked += 1
    assert checked > 0


def assert_same_loss_and_gradients(model, patched, own, fused, atol=0.0):
    """The fused output's loss is the model's own, with no logits, and so is every parameter's gradient."""
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)
    own.loss.backward()
    fused.loss.backward()
    assert_same_gradients(model, patched, atol=atol)


@pytest.mark.parametrize("make", FAMILIES)
def test_loss_and_gradients_equal_the_models_own(make):
    model, patched = own_and_patched(make)
    batch = token_batch()
    assert_same_loss_and_gradients(model, patched, model(**batch), patched(**batch))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3"])
def test_vision_language_models_on_batches_with_images(family):
    """The head hook sees the hidden states with the images merged in, whatever the model's forward does first."""
    from vision_batches import vision_models, with_labels

    (model,), make_batch = vision_models(family, count=0)
    model, patched = own_and_patched(lambda: model)
    batch = with_labels(make_batch(model, seed=3))
    # An attention key bias's gradient is rounding alone (the softmax ignores it): an absolute floor.
    assert_same_loss_and_gradients(model, patched, model(**batch), patched(**batch), atol=1e-6)
    visual = [p.grad for name, p in patched.named_parameters() if "vision" in name or "visual" in name or
              "multi_modal_projector" in name]
    assert any(grad is not None and grad.any() for grad in visual), "the images reached no vision parameter"


def test_packed_examples_equal_the_models_own_loss():
    """DataCollatorWithFlattening's row: the model's own forward takes its positions; the loss its own labels."""
    from transformers import DataCollatorWithFlattening

    model, patched = own_and_patched(llama)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, model.config.vocab_size, (length,), generator=generator) for length in (7, 5)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": row.tolist()} for row in rows])
    assert_same_loss_and_gradients(model, patched, model(**packed), patched(**packed))


def test_the_router_loss_is_kept():
    model, patched = own_and_patched(mixtral)
    batch = token_batch()
    fused = patched(**batch)
    assert fused.aux_loss is not None and fused.aux_loss.item() > 0
    head = patched.get_output_embeddings()
    hidden = patched.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    ce = kdfast.linear_cross_entropy(hidden[:, :-1], head.weight, batch["labels"][:, 1:])
    torch.testing.assert_close(fused.loss, ce + 0.5 * fused.aux_loss, rtol=1e-5, atol=1e-6)


def test_another_loss_function_is_refused():
    model = tiny_llama()
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="not transformers' ForCausalLMLoss"):
        patch_causal_lm(model)


def test_the_logit_maps_change_the_loss():
    """The families above differ from a plain head: a patch that ignored the map would fail them."""
    for make in (gemma2, cohere, granite, falcon_h1, minicpm3):
        model, _ = own_and_patched(make)
        batch = token_batch()
        head = model.get_output_embeddings()
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        plain = kdfast.linear_cross_entropy(hidden[:, :-1], head.weight, batch["labels"][:, 1:], bias=head.bias)
        assert abs(plain.item() - model(**batch).loss.item()) > 1e-2, make.__name__


def test_num_items_in_batch_divides_the_sum():
    model, patched = own_and_patched(llama)
    batch = token_batch()
    count = torch.tensor(7)
    own, fused = model(**batch, num_items_in_batch=count), patched(**batch, num_items_in_batch=count)
    assert_same_loss_and_gradients(model, patched, own, fused)


def test_shift_labels_and_positional_labels():
    model, patched = own_and_patched(llama)
    batch = token_batch()
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=shifted,
                labels=batch["labels"])
    # Both, as Trainer passes them under context parallelism (each rank's shifted labels): shift_labels wins.
    fused = patched(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=shifted,
                    labels=torch.zeros_like(batch["labels"]))
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)
    # Llama's forward takes labels sixth: input_ids, attention_mask, position_ids, cache, inputs_embeds, labels.
    positional = patched(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"])
    torch.testing.assert_close(positional.loss, own.loss, rtol=1e-5, atol=1e-6)
    assert positional.logits is None


def test_16_bit_weights_match_the_models_own_loss():
    model, patched = own_and_patched(llama)
    model, patched = model.to(torch.bfloat16), patched.to(torch.bfloat16)
    batch = token_batch()
    own, fused = model(**batch), patched(**batch)
    # Both round each logit to bf16 once and reduce in float32; the backbones are the same bf16 code.
    torch.testing.assert_close(fused.loss.float(), own.loss.float(), rtol=1e-3, atol=1e-3)


def test_peft_model_is_patched_at_its_base():
    peft = pytest.importorskip("peft")
    model, _ = own_and_patched(llama)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    own = peft.get_peft_model(model, config)
    fused = patch_causal_lm(copy.deepcopy(own))
    batch = token_batch()
    assert_same_loss_and_gradients(own, fused, own(**batch), fused(**batch))


def test_peft_adapter_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="PEFT adapter"):
        patch_causal_lm(model)


def test_eval_and_unlabelled_calls_build_the_logits():
    model, patched = own_and_patched(llama)
    batch = token_batch()
    unlabelled = {key: batch[key] for key in ("input_ids", "attention_mask")}
    torch.testing.assert_close(patched(**unlabelled).logits, model(**unlabelled).logits)
    model.eval()
    patched.eval()
    with torch.no_grad():
        own, kept = model(**batch), patched(**batch)
    torch.testing.assert_close(kept.logits, own.logits)
    torch.testing.assert_close(kept.loss, own.loss)
    patch_causal_lm(patched, training_only=False)
    with torch.no_grad():
        fused = patched(**batch)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)


def test_unpatching_restores_the_forward_and_repatching_replaces_the_settings():
    model = tiny_llama().train()
    patch_causal_lm(model, label_smoothing=0.1)
    patch_causal_lm(model)  # the second patch replaces the first, not wraps it
    batch = token_batch()
    reference = copy.deepcopy(model)
    patch_causal_lm(reference, False)
    assert "forward" not in reference.__dict__
    own, fused = reference(**batch), model(**batch)
    assert own.logits is not None and fused.logits is None
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)


def test_settings_reach_the_loss():
    model = tiny_llama().train()
    batch = token_batch()
    smoothed = patch_causal_lm(copy.deepcopy(model), label_smoothing=0.2)(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                                 label_smoothing=0.2)
    torch.testing.assert_close(smoothed, expected, rtol=1e-5, atol=1e-6)


def test_class_weights_reach_the_loss():
    """Per-class weights on a patched model's loss: torch's weighted CE of its own logits; refused by name when of
    the wrong size, where the patch is made."""
    model = tiny_llama().train()
    batch = token_batch()
    weights = torch.rand(VOCAB, generator=torch.Generator().manual_seed(3)) + 0.5
    weighted = patch_causal_lm(copy.deepcopy(model), class_weights=weights, label_smoothing=0.1)(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                                 weight=weights, label_smoothing=0.1)
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=rf"class_weights must have shape \[{VOCAB}\]"):
        patch_causal_lm(copy.deepcopy(model), class_weights=torch.ones(VOCAB + 1))



def test_token_scaling_reaches_the_loss():
    """`token_scaling="dft"` on a patched model's loss and gradient: TRL's SFT DFT loss of its own logits (each
    token's -log p times p detached, over the kept tokens); "eaft" too; refused by name when unknown, where the patch
    is made."""
    model = tiny_llama().train()
    batch = token_batch()
    patched = patch_causal_lm(copy.deepcopy(model), token_scaling="dft")
    patched(**batch).loss.backward()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    kept = labels != -100
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * kept
    expected = (-log_probs * log_probs.exp().detach()).sum() / kept.sum()
    expected.backward()
    torch.testing.assert_close(patched(**batch).loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patched.lm_head.weight.grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    # EAFT: each kept token's CE times (its top-20 entropy / 3), as LlamaFactory writes it.
    eaft = patch_causal_lm(copy.deepcopy(model), token_scaling="eaft")(**batch).loss
    with torch.no_grad():
        top = logits.float()[kept].topk(20, dim=-1).values
        log_probs_top = top - torch.logsumexp(top, -1, keepdim=True)
        factors = -(log_probs_top.exp() * log_probs_top).sum(-1) / 3.0
    ce = torch.nn.functional.cross_entropy(logits.float()[kept], labels[kept], reduction="none")
    torch.testing.assert_close(eaft, (ce * factors).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token_scaling must be None, \"dft\""):
        patch_causal_lm(copy.deepcopy(model), token_scaling="DFT")

@pytest.mark.parametrize("where", ["setting", "call"])
def test_ignore_index_from_the_setting_or_the_call(where):
    """`ignore_index` fixed by the patch, or passed to the call as ForCausalLMLoss takes it: labels equal to it (and
    the shift's padding) carry no loss."""
    model = tiny_llama().train()
    batch = token_batch()
    labels = batch["labels"].masked_fill(batch["labels"] == -100, 7)
    labels[:, 3] = 7
    if where == "setting":
        loss = patch_causal_lm(copy.deepcopy(model), ignore_index=7)(**{**batch, "labels": labels}).loss
    else:
        loss = patch_causal_lm(copy.deepcopy(model))(**{**batch, "labels": labels}, ignore_index=7).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=7)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_fully_ignored_batch_is_a_differentiable_zero():
    """Where the model's own mean divides 0 by 0 (NaN), kdfast's mean over no kept label is 0, with zero
    gradients (kdfast's reduction everywhere)."""
    model = patch_causal_lm(tiny_llama().train())
    batch = token_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = model(**batch).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(not parameter.grad.any() for parameter in model.parameters() if parameter.grad is not None)


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    """A reference or EMA model deep-copied from a patched one: its fused forward is its own, not the original's."""
    patched = patch_causal_lm(tiny_llama().train())
    clone = copy.deepcopy(patched)
    with torch.no_grad():
        clone.lm_head.weight.mul_(30.0)
    batch = token_batch()
    fused = clone(**batch)
    assert fused.logits is None
    own = patch_causal_lm(copy.deepcopy(clone), False)(**batch)
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)
    assert abs(patched(**batch).loss.item() - fused.loss.item()) > 1e-2


def test_torch_compile_of_the_patched_model():
    torch.manual_seed(0)
    model = tiny_llama(layers=1).train()
    patched = patch_causal_lm(copy.deepcopy(model))
    batch = token_batch()
    patched(**batch)  # finding the logit map reads the probe to the host: once, before compiling
    # aot_eager: dynamo traces the patched forward and AOT autograd its backward, without code generation.
    own, fused = model(**batch), torch.compile(patched, backend="aot_eager")(**batch)
    assert_same_loss_and_gradients(model, patched, own, fused)


def test_a_replaced_head_is_named():
    model = patch_causal_lm(tiny_llama().train())
    model.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match="patch the model again"):
        model(**token_batch())


def test_a_logit_map_the_config_does_not_name_is_refused():
    class DoubledLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 2.0
            return output

    model = DoubledLogits(tiny_llama().config).train()
    patch_causal_lm(model)
    with pytest.raises(ValueError, match="logit_scale=1.0, softcap=None"):
        model(**token_batch())


def test_bad_settings_are_refused_at_the_patch():
    with pytest.raises(TypeError, match="temperature"):
        patch_causal_lm(tiny_llama(), temperature=2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        patch_causal_lm(tiny_llama(), label_smoothing=1.5)
    model = tiny_llama()
    model.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match="LM head"):
        patch_causal_lm(model)


def test_trainer_steps_with_gradient_accumulation_equal_the_unpatched_model(tmp_path):
    """Trainer passes num_items_in_batch to a forward that takes **kwargs (the patch keeps the signature): two
    micro-batches of rows of different lengths, each summed over the whole batch's kept labels."""
    updates = []
    for patched in (False, True):
        model = tiny_llama().train()
        if patched:
            patch_causal_lm(model)
        args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=as_examples(token_batch(rows=8)))
        assert trainer.model_accepts_loss_kwargs
        initial = copy.deepcopy(model.state_dict())
        result = trainer.train()
        updates.append((result.training_loss,
                        {name: value - initial[name] for name, value in model.state_dict().items()}))
    (own_loss, own), (fused_loss, fused) = updates
    assert fused_loss == pytest.approx(own_loss, rel=1e-5)
    assert any(update.abs().max() > 1e-4 for update in own.values()), "the steps changed nothing"
    for name, update in own.items():
        torch.testing.assert_close(fused[name], update, rtol=1e-4, atol=1e-6, msg=name)
