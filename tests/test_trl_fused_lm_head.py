"""kdfast.integrations.trl.patch_trl_fused_lm_head: TRL's fused LM head (`add_fused_lm_head`, the forward of its GRPO,
RLOO, DPO, KTO and SFT trainers) on kdfast. KdfastChunkedLogProb against TRL's ChunkedLogProbFunction (outputs and
gradients, a head that learns and a frozen one, every logit post-processing); calls for an output kdfast does not know
go to TRL's; SFT's, DPO's and KTO's metrics equal TRL's; a tiny causal LM's fused forward + backward equals TRL's; two
GRPO steps train; a frozen head takes the two-GEMM path while the entropy gets no gradient, and the patch learns when
it does; SFT, DPO (WPO's weights too) and KTO train with every call on kdfast."""

import warnings

import pytest
import torch
from test_token_logprobs import SETTINGS, make_inputs
from tiny_models import tiny_llama, word_tokenizer

chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob")
trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip("this TRL has no fused LM head (TRL >= 1.16)", allow_module_level=True)

from kdfast.integrations import trl_fused_lm_head  # noqa: E402
from kdfast.integrations.trl import KdfastChunkedLogProb, patch_trl_fused_lm_head  # noqa: E402

TRL_FUNCTION = chunked_logprob.ChunkedLogProbFunction


@pytest.fixture(autouse=True)
def fresh_entropy_guess(monkeypatch):
    """Each test starts where a fresh patch does: no entropy gradient seen (the guess is process-wide)."""
    monkeypatch.setattr(KdfastChunkedLogProb, "entropy_grad", "auto")
    monkeypatch.setattr(KdfastChunkedLogProb, "entropy_grad_seen", False)


@pytest.fixture
def trl_calls(monkeypatch):
    """How many calls the patch handed to TRL's own function."""
    calls = []
    original = trl_fused_lm_head._trl_function
    monkeypatch.setattr(trl_fused_lm_head, "_trl_function", lambda: calls.append(1) or original())
    return calls


@pytest.fixture
def patched():
    patch_trl_fused_lm_head()
    yield
    patch_trl_fused_lm_head(False)


