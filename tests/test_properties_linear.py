"""Hypothesis-generated heads, chunk sizes and settings for the fused linear forms against their float64 references:
`linear_distill_loss` and `linear_student_distill_loss` (every student input's gradient) and `linear_token_logprobs`
(log-probs, entropy, gradients).
Chunk boundaries are where a linear form can go wrong and a logits-level test cannot see it, so the chunk size is
drawn from 1 to past the row count."""

import torch
from conftest import BACKENDS, device_for
from helpers import beta_refused, property_examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.reference import linear_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
# fp32 GEMMs of up to 48 terms before the loss: the float64 reference's logits differ by ~1e-6 of their size.
RTOL, ATOL = 5e-5, 5e-5


def tolerances(*tempered_logits):
    """(rtol, atol) for logits of this size: an fp32 logit z / T is off by ~|z / T| * 6e-8, and so is every
    log-probability and, relatively, every probability; past |z / T| = 20 the slack grows with them."""
    size = max(float(logits.abs().max()) for logits in tempered_logits)
    widen = max(1.0, size / 20.0)
    return RTOL * widen, ATOL * widen


def random_head(generator, lead, hidden, vocab, scale, bias):
    return dict(hidden=torch.randn(*lead, hidden, generator=generator),
                weight=torch.randn(vocab, hidden, generator=generator) * scale / hidden**0.5,
                bias=torch.randn(vocab, generator=generator) if bias else None)


@st.composite
def linear_cases(draw):
    lead = draw(st.sampled_from([(1,), (5,), (13,), (2, 7), (3, 1)]))
    vocab = draw(st.integers(1, 90))
    hidden_s, hidden_t = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scales = st.sampled_from([0.3, 3.0, 30.0])
    student = random_head(generator, lead, hidden_s, vocab, draw(scales), draw(st.booleans()))
    teacher = random_head(generator, lead, hidden_t, vocab, draw(scales), draw(st.booleans()))
    labels = torch.randint(0, vocab, lead, generator=generator)
    labels[torch.rand(lead, generator=generator) < draw(st.sampled_from([0.0, 0.4, 1.0]))] = -100
    rows = labels.numel()
    caps = st.sampled_from([None, 2.0, 30.0])
    options = dict(
        divergence=draw(st.sampled_from(DIVERGENCES)), beta=draw(st.floats(0, 1)),
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0])), kd_weight=draw(st.floats(0.1, 2)),
        ce_weight=draw(st.floats(0, 2)), reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        chunk_size=draw(st.one_of(st.integers(1, rows + 3), st.just("auto"))),
        student_softcap=draw(caps), teacher_softcap=draw(caps),
        student_logit_scale=draw(st.sampled_from([1.0, 0.25, 4.0])),
        teacher_logit_scale=draw(st.sampled_from([1.0, 0.5])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])), z_loss_weight=draw(st.sampled_from([0.0, 1e-3])))
    if options["reduction"] == "mean" and draw(st.booleans()):
        options["num_items_in_batch"] = draw(st.integers(1, 2 * rows))
    assume(not beta_refused(options["divergence"], options["beta"]))  # tests/test_errors.py's
    return student, teacher, labels, options


def assert_gradients_close(found: dict, expected: dict, rtol: float, atol: float):
    """Each leaf's gradient (found on any device) against the float64 reference's, named on failure."""
    for name, leaf in found.items():
        if leaf is not None:
            torch.testing.assert_close(leaf.grad.double().cpu(), expected[name].grad, rtol=rtol, atol=atol,
                                       msg=lambda message, name=name: f"{name}.grad: {message}")


def _logits(head):
    """The head's logits in float64 (bias included, no scale or cap)."""
    logits = head["hidden"].double() @ head["weight"].double().t()
    return logits + head["bias"].double() if head["bias"] is not None else logits


def _inputs(student, teacher, dtype, grad):
    def prepare(value, needs_grad):
        return None if value is None else value.detach().to(dtype).requires_grad_(needs_grad)

    return dict(student_hidden=prepare(student["hidden"], grad), student_weight=prepare(student["weight"], grad),
                student_bias=prepare(student["bias"], grad), teacher_hidden=prepare(teacher["hidden"], False),
                teacher_weight=prepare(teacher["weight"], False), teacher_bias=prepare(teacher["bias"], False))


