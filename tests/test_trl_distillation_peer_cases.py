"""TRL's own distillation test cases (huggingface/trl) for the behaviours kdfast shares with it, ported: TRL's inputs
and expectations, kdfast's code under test, each test naming the TRL test it ports (GOLD's are in
tests/test_trl_gold_peer_cases.py):

- tests/test_distillation_trainer.py (TestChunkedDivergenceLoss, TestDistillationTrainer): the chunked divergence
  against a full-vocabulary float64 reference (chunk sizes, hidden sizes, logit scale and softcap, temperature,
  biases, masking, gradients, GKD parity) and the trainer's `num_items_in_batch` reduction and full-logit loss.
- tests/experimental/test_distillation_trainer.py (TestGeneralizedJSDLossIsPinned): the generalized JSD pinned to a
  reference written from its definition.
- tests/experimental/test_gkd_trainer.py (TestGKDTrainer): GKD's `num_items_in_batch` reduction and its coverage of
  every completion token when prompts differ in length.

TRL's models there are Hub models; here the tiny models of tests/tiny_models.py."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from tiny_models import VOCAB, student_and_teacher, training_args, word_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

from kdfast.integrations import trl as kdfast_trl  # noqa: E402

if not hasattr(trl, "DistillationTrainer"):
    pytest.skip("TRL before 1.16 has no stable DistillationTrainer", allow_module_level=True)
from kdfast.integrations.trl_distillation import DistillationTrainer, chunked_divergence_loss  # noqa: E402

# The chunked divergence of DistillationTrainer (tests/test_distillation_trainer.py, TestChunkedDivergenceLoss)

def reference_chunked_divergence(student_hidden, teacher_hidden, student_w, teacher_w, completion_mask, beta,
                                 num_items_in_batch=None, s_bias=None, t_bias=None, s_scale=1.0, t_scale=1.0,
                                 s_softcap=None, t_softcap=None, temperature=1.0):
    """TRL's `_reference_chunked_divergence`, in float64: the whole batch projected at once, the JSD from its
    definition (probabilities, the mixture in probability space). Order: matmul, + bias, * scale, softcap, / T."""

    def logits(hidden, weight, bias, scale, softcap):
        out = hidden.double() @ weight.double().t()
        if bias is not None:
            out = out + bias.double()
        out = out * scale
        if softcap is not None:
            out = softcap * torch.tanh(out / softcap)
        return out / temperature

    student_log_probs = torch.log_softmax(logits(student_hidden, student_w, s_bias, s_scale, s_softcap), dim=-1)
    teacher_log_probs = torch.log_softmax(logits(teacher_hidden, teacher_w, t_bias, t_scale, t_softcap), dim=-1)
    student_probs, teacher_probs = student_log_probs.exp(), teacher_log_probs.exp()
    if beta == 0.0:  # forward KL: KL(teacher || student)
        per_element = teacher_probs * (teacher_log_probs - student_log_probs)
    elif beta == 1.0:  # reverse KL: KL(student || teacher)
        per_element = student_probs * (student_log_probs - teacher_log_probs)
    else:
        mixture_log_probs = ((1 - beta) * student_probs + beta * teacher_probs).log()
        per_element = (beta * (teacher_probs * (teacher_log_probs - mixture_log_probs))
                       + (1 - beta) * (student_probs * (student_log_probs - mixture_log_probs)))
    per_token = per_element.sum(dim=-1) * completion_mask.double()
    denominator = completion_mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / denominator


def chunked_inputs(B=2, K=6, H=8, V=17, n_masked=3, seed=0):
    """TRL's `_inputs`: random hidden states and heads, a few scattered positions masked."""
    g = torch.Generator().manual_seed(seed)
    student_hidden, teacher_hidden = torch.randn(B, K, H, generator=g), torch.randn(B, K, H, generator=g)
    student_w, teacher_w = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    completion_mask = torch.ones(B, K)
    completion_mask.reshape(-1)[torch.randperm(B * K, generator=g)[:n_masked]] = 0
    return student_hidden, teacher_hidden, student_w, teacher_w, completion_mask


def assert_close_to_reference(loss, expected):
    # kdfast's float32 loss against the float64 reference: float32 rounding of logits of spread ~3.
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [3, 4, 100])  # divides / doesn't divide / exceeds n_valid (= 9)
def test_chunked_matches_naive_full_vocab(beta, chunk_size, backend):
    """test_matches_naive_full_vocab, on every backend this machine runs (Triton under its interpreter off the
    GPU)."""
    inputs = chunked_inputs()
    device = device_for(backend)
    loss, _, n_valid = chunked_divergence_loss(*(tensor.to(device) for tensor in inputs[:5]), beta,
                                               chunk_size=chunk_size, backend=backend)
    assert_close_to_reference(loss.cpu(), reference_chunked_divergence(*inputs, beta))
    assert n_valid.item() == int(inputs[4].sum().item())


