"""Each model's logit scale and softcap in the fused linear forms, applied as the models and TRL apply them (bias,
scale, softcap, temperature), against the float64 reference; and the integrations read every family's scale name
from one place, as TRL's DistillationTrainer reads it."""

import types

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import make_labels
from test_linear_loss import assert_linear_matches_reference, make_heads
from test_linear_sparse_loss import assert_matches_reference as assert_sparse_linear_matches_reference
from test_linear_sparse_loss import make_inputs

import kdfast
from kdfast.integrations.causal_lm import head_settings, logit_scale

CASES = [  # student scale, teacher scale, student cap, teacher cap
    (0.25, 1.0, None, None),
    (1.0, 4.0, None, None),
    (0.5, 2.0, 30.0, 50.0),  # Gemma-2-style pair with different caps
    (1.0, 1.0, 3.0, None),
    (1.7, 0.6, None, 5.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_scale,teacher_scale,student_cap,teacher_cap", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_per_model_scale_and_softcap_match_reference(backend, student_scale, teacher_scale, student_cap, teacher_cap,
                                                     reduction):
    heads = make_heads((2, 9), 16, 24, 131, bias=True, device=device_for(backend))
    labels = make_labels((2, 9), 131, "some", device=device_for(backend))
    assert_linear_matches_reference(heads, labels, backend, divergence="jsd", beta=0.3, temperature=2.0,
                                    ce_weight=0.5, reduction=reduction, chunk_size=5,
                                    student_logit_scale=student_scale, teacher_logit_scale=teacher_scale,
                                    student_softcap=student_cap, teacher_softcap=teacher_cap)


def test_the_scale_multiplies_the_biased_logits_not_the_hidden_states():
    """With a bias, scaling the hidden states (as kdfast once did) gives another loss: the scale is on hW^T + b."""
    heads = make_heads((12,), 8, 8, 37, bias=True)
    scaled = kdfast.linear_distill_loss(**heads, student_logit_scale=3.0, teacher_logit_scale=3.0)
    biased = {**heads, "student_bias": heads["student_bias"] * 3.0, "teacher_bias": heads["teacher_bias"] * 3.0,
              "student_hidden": heads["student_hidden"] * 3.0, "teacher_hidden": heads["teacher_hidden"] * 3.0}
    folded = kdfast.linear_distill_loss(**{**heads, "student_hidden": heads["student_hidden"] * 3.0,
                                           "teacher_hidden": heads["teacher_hidden"] * 3.0})
    torch.testing.assert_close(scaled, kdfast.linear_distill_loss(**biased))
    assert not torch.allclose(scaled, folded)


def test_module_takes_the_per_model_settings():
    heads = make_heads((10,), 8, 12, 41)
    module = kdfast.LinearDistillLoss(student_logit_scale=0.5, teacher_softcap=4.0, temperature=1.5)
    expected = kdfast.linear_distill_loss(**heads, student_logit_scale=0.5, teacher_softcap=4.0, temperature=1.5)
    torch.testing.assert_close(module(**heads), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_linear_scale_and_softcap_match_reference(backend):
    inputs = make_inputs((2, 7), 16, 97, 5, device=device_for(backend))
    labels = make_labels((2, 7), 97, "some", device=device_for(backend))
    assert_sparse_linear_matches_reference(inputs, labels, backend, logit_scale=0.4, softcap=6.0, temperature=2.0,
                                           ce_weight=0.3, chunk_size=4)


@pytest.mark.parametrize("changes,match", [
    (dict(softcap=3.0, student_softcap=2.0), "not both"),
    (dict(teacher_softcap=-1.0), "teacher_softcap must be None or a finite number > 0"),
    (dict(student_logit_scale=float("nan")), "student_logit_scale must be a finite number"),
    (dict(teacher_logit_scale="2"), "teacher_logit_scale must be a finite number"),
])
def test_bad_settings_name_the_argument(changes, match):
    heads = make_heads((4,), 8, 8, 17)
    with pytest.raises(ValueError, match=match):
        kdfast.linear_distill_loss(**heads, **changes)
    with pytest.raises(ValueError, match=match):
        kdfast.LinearDistillLoss(**changes)


def _model(model_type="llama", text_config=None, **config):
    config = types.SimpleNamespace(model_type=model_type, **config)
    if text_config is not None:
        config.get_text_config = lambda: text_config
    return types.SimpleNamespace(config=config)


@pytest.mark.parametrize("config,expected", [
    (dict(), 1.0),
    (dict(logit_scale=None), 1.0),  # MPT: None is unscaled
    (dict(logit_scale=0.0625), 0.0625),  # Cohere
    (dict(logit_scale=0.0), 0.0),  # a real 0.0 is kept, as TRL keeps it
    (dict(output_multiplier=0.3), 0.3),
    (dict(lm_head_multiplier=0.7), 0.7),  # Falcon-H1
    (dict(logits_scaling=8.0), 0.125),  # Granite, MiniCPM3 divide
    (dict(model_type="hyperclovax", logits_scaling=8.0), 8.0),  # HyperCLOVA X multiplies
    (dict(logit_scale=2.0, lm_head_multiplier=5.0, logits_scaling=4.0), 2.0),  # TRL's order of precedence
    (dict(output_multiplier=None, lm_head_multiplier=5.0), 5.0),
])
def test_logit_scale_is_read_as_trl_reads_it(config, expected):
    assert logit_scale(_model(**config)) == expected


def test_a_vlm_is_read_through_its_text_config():
    text = types.SimpleNamespace(model_type="gemma2", logit_scale=0.5, final_logit_softcapping=30.0)
    student, teacher = _model(text_config=text), _model(final_logit_softcapping=50.0)
    assert head_settings(student, teacher) == {"student_softcap": 30.0, "teacher_softcap": 50.0,
                                               "student_logit_scale": 0.5, "teacher_logit_scale": 1.0}
    assert head_settings(student) == {"softcap": 30.0, "logit_scale": 0.5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_a_16_bit_softcap_rounds_once(dtype, scale):
    # The cap of 16-bit logits is taken in float32 and rounded once; the chain rule takes the tanh again in float32.
    # Before, a division, a tanh and a product each rounded to 16 bits (a probability moved by ~1%), and a 16-bit tanh
    # lost 1 - tanh^2 near +-1 to cancellation (Liger's CE cases with a softcap found it).
    from kdfast.logit_maps import LogitMap

    generator = torch.Generator().manual_seed(0)
    gemm_output = (torch.randn(64, 300, generator=generator) * 40).to(dtype)
    grad = torch.randn(64, 300, generator=generator).to(dtype)
    logit_map = LogitMap(scale=scale, softcap=30.0, temperature=1.0)
    z = gemm_output.double() * scale
    tanh = torch.tanh(z / 30.0)
    ulp = torch.finfo(dtype).eps
    for capped in (logit_map.capped_into(gemm_output.clone(), torch.empty_like(gemm_output)),
                   logit_map.apply_(gemm_output.clone())):
        assert capped.dtype == dtype
        torch.testing.assert_close(capped.double(), 30.0 * tanh, rtol=ulp / 2, atol=0.0)
    expected_grad = grad.double() * scale * (1 - tanh ** 2)
    chained = logit_map.chain_(grad.clone(), gemm_output.clone())
    # 1 - tanh^2 in float32 cancels near +-1 down to float32's spacing there (~1e-7 absolute), not 16 bits'.
    torch.testing.assert_close(chained.double(), expected_grad, rtol=ulp / 2, atol=1e-6)
    kept = gemm_output.clone().mul_(scale / 30.0)  # what token_logprobs' GEMM writes (gemm_factor in its alpha)
    capped = logit_map.cap_(kept, torch.empty_like(kept))
    torch.testing.assert_close(capped.double(), 30.0 * torch.tanh(kept.double()), rtol=ulp / 2, atol=0.0)
    torch.testing.assert_close(logit_map.tanh_chain_(grad.clone(), kept).double(),
                               grad.double() * scale * (1 - torch.tanh(kept.double()) ** 2), rtol=ulp / 2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_16_bit_heads_with_a_bias_and_a_scale_round_their_logits_once(backend, dtype, scale):
    # A 16-bit head's logits are F.linear's, scaled and rounded once: the bias and the scale ride in the GEMM's beta
    # and alpha. Before, the product was rounded, then the bias added and rounded, then the scale: a bf16 head with a
    # bias put the loss 3x further from float64 than F.linear's logits (FLA's fused linear CE cases found it).
    device = device_for(backend)
    generator = torch.Generator().manual_seed(3)
    rows, hidden, vocab = 24, 64, 1000

    def head():
        return (torch.randn(vocab, hidden, generator=generator).to(dtype),
                torch.randn(vocab, generator=generator).to(dtype))

    x, x_t = (torch.randn(rows, hidden, generator=generator).to(dtype) for _ in range(2))
    (w, b), (w_t, b_t) = head(), head()
    labels = torch.randint(0, vocab, (rows,), generator=generator)

    def once(x, w, b):  # the float32 product of the 16-bit values, scaled, rounded to the dtype once
        return (torch.nn.functional.linear(x.float(), w.float(), b.float()) * scale).to(dtype)

    def twice(x, w, b):
        return ((((x.float() @ w.float().t()).to(dtype) + b) * scale).to(dtype))

    settings = dict(divergence="forward_kl", temperature=2.0, ce_weight=0.5, reduction="none", backend=backend)
    args = [t.to(device) for t in (x, w, x_t, w_t)]
    fused = kdfast.linear_distill_loss(*args, labels.to(device), student_bias=b.to(device),
                                       teacher_bias=b_t.to(device), student_logit_scale=scale,
                                       teacher_logit_scale=scale, chunk_size=8, **settings).cpu()

    def on_logits(logits):
        return kdfast.distill_loss(logits(x, w, b).to(device), logits(x_t, w_t, b_t).to(device), labels.to(device),
                                   **settings).cpu()

    from_once, from_twice = on_logits(once), on_logits(twice)
    gap = (from_twice - from_once).abs().max().item()
    assert gap > 1e-3  # the two roundings differ at these sizes, so the check below tells them apart
    torch.testing.assert_close(fused, from_once, rtol=0.0, atol=gap / 100)