@settings(max_examples=property_examples(40), deadline=None, derandomize=True)
@given(case=linear_cases(), backend=st.sampled_from(BACKENDS))
def test_linear_distill_loss_matches_reference(case, backend):
    student, teacher, labels, options = case
    device = device_for(backend)
    ours = {k: (v.to(device).detach().requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in _inputs(student, teacher, torch.float32, True).items()}
    loss = kdfast.linear_distill_loss(labels=labels.to(device), backend=backend, **ours, **options)
    output_weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * output_weights.to(device)).sum().backward()
    theirs = _inputs(student, teacher, torch.float64, True)
    ref = linear_distill_loss_reference(labels=labels, **theirs, **options)
    (ref * output_weights.double()).sum().backward()
    rtol, atol = tolerances(*(_logits(head) * scale / options["temperature"]
                              for head, scale in ((student, options["student_logit_scale"]),
                                                  (teacher, options["teacher_logit_scale"]))))
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    assert_gradients_close({name: ours[name] for name in ("student_hidden", "student_weight", "student_bias")}, theirs,
                           rtol, atol)


@settings(max_examples=property_examples(30), deadline=None, derandomize=True)
@given(case=linear_cases(), backend=st.sampled_from(BACKENDS), teacher_dtype=st.sampled_from([torch.float32,
                                                                                              torch.bfloat16]))
def test_linear_student_distill_loss_matches_reference(case, backend, teacher_dtype):
    """The teacher's logits given (its head's, mapped, in float32 or rounded to bf16), as a shifted view when the rows
    have two leading dimensions: the reference reads the same given values."""
    from kdfast.reference import linear_student_distill_loss_reference

    student, teacher, labels, options = case
    device = device_for(backend)
    teacher_scale, teacher_cap = options.pop("teacher_logit_scale"), options.pop("teacher_softcap")
    logits = _logits(teacher) * teacher_scale
    if teacher_cap is not None:
        logits = teacher_cap * torch.tanh(logits / teacher_cap)
    given = logits.to(teacher_dtype)
    if given.dim() == 3:  # a view of rows that are not one run in memory, as `logits[:, :-1]` is
        given = torch.cat([given, given[:, :1]], dim=1)[:, :-1]
    head = dict(softcap=options.pop("student_softcap"), logit_scale=options.pop("student_logit_scale"))
    ours = {k: v.detach().to(device).requires_grad_(True) if v is not None else None for k, v in student.items()}
    loss = kdfast.linear_student_distill_loss(ours["hidden"], ours["weight"], given.to(device), labels.to(device),
                                              student_bias=ours["bias"], backend=backend, **head, **options)
    output_weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * output_weights.to(device)).sum().backward()
    theirs = {k: v.detach().double().requires_grad_(True) if v is not None else None for k, v in student.items()}
    ref = linear_student_distill_loss_reference(theirs["hidden"], theirs["weight"], given, labels,
                                                student_bias=theirs["bias"], **head, **options)
    (ref * output_weights.double()).sum().backward()
    rtol, atol = tolerances(_logits(student) * head["logit_scale"] / options["temperature"],
                            logits / options["temperature"])
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    assert_gradients_close(ours, theirs, rtol, atol)


@st.composite
def token_cases(draw):
    lead = draw(st.sampled_from([(1,), (6,), (2, 5)]))
    vocab, hidden = draw(st.integers(1, 90)), draw(st.integers(1, 48))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    head = random_head(generator, lead, hidden, vocab, draw(st.sampled_from([0.3, 3.0, 30.0])), draw(st.booleans()))
    token_ids = torch.randint(0, vocab, lead, generator=generator)
    rows = token_ids.numel()
    options = dict(temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
                   logit_scale=draw(st.sampled_from([1.0, 0.25, 4.0])), softcap=draw(st.sampled_from([None, 2.0])),
                   chunk_size=draw(st.one_of(st.integers(1, rows + 3), st.just("auto"))))
    return head, token_ids, options


