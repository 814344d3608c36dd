"""A teacher with another tokenizer: forward+backward of kdfast.cross_vocab_distill_loss ("uld", "hybrid", "mapped"
under forward KL and under JSD) against TRL's GOLD `ULDLoss` (plain ULD and its hybrid) on the same aligned rows, and
the floors of its bytes (the student's and the teacher's logits read once, the gradient written once) at the copy's
bandwidth and at the memory's (bench_distill.inplace_method).

Same inputs, one process; medians of interleaved rounds and ratios; each contender's result is checked against
TRL's (or the float64 reference) before it is timed. CPU default: 256 aligned rows, V_s = 32000, V_t = 40000, a
map of 24000 shared tokens (--full: 2048 rows, 5 rounds). On a GPU (--device cuda): the same contenders on the
device (triton.testing.do_bench medians), "mapped" on its Triton kernel and, beside it, on the torch backend (the
teacher's log-softmax and its gathered copy per chunk, then the sparse algebra in torch) and on the CUDA backend
(that gathered copy, then the CUDA sparse kernel), and uld and mapped in the CPU's chunks of rows beside the GPU's.

    python benchmarks/bench_cross_vocab.py [--full] [--rows N --student-vocab V --teacher-vocab V --repeats R]
                                           [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import (  # noqa: E402
    environment,
    floor_bandwidths,
    inplace_method,
    parse_benchmark_args,
    time_methods,
    write_csv,
)

import kdfast  # noqa: E402
from kdfast import cross_vocab_rows  # noqa: E402
from kdfast.native_build import cuda_extension_or_none  # noqa: E402
from kdfast.reference import cross_vocab_distill_loss_reference  # noqa: E402

FULL_SETTINGS = {"rows": 2048, "repeats": 5}


class Vocabulary:
    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def vocabularies(args):
    """Two made-up vocabularies sharing `args.shared` token strings, the student's in a shuffled order."""
    generator = torch.Generator().manual_seed(2)
    teacher = {f"t{i}": i for i in range(args.teacher_vocab)}
    shared = torch.randperm(args.teacher_vocab, generator=generator)[:args.shared].tolist()
    strings = [f"t{i}" for i in shared] + [f"s{i}" for i in range(args.student_vocab - args.shared)]
    order = torch.randperm(args.student_vocab, generator=generator).tolist()
    student = {strings[position]: index for index, position in enumerate(order)}
    return Vocabulary(student), Vocabulary(teacher)


def trl_uld(student_vocab, teacher_vocab, hybrid: bool, device: torch.device):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid,
                             uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    # The device as GOLDTrainer passes it: the hybrid's map of matched ids lives there.
    return ULDLoss(config, student_tokenizer=student_vocab if hybrid else None,
                   teacher_tokenizer=teacher_vocab if hybrid else None, device=device)


IN_PLACE = "kdfast mapped (inplace_backward)"
TORCH_MAPPED = "kdfast mapped (torch backend)"
CUDA_MAPPED = "kdfast mapped (cuda backend)"
JSD_MAPPED = "kdfast mapped (jsd)"
# On a GPU, the rows in chunks of the CPU's size (kdfast.cross_vocab_rows.CHUNK_ELEMENTS), as before the GPU's own
# chunk size: the two timed side by side until a run has measured the change.
CPU_CHUNKS = " (the CPU's chunks)"


def in_cpu_sized_chunks(loss):
    def chunked(x):
        with mock.patch.object(cross_vocab_rows, "GPU_CHUNK_ELEMENTS", cross_vocab_rows.CHUNK_ELEMENTS):
            return loss(x)
    return chunked


def contenders(args, device):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(args.rows, args.student_vocab, generator=generator) * 2).to(device)
    teacher = (torch.randn(args.rows, args.teacher_vocab, generator=generator) * 2).to(device)
    student_vocab, teacher_vocab = vocabularies(args)
    vocab_map = kdfast.VocabMap.from_tokenizers(student_vocab, teacher_vocab)
    # one sample, every position an answer token
    positions = torch.zeros(1, args.rows, dtype=torch.int64, device=device)

    def trl(hybrid):
        loss_fn = trl_uld(student_vocab, teacher_vocab, hybrid, device)

        def loss(x):
            return loss_fn(student_logits=x.unsqueeze(0), teacher_logits=teacher.unsqueeze(0),
                           student_labels=positions, teacher_labels=positions, student_input_ids=positions,
                           teacher_input_ids=positions).reshape(())
        return loss

    def ours(method, divergence=None, **keywords):
        divergence = divergence or ("jsd" if method == "hybrid" else "forward_kl")
        return lambda x: kdfast.cross_vocab_distill_loss(x, teacher, vocab_map=vocab_map, method=method,
                                                         divergence=divergence, t2_scale=False, **keywords)

    losses = {"TRL ULDLoss (uld)": trl(False), "kdfast uld": ours("uld"), "TRL ULDLoss (hybrid)": trl(True),
              "kdfast hybrid": ours("hybrid"), "kdfast mapped": ours("mapped"),
              IN_PLACE: ours("mapped", inplace_backward=True), JSD_MAPPED: ours("mapped", divergence="jsd")}
    if device.type == "cuda":
        losses[TORCH_MAPPED] = ours("mapped", backend="torch")
        for name in ("kdfast uld", "kdfast mapped"):
            losses[name + CPU_CHUNKS] = in_cpu_sized_chunks(losses[name])
        if cuda_extension_or_none() is not None:  # the CUDA sparse kernel over the map's ascending ids
            losses[CUDA_MAPPED] = ours("mapped", backend="cuda")
    check(losses, student, teacher, vocab_map)
    # The in-place contender overwrites its logits with the gradient on every call (the same work each time);
    # re-filling them is the caller's next forward, not the loss's.
    work = student.clone()
    methods = {name: (lambda loss=loss, name=name: backward(loss, work if name == IN_PLACE else student))
               for name, loss in losses.items()}
    return methods, student, teacher, vocab_map


