"""The loss settings shared by every backend, validated once on the host."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The integer codes are part of the kernel ABI (Triton constexpr, C++ switch): keep them in sync.
DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4}
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


@dataclass(frozen=True)
class LossOptions:
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    t2_scale: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    inplace_backward: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.beta, (int, float)) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {self.beta!r}")
        for name in ("kd_weight", "ce_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    @property
    def effective_divergence(self) -> str:
        """TRL's convention (DESIGN.md): jsd with beta = 0 is forward KL and with beta = 1 reverse KL exactly
        (the mixture formula alone would give 0 at both ends)."""
        if self.divergence == "jsd" and self.beta == 0.0:
            return "forward_kl"
        if self.divergence == "jsd" and self.beta == 1.0:
            return "reverse_kl"
        return self.divergence

    @property
    def divergence_code(self) -> int:
        return DIVERGENCES[self.effective_divergence]

    @property
    def kd_scale(self) -> float:
        """kd_weight times T^2 when t2_scale (keeps gradient magnitudes comparable across temperatures)."""
        return float(self.kd_weight) * (float(self.temperature) ** 2 if self.t2_scale else 1.0)

    @property
    def has_kd(self) -> bool:
        return self.kd_weight != 0.0

    @property
    def has_ce(self) -> bool:
        return self.ce_weight != 0.0
