"""kdfast's AsyncDistillationTrainer and its `chunked_jsd_loss` against TRL's own: the chunk loop on random teacher
candidates (narrowed as TRL narrows them for beta > 0), then the trainer's `compute_loss` on a hand-packed batch,
equal in loss, gradients and logged metrics, per teacher too. TRL's trainer is built on the CPU with its rollout
worker and weight sync injected, its vLLM client and its MFU peak-FLOPs lookup (a CUDA query) stubbed."""

import queue
import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_llama, word_tokenizer

pytest.importorskip("trl.experimental.async_distillation")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.async_distillation import AsyncDistillationConfig
    from trl.experimental.async_distillation import AsyncDistillationTrainer as TRLTrainer
    from trl.experimental.async_distillation import async_distillation_trainer as trl_async

    import kdfast.integrations.trl_async as kdfast_async
    from kdfast.integrations.trl_async import AsyncDistillationTrainer, chunked_jsd_loss


def relative_error(mine, theirs):
    return float((mine - theirs).norm() / theirs.norm().clamp_min(1e-12))


def candidates(rows, k, vocab, generator):
    """The teacher's top-k log-probs per row and an actual token: the top-1 in some rows, another candidate in some,
    outside the top-k in others; some rows' candidates padded (-1, -inf)."""
    logprobs = torch.log_softmax(3 * torch.randn(rows, vocab, generator=generator), -1)
    values, ids = logprobs.topk(k, -1)
    actual = torch.randint(0, vocab, (rows,), generator=generator)
    actual[::3] = ids[::3, 0]
    actual[1::3] = ids[1::3, k - 1]
    ids[2::5, 2:] = -1
    values[2::5, 2:] = float("-inf")
    return ids, values, actual


def chunk_inputs(beta, teachers, bias, rows=40, k=5, vocab=300, hidden=24):
    """`_chunked_jsd_loss`'s inputs as TRL's `_compute_loss` builds them: the support narrowed for beta > 0, rows
    without teacher signal dropped."""
    generator = torch.Generator().manual_seed(0)
    ids, values, actual = candidates(rows, k, vocab, generator)
    if beta == 0:
        target_ids, target_logps, mask = ids, values, ids != -1
    else:
        target_ids, target_logps, mask = trl_async._narrow_top1_actual_support(ids, values, actual, ids != -1, beta)
    kept = mask.any(-1)
    kept[4] = True
    mask[4] = False  # a row without candidates: TRL counts it, its divergence 0 (its caller drops such rows)
    teacher_id_idx = torch.randint(0, teachers, (rows,), generator=generator)[kept] if teachers > 1 else None
    head = (torch.randn(rows, hidden, generator=generator)[kept], 0.5 * torch.randn(vocab, hidden, generator=generator),
            torch.randn(vocab, generator=generator) if bias else None)
    return head, (target_ids[kept], target_logps[kept], mask[kept]), teacher_id_idx


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teachers", [1, 3])
@pytest.mark.parametrize(("temperature", "scale", "softcap", "bias"), [(1.0, 1.0, None, False), (2.0, 0.7, 5.0, True)])
def test_chunked_jsd_loss_matches_trls(beta, teachers, temperature, scale, softcap, bias):
    head, teacher, teacher_id_idx = chunk_inputs(beta, teachers, bias)
    results = []
    for loss_fn in (trl_async._chunked_jsd_loss, chunked_jsd_loss):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in head]
        out = loss_fn(*leaves[:3], scale, softcap, *teacher, beta, temperature, True, teacher_id_idx, teachers, 16)
        out[0].backward()
        results.append((out, [t.grad for t in leaves if t is not None]))
    (theirs, their_grads), (mine, my_grads) = results
    assert mine[0].requires_grad and not any(t.requires_grad for t in mine[1:])
    assert mine[4].shape == (3 * teachers,)
    for name, a, b in zip(("loss", "jsd_sum", "entropy_sum", "teacher_entropy_sum", "per_teacher_stats"), mine,
                          theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), my_grads, their_grads):
        assert relative_error(a, b) < 1e-4, name


def test_chunked_jsd_loss_refuses_what_is_not_kdfasts():
    (hidden, weight, _), teacher, _ = chunk_inputs(0.0, 1, False)
    with pytest.raises(ValueError, match="add_tail_bucket"):
        chunked_jsd_loss(hidden, weight, None, 1.0, None, *teacher, 0.0, 1.0, False, None, 1, 16)
    with pytest.raises(ValueError, match="num_teachers"):
        chunked_jsd_loss(hidden, weight, None, 1.0, None, *teacher, 0.0, 1.0, True, None, 0, 16)
    for teacher_id_idx in (torch.zeros(3, dtype=torch.long), torch.full((hidden.shape[0],), 2)):
        with pytest.raises(ValueError, match="teacher_id_idx"):
            chunked_jsd_loss(hidden, weight, None, 1.0, None, *teacher, 0.0, 1.0, True, teacher_id_idx, 2, 16)


class StubWorker:
    """TRL's RolloutWorkerProtocol with nothing behind it: the tests hand the trainer its batches."""

    def __init__(self):
        self.rollout_buffer, self.metrics_queue = queue.Queue(), queue.Queue()

    def start(self): pass
    def stop(self): pass
    def update_model_version(self, model_version): pass
    def check_health(self, stale_after_s): pass


