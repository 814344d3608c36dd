"""The `kdfast` command: `kdfast bench` (the side-by-side benchmarks), `kdfast profile` (peak memory over a
sweep of shapes), `kdfast distill` (an end-to-end distillation run), `kdfast build` (compile the kernels ahead)."""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run_script(name, argv):
    script = BENCHMARKS / name
    if not script.exists():
        raise SystemExit(f"{script} not found: `kdfast bench` and `kdfast profile` run from a source checkout "
                         "(pip install -e .)")
    runpy.run_path(str(script), run_name="kdfast_script")["main"](argv)


def _bench(rest):
    """The logits-level loss (options: benchmarks/bench_distill.py --help), the fused linear loss, then the
    vocab-parallel loss on 2 CPU ranks."""
    _run_script("bench_distill.py", rest)
    _run_script("bench_linear.py", [])
    _run_script("bench_vocab_parallel.py", [])


def _profile(rest):
    _run_script("profile_memory.py", rest)


def _distill(rest):
    from kdfast.demo.main import main as distill_main

    distill_main(rest)


def _build(_rest):
    """Compiles the CPU kernel, and the CUDA kernels when torch sees a GPU or KDFAST_CUDA_ARCHS names targets."""
    import os

    import torch

    from kdfast.native_build import cpu_capability, cuda_archs, load_cpu_extension, load_cuda_extension

    start = time.perf_counter()
    load_cpu_extension()
    print(f"kdfast CPU kernel ready ({cpu_capability()}) in {time.perf_counter() - start:.1f} s")
    if torch.cuda.is_available() or os.environ.get("KDFAST_CUDA_ARCHS"):
        start = time.perf_counter()
        load_cuda_extension()
        print(f"kdfast CUDA kernels ready (sm_{', sm_'.join(cuda_archs())}) in {time.perf_counter() - start:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kdfast", description="Fused knowledge-distillation losses")
    parser.add_argument("command", choices=["bench", "profile", "distill", "build"])
    args, rest = parser.parse_known_args(argv)
    {"bench": _bench, "profile": _profile, "distill": _distill, "build": _build}[args.command](rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
