"""More of TRL's own tests/test_distillation_trainer.py (huggingface/trl) run on kdfast: the cases that
tests/test_trl_distillation_peer_cases.py does not port yet, TRL's inputs, tolerances and expectations, kdfast's
`chunked_divergence_loss` and `DistillationTrainer` under test, each test naming the TRL test it ports.

- TestChunkedDivergenceLoss: test_bf16_hidden_fp32_weight, test_backward_matches_reference over TRL's whole
  (beta, temperature, scale, softcap) grid, test_low_precision_backward_matches_reference (bf16 / fp16, with and
  without autocast: loss, entropy, student gradients, no teacher gradient), test_jsd_underflow_across_blocks and
  test_fully_masked_batch_keeps_graph; from TRL's earlier revision of the file (commit cd86b61) its ragged-mask
  test_beta_one_is_reverse_kl, test_gradients_flow_to_student and test_fully_masked_batch_keeps_graph.
- TestDistillationTrainer, loss-level: test_loss_normalizes_by_num_items_in_batch at TRL's beta 0.5 (the first file
  runs it at 0.25), the logged entropy and the num_items_in_batch reduction under gradient accumulation of test_train,
  test_train_beta_non_zero and test_train_with_gradient_accumulation (with the earlier revision's test_train_beta),
  and the earlier revision's test_identical_teacher_gives_zero_loss.

Everything runs on the CPU (TRL's `torch_device`). TRL shrinks its kernel's token / vocabulary chunks by patching
them (4 and 5, or 4 and 2053); those constants are not kdfast's, so kdfast's own `chunk_size=4` makes the chunks
small here. TRL's Hub models are the tiny models of tests/tiny_models.py, and its zen prompts made-up word prompts.
The expectations are the float64 full-vocabulary reference of the first file, compared in TRL's float32.

Left out, TestDistillationTrainer:
- test_init_minimal, test_train_dataset_format, test_train_with_tools, test_train_stops_on_every_eos_token_id,
  test_trust_remote_code, test_train_with_eval, test_train_with_iterable_dataset,
  test_iterable_dataset_requires_dispatch_batches_false, test_iterable_dataset_forces_num_workers_zero,
  test_iterable_eval_keeps_map_style_train_workers, test_init_with_train_dataset, test_init_with_eval_dataset,
  test_evaluate_with_eval_dataset, test_train_eval_on_start, test_train_with_pad_to_multiple_of,
  test_train_with_additional_generation_kwargs, test_train_with_generation_kwargs,
  test_train_with_chat_template_kwargs, test_train_multiple_dataloader_workers,
  test_pad_token_id_synced_with_model_config (and the earlier test_train_dataset_format,
  test_train_teacher_from_model_id): model loading from the Hub, datasets, generation, tools and evaluation, all
  TRL's own code, which kdfast's subclass inherits unchanged (it overrides the loss only); no loss-level check in them
  beyond what is ported here.
- test_teacher_vocab_size_mismatch_raises, test_teacher_model_init_kwargs_with_instantiated_teacher_raises:
  validation in TRL's constructor (Hub models), not the loss.
- test_train_vllm (vLLM, a GPU and Qwen3-0.6B); test_train_with_fp16 (fp16 mixed precision needs an accelerator);
  TestDistillationTrainerVLM (Hub vision-language models, vLLM).
- test_peft_init_is_seeded, test_train_peft_config, test_train_peft_model, test_train_peft_with_gradient_checkpointing,
  test_peft_non_lm_head_target_allowed, test_peft_modules_to_save_lm_head_allowed, test_peft_lm_head_adapter_raises,
  test_peft_prompt_learning_raises (and the earlier test_train_peft): PEFT;
  test_train_peft_and_quantization, test_train_peft_dora_and_quantization: PEFT with bitsandbytes quantisation (GPU).
"""

import copy
import warnings

import pytest
import torch
from tiny_models import student_and_teacher, word_tokenizer

