"""Peak memory of one call, beyond what was held before it: the caching allocator's peak on CUDA, the process's
resident high-water mark on the CPU (reset through /proc/self/clear_refs).

On the CPU, glibc keeps freed blocks for reuse, so a call whose buffers fit in memory an earlier call freed would
measure as needing nothing. Each measurement therefore first trims the heap (malloc_trim hands free pages back;
it changes no setting), so that the call is charged for every page it touches. `extra_peak_bytes_in_child`
measures in a fresh process (kdfast.fresh_process) and leaves the caller's process untouched.

In that child glibc's mmap threshold is pinned (`mallopt`), so that the peak is what the call holds live, as the
caching allocator's peak is on CUDA. Left dynamic, the threshold rises to the size of the largest mapped block freed
(up to 32 MiB), and blocks below it then come from the heap, which keeps up to twice that of freed pages resident: a
call that frees and makes chunk-sized tensors was charged whatever of them the heap happened to keep. The fused linear
loss's step (N=4096, H=256, V=32000, oneDNN's products, whose logits are a new tensor a chunk) measured 90.6-127.8 MiB
in thirty fresh processes, 82.3-82.6 MiB in sixteen with it pinned (one thread or two), and 82.2-82.3 MiB on torch's
BLAS (buffers made once a call) either way (2-core AMD EPYC, 2026-12-07).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import importlib.util
from pathlib import Path

import torch

from .fresh_process import run_in_fresh_process

# <malloc.h>: mallopt's parameter, and the threshold pinned in a measuring child (glibc's default starting value).
M_MMAP_THRESHOLD = -3
PINNED_MMAP_THRESHOLD = 128 * 1024


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # not glibc: measure as is
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
    if libc is not None and hasattr(libc, "malloc_trim"):
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
    """Peak memory while fn() runs, beyond what was held before it, in this process."""
    base = reset_peak(device)
    fn()
    return max(0, peak_bytes(device) - base)


def load_target(target: str):
    """'package.module:function' or '/path/to/file.py:function' -> the function."""
    where, name = target.rsplit(":", 1)
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _charge_blocks_while_live():
    """Pins glibc's mmap threshold in this (measuring) process: blocks from 128 KiB up are mapped when made and unmapped
    when freed, so they count while they live, not while the heap keeps them."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD)


def _measure_here(target: str, args: tuple, device_type: str, warmup: int) -> int:
    _charge_blocks_while_live()
    step = load_target(target)(*args)  # builds the inputs and returns the step to measure
    for _ in range(warmup):  # kernel loading and first-call set-up are not the step's memory
        step()
    return extra_peak_bytes(step, torch.device(device_type))


def extra_peak_bytes_in_child(target: str, *args, device: str = "cpu", warmup: int = 1) -> int:
    """The extra peak memory of a step measured in a fresh process (kdfast.fresh_process; its mmap threshold pinned,
    as the module says): `target(*args)` ('module:function' or 'file.py:function') builds the inputs there and returns
    a zero-argument step; after `warmup` calls, one call is measured."""
    return run_in_fresh_process(_measure_here, target, args, device, warmup)
