"""The host's cost of a small call: forward+backward of kdfast.distill_loss on a few long rows, where the kernels
take microseconds and the Python, dispatch and launches around them are the call's time. Per backend: wall time
per call over many calls in a row (the GPU never the bottleneck), kernel launches per call (from the profiler),
and the same step captured in a CUDA graph and replayed.

GPU default: 2 x 256000 bf16, forward KL + CE 0.5, T=2. CPU: the same shape on the CPU backend (no graph).

    python benchmarks/bench_small_calls.py [--rows R --vocab V --calls C]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import DTYPES, environment, write_csv  # noqa: E402

import kdfast  # noqa: E402

OPTIONS = dict(divergence="forward_kl", temperature=2.0, ce_weight=0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--calls", type=int, default=200)


def _step(student, teacher, labels, backend):
    def step():
        loss = kdfast.distill_loss(student, teacher, labels, backend=backend, **OPTIONS)
        loss.backward()
        return loss
    return step


def _per_call_us(fn, calls: int, device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _launches(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(event.count for event in prof.key_averages() if "LaunchKernel" in event.key)


def _graphed(step, student):
    """The step captured once in a CUDA graph: a replay is one launch from the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            student.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.rows, args.vocab, generator=generator).to(device, dtype).requires_grad_(True)
    teacher = torch.randn(args.rows, args.vocab, generator=generator).to(device, dtype)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=generator).to(device)
    backends = ["cuda", "triton"] if device.type == "cuda" else ["cpu", "torch"]
    env = environment(device)
    rows = []
    for backend in backends:
        step = _step(student, teacher, labels, backend)
        calls = {"eager": step}
        if device.type == "cuda":
            calls["CUDA graph replay"] = _graphed(step, student)
        for how, fn in calls.items():
            student.grad = None
            rows.append({"backend": backend, "how": how, "rows": args.rows, "vocab": args.vocab, "dtype": args.dtype,
                         "us_per_call": _per_call_us(fn, args.calls, device),
                         "kernel_launches": _launches(fn, device) if how == "eager" else 1, **env})
    table = Table(title=f"host cost of one fwd+bwd call, {args.rows} x {args.vocab} {args.dtype}, {OPTIONS}")
    for column in ("backend", "how", "us per call", "kernel launches"):
        table.add_column(column, justify="left" if column in ("backend", "how") else "right")
    for row in rows:
        launches = row["kernel_launches"]
        table.add_row(row["backend"], row["how"], f"{row['us_per_call']:.0f}",
                      "-" if launches is None else str(launches))
    Console(width=max(100, Console().width)).print(table)
    write_csv(rows, env, "bench_small_calls")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
