"""The loss inside real training code: torch.compile, nn.Module, and TRL's own JSD loss."""

import warnings

import pytest
import torch
from helpers import make_labels, make_logits

import kdfast


def test_torch_compile_step_runs_the_fused_op():
    student, teacher = make_logits((2, 5, 48), torch.float32)
    labels = make_labels((2, 5), 48, "some")
    head = torch.nn.Linear(48, 48)

    def step(x):
        logits = head(x)
        return kdfast.distill_loss(logits[:, :-1], teacher[:, :-1], labels[:, :-1], divergence="jsd",
                                   ce_weight=0.5, temperature=2.0)

    eager_loss = step(student)
    eager_loss.backward()
    eager_grad = head.weight.grad.clone()
    head.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)
    compiled_loss = compiled(student)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(head.weight.grad, eager_grad)


def test_module_matches_function():
    student, teacher = make_logits((6, 30), torch.float32)
    labels = make_labels((6,), 30, "some")
    module = kdfast.DistillLoss(divergence="skew_forward_kl", beta=0.2, ce_weight=0.3, temperature=1.5)
    expected = kdfast.distill_loss(student, teacher, labels, divergence="skew_forward_kl", beta=0.2,
                                   ce_weight=0.3, temperature=1.5)
    torch.testing.assert_close(module(student, teacher, labels), expected)
    assert "skew_forward_kl" in repr(module)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl(beta, temperature):
    pytest.importorskip("trl")  # installed by the Makefile (CI); GPU machines may lack it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    student, teacher = make_logits((2, 7, 53), torch.float32)
    labels = make_labels((2, 7), 53, "some")
    ours_input = student.clone().requires_grad_(True)
    trl_input = student.clone().requires_grad_(True)
    ours = kdfast.distill_loss(ours_input, teacher, labels, divergence="jsd", beta=beta, temperature=temperature,
                               t2_scale=False)
    theirs = GKDTrainer.generalized_jsd_loss(trl_input, teacher, labels, beta=beta, temperature=temperature)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_input.grad, trl_input.grad, rtol=1e-4, atol=1e-7)
