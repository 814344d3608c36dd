"""Every backend against the float64 reference: divergences x temperatures x dtypes x vocab sizes x
reductions x ignore patterns, with gradients."""

import itertools

import pytest
import torch
from conftest import BACKENDS, device_for
from helpers import assert_matches_reference, make_labels, make_logits

import kdfast

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TEMPERATURES = [1.0, 2.0, 0.7]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE_PATTERNS = ["none", "some", "all"]


def _grid():
    """backend x divergence x dtype x vocab, cycling temperature, reduction and ignore pattern through the
    cases so that each value of those meets every backend and divergence."""
    cases = []
    for index, (backend, divergence, dtype, vocab) in enumerate(
            itertools.product(BACKENDS, DIVERGENCES, DTYPES, [1, 7, 4099])):
        cases.append(pytest.param(backend, divergence, dtype, vocab, TEMPERATURES[index % 3],
                                  REDUCTIONS[(index // 3) % 3], IGNORE_PATTERNS[(index // 9) % 3],
                                  id=f"{backend}-{divergence}-{str(dtype)[6:]}-V{vocab}-{index}"))
    return cases


@pytest.mark.parametrize("backend,divergence,dtype,vocab,temperature,reduction,ignore", _grid())
def test_matches_reference(backend, divergence, dtype, vocab, temperature, reduction, ignore):
    device = device_for(backend)
    student, teacher = make_logits((2, 3, vocab), dtype, device=device)
    labels = make_labels((2, 3), vocab, ignore, device=device)
    assert_matches_reference(student, teacher, labels, backend, divergence=divergence, temperature=temperature,
                             reduction=reduction, ce_weight=0.5, beta=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", IGNORE_PATTERNS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_reductions_ignore_temperatures(backend, reduction, ignore, temperature):
    device = device_for(backend)
    student, teacher = make_logits((5, 33), torch.float32, device=device)
    labels = make_labels((5,), 33, ignore, device=device)
    assert_matches_reference(student, teacher, labels, backend, divergence="jsd", temperature=temperature,
                             reduction=reduction, ce_weight=0.25, kd_weight=0.75)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_vocab(backend, divergence):
    """> 128k entries: many vocab blocks per row, a ragged last block."""
    device = device_for(backend)
    student, teacher = make_logits((2, 131_203), torch.bfloat16, device=device)
    labels = make_labels((2,), 131_203, "none", device=device)
    assert_matches_reference(student, teacher, labels, backend, divergence=divergence, temperature=2.0,
                             ce_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_edges(backend, divergence, beta):
    device = device_for(backend)
    student, teacher = make_logits((4, 50), torch.float32, device=device)
    if divergence.startswith("skew") and beta == 1.0:  # the mixture is the compared distribution: a loss of 0
        with pytest.raises(ValueError, match="beta must be below 1"):
            kdfast.distill_loss(student, teacher, divergence=divergence, beta=beta, backend=backend)
        return
    assert_matches_reference(student, teacher, None, backend, divergence=divergence, beta=beta, temperature=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_without_labels_and_t2_scale(backend):
    device = device_for(backend)
    student, teacher = make_logits((6, 40), torch.float32, device=device)
    assert_matches_reference(student, teacher, None, backend, kd_weight=0.3, t2_scale=False, temperature=3.0)
    labels = make_labels((6,), 40, "some", device=device)
    assert_matches_reference(student, teacher, labels, backend, kd_weight=0.0, ce_weight=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch(backend):
    device = device_for(backend)
    student, teacher = make_logits((2, 4, 20), torch.float32, device=device)
    labels = make_labels((2, 4), 20, "some", device=device)
    assert_matches_reference(student, teacher, labels, backend, ce_weight=1.0, num_items_in_batch=11)
    assert_matches_reference(student, teacher, labels, backend, ce_weight=1.0,
                             num_items_in_batch=torch.tensor(11, device=device))