trl = pytest.importorskip("trl")
if not hasattr(trl, "DistillationTrainer"):
    pytest.skip("TRL before 1.16 has no stable DistillationTrainer", allow_module_level=True)
from test_trl_distillation_peer_cases import (  # noqa: E402
    assert_num_items_scales_the_mean,
    chunked_inputs,
    completion_batch,
    distillation_trainer,
    ragged_inputs,
    reference_chunked_divergence,
)

from kdfast.integrations.trl import DistillationTrainer, chunked_divergence_loss  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# TestChunkedDivergenceLoss
# --------------------------------------------------------------------------------------------------------------------

def test_bf16_hidden_fp32_weight():
    """test_bf16_hidden_fp32_weight: bf16 hidden states against float32 heads project without a dtype mismatch."""
    sh, th, sw, tw, mask = chunked_inputs()
    loss, _, _ = chunked_divergence_loss(sh.bfloat16(), th.bfloat16(), sw, tw, mask, beta=0.5, chunk_size=4)
    expected = reference_chunked_divergence(sh.bfloat16().float(), th.bfloat16().float(), sw, tw, mask, beta=0.5)
    torch.testing.assert_close(loss, expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])  # 0.3: a generalized JSD off the symmetric point
@pytest.mark.parametrize(("temperature", "scale", "softcap"),
                         [(1.0, 1.0, None), (0.7, 1.0, None), (1.0, 0.5, 3.0), (2.0, 1.0, 3.0)])
def test_backward_matches_reference(beta, temperature, scale, softcap):
    """test_backward_matches_reference: the student's hidden-state and head gradients against autograd through the
    full-vocabulary reference, with the student's scale / softcap (a softcap of 3 bends most logits) and T."""
    sh, th, sw, tw, mask = chunked_inputs()
    sh_c, sw_c = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    loss_c, _, _ = chunked_divergence_loss(sh_c, th, sw_c, tw, mask, beta, student_logit_scale=scale,
                                           student_final_logit_softcapping=softcap, temperature=temperature,
                                           chunk_size=4)
    loss_c.backward()
    sh_r, sw_r = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    reference_chunked_divergence(sh_r, th, sw_r, tw, mask, beta, s_scale=scale, s_softcap=softcap,
                                 temperature=temperature).backward()
    torch.testing.assert_close(sh_c.grad, sh_r.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sw_c.grad, sw_r.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("use_autocast", [False, True])
def test_low_precision_backward_matches_reference(dtype, beta, use_autocast):
    """test_low_precision_backward_matches_reference: 16-bit inputs (or float32 ones under autocast) with sharp logits
    (std 10, or 30 for the KLs) and biases; a close scalar loss can hide gradient errors from rounded logits, so the
    reference is the float32 math on the 16-bit-rounded inputs, and the student's gradients within 1 % of it."""
    sh, th, sw, tw, mask = chunked_inputs(H=64)
    logit_std = 10.0 if beta == 0.5 else 30.0
    sw, tw = sw * (logit_std / 64**0.5), tw * (logit_std / 64**0.5)
    input_dtype = torch.float32 if use_autocast else dtype
    sh, th = sh.to(input_dtype).requires_grad_(), th.to(input_dtype).requires_grad_()
    sw, tw = sw.to(input_dtype).requires_grad_(), tw.to(input_dtype).requires_grad_()
    s_bias = torch.linspace(-1.0, 1.0, sw.size(0), requires_grad=True)
    t_bias = torch.linspace(1.0, -1.0, tw.size(0), requires_grad=True)
    with torch.autocast("cpu", dtype=dtype, enabled=use_autocast):
        loss, entropy, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta, student_lm_head_bias=s_bias,
                                                   teacher_lm_head_bias=t_bias, chunk_size=4)
    loss.backward()

    sh_r, sw_r = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
    s_bias_r = s_bias.detach().clone().requires_grad_()
    expected = reference_chunked_divergence(sh_r.to(dtype), th.detach().to(dtype), sw_r.to(dtype),
                                            tw.detach().to(dtype), mask, beta, s_bias=s_bias_r,
                                            t_bias=t_bias.detach())
    expected.backward()
    torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)
    logits = sh.detach().to(dtype).float() @ sw.detach().to(dtype).float().t() + s_bias.detach()
    log_probs = logits.log_softmax(dim=-1)
    expected_entropy = (-(log_probs.exp() * log_probs).sum(dim=-1) * mask).sum()
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    for actual, reference in ((sh.grad, sh_r.grad), (sw.grad, sw_r.grad), (s_bias.grad, s_bias_r.grad)):
        assert torch.isfinite(actual).all()
        relative_error = (actual.float() - reference.float()).abs().max() / reference.float().abs().max()
        assert relative_error < 0.01
    assert th.grad is None and tw.grad is None and t_bias.grad is None  # the teacher is a constant


