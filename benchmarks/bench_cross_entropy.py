"""Forward+backward of kdfast.cross_entropy (the CE alone on logits) vs F.cross_entropy in eager PyTorch and under
torch.compile, and Liger-Kernel's LigerCrossEntropyLoss on a GPU.

Same inputs, same process; medians over interleaved rounds, ratios, and the extra peak memory of each contender (on
the CPU in a fresh process per contender, with --full or --memory). The floor is 8 bytes per element on the CPU
(read the logits once, write the gradient once): at the copy's bandwidth, and at the memory's (the faster of the copy
and an in-place pass over the logits, which reads and writes the same lines as an in-place loss does). CPU (default):
2048 x 32000 fp32; --full adds torch.compile (a minute's compile on the CPU), rounds and the memory. CUDA: 8192 x
128256 bf16 with triton.testing.do_bench; there the floor is the copy. --softcap C: the CE of Gemma-2's capped logits
C * tanh(logits / C), the cap written in torch before the loss (eager, compiled), inside it (kdfast, Liger).
--class-weights: per-class weights rand(V) (torch's `weight`, kdfast's `class_weights`). --token-scaling dft: each
token's loss times its label's detached probability (TRL's SFT `loss_type="dft"`), in eager PyTorch a second,
gradient-free CE for the factors, as a training loop writes it; --token-scaling eaft: times its top-20 entropy over 3
(LlamaFactory's EAFT), in eager PyTorch a gradient-free topk.

    python benchmarks/bench_cross_entropy.py [--full] [--tokens N --vocab V --dtype fp32 --label-smoothing 0.1
                                              --z-loss-weight 1e-4 --softcap 30 --class-weights --token-scaling dft|eaft
                                              --repeats R --compile]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_distill import (
    DTYPES,
    add_compile_option,
    add_logits_arguments,
    add_memory_option,
    environment,
    extra_peaks,
    floor_bandwidths,
    parse_benchmark_args,
    speed_table,
    time_methods,
    write_csv,
)
from rich.console import Console

import kdfast

FULL_SETTINGS = {} if torch.cuda.is_available() else {"compile": True, "repeats": 7, "memory": True}


def eager_cross_entropy(logits, labels, label_smoothing, z_loss_weight, softcap=None, class_weights=None,
                        token_scaling=None, dtype=torch.float32):
    """What a training loop writes: torch's CE on float32 logits (capped first where there is a softcap, as Gemma-2's
    forward caps them; per-class weights where given), PaLM's z-loss over the kept rows beside it; with a token
    scaling, both per row times p(label), from a CE without a gradient."""
    logits = logits.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    weight = class_weights.to(dtype) if class_weights is not None else None
    kept = labels != -100
    if token_scaling is None:
        loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)
        scales = torch.ones(())
    else:
        with torch.no_grad():
            scales = token_scales(logits, labels, token_scaling)
        rows = F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing, reduction="none")
        denominator = kept.sum() if weight is None else weight[labels[kept]].sum()
        loss = (rows * scales).sum() / denominator
    if z_loss_weight:
        z_rows = torch.logsumexp(logits, -1) ** 2 * scales
        loss = loss + z_loss_weight * z_rows[kept].sum() / kept.sum().clamp(min=1)
    return loss


def token_scales(logits, labels, token_scaling: str) -> torch.Tensor:
    """Each row's detached factor as the peers' eager code forms it: DFT's p(label) from a CE; EAFT's (top-20 entropy
    / 3) (LlamaFactory's and ms-swift's topk over the float logits)."""
    if token_scaling == "dft":
        return torch.exp(-F.cross_entropy(logits, labels, reduction="none"))
    top = torch.topk(logits, k=20, dim=-1).values
    log_probs = top - torch.logsumexp(top, dim=-1, keepdim=True)
    return -(log_probs.exp() * log_probs).sum(-1) / 3.0


def contenders(logits, labels, settings: dict, compile_model: bool) -> dict:
    """name -> zero-argument callable doing forward + backward (autograd.grad: the gradient as the head's backward
    receives it)."""
    def fwd_bwd(loss_fn, source):
        x = source.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(x), x)

    def eager(x):
        return eager_cross_entropy(x, labels, **settings)

    methods = {"torch eager": lambda: fwd_bwd(eager, logits)}
    if compile_model:
        compiled = torch.compile(eager)
        methods["torch.compile"] = lambda: fwd_bwd(compiled, logits)
    # Liger's token scaling is its fused linear CE's alone.
    liger = liger_loss(settings) if logits.is_cuda and settings["token_scaling"] is None else None
    if liger is not None:
        methods["Liger CrossEntropyLoss"] = lambda: fwd_bwd(lambda x: liger(x, labels), logits)
    methods["kdfast (fresh gradient)"] = lambda: fwd_bwd(lambda x: kdfast.cross_entropy(x, labels, **settings), logits)
    # Overwrites its logits with the gradient on every call (the same work each time): refilling them is the next
    # forward's, not the loss's.
    work = logits.clone()
    methods["kdfast (inplace_backward)"] = lambda: fwd_bwd(
        lambda x: kdfast.cross_entropy(x, labels, inplace_backward=True, **settings), work)
    return methods


def liger_loss(settings: dict):
    """Liger-Kernel's CE (Triton, so CUDA only), its z-loss being `lse_square_scale`; None where it is not installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss(weight=settings["class_weights"], label_smoothing=settings["label_smoothing"],
                                 lse_square_scale=settings["z_loss_weight"], softcap=settings["softcap"])