@pytest.fixture
def kdfast_calls(monkeypatch):
    """How many times kdfast's per-token log-probs ran."""
    calls = []
    original = trl_fused_lm_head.linear_token_outputs
    monkeypatch.setattr(trl_fused_lm_head, "linear_token_outputs",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _apply(function, inputs, head_learns, outputs, temperature, softcap, logit_scale, entropy_differentiated=True):
    hidden = inputs["hidden"].clone().requires_grad_(True)
    weight = inputs["weight"].clone().requires_grad_(head_learns)
    bias = inputs["bias"].clone().requires_grad_(head_learns) if inputs["bias"] is not None else None
    results = function.apply(hidden, weight, bias, inputs["token_ids"], temperature, 64, softcap, logit_scale,
                             outputs)
    generator = torch.Generator().manual_seed(3)
    differentiated = results[:2] if entropy_differentiated else results[:1]
    total = sum((r * torch.randn(r.shape, generator=generator)).sum() for r in differentiated if r is not None)
    total.backward()
    return results, [t.grad for t in (hidden, weight, bias) if t is not None and t.requires_grad]


# What each trainer asks its fused head for: TRL's default (DPO's and KTO's reference models), GRPO and RLOO, SFT,
# DPO, DPO with WPO weighting, KTO.
TRAINER_OUTPUTS = [("log_probs",), ("log_probs", "entropy"), ("log_probs", "entropy", "is_top1"),
                   ("log_probs", "entropy", "mean_logits", "is_top1"),
                   ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"),
                   ("log_probs", "entropy", "mean_logits")]


def assert_outputs_equal(ours, theirs):
    assert [r is None for r in ours] == [r is None for r in theirs]
    for mine, trls in zip(ours, theirs):
        if trls is not None and trls.dtype == torch.bool:
            assert mine.dtype == torch.bool and torch.equal(mine, trls)
        elif trls is not None:
            torch.testing.assert_close(mine, trls, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias,logit_scale,softcap,temperature", SETTINGS)
@pytest.mark.parametrize("outputs", TRAINER_OUTPUTS)
@pytest.mark.parametrize("head_learns", [True, False])
def test_equals_trls_function(bias, logit_scale, softcap, temperature, outputs, head_learns, kdfast_calls):
    inputs = make_inputs((40,), 24, 301, bias=bias, seed=2)
    if "is_top1" in outputs:  # every other token the argmax (no map reorders the logits)
        logits = inputs["hidden"].double() @ inputs["weight"].double().T
        logits = logits + inputs["bias"].double() if inputs["bias"] is not None else logits
        inputs["token_ids"][::2] = logits.argmax(-1)[::2]
    settings = (temperature, softcap, logit_scale)
    theirs, their_grads = _apply(TRL_FUNCTION, inputs, head_learns, outputs, *settings)
    ours, our_grads = _apply(KdfastChunkedLogProb, inputs, head_learns, outputs, *settings)
    assert len(kdfast_calls) == 1
    assert_outputs_equal(ours, theirs)
    if "is_top1" in outputs:
        assert int(theirs[4].sum()) >= 20, "half the tokens the argmax: a weak test otherwise"
    assert len(our_grads) == len(their_grads)
    for mine, trls in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, trls, rtol=1e-4, atol=1e-5)


def test_is_top1_on_ties_is_the_first_argmax_as_trls(kdfast_calls):
    """Tokens whose logit ties the row's maximum: only the first of the tied tokens counts as the argmax."""
    inputs = make_inputs((12,), 8, 29, bias=False, seed=6)
    inputs["weight"][20] = inputs["weight"][7]  # tokens 7 and 20: equal logits in every row
    inputs["hidden"] = inputs["weight"][7].expand(12, 8) * 3.0  # ... and the largest ones
    inputs["token_ids"] = torch.tensor([7, 20] * 6)
    theirs, _ = _apply(TRL_FUNCTION, inputs, False, ("log_probs", "is_top1"), 1.0, None, 1.0)
    ours, _ = _apply(KdfastChunkedLogProb, inputs, False, ("log_probs", "is_top1"), 1.0, None, 1.0)
    assert theirs[4].tolist() == [True, False] * 6
    assert_outputs_equal(ours, theirs)
    assert len(kdfast_calls) == 1


def test_an_output_kdfast_does_not_know_goes_to_trls_function(kdfast_calls):
    """A later TRL's output: the call runs TRL's own function."""
    inputs = make_inputs((12,), 8, 29, seed=4)
    outputs = ("log_probs", "entropy", "an_output_of_a_later_trl")
    theirs, _ = _apply(TRL_FUNCTION, inputs, True, outputs, 1.0, None, 1.0)
    ours, _ = _apply(KdfastChunkedLogProb, inputs, True, outputs, 1.0, None, 1.0)
    assert kdfast_calls == []
    for mine, trls in zip(ours, theirs):
        assert (mine is None) == (trls is None)
        if trls is not None:
            torch.testing.assert_close(mine, trls, rtol=0, atol=0)


def _fused_step(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("config", [{}, {"final_logit_softcapping": 2.0}, {"logit_scale": 0.5}])
def test_fused_forward_equals_trls(frozen_head, config, kdfast_calls):
    """The model's own fused forward (TRL's masking, shift, loss and entropy) with kdfast underneath."""
    model = tiny_llama(32, **config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked rows: a nearly uniform head would hide an error in the gradient
    model.lm_head.weight.requires_grad_(not frozen_head)
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 96, (3, 10), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    batch = {"input_ids": input_ids, "labels": labels}
    theirs, their_grads = _fused_step(model, batch)
    patch_trl_fused_lm_head()
    try:
        ours, our_grads = _fused_step(model, batch)
    finally:
        patch_trl_fused_lm_head(False)
    assert len(kdfast_calls) == 1 and trl_utils._ChunkedLogProbFunction is TRL_FUNCTION
    for name in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == their_grads.keys() and ("lm_head.weight" in our_grads) != frozen_head
    for name, grad in our_grads.items():
        error = (grad - their_grads[name]).norm() / their_grads[name].norm().clamp(min=1e-30)
        assert error <= 1e-4, f"{name}.grad: relative L2 error {error:.2e}"


def _completion_length(completions, **_):
    return [float(len(completion)) for completion in completions]


def _grpo_train_two_steps(tmp_path, model, **config):
    import trl
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10", "w11"] * 2})
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, max_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                          save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, bf16=False, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_completion_length, args=args,
                                  processing_class=word_tokenizer(), train_dataset=dataset)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))