def test_jsd_underflow_across_blocks():
    """test_jsd_underflow_across_blocks: 2053 words of which all but two sit 120 nats below (their probabilities
    underflow float32), the two swapped between student and teacher: a finite loss equal to the reference, a finite
    entropy and finite gradients."""
    sh, th, sw, tw, mask = chunked_inputs(B=1, K=3, H=1, V=2053, n_masked=1)
    sh.fill_(1.0)
    th.fill_(1.0)
    sw.fill_(-120.0)
    tw.fill_(-120.0)
    sw[:2, 0] = torch.tensor([0.0, 1.0])
    tw[:2, 0] = torch.tensor([1.0, 0.0])
    sh.requires_grad_()
    loss, entropy, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=0.5, chunk_size=4)
    expected = reference_chunked_divergence(sh, th, sw, tw, mask, beta=0.5)
    torch.testing.assert_close(loss, expected.float())
    assert torch.isfinite(entropy)
    loss.backward()
    assert torch.isfinite(sh.grad).all()


def test_fully_masked_batch_keeps_graph():
    """test_fully_masked_batch_keeps_graph: every position masked gives a finite 0 whose backward still reaches the
    student's hidden states, head weight and bias (zero gradients), or DDP / FSDP would hang at the all-reduce."""
    sh, th, sw, tw, _ = chunked_inputs()
    sh, sw = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    s_bias = torch.zeros(sw.size(0), requires_grad=True)
    mask = torch.zeros(sh.size(0), sh.size(1))
    loss, _, n_valid = chunked_divergence_loss(sh, th, sw, tw, mask, beta=0.5, student_lm_head_bias=s_bias,
                                               chunk_size=4)
    assert n_valid.item() == 0
    assert torch.isfinite(loss)
    loss.backward()
    assert sh.grad is not None and sw.grad is not None and s_bias.grad is not None
    assert torch.count_nonzero(sh.grad) == 0
    assert torch.count_nonzero(sw.grad) == 0
    assert torch.count_nonzero(s_bias.grad) == 0


def test_earlier_fully_masked_batch_keeps_graph():
    """The earlier revision's test_fully_masked_batch_keeps_graph: every completion truncated, beta 1,
    num_items_in_batch=1; the loss stays attached to the graph and its backward does not raise."""
    sh, th, sw, tw, _ = ragged_inputs()
    sh = sh.clone().requires_grad_(True)
    loss, _, num_valid = chunked_divergence_loss(sh, th, sw.clone().requires_grad_(True), tw, torch.zeros(3, 7),
                                                 beta=1.0, num_items_in_batch=1, chunk_size=4)
    assert num_valid == 0
    assert loss.requires_grad
    loss.backward()


