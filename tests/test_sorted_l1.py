"""ULD's sorted L1 in the C++ kernel (csrc/cpu/sorted_l1.cpp), which buckets most values by their floats' top bits and
sorts only the buckets where the two sides' ranks meet, held to the definition: both sides sorted decreasingly by a
stable float64 sort, zero-padded, sum_r |a_(r) - b_(r)|, and the subgradient sign(a_(r) - b_(r)) at each a's rank.
The inputs are crafted for each path: ordinary rows, near-identical rows (every bucket crosses), ties, zeros and
values below 2^-64 (bucket 0), values from 2^64 up (the row sorted whole), crossings past the radix sort's size."""

from __future__ import annotations

import pytest
import torch

from kdfast.native_build import load_cpu_extension


def reference(a: torch.Tensor, b: torch.Tensor):
    """(loss [rows] float64, subgradient [rows, N_a]) by the definition."""
    width = max(a.shape[1], b.shape[1])
    a_sorted, order = a.double().sort(dim=1, descending=True, stable=True)
    b_sorted = b.double().sort(dim=1, descending=True).values
    a_padded = torch.nn.functional.pad(a_sorted, (0, width - a.shape[1]))
    b_padded = torch.nn.functional.pad(b_sorted, (0, width - b.shape[1]))
    loss = (a_padded - b_padded).abs().sum(1)
    sign = torch.empty_like(a).scatter_(1, order, torch.sign(a_sorted - b_padded[:, :a.shape[1]]).float())
    return loss, sign


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1).float()


def crafted(case: str, generator: torch.Generator):
    rows, n_a, n_b = 6, 700, 900
    a = probabilities(torch.randn(rows, n_a, generator=generator) * 2)
    b = probabilities(torch.randn(rows, n_b, generator=generator) * 2)
    if case == "near-identical":  # b: a's values permuted, each moved by a few ulps
        b = a[:, torch.randperm(n_a, generator=generator)] * (1 + 1e-6 * torch.randn(rows, n_a, generator=generator))
    elif case == "identical":
        b = a[:, torch.randperm(n_a, generator=generator)].clone()
    elif case == "ties":  # few distinct values on both sides, shared between them
        grid = torch.tensor([0.5, 0.25, 0.125, 1e-3, 1e-3 + 2 ** -20, 0.0])
        a = grid[torch.randint(0, 6, (rows, n_a), generator=generator)]
        b = grid[torch.randint(0, 6, (rows, n_b), generator=generator)]
    elif case == "tiny and zero":  # a wide spread: values below 2^-64 and exact zeros on both sides
        a = probabilities(torch.randn(rows, n_a, generator=generator) * 30)
        b = probabilities(torch.randn(rows, n_b, generator=generator) * 30)
        a[:, ::7] = 0.0
        b[:, ::5] = 0.0
    elif case == "huge":  # not probabilities: the row is sorted whole
        a = a * 2.0 ** 70
        b = b.clone()
        b[:, 0] = float(2 ** 80)
    elif case == "many crossings":  # near-identical and wide: past the size where the crossings go to a radix sort
        a = probabilities(torch.randn(2, 20000, generator=generator))
        b = a[:, torch.randperm(20000, generator=generator)] * (1 + 1e-5 * torch.randn(2, 20000, generator=generator))
    elif case == "single columns":
        a, b = a[:, :1], b[:, :1]
    return a.contiguous(), b.contiguous()


CASES = ["random", "near-identical", "identical", "ties", "tiny and zero", "huge", "many crossings",
         "single columns"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("swap", [False, True], ids=["a narrower", "a wider"])
def test_sorted_l1_equals_the_definition(case, swap):
    generator = torch.Generator().manual_seed(CASES.index(case))
    a, b = crafted(case, generator)
    if swap:
        a, b = b, a
    loss, sign = load_cpu_extension().sorted_l1_rows(a, b)
    expected_loss, expected_sign = reference(a, b)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(sign, expected_sign, rtol=0, atol=0)


def test_sorted_l1_refuses_other_tables():
    ops = load_cpu_extension()
    with pytest.raises(RuntimeError, match=r"sorted_l1_rows takes contiguous float32 \[rows, N\] tables"):
        ops.sorted_l1_rows(torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3))
    with pytest.raises(RuntimeError, match="a and b must have the same rows"):
        ops.sorted_l1_rows(torch.rand(2, 3), torch.rand(3, 3))
