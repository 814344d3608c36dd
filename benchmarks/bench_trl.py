"""Forward+backward of kdfast against TRL's own chunked kernels (trl/kernels/, TRL 1.16), each called as TRL calls it:
the divergence of its DistillationTrainer (`_chunked_divergence_loss`: the generalized JSD, beta 0 = forward KL, 1 =
reverse KL) against kdfast.linear_distill_loss(divergence="jsd", t2_scale=False, reduction="sum"), and the per-token
log-probs of its fused causal-LM forward (`ChunkedLogProbFunction`), alone, with the entropy and with a frozen head (d
hidden alone, as under LoRA), against kdfast.linear_token_logprobs, a one-layer model's fused LM head as TRL's GRPO
and SFT trainers score with it, on TRL's function and on kdfast's (bench_trl_fused_head.py), the loss of its async
trainer (`_chunked_jsd_loss`: a served teacher's top-k log-probs and tail bucket, one teacher or several routed by
row) against kdfast's drop-in (bench_trl_async.py), the loss of its server trainer (the student's whole logits,
then its own loss methods) against kdfast's subclass's fused sparse loss (bench_trl_server.py), and the
self-distillation loss of its SDFT and SDPO trainers (both models' logits, then its loss helpers) against kdfast's
subclasses' (bench_trl_self_distillation.py), and the loss of its IW-OPD trainer (likewise) against kdfast's
subclass's (bench_trl_iw_opd.py).

Same inputs, one process; medians of interleaved rounds, each pair's ratio, and how far the two agree (the summed
loss or log-probs, the entropy, the gradients of the student's hidden states and head). TRL folds its tiles in
torch on the CPU and in Triton on a GPU. On the CPU TRL's fresh [N, 32768] float32 tiles are faulted in and zeroed
by the OS on every call (glibc hands them back on free): each call's system time and page faults are reported, and
every contender is timed again in a child process whose allocator keeps freed memory (benchmarks/freed_memory.py), the
comparison with the page faults taken out.
CPU default: the divergence and the log-probs, N=256, H_s=256, H_t=384, V=32000 fp32, T=1, beta 0, 0.5, 1 (--full:
every comparison, N=2048 and each contender's extra peak memory, minutes). CUDA: N=8192, H_s=2048, H_t=4096, V=128256
bf16, and kdfast with fp32_logits (TRL keeps its logits in float32).

    python benchmarks/bench_trl.py [--full] [--tokens N --hidden H_s --teacher-hidden H_t --vocab V --betas B ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import namedtuple
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import (  # noqa: E402
    add_memory_option,
    environment,
    extra_peaks,
    mib,
    parse_benchmark_args,
    plain_settings,
    time_methods,
    write_csv,
)
from bench_linear import add_shape_arguments, make_inputs  # noqa: E402
from bench_trl_async import async_contenders, async_loss_available, served_candidates  # noqa: E402
from bench_trl_fused_head import fused_head_available, fused_head_contenders  # noqa: E402
from bench_trl_iw_opd import MODES as IW_OPD_MODES  # noqa: E402
from bench_trl_iw_opd import iw_opd_available, iw_opd_contenders  # noqa: E402
from bench_trl_self_distillation import MODES as SELF_DISTILLATION_MODES  # noqa: E402
from bench_trl_self_distillation import self_distillation_available, self_distillation_contenders  # noqa: E402
from bench_trl_server import served_top_k, server_contenders, server_loss_available  # noqa: E402
from freed_memory import Timings, interleaved_medians, medians_with_freed_memory_kept  # noqa: E402

import kdfast  # noqa: E402

CUDA = torch.cuda.is_available()
# `kdfast bench --full`: the CPU shape (TRL takes tens of seconds a call there) and the memory of each.
# The comparisons `--tasks` picks from, in the table's order.
TASK_FAMILIES = ("divergence", "log-probs", "fused-head", "async", "server", "self-distillation", "iw-opd")
# `make bench` on the CPU: the DistillationTrainer's divergence and the token log-probs, the two kernels TRL ships;
# every family took 151 s of its five minutes on a 2-core AMD EPYC (2026-12-07), these two 12 of its 44 calls.
CPU_DEFAULT_TASKS = ("divergence", "log-probs")
FULL_SETTINGS = {} if CUDA else {"tokens": 2048, "repeats": 5, "memory": True, "tasks": list(TASK_FAMILIES),
                                  "self_distillation_modes": list(SELF_DISTILLATION_MODES),
                                  "iw_opd_modes": list(IW_OPD_MODES)}
TRL, KDFAST, KDFAST_FP32 = "TRL", "kdfast", "kdfast, fp32_logits"
# What one call gives back: the summed loss (or log-probs) whose gradient is taken, the summed entropy (None where
# not computed) and the gradients of the student's hidden states and head.
Outcome = namedtuple("Outcome", "loss entropy grad_hidden grad_weight")
# A call in the process that keeps freed memory with more minor page faults than this (4 KiB pages, 1 MiB) is
# reported: its time there is not free of them.
FAULTS_WORTH_A_WARNING = 256
# How far each is from TRL's outcome: relative L2 over the whole tensor.
DIFFERENCES = ("loss_rel_diff", "entropy_rel_diff", "grad_hidden_rel_l2", "grad_weight_rel_l2")


def trl_kernels():
    """TRL's entry points: the DistillationTrainer's divergence, the log-prob Function and the vocabulary chunk its
    fused forward passes to it."""
    import trl

    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as error:
        if not (error.name or "").startswith("trl"):
            raise
        raise ModuleNotFoundError(f"TRL {trl.__version__} has no chunked kernels (TRL 1.16 has them)",
                                  name="trl") from error
    return _chunked_divergence_loss, ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE


def divergence_contenders(inputs, beta: float, args) -> dict:
    """method -> zero-argument callable: the summed divergence of every token, its gradients and the entropy."""
    chunked_divergence_loss, _, _ = trl_kernels()
    hs, ws = inputs["student_hidden"], inputs["student_weight"]
    ht, wt = inputs["teacher_hidden"], inputs["teacher_weight"]
    every_token = torch.ones(1, hs.shape[0], dtype=torch.long, device=hs.device)

    def trl():
        h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        # [1, N, H] as the trainer passes a batch; num_items_in_batch=1 makes its loss the sum, as kdfast's here.
        loss, entropy_sum, _ = chunked_divergence_loss(h[None], ht[None], w, wt, every_token, beta,
                                                       num_items_in_batch=1, temperature=args.temperature)
        return Outcome(loss.detach(), entropy_sum.detach(), *torch.autograd.grad(loss, (h, w)))

    def ours(**options):
        def call():
            h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
            loss, parts = kdfast.linear_distill_loss(h, w, ht, wt, divergence="jsd", beta=beta,
                                                     temperature=args.temperature, t2_scale=False, reduction="sum",
                                                     return_components=True, **options)
            entropy = getattr(parts, "entropy", None)  # LossComponents.entropy, where this kdfast has it
            return Outcome(loss.detach(), entropy, *torch.autograd.grad(loss, (h, w)))
        return call

    methods = {TRL: trl, KDFAST: ours()}
    if hs.dtype != torch.float32:  # TRL's logits are float32 whatever the heads' dtype: kdfast's the same way
        methods[KDFAST_FP32] = ours(fp32_logits=True)
    return methods


def logprob_contenders(inputs, with_entropy: bool, args, frozen_head: bool = False) -> dict:
    """method -> zero-argument callable: the summed log-probs of the tokens, their gradients and the entropy. With
    `frozen_head` the head gets no gradient (LoRA leaves the LM head frozen): d hidden alone."""
    _, chunked_logprob, vocab_chunk = trl_kernels()
    hs, ws, tokens = inputs["student_hidden"], inputs["student_weight"], inputs["labels"]

    def leaves():
        return hs.detach().requires_grad_(True), ws.detach().requires_grad_(not frozen_head)

    def outcome(loss, entropy, h, w):
        grads = torch.autograd.grad(loss, (h,) if frozen_head else (h, w))
        return Outcome(loss.detach(), None if entropy is None else entropy.detach().sum(), *grads,
                       *([None] if frozen_head else []))

    def trl():
        h, w = leaves()
        logprobs, entropy, *_ = chunked_logprob.apply(h, w, None, tokens, args.temperature, vocab_chunk, None, 1.0,
                                                      ("entropy",) if with_entropy else ())
        return outcome(logprobs.sum(), entropy, h, w)

    def ours():
        h, w = leaves()
        result = kdfast.linear_token_logprobs(h, w, tokens, temperature=args.temperature,
                                              return_entropy=with_entropy)
        logprobs, entropy = result if with_entropy else (result, None)
        return outcome(logprobs.sum(), entropy, h, w)

    return {TRL: trl, KDFAST: ours}


def _outcome_of(fn):
    return lambda: Outcome(*fn())


def contenders(inputs, args) -> dict:
    """task -> method -> callable, for the task families in `args.tasks`; the token log-probs only where this kdfast
    has linear_token_logprobs, the async and server trainers' losses where this TRL has them."""
    tasks = {}
    if "divergence" in args.tasks:
        tasks.update({f"divergence beta={beta:g}": divergence_contenders(inputs, beta, args) for beta in args.betas})
    if "log-probs" in args.tasks and hasattr(kdfast, "linear_token_logprobs"):
        tasks["log-probs"] = logprob_contenders(inputs, False, args)
        tasks["log-probs + entropy"] = logprob_contenders(inputs, True, args)
        tasks["log-probs, frozen head"] = logprob_contenders(inputs, False, args, frozen_head=True)
    if "fused-head" in args.tasks and fused_head_available():
        for trainer, frozen, bonus in (("GRPO", False, True), ("GRPO", True, True), ("GRPO", True, False),
                                       ("SFT", False, False), ("SFT", True, False)):
            task = (f"fused LM head ({trainer}), head {'frozen' if frozen else 'learns'}"
                    + (", no bonus" if trainer == "GRPO" and not bonus else ""))
            tasks[task] = {method: _outcome_of(fn)
                           for method, fn in fused_head_contenders(args, frozen, bonus, trainer).items()}
    if "async" in args.tasks and args.async_teachers and async_loss_available():
        candidates = served_candidates(inputs, args.top_k)
        for teachers in args.async_teachers:
            for beta in args.betas:
                task = f"async top-{args.top_k} beta={beta:g}" + (f", {teachers} teachers" if teachers > 1 else "")
                tasks[task] = {method: _outcome_of(fn)
                               for method, fn in async_contenders(inputs, candidates, beta, teachers, args).items()}
    if "server" in args.tasks and server_loss_available():
        for beta in args.betas:
            tasks[f"server top-{served_top_k(beta, args.top_k)} beta={beta:g}"] = {
                method: _outcome_of(fn) for method, fn in server_contenders(inputs, beta, args).items()}
    if "self-distillation" in args.tasks and self_distillation_available():
        for key in args.self_distillation_modes:
            name, mode = SELF_DISTILLATION_MODES[key]
            tasks[f"self-distillation, {name}"] = {
                method: _outcome_of(fn) for method, fn in self_distillation_contenders(inputs, mode, args).items()}
    if "iw-opd" in args.tasks and iw_opd_available():
        for key in args.iw_opd_modes:
            name, mode = IW_OPD_MODES[key]
            tasks[f"IW-OPD, {name}"] = {
                method: _outcome_of(fn) for method, fn in iw_opd_contenders(inputs, mode, args).items()}
    if not tasks:
        raise SystemExit(f"nothing to time: none of the tasks {args.tasks} is available with this TRL and kdfast")
    return tasks


