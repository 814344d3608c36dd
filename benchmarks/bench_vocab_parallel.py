"""Vocab-parallel distillation (kdfast's `process_group=`) vs what users do without it: gathering the full
logits onto every rank and running the loss there. Per call (forward + backward, each rank's gradient shard):
bytes each rank sends, and median time, side by side in the same processes. The same for the per-token log-probs
and entropy of a vocab-parallel LM head (`linear_token_logprobs(process_group=...)`), against gathering the head's
shards onto every rank.

CPU default: 2 ranks on gloo, 1024 tokens x 32000 vocab fp32 (16000 per rank), forward_kl + CE(0.5), T=2, 3 rounds
(--full: 2048 tokens, 7 rounds); the log-probs + 0.01 x the entropy of a head with hidden size 256 that learns; beside
each, kdfast on each rank's columns alone (not the distributed call: the yardstick of its overhead). With several
GPUs (--device cuda), NCCL and one GPU per rank.

    python benchmarks/bench_vocab_parallel.py [--full] [--ranks R --tokens N --vocab V --hidden H --repeats K
                                               --device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import environment, parse_benchmark_args, write_csv  # noqa: E402

import kdfast  # noqa: E402
from kdfast.distributed import count_traffic  # noqa: E402

# Ranks forked from a server that has imported torch and kdfast: a spawned rank spent 4 CPU-seconds importing them.
from kdfast.fresh_process import fork_server_context  # noqa: E402

VOCAB_PARALLEL, GATHER = "kdfast vocab-parallel", "gather full logits + kdfast"
SHARD_ALONE = "kdfast on the shard alone"
LOGPROBS_PARALLEL, LOGPROBS_GATHER = "kdfast vocab-parallel log-probs", "gather the head + kdfast log-probs"
LOGPROBS_ALONE = "kdfast log-probs on the shard alone"
# `kdfast bench --full`: two more rounds (the default's five keep `make bench` within its five minutes).
# `make bench`: 1024 tokens and 3 rounds; the gathering contender alone took 9 s a call at 2048 tokens on a 2-core
# AMD EPYC (2026-12-07), the benchmark 115 s of make bench's five minutes.
FULL_SETTINGS = {"tokens": 2048, "repeats": 7}
# task -> (its methods: vocab-parallel, the gathering baseline, the shard alone)
TASKS = {"loss": (VOCAB_PARALLEL, GATHER, SHARD_ALONE),
         "token log-probs": (LOGPROBS_PARALLEL, LOGPROBS_GATHER, LOGPROBS_ALONE)}


def loss_options(args) -> dict:
    return dict(divergence=args.divergence, temperature=2.0, ce_weight=0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=256, help="the log-probs' LM head's hidden size")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--repeats", type=int, default=3)


def check_args(parser: argparse.ArgumentParser, args) -> None:
    if args.vocab % args.ranks:
        parser.error("--vocab must divide evenly into --ranks shards")
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        parser.error(f"--device cuda needs {args.ranks} GPUs, found {torch.cuda.device_count()}")


def gather_full(shard, group):
    """What users do without vocab parallelism: every rank gathers every shard into [N, V]."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def contenders(student, teacher, labels, start, stop, options, traffic_bytes):
    group = dist.group.WORLD

    def vocab_parallel():
        x = student.detach().requires_grad_(True)
        with count_traffic() as traffic:
            loss = kdfast.distill_loss(x, teacher, labels, process_group=group, **options)
            loss.backward()
        traffic_bytes[VOCAB_PARALLEL] = traffic.bytes

    def gathered():
        x = student.detach().requires_grad_(True)
        full_student = gather_full(x.detach(), group).requires_grad_(True)
        full_teacher = gather_full(teacher, group)
        traffic_bytes[GATHER] = (x.numel() + teacher.numel()) * x.element_size()
        kdfast.distill_loss(full_student, full_teacher, labels, **options).backward()
        x.grad = full_student.grad[:, start:stop]  # this rank's slice, as the sharded head needs it

    shard_labels = labels % student.shape[-1]  # as many CE rows, all within the shard

    def shard_alone():
        """Not the distributed loss: the same kernel's work on this rank's columns alone, the yardstick of the
        sharded loss's overhead (its extra pass and the exchanges)."""
        x = student.detach().requires_grad_(True)
        kdfast.distill_loss(x, teacher, shard_labels, **options).backward()
        traffic_bytes[SHARD_ALONE] = 0

    return {VOCAB_PARALLEL: vocab_parallel, GATHER: gathered, SHARD_ALONE: shard_alone}