def ragged_inputs():
    """TRL's earlier revision's `_tensors` (torch.manual_seed(0)): 3 completions of 7 tokens, 2 cut short."""
    g = torch.Generator().manual_seed(0)
    student_hidden, teacher_hidden = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    student_weight, teacher_weight = torch.randn(29, 16, generator=g), torch.randn(29, 16, generator=g)
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    return student_hidden, teacher_hidden, student_weight, teacher_weight, mask


def test_chunked_ragged_mask_and_num_items():
    """TRL's earlier test_matches_full_vocab_divergence: a ragged mask (completions of different lengths), 29 tokens,
    chunk sizes 4, 5 and 64, num_items_in_batch = mask.sum()."""
    student_hidden, teacher_hidden, student_weight, teacher_weight, mask = ragged_inputs()
    for beta in (0.0, 0.5, 1.0):
        expected = reference_chunked_divergence(student_hidden, teacher_hidden, student_weight, teacher_weight, mask,
                                                beta)
        for chunk_size in (4, 5, 64):
            loss, _, num_valid = chunked_divergence_loss(student_hidden, teacher_hidden, student_weight,
                                                         teacher_weight, mask, beta, num_items_in_batch=mask.sum(),
                                                         chunk_size=chunk_size)
            assert_close_to_reference(loss, expected)
            assert num_valid == mask.sum()


def test_chunked_different_teacher_student_hidden_sizes():
    """test_different_teacher_student_hidden_sizes: hidden 8 and 12; only the vocabulary is shared."""
    g = torch.Generator().manual_seed(2)
    B, K, V = 2, 5, 13
    sh, th = torch.randn(B, K, 8, generator=g), torch.randn(B, K, 12, generator=g)
    sw, tw = torch.randn(V, 8, generator=g), torch.randn(V, 12, generator=g)
    mask = torch.ones(B, K)
    mask[1, -1] = 0
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=0.5, chunk_size=4)
    assert_close_to_reference(loss, reference_chunked_divergence(sh, th, sw, tw, mask, beta=0.5))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_applies_scale_softcap_temperature_and_bias(beta):
    """test_applies_logit_scale_and_softcapping (scales 0.7 / 1.3, softcaps 50 / 30), test_applies_temperature
    (T = 2) and test_applies_lm_head_bias (seed-3 biases), each against the reference."""
    sh, th, sw, tw, mask = chunked_inputs()
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta, chunk_size=4, student_logit_scale=0.7,
                                         teacher_logit_scale=1.3, student_final_logit_softcapping=50.0,
                                         teacher_final_logit_softcapping=30.0)
    assert_close_to_reference(loss, reference_chunked_divergence(sh, th, sw, tw, mask, beta, s_scale=0.7, t_scale=1.3,
                                                                 s_softcap=50.0, t_softcap=30.0))
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta, chunk_size=4, temperature=2.0)
    assert_close_to_reference(loss, reference_chunked_divergence(sh, th, sw, tw, mask, beta, temperature=2.0))
    g = torch.Generator().manual_seed(3)
    s_bias, t_bias = torch.randn(sw.size(0), generator=g), torch.randn(tw.size(0), generator=g)
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta, chunk_size=4, student_lm_head_bias=s_bias,
                                         teacher_lm_head_bias=t_bias)
    assert_close_to_reference(loss, reference_chunked_divergence(sh, th, sw, tw, mask, beta, s_bias=s_bias,
                                                                 t_bias=t_bias))