@settings(max_examples=property_examples(30), deadline=None, derandomize=True)
@given(case=token_cases(), backend=st.sampled_from(BACKENDS))
def test_token_logprobs_match_reference(case, backend):
    head, token_ids, options = case
    device = device_for(backend)
    ours = {k: (v.detach().to(device).requires_grad_(True) if v is not None else None) for k, v in head.items()}
    logprobs, entropy = kdfast.linear_token_logprobs(ours["hidden"], ours["weight"], token_ids.to(device),
                                                     bias=ours["bias"], return_entropy=True, backend=backend, **options)
    theirs = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in head.items()}
    logits = _logits(theirs) * options["logit_scale"]
    if options["softcap"] is not None:
        logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    log_q = torch.log_softmax(logits / options["temperature"], dim=-1)
    ref_logprobs = log_q.gather(-1, token_ids[..., None])[..., 0]
    ref_entropy = -(log_q.exp() * log_q).sum(-1)
    generator = torch.Generator().manual_seed(5)
    mix = torch.randn(token_ids.shape, generator=generator), torch.randn(token_ids.shape, generator=generator)
    ((logprobs * mix[0].to(device)).sum() + (entropy * mix[1].to(device)).sum()).backward()
    ((ref_logprobs * mix[0].double()).sum() + (ref_entropy * mix[1].double()).sum()).backward()
    rtol, atol = tolerances(logits.detach() / options["temperature"])
    torch.testing.assert_close(logprobs.double().cpu(), ref_logprobs.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy.detach(), rtol=rtol, atol=atol)
    assert_gradients_close(ours, theirs, rtol, atol)


@settings(max_examples=property_examples(30), deadline=None, derandomize=True)
@given(case=token_cases(), backend=st.sampled_from(BACKENDS))
def test_token_logprobs_frozen_head_match_reference(case, backend):
    """A frozen head and the log-probs alone: d hidden taken in the forward (kdfast/token_logprobs.py)."""
    head, token_ids, options = case
    device = device_for(backend)
    hidden = head["hidden"].detach().to(device).requires_grad_(True)
    bias = head["bias"].to(device) if head["bias"] is not None else None
    logprobs = kdfast.linear_token_logprobs(hidden, head["weight"].to(device), token_ids.to(device), bias=bias,
                                            backend=backend, **options)
    theirs = {k: (v.detach().double().requires_grad_(k == "hidden") if v is not None else None)
              for k, v in head.items()}
    logits = _logits(theirs) * options["logit_scale"]
    if options["softcap"] is not None:
        logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    ref_logprobs = torch.log_softmax(logits / options["temperature"], dim=-1).gather(-1, token_ids[..., None])[..., 0]
    row_weights = torch.randn(token_ids.shape, generator=torch.Generator().manual_seed(5))
    (logprobs * row_weights.to(device)).sum().backward()
    (ref_logprobs * row_weights.double()).sum().backward()
    rtol, atol = tolerances(logits.detach() / options["temperature"])
    torch.testing.assert_close(logprobs.double().cpu(), ref_logprobs.detach(), rtol=rtol, atol=atol)
    assert_gradients_close({"hidden": hidden}, {"hidden": theirs["hidden"]}, rtol, atol)


@st.composite
def multi_teacher_cases(draw):
    student, _, labels, options = draw(linear_cases())
    vocab, lead = student["weight"].shape[0], labels.shape
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    count = draw(st.integers(1, 3))
    teachers = [random_head(generator, lead, draw(st.integers(1, 48)), vocab, draw(st.sampled_from([0.3, 3.0, 30.0])),
                            draw(st.booleans())) for _ in range(count)]
    weights = draw(st.sampled_from([None, "static", "rows", "routed", "confidence", "min_ce"]))
    if weights == "static":
        weights = [draw(st.floats(0.1, 3)) for _ in range(count)]
    elif weights == "rows":  # a routing one-hot per row
        weights = torch.nn.functional.one_hot(torch.randint(0, count, lead, generator=generator), count).float()
    elif weights == "routed":  # each row's teacher as an index: only its head runs; its hidden states its rows alone
        weights = torch.randint(0, count, lead, generator=generator)
    options = {k: v for k, v in options.items() if k not in ("student_logit_scale", "teacher_logit_scale")}
    return student, teachers, labels, dict(options, weights=weights, own_rows=draw(st.booleans()),
                                           combine=draw(st.sampled_from(["mixture", "average"])))


