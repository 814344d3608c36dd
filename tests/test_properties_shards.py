"""Hypothesis-generated vocabulary shards (1-4, uneven, of a single column too) of dense and sparse teachers on every
backend: each shard's STATS, combined, then SUMS and GRADIENT, against the whole row's kernel, at logit scales up to
100, confident students (rests down to 1e-30 of the row, where Triton's and CUDA's exact pass takes over), every
tail and divergence."""

import math

import torch
from conftest import BACKENDS, device_for
from helpers import beta_refused, property_examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_shard_phases import sharded

from kdfast.dispatch import DeviceRows
from kdfast.kernel_abi import SparseTargets
from kdfast.options import LossOptions
from kdfast.reduction import weighted_total
from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG, SparseOptions

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@st.composite
def cases(draw):
    vocab = draw(st.integers(2, 120))
    cuts = sorted(set(draw(st.lists(st.integers(1, vocab - 1), max_size=3))))
    bounds = [0, *cuts, vocab]
    rows = draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    student = torch.randn(1, rows, vocab, generator=generator) * draw(st.sampled_from([0.3, 3.0, 30.0, 100.0]))
    teacher = torch.randn(1, rows, vocab, generator=generator) * draw(st.sampled_from([0.3, 3.0, 30.0]))
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.3] = -100
    options = dict(divergence=draw(st.sampled_from(DIVERGENCES)), beta=draw(st.floats(0, 1)),
                   temperature=draw(st.sampled_from([0.25, 1.0, 2.0])), kd_weight=draw(st.sampled_from([0.0, 1.0])),
                   ce_weight=draw(st.sampled_from([0.0, 0.5])), label_smoothing=draw(st.sampled_from([0.0, 0.1])),
                   z_loss_weight=draw(st.sampled_from([0.0, 1e-2])))
    assume(options["kd_weight"] or options["ce_weight"])
    assume(not beta_refused(options["divergence"], options["beta"]))
    if not draw(st.booleans()):
        return student, teacher, labels, LossOptions(**options), bounds
    k = draw(st.integers(1, vocab))
    tail = draw(st.sampled_from(["bucket", "given", "renormalize"]))
    log_p = torch.log_softmax(teacher / options["temperature"], dim=-1)
    top = log_p.topk(k, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    if k > 1 and draw(st.booleans()):
        ids[..., -1], logprobs[..., -1] = -1, -math.inf  # padding
    if tail == "given":  # the exact rest after the K
        held = torch.zeros_like(log_p, dtype=torch.int64).scatter_add(-1, ids.clamp_min(0), (ids >= 0).long()) > 0
        logprobs = torch.cat([logprobs, log_p.masked_fill(held, -math.inf).logsumexp(-1, keepdim=True)], dim=-1)
    if tail == "renormalize":
        options["divergence"], options["beta"] = "forward_kl", 0.5
    elif options["divergence"] == "tvd":
        options["divergence"] = "jsd"
        assume(not beta_refused("jsd", options["beta"]))
    # A row's rest below float32's smallest normal is floored after the shards' sum, but each shard reports its own
    # floored at e^-87.3 of its largest exp (docs/DESIGN.md, "A sparse teacher"): not drawn here.
    scaled = student.double() / options["temperature"]
    off = torch.zeros_like(scaled, dtype=torch.int64).scatter_add(-1, ids.clamp_min(0), (ids >= 0).long()) == 0
    rest = scaled.masked_fill(~off, -math.inf).logsumexp(-1) - scaled.logsumexp(-1)
    assume(not bool(((rest < STUDENT_REST_FLOOR_LOG + 1.0) & off.any(-1)).any()))
    return student, SparseTargets(ids, logprobs.contiguous()), labels, SparseOptions(**options, tail=tail), bounds


@settings(max_examples=property_examples(60), deadline=None, derandomize=True)
@given(case=cases(), backend=st.sampled_from(BACKENDS))
def test_random_shards_equal_the_whole_row(case, backend):
    student, teacher, labels, opts, bounds = case
    device = device_for(backend)
    student, labels = student.to(device), labels.to(device)
    teacher = SparseTargets(teacher.ids.to(device), teacher.logprobs.to(device)) \
        if isinstance(teacher, SparseTargets) else teacher.to(device)
    opts = opts.replace(backend=backend)
    kernel = DeviceRows(backend)
    scale = torch.tensor(0.25, device=device)
    whole_grad = torch.empty_like(student)
    whole = weighted_total(kernel(student, teacher, labels, scale, whole_grad, opts), opts)
    loss, grad = sharded(kernel, student, teacher, labels, opts, scale, bounds)
    # The shards sum in another order, and the later phases' D is uncentred (docs/DESIGN.md, "Shards and phases"): a
    # score h = log q - log p as large as both rows' ranges of logits / T against D of the same size, a few fp32
    # roundings (~1.2e-7) of them each (measured: 2.8e-5 at ranges of 75 and 65, where the whole row errs by 3e-10).
    logits = [student] if isinstance(teacher, SparseTargets) else [student, teacher]
    size = sum(float(x.max() - x.min()) for x in logits) / opts.temperature
    torch.testing.assert_close(loss, whole, rtol=1e-4, atol=1e-5 + 4e-7 * size)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-5 + 4e-7 * size)
