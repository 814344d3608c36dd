"""The ModelOpt Megatron plugin's tensor-parallel KL losses (NVIDIA/Model-Optimizer, modelopt/torch/distill/plugins/
megatron.py) on kdfast's vocab-parallel losses, over torch.distributed (gloo, CPU, 4 ranks); the plugin's TP = 1
cases are in tests/test_modelopt_megatron_peer_cases.py, whose module docstring says how each loss maps onto kdfast,
ModelOpt's other losses in tests/test_modelopt_peer_cases.py.

What the plugin computes with the vocabulary split over the TP group (each rank the contiguous shard
[r V / tp, (r + 1) V / tp) of Megatron's vocab-parallel output layer):
- `LogitsKLLoss`: both models' logits over T, each rank's max all-reduced (MAX), its sum of exp all-reduced (SUM,
  autograd's all_reduce for the student, so its backward sums the ranks' gradients), giving global log-probs; each
  rank sums KL(teacher || student) (reverse: KL(student || teacher)) over its own columns only, and returns that
  partial per token with tp_reduce=True. Megatron's loss function (megatron/post_training/loss_func.py, `_mask_loss`)
  then sums the partial times the loss mask and all-reduces it (SUM) over the TP group; the trainer divides by the
  mask's count. kdfast: `distill_loss(shard, teacher shard, labels, process_group, vocab_range, t2_scale=False)`,
  the mask as labels (-100 where it is 0), reduction "sum" (the all-reduced masked sum, on every rank) or "mean"
  (over the count); "none" is the per-token KL, the partials' sum.
- `TopKLogitsKLLoss` (commit df93c400, the ghost-token form): each rank's top-k candidates all-gathered, the global
  top-k picked, the KL over those k (top-p kept) and one ghost bucket, normalised over the global vocabulary; every
  rank computes the whole loss (tp_reduce=False). kdfast: `sparse_distill_loss(shard, ids, log-probs, tail="bucket",
  process_group, vocab_range)`, the teacher's global top-k ids and full-vocabulary log-probs on every rank.

Ported: tests/gpu_megatron/torch/distill/plugins/test_distill_megatron.py's TP tests, test_logits_kl_loss and
test_topk_logits_kl_loss (top_k 5; top_p None, 0.9 with min_k 1 and 3: the peer's parametrisation), which build
Megatron GPT models on GPUs and assert only that the loss exists, backpropagates, and (top-k) is the same on every
rank. Here the models are replaced by the peer's own loss inputs (`_make_loss_inputs`: seed 1234, [4, 3, 16], the
teacher randn * 3), the vocabulary of 16 split over 4 ranks as Megatron splits it, and the expectations made exact:
- dense: the plugin's TP arithmetic itself, written here in float64 over the same gloo group (`megatron_tp_kl64`, the
  all-reduces included), whose partials sum to the TP = 1 loss (checked: the port); kdfast's per-token loss, its
  masked sum and mean equal it, and each rank's gradient shard equals the one the plugin's backward gives that rank
  (rtol 1e-5, atol 1e-6); T 1 and 2, forward and reverse, the loss mask all ones and with 4 of 12 tokens off.
- top-k: kdfast's loss is identical on every rank (all-gathered, as the peer checks) and equals the TP = 1 float64
  top-k loss (atol 1e-6, the peer's); each rank's gradient shard equals float64's; T 1 and 2.
Every backend that runs on the CPU; Triton (its interpreter, ~0.3 s a call on each rank) runs the masked dense
cases and the top-k cases at T = 1.

Left out: the GPU tests' GPT models, MTP and skip_lm_loss plumbing (no loss value); sequence parallelism and the
intermediate-layer losses (no vocabulary split); the loss balancer (scalars).
"""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from conftest import BACKENDS, device_for
from rank_cases import failures, spawn_gloo_cases
from test_modelopt_megatron_peer_cases import (
    kdfast_megatron_kl,
    kdfast_megatron_topk,
    megatron_inputs,
    megatron_kl64,
    megatron_sparse_teacher,
    megatron_topk,
)

import kdfast

WORLD = 4
VP_BACKENDS = [backend for backend in BACKENDS if device_for(backend) == "cpu"]  # gloo on CPU tensors
TOP_P_CASES = [(None, 1), (0.9, 1), (0.9, 3)]  # the peer's (top_p, top_p_min_k), top_k 5
# Megatron's loss mask, [b, s]: all ones, and 4 of the 12 tokens off
MASKS = {"all": torch.ones(3, 4),
         "some": torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])}


def close(actual, expected, what, atol=1e-6):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=1e-5, atol=atol,
                               msg=lambda message: f"{what}: {message}")


def megatron_shard(rank, world, vocab):
    """Megatron's vocab-parallel range of this rank: contiguous, vocab / world columns each."""
    size = vocab // world
    return rank * size, (rank + 1) * size


