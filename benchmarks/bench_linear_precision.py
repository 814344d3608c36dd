"""How exact the fused linear loss is on 16-bit heads: loss and gradient errors against a float64 computation on
the very same bf16 inputs, for kdfast with its logits rounded to bf16 (the default), kdfast with float32 logits
(`fp32_logits=True`), and Liger-Kernel's chunked LigerFusedLinearJSDLoss (when installed, on a GPU), in one run.

Errors: |loss - loss64| / |loss64|, and ||g - g64|| / ||g64|| for d hidden and d weight. The heads give logits with
a spread of `--logit-scale` (a trained model's are ~5-20); the larger, the more a 16-bit rounding of them moves
the softmax.
CPU default: N=1024, H_s=256, H_t=384, V=32000 bf16, forward KL + CE(0.5), T=2; GPU: N=2048, H_s=2048,
H_t=4096, V=128256.

    python benchmarks/bench_linear_precision.py [--tokens N --hidden H --teacher-hidden H --vocab V --logit-scale S]
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
from bench_distill import environment, write_csv  # noqa: E402

import kdfast  # noqa: E402
from kdfast.reference import linear_distill_loss_reference  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tokens", type=int, default=2048 if cuda else 1024)
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    parser.add_argument("--teacher-hidden", type=int, default=4096 if cuda else 384)
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--logit-scale", type=float, default=8.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16).to(device)

    return (randn(args.tokens, args.hidden), randn(args.vocab, args.hidden, std=args.logit_scale * args.hidden**-0.5),
            randn(args.tokens, args.teacher_hidden),
            randn(args.vocab, args.teacher_hidden, std=args.logit_scale * args.teacher_hidden**-0.5),
            torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device))


def contenders(args, teacher_hidden, teacher_weight, labels):
    """name -> loss_fn(h, w)."""
    options = dict(divergence="forward_kl", temperature=args.temperature, ce_weight=args.ce_weight)
    methods = {"kdfast (bf16 logits, default)": lambda h, w: kdfast.linear_distill_loss(
                   h, w, teacher_hidden, teacher_weight, labels, **options),
               "kdfast, fp32_logits=True": lambda h, w: kdfast.linear_distill_loss(
                   h, w, teacher_hidden, teacher_weight, labels, fp32_logits=True, **options)}
    if args.device != "cpu" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta=0 is forward KL in Liger's JSD; its hard/soft weights are kdfast's ce/kd weights.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=args.ce_weight, weight_soft_loss=1.0, beta=0.0,
                                        temperature=args.temperature)
        methods["Liger LigerFusedLinearJSDLoss"] = lambda h, w: liger(h, w, teacher_hidden, teacher_weight, labels)
    return methods, options


def _relative(value, reference) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def run(args) -> list[dict]:
    device = torch.device(args.device)
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(args, device)
    methods, options = contenders(args, teacher_hidden, teacher_weight, labels)
    hidden64, weight64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss64 = linear_distill_loss_reference(hidden64, weight64, teacher_hidden, teacher_weight, labels, **options)
    d_hidden64, d_weight64 = torch.autograd.grad(loss64, (hidden64, weight64))
    env = environment(device)
    rows = []
    for name, loss_fn in methods.items():
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        loss = loss_fn(h, w)
        d_hidden, d_weight = torch.autograd.grad(loss, (h, w))
        rows.append({"method": name, "tokens": args.tokens, "hidden": args.hidden,
                     "teacher_hidden": args.teacher_hidden, "vocab": args.vocab, "logit_scale": args.logit_scale,
                     "loss_rel_error": abs(loss.item() - loss64.item()) / abs(loss64.item()),
                     "d_hidden_rel_error": _relative(d_hidden, d_hidden64),
                     "d_weight_rel_error": _relative(d_weight, d_weight64), **env})
    console = Console(width=max(100, Console().width))
    table = Table(title=f"errors against float64 on the same bf16 inputs, N={args.tokens} H_s={args.hidden} "
                        f"H_t={args.teacher_hidden} V={args.vocab}, logit spread ~{args.logit_scale}, {options}")
    for column in ("method", "loss", "d hidden", "d weight"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['loss_rel_error']:.2e}", f"{row['d_hidden_rel_error']:.2e}",
                      f"{row['d_weight_rel_error']:.2e}")
    console.print(table)
    console.print("gradients are returned in bf16, the inputs' dtype: ~2e-3 is bf16's own rounding of them")
    write_csv(rows, env, "bench_linear_precision")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
