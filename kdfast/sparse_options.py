"""The settings of a sparse teacher's loss: every dense setting plus how the teacher's missing mass is treated."""

from __future__ import annotations

from dataclasses import dataclass

from kdfast.kernel_abi import Divergence
from kdfast.options import LossOptions, field_names, is_finite_number

# The kernels' codes (0 is a dense teacher). "given": the bucket algebra with the teacher's rest given as a row's
# log-prob K (K + 1 log-probs a row), where 1 - sum(p) of float32 log-probs would cancel.
TAILS = {"bucket": 1, "renormalize": 2, "given": 3}
# The teacher's rest is 1 - sum(p) as computed (float64; below 0 it is rounding: none). Reverse KL puts it under a
# logarithm's denominator, where a near-certain teacher's rest of ~0 would make the loss +inf and the gradient NaN:
# there it counts at least this much (TRL's server loss floors it at 1 - exp(-1e-7) alike).
TEACHER_REST_FLOOR = 1e-7
# The student's mass outside the ids is summed from float32 exps relative to the row's largest logit, which vanish
# below exp(-87.3365) (the smallest normal float32): as a probability it counts at least that much where some column
# lies outside the ids (sparse_math.floored_rest), so that forward KL against a teacher's rest stays finite. Where
# the ids cover the row it is none.
STUDENT_REST_FLOOR_LOG = -87.3365


@dataclass(frozen=True)
class SparseOptions(LossOptions):
    """tail="bucket": the teacher's K probabilities and its rest 1 - sum(p) against the student's probabilities at the
    K ids and its mass outside them (every divergence). tail="renormalize" (forward KL only): sum_k P_k (log P_k -
    log q_k) with P the K probabilities renormalised, re-tempered from `teacher_temperature` to T when given.
    tail="given": as "bucket", with the rest's log-probability given after the K log-probs of each row."""

    tail: str = "bucket"
    teacher_temperature: float | None = None

    def __post_init__(self):
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {sorted(TAILS)}, got {self.tail!r}")
        if self.teacher_temperature is not None:
            if self.tail != "renormalize":
                raise ValueError("teacher_temperature re-tempers stored log-probs and needs tail='renormalize' (with "
                                 "tail='bucket' the log-probs must already be at the loss's temperature)")
            if not (is_finite_number(self.teacher_temperature) and self.teacher_temperature > 0):
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
