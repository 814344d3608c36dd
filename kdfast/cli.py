"""The `kdfast` command. Each subcommand has its own options (`kdfast <command> --help`):

    kdfast bench [--full] [logits | linear | sparse | linear-sparse | vocab-parallel | trl | multi-teacher |
                  cross-vocab] [options]
                                       the side-by-side benchmarks (all, or one), short by default; --full runs
                                       each at its full size with every contender; those below run when named
    kdfast bench sharded-memory        peak memory per process with the student sharded by FSDP2 (minutes)
    kdfast bench linear-precision      loss and gradient errors of the fused linear loss on bf16 heads vs float64
    kdfast bench linear-chunks | small-calls | train-step
                                       chunk sizes; a small call's host cost; a whole training step (GPU-sized)
    kdfast bench teacher-cache         a teacher cache written locally, through a server, and by 2 processes
    kdfast profile [options]           peak memory over a sweep of shapes
    kdfast distill [options]           an end-to-end distillation run
    kdfast teacher-cache [options]     store a teacher's top-k next-token log-probs for distilling without it
    kdfast teacher-cache convert       read or write the top-k datasets of axolotl, DistillKit and vLLM
    kdfast build                       compile the native kernels ahead of their first use

Only the command named is imported, when it is named: a plain `pip install kdfast` has none of the extras the
benchmarks, the demo and the teacher cache import, and `kdfast --help` should neither need them nor wait for them.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
import time
from pathlib import Path

from kdfast.package_files import package_folder

# `kdfast bench <name>` -> the benchmark script (benchmarks/ in a checkout, kdfast/benchmarks in an install).
BENCHMARKS = {"logits": "bench_distill", "ce": "bench_cross_entropy", "linear": "bench_linear",
              "sparse": "bench_sparse", "linear-sparse": "bench_linear_sparse",
              "vocab-parallel": "bench_vocab_parallel", "trl": "bench_trl", "multi-teacher": "bench_multi_teacher",
              "cross-vocab": "bench_cross_vocab"}
# Run only when named: several processes training real models, minutes on a CPU, or whole models' steps that
# `make bench`'s five minutes leave no room for.
NAMED_ONLY = {"sharded-memory": "bench_sharded_memory", "linear-precision": "bench_linear_precision",
              "linear-chunks": "bench_linear_chunks", "small-calls": "bench_small_calls",
              "train-step": "bench_train_step", "teacher-cache": "bench_teacher_cache",
              "causal-lm": "bench_causal_lm"}
# The extra (setup.py's extras_require) whose packages each command imports, and the benchmarks needing another.
COMMAND_EXTRAS = {"bench": "bench", "profile": "bench", "distill": "integrations", "teacher-cache": "integrations"}
# TRL's kernels and its GOLD loss; the cache's writer
BENCHMARK_EXTRAS = {"trl": "integrations", "cross-vocab": "integrations", "teacher-cache": "integrations"}
# What the CLI keeps in a benchmark's namespace: not the benchmark's options, and not all picklable (spawned ranks).
CLI_SETTINGS = {"command", "benchmark", "handler", "module", "checked_by", "parser", "full"}
HERE = Path(__file__).resolve().parent


def benchmark_module(name: str):
    folder = str(package_folder("benchmarks"))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the scripts import each other by module name
    return importlib.import_module(name)


def read_without_importing(path: Path, constant: str | None = None) -> str:
    """A module's docstring, or its string `constant`, read from its source: importing the module would import
    torch and its command's extra, which the help of the other commands must not wait for nor need."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if constant is None:
        return ast.get_docstring(tree) or ""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == constant for target in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{constant} is not assigned in {path}")


def summary(docstring: str) -> str:
    """The first sentence of a docstring."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".:")


def benchmark_summary(module_name: str) -> str:
    return summary(read_without_importing(package_folder("benchmarks") / f"{module_name}.py"))


def full_settings(module) -> dict:
    """What `--full` changes in a benchmark's options (none for those whose defaults are their full run)."""
    return getattr(module, "FULL_SETTINGS", {})


def _run_benchmarks(args):
    if args.benchmark is not None:  # the benchmark's options as its own parser gives them, without the CLI's
        options = {key: value for key, value in vars(args).items() if key not in CLI_SETTINGS}
        args.module.run(argparse.Namespace(**options))
        return
    parse_benchmark_args = benchmark_module("bench_distill").parse_benchmark_args
    started, took = time.perf_counter(), {}
    for name, module_name in BENCHMARKS.items():  # every one, with its defaults or (--full) its FULL_SETTINGS
        module = benchmark_module(module_name)
        parser = argparse.ArgumentParser(prog=f"kdfast bench {name}")
        module.add_arguments(parser)
        start = time.perf_counter()
        try:
            module.run(parse_benchmark_args(parser, ["--full"] if args.full else [], full_settings(module)))
        except ModuleNotFoundError as error:  # a benchmark needing more than the bench extra: the others still run
            line = missing_extra_line(["bench", name], error) if name in BENCHMARK_EXTRAS else None
            if line is None:
                raise
            print(f"skipped: {line}", file=sys.stderr)
        took[name] = time.perf_counter() - start
    # Where the run's minutes went: each benchmark's share, so a slow machine shows which one to run alone.
    print(f"\nkdfast bench: {time.perf_counter() - started:.0f} s in all; "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items()))


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