def test_earlier_beta_one_is_reverse_kl():
    """The earlier revision's test_beta_one_is_reverse_kl: on the ragged mask, with num_items_in_batch = mask.sum(),
    beta 1 is sum_v p_s(v) (log p_s(v) - log p_t(v)) per kept token."""
    sh, th, sw, tw, mask = ragged_inputs()
    student_logits, teacher_logits = sh @ sw.t(), th @ tw.t()
    per_token = (torch.softmax(student_logits, dim=-1) * (torch.log_softmax(student_logits, dim=-1)
                                                          - torch.log_softmax(teacher_logits, dim=-1))).sum(-1)
    expected = (per_token * mask).sum() / mask.sum()
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=1.0, num_items_in_batch=mask.sum(), chunk_size=4)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_earlier_gradients_flow_to_student():
    """The earlier revision's test_gradients_flow_to_student: beta 1 on the ragged mask; the student's hidden states
    get a gradient, none at the first completion's truncated tail."""
    sh, th, sw, tw, mask = ragged_inputs()
    sh = sh.clone().requires_grad_(True)
    loss, _, _ = chunked_divergence_loss(sh, th, sw.clone().requires_grad_(True), tw, mask, beta=1.0,
                                         num_items_in_batch=mask.sum(), chunk_size=4)
    loss.backward()
    assert sh.grad.abs().sum() > 0
    assert torch.equal(sh.grad[0, 5:], torch.zeros_like(sh.grad[0, 5:]))


# --------------------------------------------------------------------------------------------------------------------
# TestDistillationTrainer, loss-level
# --------------------------------------------------------------------------------------------------------------------

def test_loss_normalizes_by_num_items_in_batch_at_beta_half(tmp_path):
    """test_loss_normalizes_by_num_items_in_batch at TRL's own beta 0.5: num_items_in_batch = the local valid
    tokens gives the local mean, twice that count half of it."""
    trainer, batch = distillation_trainer(tmp_path, beta=0.5), completion_batch()
    assert_num_items_scales_the_mean(trainer, batch, batch["completion_mask"].sum())


def train_on_policy(tmp_path, student, teacher, **config):
    """TRL's training setup (batch 3, completions of at most 8 tokens) on the tiny models and word prompts, a few
    steps (TRL trains 3 epochs of its zen prompts), each logged."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10", "w11", "w12 w13"] * 3})
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_completion_length=8, report_to=[],
                    use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    settings.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trl.DistillationConfig(**settings),
                                      processing_class=word_tokenizer(), train_dataset=dataset)
        trainer.train()
    return trainer


@pytest.mark.parametrize("config", [
    pytest.param({}, id="test_train"),  # TRL's default beta, 1 (reverse KL)
    pytest.param({"beta": 0.5}, id="test_train_beta_non_zero"),
    pytest.param({"beta": 0.0}, id="earlier_test_train_beta_0"),
    pytest.param({"gradient_accumulation_steps": 2}, id="test_train_with_gradient_accumulation"),
])
def test_train(tmp_path, config):
    """test_train, test_train_beta_non_zero (the generalized JSD's mixture branch end to end), the earlier
    test_train_beta and test_train_with_gradient_accumulation (the loss over accumulated micro-batches divided by the
    global num_items_in_batch): a train loss, the student's entropy logged from the loss's own pass, and, at TRL's
    learning rate 0.1 (the gradients are tiny), every student parameter changed."""
    student, teacher = student_and_teacher()
    previous = {name: param.detach().clone() for name, param in student.named_parameters()}
    trainer = train_on_policy(tmp_path, student, teacher, learning_rate=0.1, max_steps=2, **config)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert any("entropy" in entry for entry in trainer.state.log_history)
    for name, param in previous.items():
        assert not torch.equal(param, trainer.model.get_parameter(name)), f"Parameter {name} has not changed."


def test_identical_teacher_gives_zero_loss(tmp_path):
    """The earlier revision's test_identical_teacher_gives_zero_loss: a student distilling from a copy of itself has
    nothing to learn; the first logged loss is 0."""
    student, _ = student_and_teacher()
    trainer = train_on_policy(tmp_path, student, copy.deepcopy(student), max_steps=1)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[0] == pytest.approx(0.0, abs=1e-6)
