"""Peak memory per process of distillation training steps with the student sharded by FSDP2 over R processes
against one process holding everything: what sharding buys. Each process runs the trainers' fused loss (entered
through the FSDP2 root, as DistillationTrainer enters it) and AdamW steps on its share of the batch.

Per process: the resident high-water mark during the steps (model shards, optimizer states, activations and the
runtime) and the part of it beyond the runtime (the resident size after imports, before any model). The models are
built whole and sharded before the measurement starts, as `fully_shard` does with a model loaded on every rank.

CPU default: LLaMA-style student (hidden 1024, 8 layers, 32000 tokens, ~170M parameters) and teacher (hidden 1536,
8 layers, ~320M), 2 processes on gloo, 2 x 128 tokens per process; `--size tiny` runs the tests' tiny models.

    python benchmarks/bench_sharded_memory.py [--size tiny|larger --ranks R --steps S]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or through `kdfast bench`
from bench_distill import environment, write_csv  # noqa: E402

# Ranks forked from a server that has imported torch and kdfast: a spawned rank spent 4 CPU-seconds importing them.
from kdfast.fresh_process import fork_server_context  # noqa: E402

# (hidden, layers, intermediate, heads, kv heads) of the student and the teacher, and the vocabulary.
SIZES = {"tiny": dict(student=(32, 2, 64, 4, 2), teacher=(64, 2, 128, 4, 2), vocab=96),
         "larger": dict(student=(1024, 8, 2816, 16, 4), teacher=(1536, 8, 4096, 16, 4), vocab=32_000)}
SETUPS = ("one process, nothing sharded", "FSDP2, teacher sharded", "FSDP2, teacher replicated")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="larger", choices=sorted(SIZES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)


def _llama(shape, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, kv_heads = shape
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, pad_token_id=0))


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _parameter_bytes(model) -> int:
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731 (a DTensor's own shard)
    return sum(local(p).numel() * p.element_size() for p in model.parameters())


def worker(rank, world, setup, args, store, out):
    from kdfast.integrations.causal_lm import batch_distill_loss
    from kdfast.integrations.sharding import run_through_wrapper
    from kdfast.memory import peak_bytes, reset_peak
    from kdfast.native_build import load_cpu_extension
    from kdfast.options import LossOptions

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    cpu = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    _llama((8, 1, 8, 1, 1), 8, 0)  # a toy model: the model code is imported before the runtime's size is taken
    load_cpu_extension()
    runtime = reset_peak(cpu)
    size = SIZES[args.size]
    student, teacher = _llama(size["student"], size["vocab"], 0), _llama(size["teacher"], size["vocab"], 1)
    teacher.requires_grad_(False)
    if setup != SETUPS[0]:
        _shard(student)
        if setup == SETUPS[1]:
            _shard(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    rows = args.rows * (args.ranks if setup == SETUPS[0] else 1)  # one process takes every process's rows
    ids = torch.randint(1, size["vocab"], (rows, args.length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opts = LossOptions(divergence="forward_kl", temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    held = reset_peak(cpu)
    for _ in range(args.steps):
        loss = run_through_wrapper(student, student, lambda inputs: batch_distill_loss(student, teacher, inputs,
                                                                                        opts), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = peak_bytes(cpu)
    result = torch.tensor([peak, peak - runtime, held - runtime, _parameter_bytes(student),
                           _parameter_bytes(teacher)], dtype=torch.float64)
    everyone = [torch.empty_like(result) for _ in range(world)]
    dist.all_gather(everyone, result)
    if rank == 0:
        torch.save(torch.stack(everyone), out)
    dist.barrier()
    dist.destroy_process_group()
    # Measured and saved: leave without the interpreter's teardown, in which a C++ thread of the FSDP2/gloo run is
    # sometimes destroyed still joinable (std::terminate, SIGABRT after the last Python frame: 1 run in 6 here).
    sys.stdout.flush()
    os._exit(0)


def run(args):
    import bench_sharded_memory  # spawned ranks import the worker by module name

    rows = []
    for setup in SETUPS:
        world = 1 if setup == SETUPS[0] else args.ranks
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "result.pt"
            mp.start_processes(bench_sharded_memory.worker, args=(world, setup, args, str(Path(folder) / "store"),
                                                                  str(out)), nprocs=world,
                               start_method=fork_server_context().get_start_method())
            per_rank = torch.load(out)
        worst = per_rank.max(dim=0).values  # the process that needs the most
        rows.append({"setup": setup, "processes": world, "size": args.size,
                     "tokens_per_step": args.rows * args.ranks * args.length,
                     "peak_rss_mib": round(worst[0].item() / 2**20), "peak_beyond_runtime_mib":
                     round(worst[1].item() / 2**20), "held_before_steps_mib": round(worst[2].item() / 2**20),
                     "student_param_kib": round(worst[3].item() / 2**10),
                     "teacher_param_kib": round(worst[4].item() / 2**10)})
    single = rows[0]["peak_beyond_runtime_mib"]
    for row in rows:
        row["x_one_process"] = round(row["peak_beyond_runtime_mib"] / single, 2)
    env = environment(torch.device("cpu"))
    console = Console(width=max(110, Console().width))
    table = Table(title=f"peak memory per process, {args.steps} AdamW steps of the fused distillation loss, "
                        f"{args.size} models, {rows[0]['tokens_per_step']} tokens per step in all")
    for column in ("setup", "processes", "student params KiB", "teacher params KiB", "peak RSS MiB",
                   "beyond runtime MiB", "x one process"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for row in rows:
        table.add_row(row["setup"], str(row["processes"]), f"{row['student_param_kib']:,}",
                      f"{row['teacher_param_kib']:,}", str(row["peak_rss_mib"]), str(row["peak_beyond_runtime_mib"]),
                      f"{row['x_one_process']:.2f}")
    console.print(table)
    console.print("per process: the largest over the processes (parameters: this process's shard); 'beyond "
                  "runtime' subtracts the resident size after imports and the kernels' loading; "
                  f"torch {env['torch']}")
    write_csv([{**row, **env} for row in rows], env, name=f"bench_sharded_memory_{args.size}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
