"""Forward+backward of kdfast.linear_distill_loss (hidden states and LM heads in, no [tokens x vocab] logits)
vs eager PyTorch, torch.compile and Liger-Kernel's chunked LigerFusedLinearJSDLoss, against the four GEMMs
alone (both heads forward, d hidden, d weight): the floor of any fused linear loss.

Same inputs, same process; medians of interleaved rounds, ratios, and the extra peak memory of each (on the
CPU measured in a fresh process per contender, with --full or --memory).
CPU default: N=512, H=256, V=32000 fp32, forward_kl + CE(0.5), T=2; --full: N=4096, torch.compile (a minute's
compile on the CPU) and the memory. CUDA: N=8192, H_s=2048, H_t=4096, V=128256 bf16, torch.compile included.

    python benchmarks/bench_linear.py [--full] [--tokens N --hidden H --vocab V --repeats R --compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import (  # noqa: E402
    DTYPES,
    add_compile_option,
    add_memory_option,
    environment,
    extra_peaks,
    mib,
    parse_benchmark_args,
    time_methods,
    write_csv,
)
from gemm_floor import gemm_floor  # noqa: E402

import kdfast  # noqa: E402
from kdfast.reference import linear_distill_loss_reference  # noqa: E402

# `kdfast bench --full` on the CPU: what `make bench` leaves out to finish in minutes (on a GPU the defaults are full).
FULL_SETTINGS = {} if torch.cuda.is_available() else {"tokens": 4096, "repeats": 5, "compile": True, "memory": True}


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    scale = args.hidden ** -0.5 * 4  # logits of a few units, as a trained head gives
    return dict(student_hidden=randn(args.tokens, args.hidden),
                student_weight=randn(args.vocab, args.hidden, scale=scale),
                teacher_hidden=randn(args.tokens, args.teacher_hidden),
                teacher_weight=randn(args.vocab, args.teacher_hidden, scale=args.teacher_hidden ** -0.5 * 4),
                labels=torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device))


def contenders(inputs, options, with_compile, chunk_size="auto"):
    """name -> zero-argument callable: loss forward + gradients of the student's hidden states and head."""
    hs, ws = inputs["student_hidden"], inputs["student_weight"]
    ht, wt, labels = inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"]

    def fwd_bwd(loss_fn):
        h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(h, w), (h, w))

    def eager(h, w):
        return linear_distill_loss_reference(h, w, ht, wt, labels, dtype=None, **options)

    methods = {"torch eager": lambda: fwd_bwd(eager)}
    if with_compile:
        compiled = torch.compile(eager)
        methods["torch.compile"] = lambda: fwd_bwd(compiled)
    if importlib.util.find_spec("liger_kernel"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta=0 is forward KL in Liger's JSD; hard (CE) and soft (KD) weights as kdfast's ce/kd weights.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=options["ce_weight"], weight_soft_loss=1.0, beta=0.0,
                                        temperature=options["temperature"])
        methods["Liger chunked (LigerFusedLinearJSDLoss)"] = lambda: fwd_bwd(
            lambda h, w: liger(h, w, ht, wt, labels))
    methods["kdfast linear_distill_loss"] = lambda: fwd_bwd(
        lambda h, w: kdfast.linear_distill_loss(h, w, ht, wt, labels, chunk_size=chunk_size, **options))
    if hs.dtype != torch.float32:  # with 16-bit heads: the cost of logits never rounded to 16 bits
        methods["kdfast, fp32 logits"] = lambda: fwd_bwd(
            lambda h, w: kdfast.linear_distill_loss(h, w, ht, wt, labels, chunk_size=chunk_size, fp32_logits=True,
                                                    **options))

    # both heads' logits, d hidden and d weight: whole-size on a GPU, in kdfast's chunks on the CPU (gemm_floor.py)
    methods["four GEMMs alone (floor)"] = gemm_floor(hs, ws, [ht], [wt])
    return methods