def test_grpo_trains_two_steps_on_kdfast(tmp_path, patched, kdfast_calls):
    """TRL's GRPOTrainer as it is (its fused LM head, asked for the log-probs and the entropy) runs on kdfast."""
    _grpo_train_two_steps(tmp_path, tiny_llama(32))
    assert kdfast_calls, "the trainer's log-probs came from kdfast"


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_grpo_with_a_frozen_head(tmp_path, patched, kdfast_calls, backward_chunks_counted, entropy_coef):
    """LoRA's case, the head frozen: without the entropy bonus (GRPO's default) every backward takes d hidden from
    the forward; with it the patch sees the entropy's gradient and recomputes from then on."""
    model = tiny_llama(32)
    model.lm_head.weight.requires_grad_(False)
    _grpo_train_two_steps(tmp_path, model, entropy_coef=entropy_coef)
    assert kdfast_calls, "the trainer's log-probs came from kdfast"
    assert KdfastChunkedLogProb.entropy_grad_seen == (entropy_coef > 0)
    assert (len(backward_chunks_counted) > 0) == (entropy_coef > 0)


def test_unpatch_restores_trls_function():
    patch_trl_fused_lm_head()
    assert trl_utils._ChunkedLogProbFunction is KdfastChunkedLogProb
    patch_trl_fused_lm_head(False)
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION


def _frozen_head_step(inputs, entropy_differentiated):
    """KdfastChunkedLogProb's and TRL's log-probs, entropy and d hidden for a frozen head, GRPO's outputs."""
    outputs, settings = ("log_probs", "entropy"), (0.7, 3.0, 1.0)  # temperature, softcap, logit scale
    theirs, their_grads = _apply(TRL_FUNCTION, inputs, False, outputs, *settings, entropy_differentiated)
    ours, our_grads = _apply(KdfastChunkedLogProb, inputs, False, outputs, *settings, entropy_differentiated)
    for mine, trls in zip([*ours[:2], *our_grads], [*theirs[:2], *their_grads]):
        torch.testing.assert_close(mine, trls, rtol=1e-4, atol=1e-5)


def test_a_frozen_head_learns_whether_the_entropy_gets_a_gradient(backward_chunks_counted):
    """GRPO without its entropy bonus reads the entropy only: d hidden from the forward, no chunk recomputed. The first
    backward that brings the entropy a gradient (the bonus) recomputes, still equal to TRL's, and from then on every
    call recomputes as TRL's does; a new patch starts guessing again."""
    inputs = make_inputs((40,), 24, 301, seed=2)
    _frozen_head_step(inputs, entropy_differentiated=False)
    assert backward_chunks_counted == [] and not KdfastChunkedLogProb.entropy_grad_seen
    _frozen_head_step(inputs, entropy_differentiated=True)
    assert len(backward_chunks_counted) == 1 and KdfastChunkedLogProb.entropy_grad_seen
    _frozen_head_step(inputs, entropy_differentiated=False)
    assert len(backward_chunks_counted) == 2
    patch_trl_fused_lm_head()
    patch_trl_fused_lm_head(False)
    _frozen_head_step(inputs, entropy_differentiated=False)
    assert len(backward_chunks_counted) == 2


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_a_fixed_entropy_guess_is_kept(entropy_grad, backward_chunks_counted):
    """True recomputes from the first call; False keeps the two-GEMM forward even after the entropy got a gradient
    (exact, each such backward recomputing)."""
    inputs = make_inputs((20,), 16, 131, seed=5)
    patch_trl_fused_lm_head(entropy_grad=entropy_grad)
    try:
        for entropy_differentiated in (False, True, False):
            _frozen_head_step(inputs, entropy_differentiated)
    finally:
        patch_trl_fused_lm_head(False)
    assert len(backward_chunks_counted) == (3 if entropy_grad else 1)