def logprob_contenders(hidden, weight, token_ids, traffic_bytes):
    """Per-token log-probs + 0.01 x entropy of a head that learns, forward + backward: over this rank's rows of the
    head, on the whole head gathered from the ranks' rows, and on this rank's rows alone (the yardstick)."""
    group = dist.group.WORLD

    def step(head, ids, **sharding):
        x, w = hidden.detach().requires_grad_(True), head.detach().requires_grad_(True)
        logprobs, entropy = kdfast.linear_token_logprobs(x, w, ids, return_entropy=True, **sharding)
        (logprobs.sum() + 0.01 * entropy.sum()).backward()
        return w

    def vocab_parallel():
        with count_traffic() as traffic:
            step(weight, token_ids, process_group=group)
        traffic_bytes[LOGPROBS_PARALLEL] = traffic.bytes

    def gathered():
        parts = [torch.empty_like(weight) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, weight.contiguous(), group=group)
        traffic_bytes[LOGPROBS_GATHER] = weight.numel() * weight.element_size()
        step(torch.cat(parts), token_ids)  # d weight whole on every rank: its rows start:stop are this rank's shard's

    def shard_alone():
        step(weight, token_ids % weight.shape[0])
        traffic_bytes[LOGPROBS_ALONE] = 0

    return {LOGPROBS_PARALLEL: vocab_parallel, LOGPROBS_GATHER: gathered, LOGPROBS_ALONE: shard_alone}


def worker(rank, args, store, out):
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // args.ranks))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=args.ranks)
    shard = args.vocab // args.ranks
    start, stop = rank * shard, (rank + 1) * shard
    generator = torch.Generator().manual_seed(0)
    full_student = torch.randn(args.tokens, args.vocab, generator=generator)
    full_teacher = torch.randn(args.tokens, args.vocab, generator=generator)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    student = full_student[:, start:stop].contiguous().to(device)
    teacher = full_teacher[:, start:stop].contiguous().to(device)
    del full_student, full_teacher
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device)
    head = (torch.randn(args.vocab, args.hidden, generator=generator) * args.hidden**-0.5)[start:stop].to(device)
    traffic = {}
    methods = {**contenders(student, teacher, labels, start, stop, loss_options(args), traffic),
               **logprob_contenders(hidden, head, labels, traffic)}
    samples = {name: [] for name in methods}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, fn in methods.items():
            dist.barrier()
            begin = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                samples[name].append((time.perf_counter() - begin) * 1e3)
    if rank == 0:
        torch.save({name: (statistics.median(values), traffic[name]) for name, values in samples.items()}, out)
    dist.barrier()
    dist.destroy_process_group()
    # Measured and saved: leave without the interpreter's teardown, in which a C++ thread of the gloo run is sometimes
    # destroyed still joinable (std::terminate, SIGABRT after the last Python frame: CI's run of 2026-12-03).
    sys.stdout.flush()
    os._exit(0)


def run(args):
    # Spawned ranks import the worker by module name (this file may run as __main__ or through runpy).
    import bench_vocab_parallel

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.pt"
        mp.start_processes(bench_vocab_parallel.worker, args=(args, str(Path(folder) / "store"), str(out)),
                           nprocs=args.ranks, start_method=fork_server_context().get_start_method())
        results = torch.load(out)
    env = environment(torch.device(args.device if args.device == "cpu" else "cuda"))
    backend = "nccl" if args.device == "cuda" else "gloo"
    titles = {"loss": f"{loss_options(args)}", "token log-probs": f"log-probs + 0.01 entropy, hidden {args.hidden}"}
    console = Console(width=max(100, Console().width))
    rows = []
    for task, (_, gather, alone) in TASKS.items():
        (baseline_ms, baseline_bytes), alone_ms = results[gather], results[alone][0]
        table = Table(title=f"vocab-parallel fwd+bwd, {args.ranks} ranks ({backend}), {args.tokens} x {args.vocab} "
                            f"fp32 ({args.vocab // args.ranks} per rank), {titles[task]}")
        for column in ("method", "median ms", "x gather", "x shard alone", "bytes sent per rank", "bytes / gather"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for name in TASKS[task]:
            ms, sent = results[name]
            row = {"task": task, "method": name, "ranks": args.ranks, "backend": backend, "tokens": args.tokens,
                   "vocab": args.vocab, "divergence": args.divergence if task == "loss" else "",
                   "hidden": args.hidden if task != "loss" else "", "median_ms": round(ms, 2),
                   "bytes_sent_per_rank": sent, "bytes_ratio_to_gather": round(sent / baseline_bytes, 6),
                   "speedup_vs_gather": round(baseline_ms / ms, 2), "x_shard_alone": round(ms / alone_ms, 2), **env}
            rows.append(row)
            table.add_row(name, f"{row['median_ms']:.1f}", f"{row['speedup_vs_gather']:.2f}",
                          f"{row['x_shard_alone']:.2f}", f"{sent:,}", f"{row['bytes_ratio_to_gather']:.2e}")
        console.print(table)
    console.print(f"medians of {args.repeats} rounds (interleaved, barrier before each call), rank 0's clock, "
                  f"{torch.get_num_threads() // args.ranks or 1} thread(s) per rank; torch {env['torch']}")
    write_csv(rows, env, name=f"bench_vocab_parallel{'' if args.divergence == 'forward_kl' else '_' + args.divergence}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse_benchmark_args(parser, argv, FULL_SETTINGS)
    check_args(parser, args)
    run(args)


if __name__ == "__main__":
    main()