def test_chunked_beta_1_is_reverse_kl():
    """test_beta_1_is_reverse_kl: sum_x p_s (log p_s - log p_t) over the kept positions, per kept position."""
    sh, th, sw, tw, mask = chunked_inputs()
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=1.0, chunk_size=4)
    student_log_probs = torch.log_softmax((sh @ sw.t()).double(), dim=-1)
    teacher_log_probs = torch.log_softmax((th @ tw.t()).double(), dim=-1)
    per_token = (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum(dim=-1) * mask
    assert_close_to_reference(loss, per_token.sum() / mask.sum())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_parity_with_gkd(beta):
    """test_parity_with_gkd (identity heads, so the hidden states are the logits; GKD's "sum" with
    num_items_in_batch=1) and TRL's earlier test_matches_gkd_loss (random heads, GKD with labels and
    num_items_in_batch = mask.sum()): kdfast's chunked loss against TRL's GKD function."""
    B, K, V = 2, 5, 11
    g = torch.Generator().manual_seed(1)
    student_logits, teacher_logits = torch.randn(B, K, V, generator=g), torch.randn(B, K, V, generator=g)
    eye = torch.eye(V)
    mask = torch.ones(B, K)
    mask[0, -1] = 0
    labels = torch.where(mask.bool(), torch.ones_like(mask, dtype=torch.long), torch.full_like(mask, -100).long())
    loss, _, _ = chunked_divergence_loss(student_logits, teacher_logits, eye, eye, mask, beta, num_items_in_batch=1,
                                         chunk_size=4)
    gkd = TRLGKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta, reduction="sum")
    torch.testing.assert_close(loss, gkd, rtol=1e-5, atol=1e-5)

    sh, th, sw, tw, _ = chunked_inputs(B=3, K=7, H=16, V=29)
    ragged = torch.ones(3, 7)
    ragged[0, 5:] = 0
    ragged[2, 3:] = 0
    labels = torch.where(ragged.bool(), torch.zeros_like(ragged, dtype=torch.long),
                         torch.full_like(ragged, -100, dtype=torch.long))
    expected = TRLGKDTrainer.generalized_jsd_loss(sh @ sw.t(), th @ tw.t(), labels=labels, beta=beta,
                                                  num_items_in_batch=ragged.sum())
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, ragged, beta, num_items_in_batch=ragged.sum(), chunk_size=4)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("perturbation", ["add 5", "set 999"])
def test_chunked_masked_positions_ignored(perturbation):
    """test_masked_positions_ignored (masked positions' hidden states + 5) and TRL's earlier
    test_masked_positions_are_ignored (set to 999, which would overflow the softmax if read): same loss."""
    sh, th, sw, tw, mask = chunked_inputs()
    loss_a, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=0.5, chunk_size=4)
    masked = mask.reshape(-1) == 0
    sh2, th2 = sh.clone().reshape(-1, sh.size(-1)), th.clone().reshape(-1, th.size(-1))
    if perturbation == "add 5":
        sh2[masked] += 5.0
        th2[masked] += 5.0
    else:
        sh2[masked] = 999.0
        th2[masked] = 999.0
    loss_b, _, _ = chunked_divergence_loss(sh2.view_as(sh), th2.view_as(th), sw, tw, mask, beta=0.5, chunk_size=4)
    torch.testing.assert_close(loss_a, loss_b)


def test_chunked_grads_flow_and_zero_at_masked():
    """test_grads_flow_and_zero_at_masked: every kept position's hidden state gets a gradient, masked ones none."""
    sh, th, sw, tw, mask = chunked_inputs()
    sh = sh.clone().requires_grad_(True)
    loss, _, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=0.5, chunk_size=4)
    loss.backward()
    grad = sh.grad.reshape(-1, sh.size(-1))
    valid = mask.reshape(-1) != 0
    assert (grad[valid].abs().sum(dim=-1) > 0).all()
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))


def test_chunked_backward_matches_reference():
    """test_backward_matches_reference: the student's hidden-state and LM-head gradients against autograd through
    the full-vocabulary reference (float64 here)."""
    sh, th, sw, tw, mask = chunked_inputs()
    sh_c, sw_c = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    loss_c, _, _ = chunked_divergence_loss(sh_c, th, sw_c, tw, mask, beta=0.5, chunk_size=4)
    loss_c.backward()
    sh_r, sw_r = sh.double().requires_grad_(True), sw.double().requires_grad_(True)
    reference_chunked_divergence(sh_r, th, sw_r, tw, mask, beta=0.5).backward()
    torch.testing.assert_close(sh_c.grad.double(), sh_r.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sw_c.grad.double(), sw_r.grad, atol=1e-5, rtol=1e-5)


def test_chunked_identical_models_give_zero_divergence():
    """TRL's earlier test_identical_models_give_zero_divergence (beta 1: reverse KL of a model with itself)."""
    sh, _, sw, _, mask = chunked_inputs()
    loss, _, _ = chunked_divergence_loss(sh, sh, sw, sw, mask, beta=1.0, chunk_size=4)
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# The generalized JSD, pinned (tests/experimental/test_distillation_trainer.py, TestGeneralizedJSDLossIsPinned)
# --------------------------------------------------------------------------------------------------------------------

