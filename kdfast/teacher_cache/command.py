"""`kdfast teacher-cache`: runs a Hugging Face causal LM from a local folder (or asks one behind a vLLM or SGLang
server) over text or token ids and stores its top-k (or sampled) next-token log-probs per token, for training students
with `linear_sparse_distill_loss` without the teacher in memory. Kill it at any point and run the same command again:
it finishes what is missing. Under torchrun (or with --num-shards / --shard-index in a job array) each process writes
its part of the shards and the last one to finish completes the cache. `kdfast teacher-cache convert` reads and
writes the top-k datasets of other tools."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

DESCRIPTION = ("store a teacher's top-k (or sampled) next-token log-probs per token, resumably, for distilling "
               "without the teacher in memory")
MODEL_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", type=Path, help="a causal-LM checkpoint folder (nothing is fetched)")
    teacher.add_argument("--server", metavar="URL",
                         help="a teacher behind an inference server (http://host:port), asked for each window's "
                              "top-k prompt log-probs; needs --tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="a UTF-8 text file, tokenised with the teacher's tokenizer")
    source.add_argument("--tokens", type=Path, help="token ids: a .pt/.npy tensor (1-D stream or 2-D windows) or a "
                                                    "datasets folder with an input_ids column")
    parser.add_argument("--out", type=Path, required=True, help="the cache folder (created; resumed if it exists)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the teacher's)")
    parser.add_argument("--vocab-size", type=int, help="ids the cache may hold (default: the tokenizer's length, at "
                                                       "most the teacher's LM-head rows)")
    served = parser.add_argument_group("a served teacher (--server)")
    served.add_argument("--api", choices=["vllm", "sglang"], default="vllm",
                        help="vllm: /v1/completions with prompt_logprobs (as `trl vllm-serve` and `vllm serve` "
                             "answer); sglang: /generate with input_top_logprobs")
    served.add_argument("--model", help="the served model's name (default: the one the server reports)")
    served.add_argument("--requests-in-flight", type=int, default=8, help="windows asked at once (default 8)")
    served.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="per request, connecting and reading (default 120)")
    served.add_argument("--retries", type=int, default=5,
                        help="retries of a request that fails (connection, timeout, 5xx), with backoff (default 5)")
    processes = parser.add_argument_group("many processes (default: torchrun's RANK and WORLD_SIZE)")
    processes.add_argument("--num-shards", type=int, help="processes (jobs of an array) splitting the work")
    processes.add_argument("--shard-index", type=int, help="this process's index in [0, --num-shards)")
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
    for name in ("seq_len", "batch_size", "windows_per_shard", "top_k", "samples", "max_windows",
                 "requests_in_flight", "vocab_size", "num_shards"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq_len" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {value}")
    if args.teacher is not None and not args.teacher.is_dir():
        parser.error(f"--teacher {args.teacher}: no such folder")
    if args.server is not None and args.tokenizer is None:
        parser.error("--server needs --tokenizer (a folder with the served model's tokenizer): the cache holds "
                     "token ids, and the student's tokenizer is checked against it")
    if (args.num_shards is None) != (args.shard_index is None):
        parser.error("--num-shards and --shard-index go together (or neither, under torchrun)")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")


def writer_part(args):
    """This process's part: --num-shards / --shard-index, else torchrun's RANK / WORLD_SIZE, else the whole cache."""
    from kdfast.teacher_cache.processes import WriterPart

    if args.num_shards is not None:
        return WriterPart(args.shard_index, args.num_shards)
    return WriterPart.from_environment()


def load_teacher(args, console):
    """The model (on this process's device: torchrun's LOCAL_RANK picks the GPU) or the served teacher."""
    if args.server is not None:
        from kdfast.teacher_cache.served import ServedTeacher

        return ServedTeacher(args.server, api=args.api, model=args.model, requests_in_flight=args.requests_in_flight,
                             request_timeout=args.request_timeout, retries=args.retries)
    from transformers import AutoModelForCausalLM

    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    with console.status("loading the teacher"):
        model = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True,
                                                     dtype=MODEL_DTYPES[args.model_dtype] or "auto")
    return model.to(device).eval()


def run(args) -> int:
    from rich.console import Console
    from transformers import AutoTokenizer

    from kdfast.teacher_cache.data import stored_tokens, text_tokens, token_windows
    from kdfast.teacher_cache.writer import build_teacher_cache

    console = Console()
    part = writer_part(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher, local_files_only=True)
    teacher = load_teacher(args, console)
    with console.status("reading the tokens"):
        tokens = text_tokens(args.text, tokenizer) if args.text else stored_tokens(args.tokens)
        windows = token_windows(tokens, args.seq_len, args.max_windows)
    method, k = ("sample", args.samples) if args.samples else ("top_k", args.top_k)
    console.print(f"{windows.shape[0]} windows of {windows.shape[1]} tokens; {method} k={k} at T={args.temperature}")
    cache = build_teacher_cache(teacher, windows, args.out, tokenizer=tokenizer, k=k, method=method,
                                temperature=args.temperature, seed=args.seed, logprob_dtype=args.logprob_dtype,
                                windows_per_shard=args.windows_per_shard, batch_size=args.batch_size,
                                vocab_size=args.vocab_size, teacher_name=str(args.teacher or args.server),
                                overwrite=args.overwrite, console=console, process_index=part.index,
                                num_processes=part.count)
    if cache is None:
        console.print(f"process {part.index} of {part.count}: its shards are written; the last process to finish "
                      f"completes the cache in {args.out}")
    else:
        console.print(summary(cache))
    return 0


def summary(cache) -> str:
    stats = cache.stats
    rate = f"{stats['tokens_per_second']:,.0f} tokens/s" if stats["tokens_per_second"] else "nothing left to compute"
    return (f"{cache.folder}: {stats['tokens']:,} tokens, {stats['bytes'] / 2**20:.1f} MiB = "
            f"{stats['bytes_per_token']:.1f} bytes/token; this run computed {stats['shards_computed']} shards "
            f"and kept {stats['shards_reused']} ({rate})")