def test_a_bad_entropy_guess_is_refused():
    for guess in ("sometimes", 1):
        with pytest.raises(ValueError, match="entropy_grad"):
            patch_trl_fused_lm_head(entropy_grad=guess)
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION


@pytest.mark.parametrize("frozen_head", [False, True])
def test_sft_trains_two_steps_on_kdfast(tmp_path, patched, kdfast_calls, trl_calls, backward_chunks_counted,
                                        frozen_head):
    """TRL's SFTTrainer asks its fused head for the log-probs, the entropy and is_top1 (its token accuracy): all on
    kdfast, the accuracy logged; the entropy is only read, so a frozen head (LoRA's) recomputes no chunk."""
    import trl
    from datasets import Dataset

    model = tiny_llama(32)
    model.lm_head.weight.requires_grad_(not frozen_head)
    dataset = Dataset.from_dict({"text": ["w2 w3 w4 w5", "w6 w7", "w8 w9 w10 w11 w12", "w13 w14 w15"] * 2})
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                         bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, processing_class=word_tokenizer(), train_dataset=dataset)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(0.0 <= entry["mean_token_accuracy"] <= 1.0 for entry in logs)
    assert kdfast_calls and trl_calls == [], "the trainer's log-probs and accuracy came from kdfast alone"
    assert (len(backward_chunks_counted) > 0) != frozen_head
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))


@pytest.mark.parametrize("use_weighting", [False, True])
def test_dpo_trains_two_steps_on_kdfast(tmp_path, patched, kdfast_calls, trl_calls, use_weighting):
    """TRL's DPOTrainer asks its fused head for the log-probs, the entropy, mean_logits and is_top1 (and, with WPO's
    weighting, log_sum_sq_probs); its reference model for the log-probs: every call on kdfast, the metrics logged."""
    import trl
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["w2 w3", "w4 w5 w6", "w7", "w8 w9"] * 2,
                                 "chosen": [" w10 w11", " w12", " w13 w14 w15", " w16"] * 2,
                                 "rejected": [" w17", " w18 w19", " w20", " w21 w22"] * 2})
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                         bf16=False, use_weighting=use_weighting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=tiny_llama(32), ref_model=tiny_llama(32), args=args,
                                 processing_class=word_tokenizer(), train_dataset=dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert all(torch.isfinite(torch.tensor(entry["logits/chosen"])) for entry in logs)
    assert kdfast_calls and trl_calls == [], "the trainer's log-probs and metrics came from kdfast alone"


def test_kto_trains_two_steps_on_kdfast(tmp_path, patched, kdfast_calls, trl_calls):
    """TRL's KTOTrainer asks its fused head for the log-probs, the entropy and mean_logits (of the completions and of
    the mismatched KL pairs), its reference model for the log-probs: every call on kdfast, the metrics logged."""
    import trl
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["w2 w3", "w4 w5 w6", "w7", "w8 w9"] * 2,
                                 "completion": [" w10 w11", " w12", " w13 w14 w15", " w16"] * 2,
                                 "label": [True, False, True, False] * 2})
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                         bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.KTOTrainer(model=tiny_llama(32), ref_model=tiny_llama(32), args=args,
                                 processing_class=word_tokenizer(), train_dataset=dataset)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    logit_metrics = [key for key in logs[0] if key.startswith("logits/")]
    assert logit_metrics and all(torch.isfinite(torch.tensor(entry[key])) for entry in logs for key in logit_metrics)
    assert kdfast_calls and trl_calls == [], "the trainer's log-probs and metrics came from kdfast alone"
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
