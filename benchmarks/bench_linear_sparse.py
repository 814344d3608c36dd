"""Forward+backward of kdfast.linear_sparse_distill_loss (the student's hidden states and LM head, the teacher as
its stored top-k ids and log-probs) vs the same call with kd_weight=0 (plain fused-linear CE: the cost of a step
without a teacher), vs linear_distill_loss with a live teacher head as wide as the student's and 4x wider, vs
the eager top-k loss of the tools that do it today (the student's full logits), and with the teacher's dense logits
given: linear_student_distill_loss against distill_loss and eager PyTorch on the student's full logits.

Same inputs, same process; medians of interleaved rounds, ratios, and the extra peak memory of each (on the CPU
measured in a fresh process per contender, with --full or --memory).
CPU default: N=512, H_s=256, V=32000 fp32, K=32, forward_kl + CE(0.5), T=2; teacher heads H_t=256 and 1024
(--full: N=4096 and the memory).

    python benchmarks/bench_linear_sparse.py [--full] [--tokens N --hidden H --vocab V --top-k K --wide-teacher H_t]
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
    DTYPES,
    add_memory_option,
    environment,
    extra_peaks,
    mib,
    parse_benchmark_args,
    time_methods,
    write_csv,
)
from bench_sparse import distillkit_style_loss, top_k_targets  # noqa: E402

import kdfast  # noqa: E402
from kdfast.reference import distill_loss_reference, linear_sparse_distill_loss_reference  # noqa: E402

SPARSE, NO_TEACHER = "kdfast linear_sparse_distill_loss", "kdfast same call, kd_weight=0 (plain CE)"
GIVEN_LOGITS = "kdfast linear_student_distill_loss, teacher logits given"
# `kdfast bench --full` on the CPU: what `make bench` leaves out to finish in minutes (on a GPU the defaults are full).
FULL_SETTINGS = {} if torch.cuda.is_available() else {"tokens": 4096, "memory": True}


def live_teacher_name(width: int) -> str:
    return f"kdfast linear_distill_loss, live teacher H_t={width}"


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    inputs = dict(student_hidden=randn(args.tokens, args.hidden),
                  student_weight=randn(args.vocab, args.hidden, scale=args.hidden ** -0.5 * 4),
                  labels=torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device))
    for width in sorted({args.hidden, args.wide_teacher}):
        inputs[f"teacher_hidden_{width}"] = randn(args.tokens, width)
        inputs[f"teacher_weight_{width}"] = randn(args.vocab, width, scale=width ** -0.5 * 4)
    # The cache holds the top-k of the teacher as wide as the student (any teacher would do: the cost is K's).
    hidden, weight = inputs[f"teacher_hidden_{args.hidden}"], inputs[f"teacher_weight_{args.hidden}"]
    teacher_logits = hidden.float() @ weight.float().t()
    inputs["teacher_ids"], inputs["teacher_logprobs"] = top_k_targets(teacher_logits, args.top_k, args.temperature)
    inputs["teacher_logits"] = teacher_logits.to(dtype)  # the same teacher, dense (its forward's logits)
    return inputs


def loss_options(args) -> dict:
    return dict(divergence="forward_kl", temperature=args.temperature, ce_weight=args.ce_weight)


def contenders(inputs, args):
    """name -> zero-argument callable: loss forward + gradients of the student's hidden states and head."""
    hs, ws, labels = inputs["student_hidden"], inputs["student_weight"], inputs["labels"]
    ids, logprobs, teacher_logits = inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["teacher_logits"]
    options = loss_options(args)

    def fwd_bwd(loss_fn):
        h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(h, w), (h, w))

    def live_teacher(width):
        ht, wt = inputs[f"teacher_hidden_{width}"], inputs[f"teacher_weight_{width}"]
        return lambda: fwd_bwd(lambda h, w: kdfast.linear_distill_loss(h, w, ht, wt, labels, **options))

    def eager(h, w):
        return distillkit_style_loss(h @ w.t(), ids, logprobs, labels, temperature=args.temperature,
                                     ce_weight=args.ce_weight)

    methods = {SPARSE: lambda: fwd_bwd(lambda h, w: kdfast.linear_sparse_distill_loss(h, w, ids, logprobs, labels,
                                                                                      **options)),
            NO_TEACHER: lambda: fwd_bwd(lambda h, w: kdfast.linear_sparse_distill_loss(
                h, w, ids, logprobs, labels, **{**options, "kd_weight": 0.0})),
            live_teacher_name(args.hidden): live_teacher(args.hidden),
            live_teacher_name(args.wide_teacher): live_teacher(args.wide_teacher),
            "torch eager top-k (student logits materialised)": lambda: fwd_bwd(eager),
            GIVEN_LOGITS: lambda: fwd_bwd(lambda h, w: kdfast.linear_student_distill_loss(h, w, teacher_logits, labels,
                                                                                       **options)),
            "kdfast distill_loss, teacher logits given (student logits materialised)": lambda: fwd_bwd(
                lambda h, w: kdfast.distill_loss(h @ w.t(), teacher_logits, labels, **options)),
            "torch eager, teacher logits given (student logits materialised)": lambda: fwd_bwd(
                lambda h, w: distill_loss_reference(h @ w.t(), teacher_logits, labels, dtype=torch.float32,
                                                    **options))}
    methods.update(liger_kl_contenders(hs, ws, teacher_logits, labels, args.temperature, fwd_bwd))
    return methods


