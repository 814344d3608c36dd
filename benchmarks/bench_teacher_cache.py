"""Writing a teacher cache from a teacher in this process, from the same teacher behind a server (1 and 8 requests
in flight), and with 2 processes splitting the shards, side by side: tokens per second, bytes per token, and whether
each cache holds the same ids (and the same shard bytes, for the processes) as the one-process local cache.

Each contender is a whole `kdfast teacher-cache` command in a fresh process (what a user runs), on the same token
windows of a small causal LM; the server is `kdfast.teacher_cache.local_server`, which answers vLLM's
`/v1/completions` as vLLM does, running in a process of its own and one request at a time. Rounds are interleaved;
medians of each command's wall time (start-up and model loading included) and of the writer's own rate (the
manifest's tokens per second: the teacher's work and the writes; with 2 processes, all tokens over the slower's
time). Default: a 4-layer 256-wide model over 64 windows of 129 tokens, k=32 (--full: 256 windows, 5 rounds).

    python benchmarks/bench_teacher_cache.py [--full] [--windows N --seq-len L --top-k K --repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import environment, parse_benchmark_args, write_csv  # noqa: E402

FULL_SETTINGS = {"windows": 256, "repeats": 5}
LOCAL, PROCESSES = "local", "local, 2 processes"
SERVED = "served, {} in flight"  # vLLM's API
SERVER_START_SECONDS = 120


def _package_root() -> str:
    import kdfast

    return str(Path(kdfast.__file__).resolve().parent.parent)


def _environment(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": _package_root(), "OMP_NUM_THREADS": str(threads)}


def make_teacher(folder: Path, windows: int, seq_len: int) -> Path:
    """A small causal LM and its tokenizer saved in `folder`, and a token file of `windows` windows."""
    from kdfast.demo import models
    from kdfast.demo.corpus import encode, stdlib_documents, train_tokenizer

    train = stdlib_documents()[0][:300]  # enough text, and a tokenizer trained in seconds
    tokenizer = train_tokenizer(train, 4096)
    model = models.new_model(models.ModelSize(hidden=256, layers=4, heads=4), len(tokenizer), seq_len, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stream = encode(tokenizer, train).reshape(-1)
    needed = windows * (seq_len - 1) + 1
    if stream.numel() < needed:
        raise ValueError(f"the corpus holds {stream.numel()} tokens, fewer than {windows} windows of {seq_len} need")
    torch.save(stream[:needed].clone(), folder / "tokens.pt")
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_teacher(folder: Path, threads: int, top_k: int):
    """The local server on a free port, in its own process with `threads` threads, until the block ends (answering
    up to `top_k` log-probs a token, as `vllm serve --max-logprobs` does)."""
    import requests

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "kdfast.teacher_cache.local_server", "--model", str(folder),
                               "--api", "vllm", "--port", str(port), "--max-logprobs", str(top_k)],
                              env=_environment(threads),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + SERVER_START_SECONDS
    try:
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/v1/models", timeout=5).ok:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _cache_command(folder: Path, out: Path, args, *extra) -> list[str]:
    return [sys.executable, "-m", "kdfast.cli", "teacher-cache", "--tokens", str(folder / "tokens.pt"), "--out",
            str(out), "--seq-len", str(args.seq_len), "--top-k", str(args.top_k), "--windows-per-shard", "16",
            "--device", "cpu", *extra]


def contenders(folder: Path, url: str, args) -> dict:
    """name -> (the commands of one run, all started at once, and the threads each may use)."""
    local = ["--teacher", str(folder)]
    served = ["--server", url, "--tokenizer", str(folder), "--request-timeout", "600"]
    return {LOCAL: ([local], args.threads),
            PROCESSES: ([[*local, "--num-shards", "2", "--shard-index", str(i)] for i in range(2)], 1),
            **{SERVED.format(n): ([[*served, "--requests-in-flight", str(n)]], args.threads) for n in (1, 8)}}


def run_once(folder: Path, out: Path, args, commands: list, threads: int) -> float:
    """Seconds of one run, the cache written from nothing."""
    started = time.perf_counter()
    jobs = [subprocess.Popen(_cache_command(folder, out, args, *extra), env=_environment(threads),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for extra in commands]
    for job in jobs:
        _, err = job.communicate(timeout=3600)
        if job.returncode != 0:
            raise RuntimeError(f"`kdfast teacher-cache` failed: {err[-3000:]}")
    return time.perf_counter() - started


def writer_rate(out: Path) -> float:
    """The manifest's tokens per second: the teacher's work and the shard writes, without the command's start."""
    from kdfast.teacher_cache import TeacherCache

    return TeacherCache(out, verify=False).stats["tokens_per_second"]


