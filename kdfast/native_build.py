"""JIT build of the native kernels in csrc/ (ninja through torch.utils.cpp_extension), cached per machine.

Nothing compiles at `pip install`; the first call (or `kdfast build`) compiles once and later processes load the
cached library. The CPU kernel is compiled for the SIMD level torch reports for this machine and the CUDA kernels
for the GPU architectures in use (or KDFAST_CUDA_ARCHS); either is part of the build's name, so a cache copied to
another machine rebuilds instead of crashing on an illegal instruction. Builds into one folder take turns under
kdfast.build_lock, which also clears what a killed build left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import torch

from kdfast.build_lock import BuildLockTimeout, build_lock
from kdfast.package_files import package_folder

# Flags that make GCC emit the vector width torch itself uses on this CPU (our exp/log are written to be
# vectorised; without these they silently stay SSE2).
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
CPU_SOURCES = ("cpu/distill_kernel.cpp", "cpu/sparse_kernel.cpp", "cpu/uld_rows.cpp", "cpu/sorted_l1.cpp",
               "cpu/mapped_rows.cpp", "cpu/softcap_map.cpp", "cpu/topk_entropy.cpp", "cpu/bindings.cpp")
CUDA_SOURCES = ("cuda/distill_launch.cu", "cuda/distill_rows_bf16.cu", "cuda/distill_rows_fp16.cu",
                "cuda/distill_rows_fp32.cu", "cuda/bindings.cpp")


class NativeBuildError(RuntimeError):
    """The native extension could not be compiled or loaded on this machine."""


def cpu_capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _SIMD_FLAGS else "DEFAULT"


def build_directory(name: str) -> str:
    root = os.environ.get("KDFAST_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kdfast", f"torch{torch.__version__.split('+')[0]}")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _ninja_on_path():
    """The ninja that pip installed with kdfast, for the build's duration: a virtual environment's bin/ is often not on
    PATH (its python run by full path), and torch's build looks for ninja there only."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:  # torch's own error then says what is missing
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _build(name: str, sources, **flags) -> None:
    from torch.utils import cpp_extension

    csrc = package_folder("csrc")
    folder = build_directory(name)
    try:
        with build_lock(folder), _ninja_on_path():
            cpp_extension.load(name=name, sources=[str(csrc / source) for source in sources], is_python_module=False,
                               build_directory=folder, verbose=os.environ.get("KDFAST_VERBOSE_BUILD") == "1",
                               **flags)
    except BuildLockTimeout as error:
        raise NativeBuildError(f"building the kdfast kernels ({name}): {error}") from error
    except Exception as error:  # compiler missing, headers missing, ninja missing, link error...
        raise NativeBuildError(f"building the kdfast kernels ({name}) in {folder} failed: {error}") from error


class _Extension:
    """Builds and loads one extension once per process; remembers a failure instead of retrying (and waiting)
    on every call."""

    def __init__(self, build, fallback: str):
        self._build, self._fallback = build, fallback
        self._ops = self._error = None
        self._warned = False

    def load(self):
        """The ops namespace; raises NativeBuildError (the same one on every call after a failure)."""
        if self._ops is None and self._error is None:
            try:
                self._ops = self._build()
            except NativeBuildError as error:
                self._error = error
        if self._error is not None:
            raise self._error
        return self._ops

    def if_loaded(self):
        """The ops namespace if this process has loaded it already, else None (never builds)."""
        return self._ops

    def or_none(self):
        """The ops namespace, or None after one warning naming the fallback."""
        try:
            return self.load()
        except NativeBuildError as error:
            if not self._warned:
                self._warned = True
                warnings.warn(f"{error}\n{self._fallback}", RuntimeWarning, stacklevel=3)
            return None


def _build_cpu():
    capability = cpu_capability()
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; without it, one thread.
    _build(f"kdfast_cpu_{capability.lower()}", CPU_SOURCES,
           extra_cflags=["-O3", "-fopenmp", "-std=c++17", *_SIMD_FLAGS.get(capability, [])],
           extra_ldflags=["-fopenmp"])
    return torch.ops.kdfast_cpu


def cuda_archs() -> list[str]:
    """Targets such as ['90', '80'] from KDFAST_CUDA_ARCHS ('9.0;8.0', '90 80', 'sm_90'), else the visible
    devices' own."""
    requested = os.environ.get("KDFAST_CUDA_ARCHS", "").replace(";", " ").replace(",", " ").split()
    if requested:
        return sorted({arch.lower().removeprefix("sm_").replace(".", "") for arch in requested})
    capabilities = {torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())}
    return sorted(f"{major}{minor}" for major, minor in capabilities)


def _build_cuda():
    if torch.version.cuda is None:
        raise NativeBuildError("this torch build has no CUDA support, so the kdfast CUDA kernels cannot be built")
    archs = cuda_archs()
    if not archs:
        raise NativeBuildError("no CUDA device is visible and KDFAST_CUDA_ARCHS is not set")
    # Naming the targets ourselves stops cpp_extension from adding its own (TORCH_CUDA_ARCH_LIST).
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    _build("kdfast_cuda_sm" + "_".join(archs), CUDA_SOURCES, extra_cflags=["-O3"],
           extra_cuda_cflags=["-O3", "-lineinfo", *gencode])
    return torch.ops.kdfast_cuda


_cpu = _Extension(_build_cpu, "kdfast falls back to the pure-PyTorch backend on CPU tensors.")
_cuda = _Extension(_build_cuda, "kdfast uses the Triton kernel on CUDA tensors instead.")


def load_cpu_extension():
    """Builds (first time) and loads the CPU kernel; registers torch.ops.kdfast_cpu. Raises NativeBuildError."""
    return _cpu.load()


def cpu_extension_or_none():
    return _cpu.or_none()


def cpu_extension_if_loaded():
    """The CPU kernel's ops if a kernel call (or `kdfast build`) loaded them in this process, else None: for glue
    that may take them but must not start a build of its own (kdfast.cpu_softcap)."""
    return _cpu.if_loaded()


def loaded_cpu_ops_for(*tensors, rows_only: bool = False):
    """`cpu_extension_if_loaded()` where every tensor is float32 on the CPU and contiguous (`rows_only`: 2-D with
    contiguous rows), outside a compiled graph (to which the ops would be opaque); else None. Glue's passes that the
    extension does faster than torch's ops (kdfast.cpu_softcap, the EAFT factor) take it through this."""
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return None
        if not (t.dim() == 2 and t.stride(-1) == 1 if rows_only else t.is_contiguous()):
            return None
    return cpu_extension_if_loaded()


def load_cuda_extension():
    """Builds (first time) and loads the CUDA kernels; registers torch.ops.kdfast_cuda. Raises NativeBuildError."""
    return _cuda.load()


def cuda_extension_or_none():
    return _cuda.or_none()
