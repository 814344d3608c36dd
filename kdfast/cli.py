"""The `kdfast` command. Each subcommand has its own options (`kdfast <command> --help`):

    kdfast bench [logits | linear | sparse | linear-sparse | vocab-parallel] [options]
                                       the side-by-side benchmarks (all, or one); those below run when named
    kdfast bench sharded-memory        peak memory per process with the student sharded by FSDP2 (minutes)
    kdfast bench linear-precision      loss and gradient errors of the fused linear loss on bf16 heads vs float64
    kdfast bench linear-chunks | small-calls | train-step
                                       chunk sizes; a small call's host cost; a whole training step (GPU-sized)
    kdfast profile [options]           peak memory over a sweep of shapes
    kdfast distill [options]           an end-to-end distillation run
    kdfast teacher-cache [options]     store a teacher's top-k next-token log-probs for distilling without it
    kdfast build                       compile the native kernels ahead of their first use
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from kdfast.package_files import package_folder

# `kdfast bench <name>` -> the benchmark script (benchmarks/ in a checkout, kdfast/benchmarks in an install).
BENCHMARKS = {"logits": "bench_distill", "linear": "bench_linear", "sparse": "bench_sparse",
              "linear-sparse": "bench_linear_sparse", "vocab-parallel": "bench_vocab_parallel"}
# Run only when named: several processes training real models, minutes on a CPU.
NAMED_ONLY = {"sharded-memory": "bench_sharded_memory", "linear-precision": "bench_linear_precision",
              "linear-chunks": "bench_linear_chunks", "small-calls": "bench_small_calls",
              "train-step": "bench_train_step"}


def benchmark_module(name: str):
    folder = str(package_folder("benchmarks"))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the scripts import each other by module name
    return importlib.import_module(name)


def _summary(module) -> str:
    """The first sentence of a module's docstring."""
    paragraph = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".:")


def _run_benchmarks(args):
    if args.benchmark is not None:
        args.module.run(args)
        return
    for name in BENCHMARKS.values():  # every one, each with its defaults
        module = benchmark_module(name)
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        module.run(parser.parse_args([]))


def _profile(args):
    benchmark_module("profile_memory").run(args)


def _distill(args):
    from kdfast.demo.main import run

    run(args)


def _build(_args):
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


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="the side-by-side benchmarks: logits, linear, sparse, vocab-parallel",
                                description="Runs the side-by-side benchmarks with their defaults (all but those "
                                            "`kdfast --help` lists as run when named), or the one named, with its "
                                            "options (kdfast bench <name> --help).")
    bench.set_defaults(handler=_run_benchmarks, benchmark=None)
    which = bench.add_subparsers(dest="benchmark", metavar="<benchmark>")
    for name, module_name in {**BENCHMARKS, **NAMED_ONLY}.items():
        module = benchmark_module(module_name)
        sub = which.add_parser(name, help=_summary(module), description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(module=module, checked_by=getattr(module, "check_args", None), parser=sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description=__doc__.splitlines()[0],
                                     epilog="`kdfast <command> --help` lists that command's options.")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_bench(commands)
    profile_module = benchmark_module("profile_memory")
    profile = commands.add_parser("profile", help=_summary(profile_module), description=profile_module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    profile_module.add_arguments(profile)
    profile.set_defaults(handler=_profile)

    from kdfast.demo import arguments as distill_arguments

    distill = commands.add_parser("distill", help=distill_arguments.DESCRIPTION,
                                  description=distill_arguments.DESCRIPTION)
    distill_arguments.add_arguments(distill)
    distill.set_defaults(handler=_distill, checked_by=distill_arguments.check_args, parser=distill)
    from kdfast.teacher_cache import command as cache_command

    cache = commands.add_parser("teacher-cache", help=cache_command.DESCRIPTION, description=cache_command.__doc__)
    cache_command.add_arguments(cache)
    cache.set_defaults(handler=cache_command.run, checked_by=cache_command.check_args, parser=cache)
    build = commands.add_parser("build", help="compile the native kernels ahead of their first use",
                                description=_build.__doc__)
    build.set_defaults(handler=_build)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check = getattr(args, "checked_by", None)
    if check is not None:
        check(args.parser, args)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