def reference_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """TRL's `_reference_generalized_jsd`, in float64: probabilities formed explicitly, the mixture in probability
    space, "batchmean" over the kept tokens (over the batch without labels)."""
    student_log_probs = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    student_probs, teacher_probs = student_log_probs.exp(), teacher_log_probs.exp()
    if beta == 0.0:
        per_element = teacher_probs * (teacher_log_probs - student_log_probs)
    elif beta == 1.0:
        per_element = student_probs * (student_log_probs - teacher_log_probs)
    else:
        mixture_log_probs = ((1 - beta) * student_probs + beta * teacher_probs).log()
        per_element = (beta * (teacher_probs * (teacher_log_probs - mixture_log_probs))
                       + (1 - beta) * (student_probs * (student_log_probs - mixture_log_probs)))
    if labels is None:
        return per_element.sum() / max(per_element.size(0), 1)
    mask = labels != -100
    return per_element[mask].sum() / mask.sum().clamp(min=1)


def pinned_inputs():
    generator = torch.Generator().manual_seed(42)  # TRL's: seeded so the numbers are pinned
    student_logits = torch.randn(2, 3, 5, generator=generator)
    teacher_logits = torch.randn(2, 3, 5, generator=generator)
    return student_logits, teacher_logits, torch.tensor([[-100, 1, 2], [-100, -100, 3]])


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("use_labels", [False, True])
def test_generalized_jsd_matches_reference_implementation(beta, use_labels):
    """test_matches_reference_implementation: kdfast's drop-in for TRL's generalized_jsd_loss."""
    student_logits, teacher_logits, labels = pinned_inputs()
    labels = labels if use_labels else None
    loss = kdfast_trl.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta)
    expected = reference_generalized_jsd(student_logits, teacher_logits, labels=labels, beta=beta)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_generalized_jsd_temperature_matches_reference(beta):
    """test_temperature_matches_reference: T = 2 enters the loss (no T^2 factor)."""
    student_logits, teacher_logits, labels = pinned_inputs()
    loss = kdfast_trl.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta, temperature=2.0)
    expected = reference_generalized_jsd(student_logits, teacher_logits, labels=labels, beta=beta, temperature=2.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Trainers: num_items_in_batch and the full-logit loss (test_distillation_trainer.py, test_gkd_trainer.py)
# --------------------------------------------------------------------------------------------------------------------

def distillation_trainer(tmp_path, beta):
    from datasets import Dataset

    student, teacher = student_and_teacher(head_scale=30.0)  # sharp heads: the divergence well above fp32 noise
    dataset = Dataset.from_dict({"prompt": ["w2 w3 w4", "w5 w6"]})  # TRL requires one; the batches are built here
    args = trl.DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                  save_strategy="no", disable_tqdm=True, seed=0, max_completion_length=4, bf16=False,
                                  beta=beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=word_tokenizer(),
                                   train_dataset=dataset)


def completion_batch(prompt_length=4, completion_length=3, seed=0):
    """TRL's batch in GRPO's key layout: 2 prompts of 4 tokens, 2 completions of 3, every position kept."""
    generator = torch.Generator().manual_seed(seed)
    return {"prompt_ids": torch.randint(0, VOCAB, (2, prompt_length), generator=generator),
            "prompt_mask": torch.ones(2, prompt_length, dtype=torch.long),
            "completion_ids": torch.randint(0, VOCAB, (2, completion_length), generator=generator),
            "completion_mask": torch.ones(2, completion_length, dtype=torch.long)}


@pytest.fixture(scope="module")
def jsd_quarter_trainer(tmp_path_factory):
    return distillation_trainer(tmp_path_factory.mktemp("distillation"), beta=0.25)


def assert_num_items_scales_the_mean(trainer, batch, num_valid):
    """TRL's check: num_items_in_batch = the valid tokens gives the local mean; twice that, half of it."""
    trainer.model.eval()
    with torch.no_grad():
        loss_mean = trainer.compute_loss(trainer.model, batch)
        loss_global = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid)
        loss_double = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid * 2)
    assert loss_mean > 1e-3
    torch.testing.assert_close(loss_global, loss_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_double, loss_mean / 2, rtol=1e-4, atol=1e-6)


def test_distillation_loss_normalizes_by_num_items_in_batch(jsd_quarter_trainer):
    """test_loss_normalizes_by_num_items_in_batch (DistillationTrainer): with num_items_in_batch the local valid
    count, sum / N is the local mean; twice that count halves the loss. (TRL's beta there is 0.5; 0.25 here, the
    trainer shared with the next case.)"""
    trainer, batch = jsd_quarter_trainer, completion_batch()
    num_valid = batch["completion_mask"].sum()
    assert_num_items_scales_the_mean(trainer, batch, num_valid)


