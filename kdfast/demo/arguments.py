"""The options of `kdfast distill` (kdfast.demo.main), apart from its heavy imports: the CLI builds its
subcommand's parser from these."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

DESCRIPTION = ("distils a small LLaMA-style student from a stronger teacher on the CPU, beside the same student "
               "trained with plain cross-entropy (and, with --teacher-cache, students of the teacher's stored top-k), "
               "and reports what the run measured")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=240, help="training steps of each student (default 240)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="steps to train the teacher when it is not cached (default: 4 x --steps)")
    parser.add_argument("--teacher", type=Path, help="a causal-LM checkpoint directory to use as the teacher")
    parser.add_argument("--student", type=Path, help="a checkpoint directory to start both students from")
    parser.add_argument("--data", type=Path, help="a UTF-8 text file (default: the Python standard library)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when one is trained")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="the students' learning rate")
    # Measured with the default teacher: T=2 gave a held-out perplexity of 69.6 at 240 steps, T=1 64.0.
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--teacher-cache", action="store_true",
                        help="also train students on the teacher's stored top-k log-probs (a teacher cache built "
                             "once over the students' batches, or reused), with no teacher forward per step")
    parser.add_argument("--cache-k", type=int, nargs="+", default=[32, 8, 64], metavar="K",
                        help="top-k of the cached teachers (default 32 8 64): the first trains beside the others "
                             "and is compared at equal wall time, the rest at equal steps")
    parser.add_argument("--cache-samples", type=int, nargs="*", default=[32], metavar="N",
                        help="also a student on n samples per token from the teacher, with counts (tail="
                             "'renormalize': the unbiased sampled estimator); default 32, none to skip")
    parser.add_argument("--teachers", type=int, default=1,
                        help="N > 1: a teacher per contiguous part (domain) of the text, and students of their "
                             "mixture, of each alone and of plain CE, with each model's perplexity per domain")
    parser.add_argument("--cross-tokenizer", action="store_true",
                        help="students of another tokenizer (a BPE of --student-vocab-size tokens, trained on other "
                             "documents, digits apart) than the "
                             "teacher's: one distilled across the vocabularies (GOLD's hybrid), one of plain CE")
    parser.add_argument("--student-vocab-size", type=int, default=4096,
                        help="with --cross-tokenizer: the students' BPE vocabulary (default 4096)")
    parser.add_argument("--eval-windows", type=int, default=160, help="held-out windows of --seq-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--out", type=Path, default=default_out_dir(), help="where the report files go")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.teachers < 1:
        parser.error(f"--teachers must be >= 1, got {args.teachers}")
    if args.teachers > 1 and (args.teacher or args.student or args.teacher_cache):
        parser.error("--teachers trains its own teachers, one per domain: it takes neither --teacher, --student "
                     "nor --teacher-cache")
    if args.cross_tokenizer and (args.teachers > 1 or args.student or args.teacher_cache):
        parser.error("--cross-tokenizer trains its students from scratch with their own tokenizer, from one "
                     "teacher: it takes neither --teachers, --student nor --teacher-cache")
    if args.student and not args.teacher:
        parser.error("--student needs --teacher (the tokenizer comes from the teacher's checkpoint)")
    if min(args.cache_k + args.cache_samples) < 1:
        parser.error(f"--cache-k and --cache-samples values must be >= 1, got {args.cache_k} {args.cache_samples}")
    args.teacher_steps = args.teacher_steps or 4 * args.steps


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="kdfast distill", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdfast" / "distill"


def default_out_dir() -> Path:
    checkout_results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if os.environ.get("KDFAST_RESULTS_DIR"):
        return Path(os.environ["KDFAST_RESULTS_DIR"])
    return checkout_results if checkout_results.parent.is_dir() else Path("kdfast-distill-results")
