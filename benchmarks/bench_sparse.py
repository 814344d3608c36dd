"""Forward+backward of kdfast.sparse_distill_loss (a teacher given as its top-k ids and log-probs) vs the same loss
in eager PyTorch as DistillKit and axolotl write it (the student's full log-softmax, gathered at the ids) and under
torch.compile, against two floors of 8 bytes per element (read the student's logits once, write the gradient): at the
copy's bandwidth and at the memory's (bench_distill.inplace_method).

Same inputs, same process; medians of interleaved rounds, ratios, and the extra peak memory of each contender (on
the CPU measured in a fresh process per contender, with --full or --memory).
CPU default: 2048 x 32000 fp32, K=32 (the teacher's top-32 at T=2), forward_kl + CE(0.5); --full adds
torch.compile (a minute's compile on the CPU), rounds and the memory. CUDA: 8192 x 128256 bf16, K=64, reporting
GB/s for the bytes the kernel must move.

    python benchmarks/bench_sparse.py [--full] [--tokens N --vocab V --top-k K --dtype fp32 --repeats R --compile]
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
    add_compile_option,
    add_memory_option,
    check_rows,
    environment,
    extra_peaks,
    floor_bandwidths,
    floor_probes,
    mib,
    parse_benchmark_args,
    time_methods,
    write_csv,
)

import kdfast  # noqa: E402
from kdfast.reference import sparse_distill_loss_reference  # noqa: E402

FLOOR_BYTES_PER_ELEMENT = 8  # the student's logits read once (fp32), the gradient written once
# `kdfast bench --full` on the CPU: what `make bench` leaves out to finish in minutes (on a GPU the defaults are full).
FULL_SETTINGS = {} if torch.cuda.is_available() else {"compile": True, "repeats": 7, "memory": True}


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float):
    """What a teacher cache stores: the top-k ids of the teacher's softmax at `temperature` and their log-probs."""
    logprobs = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def distillkit_style_loss(student_logits, teacher_ids, teacher_logprobs, labels, *, temperature, ce_weight):
    """The top-k forward KL in eager PyTorch as the tools that do it today write it: the student's full log-softmax
    at T, gathered at the teacher's ids, against the renormalised top-k teacher; plus CE; T^2 scaling; mean."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logprobs.float(), dim=-1)  # renormalised over the K ids
    kd = (log_p.exp() * (log_p - log_q.gather(-1, teacher_ids))).sum(-1).mean() * temperature ** 2
    ce = torch.nn.functional.cross_entropy(student_logits.float(), labels)
    return kd + ce_weight * ce


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    student = torch.randn(args.tokens, args.vocab, generator=generator).to(dtype).to(device)
    teacher = torch.randn(args.tokens, args.vocab, generator=generator) * 2
    ids, logprobs = top_k_targets(teacher, args.top_k, args.temperature)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    return student, ids.to(device), logprobs.to(device), labels


def options(args, tail="bucket") -> dict:
    return dict(divergence="forward_kl", temperature=args.temperature, ce_weight=args.ce_weight, tail=tail)


def contenders(student, ids, logprobs, labels, args, with_compile):
    """name -> zero-argument callable doing forward + the gradient of the student's logits."""
    def fwd_bwd(loss_fn, logits):
        x = logits.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(x), x)

    def eager(x):
        return distillkit_style_loss(x, ids, logprobs, labels, temperature=args.temperature,
                                     ce_weight=args.ce_weight)

    methods = {"torch eager (DistillKit-style top-k)": lambda: fwd_bwd(eager, student)}
    if with_compile:
        compiled = torch.compile(eager)
        methods["torch.compile (same)"] = lambda: fwd_bwd(compiled, student)
    methods["kdfast bucket (fresh gradient)"] = lambda: fwd_bwd(
        lambda x: kdfast.sparse_distill_loss(x, ids, logprobs, labels, **options(args)), student)
    # In place: the logits are overwritten by their gradient on every call (the same work each time).
    work = student.clone()
    methods["kdfast bucket (inplace_backward)"] = lambda: fwd_bwd(
        lambda x: kdfast.sparse_distill_loss(x, ids, logprobs, labels, inplace_backward=True, **options(args)), work)
    methods["kdfast renormalize (inplace_backward)"] = lambda: fwd_bwd(
        lambda x: kdfast.sparse_distill_loss(x, ids, logprobs, labels, inplace_backward=True,
                                             **options(args, "renormalize")), work)
    return methods


