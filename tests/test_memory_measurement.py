"""kdfast.memory's CPU measurement charges a step for the blocks it holds live, not for the freed pages the C library's
heap happens to keep (the fused linear loss's memory test once failed on those alone: kdfast/memory.py)."""

from pathlib import Path

import torch

from kdfast.memory import extra_peak_bytes_in_child

MiB = 2**20


def heap_reuse_step():
    """A step whose live peak is 23 MiB, but which leaves the heap a hole it cannot reuse."""
    torch.ones(24 * MiB // 4).sum()  # a mapped block freed: glibc's dynamic mmap threshold rises to its size

    def step():
        first = torch.ones(20 * MiB // 4)  # under that threshold: from the heap
        small = torch.ones(MiB // 4)  # after it on the heap
        del first
        last = torch.ones(22 * MiB // 4)  # larger than the hole the first left
        return small, last

    return step


def test_a_step_is_charged_what_it_holds_live():
    extra = extra_peak_bytes_in_child(f"{Path(__file__)}:heap_reuse_step")
    # 1 + 22 MiB live at most; with the threshold left dynamic the heap kept the first block's pages (43 MiB).
    assert 22 * MiB < extra < 26 * MiB, f"extra peak {extra / MiB:.1f} MiB"
