"""Shared fixtures. Without a GPU the Triton kernels run under Triton's interpreter (docs/DESIGN.md, "Tests and CI")."""

import contextlib
import os
import random
import zlib

# Each pytest-xdist worker takes its share of the cores for torch's threads: two workers of two OpenMP threads each on
# CI's two cores spent a quarter of the suite's time spinning for each other (the whole suite 14.1 min against 18.6 on
# a 2-core Intel Xeon, 2026-12-05). Set before torch starts its thread pool, and inherited by the tests' subprocesses;
# tests/test_thread_counts.py runs the kernels on several threads on purpose.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_WORKER_THREADS = None
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not macOS
    _WORKER_THREADS = max(1, _CORES // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_WORKER_THREADS)

import torch  # noqa: E402

if _WORKER_THREADS is not None:
    torch.set_num_threads(_WORKER_THREADS)  # in case a plugin imported torch first

if not torch.cuda.is_available():
    # Must be set before kernels are decorated (the first import of kdfast.kernels.distill).
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":  # work the interpreter repeats for nothing (tests/interpreter_patches.py)
    from interpreter_patches import memoize_np_dtypes, patch_once_per_launch, type_tuples_lazily

    patch_once_per_launch()
    memoize_np_dtypes()
    type_tuples_lazily()
# torch.compile's on-disk graph cache is keyed by the graph, not by kdfast's version: a graph compiled by an older
# kdfast (its ops' outputs another shape) would be reused. Each test session compiles into a cache of its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdfast-inductor-")

import pytest  # noqa: E402
from file_order import pytest_collection_modifyitems  # noqa: E402, F401 (the hook, by its name)

from kdfast.native_build import cpu_extension_or_none, cuda_extension_or_none  # noqa: E402


def available_backends():
    """Every backend this machine can run; 'cpu' is required (a failed build must fail the suite here), and
    so is 'cuda' wherever a GPU is visible."""
    backends = ["torch", "cpu"]
    try:
        import triton  # noqa: F401

        backends.append("triton")
    except ImportError:
        pass
    if torch.cuda.is_available():
        backends.append("cuda")
    return backends


BACKENDS = available_backends()


def device_for(backend: str) -> str:
    if backend in ("triton", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernel_builds():
    assert cpu_extension_or_none() is not None, "the C++ CPU kernel failed to build"
    if torch.cuda.is_available():
        assert cuda_extension_or_none() is not None, "the CUDA kernels failed to build"


@pytest.fixture(autouse=True)
def _seeded_random_state(request):
    """Each test draws the same random inputs whichever tests ran before it in its worker: a seed of its own name.
    Unseeded draws once passed locally and failed in CI, where another file order left the generator elsewhere."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    torch.manual_seed(seed)


def source_environment(**extra) -> dict:
    """The environment of a subprocess that imports kdfast as this process does: the folder holding the kdfast package
    imported here first (the source tree's root; on the GPU machine a folder linking kdfast/ alone, which keeps the
    root's kernels/ from shadowing Hugging Face's `kernels` package that transformers imports), then this process's
    PYTHONPATH (wheels carried there)."""
    import kdfast

    home = os.path.dirname(os.path.dirname(os.path.abspath(kdfast.__file__)))
    inherited = [part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part and part != home]
    path = os.pathsep.join([home, *inherited])
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def gemm_library(monkeypatch):
    """Sets KDFAST_CPU_GEMM for the rest of the test, the fused linear forms' CPU products (kdfast.cpu_gemm): the
    choice is made once per process, so it is cleared around the test."""
    from kdfast import cpu_gemm

    def choose(setting: str) -> None:
        monkeypatch.setenv("KDFAST_CPU_GEMM", setting)
        cpu_gemm.onednn_products.cache_clear()

    yield choose
    cpu_gemm.onednn_products.cache_clear()


@pytest.fixture
def backward_chunks_counted(monkeypatch):
    """How many times kdfast.linear_token_logprobs' backward recomputed chunks of logits (none: d hidden came from
    the forward)."""
    from kdfast import token_logprobs

    calls = []
    original = token_logprobs._backward_chunks
    monkeypatch.setattr(token_logprobs, "_backward_chunks", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.fixture
def zero3_gathers(monkeypatch):
    """The parameter lists kdfast.zero3 was asked to gather from DeepSpeed ZeRO-3 (nothing is gathered): mark a
    tensor partitioned with `tensor.ds_id = ...`, as ZeRO-3 marks its parameters."""
    from kdfast import zero3

    gathers = []

    @contextlib.contextmanager
    def record_gather(params):
        gathers.append(list(params))
        yield

    monkeypatch.setattr(zero3, "_zero3_gather", record_gather)
    return gathers
