"""GPU: the logits-level loss with the CUDA kernels vs the Triton kernel vs eager PyTorch vs torch.compile
(and Liger-Kernel's JSD when it is installed), fwd+bwd, at 8192 x 128256 and 2 x 256000 bf16.

Every number comes from this run: triton.testing.do_bench medians, the device-to-device copy bandwidth
measured here, and GB/s over the bytes each kernel must move (both logits read once per pass, the
gradient written once: 5 row-sized transfers for the two-pass divergences, 7 for JSD and the skews).
Writes a Markdown table and a CSV under benchmarks/results/.

    python benchmarks/bench_gpu_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
from pathlib import Path

import torch
import triton
import triton.testing

import kdfast
from kdfast.reference import distill_loss_reference

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(8192, 128_256), (2, 256_000)]
# (label, options): forward KL + CE is the usual recipe; plain JSD at T=1 is what Liger's kernel computes.
CASES = [("forward_kl + CE(0.5), T=2", dict(divergence="forward_kl", temperature=2.0, ce_weight=0.5)),
         ("jsd(beta=0.5), T=1", dict(divergence="jsd", beta=0.5, temperature=1.0, ce_weight=0.0))]


def transfers(options) -> int:
    passes = 2 if options["divergence"] in ("forward_kl", "reverse_kl") else 3
    return 2 * passes + 1


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def extra_peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src)) / 1e3)


def contenders(student, teacher, labels, options, with_compile):
    def fwd_bwd(loss_fn, logits):
        x = logits.detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(x), x)

    def eager(x):
        return distill_loss_reference(x, teacher, labels, dtype=torch.float32, **options)

    methods = {}
    work = student.clone()  # in place: the logits become the gradient on every call, the same work each time
    for backend in ("cuda", "triton"):
        methods[f"kdfast {backend} (inplace)"] = lambda b=backend: fwd_bwd(
            lambda x: kdfast.distill_loss(x, teacher, labels, backend=b, inplace_backward=True, **options), work)
        methods[f"kdfast {backend} (fresh grad)"] = lambda b=backend: fwd_bwd(
            lambda x: kdfast.distill_loss(x, teacher, labels, backend=b, **options), student)
    methods["torch eager"] = lambda: fwd_bwd(eager, student)
    if with_compile:
        compiled = torch.compile(eager)
        methods["torch.compile"] = lambda: fwd_bwd(compiled, student)
    if options["divergence"] == "jsd" and options["ce_weight"] == 0 and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers.jsd import LigerJSD

        liger = LigerJSD(beta=options["beta"])
        t_log = torch.log_softmax(teacher.float(), dim=-1)  # the teacher's side is precomputed, not timed
        methods["liger JSD (log_softmax + LigerJSD)"] = lambda: fwd_bwd(
            lambda x: liger(torch.log_softmax(x.float(), dim=-1), t_log), student)
    return methods


def kernel_only(student, teacher, labels, options):
    """The forward op alone (loss parts + a fresh gradient), replayed from a CUDA graph: the kernels' own GPU
    time, without the host's launch overhead, which dominates small shapes in the fwd+bwd timings."""
    from kdfast.backends import cuda_backend, triton_backend
    from kdfast.options import LossOptions

    opts = LossOptions(**options)
    views = (student.unsqueeze(0), teacher.unsqueeze(0))
    grad = torch.empty_like(views[0])
    scale = torch.ones((), device="cuda")
    result = {}
    for name, module in (("cuda", cuda_backend), ("triton", triton_backend)):
        def forward(module=module):
            module.forward_rows(*views, labels, scale, grad, opts)

        forward()
        result[name] = triton.testing.do_bench_cudagraph(forward, rep=60, return_mode="median")
    return result


def check_correct(student, teacher, labels, options):
    truth = distill_loss_reference(student, teacher, labels, dtype=torch.float32, **options).item()
    for backend in ("cuda", "triton"):
        value = kdfast.distill_loss(student, teacher, labels, backend=backend, **options).item()
        if abs(value - truth) > 1e-3 * max(1.0, abs(truth)):
            raise SystemExit(f"{backend} disagrees with the reference ({value} vs {truth}): not timing it")


