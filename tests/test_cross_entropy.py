"""kdfast.cross_entropy and kdfast.CrossEntropyLoss (the CE alone on logits: no teacher) against float64 torch on every
backend: label smoothing, z-loss, every reduction, ignored rows, num_items_in_batch, [B, S, V] logits, 16-bit
logits, the gradient in place, padded vocabularies, components, torch.compile, vocab shards over gloo ranks; its bad
inputs named. The peers' cases on it: tests/test_flash_attn_peer_cases*.py, tests/test_megatron_peer_cases*.py."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases

import kdfast

# label_smoothing, z_loss_weight
SETTINGS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)]


def make_inputs(shape=(37,), vocab=1000, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    """Logits of a trained model's spread (|z| up to ~12) and labels with every fifth row ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels.view(-1)[::5] = -100
    return logits.to(device), labels.to(device)


def reference(logits, labels, label_smoothing=0.0, z_loss_weight=0.0, reduction="mean", num_items_in_batch=None):
    """float64 torch: F.cross_entropy with smoothing, plus z_loss_weight * lse² on the kept rows."""
    logits, labels = logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    rows = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    kept = labels != -100
    rows = rows + torch.where(kept, z_loss_weight * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (num_items_in_batch if num_items_in_batch is not None else kept.sum())


def check_against_float64(logits, labels, backend, reduction="mean", **settings):
    ours = logits.detach().clone().requires_grad_(True)
    theirs = logits.detach().double().requires_grad_(True)
    loss = kdfast.cross_entropy(ours, labels, backend=backend, reduction=reduction, **settings)
    expected = reference(theirs, labels, reduction=reduction, **settings)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().reshape(-1), expected.reshape(-1), atol=2e-6, rtol=1e-5)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss.double() * weights.to(loss.device)).sum().backward()
    (expected * weights.reshape(expected.shape).to(expected.device)).sum().backward()
    # A 16-bit gradient is the float64 one correctly rounded, within its last bit.
    atol = 1e-7 if logits.dtype == torch.float32 else 4e-3 * theirs.grad.abs().max().item()
    torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=atol, rtol=1e-5 if atol == 1e-7 else 8e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing,z_loss_weight", SETTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64(backend, label_smoothing, z_loss_weight, reduction):
    logits, labels = make_inputs((9 if backend == "triton" else 37,), device=device_for(backend))
    check_against_float64(logits, labels, backend, reduction, label_smoothing=label_smoothing,
                          z_loss_weight=z_loss_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits(backend, dtype):
    logits, labels = make_inputs((2, 5), device=device_for(backend), dtype=dtype)
    check_against_float64(logits, labels, backend, label_smoothing=0.1, z_loss_weight=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_and_sequence_dims_and_num_items(backend):
    logits, labels = make_inputs((3, 4), device=device_for(backend))
    check_against_float64(logits, labels, backend, num_items_in_batch=17)
    loss = kdfast.cross_entropy(logits, labels, backend=backend, reduction="none")
    assert loss.shape == labels.shape
    assert torch.all(loss[labels == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_in_place(backend):
    """The gradient over the logits' own storage: the same as out of place, and no other [N, V] tensor for it."""
    logits, labels = make_inputs((11,), device=device_for(backend))
    leaf = logits.clone().requires_grad_(True)
    kept_out = leaf * 1.0
    kdfast.cross_entropy(kept_out, labels, backend=backend, label_smoothing=0.1).backward()
    expected = leaf.grad.clone()
    leaf.grad = None
    in_place = leaf * 1.0
    storage = in_place.data_ptr()
    kdfast.cross_entropy(in_place, labels, backend=backend, label_smoothing=0.1, inplace_backward=True).backward()
    torch.testing.assert_close(leaf.grad, expected, atol=0, rtol=0)
    assert in_place.data_ptr() == storage and not torch.equal(in_place.detach(), logits)  # overwritten


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_is_a_differentiable_zero(backend):
    logits, labels = make_inputs((6,), device=device_for(backend))
    labels.fill_(-100)
    leaf = logits.clone().requires_grad_(True)
    loss = kdfast.cross_entropy(leaf, labels, backend=backend, z_loss_weight=1e-2)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocabulary_columns_left_out(backend):
    """vocab_size: the columns past the tokenizer's vocabulary (a padded head) are in neither softmax, zero gradient."""
    logits, labels = make_inputs((7,), vocab=128, device=device_for(backend))
    labels = labels.clamp(max=99).masked_fill(labels < 0, -100)
    leaf = logits.clone().requires_grad_(True)
    loss = kdfast.cross_entropy(leaf, labels, backend=backend, vocab_size=100)
    loss.backward()
    narrow = logits[:, :100].double().requires_grad_(True)
    expected = reference(narrow, labels)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(leaf.grad[:, :100].double(), narrow.grad, atol=1e-7, rtol=1e-5)
    assert torch.all(leaf.grad[:, 100:] == 0)


def test_components():
    logits, labels = make_inputs((13,))
    loss, parts = kdfast.cross_entropy(logits, labels, label_smoothing=0.1, z_loss_weight=1e-2,
                                       return_components=True)
    kept, wide = labels != -100, logits.double()
    ce = F.cross_entropy(wide, labels, label_smoothing=0.1)
    z_loss = (torch.logsumexp(wide, -1)[kept] ** 2).mean()
    log_q = wide.log_softmax(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)[kept].mean()
    accuracy = (wide.argmax(-1) == labels)[kept].double().mean()
    assert parts.kd is None and parts.teachers is None
    for found, expected in [(parts.ce, ce), (parts.z_loss, z_loss), (parts.entropy, entropy),
                            (parts.accuracy, accuracy), (loss, ce + 1e-2 * z_loss)]:
        torch.testing.assert_close(found.double(), expected, atol=2e-6, rtol=1e-5)


def test_module_equals_function():
    logits, labels = make_inputs((2, 6))
    module = kdfast.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    assert "label_smoothing=0.1" in repr(module)
    torch.testing.assert_close(module(logits, labels), kdfast.cross_entropy(logits, labels, label_smoothing=0.1,
                                                                            reduction="sum"), atol=0, rtol=0)
    torch.testing.assert_close(module(logits, labels, num_items_in_batch=4),
                               kdfast.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum",
                                                    num_items_in_batch=4), atol=0, rtol=0)


def test_compiled_fullgraph():
    logits, labels = make_inputs((2, 6))
    step = torch.compile(lambda x, y: kdfast.cross_entropy(x, y, label_smoothing=0.1, z_loss_weight=1e-3),
                         fullgraph=True, backend="aot_eager")
    compiled, eager = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    step(compiled, labels).backward()
    kdfast.cross_entropy(eager, labels, label_smoothing=0.1, z_loss_weight=1e-3).backward()
    torch.testing.assert_close(compiled.grad, eager.grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda x, y: kdfast.cross_entropy(x.long(), y), "logits must be float32, bfloat16 or float16"),
    (lambda x, y: kdfast.cross_entropy(x[0], y), "logits must have shape"),
    (lambda x, y: kdfast.cross_entropy(x, None), r"labels must be a tensor of token ids of shape \(5,\)"),
    (lambda x, y: kdfast.cross_entropy(x, y[:4]), r"labels shape \(4,\) must equal the logits' leading shape"),
    (lambda x, y: kdfast.cross_entropy(x, y.float()), "labels must be an integer tensor"),
    (lambda x, y: kdfast.cross_entropy(x, y.clamp(min=0) + 1000), r"labels must lie in \[0, 1000\)"),
    (lambda x, y: kdfast.cross_entropy(x, y, vocab_size=1001), "vocab_size=1001 but logits covers only 1000"),
    (lambda x, y: kdfast.cross_entropy(x, y, reduction="avg"), "reduction"),
    (lambda x, y: kdfast.cross_entropy(x, y, label_smoothing=1.5), "label_smoothing"),
    (lambda x, y: kdfast.cross_entropy(x, y, num_items_in_batch=0), "num_items_in_batch must be a positive"),
])
def test_bad_input_named(call, match):
    logits, labels = make_inputs((5,))
    with pytest.raises(ValueError, match=match):
        call(logits, labels)


def test_module_refuses_a_teachers_settings():
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['temperature'\]"):
        kdfast.CrossEntropyLoss(temperature=2.0)
    with pytest.raises(ValueError, match="reduction"):
        kdfast.CrossEntropyLoss(reduction="avg")


# Vocab shards: each rank holds its columns of the logits; every rank gets the loss and its columns' gradient.
# ----------------------------------------------------------------------------------------------------------------

SHARDS = ((0, 61), (61, 140), (140, 157))  # uneven, one narrow
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors


def _sharded_case(backend, label_smoothing, z_loss_weight, reduction):
    rank = dist.get_rank()
    start, stop = SHARDS[rank]
    logits, labels = make_inputs((3, 5), vocab=SHARDS[-1][1], seed=1)
    shard = logits[..., start:stop].clone().requires_grad_(True)
    whole = logits.double().requires_grad_(True)
    settings = dict(label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, reduction=reduction)
    loss = kdfast.cross_entropy(shard, labels, backend=backend, process_group=dist.group.WORLD,
                                vocab_range=(start, stop), **settings)
    expected = reference(whole, labels, **settings).reshape(loss.shape)
    torch.testing.assert_close(loss.double(), expected, atol=2e-6, rtol=1e-5)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(shard.grad.double(), whole.grad[..., start:stop], atol=1e-7, rtol=1e-5)


def _sharded_cases():
    return {f"{backend}-{smoothing}-{z_loss}-{reduction}": (_sharded_case, backend, smoothing, z_loss, reduction)
            for backend in VP_BACKENDS for smoothing, z_loss in SETTINGS[1:3] for reduction in ("mean", "none")}


@pytest.fixture(scope="module")
def sharded_outcomes(tmp_path_factory):
    return spawn_gloo_cases(_sharded_cases, len(SHARDS), tmp_path_factory.mktemp("cross_entropy_shards"))


@pytest.mark.parametrize("case", list(_sharded_cases()))
def test_vocab_shards(sharded_outcomes, case):
    failed = failures(sharded_outcomes, case)
    assert not failed, failed


def test_vocab_range_needs_a_group():
    logits, labels = make_inputs((5,))
    with pytest.raises(ValueError, match="vocab_range needs a process_group"):
        kdfast.cross_entropy(logits[:, :10], labels.clamp(max=9), vocab_range=(0, 10))