def floor_probes(logits) -> dict:
    """name -> (callable, bytes it counts): the copy of the logits, and on the CPU an in-place pass over them."""
    source = logits.float() if logits.device.type == "cpu" else logits
    target, work = torch.empty_like(source), source.clone()
    moved = 2 * source.numel() * source.element_size()
    probes = {"copy": (lambda: target.copy_(source), moved)}
    if logits.device.type == "cpu":
        # A CPU's store reads its line first (write-allocate), so a copy moves 3 bytes for the 2 it counts; the
        # in-place pass writes over lines it has just read, as an in-place loss does.
        probes["in-place pass"] = (lambda: work.add_(1e-30), moved)
    return probes


def make_inputs(args, device):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, generator=generator) * 3).to(DTYPES[args.dtype]).to(device)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    labels[::50] = -100  # padding rows, as a batch has
    class_weights = torch.rand(args.vocab, generator=generator).to(device) if args.class_weights else None
    return logits, labels.to(device), dict(label_smoothing=args.label_smoothing, z_loss_weight=args.z_loss_weight,
                                           softcap=args.softcap, class_weights=class_weights,
                                           token_scaling=args.token_scaling)


def memory_contender(settings: dict, name: str):
    """The contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    logits, labels, options = make_inputs(args, torch.device(args.device))
    return contenders(logits, labels, options, "torch.compile" in name)[name]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    logits, labels, settings = make_inputs(args, device)
    found = kdfast.cross_entropy(logits, labels, **settings)
    expected = eager_cross_entropy(logits, labels, **settings, dtype=torch.float64)
    if not torch.allclose(found.double(), expected, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"kdfast disagrees with torch ({found.item()} vs {expected.item()}): not timing it")

    console = Console(width=max(100, Console().width))
    methods, probes = contenders(logits, labels, settings, args.compile), floor_probes(logits)
    console.print(f"[dim]timing {', '.join(methods)} and {', '.join(probes)}, {args.repeats} interleaved "
                  "rounds...[/dim]")
    medians = time_methods({**methods, **{name: probe for name, (probe, _) in probes.items()}}, device, args.repeats)
    peaks = extra_peaks(methods, args, device, __file__)
    bandwidth, memory_bandwidth = floor_bandwidths(medians, probes)
    floor_bytes = probes["copy"][1]
    floor_ms, memory_floor_ms = floor_bytes / bandwidth * 1e3, floor_bytes / memory_bandwidth * 1e3
    env = environment(device)
    eager_ms, compile_ms = medians["torch eager"], medians.get("torch.compile")
    rows = [{"method": name, "median_ms": medians[name], "extra_peak_bytes": peaks[name], **env,
             "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, **settings,
             "class_weights": args.class_weights,
             "speedup_vs_eager": eager_ms / medians[name],
             "speedup_vs_compile": compile_ms / medians[name] if compile_ms else None,
             "ratio_to_floor": medians[name] / floor_ms, "floor_ms": floor_ms,
             "ratio_to_memory_floor": medians[name] / memory_floor_ms, "memory_floor_ms": memory_floor_ms,
             "copy_bandwidth_gbs": bandwidth / 1e9, "memory_bandwidth_gbs": memory_bandwidth / 1e9}
            for name in methods]
    report(console, rows, env, args)
    write_csv(rows, env, name="bench_cross_entropy")
    return rows


def report(console, rows, env, args):
    console.print(speed_table(f"cross-entropy fwd+bwd, {args.tokens} x {args.vocab} {args.dtype}, label_smoothing="
                              f"{args.label_smoothing}, z_loss_weight={args.z_loss_weight}, softcap={args.softcap}"
                              f"{', class weights' if args.class_weights else ''}"
                              f"{f', token scaling {args.token_scaling}' if args.token_scaling else ''} on "
                              f"{env['device']}", rows))
    console.print(f"copy floor {rows[0]['floor_ms']:.1f} ms (copy bandwidth {rows[0]['copy_bandwidth_gbs']:.1f} "
                  f"GB/s), memory floor {rows[0]['memory_floor_ms']:.1f} ms; medians of {args.repeats}; torch "
                  f"{env['torch']}, {env['threads']} threads, THP_MEM_ALLOC_ENABLE={env['thp_mem_alloc']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_logits_arguments(parser)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--z-loss-weight", type=float, default=0.0)
    parser.add_argument("--softcap", type=float, default=None, help="Gemma-2's final_logit_softcapping (e.g. 30)")
    parser.add_argument("--class-weights", action="store_true",
                        help="per-class weights rand(V): torch's `weight`, kdfast's `class_weights`")
    parser.add_argument("--token-scaling", choices=["dft", "eaft"], default=None,
                        help="each token's loss times its label's detached probability (dft: TRL's SFT loss_type) or "
                             "its top-20 entropy over 3 (eaft: LlamaFactory's)")
    parser.add_argument("--repeats", type=int, default=7 if torch.cuda.is_available() else 5)
    add_compile_option(parser)
    add_memory_option(parser)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
