"""Input factories and the comparison every loss test makes: kdfast vs the float64 reference."""

from __future__ import annotations

import os

import torch

import kdfast
from kdfast.reference import distill_loss_reference, sparse_distill_loss_reference

# Tolerances per input dtype: the kernels accumulate in fp32; 16-bit inputs round the gradient on store.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (5e-3, 2e-3)}


def property_examples(default: int) -> int:
    """Hypothesis examples per property test: `default` in CI (derandomised, repeatable), more where
    KDFAST_PROPERTY_EXAMPLES asks for a wider search."""
    return int(os.environ.get("KDFAST_PROPERTY_EXAMPLES", default))


def beta_refused(divergence: str, beta: float) -> bool:
    """The betas kdfast refuses (kdfast/options.py): a skew's 1 (a loss of 0), and a mixture's below MIN_BETA."""
    from kdfast.options import MIN_BETA

    mixture = divergence == "jsd" or divergence.startswith("skew")
    return (divergence.startswith("skew") and beta == 1.0) or (mixture and 0.0 < beta < MIN_BETA)


def make_logits(shape, dtype, scale=3.0, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator) * scale).to(dtype).to(device)
    teacher = (torch.randn(shape, generator=generator) * scale).to(dtype).to(device)
    return student, teacher


def make_labels(lead_shape, vocab, pattern, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, lead_shape, generator=generator)
    flat = labels.view(-1)
    if pattern == "some":
        flat[::3] = -100
    elif pattern == "all":
        flat[:] = -100
    return labels.to(device)


def run_both(student, teacher, labels, backend, num_items_in_batch=None, **options):
    """(loss, grad) from kdfast and from the float64 reference, for the same inputs."""
    s = student.detach().clone().requires_grad_(True)
    loss = kdfast.distill_loss(s, teacher, labels, backend=backend, num_items_in_batch=num_items_in_batch,
                               **options)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss.device)
    (loss * weights).sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    ref = distill_loss_reference(s64, teacher.double(), labels, num_items_in_batch=num_items_in_batch,
                                 **{k: v for k, v in options.items() if k != "inplace_backward"})
    (ref * weights.double()).sum().backward()
    return loss, s.grad, ref, s64.grad


def assert_matches_reference(student, teacher, labels, backend, extra_atol=0.0, **options):
    loss, grad, ref, ref_grad = run_both(student, teacher, labels, backend, **options)
    assert loss.dtype == torch.float32, "the loss is float32 whatever the input dtype"
    assert grad.dtype == student.dtype, "the gradient has the student's dtype"
    rtol, atol = TOLERANCES[student.dtype]
    # Close distributions make KL a difference of nearly equal fp32 log-probabilities (~1e-7 * log V
    # each), which the weights then multiply: the absolute slack scales with them.
    temperature = options.get("temperature", 1.0)
    kd_scale = options.get("kd_weight", 1.0) * (temperature**2 if options.get("t2_scale", True) else 1.0)
    atol = atol * (1.0 + abs(kd_scale) + abs(options.get("ce_weight", 0.0))) + extra_atol
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=rtol, atol=atol)


def teacher_topk(teacher_logits, k, temperature, dtype=torch.float32):
    top = torch.log_softmax(teacher_logits.float() / temperature, dim=-1).topk(k, dim=-1)
    return top.indices, top.values.to(dtype)


def assert_sparse_matches_reference(student, ids, logprobs, labels, backend, extra_atol=0.0, **options):
    s = student.detach().clone().requires_grad_(True)
    loss = kdfast.sparse_distill_loss(s, ids, logprobs, labels, backend=backend, **options)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss.device)
    (loss * weights).sum().backward()
    s64 = student.detach().double().cpu().requires_grad_(True)
    ref = sparse_distill_loss_reference(s64, ids.cpu(), logprobs.cpu(), labels.cpu() if labels is not None else None,
                                        **{k: v for k, v in options.items() if k != "inplace_backward"})
    (ref * weights.double().cpu()).sum().backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == student.dtype
    rtol, atol = TOLERANCES[student.dtype]
    temperature = options.get("temperature", 1.0)
    atol = atol * (1.0 + temperature**2 + abs(options.get("ce_weight", 0.0))) + extra_atol
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=rtol, atol=atol)


