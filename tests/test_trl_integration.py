"""kdfast.integrations.trl against TRL itself: `generalized_jsd_loss` gives TRL's values and gradients, and the
kdfast `GKDTrainer` computes TRL's GKD loss (from hidden states, or a teacher's own logits where its head is not all
its forward does) and runs its on-policy step."""

import warnings

import pytest
import torch
from helpers import make_labels, make_logits
from tiny_models import VOCAB, student_and_teacher, token_batch, training_args, word_tokenizer

trl_gkd = pytest.importorskip("trl.experimental.gkd")  # installed by the Makefile (CI); GPU machines may lack it
from kdfast.integrations import trl as kdfast_trl  # noqa: E402

TRL_LOSS = trl_gkd.GKDTrainer.generalized_jsd_loss


def _loss_and_grad(loss_fn, student, teacher, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_fn(student, teacher, **kwargs)
    loss.backward()
    return loss.detach().float(), student.grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_loss_equals_trl(beta, reduction, with_labels):
    student, teacher = make_logits((2, 7, 53), torch.float32)
    labels = make_labels((2, 7), 53, "some") if with_labels else None
    kwargs = dict(labels=labels, beta=beta, temperature=1.7, reduction=reduction)
    loss, grad = _loss_and_grad(kdfast_trl.generalized_jsd_loss, student, teacher, **kwargs)
    expected, expected_grad = _loss_and_grad(TRL_LOSS, student, teacher, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_items", [5, torch.tensor(9)])
def test_generalized_jsd_loss_num_items_equals_trl(num_items):
    student, teacher = make_logits((3, 5, 40), torch.float32, seed=3)
    labels = make_labels((3, 5), 40, "some")
    kwargs = dict(labels=labels, beta=0.5, num_items_in_batch=num_items)
    loss, grad = _loss_and_grad(kdfast_trl.generalized_jsd_loss, student, teacher, **kwargs)
    expected, expected_grad = _loss_and_grad(TRL_LOSS, student, teacher, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_elementwise_reduction_is_trls():
    student, teacher = make_logits((4, 30), torch.float32)
    loss = kdfast_trl.generalized_jsd_loss(student, teacher, reduction="none")
    assert loss.shape == (4, 30)
    torch.testing.assert_close(loss, TRL_LOSS(student, teacher, reduction="none"))


def _gkd_trainers(tmp_path, beta, lmbda=0.0, make_teacher=None):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    # TRL requires a dataset; the tests pass their batches to compute_loss / training_step directly.
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "w2 w3"}]]})
    trainers = []
    for cls in (trl_gkd.GKDTrainer, kdfast_trl.GKDTrainer):
        student, teacher = student_and_teacher(head_scale=30.0)
        teacher = make_teacher() if make_teacher is not None else teacher
        # GKDConfig defaults to bf16 autocast; fp32 compares the two losses at fp32 precision.
        args = training_args(tmp_path, beta=beta, lmbda=lmbda, max_new_tokens=4, bf16=False, config_cls=GKDConfig)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainers.append(cls(model=student, teacher_model=teacher, args=args, processing_class=word_tokenizer(),
                                    train_dataset=dataset))
    return trainers


@pytest.mark.parametrize("beta,teacher", [(0.0, None), (0.5, None), (1.0, None), (0.5, "norm head")])
def test_gkd_trainer_loss_and_gradients_equal_trls(tmp_path, beta, teacher):
    """"norm head": a teacher whose head normalises its rows, distilled through its own logits as TRL's trainer
    distils it (teacher_logits="auto")."""
    from test_head_check import norm_head_llama

    trl_trainer, kdfast_trainer = _gkd_trainers(tmp_path, beta, make_teacher=norm_head_llama if teacher else None)
    batch = token_batch()
    results = []
    for trainer in (trl_trainer, kdfast_trainer):
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
        loss.backward()
        results.append((loss.detach().float(), [p.grad for p in trainer.model.parameters()]))
    (expected, expected_grads), (loss, grads) = results
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        # Two fp32 computations in different orders: the slack scales with the tensor's largest entry.
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=3e-5 * expected_grad.abs().max().item())


def test_gkd_on_policy_training_step_runs(tmp_path):
    _, trainer = _gkd_trainers(tmp_path, beta=0.5, lmbda=1.0)  # lmbda 1: every step samples from the student
    batch = token_batch(vocab=VOCAB)
    batch["prompts"], batch["prompt_attention_mask"] = batch["input_ids"][:, :4], batch["attention_mask"][:, :4]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop
    loss = trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    assert torch.isfinite(loss)
    assert batch["input_ids"].shape[1] <= 4 + 4, "the step trained on the student's own samples"
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
