"""A whole distillation training step (both models' forward, the loss, the student's backward, an AdamW step) with
the loss computed from full logits, by Liger-Kernel's LigerFusedLinearJSDLoss (when installed, on a GPU), and by
kdfast's fused linear loss (as DistillationTrainer calls it), side by side in one process: median step time and the
peak memory beyond the models and optimizer states.

GPU default: a LLaMA-style student (hidden 1024, 8 layers, ~364M parameters with its 128256-token embeddings and
head) and teacher (hidden 2048, 9 layers, ~930M), bf16, 4 x 2048 tokens, forward KL at T=2 + CE 0.5.
CPU default: tiny models (a smoke run, not a measurement).

    python benchmarks/bench_train_step.py [--batch B --length S --vocab V --repeats R]
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
from bench_distill import environment, extra_peaks, time_methods, write_csv  # noqa: E402

from kdfast.integrations.causal_lm import batch_distill_loss  # noqa: E402
from kdfast.options import LossOptions  # noqa: E402
from kdfast.reference import distill_loss_reference  # noqa: E402

FULL, LIGER, KDFAST, KDFAST_FP32 = ("full logits (eager loss)", "Liger LigerFusedLinearJSDLoss",
                                    "kdfast (DistillationTrainer's loss)", "kdfast, fp32_logits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch", type=int, default=4 if cuda else 2)
    parser.add_argument("--length", type=int, default=2048 if cuda else 64)
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 2000)
    parser.add_argument("--student", default="1024,8,2816" if cuda else "64,2,128", help="hidden,layers,mlp")
    parser.add_argument("--teacher", default="2048,9,5632" if cuda else "96,2,192", help="hidden,layers,mlp")
    parser.add_argument("--repeats", type=int, default=5)


def _llama(shape: str, vocab: int, dtype, device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, mlp = (int(v) for v in shape.split(","))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                         head_dim=min(128, hidden), pad_token_id=0)
    with torch.device(device):  # initialised where it runs (a 930M teacher takes long to initialise on a CPU)
        return LlamaForCausalLM(config).to(dtype=dtype)


def contenders(student, teacher, batch, device):
    """name -> one training step (the optimizer's state is made by the warm-up steps)."""
    options = dict(divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.5)
    opts = LossOptions(**options)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids, labels = batch["input_ids"], batch["labels"]

    def step(loss_fn):
        def run():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def full_logits():
        logits = student(input_ids=ids).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1]
        return distill_loss_reference(logits, teacher_logits, labels[:, 1:], dtype=torch.float32, **options)

    methods = {FULL: step(full_logits)}
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=1.0, beta=0.0, temperature=2.0)

        def liger_loss():
            hidden = student.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
            with torch.no_grad():
                teacher_hidden = teacher.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
            return liger(hidden.reshape(-1, hidden.shape[-1]), student.lm_head.weight,
                         teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher.lm_head.weight,
                         labels[:, 1:].reshape(-1))

        methods[LIGER] = step(liger_loss)
    methods[KDFAST] = step(lambda: batch_distill_loss(student, teacher, batch, opts))
    if student.dtype != torch.float32:
        methods[KDFAST_FP32] = step(lambda: batch_distill_loss(student, teacher, batch, opts, fp32_logits=True))
    return methods


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = _llama(args.student, args.vocab, dtype, device, 0).train()
    teacher = _llama(args.teacher, args.vocab, dtype, device, 1).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.batch, args.length), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids}
    methods = contenders(student, teacher, batch, device)
    console = Console(width=max(110, Console().width))
    console.print(f"[dim]timing {', '.join(methods)}...[/dim]")
    medians = time_methods(methods, device, args.repeats)
    # On a GPU each step's peak beyond what is held before it (weights, optimizer states); on the CPU in a fresh
    # process per contender (a smoke run there: the tiny default measures nothing of interest).
    peaks = extra_peaks(methods, args, device, __file__) if device.type == "cuda" else dict.fromkeys(methods)
    env = environment(device)
    params = [sum(p.numel() for p in model.parameters()) for model in (student, teacher)]
    rows = [{"method": name, "median_ms": medians[name], "extra_peak_bytes": peaks[name], "batch": args.batch,
             "length": args.length, "vocab": args.vocab, "student_params": params[0], "teacher_params": params[1],
             "speedup_vs_full_logits": medians[FULL] / medians[name],
             "speedup_vs_liger": medians[LIGER] / medians[name] if LIGER in medians else None, **env}
            for name in methods]
    table = Table(title=f"one training step, student {params[0] / 1e6:.0f}M / teacher {params[1] / 1e6:.0f}M "
                        f"parameters, {args.batch} x {args.length} tokens, V={args.vocab}, {str(dtype)[6:]}")
    for column in ("method", "median ms", "x full logits", "x Liger", "extra peak MiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        liger = row["speedup_vs_liger"]
        peak = row["extra_peak_bytes"]
        table.add_row(row["method"], f"{row['median_ms']:.1f}", f"{row['speedup_vs_full_logits']:.2f}",
                      "-" if liger is None else f"{liger:.2f}", "-" if peak is None else f"{peak / 2**20:.0f}")
    console.print(table)
    write_csv(rows, env, "bench_train_step")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
