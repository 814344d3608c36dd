"""Several teachers: forward+backward of kdfast.multi_teacher_distill_loss (the mixture, and the average) against a
loop of single-teacher kdfast calls, eager PyTorch (and torch.compile) and the copy floor at the logits level; and
kdfast.linear_multi_teacher_distill_loss against the floor of its GEMMs (the student's forward, d hidden and d
weight, and one per teacher) in the fused linear form.

Same inputs, one process; medians of interleaved rounds and ratios. CPU default: M = 3 teachers, 512 x 32000 fp32,
forward KL + CE(0.5); linear: M = 2 teachers (H 256 and 384), 1024 tokens, H_s = 256, V = 32000 (--full: 2048
tokens at the logits level and 4096 in the linear form, torch.compile, 5 rounds, and the fused linear contenders'
extra peak memory, each in a fresh process).

    python benchmarks/bench_multi_teacher.py [--full] [--tokens N --linear-tokens N --vocab V --repeats R]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import (  # noqa: E402
    add_memory_option,
    copy_method,
    environment,
    extra_peaks,
    mib,
    parse_benchmark_args,
    time_methods,
    write_csv,
)

import kdfast  # noqa: E402
from kdfast.reference import multi_teacher_distill_loss_reference  # noqa: E402

FULL_SETTINGS = {"tokens": 2048, "linear_tokens": 4096, "compile": True, "repeats": 5, "memory": True}
TEACHER_HIDDEN = (256, 384)
LARGE_CHUNK = 1024


def grad_of(loss_fn, *inputs):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    torch.autograd.grad(loss_fn(*leaves), leaves)


def logits_contenders(args):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.tokens, args.vocab, generator=generator) * 2
    teachers = torch.randn(args.teachers, args.tokens, args.vocab, generator=generator) * 2
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    settings = dict(temperature=args.temperature, ce_weight=args.ce_weight)

    def eager(x):
        return multi_teacher_distill_loss_reference(x, teachers, labels, dtype=None, **settings)

    def loop(x):  # what the trainers that offer several teachers run: one loss per teacher, averaged
        return sum(kdfast.distill_loss(x, teacher, labels, **settings) for teacher in teachers) / args.teachers

    methods = {"torch eager (mixture)": lambda: grad_of(eager, student)}
    if args.compile:
        compiled = torch.compile(eager)
        methods["torch.compile (same)"] = lambda: grad_of(compiled, student)
    methods[f"loop of {args.teachers} kdfast calls (average)"] = lambda: grad_of(loop, student)
    for combine in ("mixture", "average"):
        methods[f"kdfast {combine}"] = lambda combine=combine: grad_of(
            lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, combine=combine, **settings), student)
    # Overwritten by its gradient on every call (the same work each time), as bench_distill's in-place contender.
    work = student.clone()
    methods["kdfast mixture (inplace_backward)"] = lambda: grad_of(
        lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, inplace_backward=True, **settings), work)
    truth = multi_teacher_distill_loss_reference(student, teachers, labels, **settings).item()
    if abs(kdfast.multi_teacher_distill_loss(student, teachers, labels, **settings).item() - truth) > 1e-3:
        raise SystemExit("kdfast's mixture disagrees with the float64 reference: not timing it")
    return methods, student


def linear_contenders(args):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.linear_tokens, args.hidden, generator=generator)
    weight = torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden ** 0.5
    teacher_hidden = [torch.randn(args.linear_tokens, size, generator=generator) for size in TEACHER_HIDDEN]
    teacher_weight = [torch.randn(args.vocab, size, generator=generator) / size ** 0.5 for size in TEACHER_HIDDEN]
    labels = torch.randint(0, args.vocab, (args.linear_tokens,), generator=generator)
    settings = dict(temperature=args.temperature, ce_weight=args.ce_weight)
    logits = torch.empty(args.linear_tokens, args.vocab)
    grad_weight = torch.empty_like(weight)

    def gemm_floor():  # the student's forward, d hidden, d weight, and each teacher's forward
        torch.mm(hidden, weight.t(), out=logits)
        torch.mm(logits, weight)
        torch.mm(logits.t(), hidden, out=grad_weight)
        for x, w in zip(teacher_hidden, teacher_weight):
            torch.mm(x, w.t(), out=logits)

    def loop(h, w):
        return sum(kdfast.linear_distill_loss(h, w, x, y, labels, **settings)
                   for x, y in zip(teacher_hidden, teacher_weight)) / len(teacher_hidden)

    def multi(combine, chunk_size="auto"):
        return lambda: grad_of(lambda h, w: kdfast.linear_multi_teacher_distill_loss(
            h, w, teacher_hidden, teacher_weight, labels, combine=combine, chunk_size=chunk_size, **settings),
            hidden, weight)

    # chunk_size="auto" keeps a chunk within the CPU's memory budget (48 MiB for all the models' logits); larger
    # chunks buy GEMM efficiency with memory, so one larger chunk is timed beside it.
    return {f"{3 + len(TEACHER_HIDDEN)} GEMMs alone (floor)": gemm_floor,
            "loop of 2 kdfast linear calls (average)": lambda: grad_of(loop, hidden, weight),
            "kdfast linear mixture": multi("mixture"), "kdfast linear average": multi("average"),
            f"kdfast linear mixture (chunk_size={LARGE_CHUNK})": multi("mixture", LARGE_CHUNK)}


def linear_memory_contender(settings: dict, name: str):
    """The fused linear contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    return linear_contenders(argparse.Namespace(**settings))[name]


