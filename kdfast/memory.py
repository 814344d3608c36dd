"""Peak memory of one call, beyond what was held before it: the process's resident set on the CPU (its
high-water mark, reset through /proc/self/clear_refs), the caching allocator's peak on CUDA.

On the CPU, glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, so a call whose
buffers fit in memory an earlier call freed would measure as needing nothing. The first measurement
therefore pins the threshold at 1 MiB (blocks at least that large are mapped fresh and unmapped on free)
and every measurement starts by trimming the heap: each call is charged for every large buffer it touches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        return libc
    except (OSError, AttributeError):  # not glibc: measure as is
        return None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device) -> int:
    """Starts a measurement; returns the bytes held now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM, the peak resident set size (Linux)
    return _rss_kib("VmRSS") * 1024


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_kib("VmHWM") * 1024


def extra_peak_bytes(fn, device: torch.device) -> int:
    """Peak memory while fn() runs, beyond what was held before it."""
    base = reset_peak(device)
    fn()
    return max(0, peak_bytes(device) - base)
