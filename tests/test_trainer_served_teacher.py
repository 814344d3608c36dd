"""DistillationTrainer with a teacher behind a server (the local stand-in answering vLLM's API): it trains as it does
on a cache of the same teacher (the same parameters after the same steps), each batch is asked while the one before
trains, a server's failure stops the run, and a teacher with another tokenizer is refused before training."""

import threading

import pytest
import torch
from tiny_models import VOCAB, student_and_teacher, training_args, word_tokenizer

from kdfast.demo.corpus import train_tokenizer
from kdfast.integrations.served_teacher import ServedTeacherLoader
from kdfast.integrations.transformers import DistillationTrainer
from kdfast.teacher_cache import build_teacher_cache
from kdfast.teacher_cache.local_server import serving
from kdfast.teacher_cache.served import ServedTeacher

SETTINGS = dict(divergence="forward_kl", temperature=1.0, kd_weight=0.7, ce_weight=0.4, tail="bucket")
K = 6


def _trained(trainer):
    trainer.train()
    return {name: value.detach().clone() for name, value in trainer.model.named_parameters()}


def test_trains_as_on_a_cache_of_the_same_teacher(tmp_path):
    _, teacher = student_and_teacher()
    tokenizer = word_tokenizer()
    windows = torch.randint(2, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3))
    cache = build_teacher_cache(teacher, windows, tmp_path / "cache", tokenizer=tokenizer, k=K, logprob_dtype="fp32",
                                windows_per_shard=4, show_progress=False)
    args = training_args(tmp_path, max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant")
    from_cache = _trained(DistillationTrainer(model=student_and_teacher()[0], args=args, teacher_cache=cache.folder,
                                              processing_class=tokenizer, **SETTINGS))
    with serving(teacher, api="vllm", vocab_size=VOCAB, tokenizer=tokenizer) as url:
        trainer = DistillationTrainer(model=student_and_teacher()[0], args=args, teacher_server=url, teacher_top_k=K,
                                      train_dataset=[{"input_ids": row} for row in windows],
                                      processing_class=tokenizer, **SETTINGS)
        from_server = _trained(trainer)
    for name, value in from_cache.items():
        torch.testing.assert_close(from_server[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert trainer.distill_options.teacher_temperature is None and trainer.distill_options.tail == "bucket"


def test_a_teacher_with_another_tokenizer_or_temperature_is_refused(tmp_path):
    student, teacher = student_and_teacher()
    args, rows = training_args(tmp_path), [{"input_ids": [1, 2, 3]}]
    other = train_tokenizer(["Distilling tokens: naïve café 東京 def f(x): return x ** 2"] * 4, 280)
    with serving(teacher, api="vllm", vocab_size=VOCAB, tokenizer=other) as url, \
            pytest.raises(ValueError, match="tokenizes text otherwise than the student's tokenizer"):
        DistillationTrainer(model=student, args=args, teacher_server=url, train_dataset=rows,
                            processing_class=word_tokenizer(), **SETTINGS)
    with serving(teacher, api="vllm", vocab_size=VOCAB, tokenizer=word_tokenizer()) as url:
        with pytest.raises(ValueError, match="log-probs at temperature 1.0 but the loss's temperature is 2.0"):
            DistillationTrainer(model=student, args=args, teacher_server=url, train_dataset=rows,
                                processing_class=word_tokenizer(), **{**SETTINGS, "temperature": 2.0})
        renormalized = DistillationTrainer(model=student, args=args, teacher_server=url, train_dataset=rows,
                                           processing_class=word_tokenizer(),
                                           **{**SETTINGS, "temperature": 2.0, "tail": "renormalize"})
        assert renormalized.distill_options.teacher_temperature == 1.0, "re-tempered from the server's T = 1"
        with pytest.raises(ValueError, match="pass one teacher, not teacher_model and teacher_server"):
            DistillationTrainer(model=student, args=args, teacher_model=teacher, teacher_server=url, **SETTINGS)
        with pytest.raises(ValueError, match="teacher_top_k must be an int >= 1"):
            DistillationTrainer(model=student, args=args, teacher_server=url, teacher_top_k=0, **SETTINGS)


class _GatedServer:
    """A served teacher whose answers wait for the test: it records which batches were asked, and when."""

    url = "http://gated"

    def __init__(self, fail_at=None):
        self.asked, self.fail_at = [], fail_at
        self.second_asked = threading.Event()

    def row_targets(self, rows, k):
        self.asked.append(len(self.asked))
        if len(self.asked) == 2:
            self.second_asked.set()
        if self.fail_at == len(self.asked):
            raise RuntimeError("the server went away")
        return [(torch.zeros(len(row) - 1, k, dtype=torch.int64), torch.zeros(len(row) - 1, k)) for row in rows]


def _batches(count):
    return [{"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
            for _ in range(count)]


def test_the_next_batch_is_asked_while_the_current_one_trains():
    server = _GatedServer()
    batches = iter(ServedTeacherLoader(_batches(4), server, k=2))
    first = next(batches)  # the training loop holds batch 0 ...
    assert server.second_asked.wait(timeout=10), "... while batch 1 is asked"
    assert first["teacher_ids"].shape == (2, 3, 2)
    assert first["teacher_ids"][1, 2].tolist() == [-1, -1], "padding has no target"
    assert first["teacher_ids"][0, 0].tolist() == [-1, -1], "nothing predicts the first token"
    assert len(list(batches)) == 3 and server.asked == [0, 1, 2, 3]


def test_a_server_failure_reaches_the_training_loop_and_an_early_stop_ends_the_worker():
    batches = iter(ServedTeacherLoader(_batches(4), _GatedServer(fail_at=2), k=2))
    next(batches)
    with pytest.raises(RuntimeError, match="the server went away"):
        next(batches)
    before = threading.active_count()
    loader = iter(ServedTeacherLoader(_batches(50), _GatedServer(), k=2))
    next(loader)
    loader.close()  # what a loop that stops at max_steps does to the generator
    assert threading.active_count() <= before, "the worker thread ended"


def test_a_served_teacher_object_carries_its_own_settings(tmp_path):
    student, teacher = student_and_teacher()
    with serving(teacher, api="sglang", vocab_size=VOCAB) as url, \
            ServedTeacher(url, api="sglang", requests_in_flight=2, request_timeout=10) as served:
        trainer = DistillationTrainer(model=student, args=training_args(tmp_path, max_steps=2), teacher_server=served,
                                      teacher_top_k=K, train_dataset=[{"input_ids": [1, 2, 3, 4]}] * 4,
                                      processing_class=word_tokenizer(), **SETTINGS)
        trainer.train()
        assert trainer.served_teacher is served and trainer.state.global_step == 2