def run_case(shape, label, options, bandwidth, with_compile):
    tokens, vocab = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(tokens, vocab, device="cuda", generator=generator).mul_(3).to(torch.bfloat16)
    teacher = torch.randn(tokens, vocab, device="cuda", generator=generator).mul_(3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=generator)
    check_correct(student, teacher, labels, options)
    moved = transfers(options) * student.numel() * student.element_size()
    rows = []
    for name, fn in contenders(student, teacher, labels, options, with_compile).items():
        fn()  # compile / build / autotune outside the timing
        ms = median_ms(fn)
        rows.append(dict(shape=f"{tokens} x {vocab}", case=label, method=name, median_ms=ms,
                         gb_per_s=moved / (ms / 1e3) / 1e9 if name.startswith("kdfast") else None,
                         pct_copy_bw=100 * moved / (ms / 1e3) / bandwidth if name.startswith("kdfast") else None,
                         extra_peak_mib=extra_peak_mib(fn), floor_ms=moved / bandwidth * 1e3))
        print(f"  {rows[-1]['shape']:>14} | {label:<26} | {name:<34} {ms:9.3f} ms", flush=True)
    try:
        kernels = kernel_only(student, teacher, labels, options)
    except Exception as error:  # a capture problem must not cost the rest of the table; it is printed
        print(f"  kernel-only timing failed: {type(error).__name__}: {error}", flush=True)
        kernels = {}
    for backend, ms in kernels.items():
        rows.append(dict(shape=f"{tokens} x {vocab}", case=label, method=f"kernel only: {backend} (CUDA graph)",
                         median_ms=ms, gb_per_s=moved / (ms / 1e3) / 1e9,
                         pct_copy_bw=100 * moved / (ms / 1e3) / bandwidth, extra_peak_mib=0.0,
                         floor_ms=moved / bandwidth * 1e3))
        print(f"  {rows[-1]['shape']:>14} | {label:<26} | {rows[-1]['method']:<34} {ms:9.3f} ms", flush=True)
    base = {r["method"]: r["median_ms"] for r in rows}
    for r in rows:
        r["x_vs_eager"] = base["torch eager"] / r["median_ms"]
        kernel_row = r["method"].startswith("kernel")
        triton_key = "kernel only: triton (CUDA graph)" if kernel_row else "kdfast triton (inplace)"
        r["x_vs_triton"] = base[triton_key] / r["median_ms"]
    return rows


def write(rows, env, bandwidth):
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower()
    with (RESULTS / f"gpu_kernels_{tag}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], *env])
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)
    lines = [f"# kdfast GPU kernels: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; measured copy "
             f"bandwidth {bandwidth / 1e9:.0f} GB/s (device-to-device, read + write). fwd+bwd of the loss, bf16 "
             "logits, `triton.testing.do_bench` medians (x triton: against the Triton kernel in the same mode); the "
             "\"kernel only\" rows replay the forward op (loss + gradient) from a CUDA graph, without host "
             "overhead. GB/s counts the bytes the kernel must move (both "
             "logits once per pass, the gradient once); the floor is those bytes at the copy bandwidth.", "",
             "| shape | case | method | median ms | GB/s | % of copy BW | x eager | x triton | extra peak MiB |",
             "|" + " --- |" * 9]
    for r in rows:
        gbs = f"{r['gb_per_s']:.0f}" if r["gb_per_s"] else "-"
        pct = f"{r['pct_copy_bw']:.0f}%" if r["pct_copy_bw"] else "-"
        lines.append(f"| {r['shape']} | {r['case']} | {r['method']} | {r['median_ms']:.3f} | {gbs} | {pct} | "
                     f"{r['x_vs_eager']:.2f} | {r['x_vs_triton']:.2f} | {r['extra_peak_mib']:.0f} |")
    path = RESULTS / f"gpu_kernels_{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes a minute)")
    args = parser.parse_args(argv)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    bandwidth = copy_bandwidth()
    print(f"{env['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for shape in SHAPES:
        for label, options in CASES:
            # torch.compile once, on the large shape's main case: each compile costs about a minute.
            with_compile = not args.no_compile and shape == SHAPES[0] and options["divergence"] == "forward_kl"
            rows += run_case(shape, label, options, bandwidth, with_compile)
            path = write(rows, env, bandwidth)  # after every case: a run cut short still leaves its table
    print(path.read_text())


if __name__ == "__main__":
    main()