def weighted_step_outputs(step, leaves: list) -> tuple:
    """(loss, components or None, the leaves' gradients) of `step(*leaves)`, its loss (per row or not) weighed
    0.5..1.5 before the backward, so that a per-row backward sees a grad_output of its own in every row."""
    out = step(*leaves)
    loss, parts = out if isinstance(out, tuple) else (out, None)
    grad_weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * grad_weights).sum().backward()
    return loss.detach(), parts, [leaf.grad for leaf in leaves]


def assert_compiled_step_equals_eager(step, run, data, part_names) -> None:
    """`step` compiled whole (fullgraph, AOTAutograd's eager backend) gives the eager step's loss, gradients and the
    components `part_names`, twice (the second call runs the cached graph); `run(step, data)` -> (loss, parts,
    gradients)."""
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    expected = run(step, data)
    for _ in range(2):
        loss, parts, grads = run(compiled, data)
        torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=1e-7)
        for grad, reference in zip(grads, expected[2]):
            assert (grad is None) == (reference is None)
            if grad is not None:
                torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-7)
        if parts is not None:
            for name in part_names:
                torch.testing.assert_close(getattr(parts, name), getattr(expected[1], name), rtol=1e-6, atol=1e-7)


def assert_compiled_under_autocast_equals_eager(step, run, data) -> None:
    """`step` under a bf16 autocast, compiled whole (fullgraph, AOTAutograd's eager backend), gives the eager step's
    loss and gradients; `run(step, data)` -> (loss, parts, gradients)."""
    def autocast_step(*leaves):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(*leaves)

    torch._dynamo.reset()
    compiled = torch.compile(autocast_step, backend="aot_eager", fullgraph=True)
    expected, got = run(autocast_step, data), run(compiled, data)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    for grad, reference in zip(got[2], expected[2]):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)


def assert_same_trainer_outcome(actual, expected, rtol=1e-5) -> None:
    """Two `compute_loss` results as (loss, logged metrics {name: [values]}, student gradients {name: tensor}): the
    same loss and metrics within `rtol`, every gradient within 1e-5 of the largest expected gradient."""
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=1e-6)
    assert actual[1].keys() == expected[1].keys()
    for key in expected[1]:
        torch.testing.assert_close(torch.tensor(actual[1][key]), torch.tensor(expected[1][key]), rtol=rtol, atol=1e-6)
    assert actual[2].keys() == expected[2].keys()
    scale = max(gradient.abs().max() for gradient in expected[2].values())
    for name, gradient in expected[2].items():
        torch.testing.assert_close(actual[2][name], gradient, rtol=0, atol=1e-5 * float(scale), msg=name)


def linear_loss_matches_reference(loss_fn, reference_fn, inputs, labels, tolerances, **options):
    """A fused linear loss (`loss_fn(labels=, **inputs, **options)`) and the gradients of its `student_*` inputs,
    under a random upstream gradient, against `reference_fn` on the same inputs, the student's in float64 on the CPU
    (`chunk_size`, `backend` and `fp32_logits` are not passed to it). `tolerances`: (rtol, atol) per the hidden
    states' dtype. Returns the loss."""
    ours = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if v is not None else None)
            for k, v in inputs.items()}
    loss = loss_fn(labels=labels, **ours, **options)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)).to(loss.device)
    (loss * weights).sum().backward()
    theirs = {k: (v.detach().double().cpu().requires_grad_(True) if k.startswith("student") and v is not None
                  else (v.cpu() if v is not None else None)) for k, v in inputs.items()}
    ref = reference_fn(labels=labels.cpu() if labels is not None else None, **theirs,
                       **{k: v for k, v in options.items() if k not in ("chunk_size", "backend", "fp32_logits")})
    (ref * weights.double().cpu()).sum().backward()
    rtol, atol = tolerances[inputs["student_hidden"].dtype]
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    for name in ("student_hidden", "student_weight", "student_bias"):
        if ours.get(name) is not None:
            torch.testing.assert_close(ours[name].grad.double().cpu(), theirs[name].grad, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}.grad: {m}")
    return loss
