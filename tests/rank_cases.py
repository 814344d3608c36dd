"""The harness of the multi-process tests: each spawned rank runs every case and saves {case: None or the failure's
traceback}; the test process collects them and reports each case as its own test."""

from __future__ import annotations

import contextlib
import faulthandler
import glob
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

from kdfast.fresh_process import fork_server_context, with_environment


def run_cases(cases: dict, out_path: str) -> None:
    """On a rank: runs every case, saving None or the failure's text per case."""
    results = {}
    for name, case in cases.items():
        try:
            case()
            results[name] = None
        except Exception:  # noqa: BLE001 (reported per case)
            results[name] = traceback.format_exc()
    torch.save(results, out_path)


def free_port() -> int:
    """A TCP port free now on this machine, for the ranks' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(worker, world: int, folder, *args) -> list[dict]:
    """Runs worker(rank, world, *args, out_paths) on `world` new processes, forked from a fork server that
    imported torch and kdfast once (kdfast.fresh_process: the ranks of the 16 files that spawned them took 312 s of a
    2-worker run, 223 forked); returns each rank's results."""
    outs = [str(folder / f"rank{rank}.pt") for rank in range(world)]
    start_method = fork_server_context().get_start_method()
    context = mp.start_processes(_then_exit, args=(worker, dict(os.environ), world, *args, outs), nprocs=world,
                                 join=False, start_method=start_method)
    while not context.join(timeout=300):
        pass
    return [torch.load(out) for out in outs]


def spawn_gloo_cases(cases, world: int, folder) -> list[dict]:
    """Runs `cases()` ({name: a callable, or (function, *args)}, built on each rank) on `world` spawned ranks of one
    gloo group, one torch thread each (they share the machine's cores); returns each rank's results."""
    return spawn_ranks(_gloo_worker, world, folder, str(folder / "store"), cases)


def _gloo_worker(rank, world, store, cases, outs):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    run_cases({name: case if callable(case) else (lambda case=case: case[0](*case[1:]))
               for name, case in cases().items()}, outs[rank])
    dist.destroy_process_group()


def spawn_deepspeed_ranks(worker, world: int, folder, port: int, *args) -> list[dict]:
    """`spawn_ranks` for ranks that meet at `port` and may start DeepSpeed, whose collectives then go through gloo
    (`_without_shared_memory_collectives`). Its CPU all-reduce, where it ran, mapped a 67 MB file per rank in /dev/shm,
    named by the rendezvous' address and port, and never unlinked it (17 GB of them filled this machine's memory after
    some hundred suites): any left are removed once the ranks have exited."""
    try:
        return spawn_ranks(_without_shared_memory_collectives, world, folder, worker, port, *args)
    finally:
        _remove_deepspeed_buffers(port)


def _without_shared_memory_collectives(rank, world, worker, *args):
    """worker(rank, world, *args) with DeepSpeed's shared-memory collectives off, gloo's doing their work: DeepSpeed
    compiles them (a C++ op) the first time a process starts its CPU backend, 66 CPU-seconds on a fresh machine (every
    CI run) with every rank waiting, for a speed the tests do not measure."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:  # the FSDP2 cases run without it
        backend = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` is the torch it imports
        assert callable(backend.build_shm_op), "DeepSpeed renamed what builds its shared-memory op"
        backend.build_shm_op = lambda: None
    worker(rank, world, *args)


def _remove_deepspeed_buffers(port: int) -> None:
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _then_exit(rank, worker, environment, *args):
    """worker(rank, *args), then leave without the interpreter's teardown: the results are saved by then, and in
    that teardown a C++ thread of a gloo/FSDP2 run is sometimes destroyed still joinable (std::terminate, SIGABRT),
    which would fail the run after every case passed. A crash prints each thread's Python stack first (a rank of
    tests/test_fsdp2.py died once by SIGSEGV, in 1 of 8 CI runs, with nothing to say where)."""
    faulthandler.enable()
    with_environment(environment, worker, rank, *args)
    os._exit(0)


def failures(outcomes: list[dict], case: str) -> str:
    """The failures of `case` over the ranks, as one text ('' when none)."""
    return "\n".join(f"rank {rank}:\n{results[case]}" for rank, results in enumerate(outcomes)
                     if results[case] is not None)
