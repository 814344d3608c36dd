"""Forward+backward of kdfast.distill_loss vs the same math in eager PyTorch and under torch.compile.

Same inputs, same process; medians over repeats, ratios, and the extra peak memory of each contender
(on the CPU measured in a fresh process per contender, with --full or --memory).
CPU (default): 2048 x 32000 fp32, forward_kl + CE, T=2, against two floors of 12 bytes per element (read both
logits, write the gradient): at the copy's bandwidth, and at the memory's (the faster of the copy and an in-place
pass, which a CPU copy's write-allocate undercounts: `inplace_method`); --full adds torch.compile (a minute's
compile on the CPU), rounds and the memory. CUDA: 8192 x 128256 bf16 with triton.testing.do_bench, reporting
GB/s for the bytes each kernel must move.

    python benchmarks/bench_distill.py [--full] [--tokens N --vocab V --dtype fp32 --repeats R --compile]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
from pathlib import Path

import torch
from freed_memory import interleaved_medians
from rich.console import Console
from rich.table import Table

import kdfast
from kdfast import cpu_gemm
from kdfast.memory import extra_peak_bytes, extra_peak_bytes_in_child
from kdfast.reference import distill_loss_reference


def results_folder() -> Path:
    """KDFAST_RESULTS_DIR, else benchmarks/results in a source checkout (committed there), else ./kdfast-results
    (an installed copy never writes into site-packages)."""
    if os.environ.get("KDFAST_RESULTS_DIR"):
        return Path(os.environ["KDFAST_RESULTS_DIR"])
    here = Path(__file__).resolve().parent
    return here / "results" if (here.parent / "setup.py").exists() else Path.cwd() / "kdfast-results"


RESULTS = results_folder()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# `kdfast bench --full` on the CPU: what `make bench` leaves out to finish in minutes (on a GPU the defaults are full).
FULL_SETTINGS = {} if torch.cuda.is_available() else {"compile": True, "repeats": 7, "memory": True}


def time_methods(methods, device, repeats, warmup=2):
    """name -> median ms. On the CPU the repeats are interleaved (one of each method per round), so that
    noise from a shared machine falls on every method alike instead of on whichever ran at a bad moment."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        import triton.testing

        return {name: triton.testing.do_bench(fn, warmup=25, rep=max(100, repeats * 20), return_mode="median")
                for name, fn in methods.items()}
    return interleaved_medians(methods, repeats)[0]


def contenders(student, teacher, labels, options, compile_model):
    """name -> zero-argument callable doing forward + backward. Gradients are taken with autograd.grad, as
    the LM head's backward would receive them (a leaf's .grad accumulation would add a copy for aliases)."""
    def eager_loss(x):
        return distill_loss_reference(x, teacher, labels, dtype=torch.float32, **options)

    def fwd_bwd(loss_fn, logits):
        x = logits.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(x), x)

    methods = {"torch eager": lambda: fwd_bwd(eager_loss, student)}
    if compile_model:
        compiled_loss = torch.compile(eager_loss)
        methods["torch.compile"] = lambda: fwd_bwd(compiled_loss, student)
        # kdfast's op traced into a compiled step (kdfast.ops): the eager call's time, or a cost.
        compiled_kdfast = torch.compile(lambda x: kdfast.distill_loss(x, teacher, labels, **options))
        methods["kdfast inside torch.compile"] = lambda: fwd_bwd(compiled_kdfast, student)
    methods["kdfast (fresh gradient)"] = lambda: fwd_bwd(
        lambda x: kdfast.distill_loss(x, teacher, labels, **options), student)
    # The in-place contender overwrites its logits with the gradient on every call (same work each time);
    # re-filling them is the caller's next forward, not the loss's.
    work = student.clone()
    methods["kdfast (inplace_backward)"] = lambda: fwd_bwd(
        lambda x: kdfast.distill_loss(x, teacher, labels, inplace_backward=True, **options), work)
    return methods


