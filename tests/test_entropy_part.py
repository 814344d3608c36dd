"""The student's entropy (`LossComponents.entropy`, the kernels' PART_ENTROPY and SUMS' sum q log q): on every
backend and in every form (logits, fused linear, a sparse teacher, both, vocab shards) it is float64's
-sum_j q_j log q_j of q = softmax(student / T), T = 1 for a CE-only loss, over the kept rows and reduced as the loss
is; finite where logits are -inf; and asking for it changes neither the loss nor its gradient."""

import math
import threading

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels, teacher_topk

import kdfast
from kdfast import vocab_parallel
from kdfast.dispatch import DeviceRows
from kdfast.distributed import VocabShard
from kdfast.kernel_abi import PART_ENTROPY, PART_KD, SUM_ENTROPY, Phase, PhaseCall, SparseTargets
from kdfast.options import LossOptions
from kdfast.reduction import LossComponents, reduction_scale, returned
from kdfast.reference import student_entropy_reference
from kdfast.sparse_options import SparseOptions
from kdfast.views import flat_labels

LEAD, VOCAB, HIDDEN, K = (2, 5), 67, 12, 6
FORMS = ["logits", "linear", "sparse", "linear_sparse"]
KD_AND_CE = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)
SETTINGS = {"kd-T2-ce": KD_AND_CE, "kd-T1": dict(divergence="reverse_kl", temperature=1.0),
            "ce-only": dict(temperature=2.0, kd_weight=0.0, ce_weight=1.0)}  # the CE's entropy, at T = 1
RTOL = 1e-5  # float32 accumulation against float64


class Form:
    """One public function's inputs, seeded: `run(leaf, **settings)` calls it with `leaf` (the student's logits or
    hidden states: what takes the gradient) and `logits()` is the student's logits in float64."""

    def __init__(self, form: str, backend: str, dtype=torch.float32):
        self.form, self.backend = form, backend
        device = device_for(backend)
        generator = torch.Generator().manual_seed(0)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

        self.labels = make_labels(LEAD, VOCAB, "some", device=device)
        if form in ("logits", "sparse"):
            self.leaf, teacher = randn(*LEAD, VOCAB, scale=3.0), randn(*LEAD, VOCAB, scale=3.0)
        else:
            self.leaf, self.weight = randn(*LEAD, HIDDEN), randn(VOCAB, HIDDEN, scale=0.5)
            teacher_hidden, teacher_weight = randn(*LEAD, HIDDEN + 4), randn(VOCAB, HIDDEN + 4, scale=0.5)
            teacher = teacher_hidden @ teacher_weight.T
            self.teacher_head = (teacher_hidden, teacher_weight)
        self.teacher = teacher
        if form.endswith("sparse"):
            self.ids, self.logprobs = teacher_topk(teacher, K, 2.0)

    def logits(self) -> torch.Tensor:
        if self.form in ("logits", "sparse"):
            return self.leaf.double().cpu()
        return self.leaf.double().cpu() @ self.weight.double().cpu().T

    def run(self, leaf, **settings):
        settings = dict(settings, backend=self.backend)
        if self.form == "logits":
            return kdfast.distill_loss(leaf, self.teacher, self.labels, **settings)
        if self.form == "sparse":
            return kdfast.sparse_distill_loss(leaf, self.ids, self.logprobs, self.labels, **settings)
        if self.form == "linear":
            return kdfast.linear_distill_loss(leaf, self.weight, *self.teacher_head, self.labels, chunk_size=4,
                                              **settings)
        return kdfast.linear_sparse_distill_loss(leaf, self.weight, self.ids, self.logprobs, self.labels,
                                                 chunk_size=4, **settings)

    def expected(self, **settings) -> torch.Tensor:
        return student_entropy_reference(self.logits(), self.labels.cpu(), **settings)


def assert_entropy(actual, expected, rtol=RTOL):
    assert actual is not None and not actual.requires_grad
    assert torch.isfinite(actual).all(), actual
    torch.testing.assert_close(actual.double().cpu(), expected.double(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_entropy_matches_float64_for_each_reduction(backend, form, reduction):
    case = Form(form, backend)
    _, parts = case.run(case.leaf, reduction=reduction, return_components=True, **KD_AND_CE)
    assert_entropy(parts.entropy, case.expected(reduction=reduction, **KD_AND_CE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(SETTINGS) + ["num_items"])
def test_entropy_follows_temperature_ce_only_and_num_items(backend, form, name):
    case = Form(form, backend)
    settings = SETTINGS.get(name, KD_AND_CE)
    num_items = 23 if name == "num_items" else None
    _, parts = case.run(case.leaf, num_items_in_batch=num_items, return_components=True, **settings)
    assert_entropy(parts.entropy, case.expected(num_items_in_batch=num_items, **settings))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_components_leave_the_loss_and_gradient_alone(backend, form):
    case = Form(form, backend)
    results = []
    for components in (False, True):
        leaf = case.leaf.clone().requires_grad_(True)
        out = case.run(leaf, reduction="none", return_components=components, **KD_AND_CE)
        loss = out[0] if components else out
        (loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)).sum().backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form,dtype,rtol", [("logits", torch.bfloat16, 1e-5), ("sparse", torch.float16, 1e-5),
                                             ("linear", torch.bfloat16, 1e-2),
                                             ("linear_sparse", torch.float16, 2e-3)])
