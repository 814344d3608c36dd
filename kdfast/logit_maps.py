"""What an LM head does to its GEMM's output, per model, in the order the models (and TRL's trainers) apply it: the
bias (in the GEMM), times the logit scale, then Gemma-2's softcap c * tanh(z / c), then (where the caller folds it
in, as kdfast.linear_token_logprobs does) the division by the temperature.

The scale is applied to the logits, never folded into the hidden states: (s h) W^T + b is not s (h W^T + b) when the
head has a bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.cpu_softcap import softcap_chain_, softcap_into
from kdfast.options import is_finite_number


@dataclass(frozen=True)
class LogitMap:
    scale: float = 1.0
    softcap: float | None = None
    # Last, after the softcap. Free: it joins the scale's multiply without a softcap and the cap's final multiply
    # (c / T) with one. The distillation losses leave it at 1: their kernels divide by T themselves.
    temperature: float = 1.0

    @property
    def slope(self) -> float:
        """d mapped / d GEMM output without a softcap, a constant (with one, chain_ adds 1 - tanh^2)."""
        return self.scale / self.temperature

    @property
    def gemm_factor(self) -> float:
        """The part of the map a GEMM can take in its alpha (and the bias in its beta): all of it without a softcap,
        scale / c (the tanh's argument) with one; cap_ does the rest."""
        return self.slope if self.softcap is None else self.scale / self.softcap

    # 16-bit logits are capped in float32 and rounded once, as the GEMM's output was: a division, a tanh and a
    # product in bf16 round three more times (a probability moved by ~1%), and a tanh kept in bf16 loses 1 - tanh^2
    # near +-1 to cancellation. So a 16-bit chunk keeps the tanh's argument, and the chain rule takes the tanh again.

    def cap_(self, tanh_arg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """With a softcap, after a GEMM that applied gemm_factor: c / T * tanh written into `out` (tanh_arg itself
        where no chain rule follows), which it returns. `tanh_arg` then holds what tanh_chain_ reads: the tanh
        (float32) or its argument unchanged (16-bit)."""
        if tanh_arg.dtype == torch.float32:
            if softcap_into(tanh_arg, out, 1.0, self.softcap / self.temperature, keep_tanh=out is not tanh_arg):
                return out
            return torch.mul(tanh_arg.tanh_(), self.softcap / self.temperature, out=out)
        for rows in _row_blocks(out):
            out[rows] = tanh_arg[rows].float().tanh_().mul_(self.softcap / self.temperature)
        return out

    def tanh_chain_(self, grad: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """chain_ from what cap_ kept: grad times slope * (1 - tanh^2), in place. May overwrite a float32 `kept`."""
        if kept.dtype == torch.float32:
            if softcap_chain_(grad, kept, 1.0, self.slope, from_tanh=True):
                return grad
            # slope * (1 - tanh^2) in the ops the unscaled chain already took.
            return grad.mul_(kept.mul_(kept).mul_(-self.slope).add_(self.slope))
        return self._chain_in_float32_(grad, kept, 1.0)

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Maps the GEMM's output in place and returns it."""
        if self.softcap is None:
            return logits.mul_(self.slope) if self.slope != 1.0 else logits
        if logits.dtype != torch.float32:
            return self.capped_into(logits, logits)
        if softcap_into(logits, logits, self.scale / self.softcap, self.softcap / self.temperature, keep_tanh=False):
            return logits
        if self.scale != 1.0:
            logits.mul_(self.scale)
        return logits.div_(self.softcap).tanh_().mul_(self.softcap / self.temperature)

    def capped_into(self, uncapped: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """With a softcap: the capped logits of the GEMM's output `uncapped` written into `out`, which it returns;
        chain_ then reads `uncapped` (float32: scaled in place; 16-bit: left as it is, the scale taken in float32)."""
        if uncapped.dtype != torch.float32:
            factor = self.scale / self.softcap
            for rows in _row_blocks(out):
                out[rows] = uncapped[rows].float().mul_(factor).tanh_().mul_(self.softcap / self.temperature)
            return out
        if self.scale != 1.0:
            uncapped.mul_(self.scale)
        if out is not uncapped and softcap_into(uncapped, out, 1.0 / self.softcap, self.softcap / self.temperature,
                                                keep_tanh=False):
            return out
        return torch.div(uncapped, self.softcap, out=out).tanh_().mul_(self.softcap / self.temperature)

    def chain_(self, grad: torch.Tensor, uncapped: torch.Tensor | None) -> torch.Tensor:
        """grad (d loss / d mapped logits) times d mapped / d GEMM output, in place: scale / T * (1 - tanh(z / c)^2).
        Overwrites a float32 `uncapped`."""
        if self.softcap is None:
            return grad.mul_(self.slope) if self.slope != 1.0 else grad
        if uncapped.dtype != torch.float32:
            return self._chain_in_float32_(grad, uncapped, self.scale / self.softcap)
        if softcap_chain_(grad, uncapped, 1.0 / self.softcap, self.slope, from_tanh=False):
            return grad
        return self.tanh_chain_(grad, uncapped.div_(self.softcap).tanh_())

    def _chain_in_float32_(self, grad: torch.Tensor, argument: torch.Tensor, factor: float) -> torch.Tensor:
        """grad times slope * (1 - tanh(factor * argument)^2), the tanh and the product in float32, grad rounded
        once."""
        for rows in _row_blocks(grad):
            tanh = argument[rows].float().mul_(factor).tanh_()
            grad[rows] = grad[rows].float().mul_(tanh.mul_(tanh).mul_(-self.slope).add_(self.slope))
        return grad

    def reference(self, logits: torch.Tensor) -> torch.Tensor:
        """The map out of place (autograd follows it): for references and eager paths."""
        logits = logits * self.scale if self.scale != 1.0 else logits
        logits = self.softcap * torch.tanh(logits / self.softcap) if self.softcap is not None else logits
        return logits / self.temperature if self.temperature != 1.0 else logits


# A 16-bit chunk's float32 temporaries are taken this many bytes at a time, not a float32 copy of the chunk: small
# on the CPU (its chunk budget is 48 MiB), larger on a GPU, where each block costs a few kernel launches.
_BLOCK_BYTES = {"cpu": 8 * 2**20, "cuda": 64 * 2**20}


def _row_blocks(tensor: torch.Tensor):
    """Slices of the rows of a [rows, V] tensor, each row block's float32 copy about _BLOCK_BYTES."""
    elements = _BLOCK_BYTES.get(tensor.device.type, _BLOCK_BYTES["cpu"]) // 4
    step = max(1, elements // max(tensor.shape[-1], 1))
    return [slice(start, start + step) for start in range(0, tensor.shape[0], step)]


def _check_scale(name: str, value) -> float:
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_softcap(name: str, value) -> float | None:
    if value is None:
        return None
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return float(value)


def _check_temperature(value) -> float:
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def tempered_map(logit_scale=1.0, softcap=None, temperature=1.0) -> LogitMap:
    """One head's map with the temperature folded in, from the public keywords (checked, each error naming its
    keyword)."""
    return LogitMap(_check_scale("logit_scale", logit_scale), _check_softcap("softcap", softcap),
                    _check_temperature(temperature))


def logit_maps(softcap=None, student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
               teacher_logit_scale=1.0) -> tuple[LogitMap, LogitMap]:
    """The student's and the teacher's maps from the public keywords: `softcap` is both models' cap, or each model's
    own through `student_softcap` / `teacher_softcap` (not both ways at once)."""
    softcap = _check_softcap("softcap", softcap)
    student_softcap = _check_softcap("student_softcap", student_softcap)
    teacher_softcap = _check_softcap("teacher_softcap", teacher_softcap)
    if softcap is not None and (student_softcap is not None or teacher_softcap is not None):
        raise ValueError("pass softcap (both models' cap) or student_softcap / teacher_softcap (each model's), "
                         "not both")
    if softcap is not None:
        student_softcap = teacher_softcap = softcap
    return (LogitMap(_check_scale("student_logit_scale", student_logit_scale), student_softcap),
            LogitMap(_check_scale("teacher_logit_scale", teacher_logit_scale), teacher_softcap))