@settings(max_examples=property_examples(30), deadline=None, derandomize=True)
@given(case=multi_teacher_cases(), backend=st.sampled_from(BACKENDS))
def test_linear_multi_teacher_matches_reference(case, backend):
    from kdfast.logit_maps import logit_maps
    from kdfast.reference import multi_teacher_distill_loss_reference

    student, teachers, labels, options = case
    options, own_rows = dict(options), options["own_rows"]
    del options["own_rows"]
    device = device_for(backend)
    leaves = {k: (v.detach().to(device).requires_grad_(True) if v is not None else None) for k, v in student.items()}
    on_device = {**options, "weights": options["weights"].to(device)} if isinstance(options["weights"], torch.Tensor) \
        else options
    routed = isinstance(options["weights"], torch.Tensor) and not options["weights"].dtype.is_floating_point
    hidden = [t["hidden"].to(device) for t in teachers]
    if routed and own_rows:  # each teacher's hidden states of its own rows alone, in row order
        hidden = [rows.reshape(-1, rows.shape[-1])[options["weights"].reshape(-1).to(device) == index]
                  for index, rows in enumerate(hidden)]
    loss = kdfast.linear_multi_teacher_distill_loss(
        leaves["hidden"], leaves["weight"], hidden,
        [t["weight"].to(device) for t in teachers], labels.to(device), student_bias=leaves["bias"],
        teacher_bias=[t["bias"].to(device) if t["bias"] is not None else None for t in teachers], backend=backend,
        **on_device)
    output_weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * output_weights.to(device)).sum().backward()
    student_map, teacher_map = logit_maps(None, options["student_softcap"], options["teacher_softcap"])
    theirs = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in student.items()}
    reference_options = {k: v for k, v in options.items() if k not in ("chunk_size", "student_softcap",
                                                                         "teacher_softcap")}
    if routed:  # the routing's loss is its one-hot's
        reference_options["weights"] = torch.nn.functional.one_hot(options["weights"], len(teachers)).double()
    ref = multi_teacher_distill_loss_reference(student_map.reference(_logits(theirs)),
                                               [teacher_map.reference(_logits(t)) for t in teachers], labels,
                                               **reference_options)
    (ref * output_weights.double()).sum().backward()
    rtol, atol = tolerances(*(_logits(head) / options["temperature"] for head in (student, *teachers)))
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    assert_gradients_close(leaves, theirs, rtol, atol)


@st.composite
def sparse_cases(draw):
    student, teacher, labels, options = draw(linear_cases())
    vocab = student["weight"].shape[0]
    k = draw(st.integers(1, vocab))
    teacher_log_probs = torch.log_softmax(_logits(teacher).float(), dim=-1)
    top = teacher_log_probs.topk(k, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    if k > 1 and draw(st.booleans()):  # padding in the last column of every other row
        ids.view(-1, k)[::2, -1], logprobs.view(-1, k)[::2, -1] = -1, float("-inf")
    tail = draw(st.sampled_from(["bucket", "renormalize", "given"]))
    if tail == "given":  # the exact rest: the log-sum-exp of the columns the ids do not hold
        kept = torch.zeros(ids.shape[:-1] + (vocab,), dtype=torch.long).scatter_add(-1, ids.clamp_min(0),
                                                                                     (ids >= 0).long()) > 0
        rest = torch.logsumexp(teacher_log_probs.masked_fill(kept, float("-inf")), dim=-1, keepdim=True)
        logprobs = torch.cat([logprobs, rest], dim=-1)
    options = {k: v for k, v in options.items() if k not in ("teacher_softcap", "teacher_logit_scale")}
    options["softcap"], options["logit_scale"] = options.pop("student_softcap"), options.pop("student_logit_scale")
    if tail == "renormalize":
        options["divergence"] = "forward_kl"
    elif options["divergence"] == "tvd":
        options["divergence"] = "jsd"
        assume(not beta_refused("jsd", options["beta"]))
    return student, ids, logprobs, labels, dict(options, tail=tail)


@settings(max_examples=property_examples(30), deadline=None, derandomize=True)
@given(case=sparse_cases(), backend=st.sampled_from(BACKENDS))
def test_linear_sparse_matches_reference(case, backend):
    from kdfast.reference import linear_sparse_distill_loss_reference

    student, ids, logprobs, labels, options = case
    device = device_for(backend)
    leaves = {k: (v.detach().to(device).requires_grad_(True) if v is not None else None) for k, v in student.items()}
    loss = kdfast.linear_sparse_distill_loss(leaves["hidden"], leaves["weight"], ids.to(device), logprobs.to(device),
                                             labels.to(device), student_bias=leaves["bias"], backend=backend,
                                             **options)
    output_weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * output_weights.to(device)).sum().backward()
    theirs = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in student.items()}
    ref = linear_sparse_distill_loss_reference(theirs["hidden"], theirs["weight"], ids, logprobs, labels,
                                               student_bias=theirs["bias"], **options)
    (ref * output_weights.double()).sum().backward()
    rtol, atol = tolerances(_logits(student) * options["logit_scale"] / options["temperature"])
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    assert_gradients_close(leaves, theirs, rtol, atol)
