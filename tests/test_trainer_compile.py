"""`DistillationTrainer` with `torch_compile=True`: the Trainer compiles the model's forward, which the fused loss
skips (it reads the decoder's hidden states and the head itself), so the trainer compiles the loss's own computation
(the student's decoder, the teachers', the fused loss) with the Trainer's backend, in one graph with one teacher, the
mixture of two, or a teacher's own logits (alone, or a module's beside a head); the steps equal the eager ones.
FSDP and DeepSpeed with torch_compile are refused naming the setting."""

import pytest
import torch
from tiny_models import LogitEnsemble, as_examples, student_and_teacher, tiny_llama, token_batch, training_args

from kdfast.integrations.transformers import DistillationTrainer

SETTINGS = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.4)


def _train(tmp_path, compiled: bool, teachers: int = 1):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    student, teacher = student_and_teacher(head_scale=4.0)
    if teachers == 2:  # their mixture: each one's hidden states and head, one several-teacher loss
        teacher = {"a": teacher, "b": tiny_llama(48, seed=2)}
    extra = {}
    if teachers == "own logits":  # the teacher's whole forward and the student's fused head alone
        teachers, extra = 1, {"teacher_logits": "own"}
    if teachers == "a head and a module's logits":  # two teachers, the second a module giving its logits
        teacher, teachers = [teacher, LogitEnsemble()], 2
    args = training_args(tmp_path, max_steps=3, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                         lr_scheduler_type="constant", torch_compile=compiled,
                         **({"torch_compile_backend": "aot_eager"} if compiled else {}))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=as_examples(token_batch()), **SETTINGS, **extra)
    trainer.train()
    return ([param.detach().clone() for param in student.parameters()], counters["stats"]["unique_graphs"],
            dict(counters["graph_break"]))


@pytest.mark.parametrize("teachers", [1, 2, "own logits", "a head and a module's logits"])
def test_the_compiled_trainer_steps_equal_the_eager_ones(tmp_path, teachers):
    eager, eager_graphs, _ = _train(tmp_path / "eager", False, teachers)
    compiled, compiled_graphs, breaks = _train(tmp_path / "compiled", True, teachers)
    assert eager_graphs == 0 and compiled_graphs >= 1, "the loss ran compiled"
    assert breaks == {}, "one graph: the decoders and the fused loss"
    for after, expected in zip(compiled, eager):
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


def test_torch_compile_with_fsdp_is_refused(tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer.__init__

    def as_under_fsdp(self, *args, **kwargs):  # what the Trainer sets up under accelerate's FSDP plugin
        original(self, *args, **kwargs)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "__init__", as_under_fsdp)
    student, teacher = student_and_teacher()
    args = training_args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    with pytest.raises(ValueError, match="torch_compile"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, **SETTINGS)


def test_kdfast_gkd_trainer_compiles_its_loss(tmp_path):
    """kdfast's TRL GKDTrainer under torch_compile: the loss compiled, equal to the eager trainer's (loss and
    gradients)."""
    import warnings

    from datasets import Dataset
    from tiny_models import word_tokenizer
    from torch._dynamo.utils import counters
    from trl.experimental.gkd import GKDConfig

    from kdfast.integrations.trl import GKDTrainer

    results = []
    for torch_compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        student, teacher = student_and_teacher(head_scale=4.0)
        args = training_args(tmp_path / str(torch_compile), beta=0.5, lmbda=0.0, max_new_tokens=4, bf16=False,
                             config_cls=GKDConfig, torch_compile=torch_compile,
                             **({"torch_compile_backend": "aot_eager"} if torch_compile else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=word_tokenizer(),
                                 train_dataset=Dataset.from_dict({"messages": [[{"role": "user", "content": "w2"}]]}))
        loss = trainer.compute_loss(trainer.model, dict(token_batch()))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in student.parameters()], counters["stats"]["unique_graphs"]))
    (expected, expected_grads, eager_graphs), (loss, grads, compiled_graphs) = results
    assert eager_graphs == 0 and compiled_graphs >= 1, "the loss ran compiled"
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
