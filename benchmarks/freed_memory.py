"""Timing on the CPU with freed memory kept by the allocator, in a process of its own.

glibc's malloc serves a block above its mmap threshold (32 MiB at most) from fresh pages and hands them back to the OS
on free, so a contender that allocates new [N, V] float32 tensors on every call has the OS fault in and zero every
page of them again on every call: system time, on both cores, that can be most of its time (TRL's chunked kernels at
N=2048, V=32000, 2026-12-05: 1.6-1.8 s of it a call, and 3-10 s under transparent huge pages, where it swings from
call to call with the kernel's compaction; 0-10 ms for kdfast's). That is real time for whoever runs it so, but not
the contender's arithmetic. So the benchmarks that compare against such a contender also time every contender with the
allocator told to keep what is freed (`mallopt`: no mmap for big blocks, no trimming), which takes the page faults out
for all of them alike. A child process (kdfast.fresh_process) runs those rounds: the setting cannot be undone (it also
ends glibc's dynamic threshold), and the benchmarks after it run in the parent's heap as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import statistics
import time
from typing import NamedTuple

from kdfast.fresh_process import run_in_fresh_process
from kdfast.memory import load_target

# mallopt's parameters (malloc.h): -1 as M_TRIM_THRESHOLD's value turns trimming off.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for the process's next allocations (True), or returns False where
    the C library has no mallopt (not glibc): the caller then reports no such timing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


class Timings(NamedTuple):
    """Per method name, the medians over the rounds of a call's wall ms, system CPU ms (all threads) and minor page
    faults. System time is not all page faults: in a virtual machine, threads waiting for work spend some there too
    (2-core Intel VM, 2026-12-05: kdfast's calls 40-64 ms of it a call with no page fault at all)."""

    wall: dict
    system: dict
    faults: dict


def interleaved_medians(methods: dict, repeats: int) -> Timings:
    """Each method's medians (`Timings`), one call of each method per round."""
    samples = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            wall = (time.perf_counter() - start) * 1e3
            after = resource.getrusage(resource.RUSAGE_SELF)
            samples[name].append((wall, (after.ru_stime - before.ru_stime) * 1e3, after.ru_minflt - before.ru_minflt))
    medians = [{name: statistics.median(values[i] for values in samples[name]) for name in methods}
               for i in range(3)]
    return Timings(*medians)


def _time_here(target: str, settings: dict, repeats: int) -> Timings | None:
    methods = load_target(target)(settings)  # builds the inputs here, as the parent built its own
    if not keep_freed_memory():
        return None
    for fn in methods.values():  # the heap grows to its size here (over several calls: the report shows what is left)
        fn()
        fn()
    return interleaved_medians(methods, repeats)


def medians_with_freed_memory_kept(target: str, settings: dict, repeats: int) -> Timings | None:
    """`target(settings)` ('file.py:function' or 'module:function') -> {name: zero-argument call}, timed in a new
    process whose allocator keeps freed memory: its `Timings`, or None where the C library cannot be told so."""
    return run_in_fresh_process(_time_here, target, settings, repeats)