def megatron_tp_kl64(student_shard, teacher_shard, temperature, reverse, group):
    """LogitsKLLoss's TP branch in float64: global log-probs from all-reduced maxima and sums of exp (the student's
    sum by autograd's all_reduce), the KL summed over this rank's columns only; the partial per token, [b, s]."""
    teacher = teacher_shard.double() / temperature
    student = student_shard / temperature
    teacher_max, student_max = teacher.amax(-1, keepdim=True), student.detach().amax(-1, keepdim=True)
    dist.all_reduce(teacher_max, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(student_max, op=dist.ReduceOp.MAX, group=group)
    teacher_denom = (teacher - teacher_max).exp().sum(-1, keepdim=True)
    dist.all_reduce(teacher_denom, group=group)
    student_denom = dist_fn.all_reduce((student - student_max).exp().sum(-1, keepdim=True), group=group)
    p = student - student_max - student_denom.log()
    q = teacher - teacher_max - teacher_denom.log()
    if reverse:
        p, q = q, p
    return (q.exp() * (q - p)).sum(-1).transpose(0, 1)


def labels_of(mask):
    """kdfast's rows kept where Megatron's [b, s] mask is 1, in the logits' [s, b] layout (label 0: any column; the CE
    is off, only the mask counts)."""
    return torch.where(mask.transpose(0, 1) > 0, 0, -100)


def dense_case(backend, temperature, reverse, mask_name):
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    student, teacher = megatron_inputs()
    start, stop = megatron_shard(rank, world, student.shape[-1])
    mask = MASKS[mask_name]
    shard = dict(process_group=group, vocab_range=(start, stop))

    # The plugin's arithmetic, and Megatron's _mask_loss: the masked sum of the partials, all-reduced.
    s64 = student[..., start:stop].double().requires_grad_(True)
    partial = megatron_tp_kl64(s64, teacher[..., start:stop], temperature, reverse, group)
    local = (partial * mask.double()).sum()
    local.backward()  # every rank: the student's all_reduce sums the gradients in its backward
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    per_token = partial.detach().clone()
    dist.all_reduce(per_token, group=group)
    close(per_token, megatron_kl64(student, teacher, temperature, reverse), "the plugin's TP loss vs TP = 1")

    none = kdfast_megatron_kl(student[..., start:stop], teacher[..., start:stop], temperature, reverse, backend,
                              **shard)
    close(none, per_token, "per-token loss")
    s = student[..., start:stop].clone().requires_grad_(True)
    settings = dict(divergence="reverse_kl" if reverse else "forward_kl", temperature=temperature, t2_scale=False,
                    backend=backend, **shard)
    loss_sum = kdfast.distill_loss(s, teacher[..., start:stop], labels_of(mask), reduction="sum", **settings)
    loss_sum.backward()
    close(loss_sum, total, "masked sum")
    close(s.grad, s64.grad, "gradient shard")
    loss_mean = kdfast.distill_loss(student[..., start:stop], teacher[..., start:stop], labels_of(mask),
                                    reduction="mean", **settings)
    close(loss_mean, total / mask.sum(), "masked mean")


def topk_case(backend, temperature, top_p, min_k):
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    student, teacher = megatron_inputs()
    start, stop = megatron_shard(rank, world, student.shape[-1])
    ids, logprobs = megatron_sparse_teacher(teacher, 5, temperature, top_p, min_k)
    shard = dict(process_group=group, vocab_range=(start, stop))

    s = student[..., start:stop].clone().requires_grad_(True)
    loss = kdfast_megatron_topk(s, ids, logprobs, temperature, backend=backend, **shard)
    gathered = [torch.empty_like(loss) for _ in range(world)]
    dist.all_gather(gathered, loss.detach().contiguous(), group=group)
    for other in gathered[1:]:  # the peer's assertion: one global top-k, one loss on every rank
        assert torch.equal(gathered[0], other), "top-k KD loss differs across TP ranks"
    s64 = student.double().requires_grad_(True)
    expected = megatron_topk(s64, teacher, 5, temperature, top_p=top_p, min_k=min_k)
    close(loss, expected, "top-k loss")
    weights = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).view(expected.shape)
    (loss * weights.float()).sum().backward()
    (expected * weights).sum().backward()
    close(s.grad, s64.grad[..., start:stop], "gradient shard")


def cases() -> dict:
    listed = {}
    for backend, temperature, reverse, mask_name in itertools.product(VP_BACKENDS, (1.0, 2.0), (False, True), MASKS):
        if backend == "triton" and mask_name == "all":
            continue  # the interpreter's share (module docstring)
        name = f"dense-T{temperature}-{'reverse' if reverse else 'forward'}-mask_{mask_name}-{backend}"
        listed[name] = (dense_case, backend, temperature, reverse, mask_name)
    for backend, temperature, (top_p, min_k) in itertools.product(VP_BACKENDS, (1.0, 2.0), TOP_P_CASES):
        if backend == "triton" and temperature != 1.0:
            continue
        listed[f"topk5-top_p{top_p}-min_k{min_k}-T{temperature}-{backend}"] = (topk_case, backend, temperature, top_p,
                                                                               min_k)
    return listed


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return spawn_gloo_cases(cases, WORLD, tmp_path_factory.mktemp("modelopt_vocab_parallel"))


@pytest.mark.parametrize("case", list(cases()))
def test_modelopt_tensor_parallel(outcomes, case):
    assert not failures(outcomes, case), failures(outcomes, case)
