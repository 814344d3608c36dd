"""Backend choice: `backend=` argument, else KDFAST_BACKEND, else by device (docs/DESIGN.md, "Backends")."""

from __future__ import annotations

import os

import torch

from kdfast.kernel_abi import FUSED, MixedTeachers, PhaseCall, SparseTargets
from kdfast.options import BACKENDS, LossOptions


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_kernels_available() -> bool:
    from kdfast.backends import cuda_backend

    return cuda_backend.available()


def auto_gpu_backend(sparse: bool = False) -> str:
    """The faster GPU kernel. Measured on an H200 (README, "Backends"), the CUDA kernels beat Triton at many
    rows (8192 x 128256) and at few long rows (2 x 256000) alike, so the rule needs no shape. A sparse teacher's
    CUDA kernel has not been measured (nor run) on a GPU yet: there Triton, whose kernel CI runs under its
    interpreter and compiles for sm_80 and sm_90, comes first."""
    if sparse and triton_available():
        return "triton"
    if cuda_kernels_available():
        return "cuda"
    return "triton" if triton_available() else "torch"


def resolve_backend(requested: str, device: torch.device, sparse: bool = False) -> str:
    """The concrete backend for tensors on `device`; raises ValueError for an impossible request."""
    if requested == "auto":
        requested = os.environ.get("KDFAST_BACKEND", "auto") or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"KDFAST_BACKEND must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            return auto_gpu_backend(sparse)
        if device.type == "cpu":
            from kdfast.backends import cpu_backend

            return "cpu" if cpu_backend.available() else "torch"
        return "torch"
    if requested == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if requested == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise ValueError("backend='triton' runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1")
    if requested == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_kernels_available():
            raise ValueError("backend='cuda': the kdfast CUDA kernels could not be built here (see the warning "
                             "above); use backend='triton' or 'auto'")
    return requested


def backend_module(name: str):
    if name == "cpu":
        from kdfast.backends import cpu_backend as module
    elif name == "cuda":
        from kdfast.backends import cuda_backend as module
    elif name == "triton":
        from kdfast.backends import triton_backend as module
    else:
        from kdfast.backends import torch_backend as module
    return module


class DeviceRows:
    """A backend's `forward_rows` for one device: the rows kernel of a single-device loss. The fused linear loss
    takes it or its vocab-parallel twin (kdfast.vocab_parallel.ShardedRows), which share this interface."""

    def __init__(self, backend: str):
        self.backend = backend
        self.module = backend_module(backend)

    def __call__(self, student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
        """`teacher`: a dense teacher's logits, a sparse teacher's SparseTargets, or several MixedTeachers (mixed in
        the kernel where the backend can, else a chunk at a time by kdfast.teacher_mixture)."""
        if isinstance(teacher, MixedTeachers):
            mixer = self._mixer(opts)
            if mixer is not None:
                return mixer.mixture_forward_rows(student, teacher, labels, grad_scale, grad, opts, call)
            from kdfast.teacher_mixture import mixture_rows_by_chunks

            return mixture_rows_by_chunks(self.module.forward_rows, student, teacher, labels, grad_scale, grad, opts,
                                          call)
        if isinstance(teacher, SparseTargets):
            return self.module.sparse_forward_rows(student, teacher, labels, grad_scale, grad, opts, call)
        return self.module.forward_rows(student, teacher, labels, grad_scale, grad, opts, call)

    def _mixer(self, opts: LossOptions):
        """The backend module whose kernel mixes several teachers on this device, or None (torch mixes a chunk)."""
        if self.backend == "cuda" and opts.backend == "auto" and triton_available():
            # Both GPU kernels mix in the kernel; "auto" takes Triton's (backend="cuda" takes the CUDA kernel's). On an
            # H200 (2026-12-04, M=3, bf16) the CUDA one was 13% faster on logits (15.2 ms vs 17.4 ms for 8192 x
            # 128256) but 2.6x slower in the fused linear form (169 ms vs 64 ms), whose float32 teacher chunks it
            # mixes a chunk at a time in torch (it pairs each student dtype with its own teachers alone).
            return backend_module("triton")
        return self.module if hasattr(self.module, "mixture_forward_rows") else None

    def fills_teacher_divergences(self, opts: LossOptions) -> bool:
        """Whether this device's mixing kernel writes each teacher's own divergence (`MixedTeachers.divergences`)
        in the call itself; elsewhere the caller runs the kernel once per teacher for them."""
        fills = getattr(self._mixer(opts), "fills_teacher_divergences", None)
        return fills is not None and fills(opts)

    def reduce_hidden_grad(self, d_hidden):
        return d_hidden  # one device holds the whole vocabulary: d hidden is complete


def device_rows(opts: LossOptions, device: torch.device) -> DeviceRows:
    return DeviceRows(resolve_backend(opts.backend, device, sparse=opts.tail_code != 0))


def rows_kernel_for(opts: LossOptions, check, local_vocab, rows_of: torch.Tensor, labels, process_group, vocab_range,
                    reduce_hidden_grad: bool = True, labels_name: str = "labels"):
    """The rows kernel of one device (DeviceRows), or of this rank's vocab shard (ShardedRows) once every rank's
    inputs passed `check` and the ranks agreed on the shards (`local_vocab()`: this rank's columns); `check()` raises
    ValueError for bad input, on every rank when one rank's input is bad."""
    if process_group is None:
        if vocab_range is not None:
            raise ValueError("vocab_range needs a process_group (the ranks that hold the other shards)")
        check()
        return device_rows(opts, rows_of.device)
    from kdfast.distributed import check_then_agree
    from kdfast.shared_vocab import refuse_over_shards
    from kdfast.vocab_parallel import ShardedRows

    refuse_over_shards(opts)
    shard = check_then_agree(check, local_vocab, rows_of, process_group, vocab_range, labels, opts,
                             reduce_hidden_grad, labels_name)
    return ShardedRows(device_rows(opts, rows_of.device), shard)


def teacher_divergences_in_kernel(rows_kernel, opts: LossOptions) -> bool:
    """Whether `rows_kernel` (a DeviceRows, or a vocab shard's ShardedRows) writes each mixed teacher's own divergence
    in its mixing call (`MixedTeachers.divergences`)."""
    fills = getattr(rows_kernel, "fills_teacher_divergences", None)
    return fills is not None and fills(opts)


def average_runs_as_mixture(rows_kernel, opts: LossOptions) -> bool:
    """Whether combine="average" runs as the mixture's one call. Under forward KL the average's gradient,
    sum_m w_m (q - p_m) / T, is the mixture's (q - p_bar) / T (each row's weights sum to 1), and its value
    sum_m w_m KL(p_m || q) is the weighted sum of the teachers' own divergences, which a kernel that writes them in its
    mixing call gives: one call in place of one per teacher (`average_of_teacher_divergences`)."""
    return opts.has_kd and opts.divergence == "forward_kl" and teacher_divergences_in_kernel(rows_kernel, opts)


def average_of_teacher_divergences(divergences: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """sum_m w_m D_m per row from [rows, M] divergences and log-weights; a teacher of weight 0 adds 0 (its own
    divergence may be NaN: a row of -inf)."""
    weights = log_weights.exp()
    return torch.where(weights > 0, weights * divergences, 0.0).sum(-1)
