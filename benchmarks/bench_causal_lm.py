"""A Hugging Face causal LM's own training loss, `model(input_ids, labels=labels).loss` forward + backward: the model
as it ships (its ForCausalLMLoss over the full logits), the same model under kdfast.patch_causal_lm (the fused linear
cross-entropy, no logits), and on a GPU the model under Liger-Kernel's fused linear CE forward (when installed).

Same weights, same batch, same process; medians over interleaved rounds, the speed against the model's own loss, and
the extra peak memory of each (on the CPU in a fresh process per contender, with --full or --memory). The backbone's
work is in every time. CPU default: a one-layer Llama, hidden 256, V=32000, 2 x 1024 tokens, fp32. GPU: two layers,
hidden 2048, V=128256, 4 x 2048 tokens, bf16.

    python benchmarks/bench_causal_lm.py [--full] [--batch B --length S --vocab V --hidden H --layers L --repeats R]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import types

import torch
from bench_distill import add_memory_option, environment, extra_peaks, mib, time_methods, write_csv
from rich.console import Console
from rich.table import Table

from kdfast.integrations.fused_causal_lm import patch_causal_lm

FULL_SETTINGS = {} if torch.cuda.is_available() else {"repeats": 7, "memory": True}
OWN, KDFAST, LIGER = "the model's own loss (full logits)", "kdfast.patch_causal_lm", "Liger lce_forward"


def make_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                         num_key_value_heads=max(1, args.hidden // 512), head_dim=min(128, args.hidden),
                         pad_token_id=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype=dtype).train()


def make_batch(args, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.batch, args.length), generator=generator)
    labels = ids.clone()
    labels[:, : args.length // 8] = -100  # a prompt the loss skips, as SFT masks it
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def liger_model(model):
    """`model` with Liger's fused linear CE forward bound to it alone (Liger's own patch replaces the class's
    forward, which would change the baseline too); None where Liger is not installed or there is no GPU."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.model.llama import lce_forward

    liger = copy.deepcopy(model)
    liger.forward = types.MethodType(lce_forward, liger)
    return liger


def contender_models(model) -> dict:
    """name -> the model as that contender runs it (the same weights)."""
    models = {OWN: model, KDFAST: patch_causal_lm(copy.deepcopy(model))}
    liger = liger_model(model)
    if liger is not None:
        models[LIGER] = liger
    return models


def contenders(models: dict, batch) -> dict:
    """name -> a zero-argument forward + backward (autograd.grad: no gradient accumulates between rounds)."""
    def fwd_bwd(candidate):
        params = [p for p in candidate.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(candidate(**batch).loss, params)

    return {name: fwd_bwd(candidate) for name, candidate in models.items()}


def memory_contender(settings: dict, name: str):
    """The contender `name` on a freshly made model and batch: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    device = torch.device(args.device)
    return contenders(contender_models(make_model(args, device)), make_batch(args, device))[name]


def check_losses(models: dict, batch, console) -> None:
    """Refuses to time a contender whose loss is not the model's own. Liger's forward, written for the transformers
    of its release, is left out (and says why) where it fails on this transformers' Llama."""
    with torch.no_grad():
        own = models[OWN](**batch).loss.float().item()
        tolerance = 1e-4 if models[OWN].dtype == torch.float32 else 2e-2
        for name, candidate in list(models.items()):
            try:
                found = candidate(**batch).loss.float().item()
            except Exception as error:  # Liger's forward on a transformers it was not written for: any error
                if name != LIGER:
                    raise
                console.print(f"[yellow]{LIGER} left out: {error}[/yellow]")
                del models[name]
                continue
            if abs(found - own) > tolerance * max(1.0, abs(own)):
                raise SystemExit(f"{name}'s loss {found} differs from the model's own {own}: not timing it")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    model, batch = make_model(args, device), make_batch(args, device)
    models = contender_models(model)
    console = Console(width=max(100, Console().width))
    check_losses(models, batch, console)
    methods = contenders(models, batch)
    console.print(f"[dim]timing {', '.join(methods)}, {args.repeats} interleaved rounds...[/dim]")
    medians = time_methods(methods, device, args.repeats)
    peaks = extra_peaks(methods, args, device, __file__)
    env = environment(device)
    rows = [{"method": name, "median_ms": medians[name], "extra_peak_bytes": peaks[name],
             "speedup_vs_own_loss": medians[OWN] / medians[name], "batch": args.batch, "length": args.length,
             "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "dtype": str(model.dtype)[6:], **env}
            for name in methods]
    table = Table(title=f"Llama ({args.layers} layer(s), hidden {args.hidden}, V={args.vocab}) "
                        f"model(**batch).loss fwd+bwd, {args.batch} x {args.length} tokens on {env['device']}")
    for column in ("method", "median ms", "x own loss", "extra peak MiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['median_ms']:.1f}", f"{row['speedup_vs_own_loss']:.2f}",
                      mib(row["extra_peak_bytes"]))
    console.print(table)
    console.print(f"medians of {args.repeats}; torch {env['torch']}, {env['threads']} threads, "
                  f"THP_MEM_ALLOC_ENABLE={env['thp_mem_alloc']}")
    write_csv(rows, env, name="bench_causal_lm")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch", type=int, default=4 if cuda else 2)
    parser.add_argument("--length", type=int, default=2048 if cuda else 1024)
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    parser.add_argument("--layers", type=int, default=2 if cuda else 1)
    parser.add_argument("--repeats", type=int, default=7 if cuda else 5)
    add_memory_option(parser)


def main(argv=None):
    from bench_distill import parse_benchmark_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
