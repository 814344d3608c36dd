"""What each rank runs in the vocab-parallel tests (spawned by test_vocab_parallel.py): every case compares this
rank's loss and gradient shard with the single-process, full-vocabulary result that the rank computes itself from
the same seeded inputs, and returns None or the failure's text."""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

import kdfast
from kdfast.distributed import count_traffic
from kdfast.kernel_abi import STAT_COLUMNS

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
ROWS, VOCAB, HIDDEN = 12, 48, 16  # 48: equal shards for 2 and 3 ranks
SETTINGS = dict(temperature=2.0, kd_weight=0.8, ce_weight=0.3, beta=0.3)


def shard_bounds(world: int, uneven: bool) -> list[tuple[int, int]]:
    if not uneven:
        size = VOCAB // world
        return [(r * size, (r + 1) * size) for r in range(world)]
    cuts = {2: [0, 13, VOCAB], 3: [0, 7, 30, VOCAB]}[world]
    return list(zip(cuts[:-1], cuts[1:]))


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, ROWS // 2, VOCAB, generator=generator) * 3
    teacher = torch.randn(2, ROWS // 2, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (2, ROWS // 2), generator=generator)
    labels[0, ::3] = -100
    return student, teacher, labels


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def logits_case(divergence, reduction, uneven):
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, uneven)[rank]
    student, teacher, labels = _inputs()
    settings = dict(SETTINGS, divergence=divergence, reduction=reduction)
    full = student.clone().requires_grad_(True)
    expected = kdfast.distill_loss(full, teacher, labels, backend="torch", **settings)
    weights = torch.linspace(0.5, 1.5, expected.numel()).view(expected.shape)
    (expected * weights).sum().backward()
    shard = student[..., start:stop].clone().requires_grad_(True)
    # The module form for uneven shards, the function for equal ones: both take the group.
    loss_fn = (kdfast.DistillLoss(process_group=dist.group.WORLD, vocab_range=(start, stop), **settings) if uneven
               else lambda s, t, y: kdfast.distill_loss(s, t, y, process_group=dist.group.WORLD, **settings))
    loss = loss_fn(shard, teacher[..., start:stop], labels)
    (loss * weights).sum().backward()
    _close(loss, expected, "loss")
    _close(shard.grad, full.grad[..., start:stop], "gradient shard")


