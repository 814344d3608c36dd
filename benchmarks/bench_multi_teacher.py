"""Several teachers: forward+backward of kdfast.multi_teacher_distill_loss (the mixture, and the average) against a
loop of single-teacher kdfast calls, eager PyTorch (and torch.compile) and the copy floor at the logits level; and
kdfast.linear_multi_teacher_distill_loss against the floor of its GEMMs (the student's forward, d hidden and d
weight, and one per teacher) in the fused linear form, beside the same mixture with the teachers' logits given
(linear_student_multi_teacher_distill_loss: no teacher GEMM in the step).

Same inputs, one process; medians of interleaved rounds and ratios. CPU default: M = 3 teachers, 512 x 32000 fp32,
forward KL + CE(0.5); linear: M = 2 teachers (H 256 and 384), 512 tokens, H_s = 256, V = 32000 (--full: 2048
tokens at the logits level and 4096 in the linear form, torch.compile, 5 rounds, and the fused linear contenders'
extra peak memory, each in a fresh process).
On a GPU (--device cuda, e.g. --dtype bf16 --tokens 8192 --vocab 128256 --hidden 2048 --teacher-hidden 2048 4096,
as benchmarks/gpu_check_linear.sh runs it): the inputs made on the device, triton.testing.do_bench medians, the copy
floor measured on the device, each contender's extra peak memory from torch.cuda's peak counters, and the mixture
also with backend="triton" (the teachers mixed inside the kernel, kernels/mixture.py) and backend="cuda" (mixed
inside the CUDA kernel, csrc/cuda/mixed_teachers.cuh), and Triton's reading each teacher twice per pass
(KDFAST_TRITON_MIX_READS=twice) beside its default (once). A contender that raises on the device is
reported as failed (the table's last column, the CSV's `error`), and one whose loss disagrees with the float64
reference (on the first rows) is not timed.

    python benchmarks/bench_multi_teacher.py [--full] [--tokens N --linear-tokens N --vocab V --repeats R]
                                             [--device cuda --dtype bf16 --hidden H_s --teacher-hidden H_1 H_2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import (  # noqa: E402
    DTYPES,
    add_memory_option,
    environment,
    extra_peaks,
    floor_bandwidths,
    floor_probes,
    mib,
    parse_benchmark_args,
    time_methods,
    write_csv,
)
from gemm_floor import gemm_floor  # noqa: E402

import kdfast  # noqa: E402
from kdfast.reference import multi_teacher_distill_loss_reference  # noqa: E402

FULL_SETTINGS = {"tokens": 2048, "linear_tokens": 4096, "compile": True, "repeats": 5, "memory": True}
TEACHER_HIDDEN = (256, 384)
LARGE_CHUNK = 1024
# The explicit GPU backends of the mixture, beside "auto" (on a GPU: Triton's kernel, until a GPU run has timed both).
GPU_BACKENDS = ("triton", "cuda")
# The loss is checked against the float64 reference on the first rows only: on a GPU the reference's float64
# temporaries of the whole [M, N, V] would take tens of GiB, and on the CPU its every row took 14 s of this
# benchmark's 37 (each row's loss is computed on its own: a wrong kernel shows on any of them).
GPU_CHECK_ROWS, CPU_CHECK_ROWS, LINEAR_CHECK_ROWS = 1024, 256, 256


def grad_of(loss_fn, *inputs):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    loss = loss_fn(*leaves)
    torch.autograd.grad(loss[0] if isinstance(loss, tuple) else loss, leaves)  # (loss, components) with components


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def on_gpu(args) -> bool:
    return torch.device(getattr(args, "device", "cpu")).type == "cuda"


def logits_inputs(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(args.tokens, args.vocab, generator=generator, device=device) * 2).to(dtype)
    teachers = (torch.randn(args.teachers, args.tokens, args.vocab, generator=generator, device=device) * 2).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator, device=device)
    return student, teachers, labels


def mixture_name(backend: str) -> str:
    return "kdfast mixture" if backend == "auto" else f"kdfast mixture (backend={backend})"


# The Triton mixing kernel reading each teacher's block twice per pass (kdfast.backends.triton_backend,
# mixture_reads_once), timed beside the default (once) on a GPU: on an H200 it took 17.4 ms against 12.1.
READS_TWICE = "triton-twice"
READS_TWICE_NAME = "kdfast mixture (backend=triton, reads twice)"


def mixture_call(backend: str, student, teachers, labels, **settings):
    """multi_teacher_distill_loss on `backend`, or on Triton reading each teacher twice (READS_TWICE)."""
    if backend != READS_TWICE:
        return kdfast.multi_teacher_distill_loss(student, teachers, labels, backend=backend, **settings)
    with mock.patch.dict(os.environ, {"KDFAST_TRITON_MIX_READS": "twice"}):
        return kdfast.multi_teacher_distill_loss(student, teachers, labels, backend="triton", **settings)


def logits_contenders(args, student, teachers, labels):
    settings = dict(temperature=args.temperature, ce_weight=args.ce_weight)

    def eager(x):  # in float32 whatever the logits' dtype, as bench_distill's eager contender
        return multi_teacher_distill_loss_reference(x, teachers, labels, dtype=torch.float32, **settings)

    def loop(x):  # what the trainers that offer several teachers run: one loss per teacher, averaged
        return sum(kdfast.distill_loss(x, teacher, labels, **settings) for teacher in teachers) / args.teachers

    methods = {"torch eager (mixture)": lambda: grad_of(eager, student)}
    if args.compile:
        compiled = torch.compile(eager)
        methods["torch.compile (same)"] = lambda: grad_of(compiled, student)
        # kdfast's op traced into a compiled step (kdfast.multi_teacher_ops): the eager call's time, or a cost.
        compiled_kdfast = torch.compile(lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, **settings))
        methods["kdfast mixture inside torch.compile"] = lambda: grad_of(compiled_kdfast, student)
    methods[f"loop of {args.teachers} kdfast calls (average)"] = lambda: grad_of(loop, student)
    for combine in ("mixture", "average"):
        methods[f"kdfast {combine}"] = lambda combine=combine: grad_of(
            lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, combine=combine, **settings), student)
    # What the trainers call every step: each teacher's own divergence beside the loss, to log it.
    methods["kdfast mixture, return_components"] = lambda: grad_of(
        lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, return_components=True, **settings), student)
    if on_gpu(args):
        for backend in GPU_BACKENDS:
            methods[mixture_name(backend)] = lambda backend=backend: grad_of(
                lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, backend=backend, **settings),
                student)
        methods[READS_TWICE_NAME] = lambda: grad_of(
            lambda x: mixture_call(READS_TWICE, x, teachers, labels, **settings), student)
    # Overwritten by its gradient on every call (the same work each time), as bench_distill's in-place contender.
    work = student.clone()
    methods["kdfast mixture (inplace_backward)"] = lambda: grad_of(
        lambda x: kdfast.multi_teacher_distill_loss(x, teachers, labels, inplace_backward=True, **settings), work)
    return methods


def disagreement(value: float, truth: float, dtype: torch.dtype) -> str | None:
    tolerance = 1e-3 if dtype == torch.float32 else 5e-3
    if abs(value - truth) > tolerance * max(1.0, abs(truth)):
        return f"disagrees with the float64 reference ({value:.6g} vs {truth:.6g}): not timed"
    return None


def check_logits(args, student, teachers, labels) -> dict:
    """backend -> why its mixture is not timed (None: it agrees with the float64 reference)."""
    rows = min(args.tokens, GPU_CHECK_ROWS if on_gpu(args) else CPU_CHECK_ROWS)
    student, teachers, labels = student[:rows], teachers[:, :rows], labels[:rows]
    settings = dict(temperature=args.temperature, ce_weight=args.ce_weight)
    truth = multi_teacher_distill_loss_reference(student, teachers, labels, **settings).item()
    problems = {}
    for backend in ("auto", *((*GPU_BACKENDS, READS_TWICE) if on_gpu(args) else ())):
        try:
            value = mixture_call(backend, student, teachers, labels, **settings).item()
            problems[backend] = disagreement(value, truth, student.dtype)
        except Exception as error:  # e.g. the CUDA kernels failed to build: that contender fails, not the run
            problems[backend] = describe(error)
    return problems


def linear_inputs(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    hidden = randn(args.linear_tokens, args.hidden)
    weight = randn(args.vocab, args.hidden, scale=args.hidden ** -0.5)
    teacher_hidden = [randn(args.linear_tokens, size) for size in args.teacher_hidden]
    teacher_weight = [randn(args.vocab, size, scale=size ** -0.5) for size in args.teacher_hidden]
    labels = torch.randint(0, args.vocab, (args.linear_tokens,), generator=generator, device=device)
    return hidden, weight, teacher_hidden, teacher_weight, labels


ROUTED_SEQUENCE = 256
ROUTED_ONE_HOT = f"kdfast linear, sequences of {ROUTED_SEQUENCE} routed by one-hot weights"
ROUTED = f"kdfast linear, sequences of {ROUTED_SEQUENCE} routed (each row's teacher index)"
GIVEN = "kdfast linear mixture, the teachers' logits given (linear_student_multi_teacher_distill_loss)"


def linear_loop_name(teachers: int) -> str:
    return f"loop of {teachers} kdfast linear calls (average)"


def linear_mixture_name(backend: str) -> str:
    return "kdfast linear mixture" if backend == "auto" else f"kdfast linear mixture (backend={backend})"


def linear_contenders(args, inputs=None):
    hidden, weight, teacher_hidden, teacher_weight, labels = inputs or linear_inputs(args)
    settings = dict(temperature=args.temperature, ce_weight=args.ce_weight)

    def loop(h, w):
        return sum(kdfast.linear_distill_loss(h, w, x, y, labels, **settings)
                   for x, y in zip(teacher_hidden, teacher_weight)) / len(teacher_hidden)

    def multi(combine, chunk_size="auto", backend="auto", return_components=False, weights=None):
        return lambda: grad_of(lambda h, w: kdfast.linear_multi_teacher_distill_loss(
            h, w, teacher_hidden, teacher_weight, labels, combine=combine, chunk_size=chunk_size, backend=backend,
            return_components=return_components, weights=weights, **settings), hidden, weight)

    # Routed: each sequence of ROUTED_SEQUENCE tokens to one teacher in turn, as a `teacher_id` column routes
    # examples; given as its one-hot weights (every head on every row) and as each row's teacher (its own head only).
    route = (torch.arange(len(labels), device=labels.device) // ROUTED_SEQUENCE) % len(teacher_hidden)
    one_hot = torch.nn.functional.one_hot(route, len(teacher_hidden)).float()
    # The teachers' logits at hand (their forwards ran elsewhere, before the step): the chunks read their rows, no
    # teacher GEMM runs; made once, outside the timing, as a caller would hold them.
    with torch.no_grad():
        given = [x @ w.t() for x, w in zip(teacher_hidden, teacher_weight)]

    def given_logits():
        return grad_of(lambda h, w: kdfast.linear_student_multi_teacher_distill_loss(h, w, given, labels, **settings),
                       hidden, weight)

    # chunk_size="auto" keeps a chunk within the CPU's memory budget (48 MiB for all the models' logits); larger
    # chunks buy GEMM efficiency with memory, so one larger chunk is timed beside it.
    # the student's forward, d hidden, d weight, each teacher's forward (gemm_floor.py: in kdfast's chunks on the CPU)
    methods = {f"{3 + len(teacher_hidden)} GEMMs alone (floor)": gemm_floor(hidden, weight, teacher_hidden,
                                                                             teacher_weight),
               linear_loop_name(len(teacher_hidden)): lambda: grad_of(loop, hidden, weight),
               "kdfast linear mixture": multi("mixture"), "kdfast linear average": multi("average"),
               "kdfast linear mixture, return_components": multi("mixture", return_components=True),
               f"kdfast linear mixture (chunk_size={LARGE_CHUNK})": multi("mixture", LARGE_CHUNK),
               ROUTED_ONE_HOT: multi("mixture", weights=one_hot), ROUTED: multi("mixture", weights=route),
               GIVEN: given_logits}
    if on_gpu(args):
        methods.update({linear_mixture_name(backend): multi("mixture", backend=backend) for backend in GPU_BACKENDS})
    return methods


def check_linear(args, inputs) -> dict:
    """backend -> why its fused linear mixture is not timed (None: it agrees with the float64 reference on the
    first rows' logits)."""
    hidden, weight, teacher_hidden, teacher_weight, labels = inputs
    rows = min(args.linear_tokens, LINEAR_CHECK_ROWS)
    settings = dict(temperature=args.temperature, ce_weight=args.ce_weight)
    truth = multi_teacher_distill_loss_reference(
        hidden[:rows].double() @ weight.double().t(),
        [x[:rows].double() @ w.double().t() for x, w in zip(teacher_hidden, teacher_weight)], labels[:rows],
        **settings).item()
    problems = {}
    for backend in ("auto", *(GPU_BACKENDS if on_gpu(args) else ())):
        try:
            value = kdfast.linear_multi_teacher_distill_loss(
                hidden[:rows], weight, [x[:rows] for x in teacher_hidden], teacher_weight, labels[:rows],
                backend=backend, **settings).item()
            problems[backend] = disagreement(value, truth, hidden.dtype)
        except Exception as error:
            problems[backend] = describe(error)
    return problems


def linear_memory_contender(settings: dict, name: str):
    """The fused linear contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    return linear_contenders(argparse.Namespace(**settings))[name]


def probe(methods: dict) -> dict:
    """Each contender called once (its first call: compile, build, autotune), name -> why it failed; the others'
    call is their first warm-up round."""
    failed = {}
    for name, fn in methods.items():
        try:
            fn()
        except Exception as error:  # a contender that fails on the device is a row of the table, not a crash
            failed[name] = describe(error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return failed


def timed(methods: dict, device, repeats: int, warmup: int):
    """(name -> median ms, name -> why it failed). On the CPU the rounds are interleaved (time_methods); on a GPU
    each is timed alone by do_bench, so that one failing there costs only its own row."""
    if device.type != "cuda":
        return time_methods(methods, device, repeats, warmup), {}
    medians, failed = {}, {}
    for name, fn in methods.items():
        try:
            medians.update(time_methods({name: fn}, device, repeats, warmup))
        except Exception as error:
            failed[name] = describe(error)
            torch.cuda.empty_cache()
    return medians, failed


def measured(console, methods: dict, failed: dict, device, repeats: int, warmup: int, what: str, floors=None):
    """Probe and time the contenders not already failed: (name -> median ms, name -> why it failed). `floors`,
    name -> callable timed with them and never failing, are the passes whose times give the bandwidths."""
    floors = floors or {}
    failed = {**failed, **probe({name: fn for name, fn in methods.items() if name not in failed})}
    working = {name: fn for name, fn in methods.items() if name not in failed}
    console.print(f"[dim]timing {len(working)} {what}{''.join(f' and {name}' for name in floors)}, {repeats} "
                  "rounds...[/dim]")
    medians, late = timed({**working, **floors}, device, repeats, warmup)
    return medians, {**failed, **late}


def peaks_of(methods: dict, medians: dict, failed: dict, args, device, factory="memory_contender") -> dict:
    """extra_peaks of the contenders timed (name -> bytes); on a GPU, where they run in this process, one that
    raises there is marked failed (in `failed`) instead of ending the run."""
    def guarded(name, fn):
        def call():
            try:
                fn()
            except Exception as error:
                failed[name] = describe(error)
        return call

    timed_ones = {name: fn for name, fn in methods.items() if name in medians}
    if device.type == "cuda":
        timed_ones = {name: guarded(name, fn) for name, fn in timed_ones.items()}
    peaks = extra_peaks(timed_ones, args, device, __file__, factory=factory)
    return {name: peak for name, peak in peaks.items() if name not in failed}


def failed_for(names: dict, problems: dict) -> dict:
    """contender -> why it is not timed, from the checks' backend -> problem (names: contender -> backend)."""
    return {name: problems[backend] for name, backend in names.items() if problems.get(backend)}


def refuse_on_cpu(failed: dict, device) -> None:
    """On the CPU a wrong loss ends the run before anything is timed, as it always has."""
    if failed and device.type != "cuda":
        raise SystemExit(f"kdfast's mixture disagrees with the float64 reference: not timing it ({failed})")


def logits_rows(console, args, device, env) -> list[dict]:
    student, teachers, labels = logits_inputs(args)
    checks = check_logits(args, student, teachers, labels)
    failed = failed_for({mixture_name("auto"): "auto", "kdfast mixture (inplace_backward)": "auto",
                         **{mixture_name(b): b for b in GPU_BACKENDS}, READS_TWICE_NAME: READS_TWICE}, checks)
    refuse_on_cpu(failed, device)
    methods = logits_contenders(args, student, teachers, labels)
    probes = floor_probes(student, teachers[0], device)
    # Two warm-up calls each, as before: the probe's and one more (the floors' rounds interleaved with theirs).
    medians, failed = measured(console, methods, failed, device, args.repeats, 1, "logits-level contenders",
                               floors={name: fn for name, (fn, _) in probes.items()})
    bandwidth, memory_bandwidth = floor_bandwidths(medians, probes)
    # On a GPU each contender's extra peak memory in this process; on the CPU not measured at this level.
    peaks = peaks_of(methods, medians, failed, args, device) if device.type == "cuda" else {}
    # The floor: the student and the M teachers read once, the gradient written once, at the copy bandwidth (and
    # at the memory's: bench_distill.inplace_method).
    floor_bytes = student.numel() * student.element_size() * (args.teachers + 2)
    floor_ms, memory_floor_ms = floor_bytes / bandwidth * 1e3, floor_bytes / memory_bandwidth * 1e3
    loop_ms = medians.get(f"loop of {args.teachers} kdfast calls (average)")
    return [{"form": "logits", "method": name, "median_ms": medians.get(name),
             "x_floor": medians[name] / floor_ms if name in medians else None,
             "x_memory_floor": medians[name] / memory_floor_ms if name in medians else None,
             "memory_floor_ms": memory_floor_ms,
             "x_loop": loop_ms / medians[name] if name in medians and loop_ms else None, "floor_ms": floor_ms,
             "extra_peak_bytes": peaks.get(name), "tokens": args.tokens, "vocab": args.vocab,
             "teachers": args.teachers, **env, "error": failed.get(name)}
            for name in methods]


def linear_rows(console, args, device, env) -> list[dict]:
    inputs = linear_inputs(args)
    checks = check_linear(args, inputs)
    failed = failed_for({linear_mixture_name("auto"): "auto", **{linear_mixture_name(b): b for b in GPU_BACKENDS}},
                        checks)
    refuse_on_cpu(failed, device)
    methods = linear_contenders(args, inputs)
    # Seconds per call on the CPU: the probe's call is the one warm-up.
    medians, failed = measured(console, methods, failed, device, args.repeats, 0, "fused linear contenders")
    peaks = peaks_of(methods, medians, failed, args, device, factory="linear_memory_contender")
    teachers = len(inputs[2])
    floor_name, loop_name = next(iter(methods)), linear_loop_name(teachers)
    gemm_ms, loop_ms = medians.get(floor_name), medians.get(loop_name)
    return [{"form": "linear", "method": name, "median_ms": medians.get(name),
             "x_floor": medians[name] / gemm_ms if name in medians and gemm_ms else None,
             "x_loop": loop_ms / medians[name] if name in medians and loop_ms else None, "floor_ms": gemm_ms,
             "extra_peak_bytes": peaks.get(name), "tokens": args.linear_tokens, "vocab": args.vocab,
             "teachers": teachers, **env, "error": failed.get(name)}
            for name in methods]


def run(args) -> list[dict]:
    console = Console(width=max(120, Console().width))
    device = torch.device(args.device)
    env = environment(device)
    rows = logits_rows(console, args, device, env)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the logits level's inputs are gone: its cached blocks too
    rows += linear_rows(console, args, device, env)
    # The CPU's fp32 run keeps its columns (the committed CSV's); any other run also says its dtype, the heads'
    # hidden sizes and why a contender failed.
    plain = device.type == "cpu" and args.dtype == "fp32" and not any(row["error"] for row in rows)
    for row in rows:
        error = row.pop("error")
        if not plain:
            row.update(dtype=args.dtype, hidden=args.hidden,
                       teacher_hidden=" ".join(map(str, args.teacher_hidden)), error=error)
    report(console, rows, args, env)
    write_csv(rows, env, name="bench_multi_teacher")
    return rows


def report(console, rows, args, env) -> None:
    for form, title in (("logits", f"{args.teachers} teachers, {args.tokens} x {args.vocab} {args.dtype} logits, "
                                   f"forward KL + CE({args.ce_weight}); floor: {args.teachers + 2} x "
                                   f"{DTYPES[args.dtype].itemsize} bytes per element at the copy bandwidth "
                                   "(memory floor: at the faster of the copy and an in-place pass)"),
                        ("linear", f"{len(args.teacher_hidden)} teacher heads (H {tuple(args.teacher_hidden)}), "
                                   f"{args.linear_tokens} tokens, H_s {args.hidden}, V {args.vocab}; floor: the "
                                   "GEMMs alone")):
        on = "" if args.device == "cpu" else f" on {env['device']}"
        table = Table(title=f"{title}{on} (medians of {args.repeats} interleaved rounds)")
        failures = any(row.get("error") for row in rows)
        columns = (["method", "median ms", "x floor"] + ["x memory floor"] * (form == "logits")
                   + ["loop / this", "extra peak MiB"] + ["failed"] * failures)
        for column in columns:
            table.add_column(column, justify="left" if column in ("method", "failed") else "right")
        for row in (r for r in rows if r["form"] == form):
            cells = [row["method"], number(row["median_ms"], ".1f"), number(row["x_floor"], ".2f"),
                     *([number(row["x_memory_floor"], ".2f")] if form == "logits" else []),
                     number(row["x_loop"], ".2f"), mib(row.get("extra_peak_bytes"))]
            table.add_row(*cells, *[row.get("error") or ""] * failures)
        console.print(table)


def number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="the logits' and the heads' dtype (bf16 for the GPU run)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--linear-tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="the student's hidden size in the fused linear form")
    parser.add_argument("--teacher-hidden", type=int, nargs="+", default=list(TEACHER_HIDDEN),
                        help="the teachers' hidden sizes in the fused linear form (one per teacher)")
    parser.add_argument("--teachers", type=int, default=3, help="teachers at the logits level")
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