def flat(tasks: dict) -> dict:
    return {f"{task}: {method}": fn for task, methods in tasks.items() for method, fn in methods.items()}


def memory_contender(settings: dict, name: str):
    """The contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    return flat(contenders(make_inputs(args, torch.device(args.device)), args))[name]


def timing_contenders(settings: dict) -> dict:
    """Every contender on freshly made inputs: what the child that keeps freed memory times (freed_memory.py)."""
    args = argparse.Namespace(**settings)
    return flat(contenders(make_inputs(args, torch.device(args.device)), args))


def relative_l2(ours: torch.Tensor | None, theirs: torch.Tensor | None) -> float | None:
    if ours is None or theirs is None:
        return None
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


def agreement(tasks: dict, dtype: torch.dtype) -> dict:
    """Each contender's differences from TRL's outcome ("task: method" -> DIFFERENCES; None for TRL's own), from
    one call of each, which also warms them up. Speed is only reported for kdfast computing what TRL computes:
    with float32 heads the losses must agree to 1e-3."""
    differences = {}
    for task, methods in tasks.items():
        theirs = methods[TRL]()
        differences[f"{task}: {TRL}"] = dict.fromkeys(DIFFERENCES)
        for method, fn in methods.items():
            if method == TRL:
                continue
            ours = fn()
            differences[f"{task}: {method}"] = dict(zip(DIFFERENCES, (
                relative_l2(ours.loss, theirs.loss), relative_l2(ours.entropy, theirs.entropy),
                relative_l2(ours.grad_hidden, theirs.grad_hidden), relative_l2(ours.grad_weight, theirs.grad_weight))))
            if dtype == torch.float32 and differences[f"{task}: {method}"]["loss_rel_diff"] > 1e-3:
                raise SystemExit(f"{task}: kdfast's {ours.loss.item()} vs TRL's {theirs.loss.item()}: not timing it")
    return differences


def run(args) -> list[dict]:
    import trl

    device = torch.device(args.device)
    inputs = make_inputs(args, device)
    tasks = contenders(inputs, args)
    console = Console(width=max(150, Console().width))
    if "log-probs" in args.tasks and "log-probs" not in tasks:
        console.print("[yellow]this kdfast has no linear_token_logprobs: only the divergence is compared[/yellow]")
    differences = agreement(tasks, inputs["student_hidden"].dtype)
    methods = flat(tasks)
    console.print(f"[dim]timing {len(methods)} calls, {args.repeats} interleaved rounds...[/dim]")
    # the agreement's call was the warm-up
    unmeasured = dict.fromkeys(methods)
    if device.type == "cuda":
        timings = Timings(time_methods(methods, device, args.repeats, warmup=0), unmeasured, unmeasured)
    else:
        timings = interleaved_medians(methods, args.repeats)
    kept = None
    if device.type == "cpu" and args.memory_kept:
        console.print("[dim]timing them again in a process whose allocator keeps freed memory...[/dim]")
        kept = medians_with_freed_memory_kept(f"{__file__}:timing_contenders", plain_settings(args), args.repeats)
    kept = kept or Timings(unmeasured, unmeasured, unmeasured)
    medians = timings.wall
    peaks = extra_peaks(methods, args, device, __file__)
    env = environment(device)
    rows = []
    for task, task_methods in tasks.items():
        for method in task_methods:
            name = f"{task}: {method}"
            trl_kept = kept.wall[f"{task}: {TRL}"]
            rows.append({"task": task, "method": method, "median_ms": medians[name],
                         "speedup_vs_trl": medians[f"{task}: {TRL}"] / medians[name],
                         "os_cpu_ms": timings.system[name], "page_faults": timings.faults[name],
                         "median_ms_memory_kept": kept.wall[name],
                         "speedup_vs_trl_memory_kept": trl_kept / kept.wall[name] if trl_kept else None,
                         "os_cpu_ms_memory_kept": kept.system[name], "page_faults_memory_kept": kept.faults[name],
                         **differences[name],
                         "extra_peak_bytes": peaks[name], **env, "trl": trl.__version__, "tokens": args.tokens,
                         "hidden": args.hidden, "teacher_hidden": args.teacher_hidden, "vocab": args.vocab,
                         "dtype": args.dtype, "temperature": args.temperature})
    report(console, rows, args, env)
    write_csv(rows, env, "bench_trl")
    return rows


def report(console, rows, args, env):
    table = Table(title=f"kdfast vs TRL {rows[0]['trl']}'s chunked kernels, fwd+bwd, N={args.tokens}, "
                        f"H_s={args.hidden}, H_t={args.teacher_hidden}, V={args.vocab} {args.dtype}, "
                        f"T={args.temperature} on {env['device']}")
    kept = rows[0]["median_ms_memory_kept"] is not None
    columns = ["task", "method", "median ms", "x TRL", "OS ms"]
    columns += ["ms, freed memory kept", "x TRL, kept"] if kept else []
    columns += ["loss diff", "entropy diff", "d hidden diff", "d weight diff", "extra peak MiB"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "method") else "right",
                         no_wrap=column in ("task", "method"))

    def difference(value):
        return "-" if value is None else f"{value:.1e}"

    def milliseconds(value):
        return "-" if value is None else f"{value:.1f}"

    for row in rows:
        cells = [row["task"], row["method"], f"{row['median_ms']:.1f}", f"{row['speedup_vs_trl']:.2f}",
                 milliseconds(row["os_cpu_ms"])]
        if kept:
            cells += [milliseconds(row["median_ms_memory_kept"]), f"{row['speedup_vs_trl_memory_kept']:.2f}"]
        table.add_row(*cells, *(difference(row[key]) for key in DIFFERENCES), mib(row["extra_peak_bytes"]))
    console.print(table)
    console.print(f"medians of {args.repeats} interleaved rounds; torch {env['torch']}, {env['threads']} threads; "
                  "diff: relative difference (L2 over the tensor) from TRL's result on the same inputs; loss: the "
                  "summed divergence or log-probs")
    if rows[0]["os_cpu_ms"] is not None:  # the CPU's
        console.print("OS ms: the system CPU time of a call, all threads (mostly the OS faulting in and zeroing the "
                      "pages of new allocations, glibc's malloc returning big blocks to it on free; the CSV has each "
                      "call's page faults)"
                      + ("; freed memory kept: the same calls timed in a process whose allocator keeps freed memory "
                         "(no page faults, for every contender alike: benchmarks/freed_memory.py)" if kept else ""))
    for row in rows if kept else ():
        if row["page_faults_memory_kept"] > FAULTS_WORTH_A_WARNING:
            console.print(f"[yellow]{row['task']}, {row['method']}: {row['page_faults_memory_kept']:.0f} page faults a "
                          "call even with freed memory kept: its time there still holds some[/yellow]")


class EveryTaskForAll(argparse.Action):
    """--tasks: the families named, or every one where "all" is."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(TASK_FAMILIES) if "all" in values else values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shape_arguments(parser, cpu_tokens=256)
    if not CUDA:
        parser.set_defaults(teacher_hidden=384)  # a teacher wider than the student, as in a real pair
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                        help="TRL's beta: 0 forward KL, 1 reverse KL, between them the generalized JSD")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--async-teachers", type=int, nargs="*", default=[1, 3],
                        help="the async trainer's loss (trl.experimental.async_distillation) with this many teachers, "
                             "rows routed among them (none: not timed)")
    parser.add_argument("--top-k", type=int, default=8, help="the served teacher's candidates per token (TRL's "
                        "teacher_top_k; the server trainer's loss_top_k at beta 0, its top-1 above), the completion's "
                        "token added where it is not among them")
    parser.add_argument("--self-distillation-modes", nargs="*", choices=list(SELF_DISTILLATION_MODES),
                        default=["top-k"], help="the SDFT / SDPO trainers' distillation modes timed (default: SDFT's "
                        "default, the student's top-100; --full: every one)")
    parser.add_argument("--iw-opd-modes", nargs="*", choices=list(IW_OPD_MODES), default=["iw-opd"],
                        help="the IW-OPD trainer's objectives timed (default: its default, the sampled-token IW-OPD; "
                        "--full: every one)")
    parser.add_argument("--tasks", nargs="+", choices=(*TASK_FAMILIES, "all"), action=EveryTaskForAll,
                        default=list(TASK_FAMILIES if CUDA else CPU_DEFAULT_TASKS),
                        help="which comparisons to time, or all (default: all on a GPU, the divergence and the "
                             "log-probs on the CPU; --full: all): the DistillationTrainer's divergence, the token "
                             "log-probs, TRL's fused LM head, the async trainer's loss, the server trainer's loss, "
                             "the SDFT / SDPO trainers' self-distillation loss, the IW-OPD trainer's loss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-kept", action=argparse.BooleanOptionalAction, default=not CUDA,
                        help="also time every contender in a process whose allocator keeps freed memory (default: "
                             "on the CPU, where TRL's fresh tensors are otherwise faulted in and zeroed by the OS on "
                             "every call)")
    add_memory_option(parser)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