def test_sixteen_bit_inputs(backend, form, dtype, rtol):
    """Logits are read exactly and summed in float32 (float64's bound); a head's product rounds the logits to 16
    bits first (a looser one)."""
    case = Form(form, backend, dtype)
    _, parts = case.run(case.leaf, reduction="none", return_components=True, **KD_AND_CE)
    assert parts.entropy.dtype == torch.float32
    assert_entropy(parts.entropy, case.expected(reduction="none", **KD_AND_CE), rtol=rtol)


def masked_logits(device):
    """Logits with -inf columns (in both models): half of row 1, all but column 0 of row 7 (entropy 0); the labels
    of those rows in their finite columns."""
    case = Form("logits", "torch")
    student, teacher, labels = case.leaf.clone(), case.teacher.clone(), case.labels.clone()
    for flat, first_masked in ((1, VOCAB // 2), (7, 1)):
        row = divmod(flat, LEAD[1])
        student[row][first_masked:] = teacher[row][first_masked:] = -math.inf
        labels[row] = 0
    return student.to(device), teacher.to(device), labels.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", ["kd-T2-ce", "ce-only"])
def test_minus_inf_logits_add_nothing(backend, sparse, name):
    student, teacher, labels = masked_logits(device_for(backend))
    settings = dict(SETTINGS[name], divergence="forward_kl", reduction="none", backend=backend, return_components=True)
    if sparse:
        ids, logprobs = teacher_topk(teacher, K, settings["temperature"])
        ids = torch.where(torch.isinf(logprobs), -1, ids)  # no teacher mass there: padding
        logprobs = torch.where(torch.isinf(logprobs), 0.0, logprobs)
        loss, parts = kdfast.sparse_distill_loss(student, ids, logprobs, labels, **settings)
    else:
        loss, parts = kdfast.distill_loss(student, teacher, labels, **settings)
    assert torch.isfinite(loss).all(), loss
    expected = student_entropy_reference(student.double().cpu(), labels.cpu(), **settings)
    assert expected.view(-1)[7] == 0.0
    assert_entropy(parts.entropy, expected)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # CUDA stops the step: test_cuda_step.py
@pytest.mark.parametrize("sparse", [False, True])
def test_skipped_rows_write_what_the_divergence_column_does(backend, sparse):
    """An ignored row: 0; a label out of range (a CE term): NaN, as the kernels poison the divergence."""
    device = device_for(backend)
    case = Form("logits", "torch")
    student, teacher = case.leaf[:1, :4].to(device), case.teacher[:1, :4].to(device)
    labels = torch.tensor([1, -100, VOCAB + 5, 2], device=device)
    options = dict(KD_AND_CE, backend=backend)
    opts = SparseOptions(**options) if sparse else LossOptions(**options)
    if sparse:
        teacher = SparseTargets(*(t.contiguous() for t in teacher_topk(teacher, K, 2.0)))
    parts = DeviceRows(backend)(student, teacher, labels, torch.ones((), device=device), None, opts).cpu()
    entropy = parts[:, PART_ENTROPY]
    assert entropy[1] == 0.0 and parts[1, PART_KD] == 0.0
    assert torch.isnan(entropy[2]) and torch.isnan(parts[2, PART_KD])
    expected = student_entropy_reference(student.double().cpu()[0], **options, reduction="none")
    assert_entropy(entropy[[0, 3]], expected[[0, 3]])


def test_which_losses_carry_it():
    student, teacher = Form("logits", "torch").leaf[0], Form("logits", "torch").teacher[0]
    labels = torch.tensor([1, 2, 3, -100, 4])

    def entropy(**settings):
        return kdfast.distill_loss(student, teacher, labels, return_components=True, **settings)[1].entropy

    assert entropy() is not None  # a divergence alone
    assert entropy(kd_weight=0.0, ce_weight=1.0) is not None  # a CE alone
    assert entropy(kd_weight=0.0, z_loss_weight=1e-3) is None  # neither: a z-loss alone
    old_style = LossComponents(None, None, None, None)  # built positionally, as before the entropy
    assert old_style.entropy is None


# Vocabulary shards. BOUNDS: uneven, one of a single column.
BOUNDS = [0, 13, 14, VOCAB]
SHARD_SETTINGS = dict(SETTINGS, **{"z-only": dict(kd_weight=0.0, z_loss_weight=1e-2)})


def shard_views(student, teacher, sparse):
    return [(a, student[..., a:b], teacher if sparse else teacher[..., a:b]) for a, b in zip(BOUNDS, BOUNDS[1:])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", list(SHARD_SETTINGS))
def test_shard_phases_sum_to_the_entropy(backend, sparse, name):
    """STATS writes 0 in its last column; minus the shards' SUMS sum q log q is the whole row's entropy (FUSED's),
    which for a z-loss alone is the T = 1 one; an ignored row's SUMS are 0."""
    device = device_for(backend)
    case = Form("sparse" if sparse else "logits", "torch")
    student, labels = case.leaf[:1].to(device), case.labels[0].to(device)
    teacher = SparseTargets(case.ids[:1].to(device), case.logprobs[:1].contiguous().to(device)) if sparse \
        else case.teacher[:1].to(device)
    options = dict(SHARD_SETTINGS[name], backend=backend)
    opts = SparseOptions(**options) if sparse else LossOptions(**options)
    kernel, scale = DeviceRows(backend), torch.ones((), device=device)
    views = shard_views(student, teacher, sparse)
    stats = torch.stack([kernel(s, t, labels, scale, None, opts, PhaseCall(Phase.STATS, a)) for a, s, t in views])
    assert (stats[..., SUM_ENTROPY] == 0).all()
    lse = torch.logsumexp(stats, dim=0)
    sums = sum(kernel(s, t, labels, scale, None, opts, PhaseCall(Phase.SUMS, a, lse, global_vocab=VOCAB))
               for a, s, t in views)
    ignored = labels == -100
    assert (sums[ignored] == 0).all()
    fused = kernel(student, teacher, labels, scale, None, opts)[:, PART_ENTROPY]
    torch.testing.assert_close(-sums[:, SUM_ENTROPY], fused, rtol=RTOL, atol=1e-6)
    temperature = options.get("temperature", 1.0) if opts.has_kd else 1.0
    expected = student_entropy_reference(student.double().cpu()[0], labels.cpu(), temperature=temperature,
                                         reduction="none")
    assert_entropy(fused, expected)


class ThreadRanks:
    """Ranks as threads of this process: kdfast.vocab_parallel's collectives through shared slots and a barrier, so
    that the vocab-parallel Function runs whole without processes."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world, timeout=120), [None] * world
        self.rank = threading.local()
        self.kernel_lock = threading.Lock()  # Triton's interpreter patches its language module per launch

    def everyone(self, tensor) -> torch.Tensor:
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        self.barrier.wait()  # all have read the slots before any rank writes its next
        return stacked

    def patch(self, monkeypatch):
        monkeypatch.setattr(vocab_parallel, "all_gather", lambda tensor, group: self.everyone(tensor))
        monkeypatch.setattr(vocab_parallel, "all_reduce_sum",
                            lambda tensor, group: tensor.copy_(self.everyone(tensor).sum(0)))
        monkeypatch.setattr(vocab_parallel, "all_reduce_max",
                            lambda tensor, group: tensor.copy_(self.everyone(tensor).amax(0)))

    def serialised(self, kernel):
        def call(*args):
            with self.kernel_lock:
                return kernel(*args)

        return call

    def run(self, per_rank):
        """per_rank(rank) on every rank at once; their results in rank order."""
        results, errors = [None] * self.world, []

        def target(rank):
            self.rank.value = rank
            try:
                results[rank] = per_rank(rank)
            except BaseException as exc:  # noqa: BLE001 (re-raised below, once every thread is done)
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", ["kd-T2-ce", "ce-only"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_entropy(monkeypatch, backend, sparse, name, reduction):
    """Every rank's LossComponents.entropy is the single device's (and float64's), from its shard alone."""
    device = device_for(backend)
    case = Form("sparse" if sparse else "logits", backend)
    options = dict(SETTINGS[name], reduction=reduction, return_components=True, backend=backend)
    opts = SparseOptions(**options) if sparse else LossOptions(**options)
    teacher = SparseTargets(case.ids, case.logprobs.contiguous()) if sparse else case.teacher
    labels = case.labels
    ranks = ThreadRanks(len(BOUNDS) - 1)
    ranks.patch(monkeypatch)
    kernel = ranks.serialised(DeviceRows(backend))
    views = shard_views(case.leaf, teacher, sparse)
    scale = reduction_scale(flat_labels(labels), labels.numel(), opts, None, device)

    def rank_components(rank):
        start, student, teacher_shard = views[rank]
        shard = VocabShard(object(), start, start + student.shape[-1], VOCAB)
        out = vocab_parallel.ShardedDistillFunction.apply(student, teacher_shard, labels, scale, opts, shard, kernel)
        return returned(out, opts, labels)[1]

    expected = case.expected(**options)
    for parts in ranks.run(rank_components):
        assert_entropy(parts.entropy, expected)