def run(args) -> list[dict]:
    console = Console(width=max(120, Console().width))
    device, env = torch.device("cpu"), environment(torch.device("cpu"))
    methods, student = logits_contenders(args)
    copy, copy_bytes = copy_method(student, device)
    console.print(f"[dim]timing {len(methods)} logits-level contenders and a copy, {args.repeats} rounds...[/dim]")
    medians = time_methods({**methods, "copy": copy}, device, args.repeats)
    bandwidth = copy_bytes / (medians.pop("copy") / 1e3)
    # The floor: the student and the M teachers read once, the gradient written once, at the copy bandwidth.
    floor_ms = student.numel() * 4 * (args.teachers + 2) / bandwidth * 1e3
    rows = [{"form": "logits", "method": name, "median_ms": ms, "x_floor": ms / floor_ms,
             "x_loop": medians[f"loop of {args.teachers} kdfast calls (average)"] / ms, "floor_ms": floor_ms,
             "extra_peak_bytes": None, "tokens": args.tokens, "vocab": args.vocab, "teachers": args.teachers, **env}
            for name, ms in medians.items()]
    linear = linear_contenders(args)
    console.print(f"[dim]timing {len(linear)} fused linear contenders...[/dim]")
    linear_medians = time_methods(linear, device, args.repeats, warmup=1)
    peaks = extra_peaks(linear, args, device, __file__, factory="linear_memory_contender")
    gemm_ms = linear_medians[next(iter(linear))]
    rows += [{"form": "linear", "method": name, "median_ms": ms, "x_floor": ms / gemm_ms,
              "x_loop": linear_medians["loop of 2 kdfast linear calls (average)"] / ms, "floor_ms": gemm_ms,
              "extra_peak_bytes": peaks[name], "tokens": args.linear_tokens, "vocab": args.vocab,
              "teachers": len(TEACHER_HIDDEN), **env}
             for name, ms in linear_medians.items()]
    report(console, rows, args)
    write_csv(rows, env, name="bench_multi_teacher")
    return rows


def report(console, rows, args) -> None:
    for form, title in (("logits", f"{args.teachers} teachers, {args.tokens} x {args.vocab} fp32 logits, forward KL "
                                   f"+ CE({args.ce_weight}); floor: {args.teachers + 2} x 4 bytes per element at "
                                   "the copy bandwidth"),
                        ("linear", f"{len(TEACHER_HIDDEN)} teacher heads (H {TEACHER_HIDDEN}), {args.linear_tokens} "
                                   f"tokens, H_s {args.hidden}, V {args.vocab}; floor: the GEMMs alone")):
        table = Table(title=f"{title} (medians of {args.repeats} interleaved rounds)")
        for column in ("method", "median ms", "x floor", "loop / this", "extra peak MiB"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in (r for r in rows if r["form"] == form):
            table.add_row(row["method"], f"{row['median_ms']:.1f}", f"{row['x_floor']:.2f}", f"{row['x_loop']:.2f}",
                          mib(row.get("extra_peak_bytes")))
        console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--linear-tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    add_memory_option(parser)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