def test_distillation_compute_loss_matches_full_logit_reference(jsd_quarter_trainer):
    """test_compute_loss_matches_full_logit_reference: both models' full forward, the completion positions' logits
    (the row before each completion token), the generalized JSD at beta 0.25 (not symmetric: a student/teacher swap
    would show) over num_items_in_batch; the reference in float64 copies of the models."""
    trainer, batch = jsd_quarter_trainer, completion_batch(seed=1)
    completion_length = batch["completion_ids"].shape[1]
    num_valid = batch["completion_mask"].sum()
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        keep = slice(-completion_length - 1, -1)

        def completion_logits(model):
            return copy.deepcopy(model).double()(input_ids=input_ids, attention_mask=attention_mask).logits[:, keep]

        slp = torch.log_softmax(completion_logits(trainer.model), dim=-1)
        tlp = torch.log_softmax(completion_logits(trainer.teacher_model), dim=-1)
        beta = torch.tensor(0.25, dtype=torch.float64)
        mixture = torch.logsumexp(torch.stack([slp + torch.log1p(-beta), tlp + torch.log(beta)]), dim=0)
        jsd = (0.25 * F.kl_div(mixture, tlp, reduction="none", log_target=True)
               + 0.75 * F.kl_div(mixture, slp, reduction="none", log_target=True))
        reference = jsd.sum() / num_valid
    assert reference > 1e-3
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def gkd_trainer(tmp_path_factory):
    from datasets import Dataset

    student, teacher = student_and_teacher(head_scale=30.0)
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "w2 w3"}]]})
    args = training_args(tmp_path_factory.mktemp("gkd"), beta=0.5, lmbda=0.0, max_new_tokens=4, bf16=False,
                         config_cls=GKDConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kdfast_trl.GKDTrainer(model=student, teacher_model=teacher, args=args,
                                     processing_class=word_tokenizer(), train_dataset=dataset)


def gkd_batch(prompt_lengths=(2, 9), completion_lengths=(8, 1), seed=0):
    """What GKD's collator gives for two conversations whose prompts differ in length (TRL's "Hi" / a long question):
    input_ids right-padded to one length with labels -100 on the prompt and the padding, and `prompts` the prompts
    left-padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    length = max(p + c for p, c in zip(prompt_lengths, completion_lengths))
    width = max(prompt_lengths)
    input_ids = torch.zeros(2, length, dtype=torch.long)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), -100)
    prompts = torch.zeros(2, width, dtype=torch.long)
    prompt_mask = torch.zeros(2, width, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        tokens = torch.randint(2, VOCAB, (p + c,), generator=generator)
        input_ids[row, :p + c], attention_mask[row, :p + c] = tokens, 1
        labels[row, p:p + c] = tokens[p:]
        prompts[row, width - p:], prompt_mask[row, width - p:] = tokens[:p], 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompts": prompts,
            "prompt_attention_mask": prompt_mask}


def test_gkd_loss_normalizes_by_num_items_in_batch(gkd_trainer):
    """test_loss_normalizes_by_num_items_in_batch (GKDTrainer; TRL gates it to an accelerator, kdfast runs it on the
    CPU): num_items_in_batch = the valid tokens gives the local mean; twice that, half of it."""
    trainer, batch = gkd_trainer, gkd_batch(prompt_lengths=(4, 4), completion_lengths=(6, 3))
    num_valid = (batch["labels"] != -100).sum()
    assert_num_items_scales_the_mean(trainer, batch, num_valid)


def test_gkd_loss_covers_all_completion_tokens_with_variable_length_prompts(gkd_trainer):
    """test_loss_covers_all_completion_tokens_with_variable_length_prompts: the prompts' batch width exceeds the first
    sample's prompt, so slicing at it would drop completion tokens; the loss over all valid tokens divided by their
    count (num_items_in_batch) must equal the local mean."""
    trainer, batch = gkd_trainer, gkd_batch()
    assert batch["prompts"].shape[1] > (batch["labels"][0] != -100).nonzero()[0].item()
    num_valid = (batch["labels"] != -100).sum()
    trainer.model.eval()
    with torch.no_grad():
        loss_mean = trainer.compute_loss(trainer.model, batch)
        loss_global = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid)
    torch.testing.assert_close(loss_global, loss_mean, rtol=1e-4, atol=1e-6)
    # And every one of those tokens is in it: the float64 GKD loss of the full logits over the same labels.
    with torch.no_grad():
        def shifted_logits(model):
            model64 = copy.deepcopy(model).double()
            return model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]

        expected = reference_generalized_jsd(shifted_logits(trainer.model), shifted_logits(trainer.teacher_model),
                                             labels=batch["labels"][:, 1:], beta=0.5)
    torch.testing.assert_close(loss_mean.double(), expected, rtol=1e-4, atol=1e-6)