def named_words(argv: list[str]) -> list[str]:
    """The command named in argv, and the benchmark after `bench` (`bench linear --tokens 8` -> bench, linear):
    no option comes before the command, nor one taking a value before the benchmark."""
    words = [word for word in argv if not word.startswith("-")]
    return words[:2] if words[:1] == ["bench"] else words[:1]


def _add_bench(commands, named: list[str]) -> None:
    bench = commands.add_parser("bench", help=f"the side-by-side benchmarks: {', '.join(BENCHMARKS)}",
                                description="Runs the side-by-side benchmarks with their short defaults (all but "
                                            "those `kdfast --help` lists as run when named), or the one named, with "
                                            "its options (kdfast bench <name> --help).")
    bench.add_argument("--full", action="store_true",
                       help="each benchmark at its full settings (longer shapes, every contender): many minutes")
    bench.set_defaults(handler=_run_benchmarks, benchmark=None)
    which = bench.add_subparsers(dest="benchmark", metavar="<benchmark>")
    for name, module_name in {**BENCHMARKS, **NAMED_ONLY}.items():
        if named[1:] != [name]:  # listed by its docstring's first sentence, read without importing it
            which.add_parser(name, help=benchmark_summary(module_name))
            continue
        module = benchmark_module(module_name)
        sub = which.add_parser(name, help=summary(module.__doc__), description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        benchmark_module("bench_distill").add_full_option(sub, full_settings(module))
        sub.set_defaults(module=module, checked_by=getattr(module, "check_args", None), parser=sub)


def _add_profile(commands, named: list[str]) -> None:
    if named[:1] != ["profile"]:
        commands.add_parser("profile", help=benchmark_summary("profile_memory"))
        return
    module = benchmark_module("profile_memory")
    profile = commands.add_parser("profile", help=summary(module.__doc__), description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(profile)
    profile.set_defaults(handler=_profile)


def _add_distill(commands, named: list[str]) -> None:
    if named[:1] != ["distill"]:
        commands.add_parser("distill", help=read_without_importing(HERE / "demo" / "arguments.py", "DESCRIPTION"))
        return
    from kdfast.demo import arguments

    distill = commands.add_parser("distill", help=arguments.DESCRIPTION, description=arguments.DESCRIPTION)
    arguments.add_arguments(distill)
    distill.set_defaults(handler=_distill, checked_by=arguments.check_args, parser=distill)


def _add_teacher_cache(commands, named: list[str], argv: list[str]) -> None:
    source = HERE / "teacher_cache" / "command.py"
    if named[:1] != ["teacher-cache"]:
        commands.add_parser("teacher-cache", help=read_without_importing(source, "DESCRIPTION"))
        return
    from kdfast.teacher_cache import command

    cache = commands.add_parser("teacher-cache", help=command.DESCRIPTION, description=command.__doc__)
    if argv[argv.index("teacher-cache") + 1:][:1] == ["convert"]:
        from kdfast.teacher_cache import convert

        which = cache.add_subparsers(dest="action", metavar="convert", required=True)
        converter = which.add_parser("convert", help=convert.DESCRIPTION, description=convert.__doc__)
        convert.add_arguments(converter)
        converter.set_defaults(handler=convert.run, checked_by=convert.check_args, parser=converter)
        return
    command.add_arguments(cache)
    cache.set_defaults(handler=command.run, checked_by=command.check_args, parser=cache)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The whole command line, with the options of the command named in argv only (each imports its own)."""
    named = named_words(argv)
    parser = argparse.ArgumentParser(prog="kdfast", description=__doc__.splitlines()[0],
                                     epilog="`kdfast <command> --help` lists that command's options.")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_bench(commands, named)
    _add_profile(commands, named)
    _add_distill(commands, named)
    _add_teacher_cache(commands, named, argv)
    build = commands.add_parser("build", help="compile the native kernels ahead of their first use",
                                description=_build.__doc__)
    build.set_defaults(handler=_build)
    return parser


def parse(argv: list[str]):
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "full", False) and getattr(args, "benchmark", None):
        args.parser.set_defaults(**full_settings(args.module))  # under the options given
        args = parser.parse_args(argv)
    return args


def extra_packages(extra: str) -> set[str] | None:
    """The import names of an extra's packages, from kdfast's installed metadata (None when it has none: a bare
    checkout on PYTHONPATH)."""
    import importlib.metadata  # 80 ms, for the error path only: `kdfast --help` should not pay it

    try:
        requirements = importlib.metadata.requires("kdfast") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return {re.split(r"[^A-Za-z0-9._-]", requirement, maxsplit=1)[0].lower().replace("-", "_")
            for requirement in requirements if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", requirement)}


def missing_extra_line(named: list[str], error: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install for the command `named`, or None when that extra does not list the
    missing module (a module missing otherwise is not the user's install to fix)."""
    if not named or named[0] not in COMMAND_EXTRAS:
        return None
    extra = BENCHMARK_EXTRAS.get(named[1], "bench") if named[1:] else COMMAND_EXTRAS[named[0]]
    packages = extra_packages(extra)
    if packages is not None and (error.name or "").split(".")[0].lower() not in packages:
        return None
    return f"kdfast {' '.join(named)} needs the '{extra}' extra ({error.msg}): pip install 'kdfast[{extra}]'"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        check = getattr(args, "checked_by", None)
        if check is not None:
            check(args.parser, args)
        args.handler(args)
    except ModuleNotFoundError as error:
        line = missing_extra_line(named_words(argv), error)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