def compare(out: Path, reference: Path) -> dict:
    from kdfast.teacher_cache import TeacherCache

    cache, local = TeacherCache(out), TeacherCache(reference)
    batch, expected = cache.batch(0, len(cache)), local.batch(0, len(local))
    same_bytes = all((out / entry["file"]).read_bytes() == (reference / entry["file"]).read_bytes()
                     for entry in local.manifest.shards.values())
    return {"bytes_per_token": cache.stats["bytes_per_token"],
            "ids_equal": bool(torch.equal(batch["teacher_ids"], expected["teacher_ids"])),
            "logprob_max_abs_diff": float((batch["teacher_logprobs"] - expected["teacher_logprobs"]).abs().max()),
            "shard_bytes_equal": same_bytes}


def run(args) -> list[dict]:
    console = Console(width=max(Console().width, 150))
    with tempfile.TemporaryDirectory(prefix="kdfast-bench-cache-") as scratch:
        scratch = Path(scratch)
        folder = make_teacher(scratch / "teacher", args.windows, args.seq_len)
        tokens = args.windows * (args.seq_len - 1)
        with served_teacher(folder, args.threads, args.top_k) as url:
            runs = contenders(folder, url, args)
            seconds, rates = {name: [] for name in runs}, {name: [] for name in runs}
            for round_ in range(args.repeats):
                for name, (commands, threads) in runs.items():
                    out = scratch / f"cache-{list(runs).index(name)}-{round_}"
                    seconds[name].append(run_once(folder, out, args, commands, threads))
                    rates[name].append(writer_rate(out))
        reference = scratch / "cache-0-0"
        rows = []
        for index, (name, values) in enumerate(seconds.items()):
            median = statistics.median(values)
            rows.append({"method": name, "windows": args.windows, "seq_len": args.seq_len, "k": args.top_k,
                         "median_s": round(median, 3), "command_tokens_per_s": round(tokens / median, 1),
                         "vs_local": round(statistics.median(seconds[LOCAL]) / median, 3),
                         "writer_tokens_per_s": round(statistics.median(rates[name]), 1),
                         **compare(scratch / f"cache-{index}-0", reference)})
    report(console, rows, args)
    write_csv(rows, environment(torch.device("cpu")), name="bench_teacher_cache")
    return rows


def report(console, rows, args) -> None:
    table = Table(title=f"kdfast teacher-cache: {args.windows} windows x {args.seq_len} tokens, k={args.top_k}, "
                        f"medians of {args.repeats} interleaved rounds (whole commands)")
    for column in ("method", "command s", "x local", "tokens/s (command)", "tokens/s (writer)", "B/token",
                   "ids = local", "max |dlogp|", "bytes = local"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['median_s']:.2f}", f"{row['vs_local']:.2f}",
                      f"{row['command_tokens_per_s']:,.0f}", f"{row['writer_tokens_per_s']:,.0f}",
                      f"{row['bytes_per_token']:.1f}", str(row["ids_equal"]), f"{row['logprob_max_abs_diff']:.1e}",
                      str(row["shard_bytes_equal"]))
    console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=129)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of a one-process writer (each of 2 processes gets 1)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
