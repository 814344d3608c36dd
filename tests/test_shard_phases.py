"""Every backend's kernel over vocabulary shards, in one process: each shard's STATS, combined, then SUMS and
GRADIENT from the global row statistics, must give the single-device loss and gradient (docs/DESIGN.md, "Shards
and phases"). The vocab-parallel loss runs exactly these calls around its two collectives."""

import math

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels, make_logits

from kdfast.dispatch import DeviceRows
from kdfast.kernel_abi import Phase, PhaseCall, SparseTargets
from kdfast.options import LossOptions
from kdfast.reduction import weighted_total
from kdfast.sparse_options import SparseOptions

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
BOUNDS = [0, 13, 14, 61]  # uneven shards, one of a single column


def sharded(kernel, student, teacher, labels, opts, grad_scale, bounds=BOUNDS):
    """`teacher`: dense logits (each shard gets its columns) or SparseTargets (every shard gets them whole); `bounds`:
    the shards' first columns, then the vocabulary's width."""
    shards = list(zip(bounds[:-1], bounds[1:]))
    sparse = isinstance(teacher, SparseTargets)
    views = [(student[..., a:b], teacher if sparse else teacher[..., a:b]) for a, b in shards]
    stats = torch.stack([kernel(s, t, labels, grad_scale, None, opts, PhaseCall(Phase.STATS, a))
                         for (s, t), (a, _) in zip(views, shards)])
    lse = torch.logsumexp(stats, dim=0)
    grads = [torch.empty_like(s) for s, _ in views]
    one_pass = not opts.gradient_needs_row_sums
    vocab = bounds[-1]
    sums = sum(kernel(s, t, labels, grad_scale, g if one_pass else None, opts,
                      PhaseCall(Phase.SUMS, a, lse, global_vocab=vocab))
               for (s, t), g, (a, _) in zip(views, grads, shards))
    if not one_pass:
        for (s, t), g, (a, _) in zip(views, grads, shards):
            kernel(s, t, labels, grad_scale, g, opts, PhaseCall(Phase.GRADIENT, a, lse, sums, global_vocab=vocab))
    loss = opts.kd_scale * sums[:, 0] + opts.ce_weight * (lse[:, 2] - sums[:, 2]) + opts.z_loss_weight * lse[:, 2] ** 2
    return torch.where(labels != opts.ignore_index, loss, torch.zeros_like(loss)), torch.cat(grads, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,kd_weight,ce_weight,smoothing,z_weight",
                         [(2.0, 1.0, 0.5, 0.0, 0.0), (1.0, 0.7, 0.3, 0.1, 1e-2), (0.7, 1.0, 0.0, 0.0, 0.0),
                          (1.5, 0.0, 1.0, 0.2, 0.0), (2.0, 1.0, 0.0, 0.0, 1e-2)])
def test_shards_equal_the_whole_row(backend, divergence, temperature, kd_weight, ce_weight, smoothing, z_weight):
    device = device_for(backend)
    student, teacher = make_logits((1, 6, BOUNDS[-1]), torch.float32, device=device)
    labels = make_labels((6,), BOUNDS[-1], "some", device=device)
    opts = LossOptions(divergence=divergence, beta=0.3, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, label_smoothing=smoothing, z_loss_weight=z_weight, backend=backend)
    kernel = DeviceRows(backend)
    scale = torch.tensor(0.25, device=device)
    whole_grad = torch.empty_like(student)
    whole = weighted_total(kernel(student, teacher, labels, scale, whole_grad, opts), opts)
    loss, grad = sharded(kernel, student, teacher, labels, opts, scale)
    torch.testing.assert_close(loss, whole, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, whole_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_phase_writes_over_the_logits(backend):
    """inplace_backward on a shard: the label's logit is read before the gradient overwrites the logits."""
    device = device_for(backend)
    student, teacher = make_logits((1, 4, BOUNDS[-1]), torch.float32, device=device)
    labels = make_labels((4,), BOUNDS[-1], "none", device=device)
    opts = LossOptions(divergence="reverse_kl", temperature=2.0, ce_weight=0.5, backend=backend)
    kernel = DeviceRows(backend)
    scale = torch.tensor(1.0, device=device)
    expected = sharded(kernel, student, teacher, labels, opts, scale)
    work = student.clone()
    views = [(work[..., a:b], teacher[..., a:b], a) for a, b in zip(BOUNDS[:-1], BOUNDS[1:])]
    lse = torch.logsumexp(torch.stack([kernel(s, t, labels, scale, None, opts, PhaseCall(Phase.STATS, a))
                                       for s, t, a in views]), dim=0)
    sums = sum(kernel(s, t, labels, scale, None, opts, PhaseCall(Phase.SUMS, a, lse)) for s, t, a in views)
    for s, t, a in views:
        kernel(s, t, labels, scale, s, opts, PhaseCall(Phase.GRADIENT, a, lse, sums))
    torch.testing.assert_close(opts.kd_scale * sums[:, 0] + opts.ce_weight * (lse[:, 2] - sums[:, 2]), expected[0])
    torch.testing.assert_close(work, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,tail", [(d, "bucket") for d in DIVERGENCES] + [("forward_kl", "renormalize")])
@pytest.mark.parametrize("temperature,kd_weight,ce_weight,smoothing,z_weight",
                         [(2.0, 1.0, 0.5, 0.0, 0.0), (0.7, 1.0, 0.0, 0.0, 1e-2), (1.5, 0.0, 1.0, 0.1, 0.0),
                          (1.0, 1.0, 0.5, 0.2, 1e-2)])
def test_sparse_shards_equal_the_whole_row(backend, divergence, tail, temperature, kd_weight, ce_weight, smoothing,
                                           z_weight):
    """A sparse teacher: every shard sees all K ids (global), gathers the student's probabilities at the ones it
    holds, and the shard starting the vocabulary adds the rest bucket. Two rows list an id twice."""
    device = device_for(backend)
    student, teacher = make_logits((1, 6, BOUNDS[-1]), torch.float32, device=device)
    top = torch.log_softmax(teacher / temperature, dim=-1).topk(9, dim=-1)
    ids = top.indices.clone()
    ids[0, 2, 4] = -1  # padding
    ids[0, 3, 5], ids[0, 5, 8] = ids[0, 3, 1], ids[0, 5, 0]  # repeated ids
    logprobs = top.values.clone()
    ids[0, 1, 1:], logprobs[0, 1, 0] = -1, math.log1p(-5e-7)  # a near-certain teacher (its rest under the floor)
    targets = SparseTargets(ids, logprobs.contiguous())
    labels = make_labels((6,), BOUNDS[-1], "some", device=device)
    opts = SparseOptions(divergence=divergence, beta=0.3, temperature=temperature, kd_weight=kd_weight,
                         ce_weight=ce_weight, label_smoothing=smoothing, z_loss_weight=z_weight, tail=tail,
                         backend=backend)
    kernel = DeviceRows(backend)
    scale = torch.tensor(0.25, device=device)
    whole_grad = torch.empty_like(student)
    whole = weighted_total(kernel(student, targets, labels, scale, whole_grad, opts), opts)
    loss, grad = sharded(kernel, student, targets, labels, opts, scale)
    torch.testing.assert_close(loss, whole, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, whole_grad, rtol=2e-5, atol=2e-6)
