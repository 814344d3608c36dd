"""`linear_distill_loss` and `linear_sparse_distill_loss` inside a torch.compile'd step with fullgraph=True
(kdfast.linear_ops: the chunk loop as one custom op): the eager step's loss, components and gradients to hidden,
weight and bias, for every head setting, every reduction (per-row losses weighed), num_items_in_batch, a sparse
teacher's tails and autocast; the op passes torch.library's own checks (schema, fake tensor, aliasing). AOTAutograd's
eager backend traces the graph as inductor would, without compiling C++ for it."""

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import assert_compiled_step_equals_eager, assert_compiled_under_autocast_equals_eager, make_labels

import kdfast
from kdfast import linear_ops

ROWS, VOCAB, HIDDEN, TEACHER_HIDDEN = 10, 40, 8, 12
CASES = {
    "plain": dict(),
    "bias, sum": dict(bias=True, reduction="sum"),
    "softcaps and scales": dict(student_softcap=3.0, teacher_softcap=5.0, student_logit_scale=1.3,
                                teacher_logit_scale=0.8, bias=True),
    "jsd, num_items_in_batch, chunks": dict(divergence="jsd", beta=0.3, temperature=2.0, num_items_in_batch=25,
                                            chunk_size=4),
    "components": dict(return_components=True, z_loss_weight=1e-3),
    "sparse": dict(sparse=True, bias=True, softcap=4.0, logit_scale=1.2),
    "sparse, given tail, sum, components": dict(sparse=True, tail="given", reduction="sum", return_components=True,
                                                divergence="reverse_kl", chunk_size=3),
    # Per-row losses, weighed: the compiled backward runs the op again with each row's grad_output.
    "per row": dict(reduction="none", bias=True, softcap=3.0, chunk_size=4),
    "per row, sparse, components": dict(sparse=True, reduction="none", return_components=True),
}
# The C++ kernel here; on a GPU machine the CUDA and Triton kernels too, on the GPU.
COMPILE_BACKENDS = ["cpu"] + [backend for backend in BACKENDS if device_for(backend) == "cuda"]


def _inputs(bias: bool, device="cpu"):
    generator = torch.Generator().manual_seed(5)
    data = {"hidden": torch.randn(2, ROWS // 2, HIDDEN, generator=generator),
            "weight": torch.randn(VOCAB, HIDDEN, generator=generator) / 2,
            "bias": torch.randn(VOCAB, generator=generator) if bias else None,
            "teacher_hidden": torch.randn(2, ROWS // 2, TEACHER_HIDDEN, generator=generator),
            "teacher_weight": torch.randn(VOCAB, TEACHER_HIDDEN, generator=generator) / 2,
            "labels": make_labels((2, ROWS // 2), VOCAB, "some"),
            "ids": torch.rand(2, ROWS // 2, VOCAB, generator=generator).argsort(-1)[..., :5],
            "logprobs": torch.randn(2, ROWS // 2, 6, generator=generator).log_softmax(-1)}
    return {name: value.to(device) if value is not None else None for name, value in data.items()}


def _step(data, settings):
    settings = dict(settings)
    if settings.pop("sparse", False):
        # K = 5 ids; their log-probs and the rest's (read only with tail="given"), normalised together.
        logprobs = data["logprobs"] if settings.get("tail") == "given" else data["logprobs"][..., :5]

        def step(hidden, weight, bias):
            return kdfast.linear_sparse_distill_loss(torch.tanh(hidden) * 2.0, weight, data["ids"], logprobs,
                                                     data["labels"], student_bias=bias, ce_weight=0.5, **settings)
        return step

    def step(hidden, weight, bias):  # a model in front of the loss, so that the graph holds work of its own
        return kdfast.linear_distill_loss(torch.tanh(hidden) * 2.0, weight, data["teacher_hidden"],
                                          data["teacher_weight"], data["labels"], student_bias=bias, ce_weight=0.5,
                                          **settings)
    return step


def _run(step, data):
    leaves = [data["hidden"].clone().requires_grad_(True), data["weight"].clone().requires_grad_(True),
              data["bias"].clone().requires_grad_(True) if data["bias"] is not None else None]
    out = step(*leaves)
    loss, parts = out if isinstance(out, tuple) else (out, None)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (1.5 * weights * loss).sum().backward()  # grad_outputs other than 1: rescaled, or each row's own
    loss = loss.detach()
    return loss, parts, [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_step_equals_eager(case, backend):
    settings = dict(CASES[case])
    data = _inputs(settings.pop("bias", False), device_for(backend))
    assert_compiled_step_equals_eager(_step(data, {**settings, "backend": backend}), _run, data,
                                      ("kd", "ce", "z_loss", "accuracy", "entropy"))


def test_fullgraph_step_under_autocast_equals_eager():
    data = _inputs(True)
    assert_compiled_under_autocast_equals_eager(_step(data, {}), _run, data)


def test_the_op_passes_torch_librarys_checks():
    data = _inputs(True)
    hidden = data["hidden"].reshape(ROWS, HIDDEN)
    # No input requires a gradient: the op is not differentiable itself (CompiledLinearDistillFunction around it is).
    weight, bias = data["weight"], data["bias"]
    settings = kdfast.options.LossOptions(ce_weight=0.5).encoded()
    sparse_settings = kdfast.sparse_options.SparseOptions(ce_weight=0.5).encoded()
    # Every gradient for a reduced loss, or for a per-row loss's backward (each row weighed); d hidden alone.
    for wanted, row_weights in (((True, True, True), None), ((True, True, True), torch.rand(ROWS)),
                                ((True, False, False), None)):
        teacher_logits = torch.randn(ROWS, weight.shape[0])
        for teacher, kind in (((data["teacher_hidden"].reshape(ROWS, TEACHER_HIDDEN), data["teacher_weight"],
                                None), "head"),
                              ((data["ids"].reshape(ROWS, -1), data["logprobs"][..., :5].reshape(ROWS, -1), None),
                               "sparse"),
                              ((teacher_logits, None, None), "logits")):
            args = (hidden, weight, bias, *teacher, data["labels"].reshape(-1), torch.full((), 0.1), row_weights,
                    *wanted, 1.0, 0.0, 1.0, 0.0, torch.float32, torch.float32, 0, False,
                    (sparse_settings if kind == "sparse" else settings), kind)
            torch.library.opcheck(linear_ops.linear_distill_forward, args,
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _run_leaves(data):
    return data["hidden"].clone().requires_grad_(True), data["weight"].clone().requires_grad_(True), None


def test_bad_input_is_refused_naming_the_argument_when_compiled():
    """The input checks run while the step is traced: labels of the wrong shape are a ValueError naming them (with
    fullgraph=True torch.compile reports it as the exception its traced code raised)."""
    data = _inputs(False)
    data["labels"] = data["labels"][:, :-1]
    step = _step(data, {})
    leaves = _run_leaves(data)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="labels shape"):
        torch.compile(step, backend="aot_eager")(*leaves)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="labels shape"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves)
