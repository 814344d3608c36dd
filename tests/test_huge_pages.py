"""Fresh CPU gradients ask for transparent huge pages (kdfast/huge_pages.py): the advice covers exactly the whole
2 MiB pages inside a large contiguous buffer and nothing else, and where this machine's kernel hands huge pages out on
request, the gradient a loss returns lies in them."""

import re

import pytest
import torch

import kdfast
from kdfast import huge_pages
from kdfast.huge_pages import HUGE_PAGE_BYTES, MADV_HUGEPAGE, SMALLEST_ADVISED_BYTES


@pytest.fixture
def advice(monkeypatch):
    """The (start, length, advice) of every madvise call."""
    calls = []
    monkeypatch.setattr(huge_pages, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    return calls


def test_the_advice_covers_the_whole_huge_pages_inside_the_buffer(advice):
    buffer = torch.empty(SMALLEST_ADVISED_BYTES // 4 + 12345)
    huge_pages.advise_huge_pages(buffer)
    ((start, length, kind),) = advice
    begin, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * 4
    assert kind == MADV_HUGEPAGE
    assert start % HUGE_PAGE_BYTES == 0 and length % HUGE_PAGE_BYTES == 0 and length > 0
    assert begin <= start < begin + HUGE_PAGE_BYTES  # the first whole page inside, and no byte outside
    assert start + length <= end < start + length + HUGE_PAGE_BYTES


def test_small_strided_and_empty_buffers_take_no_advice(advice):
    huge_pages.advise_huge_pages(torch.empty(SMALLEST_ADVISED_BYTES // 4 - 1))
    huge_pages.advise_huge_pages(torch.empty(4096, SMALLEST_ADVISED_BYTES // 4096 // 4 * 2)[:, ::2])
    huge_pages.advise_huge_pages(torch.empty(0))
    assert advice == []
    grad = huge_pages.empty_gradient(torch.empty(2, 3, 5).transpose(0, 2))
    assert grad.shape == (5, 3, 2) and grad.is_contiguous()


def _huge_kib_in(begin: int, end: int) -> int:
    """AnonHugePages of the mappings that overlap [begin, end) (/proc/self/smaps: the advice splits a mapping where
    it starts)."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                overlaps = int(span.group(1), 16) < end and begin < int(span.group(2), 16)
            elif overlaps and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(huge_pages._madvise() is None,
                    reason="this kernel hands out no transparent huge pages on request (THP mode not [madvise])")
def test_a_fresh_gradient_lies_in_huge_pages():
    rows, vocab = 2048, 8192  # 64 MiB
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(rows, vocab, generator=generator)).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=generator)
    (grad,) = torch.autograd.grad(kdfast.distill_loss(student, teacher, backend="cpu"), student)
    whole_pages_kib = (rows * vocab * 4 // HUGE_PAGE_BYTES - 1) * HUGE_PAGE_BYTES // 1024
    assert _huge_kib_in(grad.data_ptr(), grad.data_ptr() + rows * vocab * 4) >= whole_pages_kib


def test_kdfast_huge_pages_0_asks_for_none(monkeypatch):
    monkeypatch.setenv("KDFAST_HUGE_PAGES", "0")
    huge_pages._madvise.cache_clear()
    try:
        assert huge_pages._madvise() is None
    finally:
        monkeypatch.delenv("KDFAST_HUGE_PAGES")
        huge_pages._madvise.cache_clear()
