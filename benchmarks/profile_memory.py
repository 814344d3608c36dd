"""Peak memory of one training step's loss + backward (student hidden states and LM head -> gradients) for a
sweep of vocab sizes and token counts: eager PyTorch, torch.compile, Liger-Kernel's chunked
LigerFusedLinearJSDLoss (when installed) and kdfast.linear_distill_loss. Prints a table and writes a CSV and
a PNG plot under benchmarks/results/.

    python benchmarks/profile_memory.py [--tokens 256 1024 --vocab 32000 64000 128256 256000 --hidden 256]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast profile`
import bench_linear  # noqa: E402
from bench_distill import DTYPES, RESULTS, environment, extra_peaks  # noqa: E402
from bench_linear import contenders, make_inputs  # noqa: E402

FLOOR = "four GEMMs alone (floor)"


def measure(args, tokens, vocab, device):
    shape = argparse.Namespace(device=args.device, tokens=tokens, vocab=vocab, hidden=args.hidden,
                               teacher_hidden=args.teacher_hidden, dtype=args.dtype, temperature=2.0, ce_weight=0.5,
                               chunk_size="auto")
    inputs = make_inputs(shape, device)
    options = dict(divergence="forward_kl", temperature=shape.temperature, ce_weight=shape.ce_weight)
    methods = {name: step for name, step in contenders(inputs, options, not args.no_compile).items() if name != FLOOR}
    if device.type == "cuda":
        for step in methods.values():
            step()  # compile, build and allocator warm-up are not the step's memory
    del inputs
    # On the CPU each contender runs in a fresh process (kdfast.memory), warmed up there first.
    peaks = extra_peaks(methods, shape, device, bench_linear.__file__)
    return [dict(tokens=tokens, vocab=vocab, hidden=args.hidden, dtype=args.dtype, method=name,
                 extra_peak_mib=peaks[name] / 2**20, logits_tensors=peaks[name] / (tokens * vocab * 4))
            for name in methods]


def plot(rows, path, env):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    token_counts = sorted({r["tokens"] for r in rows})
    figure, axes = plt.subplots(1, len(token_counts), figsize=(6 * len(token_counts), 4.5), squeeze=False)
    for axis, tokens in zip(axes[0], token_counts, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["vocab"], r["extra_peak_mib"]) for r in rows
                            if r["tokens"] == tokens and r["method"] == method)
            axis.plot([p[0] for p in points], [max(p[1], 1.0) for p in points], marker="o", label=method)
        axis.set(xscale="log", yscale="log", xlabel="vocab size", ylabel="extra peak memory (MiB)",
                 title=f"{tokens} tokens, H={rows[0]['hidden']}, {rows[0]['dtype']}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"loss + backward of one step on {env['device']} (torch {env['torch']})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192] if cuda else [256, 1024])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 64_000, 128_256, 256_000])
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    parser.add_argument("--teacher-hidden", type=int, default=4096 if cuda else 256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (a compile per shape)")


def run(args):
    device = torch.device(args.device)
    env = environment(device)
    shapes = [(t, v) for t in args.tokens for v in args.vocab]
    rows = []
    for tokens, vocab in track(shapes, description="measuring"):
        rows += measure(args, tokens, vocab, device)

    table = Table(title=f"extra peak memory of loss + backward, H_s={args.hidden}, H_t={args.teacher_hidden}, "
                        f"{args.dtype}, on {env['device']}")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table.add_column("tokens x vocab")
    for method in methods:
        table.add_column(f"{method} MiB (x [N,V] fp32)", justify="right")
    for tokens, vocab in shapes:
        cells = {r["method"]: f"{r['extra_peak_mib']:.0f} ({r['logits_tensors']:.2f})" for r in rows
                 if (r["tokens"], r["vocab"]) == (tokens, vocab)}
        table.add_row(f"{tokens} x {vocab}", *[cells.get(m, "-") for m in methods])
    Console(width=160).print(table)

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower() or "cpu"
    csv_path, png_path = RESULTS / f"profile_memory_{tag}.csv", RESULTS / f"profile_memory_{tag}.png"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], *env])
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)
    plot(rows, png_path, env)
    Console().print(f"wrote {csv_path} and {png_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
