"""The fused linear loss's chunk size, chosen by measurement: forward+backward of kdfast.linear_distill_loss at each
chunk size (and "auto", the memory budget's choice), with the logits rounded to the GEMM's dtype and kept in
float32, beside the four GEMMs alone (the floor). Median ms and extra peak memory of each.

GPU default: N=8192, H_s=2048, H_t=4096, V=128256 bf16 (the fused linear benchmark's shape), chunks 1024-8192.
CPU default: N=2048, H=256, V=32000 fp32, chunks 256-2048.

    python benchmarks/bench_linear_chunks.py [--tokens N --hidden H --teacher-hidden H --vocab V --chunks C ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import DTYPES, environment, time_methods, write_csv  # noqa: E402
from bench_linear import add_shape_arguments, make_inputs  # noqa: E402

import kdfast  # noqa: E402
from kdfast.linear_chunks import Heads, TeacherHead, chunk_rows  # noqa: E402
from kdfast.logit_maps import LogitMap  # noqa: E402
from kdfast.memory import extra_peak_bytes  # noqa: E402

FLOOR = "four GEMMs alone (floor)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shape_arguments(parser, cpu_tokens=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192] if torch.cuda.is_available()
                        else [256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)


def auto_rows(inputs, fp32_logits: bool) -> int:
    """The rows "auto" picks for these inputs."""
    teacher = TeacherHead(inputs["teacher_hidden"], inputs["teacher_weight"], None, inputs["teacher_hidden"].dtype)
    heads = Heads(student_hidden=inputs["student_hidden"], student_weight=inputs["student_weight"], student_bias=None,
                  teacher=teacher, labels=None, student_map=LogitMap(), student_dtype=inputs["student_hidden"].dtype,
                  fp32_logits=fp32_logits)
    return chunk_rows("auto", heads)


def contenders(inputs, chunks, fp32_choices):
    hs, ws, ht, wt, labels = (inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                    "teacher_weight", "labels"))
    options = dict(divergence="forward_kl", temperature=2.0, ce_weight=0.5)

    def fwd_bwd(chunk, fp32_logits):
        def run():
            h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
            loss = kdfast.linear_distill_loss(h, w, ht, wt, labels, chunk_size=chunk, fp32_logits=fp32_logits,
                                              **options)
            torch.autograd.grad(loss, (h, w))
        return run

    methods = {}
    for fp32_logits in fp32_choices:
        for chunk in [*chunks, "auto"]:
            shown = f"auto ({auto_rows(inputs, fp32_logits)})" if chunk == "auto" else str(chunk)
            methods[(shown, fp32_logits)] = fwd_bwd(chunk, fp32_logits)

    def four_gemms():
        student = hs @ ws.t()
        teacher = ht @ wt.t()  # noqa: F841 (the teacher's head: the second GEMM every method pays)
        student @ ws, student.t() @ hs

    methods[(FLOOR, False)] = four_gemms
    return methods


def run(args) -> list[dict]:
    device = torch.device(args.device)
    inputs = make_inputs(args, device)
    fp32_choices = (False, True) if DTYPES[args.dtype] != torch.float32 else (False,)
    methods = contenders(inputs, args.chunks, fp32_choices)
    medians = time_methods(methods, device, args.repeats)
    peaks = ({key: extra_peak_bytes(fn, device) for key, fn in methods.items()} if device.type == "cuda"
             else dict.fromkeys(methods))  # on the CPU bench_linear measures memory (fresh processes)
    floor = medians[(FLOOR, False)]
    env = environment(device)
    rows = [{"chunk": chunk, "fp32_logits": fp32, "median_ms": medians[(chunk, fp32)],
             "ratio_to_gemm_floor": medians[(chunk, fp32)] / floor, "extra_peak_bytes": peaks[(chunk, fp32)],
             "tokens": args.tokens, "hidden": args.hidden, "teacher_hidden": args.teacher_hidden,
             "vocab": args.vocab, "dtype": args.dtype, **env} for chunk, fp32 in methods]
    table = Table(title=f"fused linear fwd+bwd by chunk size, N={args.tokens} H_s={args.hidden} "
                        f"H_t={args.teacher_hidden} V={args.vocab} {args.dtype}")
    for column in ("chunk rows", "fp32 logits", "median ms", "x GEMM floor", "extra peak MiB"):
        table.add_column(column, justify="left" if column == "chunk rows" else "right")
    for row in rows:
        peak = row["extra_peak_bytes"]
        table.add_row(str(row["chunk"]), "yes" if row["fp32_logits"] else "no", f"{row['median_ms']:.2f}",
                      f"{row['ratio_to_gemm_floor']:.3f}", "-" if peak is None else f"{peak / 2**20:.0f}")
    Console(width=max(100, Console().width)).print(table)
    write_csv(rows, env, "bench_linear_chunks")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
