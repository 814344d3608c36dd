"""The order pytest-xdist hands the suite's files to its workers (`make test`: whole files per worker).

xdist's default hands out the files with the most tests first, which put the few files that take minutes with a
handful of tests (the nvcc and Triton compiles, the sharded trainers' ranks, the exhaustive SIMD checks) last: on
a 2-core Intel Xeon (2026-12-07) one worker then ran them alone for the run's last minutes: 21.3 min in all for 38
CPU-minutes of tests. The Makefile passes --no-loadscope-reorder and this hook puts those files first, longest
first, and the rest by test count as xdist would, so the short files fill in around the long ones: 18.7 min there
for 36 CPU-minutes (and 257 tests more)."""

from __future__ import annotations

import collections

# Seconds per file from `pytest --durations=0`: on that machine over two runs (the compiles' caches cold in the
# first), then on a 2-core AMD EPYC (2026-12-07) after the compiles were cut (Triton's cache warm there; cold it
# took 79 s alone): the files past half a minute with few tests, or whose tests share a module fixture that takes
# minutes. (test_cross_tokenizer_trainer.py left them at 16 s, once its compiled steps ran on the backend they name.)
LONG_FILES = ("test_benchmark_scripts.py",  # 246-301 s; 299 s
              "test_cuda_compile.py",  # 148-160 s; 118 s
              "test_triton_aot.py",  # 39-172 s; 42 s
              "test_trainer_sharded.py",  # 102-165 s; 96 s
              "test_triton_mixture.py",  # 128 s; 79 s
              "test_build_lock.py",  # 43-61 s; 52 s
              "test_simd_math.py",  # 93-107 s; 47 s
              "test_package_install.py")  # 48-65 s; 46 s


def pytest_collection_modifyitems(config, items):
    files = [item.nodeid.split("::", 1)[0] for item in items]
    counts = collections.Counter(files)

    def rank(index: int):
        name = files[index].rsplit("/", 1)[-1]
        long_rank = LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)
        return long_rank, -counts[files[index]], files[index]

    # A file's tests keep their order (the sort is stable and each file's key is its own).
    order = sorted(range(len(items)), key=rank)
    items[:] = [items[index] for index in order]
