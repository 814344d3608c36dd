"""Gemma-2's softcap on contiguous float32 CPU tensors in one pass each way, through the CPU extension
(csrc/cpu/softcap_map.h): torch's tanh alone took 4.6 ms a 49 x 32000 chunk on two AVX2 threads, and the map and its
chain rule five more passes over the chunk. Each function leaves its tensors as the torch ops it replaces
(kdfast.logit_maps) leave them, so a call may take either path (a compiled graph, a process whose extension is not
loaded yet). It takes the extension only once a kernel call has loaded it: the map is glue and starts no build."""

from __future__ import annotations

import torch

from kdfast.native_build import loaded_cpu_ops_for

KEEP_NOTHING, KEEP_TANH, KEEP_MAPPED = 0, 1, 2  # csrc/cpu/softcap_map.h's SoftcapKeep


def _same(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """True for the same elements, False for apart, None for a partial overlap (left to torch)."""
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape:
        return True
    a_end, b_end = a.data_ptr() + a.numel() * 4, b.data_ptr() + b.numel() * 4
    return False if a_end <= b.data_ptr() or b_end <= a.data_ptr() else None


def softcap_into(x: torch.Tensor, out: torch.Tensor, in_scale: float, out_scale: float, keep_tanh: bool) -> bool:
    """out = out_scale * tanh(in_scale * x), x then its tanh where `keep_tanh` (else unchanged; `out` may be x
    itself, which then takes the map). Returns False, having done nothing, where the extension cannot take it."""
    ops = loaded_cpu_ops_for(x, out)
    same = _same(x, out) if ops is not None else None
    if same is None or (same and keep_tanh):
        return False
    if same:
        ops.softcap_map(x, None, in_scale, out_scale, KEEP_MAPPED)
    else:
        ops.softcap_map(x, out, in_scale, out_scale, KEEP_TANH if keep_tanh else KEEP_NOTHING)
    return True


def softcap_chain_(grad: torch.Tensor, kept: torch.Tensor, in_scale: float, slope: float, from_tanh: bool) -> bool:
    """grad *= slope * (1 - tanh^2), tanh = `kept` (`from_tanh`) or tanh(in_scale * kept), computed from the
    argument with its digits near the cap. Returns False, having done nothing, where the extension cannot take it."""
    ops = loaded_cpu_ops_for(grad, kept)
    if ops is None or _same(grad, kept) is not False:
        return False
    ops.softcap_chain(grad, kept, in_scale, slope, from_tanh)
    return True
