"""kdfast's TRL `DistillationTrainer` with several teacher models: two copies of one teacher give the single teacher's
loss, entropy and gradients; two different teachers (of different hidden sizes, one softcapped) give the float64
mixture (or average) of their full logits over the completion tokens; each teacher's divergence is logged; training
runs."""

import copy
import warnings

import pytest
import torch
from test_trl_distillation import _completion_batch, _config
from tiny_models import skip_head_check, student_and_teacher, tiny_llama, word_tokenizer

from kdfast.integrations.trl import DistillationTrainer
from kdfast.reference import multi_teacher_distill_loss_reference


def _trainer(tmp_path, student, teachers, **settings):
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10", "w11"] * 2})
    config = {key: settings.pop(key) for key in ("beta", "temperature", "max_steps", "learning_rate",
                                                 "teacher_model_init_kwargs")
              if key in settings}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DistillationTrainer(model=student, teacher_model=teachers, args=_config(tmp_path, **config),
                                   processing_class=word_tokenizer(), train_dataset=dataset, **settings)


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), trainer._metrics["train"]["entropy"][-1], \
        {name: p.grad for name, p in trainer.model.named_parameters()}


def test_two_copies_of_one_teacher_are_that_teacher(tmp_path):
    student, teacher = student_and_teacher(head_scale=30.0)
    batch = _completion_batch()
    single = _loss_and_grads(_trainer(tmp_path, copy.deepcopy(student), copy.deepcopy(teacher), beta=0.5), batch)
    several = _loss_and_grads(_trainer(tmp_path, copy.deepcopy(student),
                                       [copy.deepcopy(teacher), copy.deepcopy(teacher)], beta=0.5), batch)
    torch.testing.assert_close(several[0], single[0], rtol=1e-5, atol=1e-6)
    assert several[1] == pytest.approx(single[1], rel=1e-5)
    for name, grad in several[2].items():
        torch.testing.assert_close(grad, single[2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("combine, weights", [("mixture", [1.0, 3.0]), ("average", None), ("mixture", "confidence"),
                                             ("average", "min_ce")])
def test_two_teachers_equal_the_float64_reference(tmp_path, combine, weights):
    """The label modes weigh each teacher by its probability of the completion's token (the policy's sample)."""
    student = student_and_teacher(head_scale=30.0)[0]
    teachers = [student_and_teacher(head_scale=30.0)[1], tiny_llama(48, seed=2, final_logit_softcapping=5.0)]
    batch = _completion_batch()
    trainer = _trainer(tmp_path, student, teachers, beta=0.3, temperature=2.0, teacher_weights=weights,
                       teacher_combine=combine)
    loss = trainer.compute_loss(trainer.model, batch)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].shape[1]

    def logits64(model):  # the positions that predict the completion tokens, as the trainer takes them
        model = copy.deepcopy(model).double()
        with torch.no_grad():
            hidden = trainer._get_last_hidden_state(model, input_ids, attention_mask, keep)
            return model.lm_head(hidden) if getattr(model.config, "final_logit_softcapping", None) is None else \
                torch.tanh(model.lm_head(hidden) / 5.0) * 5.0

    mask = batch["completion_mask"].bool()
    expected = multi_teacher_distill_loss_reference(
        logits64(student)[mask], [logits64(t)[mask] for t in teachers],
        batch["completion_ids"][mask] if isinstance(weights, str) else None, weights=weights, combine=combine,
        divergence="jsd", beta=0.3, temperature=2.0, t2_scale=False, reduction="sum") / batch["num_items_in_batch"]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    trainer.log({"loss": loss.item()})  # the window's metrics land at the log
    logged = {key for key in trainer.state.log_history[-1] if key.startswith("divergence/teacher_")}
    assert logged == {"divergence/teacher_0", "divergence/teacher_1"}


def test_trains_with_two_teachers_and_refuses_what_one_teacher_cannot_take(tmp_path):
    student, teacher = student_and_teacher()
    trainer = _trainer(tmp_path, student, [teacher, tiny_llama(48, seed=3)], max_steps=2, learning_rate=1e-3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("divergence/teacher_1" in entry for entry in logs)
    with pytest.raises(ValueError, match="teacher_weights and teacher_combine weigh several teachers"):
        _trainer(tmp_path, student, teacher, teacher_weights=[1.0])
    with pytest.raises(ValueError, match=r"teacher_model as a list or dict takes causal LMs \(models with "
                                         r"get_output_embeddings\(\)\) or their paths"):
        _trainer(tmp_path, student, [teacher, torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"teacher_weights must hold 2 numbers \(one per teacher\)"):
        _trainer(tmp_path, student, [teacher, tiny_llama(48, seed=3)], teacher_weights=[1.0, 2.0, 3.0])


def _forward_rows(model):
    """The batch sizes of the model's forwards, recorded by a hook on its decoder (after the first batch's check of
    its own logits, which runs it on a few tokens)."""
    skip_head_check(model)
    sizes = []
    model.model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    return sizes


@pytest.mark.parametrize("route", [[1, 0, 1], [0, 0, 0]])
def test_a_teacher_id_column_routes_each_sequence_to_its_teacher(tmp_path, route):
    student = student_and_teacher(head_scale=30.0)[0]
    teachers = {"short": student_and_teacher(head_scale=30.0)[1], "long": tiny_llama(48, seed=2,
                                                                                     final_logit_softcapping=5.0)}
    trainer = _trainer(tmp_path, student, teachers, beta=0.3, temperature=2.0)
    sizes = {name: _forward_rows(model) for name, model in teachers.items()}
    batch = {**_completion_batch(), "teacher_id": torch.tensor(route)}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert sizes == {"short": [route.count(0)] if 0 in route else [], "long": [route.count(1)] if 1 in route else []}
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)

    def logits64(model):
        model = copy.deepcopy(model).double()
        with torch.no_grad():
            hidden = trainer._get_last_hidden_state(model, input_ids, attention_mask, batch["completion_ids"].shape[1])
            return model.lm_head(hidden) if getattr(model.config, "final_logit_softcapping", None) is None else \
                torch.tanh(model.lm_head(hidden) / 5.0) * 5.0

    mask = batch["completion_mask"].bool()
    one_hot = torch.nn.functional.one_hot(torch.tensor(route), 2)[:, None, :].expand(*mask.shape, 2)[mask].double()
    expected = multi_teacher_distill_loss_reference(
        logits64(student)[mask], [logits64(t)[mask] for t in teachers.values()], weights=one_hot, divergence="jsd",
        beta=0.3, temperature=2.0, t2_scale=False, reduction="sum") / batch["num_items_in_batch"]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    trainer.log({"loss": loss.item()})  # the window's metrics land at the log
    metrics = trainer.state.log_history[-1]
    shares = [metrics[f"tokens/teacher_{name}"] for name in teachers]
    assert shares == pytest.approx([float((mask * (torch.tensor(route) == index)[:, None]).sum() / mask.sum())
                                    for index in range(2)])
    # A teacher that scored no token has no divergence per token: left out of the log, as TRL leaves it.
    assert {f"divergence/teacher_{name}" for name in teachers} & set(metrics) == \
        {f"divergence/teacher_{name}" for index, name in enumerate(teachers) if index in route}


def test_routed_training_carries_the_column_through_generation(tmp_path):
    from datasets import Dataset

    student, teacher = student_and_teacher()
    teachers = {"a": teacher, "b": tiny_llama(48, seed=3)}
    trainer = _trainer(tmp_path, student, teachers, max_steps=2, learning_rate=1e-3)
    # One batch of 4 per step: both teachers in each.
    trainer.train_dataset = Dataset.from_dict({"prompt": ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10", "w11"],
                                               "teacher_id": ["a", "b", "b", "a"]})
    sizes = {name: _forward_rows(model) for name, model in teachers.items()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all({"tokens/teacher_a", "divergence/teacher_b"} <= set(entry) for entry in logs)
    assert sizes == {"a": [2, 2], "b": [2, 2]}  # each teacher its own prompts, never the batch
    trainer.train_dataset = Dataset.from_dict({"prompt": ["w2 w3"] * 4, "teacher_id": ["a", "c", "a", "b"]})
    trainer.args.max_steps = 3
    with pytest.raises(ValueError, match=r"teacher_id column must name one of the teachers \['a', 'b'\] \(or be its "
                                         r"position, 0..1\), got 'c'"):
        trainer.train()


def test_the_routed_loss_function_takes_every_sequence_or_its_own():
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[2, 3:] = 0
    student, weight = torch.randn(4, 5, 16, generator=generator), torch.randn(40, 16, generator=generator)
    hidden = [torch.randn(4, 5, size, generator=generator) for size in (16, 8)]
    heads = [torch.randn(40, size, generator=generator) for size in (16, 8)]
    route = torch.tensor([1, 0, 1, 1])
    from kdfast.integrations.trl_distillation import chunked_multi_teacher_divergence_loss as loss_of

    every = loss_of(student, hidden, weight, heads, mask, 0.5, teacher_index=route)
    own = loss_of(student, [rows[route == index] for index, rows in enumerate(hidden)], weight, heads, mask, 0.5,
                  teacher_index=route)
    one_hot = loss_of(student, hidden, weight, heads, mask, 0.5,
                      weights=torch.nn.functional.one_hot(route, 2)[:, None, :].expand(4, 5, 2).float())
    for got in (every, own):
        torch.testing.assert_close(got[0], one_hot[0])
        torch.testing.assert_close(got[1], one_hot[1])
        assert got[2] == one_hot[2]
    torch.testing.assert_close(every[3].sum(), every[0] * mask.sum())  # the teachers' shares add up to the loss
    with pytest.raises(ValueError, match=r"teacher_hidden_states\[0\] holds 2 sequences: it must hold every sequence "
                                         r"\(4\) or only the 1 routed to teacher 0"):
        loss_of(student, [hidden[0][:2], hidden[1]], weight, heads, mask, 0.5, teacher_index=route)
    with pytest.raises(ValueError, match="teacher_index routes each sequence to one teacher: pass weights=None"):
        loss_of(student, hidden, weight, heads, mask, 0.5, teacher_index=route, weights=[1.0, 1.0])


def test_teachers_given_by_path_are_loaded_as_trl_loads_its_own(tmp_path):
    """A dict of checkpoint paths, TRL's newer multi-teacher form: each loaded (the first by TRL, the others by kdfast
    with TRL's `teacher_model_init_kwargs`) and the loss that of the same models passed loaded."""
    student = student_and_teacher(head_scale=30.0)[0]
    models = {"short": student_and_teacher(head_scale=30.0)[1], "long": tiny_llama(48, seed=2)}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    batch = _completion_batch()
    by_path = _trainer(tmp_path, copy.deepcopy(student), {name: str(tmp_path / name) for name in models},
                       teacher_model_init_kwargs={"dtype": "float32"})
    loaded = _trainer(tmp_path, copy.deepcopy(student), models)
    assert [type(model).__name__ for model in by_path.teacher_models] == ["LlamaForCausalLM"] * 2
    assert by_path.teacher_models[1].config.hidden_size == 48
    torch.testing.assert_close(by_path.compute_loss(by_path.model, batch), loaded.compute_loss(loaded.model, batch))


def test_teacher_weights_by_name_follow_the_teachers_order(tmp_path):
    student, teacher = student_and_teacher()
    teachers = {"short": teacher, "long": tiny_llama(48, seed=2)}
    trainer = _trainer(tmp_path, student, teachers, teacher_weights={"long": 3.0, "short": 1.0})
    assert trainer.teacher_names == ["short", "long"] and trainer.teacher_weights == [1.0, 3.0]
    with pytest.raises(ValueError, match=r"must name every teacher \['short', 'long'\] once: missing \['long'\]"):
        _trainer(tmp_path, student, teachers, teacher_weights={"short": 1.0})
