"""kdfast.linear_distill_loss against the float64 reference built from full logits: divergences, settings,
bias, softcap, shapes, chunk sizes, dtypes, autocast, and the gradients of every student input."""

import itertools

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels

import kdfast
from kdfast import cpu_gemm
from kdfast.linear_chunks import SEVERAL_TEACHERS_MIN_ROWS, Heads, TeacherHead, chunk_rows
from kdfast.linear_teachers import TeacherHeads
from kdfast.logit_maps import LogitMap
from kdfast.reference import linear_distill_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def make_heads(lead_shape, hidden_s, hidden_t, vocab, dtype=torch.float32, bias=True, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    return dict(student_hidden=randn(*lead_shape, hidden_s), student_weight=randn(vocab, hidden_s, scale=0.5),
                teacher_hidden=randn(*lead_shape, hidden_t), teacher_weight=randn(vocab, hidden_t, scale=0.5),
                student_bias=randn(vocab) if bias else None, teacher_bias=randn(vocab) if bias else None)


def assert_linear_matches_reference(heads, labels, backend, tolerance=None, **options):
    """Loss and the gradients of student_hidden, student_weight (and student_bias) against float64."""
    ours = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if v is not None else None)
            for k, v in heads.items()}
    loss = kdfast.linear_distill_loss(labels=labels, backend=backend, **ours, **options)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)).to(loss.device)
    (loss * weights).sum().backward()
    theirs = {k: (v.detach().double().requires_grad_(k.startswith("student")) if v is not None else None)
              for k, v in heads.items()}
    ref = linear_distill_loss_reference(labels=labels, **theirs,
                                        **{k: v for k, v in options.items() if k != "chunk_size"})
    (ref * weights.double()).sum().backward()
    dtype = heads["student_hidden"].dtype
    rtol, atol = tolerance or TOLERANCES[dtype]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref.detach().cpu(), rtol=rtol, atol=atol)
    for name in ("student_hidden", "student_weight", "student_bias"):
        if ours[name] is None:
            continue
        assert ours[name].grad.dtype == ours[name].dtype, f"{name}.grad has its input's dtype"
        torch.testing.assert_close(ours[name].grad.double().cpu(), theirs[name].grad.cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}.grad: {m}")


def _grid():
    """backend x divergence, cycling temperature, reduction, ignore pattern, bias and softcap through them."""
    cases = []
    settings = itertools.cycle(itertools.product([1.0, 2.0, 0.7], ["mean", "sum", "none"]))
    extras = itertools.cycle([("none", True, None), ("some", False, 20.0), ("all", True, None),
                              ("some", True, 3.0), ("none", False, None)])
    for backend, divergence in itertools.product(BACKENDS, DIVERGENCES):
        temperature, reduction = next(settings)
        ignore, bias, softcap = next(extras)
        cases.append(pytest.param(backend, divergence, temperature, reduction, ignore, bias, softcap,
                                  id=f"{backend}-{divergence}-T{temperature}-{reduction}-{ignore}-b{bias}-c{softcap}"))
    return cases


@pytest.mark.parametrize("backend,divergence,temperature,reduction,ignore,bias,softcap", _grid())
def test_matches_reference(backend, divergence, temperature, reduction, ignore, bias, softcap):
    device = device_for(backend)
    heads = make_heads((2, 19), 24, 40, 333, bias=bias, device=device)
    labels = make_labels((2, 19), 333, ignore, device=device)
    assert_linear_matches_reference(heads, labels, backend, divergence=divergence, temperature=temperature,
                                    reduction=reduction, ce_weight=0.5, beta=0.3, softcap=softcap, chunk_size=7)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 38, 1000, "auto"])
def test_chunk_sizes(chunk_size):
    heads = make_heads((38,), 16, 24, 257)
    labels = make_labels((38,), 257, "some")
    assert_linear_matches_reference(heads, labels, "auto", chunk_size=chunk_size, ce_weight=0.5, temperature=2.0)


@pytest.mark.parametrize("library", ["blas", "onednn"])
def test_auto_chunks_of_several_teacher_heads_keep_cpu_gemms_whole_sized(gemm_library, library):
    # The budget alone would give two fp32 teachers at V=32000 chunks of 192 rows, whose GEMMs run slowly on the
    # CPU's BLAS (MKL); oneDNN's run fastest there (kdfast.cpu_gemm).
    gemm_library(library)
    if library == "onednn" and not cpu_gemm.onednn_products():
        pytest.skip("this torch has no oneDNN linear")
    vocab, rows = 32_000, 4096
    weight = torch.empty(vocab, 1)
    teacher = TeacherHead(torch.empty(rows, 1), weight, None, torch.float32)
    several = TeacherHeads([teacher, teacher], torch.zeros(rows, 2), "mixture", 1.0)
    heads = Heads(torch.empty(rows, 1), weight, None, several, None, LogitMap(), torch.float32)
    expected = 192 if library == "onednn" else SEVERAL_TEACHERS_MIN_ROWS["cpu"]
    assert chunk_rows("auto", heads) == expected and SEVERAL_TEACHERS_MIN_ROWS["cpu"] == 384
    assert chunk_rows("auto", Heads(torch.empty(100, 1), weight, None, several, None, LogitMap(), torch.float32)) == 100
    assert chunk_rows(64, heads) == 64, "a chunk size given is kept"
    single = Heads(torch.empty(rows, 1), weight, None, teacher, None, LogitMap(), torch.float32)
    assert chunk_rows("auto", single) == 192, "one teacher keeps the budget's chunk (48 MiB of both models' logits)"


