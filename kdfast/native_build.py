"""JIT build of the native kernels in csrc/ (ninja through torch.utils.cpp_extension), cached per machine.

Nothing compiles at `pip install`; the first CPU call (or `kdfast build`) compiles once and later
processes load the cached library. The CPU kernel is compiled for the SIMD level torch reports for this
machine, and that level is part of the build's name, so a cache copied to an older CPU rebuilds instead
of crashing on an illegal instruction.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Flags that make GCC emit the vector width torch itself uses on this CPU (our exp/log are written to be
# auto-vectorised; without these they silently stay SSE2).
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


class NativeBuildError(RuntimeError):
    """The native extension could not be compiled or loaded on this machine."""


def cpu_capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _SIMD_FLAGS else "DEFAULT"


def _build_directory(name: str) -> str:
    root = os.environ.get("KDFAST_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kdfast", f"torch{torch.__version__.split('+')[0]}")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


@functools.cache
def load_cpu_extension():
    """Builds (first time) and loads the CPU kernel; registers torch.ops.kdfast_cpu. Raises NativeBuildError."""
    from torch.utils import cpp_extension

    capability = cpu_capability()
    name = f"kdfast_cpu_{capability.lower()}"
    sources = [str(CSRC / "cpu" / "distill_kernel.cpp"), str(CSRC / "cpu" / "bindings.cpp")]
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; without it, one thread.
    flags = ["-O3", "-fopenmp", "-std=c++17", *_SIMD_FLAGS.get(capability, [])]
    try:
        cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           is_python_module=False,
                           build_directory=_build_directory(name),
                           verbose=os.environ.get("KDFAST_VERBOSE_BUILD") == "1")
    except Exception as error:  # compiler missing, headers missing, ninja missing, link error...
        raise NativeBuildError(f"building the kdfast CPU kernel ({name}) failed: {error}") from error
    return torch.ops.kdfast_cpu


@functools.cache
def cpu_extension_or_none():
    """The CPU kernel if it builds; otherwise None, after one warning naming the fallback."""
    try:
        return load_cpu_extension()
    except NativeBuildError as error:
        warnings.warn(f"{error}\nkdfast falls back to the pure-PyTorch backend on CPU tensors.",
                      RuntimeWarning, stacklevel=3)
        return None
