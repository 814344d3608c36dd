"""`python script.py args` or `python -m module args`, run as a fork of the test worker's fork server
(kdfast.fresh_process) rather than a new interpreter: the script runs as `__main__` with its own argv, working folder,
environment, sys.path[0] and standard streams, and exits with its own code, but starts with torch and kdfast imported.
A benchmark's smoke run spent 4-5 of its CPU-seconds importing them (20 smokes of tests/test_benchmark_scripts.py,
2026-12-07).

What torch and kdfast read from the environment as they are imported is the worker's. Where the command's environment
differs there, a new interpreter runs it as before: Triton's interpreter asked for where this worker has not (a GPU
machine: kdfast's Triton kernels were made without it), or another OpenMP thread count (read as torch loads).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

from kdfast.fresh_process import fork_server_context, with_environment

# The settings the fork server's imports have read (the module docstring).
READ_AT_IMPORT = ("TRITON_INTERPRET", "OMP_NUM_THREADS")


def _run_as_main(argv: list[str], cwd: str, stdout_path: str, stderr_path: str) -> None:
    """In the child: the command's streams on files, its folder, argv and sys.path[0], then the script as __main__
    (its SystemExit, or an exception's traceback and code 1, end the process as they would end the interpreter)."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        with open(path, "wb") as stream:
            os.dup2(stream.fileno(), fd)
    os.chdir(cwd)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # run_module puts the module's file in argv[0], as -m does
        sys.path.insert(0, cwd)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        sys.path.insert(0, os.path.dirname(script))
        runpy.run_path(script, run_name="__main__")


def forks_can_run(env: dict) -> bool:
    """Whether a fork of this worker's server is the process `env` asks for (module docstring)."""
    return all(env.get(name) == os.environ.get(name) for name in READ_AT_IMPORT)


def run_command(argv: list[str], *, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python *argv` in `cwd` with `env`: its return code and text output, as subprocess.run(capture_output=True)."""
    context = fork_server_context()
    if not forks_can_run(env) or context.get_start_method() != "forkserver":
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="kdfast-command-") as scratch:
        out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        child = context.Process(target=with_environment, args=(env, _run_as_main, list(argv), str(cwd), out, err))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(argv, timeout, Path(out).read_bytes(), Path(err).read_bytes())
        return subprocess.CompletedProcess(argv, child.exitcode, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))