def linear_case(divergence, reduction, uneven, reduce_hidden_grad=True):
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, uneven)[rank]
    generator = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(ROWS, HIDDEN, generator=generator), torch.randn(ROWS, HIDDEN + 4, generator=generator)
    ws, wt = torch.randn(VOCAB, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN + 4, generator=generator)
    bs, bt = torch.randn(VOCAB, generator=generator), torch.randn(VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[::4] = -100
    settings = dict(SETTINGS, divergence=divergence, reduction=reduction, softcap=8.0, chunk_size=5)
    full = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    expected = kdfast.linear_distill_loss(full[0], full[1], ht, wt, labels, student_bias=full[2], teacher_bias=bt,
                                          backend="torch", **settings)
    weights = torch.linspace(0.5, 1.5, expected.numel()).view(expected.shape)
    (expected * weights).sum().backward()
    mine = [hs.clone().requires_grad_(True), ws[start:stop].clone().requires_grad_(True),
            bs[start:stop].clone().requires_grad_(True)]
    criterion = kdfast.LinearDistillLoss(process_group=dist.group.WORLD, vocab_range=(start, stop) if uneven else None,
                                         reduce_hidden_grad=reduce_hidden_grad, **settings)  # calls the function
    loss = criterion(mine[0], mine[1], ht, wt[start:stop], labels, student_bias=mine[2],
                     teacher_bias=bt[start:stop])
    (loss * weights).sum().backward()
    _close(loss, expected, "loss")
    _close(mine[1].grad, full[1].grad[start:stop], "weight gradient shard")
    _close(mine[2].grad, full[2].grad[start:stop], "bias gradient shard")
    d_hidden = mine[0].grad
    if not reduce_hidden_grad:  # the caller's reduction: the shards' partial sums add up to the full gradient
        d_hidden = d_hidden.clone()
        dist.all_reduce(d_hidden)
    _close(d_hidden, full[0].grad, "hidden gradient")


def linear_student_case(divergence, reduction):
    """The teacher's logits given (`linear_student_distill_loss`): each rank passes its shard's columns."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, True)[rank]
    generator = torch.Generator().manual_seed(6)
    hs, ws = torch.randn(ROWS, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN, generator=generator)
    teacher = torch.randn(ROWS, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[::4] = -100
    settings = dict(SETTINGS, divergence=divergence, reduction=reduction, softcap=8.0, chunk_size=5)
    full = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    expected = kdfast.linear_student_distill_loss(full[0], full[1], teacher, labels, backend="torch", **settings)
    weights = torch.linspace(0.5, 1.5, expected.numel()).view(expected.shape)
    (expected * weights).sum().backward()
    mine = [hs.clone().requires_grad_(True), ws[start:stop].clone().requires_grad_(True)]
    loss = kdfast.linear_student_distill_loss(mine[0], mine[1], teacher[:, start:stop], labels,
                                              process_group=dist.group.WORLD, vocab_range=(start, stop), **settings)
    (loss * weights).sum().backward()
    _close(loss, expected, "loss")
    _close(mine[1].grad, full[1].grad[start:stop], "weight gradient shard")
    _close(mine[0].grad, full[0].grad, "hidden gradient")


def _sparse_teacher(k=9, seed=2):
    generator = torch.Generator().manual_seed(seed)
    top = torch.log_softmax(torch.randn(ROWS, VOCAB, generator=generator) * 2, dim=-1).topk(k, dim=-1)
    ids = top.indices.clone()
    ids[1, 0] = -1  # padding
    ids[2, 3], ids[3, 8] = ids[2, 1], ids[3, 0]  # an id listed twice (peers' data has them)
    return ids, top.values


def sparse_case(divergence, tail, reduction, uneven):
    """A sparse teacher: every rank passes the same global ids; the loss and each shard's gradient equal the
    single-process ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, uneven)[rank]
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(ROWS, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[::5] = -100
    ids, logprobs = _sparse_teacher()
    if tail == "given":  # the rest as the teacher reports it (here half of 1 - sum(p)), after each row's K
        rest = 0.5 * (1.0 - torch.where(ids >= 0, logprobs.double().exp(), 0.0).sum(-1, keepdim=True))
        logprobs = torch.cat([logprobs, rest.log().float()], dim=-1)
    settings = dict(temperature=2.0, kd_weight=0.8, ce_weight=0.3, beta=0.3, divergence=divergence, tail=tail,
                    reduction=reduction)
    full = student.clone().requires_grad_(True)
    expected = kdfast.sparse_distill_loss(full, ids, logprobs, labels, backend="torch", **settings)
    weights = torch.linspace(0.5, 1.5, expected.numel()).view(expected.shape)
    (expected * weights).sum().backward()
    shard = student[:, start:stop].clone().requires_grad_(True)
    loss = kdfast.sparse_distill_loss(shard, ids, logprobs, labels, process_group=dist.group.WORLD,
                                      vocab_range=(start, stop) if uneven else None, **settings)
    (loss * weights).sum().backward()
    _close(loss, expected, "loss")
    _close(shard.grad, full.grad[:, start:stop], "gradient shard")


def linear_sparse_case(divergence, reduction):
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, True)[rank]
    generator = torch.Generator().manual_seed(4)
    hs, ws = torch.randn(ROWS, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    ids, logprobs = _sparse_teacher()
    settings = dict(temperature=2.0, ce_weight=0.5, divergence=divergence, reduction=reduction, chunk_size=5)
    full = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    expected = kdfast.linear_sparse_distill_loss(full[0], full[1], ids, logprobs, labels, backend="torch", **settings)
    weights = torch.linspace(0.5, 1.5, expected.numel()).view(expected.shape)
    (expected * weights).sum().backward()
    mine = [hs.clone().requires_grad_(True), ws[start:stop].clone().requires_grad_(True)]
    loss = kdfast.linear_sparse_distill_loss(mine[0], mine[1], ids, logprobs, labels, process_group=dist.group.WORLD,
                                             vocab_range=(start, stop), **settings)
    (loss * weights).sum().backward()
    _close(loss, expected, "loss")
    _close(mine[1].grad, full[1].grad[start:stop], "weight gradient shard")
    _close(mine[0].grad, full[0].grad, "hidden gradient")


def row_weights_case(form):
    """A loss whose rows are weighted (`row_weights`, "sum") equals the full vocabulary's per-row losses weighted and
    summed, its gradient shards included."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, True)[rank]
    generator = torch.Generator().manual_seed(5)
    hs, ht = torch.randn(ROWS, HIDDEN, generator=generator), torch.randn(ROWS, HIDDEN, generator=generator)
    ws, wt = torch.randn(VOCAB, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    row_weights = torch.rand(ROWS, generator=generator)
    ids, logprobs = _sparse_teacher()
    settings = dict(divergence="jsd", temperature=2.0, ce_weight=0.5, chunk_size=5)

    def loss(hidden, weight, teacher_weight, **extra):
        if form == "sparse":
            return kdfast.linear_sparse_distill_loss(hidden, weight, ids, logprobs, labels, **settings, **extra)
        return kdfast.linear_distill_loss(hidden, weight, ht, teacher_weight, labels, **settings, **extra)

    full = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    expected = (loss(*full, wt, reduction="none", backend="torch") * row_weights).sum()
    expected.backward()
    mine = [hs.clone().requires_grad_(True), ws[start:stop].clone().requires_grad_(True)]
    actual = loss(*mine, wt[start:stop], reduction="sum", row_weights=row_weights, process_group=dist.group.WORLD,
                  vocab_range=(start, stop))
    actual.backward()
    _close(actual, expected, "loss")
    _close(mine[1].grad, full[1].grad[start:stop], "weight gradient shard")
    _close(mine[0].grad, full[0].grad, "hidden gradient")


def traffic_case():
    """Bytes sent per call do not depend on the vocabulary, and grow linearly with the rows."""
    sent = {}
    for rows, vocab_per_rank in ((8, 10), (8, 400), (64, 10)):
        student = torch.randn(rows, vocab_per_rank, requires_grad=True)
        teacher = torch.randn(rows, vocab_per_rank)
        labels = torch.zeros(rows, dtype=torch.int64)
        with count_traffic() as traffic:
            kdfast.distill_loss(student, teacher, labels, divergence="jsd", ce_weight=0.5,
                                process_group=dist.group.WORLD).backward()
        sent[(rows, vocab_per_rank)] = (traffic.calls, traffic.bytes)
    assert sent[(8, 10)] == sent[(8, 400)], sent
    calls, small = sent[(8, 10)]
    assert calls == 3, f"expected the check exchange, one all-gather and one all-reduce; got {calls} calls"
    # float32 [rows, STAT_COLUMNS] twice, plus the fixed 7 x int64 check.
    assert small == 8 * STAT_COLUMNS * 4 * 2 + 7 * 8, sent
    assert sent[(64, 10)][1] == 64 * STAT_COLUMNS * 4 * 2 + 7 * 8, sent


def error_case(kind):
    """A mismatch between ranks raises the same ValueError on every rank (the caller checks it was raised)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = ROWS + (rank if kind == "rows" else 0)
    local_vocab = 10
    student, teacher = torch.randn(rows, local_vocab), torch.randn(rows, local_vocab)
    vocab_range = None
    if kind == "gap":
        vocab_range = (rank * 12, rank * 12 + local_vocab)  # holes between the shards
    if kind == "one_rank_bad_dtype" and rank == world - 1:
        teacher = teacher.to(torch.int64)
    if kind == "labels_out_of_range":
        labels = torch.full((rows,), world * local_vocab)  # one past the global vocabulary
        return kdfast.distill_loss(student, teacher, labels, ce_weight=0.5, process_group=dist.group.WORLD)
    kdfast.distill_loss(student, teacher, process_group=dist.group.WORLD, vocab_range=vocab_range)


def expect_error(kind, *messages):
    """One of `messages` in the error: the rank with the bad input names it, the others name that rank."""
    try:
        error_case(kind)
    except ValueError as exc:
        assert any(message in str(exc) for message in messages), f"{kind}: {exc}"
        return
    raise AssertionError(f"{kind}: no error was raised on rank {dist.get_rank()}")


def ddp_case():
    """Data parallelism needs nothing from the loss: one DDP step's gradients equal the average of the ranks'
    own gradients, computed without DDP."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB)
    ddp = torch.nn.parallel.DistributedDataParallel(head)
    generator = torch.Generator().manual_seed(100 + rank)
    hidden, teacher = torch.randn(ROWS, HIDDEN, generator=generator), torch.randn(ROWS, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    kdfast.distill_loss(ddp(hidden), teacher, labels, ce_weight=0.5).backward()
    local = torch.nn.Linear(HIDDEN, VOCAB)
    local.load_state_dict(head.state_dict())
    kdfast.distill_loss(local(hidden), teacher, labels, ce_weight=0.5).backward()
    average = local.weight.grad.clone()
    dist.all_reduce(average)
    _close(head.weight.grad, average / world, "DDP weight gradient")


def components_case(form, reduction):
    """return_components over shards equals the single-process parts (the accuracy needs the global row max, the
    entropy the ranks' sums of q log q)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, True)[rank]
    student, teacher, labels = _inputs()
    labels[1, ::2] = student[1, ::2].argmax(-1)  # some hits
    settings = dict(SETTINGS, divergence="jsd", reduction=reduction, return_components=True)
    if form == "logits":
        _, expected = kdfast.distill_loss(student, teacher, labels, backend="torch", **settings)
        _, parts = kdfast.distill_loss(student[..., start:stop], teacher[..., start:stop], labels,
                                       process_group=dist.group.WORLD, vocab_range=(start, stop), **settings)
    else:
        ids, logprobs = (t.view(2, ROWS // 2, -1) for t in _sparse_teacher())
        _, expected = kdfast.sparse_distill_loss(student, ids, logprobs, labels, backend="torch", **settings)
        _, parts = kdfast.sparse_distill_loss(student[..., start:stop], ids, logprobs, labels,
                                              process_group=dist.group.WORLD, vocab_range=(start, stop), **settings)
    for name in ("kd", "ce", "accuracy", "entropy"):
        _close(getattr(parts, name), getattr(expected, name), name)


def ce_options_case(form):
    """Label smoothing (eps / V over the global vocabulary) and the z-loss over shards: the loss, its z part and each
    shard's gradient equal the single process's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, True)[rank]
    student, teacher, labels = _inputs()
    settings = dict(SETTINGS, divergence="jsd", label_smoothing=0.1, z_loss_weight=1e-2, return_components=True)
    full = student.clone().requires_grad_(True)
    shard = student[..., start:stop].clone().requires_grad_(True)
    group = dict(process_group=dist.group.WORLD, vocab_range=(start, stop))
    if form == "logits":
        expected, expected_parts = kdfast.distill_loss(full, teacher, labels, backend="torch", **settings)
        loss, parts = kdfast.distill_loss(shard, teacher[..., start:stop], labels, **group, **settings)
    else:
        ids, logprobs = (t.view(2, ROWS // 2, -1) for t in _sparse_teacher())
        expected, expected_parts = kdfast.sparse_distill_loss(full, ids, logprobs, labels, backend="torch", **settings)
        loss, parts = kdfast.sparse_distill_loss(shard, ids, logprobs, labels, **group, **settings)
    expected.backward()
    loss.backward()
    _close(loss, expected, "loss")
    _close(parts.z_loss, expected_parts.z_loss, "z-loss part")
    _close(parts.ce, expected_parts.ce, "smoothed CE part")
    _close(shard.grad, full.grad[..., start:stop], "gradient shard")


def multi_teacher_case(form, combine, divergence, weights_kind):
    """Several teachers over shards (each normalised over the ranks) equal the single process's full-vocabulary
    result: loss, each teacher's divergence, and the student's gradient shard (hidden, weight and bias in the fused
    linear form); static weights, per-row weights with a zero (a teacher routed away in some rows), each row's teacher
    ("routed": only its head runs on the row), or "confidence" / "min_ce" (each teacher's probability of the label
    read over the ranks). Form "mixed": the fused linear form with its second teacher given as its logits (this
    rank's columns)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(world, True)[rank]
    generator = torch.Generator().manual_seed(5)
    teachers = [torch.randn(ROWS, VOCAB, generator=generator) * 3 for _ in range(3)]
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[::5] = -100
    weights = {"static": [0.2, 0.5, 0.3], "rows": torch.rand(ROWS, 3, generator=generator),
               "routed": torch.randint(0, 3, (ROWS,), generator=generator)}.get(weights_kind, weights_kind)
    if weights_kind == "rows":
        weights[::2, 1] = 0.0
    settings = dict(SETTINGS, divergence=divergence, combine=combine, weights=weights, return_components=True)
    group = dict(process_group=dist.group.WORLD, vocab_range=(start, stop))
    weighted = torch.linspace(0.5, 1.5, ROWS)
    if form == "logits":
        student = torch.randn(ROWS, VOCAB, generator=generator) * 3
        full = student.clone().requires_grad_(True)
        expected, expected_parts = kdfast.multi_teacher_distill_loss(full, teachers, labels, backend="torch",
                                                                     **settings)
        shard = student[:, start:stop].clone().requires_grad_(True)
        loss, parts = kdfast.multi_teacher_distill_loss(shard, [t[:, start:stop] for t in teachers], labels, **group,
                                                        **settings)
        expected.backward()
        loss.backward()
        _close(shard.grad, full.grad[:, start:stop], "gradient shard")
    else:
        hidden = torch.randn(ROWS, HIDDEN, generator=generator)
        weight, bias = torch.randn(VOCAB, HIDDEN, generator=generator), torch.randn(VOCAB, generator=generator)
        t_hidden = [torch.randn(ROWS, HIDDEN + 4 * m, generator=generator) for m in range(2)]
        t_weight = [torch.randn(VOCAB, HIDDEN + 4 * m, generator=generator) for m in range(2)]
        two = {"static": [0.4, 0.6], "rows": weights[:, :2] if weights_kind == "rows" else None,
               "routed": weights % 2 if weights_kind == "routed" else None}
        settings = dict(settings, weights=two.get(weights_kind, weights_kind), reduction="none", chunk_size=5)
        full = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        expected, expected_parts = kdfast.linear_multi_teacher_distill_loss(
            full[0], full[1], t_hidden, t_weight, labels, student_bias=full[2], backend="torch", **settings)
        (expected * weighted).sum().backward()
        mine = [hidden.clone().requires_grad_(True), weight[start:stop].clone().requires_grad_(True),
                bias[start:stop].clone().requires_grad_(True)]
        t_hidden, t_weight = list(t_hidden), [w[start:stop] for w in t_weight]
        if form == "mixed":  # teacher 1 given as its logits: this rank's columns, no head
            t_hidden[1], t_weight[1] = t_hidden[1] @ t_weight[1].t(), None
        loss, parts = kdfast.linear_multi_teacher_distill_loss(
            mine[0], mine[1], t_hidden, t_weight, labels, student_bias=mine[2], **group, **settings)
        (loss * weighted).sum().backward()
        _close(mine[0].grad, full[0].grad, "hidden gradient")
        _close(mine[1].grad, full[1].grad[start:stop], "weight gradient shard")
        _close(mine[2].grad, full[2].grad[start:stop], "bias gradient shard")
    _close(loss, expected, "loss")
    _close(parts.teachers, expected_parts.teachers, "each teacher's divergence")


def cases(world):
    listed = {}
    for divergence in DIVERGENCES:
        for reduction in ("mean", "sum", "none"):
            for uneven in (False, True):
                listed[f"logits-{divergence}-{reduction}-{'uneven' if uneven else 'equal'}"] = (
                    logits_case, (divergence, reduction, uneven))
        for reduction in ("mean", "sum", "none"):
            listed[f"linear-{divergence}-{reduction}-uneven"] = (linear_case, (divergence, reduction, True))
    listed["linear-caller-reduces-hidden-grad"] = (linear_case, ("jsd", "mean", False, False))
    for divergence in DIVERGENCES:
        listed[f"sparse-{divergence}-bucket-mean-uneven"] = (sparse_case, (divergence, "bucket", "mean", True))
        listed[f"linear-sparse-{divergence}-none"] = (linear_sparse_case, (divergence, "none"))
    for divergence, reduction in (("forward_kl", "mean"), ("reverse_kl", "none"), ("jsd", "sum")):
        listed[f"linear-student-{divergence}-{reduction}"] = (linear_student_case, (divergence, reduction))
    listed["sparse-forward_kl-renormalize-sum-equal"] = (sparse_case, ("forward_kl", "renormalize", "sum", False))
    listed["sparse-jsd-bucket-none-equal"] = (sparse_case, ("jsd", "bucket", "none", False))
    listed["sparse-reverse_kl-given-mean-uneven"] = (sparse_case, ("reverse_kl", "given", "mean", True))
    for form in ("logits", "sparse"):
        for reduction in ("mean", "none"):
            listed[f"components-{form}-{reduction}"] = (components_case, (form, reduction))
    listed["ce-options-logits"] = (ce_options_case, ("logits",))
    listed["ce-options-sparse"] = (ce_options_case, ("sparse",))
    listed["row-weights-linear"] = (row_weights_case, ("dense",))
    listed["row-weights-linear-sparse"] = (row_weights_case, ("sparse",))
    listed["traffic-is-o-rows"] = (traffic_case, ())
    listed["error-rows-differ"] = (expect_error, ("rows", "same tokens (rows)"))
    listed["error-ranges-gap"] = (expect_error, ("gap", "must tile [0, V)"))
    listed["error-one-rank-bad-input"] = (expect_error,
                                          ("one_rank_bad_dtype", "teacher_logits", "refused their inputs"))
    listed["error-labels-out-of-range"] = (expect_error, ("labels_out_of_range", "labels must lie in"))
    listed["ddp-step"] = (ddp_case, ())
    for form, combine, divergence, weights_kind in (("logits", "mixture", "forward_kl", "static"),
                                                    ("logits", "mixture", "jsd", "rows"),
                                                    ("logits", "average", "reverse_kl", "rows"),
                                                    ("linear", "mixture", "skew_forward_kl", "rows"),
                                                    ("linear", "average", "forward_kl", "static"),
                                                    ("logits", "mixture", "forward_kl", "confidence"),
                                                    ("logits", "average", "jsd", "min_ce"),
                                                    ("linear", "mixture", "reverse_kl", "confidence"),
                                                    ("linear", "mixture", "forward_kl", "min_ce"),
                                                    ("logits", "average", "jsd", "routed"),
                                                    ("linear", "mixture", "jsd", "routed"),
                                                    ("mixed", "mixture", "jsd", "routed"),
                                                    ("mixed", "average", "forward_kl", "static"),
                                                    ("mixed", "mixture", "reverse_kl", "confidence")):
        listed[f"multi-teacher-{form}-{combine}-{divergence}-{weights_kind}"] = (
            multi_teacher_case, (form, combine, divergence, weights_kind))
    return listed


def run_all(rank, world, store_path, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    results = {}
    for name, (fn, args) in cases(world).items():
        try:
            fn(*args)
            results[name] = None
        except Exception:  # reported to the test, which fails with this text
            results[name] = traceback.format_exc()
    dist.destroy_process_group()
    torch.save(results, out_path)
