"""The float32 GEMMs of the fused linear forms on an AMD x86 CPU: oneDNN's rather than torch's BLAS.

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
"""

from __future__ import annotations

import functools
import os

import torch

SETTINGS = ("auto", "onednn", "blas")


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


def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T, a new tensor."""
    if on_onednn(hidden, weight):
        return onednn_linear(hidden, weight)
    return hidden @ weight.t()


def product_into(out: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out = grad @ weight (grad [rows, V], weight [V, H], out [rows, H]): a chunk's d hidden."""
    if on_onednn(out, grad, weight):
        return out.copy_(onednn_linear(grad, weight.t()))
    return torch.mm(grad, weight, out=out)


def product(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight, a new tensor: a chunk's d hidden."""
    if on_onednn(grad, weight):
        return onednn_linear(grad, weight.t())
    return grad @ weight