def memory_contender(settings: dict, name: str):
    """The contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    inputs = make_inputs(args, torch.device(args.device))
    options = dict(divergence="forward_kl", temperature=args.temperature, ce_weight=args.ce_weight)
    return contenders(inputs, options, name == "torch.compile", args.chunk_size)[name]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    inputs = make_inputs(args, device)
    options = dict(divergence="forward_kl", temperature=args.temperature, ce_weight=args.ce_weight)
    heads = {k: v for k, v in inputs.items() if k != "labels"}
    check = kdfast.linear_distill_loss(**heads, labels=inputs["labels"], **options).item()
    truth = linear_distill_loss_reference(**heads, labels=inputs["labels"], **options).item()
    if abs(check - truth) > 1e-3 * max(1.0, abs(truth)):
        raise SystemExit(f"kdfast disagrees with the reference ({check} vs {truth}): not timing it")

    console = Console(width=max(110, Console().width))
    methods = contenders(inputs, options, args.compile, args.chunk_size)
    console.print(f"[dim]timing {', '.join(methods)}, {args.repeats} interleaved rounds...[/dim]")
    medians = time_methods(methods, device, args.repeats, warmup=1)  # seconds per call on the CPU: one is enough
    one_logits = args.tokens * args.vocab * 4
    env = environment(device)
    peaks = extra_peaks(methods, args, device, __file__)
    rows = [{"method": name, "median_ms": medians[name], "extra_peak_bytes": peaks[name]} for name in methods]
    floor_ms = medians["four GEMMs alone (floor)"]
    reference = {name: medians.get(name) for name in ("torch eager", "torch.compile",
                                                      "Liger chunked (LigerFusedLinearJSDLoss)")}
    for row in rows:
        row.update(env, tokens=args.tokens, hidden=args.hidden, teacher_hidden=args.teacher_hidden,
                   vocab=args.vocab, dtype=args.dtype, ratio_to_gemm_floor=row["median_ms"] / floor_ms,
                   extra_peak_vs_one_logits_tensor=(row["extra_peak_bytes"] / one_logits
                                                    if row["extra_peak_bytes"] is not None else None),
                   **{f"speedup_vs_{key.split()[0].lower().replace('.', '_')}": (value / row["median_ms"]
                                                                               if value else None)
                      for key, value in reference.items()})
    report(console, rows, args, env)
    write_csv(rows, env, "bench_linear")
    return rows


def report(console, rows, args, env):
    table = Table(title=f"fused linear fwd+bwd, N={args.tokens}, H_s={args.hidden}, H_t={args.teacher_hidden}, "
                        f"V={args.vocab} {args.dtype}, forward_kl + CE({args.ce_weight}), T={args.temperature} "
                        f"on {env['device']}")
    for column in ("method", "median ms", "x eager", "x compile", "x Liger", "x GEMM floor", "extra peak MiB",
                   "extra / [N,V] fp32"):
        table.add_column(column, justify="left" if column == "method" else "right")

    def ratio(value):
        return f"{value:.2f}" if value else "-"

    for row in rows:
        table.add_row(row["method"], f"{row['median_ms']:.0f}", ratio(row["speedup_vs_torch"]),
                      ratio(row["speedup_vs_torch_compile"]), ratio(row["speedup_vs_liger"]),
                      f"{row['ratio_to_gemm_floor']:.2f}", mib(row["extra_peak_bytes"]),
                      ratio(row["extra_peak_vs_one_logits_tensor"]))
    console.print(table)
    console.print(f"medians of {args.repeats} interleaved rounds; torch {env['torch']}, {env['threads']} threads; "
                  "extra peak: process RSS high-water mark above the memory held before the call (CPU)")


def add_shape_arguments(parser: argparse.ArgumentParser, cpu_tokens: int = 4096) -> None:
    """The heads' shape and dtype, as `make_inputs` reads them: the issue-sized GPU shape, a small one on the CPU."""
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tokens", type=int, default=8192 if cuda else cpu_tokens)
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    parser.add_argument("--teacher-hidden", type=int, default=4096 if cuda else 256)
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shape_arguments(parser, cpu_tokens=512)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5 if torch.cuda.is_available() else 3)
    add_compile_option(parser)
    add_memory_option(parser)
    parser.add_argument("--chunk-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="kdfast's chunk_size (tokens per chunk)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
