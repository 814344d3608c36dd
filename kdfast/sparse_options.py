"""The settings of a sparse teacher's loss: every dense setting plus how the teacher's missing mass is treated."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdfast.kernel_abi import Divergence
from kdfast.options import LossOptions, _is_number, field_names

TAILS = {"bucket": 1, "renormalize": 2}  # the kernels' codes (0 is a dense teacher)
REST_AS_NONE = 1e-6  # a teacher rest of at most this much counts as none (rounding of log-probs that sum to 1)


@dataclass(frozen=True)
class SparseOptions(LossOptions):
    """tail="bucket": the teacher's K probabilities and its rest 1 - sum(p) against the student's probabilities at the
    K ids and its mass outside them (every divergence). tail="renormalize" (forward KL only): sum_k P_k (log P_k -
    log q_k) with P the K probabilities renormalised, re-tempered from `teacher_temperature` to T when given."""

    tail: str = "bucket"
    teacher_temperature: float | None = None

    def __post_init__(self):
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {sorted(TAILS)}, got {self.tail!r}")
        if self.teacher_temperature is not None:
            if self.tail != "renormalize":
                raise ValueError("teacher_temperature re-tempers stored log-probs and needs tail='renormalize' (with "
                                 "tail='bucket' the log-probs must already be at the loss's temperature)")
            if not (_is_number(self.teacher_temperature) and math.isfinite(self.teacher_temperature)
                    and self.teacher_temperature > 0):
                raise ValueError(f"teacher_temperature must be None or a finite number > 0, got "
                                 f"{self.teacher_temperature!r}")
            object.__setattr__(self, "teacher_temperature", float(self.teacher_temperature))
        super().__post_init__()
        if self.tail == "renormalize" and self.effective_divergence != Divergence.FORWARD_KL:
            raise ValueError(f"tail='renormalize' is the top-k cross-entropy and takes divergence='forward_kl' only, "
                             f"got {self.divergence!r}; use tail='bucket' for the others")

    @property
    def tail_code(self) -> int:
        return TAILS[self.tail]

    @property
    def teacher_scale(self) -> float:
        """Stored log-probs times this are the teacher's log-probabilities at T (up to a constant per row)."""
        return self.teacher_temperature / self.temperature if self.teacher_temperature is not None else 1.0


SparseOptions.FIELD_NAMES = field_names(SparseOptions)
