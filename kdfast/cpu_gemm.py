"""The CPU GEMMs of the fused linear forms: float32 on oneDNN rather than torch's BLAS on an AMD x86 CPU, and 16-bit
ones in float32 where torch has no 16-bit GEMM of its own.

torch's x86 builds take float32 products from Intel's MKL, which on AMD CPUs runs its AVX2 kernels: on a 2-core
AVX-512 Zen 5 it made 150-230 GFLOP/s, where oneDNN (in torch as well, for its fused CPU ops) made 330-475 on the same
products, a chunk's logits (rows x H times H x V) and d hidden (rows x V times V x H), 2-2.6x faster. d weight (V x
rows times rows x H) stays on the BLAS: oneDNN's was no faster with the transposed gradient. oneDNN writes the
logits to a new tensor (it takes no output buffer): the fused linear loss's chunks use that tensor as the chunk's
buffer (`linear_chunks._logits_into`), the token log-probs copy it into theirs (one chunk more, for a moment:
`token_logprobs._mapped_logits`); d hidden reads the head's weight through a transposed view, with no copy.

`KDFAST_CPU_GEMM` chooses: "auto" (the default) oneDNN on an AMD CPU where torch has it, "onednn" wherever torch has
it, "blas" torch's own products everywhere. The op is oneDNN's linear as torch registers it for its compiler
(`torch.ops.mkldnn._linear_pointwise`); it is checked against torch.mm once per process, and without it (another
torch, another build) the products are torch's.

16-bit products on a CPU whose torch has no 16-bit GEMM of its own (bf16 off oneDNN, that is without AVX-512; fp16
without AMX-FP16) run in torch's generic loops, whose layouts differ a hundredfold: on a 2-core AVX2 AMD EPYC
(2026-12-07, one thread), a chunk's d hidden (192 x 16000 times 16000 x 1024, the head [V, H] as it lies) took 12.3 s
in bf16 and 13.6 s in fp16, its logits 0.64 s and 0.52 s, d weight 1.26 s and 1.75 s. There the chunks' products take
float32 copies of their operands, a slice of the vocabulary at a time (`widened`): d hidden 0.087 s and 0.096 s,
logits 0.15 s, each product summed in float32 and rounded once to its 16-bit result, as a GEMM that sums in float32
rounds it.
"""

from __future__ import annotations

import functools
import os

import torch

SETTINGS = ("auto", "onednn", "blas")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# Each float32 copy of a slice of the head (or of the gradient's columns) in a widened product stays this small.
WIDENED_SLICE_BYTES = 16 * 2**20


def cpu_field(name: str) -> str:
    """A field of /proc/cpuinfo's first processor ("vendor_id", "model name"), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T by oneDNN, a new tensor (callers check `on_onednn` first)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@functools.cache
def onednn_products() -> bool:
    """Whether this process's float32 CPU products of the fused linear forms run on oneDNN."""
    setting = os.environ.get("KDFAST_CPU_GEMM", "auto")
    if setting not in SETTINGS:
        raise ValueError(f"KDFAST_CPU_GEMM must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "blas" or (setting == "auto" and cpu_field("vendor_id") != "AuthenticAMD"):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:  # both layouts the chunks use, against torch's own product
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 7, generator=generator), torch.randn(6, 7, generator=generator)
        ok = torch.allclose(onednn_linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
        return ok and torch.allclose(onednn_linear(x @ w.t(), w.t()), (x @ w.t()) @ w, rtol=1e-5, atol=1e-4)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@torch.compiler.disable  # (a host-side choice: reads /proc and probes once)
def on_onednn(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors run on oneDNN here: float32 CPU tensors, and `onednn_products()`."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and onednn_products()


@functools.cache
def native_sixteen_bit(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMMs of `dtype` run on oneDNN here (as torch decides: bf16 where the CPU has AVX-512, fp16
    where it has AMX-FP16), rather than in torch's generic loops (module docstring)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return bool(getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)())


def widened(*tensors: torch.Tensor) -> bool:
    """Whether products of these 16-bit CPU tensors are taken in float32 here (module docstring)."""
    return all(t.device.type == "cpu" and t.dtype in SIXTEEN_BIT and not native_sixteen_bit(t.dtype) for t in tensors)


def _widened_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] in float32, K a slice at a time."""
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    step = max(1, WIDENED_SLICE_BYTES // (4 * max(1, b.shape[1], a.shape[0])))
    for start in range(0, a.shape[1], step):
        total.addmm_(a[:, start:start + step].float(), b[start:start + step].float())
    return total


def widened_logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias, factor: float
                        ) -> torch.Tensor:
    """out = factor (hidden @ weight.T + bias) through float32, a slice of the vocabulary at a time, each rounded once
    into the 16-bit `out`; the hidden states and the bias rounded to 16 bits first, as the 16-bit GEMM takes them."""
    rows = hidden.to(weight.dtype).float()
    step = max(1, WIDENED_SLICE_BYTES // (4 * max(1, weight.shape[1], rows.shape[0])))
    for start in range(0, weight.shape[0], step):
        head = weight[start:start + step].float()
        if bias is not None:
            part = torch.addmm(bias[start:start + step].to(out.dtype).float(), rows, head.t(), beta=factor,
                               alpha=factor)
        else:
            part = torch.mm(rows, head.t())
            if factor != 1.0:
                part.mul_(factor)
        out[:, start:start + step].copy_(part)
    return out


def accumulate_transposed_product(acc: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc [V, H] (float32) += grad^T [V, C] @ hidden [C, H], widened: float32 operands, a slice of V at a time."""
    rows = hidden.float()
    step = max(1, WIDENED_SLICE_BYTES // (4 * max(1, grad.shape[0], rows.shape[1])))
    for start in range(0, acc.shape[0], step):
        acc[start:start + step].addmm_(grad[:, start:start + step].t().float(), rows)


def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T, a new tensor."""
    if on_onednn(hidden, weight):
        return onednn_linear(hidden, weight)
    return hidden @ weight.t()


def product_into(out: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out = grad @ weight (grad [rows, V], weight [V, H], out [rows, H]): a chunk's d hidden."""
    if on_onednn(out, grad, weight):
        return out.copy_(onednn_linear(grad, weight.t()))
    if widened(grad, weight):
        return out.copy_(_widened_mm(grad, weight))
    return torch.mm(grad, weight, out=out)


def product(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight, a new tensor: a chunk's d hidden."""
    if on_onednn(grad, weight):
        return onednn_linear(grad, weight.t())
    if widened(grad, weight):
        return _widened_mm(grad, weight).to(grad.dtype)
    return grad @ weight
