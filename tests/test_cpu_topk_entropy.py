"""EAFT's factor on the CPU (csrc/cpu/topk_entropy.h): the entropy of the softmax over each row's k largest logits in
one pass without a sort, against float64 torch.topk's, on random rows, ties, a rising row (every value inserted), k
of 1 and of the whole row, -inf logits, rows narrower than a vector, and a padded vocabulary's strided rows; and
kdfast.EAFT's factor the same through the extension as through torch's ops."""

import pytest
import torch

import kdfast
from kdfast import token_scaling
from kdfast.native_build import load_cpu_extension


@pytest.fixture(scope="module")
def ops():
    load_cpu_extension()
    return torch.ops.kdfast_cpu


def topk_entropy_reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.double().topk(k, dim=-1).values, dim=-1)
    return -(log_probs.exp() * torch.where(log_probs == -torch.inf, 0.0, log_probs)).sum(-1)


def _rows():
    gen = torch.Generator().manual_seed(0)
    random = torch.randn(37, 1003, generator=gen) * 3
    ties = torch.randint(0, 4, (5, 300), generator=gen).float()
    rising = torch.arange(2000.0).div(100.0)[None].repeat(2, 1)
    masked = torch.randn(4, 500, generator=gen)
    masked[:, ::3] = -torch.inf
    return {"random": random, "ties": ties, "rising": rising, "masked": masked, "narrow": random[:, :5]}


@pytest.mark.parametrize("name", ["random", "ties", "rising", "masked", "narrow"])
@pytest.mark.parametrize("k", [1, 5, 20, 64])
def test_topk_entropy_matches_torch_topk(ops, name, k):
    logits = _rows()[name]
    k = min(k, logits.shape[-1])
    found = ops.topk_entropy(logits, k)
    torch.testing.assert_close(found.double(), topk_entropy_reference(logits, k), atol=2e-6, rtol=1e-6)


def test_topk_entropy_of_the_whole_row_and_of_strided_rows(ops):
    logits = torch.randn(6, 40) * 2
    torch.testing.assert_close(ops.topk_entropy(logits, 40).double(), topk_entropy_reference(logits, 40), atol=2e-6,
                               rtol=1e-6)
    padded = torch.randn(6, 50)
    view = padded[:, :43]  # a padded vocabulary's first columns: rows apart by 50
    torch.testing.assert_close(ops.topk_entropy(view, 20).double(), topk_entropy_reference(view, 20), atol=2e-6,
                               rtol=1e-6)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.topk_entropy(padded.t(), 3)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_entropy(logits, 41)


def test_eaft_factor_through_the_extension_equals_torchs(ops, monkeypatch):
    logits = torch.randn(64, 3001) * 4
    eaft = kdfast.EAFT(alpha=0.7, top_k=20)
    native = eaft.of_logits(logits)
    monkeypatch.setattr(token_scaling, "loaded_cpu_ops_for", lambda *tensors, **kwargs: None)
    torch.testing.assert_close(native, eaft.of_logits(logits), atol=1e-6, rtol=1e-5)
