"""`kdfast teacher-cache`: runs a Hugging Face causal LM from a local folder over text or token ids and stores its
top-k (or sampled) next-token log-probs per token, for training students with `linear_sparse_distill_loss` without
the teacher in memory. Kill it at any point and run the same command again: it finishes what is missing."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DESCRIPTION = ("store a teacher's top-k (or sampled) next-token log-probs per token, resumably, for distilling "
               "without the teacher in memory")
MODEL_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True,
                        help="a causal-LM checkpoint folder (nothing is fetched)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="a UTF-8 text file, tokenised with the teacher's tokenizer")
    source.add_argument("--tokens", type=Path, help="token ids: a .pt/.npy tensor (1-D stream or 2-D windows) or a "
                                                    "datasets folder with an input_ids column")
    parser.add_argument("--out", type=Path, required=True, help="the cache folder (created; resumed if it exists)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the teacher's)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per window, as the student will train on")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--top-k", type=int, default=32, help="store the k most probable ids (default 32)")
    method.add_argument("--samples", type=int, help="store n samples from the teacher instead (ids with counts)")
    parser.add_argument("--temperature", type=float, default=1.0, help="the teacher's softmax temperature")
    parser.add_argument("--logprob-dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--model-dtype", choices=sorted(MODEL_DTYPES), default="auto")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward")
    parser.add_argument("--windows-per-shard", type=int, default=256)
    parser.add_argument("--max-windows", type=int, help="only the first N windows")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (--samples)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache with other settings in --out")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    for name in ("seq_len", "batch_size", "windows_per_shard", "top_k", "samples", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq_len" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {value}")
    if not args.teacher.is_dir():
        parser.error(f"--teacher {args.teacher}: no such folder")


def run(args) -> int:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdfast.teacher_cache.data import stored_tokens, text_tokens, token_windows
    from kdfast.teacher_cache.writer import build_teacher_cache

    console = Console()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher, local_files_only=True)
    with console.status("loading the teacher"):
        model = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True,
                                                     dtype=MODEL_DTYPES[args.model_dtype] or "auto")
        model = model.to(args.device).eval()
    with console.status("reading the tokens"):
        tokens = text_tokens(args.text, tokenizer) if args.text else stored_tokens(args.tokens)
        windows = token_windows(tokens, args.seq_len, args.max_windows)
    method, k = ("sample", args.samples) if args.samples else ("top_k", args.top_k)
    console.print(f"{windows.shape[0]} windows of {windows.shape[1]} tokens; {method} k={k} at T={args.temperature}")
    cache = build_teacher_cache(model, windows, args.out, tokenizer=tokenizer, k=k, method=method,
                                temperature=args.temperature, seed=args.seed, logprob_dtype=args.logprob_dtype,
                                windows_per_shard=args.windows_per_shard, batch_size=args.batch_size,
                                teacher_name=str(args.teacher), overwrite=args.overwrite, console=console)
    console.print(summary(cache))
    return 0


def summary(cache) -> str:
    stats = cache.stats
    rate = f"{stats['tokens_per_second']:,.0f} tokens/s" if stats["tokens_per_second"] else "nothing left to compute"
    return (f"{cache.folder}: {stats['tokens']:,} tokens, {stats['bytes'] / 2**20:.1f} MiB = "
            f"{stats['bytes_per_token']:.1f} bytes/token; this run computed {stats['shards_computed']} shards "
            f"and kept {stats['shards_reused']} ({rate})")
