"""JIT build of the native kernels in csrc/ (ninja through torch.utils.cpp_extension), cached per machine.

Nothing compiles at `pip install`; the first call (or `kdfast build`) compiles once and later processes
load the cached library. The CPU kernel is compiled for the SIMD level torch reports for this machine and
the CUDA kernels for the GPU architectures in use (or KDFAST_CUDA_ARCHS); either is part of the build's
name, so a cache copied to another machine rebuilds instead of crashing on an illegal instruction.
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


CUDA_SOURCES = ("distill_launch.cu", "distill_rows_bf16.cu", "distill_rows_fp16.cu", "distill_rows_fp32.cu",
                "bindings.cpp")


def cuda_archs() -> list[str]:
    """Targets such as ['90', '80'] from KDFAST_CUDA_ARCHS ('9.0;8.0', '90 80', 'sm_90'), else the visible
    devices' own."""
    requested = os.environ.get("KDFAST_CUDA_ARCHS", "").replace(";", " ").replace(",", " ").split()
    if requested:
        return sorted({arch.lower().removeprefix("sm_").replace(".", "") for arch in requested})
    capabilities = {torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())}
    return sorted(f"{major}{minor}" for major, minor in capabilities)


@functools.cache
def load_cuda_extension():
    """Builds (first time) and loads the CUDA kernels; registers torch.ops.kdfast_cuda. Raises NativeBuildError."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise NativeBuildError("this torch build has no CUDA support, so the kdfast CUDA kernels cannot be built")
    archs = cuda_archs()
    if not archs:
        raise NativeBuildError("no CUDA device is visible and KDFAST_CUDA_ARCHS is not set")
    name = "kdfast_cuda_sm" + "_".join(archs)
    # Naming the targets ourselves stops cpp_extension from adding its own (TORCH_CUDA_ARCH_LIST).
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    try:
        cpp_extension.load(name=name, sources=[str(CSRC / "cuda" / source) for source in CUDA_SOURCES],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo", *gencode],
                           is_python_module=False, build_directory=_build_directory(name),
                           verbose=os.environ.get("KDFAST_VERBOSE_BUILD") == "1")
    except Exception as error:  # nvcc missing, headers missing, ninja missing, link error...
        raise NativeBuildError(f"building the kdfast CUDA kernels ({name}) failed: {error}") from error
    return torch.ops.kdfast_cuda


@functools.cache
def cuda_extension_or_none():
    """The CUDA kernels if they build; otherwise None, after one warning."""
    try:
        return load_cuda_extension()
    except NativeBuildError as error:
        warnings.warn(f"{error}\nkdfast uses the Triton kernel on CUDA tensors instead.", RuntimeWarning,
                      stacklevel=3)
        return None