@pytest.mark.parametrize("kd_weight,ce_weight,t2_scale", [(1.0, 0.0, True), (0.0, 1.0, True), (0.3, 0.7, False)])
def test_weights(kd_weight, ce_weight, t2_scale):
    heads = make_heads((4, 6), 8, 8, 100)
    labels = make_labels((4, 6), 100, "some")
    assert_linear_matches_reference(heads, labels, "auto", kd_weight=kd_weight, ce_weight=ce_weight,
                                    t2_scale=t2_scale, temperature=1.5, divergence="reverse_kl")


def test_num_items_in_batch():
    heads = make_heads((3, 7), 8, 12, 64)
    labels = make_labels((3, 7), 64, "some")
    assert_linear_matches_reference(heads, labels, "auto", ce_weight=1.0, num_items_in_batch=13, chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs(dtype):
    heads = make_heads((40,), 32, 48, 300, dtype=dtype)
    labels = make_labels((40,), 300, "some")
    assert_linear_matches_reference(heads, labels, "auto", chunk_size=16, ce_weight=0.5, temperature=2.0,
                                    divergence="jsd")


def test_autocast_runs_the_gemms_in_bf16():
    heads = make_heads((32,), 32, 48, 300)
    labels = make_labels((32,), 300, "some")
    ours = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in heads.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kdfast.linear_distill_loss(labels=labels, chunk_size=8, ce_weight=0.5, **ours)
    loss.backward()
    assert ours["student_weight"].grad.dtype == torch.float32, "gradients keep the parameters' dtype"
    # The reference on the same bf16-rounded operands: autocast's casts are the only difference to fp32.
    rounded = {k: v.to(torch.bfloat16).double().requires_grad_(k.startswith("student")) for k, v in heads.items()}
    ref = linear_distill_loss_reference(labels=labels, ce_weight=0.5, **rounded)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours["student_weight"].grad.double(), rounded["student_weight"].grad,
                               rtol=3e-2, atol=3e-3)
    fp32 = kdfast.linear_distill_loss(labels=labels, chunk_size=8, ce_weight=0.5, **heads)
    assert not torch.equal(loss, fp32), "under autocast the GEMMs must run in bf16, not fp32"


def test_gradients_only_for_inputs_that_require_them():
    heads = make_heads((10,), 8, 8, 50)
    hidden = heads["student_hidden"].clone().requires_grad_(True)
    weight = heads["student_weight"]  # frozen head: no weight gradient may be computed or returned
    loss = kdfast.linear_distill_loss(hidden, weight, heads["teacher_hidden"], heads["teacher_weight"])
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        value = kdfast.linear_distill_loss(hidden, weight, heads["teacher_hidden"], heads["teacher_weight"])
    torch.testing.assert_close(value, loss.detach())


def test_module_matches_function():
    heads = make_heads((2, 5), 8, 12, 40)
    labels = make_labels((2, 5), 40, "some")
    module = kdfast.LinearDistillLoss(divergence="skew_forward_kl", ce_weight=0.5, softcap=10.0, chunk_size=3)
    assert "softcap=10.0" in repr(module)
    got = module(heads["student_hidden"], heads["student_weight"], heads["teacher_hidden"], heads["teacher_weight"],
                 labels, student_bias=heads["student_bias"], teacher_bias=heads["teacher_bias"])
    want = kdfast.linear_distill_loss(labels=labels, divergence="skew_forward_kl", ce_weight=0.5, softcap=10.0,
                                      chunk_size=3, **heads)
    torch.testing.assert_close(got, want)


def test_shifted_views_and_empty_batches():
    """hidden[:, :-1] (the causal shift) is a non-contiguous view; a batch of no tokens gives 0, not NaN."""
    heads = make_heads((3, 9), 8, 12, 60)
    labels = make_labels((3, 9), 60, "some")
    shifted = {k: (v[:, :-1] if k.endswith("hidden") else v) for k, v in heads.items()}
    assert_linear_matches_reference(shifted, labels[:, 1:], "auto", ce_weight=0.5, chunk_size=5)
    empty = {k: (v[:0] if k.endswith("hidden") else v) for k, v in heads.items()}
    hidden = empty["student_hidden"].clone().requires_grad_(True)
    loss = kdfast.linear_distill_loss(hidden, empty["student_weight"], empty["teacher_hidden"],
                                      empty["teacher_weight"], labels[:0], ce_weight=0.5)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape


def test_runs_inside_a_compiled_model():
    heads = make_heads((12,), 8, 8, 50)
    hidden = heads["student_hidden"].clone().requires_grad_(True)

    def model_and_loss(x):
        return kdfast.linear_distill_loss(torch.tanh(x) * 2, heads["student_weight"], heads["teacher_hidden"],
                                          heads["teacher_weight"], temperature=2.0)

    compiled = torch.compile(model_and_loss)(hidden)
    compiled.backward()
    plain_input = hidden.detach().clone().requires_grad_(True)
    plain = model_and_loss(plain_input)
    plain.backward()
    torch.testing.assert_close(compiled, plain)
    torch.testing.assert_close(hidden.grad, plain_input.grad)
