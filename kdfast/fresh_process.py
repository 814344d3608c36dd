"""New processes for measurements and test ranks, forked from multiprocessing's fork server rather than spawned.

A spawned process imports torch, torch._dynamo (which torch's custom ops import on their first call) and kdfast
itself: 3.4 CPU-seconds (4.3 s) on a 2-core machine, the whole cost of a small measurement. The fork server imports them
once (and the parent's main script, as a spawned child would each time); each process is then a fork of it. The
server only imports: no thread runs in it and CUDA is not initialised, so a fork of it starts as clean as a spawned
process, and its heap holds only what those imports made (what a spawned process holds once it has imported them).
The server's environment is the parent's when the server started: each process is given the parent's environment
as it is now.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

FORK_SERVER_PRELOAD = ("__main__", "torch", "torch.distributed", "torch._dynamo", "kdfast.function")


def fork_server_context():
    """multiprocessing's fork-server context, its server importing `FORK_SERVER_PRELOAD` (the spawn context where
    there is no fork server: not on Windows). The preload is multiprocessing's one setting: it takes effect if the
    server is not yet running."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    return context


def with_environment(environment: dict, function, *args):
    """function(*args) with os.environ replaced by `environment` (a fork of the server has the server's)."""
    os.environ.clear()
    os.environ.update(environment)
    return function(*args)


def run_in_fresh_process(function, *args):
    """function(*args) in a new process (module docstring) with this process's environment; its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=fork_server_context()) as pool:
        return pool.submit(with_environment, dict(os.environ), function, *args).result()