class NoWeightSync:
    def init_weight_transfer(self): pass
    def pause(self): pass
    def send_weights(self, iterator): pass
    def resume(self): pass
    def destroy(self): pass


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture
def trainers(student_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    monkeypatch.setattr(trl_async, "get_peak_flops_per_device", lambda *args: None)
    monkeypatch.setattr(trl_async, "VLLMClient", lambda *args, **kwargs: None)

    def make(cls, teachers, **settings):
        args = AsyncDistillationConfig(
            output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, teacher_top_k=4,
            # TRL asks for FlashAttention (a GPU kernel); the packed batches here hold sequences that attend alike.
            model_init_kwargs={"attn_implementation": "eager", "dtype": torch.float32},
            teacher_server_urls={f"teacher{i}": f"http://stub{i}" for i in range(teachers)}, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(student_dir, args=args, train_dataset=Dataset.from_dict({"prompt": [[]]}),
                          processing_class=word_tokenizer(), rollout_worker=StubWorker(),
                          weight_transfer=NoWeightSync())
        trainer.current_gradient_accumulation_steps = 2
        return trainer

    return lambda teachers, **settings: (make(TRLTrainer, teachers, **settings),
                                         make(AsyncDistillationTrainer, teachers, **settings))


def packed_batch(teachers, k=4, seed=0):
    """What TRL's collator hands `_compute_loss`: two sequences packed into one row (positions restarting), two
    positions of inter-rank padding, per position the teacher's candidates for that position's token (top-k, plus
    the actual token where it is outside them, -1 / -inf padding), one completion position without any."""
    generator = torch.Generator().manual_seed(seed)
    lengths, prompt = (7, 6), 2
    real, length = sum(lengths), sum(lengths) + 2
    ids, logprobs, actual = candidates(length, k, VOCAB, generator)
    ids = torch.cat([ids, torch.full((length, 1), -1)], 1)
    logprobs = torch.cat([logprobs, torch.full((length, 1), float("-inf"))], 1)
    outside = ~(ids == actual[:, None]).any(-1)
    ids[outside, k] = actual[outside]
    logprobs[outside, k] = -9.0
    completion_mask = torch.cat([torch.tensor([0] * prompt + [1] * (n - prompt)) for n in lengths] + [torch.zeros(2)])
    ids[9], logprobs[9] = -1, float("-inf")  # a completion token the teacher scored no candidate for
    batch = {"input_ids": actual[None], "attention_mask": torch.tensor([[1] * real + [0, 0]]),
             "completion_mask": completion_mask.long()[None],
             "position_ids": torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(2, dtype=torch.long)])[None],
             "teacher_topk_ids": ids[None], "teacher_topk_logprobs": logprobs[None],
             "global_n_tokens": completion_mask.sum().float()[None],
             "global_n_forward_tokens": torch.tensor([float(real)]), "mean_seq_len": torch.tensor([real / 2])}
    if teachers > 1:
        batch["teacher_id_idx"] = torch.tensor([[0] * lengths[0] + [teachers - 1] * lengths[1] + [-1, -1]])
    return batch


def assert_same_metrics(mine, theirs):
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(torch.tensor(mine[key], dtype=torch.float64),
                                   torch.tensor(theirs[key], dtype=torch.float64), rtol=1e-4, atol=1e-7, equal_nan=True,
                                   msg=key)


@pytest.mark.parametrize("teachers", [1, 3])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trainer_matches_trls_loss_gradients_and_metrics(trainers, monkeypatch, beta, teachers):
    theirs, ours = trainers(teachers, beta=beta)
    calls = []
    monkeypatch.setattr(kdfast_async, "chunked_jsd_loss", lambda *args: calls.append(1) or chunked_jsd_loss(*args))
    batch = packed_batch(teachers)
    their_loss = theirs.compute_loss(theirs.model, batch)
    our_loss = ours.compute_loss(ours.model, batch)
    assert calls and trl_async._chunked_jsd_loss.__module__ == trl_async.__name__, "TRL's name restored after"
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-4, atol=1e-7)
    assert_same_metrics(ours._metrics["train"], theirs._metrics["train"])
    if teachers > 1:  # teacher1 scored no row: its averages NaN, its share a real 0, on both sides
        assert ours._metrics["train"]["teacher_token_frac/teacher1"][0][0] == 0
    their_loss.backward()
    our_loss.backward()
    for (name, mine), their_param in zip(ours.model.named_parameters(), theirs.model.parameters()):
        assert relative_error(mine.grad, their_param.grad) < 1e-4, name


def test_trainer_without_the_tail_is_trls(trainers, monkeypatch):
    theirs, ours = trainers(3, beta=0.5, add_tail_bucket=False)
    monkeypatch.setattr(kdfast_async, "chunked_jsd_loss", lambda *args: pytest.fail("kdfast's loss ran"))
    batch = packed_batch(3)
    torch.testing.assert_close(ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch),
                               rtol=0, atol=0)
    assert_same_metrics(ours._metrics["train"], theirs._metrics["train"])


def test_trls_loss_restored_when_the_loss_raises(trainers, monkeypatch):
    _, ours = trainers(1)
    original = trl_async._chunked_jsd_loss

    def failing(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(kdfast_async, "chunked_jsd_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ours.compute_loss(ours.model, packed_batch(1))
    assert trl_async._chunked_jsd_loss is original