def memory_contender(settings: dict, name: str):
    """The contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    student, ids, logprobs, labels = make_inputs(args, torch.device(args.device))
    return contenders(student, ids, logprobs, labels, args, name.startswith("torch.compile"))[name]


def check_against_reference(student, ids, logprobs, labels, args):
    """Speed is only reported for a loss that is right: checked on rows spread over the batch (bench_distill's
    check_rows; over every row the two float64 references took 18 s of this benchmark's 34)."""
    rows = check_rows(args.tokens)
    student, ids, logprobs, labels = student[rows], ids[rows], logprobs[rows], labels[rows]
    for tail in ("bucket", "renormalize"):
        check = kdfast.sparse_distill_loss(student, ids, logprobs, labels, **options(args, tail)).item()
        truth = sparse_distill_loss_reference(student, ids, logprobs, labels, **options(args, tail)).item()
        if abs(check - truth) > 1e-3 * max(1.0, abs(truth)):
            raise SystemExit(f"kdfast ({tail}) disagrees with the reference ({check} vs {truth}): not timing it")
    eager = distillkit_style_loss(student, ids, logprobs, labels, temperature=args.temperature,
                                  ce_weight=args.ce_weight).item()
    renormalize = kdfast.sparse_distill_loss(student, ids, logprobs, labels, **options(args, "renormalize")).item()
    if abs(eager - renormalize) > 1e-3 * max(1.0, abs(renormalize)):
        raise SystemExit(f"the eager baseline computes another loss ({eager} vs {renormalize}): not timing it")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    student, ids, logprobs, labels = make_inputs(args, device)
    check_against_reference(student, ids, logprobs, labels, args)

    console = Console(width=max(110, Console().width))
    methods = contenders(student, ids, logprobs, labels, args, args.compile)
    probes = floor_probes(student, student, device)
    console.print(f"[dim]timing {', '.join(methods)} and {', '.join(probes)}, {args.repeats} interleaved "
                  "rounds...[/dim]")
    medians = time_methods({**methods, **{name: probe for name, (probe, _) in probes.items()}}, device, args.repeats)
    peaks = extra_peaks(methods, args, device, __file__)
    bandwidth, memory_bandwidth = floor_bandwidths(medians, probes)
    floor_bytes = student.numel() * (FLOOR_BYTES_PER_ELEMENT if device.type == "cpu" else 2 * student.element_size())
    floor_ms = floor_bytes / bandwidth * 1e3
    memory_floor_ms = floor_bytes / memory_bandwidth * 1e3
    eager_ms = medians["torch eager (DistillKit-style top-k)"]
    compile_ms = medians.get("torch.compile (same)")
    env = environment(device)
    rows = []
    for name in methods:
        ms = medians[name]
        rows.append({"method": name, "median_ms": ms, "extra_peak_bytes": peaks[name], **env,
                     "tokens": args.tokens, "vocab": args.vocab, "top_k": args.top_k, "dtype": args.dtype,
                     "temperature": args.temperature, "ce_weight": args.ce_weight,
                     "speedup_vs_eager": eager_ms / ms, "speedup_vs_compile": compile_ms / ms if compile_ms else None,
                     "ratio_to_floor": ms / floor_ms, "floor_ms": floor_ms, "copy_bandwidth_gbs": bandwidth / 1e9,
                     "ratio_to_memory_floor": ms / memory_floor_ms, "memory_floor_ms": memory_floor_ms,
                     "memory_bandwidth_gbs": memory_bandwidth / 1e9, "gbs": floor_bytes / (ms / 1e3) / 1e9})
    report(console, rows, env, args, floor_ms, bandwidth)
    write_csv(rows, env, "bench_sparse")
    return rows


def report(console, rows, env, args, floor_ms, bandwidth):
    table = Table(title=f"sparse teacher fwd+bwd, {args.tokens} x {args.vocab} {args.dtype}, K={args.top_k}, "
                        f"forward_kl + CE({args.ce_weight}), T={args.temperature} on {env['device']}")
    for column in ("method", "median ms", "x eager", "x compile", "x copy floor", "x memory floor", "GB/s",
                   "extra peak MiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        vs_compile = f"{row['speedup_vs_compile']:.2f}" if row["speedup_vs_compile"] else "-"
        table.add_row(row["method"], f"{row['median_ms']:.1f}", f"{row['speedup_vs_eager']:.2f}", vs_compile,
                      f"{row['ratio_to_floor']:.2f}", f"{row['ratio_to_memory_floor']:.2f}", f"{row['gbs']:.0f}",
                      mib(row["extra_peak_bytes"]))
    console.print(table)
    per_element = FLOOR_BYTES_PER_ELEMENT if args.device == "cpu" else 2 * DTYPES[args.dtype].itemsize
    memory = rows[0]["memory_bandwidth_gbs"]
    console.print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> copy floor ({per_element} bytes per element: the "
                  f"logits read once, the gradient written) {floor_ms:.1f} ms; memory bandwidth {memory:.1f} GB/s "
                  f"(the faster of the copy and an in-place pass) -> memory floor "
                  f"{floor_ms * bandwidth / 1e9 / memory:.1f} ms; GB/s = floor bytes / time; medians of "
                  f"{args.repeats}; torch {env['torch']}, {env['threads']} threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 2048)
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--top-k", type=int, default=64 if cuda else 32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7 if cuda else 3)  # `make bench`'s five minutes on the CPU
    add_compile_option(parser)
    add_memory_option(parser)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