def copy_method(student, device):
    """A plain copy of the logits (fp32 on the CPU): its time gives the machine's copy bandwidth."""
    src = student.float() if device.type == "cpu" else student
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()  # read + write


def inplace_method(student, teacher):
    """The memory's own bandwidth, for the CPU's second floor: work += 1e-30 * teacher reads two logits-sized tensors
    and writes one back over the lines it has just read, an in-place loss's pattern. A CPU's store first reads its
    line (write-allocate), so a copy moves 3 bytes for the 2 it counts and its bandwidth undercounts the memory's: on
    a 2-core Zen 5 this pass ran at 1.5x the copy's counted bandwidth (92-97 against 62-64 GB/s, 2048 x 32000 fp32,
    2026-12-05). A GPU writes whole lines without reading them: there the copy is the floor."""
    work, source = student.float().clone(), teacher.float()
    return (lambda: work.add_(source, alpha=1e-30)), 3 * work.numel() * work.element_size()


def floor_probes(student, teacher, device) -> dict:
    """name -> (callable, bytes it moves): the copy everywhere, and on the CPU the in-place pass too."""
    probes = {"copy": copy_method(student, device)}
    if device.type == "cpu":
        probes["in-place pass"] = inplace_method(student, teacher)
    return probes


def floor_bandwidths(medians: dict, probes: dict) -> tuple[float, float]:
    """(the copy's counted bandwidth, the memory's: the fastest probe's), bytes/s, from the probes' medians (popped)."""
    rates = {name: moved / (medians.pop(name) / 1e3) for name, (_, moved) in probes.items()}
    return rates["copy"], max(rates.values())


def kernel_bytes_for(args):
    """Bytes a fwd+bwd must move: both rows read once per pass, the gradient written, and on a GPU the
    backward's rescale by grad_output (read + write of the gradient: it cannot test for 1 without a sync)."""
    passes = 2 if args.divergence in ("forward_kl", "reverse_kl") else 3
    return args.tokens * args.vocab * DTYPES[args.dtype].itemsize * (2 * passes + 1 + 2)


# A CPU's results are named by its architecture and maker (and so are their CSVs): the same benchmark's ratios differ
# between them, kdfast's products coming from oneDNN on AMD and from MKL's AVX-512 kernels on Intel (kdfast.cpu_gemm).
CPU_MAKERS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}