def liger_kl_contenders(hs, ws, teacher_logits, labels, temperature, fwd_bwd) -> dict:
    """On a GPU with Liger-Kernel: its LigerFusedLinearKLDivLoss (a student head against a given target
    distribution, Triton only) and kdfast's given-logits form on the same work, the KL alone (no CE, no T^2, a mean
    over the kept rows): Liger is given q = softmax(teacher / T), kdfast the teacher's logits."""
    if hs.device.type != "cuda":
        return {}
    try:
        from liger_kernel.transformers.fused_linear_kl_div import LigerFusedLinearKLDivLoss
    except ImportError:
        return {}
    target = torch.softmax(teacher_logits.float() / temperature, dim=-1).to(hs.dtype)
    liger = LigerFusedLinearKLDivLoss(reduction="batchmean", temperature=temperature)
    return {"Liger LigerFusedLinearKLDivLoss (KL alone)": lambda: fwd_bwd(lambda h, w: liger(h, w, target, labels)),
            "kdfast linear_student_distill_loss (KL alone)": lambda: fwd_bwd(
                lambda h, w: kdfast.linear_student_distill_loss(h, w, teacher_logits, labels, temperature=temperature,
                                                                t2_scale=False))}


def memory_contender(settings: dict, name: str):
    """The contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    return contenders(make_inputs(args, torch.device(args.device)), args)[name]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    inputs = make_inputs(args, device)
    student = dict(student_hidden=inputs["student_hidden"], student_weight=inputs["student_weight"],
                   teacher_ids=inputs["teacher_ids"], teacher_logprobs=inputs["teacher_logprobs"],
                   labels=inputs["labels"])
    check = kdfast.linear_sparse_distill_loss(**student, **loss_options(args)).item()
    truth = linear_sparse_distill_loss_reference(**student, **loss_options(args)).item()
    dense = kdfast.linear_student_distill_loss(inputs["student_hidden"], inputs["student_weight"],
                                               inputs["teacher_logits"], inputs["labels"], **loss_options(args))
    dense_truth = distill_loss_reference(inputs["student_hidden"].double() @ inputs["student_weight"].double().t(),
                                         inputs["teacher_logits"], inputs["labels"], **loss_options(args))
    for ours, theirs in ((check, truth), (dense.item(), dense_truth.item())):
        if abs(ours - theirs) > 1e-3 * max(1.0, abs(theirs)):
            raise SystemExit(f"kdfast disagrees with the reference ({ours} vs {theirs}): not timing it")

    console = Console(width=max(110, Console().width))
    methods = contenders(inputs, args)
    console.print(f"[dim]timing {', '.join(methods)}, {args.repeats} interleaved rounds...[/dim]")
    medians = time_methods(methods, device, args.repeats, warmup=1)  # seconds per call: one warm-up is enough
    peaks = extra_peaks(methods, args, device, __file__)
    env = environment(device)
    sparse_ms = medians[SPARSE]
    rows = [{"method": name, "median_ms": medians[name], "extra_peak_bytes": peaks[name], **env,
             "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "top_k": args.top_k,
             "dtype": args.dtype, "time_vs_sparse": medians[name] / sparse_ms,
             "time_vs_plain_ce": medians[name] / medians[NO_TEACHER]} for name in methods]
    report(console, rows, args, env)
    write_csv(rows, env, "bench_linear_sparse")
    return rows


def report(console, rows, args, env):
    table = Table(title=f"fused linear fwd+bwd on a stored teacher (top-k, or dense logits), N={args.tokens}, "
                        f"H_s={args.hidden}, V={args.vocab} {args.dtype}, K={args.top_k}, "
                        f"forward_kl + CE({args.ce_weight}), T={args.temperature} on {env['device']}")
    for column in ("method", "median ms", "time / sparse", "time / plain CE", "extra peak MiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['median_ms']:.0f}", f"{row['time_vs_sparse']:.2f}",
                      f"{row['time_vs_plain_ce']:.2f}", mib(row["extra_peak_bytes"]))
    console.print(table)
    console.print(f"medians of {args.repeats} interleaved rounds; torch {env['torch']}, {env['threads']} threads; "
                  "'time / sparse' above 1 is that many times slower than the stored teacher; extra peak: process "
                  "RSS high-water mark above the memory held before the call (CPU)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 512)
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    parser.add_argument("--wide-teacher", type=int, default=8192 if cuda else 1024,
                        help="the wider live teacher's hidden size (the other is as wide as the student)")
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--top-k", type=int, default=64 if cuda else 32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    add_memory_option(parser)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
