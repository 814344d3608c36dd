"""kdfast's ServerDistillationTrainer against TRL's own on the same inputs and the same top-k answer from a (stubbed)
teacher server: equal loss and gradients where kdfast computes it (every beta with the tail bucket), TRL's own loss
elsewhere."""

import copy
import warnings

import pytest
import torch
from tiny_models import student_and_teacher, word_tokenizer

pytest.importorskip("trl.experimental.server_distillation")


class StubClient:
    """Stands in for TRL's VLLMClient: the tests answer the teacher's log-probs themselves."""

    def __init__(self, *args, **kwargs):
        pass


@pytest.fixture
def trainers(tmp_path, monkeypatch):
    import trl.generation.vllm_client

    monkeypatch.setattr(trl.generation.vllm_client, "VLLMClient", StubClient)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.server_distillation import ServerDistillationConfig
        from trl.experimental.server_distillation import ServerDistillationTrainer as TRLTrainer

        from kdfast.integrations.trl_server import ServerDistillationTrainer

    def make(cls, student, **settings):
        args = ServerDistillationConfig(output_dir=str(tmp_path), teacher_model_server_url="http://stub", report_to=[],
                                        use_cpu=True, per_device_train_batch_size=2, bf16=False,
                                        **{"beta": 0.0, "loss_top_k": 4, "temperature": 2.0, **settings})
        trainer = cls(model=student, args=args, processing_class=word_tokenizer())
        trainer.current_gradient_accumulation_steps = 2
        return trainer

    return lambda student, **settings: (make(TRLTrainer, copy.deepcopy(student), **settings),
                                        make(ServerDistillationTrainer, student, **settings))


def server_answer(teacher, inputs, k, temperature):
    """What TRL's server call returns: the teacher's top-k log-probs and its log-prob of the completion's own token at
    each completion token, -inf at padding."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[:, inputs["prompt_ids"].shape[1] - 1:-1]
    logprobs = torch.log_softmax(logits / temperature, -1)
    values, token_ids = logprobs.topk(k, -1)
    actual = logprobs.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    padding = inputs["completion_mask"] == 0
    values = values.masked_fill(padding[..., None], float("-inf"))
    return {"topk_logprobs": values, "topk_token_ids": token_ids.masked_fill(padding[..., None], 0),
            "actual_logprobs": actual.masked_fill(padding, float("-inf"))}


def make_inputs(teacher=None, temperature=2.0):
    """Two completions, the second padded. With a teacher, some completion tokens are its top-1 (the support's two
    ids one column at beta > 0), as a sampled completion often is."""
    generator = torch.Generator().manual_seed(0)
    completion_mask = torch.ones(2, 6, dtype=torch.int64)
    completion_mask[1, 4:] = 0
    inputs = {"prompt_ids": torch.randint(2, 96, (2, 3), generator=generator),
              "prompt_mask": torch.ones(2, 3, dtype=torch.int64),
              "completion_ids": torch.randint(2, 96, (2, 6), generator=generator), "completion_mask": completion_mask}
    for position in range(0, 6, 2) if teacher is not None else ():
        # Left to right: each choice changes the teacher's later answers.
        top1 = server_answer(teacher, inputs, 1, temperature)["topk_token_ids"][..., 0]
        inputs["completion_ids"][:, position] = top1[:, position]
    return inputs


@pytest.mark.parametrize(("beta", "add_tail"), [(0.0, True), (0.0, False), (0.5, True), (1.0, True),
                                                (0.5, False)])
def test_matches_trls_loss_and_gradients(trainers, beta, add_tail):
    student, teacher = student_and_teacher(head_scale=4.0)
    top_k = 4 if beta == 0 else 1  # TRL's config allows the top-1 alone with beta > 0
    theirs, ours = trainers(student, beta=beta, loss_top_k=top_k, loss_add_tail=add_tail)
    inputs = make_inputs(teacher)
    answer = server_answer(teacher, inputs, top_k, 2.0)
    assert int((answer["topk_token_ids"][..., 0] == inputs["completion_ids"]).sum()) >= 5
    for trainer in (theirs, ours):
        trainer._get_teacher_token_logprobs_from_server = lambda *args, **kwargs: answer
    head_calls = []
    ours.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    their_loss = theirs.compute_loss(theirs.model, inputs)
    our_loss = ours.compute_loss(ours.model, inputs)
    assert bool(head_calls) != add_tail, "with the tail bucket kdfast's fused loss runs, never the LM head's forward"
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
    their_loss.backward()
    our_loss.backward()
    for (name, mine), theirs_param in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(mine.grad, theirs_param.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_refuses_missing_teacher_logprobs_as_trl_does(trainers, beta):
    student, teacher = student_and_teacher()
    theirs, ours = trainers(student, beta=beta, loss_top_k=1)
    inputs = make_inputs()
    answer = server_answer(teacher, inputs, 1, 2.0)
    answer["actual_logprobs"][0, 2] = float("-inf")
    for trainer in (theirs, ours):
        trainer._get_teacher_token_logprobs_from_server = lambda *args, **kwargs: answer
        with pytest.raises(ValueError, match="missing actual-token logprobs for required reverse-KL positions: 1/10"):
            trainer.compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_compiled_loss_equals_eager(trainers, beta):
    """Under torch_compile kdfast's fused loss (the decoder and the loss, once the server has answered) is compiled
    with the Trainer's backend: loss and gradients equal the eager trainer's."""
    from torch._dynamo.utils import counters

    student, teacher = student_and_teacher(head_scale=4.0)
    top_k = 4 if beta == 0 else 1
    inputs = make_inputs(teacher)
    answer = server_answer(teacher, inputs, top_k, 2.0)
    results = []
    for torch_compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        settings = dict(beta=beta, loss_top_k=top_k, torch_compile=torch_compile,
                        **({"torch_compile_backend": "aot_eager"} if torch_compile else {}))
        _, ours = trainers(copy.deepcopy(student), **settings)
        ours._get_teacher_token_logprobs_from_server = lambda *args, **kwargs: answer
        loss = ours.compute_loss(ours.model, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in ours.model.parameters()], counters["stats"]["unique_graphs"]))
    (expected, expected_grads, eager_graphs), (loss, grads, compiled_graphs) = results
    assert eager_graphs == 0 and compiled_graphs >= 1, "the loss ran compiled"
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