def environment(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        maker = CPU_MAKERS.get(cpu_gemm.cpu_field("vendor_id"))
        name = " ".join(filter(None, (platform.processor() or platform.machine(), maker)))
    return {"device": name, "cpu": cpu_gemm.cpu_field("model name"),
            "cpu_products": None if device.type == "cuda" else "onednn" if cpu_gemm.onednn_products() else "blas",
            "torch": torch.__version__, "kdfast": kdfast.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


# Rows the float64 check before the timing takes: each row's loss is computed on its own, so a wrong kernel shows on
# any of them, and the float64 reference of all 2048 x 32000 took 36 s of this benchmark's 50 (2 threads of an AMD
# EPYC; 256 rows 0.2 s).
CHECK_ROWS = 256


def check_rows(tokens: int) -> slice:
    """About CHECK_ROWS rows, one every tokens / CHECK_ROWS, for the checks against a float64 reference."""
    return slice(None, None, max(1, tokens // CHECK_ROWS))


def make_inputs(args, device):
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.tokens, args.vocab, generator=generator).to(dtype).to(device)
    teacher = torch.randn(args.tokens, args.vocab, generator=generator).to(dtype).to(device)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    options = dict(divergence=args.divergence, temperature=args.temperature, ce_weight=args.ce_weight)
    return student, teacher, labels, options


def memory_contender(settings: dict, name: str):
    """The contender `name` on freshly made inputs: what a child process measures (kdfast.memory)."""
    args = argparse.Namespace(**settings)
    student, teacher, labels, options = make_inputs(args, torch.device(args.device))
    return contenders(student, teacher, labels, options, "torch.compile" in name)[name]


def plain_settings(args) -> dict:
    """A benchmark's options as plain values, for a child process (the CLI's namespace also holds its parser and
    handlers)."""
    return {key: value for key, value in vars(args).items()
            if isinstance(value, (int, float, str, bool, list, tuple, type(None)))}


def extra_peaks(methods, args, device, module_file, factory="memory_contender") -> dict:
    """name -> extra peak bytes of one call (None each without args.memory). On the CPU each is measured in a fresh
    process (kdfast.memory), so that neither the timing rounds nor the other contenders shape the heap it runs on."""
    if not getattr(args, "memory", True):
        return dict.fromkeys(methods)
    Console().print("[dim]measuring each one's peak memory...[/dim]")
    if device.type == "cuda":
        return {name: extra_peak_bytes(fn, device) for name, fn in methods.items()}
    settings = plain_settings(args)
    # One child at a time: forked from the fork server, a child starts in a fifth of a second, so two at once saved
    # little and, beside a test suite's other worker, put three processes on two cores.
    return {name: extra_peak_bytes_in_child(f"{module_file}:{factory}", settings, name) for name in methods}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    student, teacher, labels, options = make_inputs(args, device)

    # The benchmark only reports speed for a loss that is right: check it against the reference first, on rows spread
    # over the batch (`check_rows`).
    rows = check_rows(args.tokens)
    check = kdfast.distill_loss(student[rows], teacher[rows], labels[rows], **options)
    truth = distill_loss_reference(student[rows], teacher[rows], labels[rows], **options)
    if not torch.allclose(check.double().cpu(), truth.cpu(), rtol=1e-3, atol=1e-3):
        raise SystemExit(f"kdfast disagrees with the reference ({check.item()} vs {truth.item()}): not timing it")

    console = Console(width=max(100, Console().width))
    methods = contenders(student, teacher, labels, options, args.compile)
    probes = floor_probes(student, teacher, device)
    console.print(f"[dim]timing {', '.join(methods)} and {', '.join(probes)}, {args.repeats} interleaved "
                  "rounds...[/dim]")
    medians = time_methods({**methods, **{name: probe for name, (probe, _) in probes.items()}}, device, args.repeats)
    peaks = extra_peaks(methods, args, device, __file__)
    rows = [{"method": name, "median_ms": medians[name], "extra_peak_bytes": peaks[name]} for name in methods]
    bandwidth, memory_bandwidth = floor_bandwidths(medians, probes)
    # CPU: 12 bytes per element (the floor); GPU: the kernel's own pass traffic.
    floor_bytes = 3 * student.numel() * 4 if device.type == "cpu" else kernel_bytes_for(args)
    floor_ms = floor_bytes / bandwidth * 1e3
    memory_floor_ms = floor_bytes / memory_bandwidth * 1e3
    eager_ms = rows[0]["median_ms"]
    compile_ms = next((r["median_ms"] for r in rows if r["method"] == "torch.compile"), None)
    env = environment(device)
    for row in rows:
        row.update(env, tokens=args.tokens, vocab=args.vocab, dtype=args.dtype, divergence=args.divergence,
                   temperature=args.temperature, ce_weight=args.ce_weight,
                   speedup_vs_eager=eager_ms / row["median_ms"],
                   speedup_vs_compile=(compile_ms / row["median_ms"]) if compile_ms else None,
                   ratio_to_floor=row["median_ms"] / floor_ms, floor_ms=floor_ms,
                   copy_bandwidth_gbs=bandwidth / 1e9, ratio_to_memory_floor=row["median_ms"] / memory_floor_ms,
                   memory_floor_ms=memory_floor_ms, memory_bandwidth_gbs=memory_bandwidth / 1e9)
    report(console, rows, env, args, floor_ms, bandwidth)
    write_csv(rows, env)
    return rows


def speed_table(title: str, rows) -> Table:
    """The contenders side by side: each one's median, its speed against eager and torch.compile, its time against
    both floors, its extra peak memory."""
    table = Table(title=title)
    for column in ("method", "median ms", "x eager", "x compile", "x copy floor", "x memory floor",
                   "extra peak MiB"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for row in rows:
        vs_compile = f"{row['speedup_vs_compile']:.2f}" if row["speedup_vs_compile"] else "-"
        table.add_row(row["method"], f"{row['median_ms']:.1f}", f"{row['speedup_vs_eager']:.2f}", vs_compile,
                      f"{row['ratio_to_floor']:.2f}", f"{row['ratio_to_memory_floor']:.2f}",
                      mib(row["extra_peak_bytes"]))
    return table


def report(console, rows, env, args, floor_ms, bandwidth):
    console.print(speed_table(f"fwd+bwd, {args.tokens} x {args.vocab} {args.dtype}, {args.divergence} + CE "
                              f"(ce_weight={args.ce_weight}), T={args.temperature} on {env['device']}", rows))
    if args.device == "cuda":
        for row in rows:
            if row["method"].startswith("kdfast"):
                gbs = kernel_bytes_for(args) / (row["median_ms"] / 1e3) / 1e9
                console.print(f"{row['method']}: {gbs:.0f} GB/s = {gbs / (bandwidth / 1e9):.0%} of copy bandwidth")
    memory = rows[0]["memory_bandwidth_gbs"]
    console.print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> copy floor {floor_ms:.1f} ms; memory bandwidth "
                  f"{memory:.1f} GB/s (the faster of the copy and an in-place pass) -> memory floor "
                  f"{floor_ms * bandwidth / 1e9 / memory:.1f} ms; "
                  f"medians of {args.repeats}; "
                  f"torch {env['torch']}, {env['threads']} threads, {env['cpu_capability']}, "
                  f"THP_MEM_ALLOC_ENABLE={env['thp_mem_alloc']}")


def write_csv(rows, env, name="bench_distill"):
    """RESULTS/<name>_<device>.csv, one row per method (a CPU named by its architecture and maker: x86_64_amd)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    device_tag = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower() or "cpu"
    path = RESULTS / f"{name}_{device_tag}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Console().print(f"wrote {path}")


def add_full_option(parser: argparse.ArgumentParser, full_settings: dict) -> None:
    """--full: the benchmark from `full_settings` (a script's FULL_SETTINGS: longer shapes, every contender), what
    `kdfast bench --full` runs. Absent, it sets nothing (SUPPRESS), so that `kdfast bench --full <name>` keeps it."""
    settings = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in full_settings.items())
    parser.add_argument("--full", action="store_true", default=argparse.SUPPRESS,
                        help=f"the full run: {settings or 'as the defaults'} (the options given still win)")


def parse_benchmark_args(parser: argparse.ArgumentParser, argv, full_settings: dict):
    """A benchmark's options, from its FULL_SETTINGS under those given when argv holds --full."""
    add_full_option(parser, full_settings)
    args = parser.parse_args(argv)
    if getattr(args, "full", False):
        parser.set_defaults(**full_settings)
        args = parser.parse_args(argv)
    return args


def add_logits_arguments(parser: argparse.ArgumentParser) -> None:
    """The logits' device, shape and dtype: 8192 x 128256 bf16 on a GPU, 2048 x 32000 fp32 on the CPU."""
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 2048)
    parser.add_argument("--vocab", type=int, default=128_256 if cuda else 32_000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    add_logits_arguments(parser)
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7 if cuda else 3)  # `make bench`'s five minutes on the CPU
    add_compile_option(parser)
    add_memory_option(parser)


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="also each contender's extra peak memory (default: on a GPU; on the CPU with --full, "
                             "where each is measured in a process of its own, seconds apiece)")


def mib(peak_bytes) -> str:
    return "-" if peak_bytes is None else f"{peak_bytes / 2**20:.0f}"


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="the torch.compile contender (default: on a GPU; on the CPU with --full, where its "
                             "compile takes a minute)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parse_benchmark_args(parser, argv, FULL_SETTINGS))


if __name__ == "__main__":
    main()