def backward(loss_fn, student):
    leaf = student.detach().requires_grad_()
    torch.autograd.grad(loss_fn(leaf), leaf)


def check(losses, student, teacher, vocab_map):
    """Only a result that agrees is timed: kdfast's against TRL's (uld, hybrid) or the float64 reference (mapped)."""
    for ours, theirs in (("kdfast uld", "TRL ULDLoss (uld)"), ("kdfast hybrid", "TRL ULDLoss (hybrid)")):
        a, b = float(losses[ours](student)), float(losses[theirs](student))
        if abs(a - b) > 1e-4 * max(1.0, abs(b)):
            raise SystemExit(f"{ours} ({a}) disagrees with {theirs} ({b}): not timing it")
    mapped = float(losses["kdfast mapped"](student))
    for other in (TORCH_MAPPED, CUDA_MAPPED):
        if other in losses and abs(float(losses[other](student)) - mapped) > 1e-4 * max(1.0, abs(mapped)):
            raise SystemExit(f"{other} disagrees with kdfast mapped: not timing them")
    for name in ("kdfast uld", "kdfast mapped"):
        if name + CPU_CHUNKS in losses:
            ours, chunked = float(losses[name](student)), float(losses[name + CPU_CHUNKS](student))
            if abs(chunked - ours) > 1e-5 * max(1.0, abs(ours)):
                raise SystemExit(f"{name + CPU_CHUNKS} ({chunked}) disagrees with {name} ({ours}): not timing them")
    if float(losses[IN_PLACE](student)) != mapped:
        raise SystemExit(f"{IN_PLACE} disagrees with kdfast mapped: not timing it")
    for name, divergence in (("kdfast mapped", "forward_kl"), (JSD_MAPPED, "jsd")):
        ours = float(losses[name](student))
        truth = float(cross_vocab_distill_loss_reference(student, teacher, vocab_map=vocab_map, method="mapped",
                                                         divergence=divergence, t2_scale=False))
        if abs(ours - truth) > 1e-4 * max(1.0, abs(truth)):
            raise SystemExit(f"{name} ({ours}) disagrees with the float64 reference ({truth}): not timing it")


def run(args) -> list[dict]:
    console = Console(width=max(120, Console().width))
    device = torch.device(args.device)
    env = environment(device)
    methods, student, teacher, vocab_map = contenders(args, device)
    source = torch.cat([student, teacher], dim=1)
    target = torch.empty(args.rows, args.student_vocab * 2 + args.teacher_vocab, device=device)
    floors = {"copy": (lambda: target[:, :source.shape[1]].copy_(source), 2 * source.numel() * 4)}
    if device.type == "cpu":
        floors["in-place pass"] = inplace_method(source, source)
    console.print(f"[dim]timing {len(methods)} contenders and {', '.join(floors)}, {args.repeats} rounds...[/dim]")
    medians = time_methods({**methods, **{name: fn for name, (fn, _) in floors.items()}}, device, args.repeats,
                           warmup=1)
    bandwidth, memory_bandwidth = floor_bandwidths(medians, floors)
    # The floor: both logits read once and the student's gradient written once, at the copy's bandwidth and at the
    # memory's (bench_distill.inplace_method).
    floor_bytes = args.rows * (2 * args.student_vocab + args.teacher_vocab) * 4
    floor_ms, memory_floor_ms = floor_bytes / bandwidth * 1e3, floor_bytes / memory_bandwidth * 1e3
    rows = [{"method": name, "median_ms": ms, "x_floor": ms / floor_ms, "floor_ms": floor_ms,
             "x_memory_floor": ms / memory_floor_ms, "memory_floor_ms": memory_floor_ms, "rows": args.rows,
             "student_vocab": args.student_vocab, "teacher_vocab": args.teacher_vocab, "matched": vocab_map.matched,
             **env} for name, ms in medians.items()]
    for row in rows:
        against = "TRL ULDLoss (hybrid)" if "hybrid" in row["method"] else "TRL ULDLoss (uld)"
        row["trl_over_this"] = medians[against] / row["median_ms"]
    table = Table(title=f"{args.rows} aligned rows, V_s {args.student_vocab}, V_t {args.teacher_vocab}, "
                        f"{vocab_map.matched} shared tokens, fp32 fwd+bwd (medians of {args.repeats} interleaved "
                        "rounds)")
    for column in ("method", "median ms", "x copy floor", "x memory floor", "TRL / this"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['median_ms']:.1f}", f"{row['x_floor']:.2f}",
                      f"{row['x_memory_floor']:.2f}", f"{row['trl_over_this']:.2f}")
    console.print(table)
    write_csv(rows, env, name="bench_cross_vocab")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--student-vocab", type=int, default=32000)
    parser.add_argument("--teacher-vocab", type=int, default=40000)
    parser.add_argument("--shared", type=int, default=24000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (the default) or cuda")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
