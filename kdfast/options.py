"""The loss settings: one frozen record, validated once where the public function or module builds it, then passed
whole to the autograd Functions, the custom ops (as its `encoded()` text) and the backends."""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass

from kdfast.kernel_abi import Divergence

DIVERGENCES = {d.setting: d for d in Divergence}
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
# The least beta a mixture (JSD, the skews) takes above 0. A skew's scores reach 1 / beta (p / m <= 1 / beta) and its
# gradient q h: where q flushes to 0 in float32 (below e^-87.3 of the row's largest, 1.2e-38) the kernels drop up to
# 1.2e-38 / beta of it (1.0 at beta = 2^-126, measured), and below float32's smallest normal 1 / beta overflows (NaN at
# beta = 1e-40). JSD is about beta KL(p || q) there: below it the loss and its gradient drop under float32's normal
# range (a GPU flushes them to 0; Triton's interpreter turned the arithmetic float64 and wrote a zero 16-bit gradient).
MIN_BETA = 1e-30
# return_components=PER_ROW: the components per row (as reduction="none" gives them) whatever the loss's reduction.
PER_ROW = "per_row"


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
    # Also return kdfast.LossComponents (the parts, the accuracy, the entropy): True reduced as the loss, "per_row"
    # one value per row whatever the loss's reduction.
    return_components: bool | str = False
    vocab_size: int | None = None  # the vocabulary both models share; wider logits' extra columns are padding
    label_smoothing: float = 0.0  # the CE's target: (1 - eps) onehot + eps / V (PyTorch's definition)
    z_loss_weight: float = 0.0  # PaLM's z-loss, weight * log(Z)^2 of the student at T = 1

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (is_finite_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (_is_number(self.beta) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {self.beta!r}")
        if 0.0 < self.beta < MIN_BETA and self.divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl"):
            why = ("the loss is about beta KL(p || q), below float32's normal range; beta = 0 is forward KL"
                   if self.divergence == "jsd" else "its scores reach 1 / beta, beyond float32 below it")
            raise ValueError(f"beta must be 0 or at least {MIN_BETA:g} for divergence={self.divergence!r} ({why}), "
                             f"got {self.beta!r}")
        if self.beta == 1.0 and self.divergence in ("skew_forward_kl", "skew_reverse_kl"):
            raise ValueError(f"beta must be below 1 for divergence={self.divergence!r}: at beta = 1 the mixture is the "
                             f"distribution it is compared with, so the loss is 0 whatever the student")
        for name in ("kd_weight", "ce_weight", "z_loss_weight"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not (_is_number(self.label_smoothing) and 0.0 <= self.label_smoothing <= 1.0):
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {self.label_smoothing!r}")
        if not isinstance(self.ignore_index, numbers.Integral) or isinstance(self.ignore_index, bool):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.vocab_size is not None:
            if not isinstance(self.vocab_size, numbers.Integral) or isinstance(self.vocab_size, bool) \
                    or self.vocab_size < 1:
                raise ValueError(f"vocab_size must be None or a positive int, got {self.vocab_size!r}")
            object.__setattr__(self, "vocab_size", int(self.vocab_size))
        # Plain Python values (numpy scalars in, say), so that the record encodes and compares as itself.
        for name in ("beta", "temperature", "kd_weight", "ce_weight", "label_smoothing", "z_loss_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        object.__setattr__(self, "t2_scale", bool(self.t2_scale))
        object.__setattr__(self, "inplace_backward", bool(self.inplace_backward))
        if isinstance(self.return_components, str):
            if self.return_components != PER_ROW:
                raise ValueError(f"return_components must be True, False or {PER_ROW!r}, got "
                                 f"{self.return_components!r}")
        else:
            object.__setattr__(self, "return_components", bool(self.return_components))
        # Encoded once, as plain repr text that torch.compile can trace when it traces the record's construction
        # (the field names are a class attribute, set below each class: dataclasses.fields is not traceable).
        names = type(self).FIELD_NAMES
        object.__setattr__(self, "_encoded", ";".join(f"{name}={getattr(self, name)!r}" for name in names))

    @classmethod
    def build(cls, owner: str, **settings) -> LossOptions:
        """The record from keyword settings, with a clear error for a name it does not know (the modules and
        trainers take `**settings`)."""
        unknown = sorted(set(settings) - set(cls.FIELD_NAMES))
        if unknown:
            raise TypeError(f"{owner} got unknown loss setting(s) {unknown}; the settings are "
                            f"{list(cls.FIELD_NAMES)}")
        return cls(**settings)

    def replace(self, **changes) -> LossOptions:
        return dataclasses.replace(self, **changes)

    def encoded(self) -> str:
        """The record as text: the custom ops' one settings argument (torch.library takes no dataclasses)."""
        return self._encoded

    @classmethod
    def decode(cls, text: str) -> LossOptions:
        return _decode(cls, text)

    @property
    def effective_divergence(self) -> Divergence:
        """The divergence the kernels compute. TRL's convention (docs/DESIGN.md): jsd with beta = 0 is forward KL and
        with beta = 1 reverse KL exactly (the mixture formula alone would give 0 at both ends). The skews with
        beta = 0 are the plain KLs, computed in their closed forms (no mixture whose ratio p/q could overflow)."""
        divergence = DIVERGENCES[self.divergence]
        if divergence in (Divergence.JSD, Divergence.SKEW_FORWARD_KL) and self.beta == 0.0:
            return Divergence.FORWARD_KL
        if (divergence == Divergence.JSD and self.beta == 1.0) or (
                divergence == Divergence.SKEW_REVERSE_KL and self.beta == 0.0):
            return Divergence.REVERSE_KL
        return divergence

    @property
    def divergence_code(self) -> int:
        return int(self.effective_divergence)

    @property
    def is_mixture(self) -> bool:
        """JSD and the skews: their gradient needs a per-element score and its row sum (docs/DESIGN.md)."""
        return self.effective_divergence not in (Divergence.FORWARD_KL, Divergence.REVERSE_KL)

    @property
    def components_per_row(self) -> bool:
        """Whether the components come per row: reduction="none", or return_components="per_row"."""
        return self.return_components == PER_ROW or (bool(self.return_components) and self.reduction == "none")

    @property
    def kd_scale(self) -> float:
        """kd_weight times T^2 when t2_scale (keeps gradient magnitudes comparable across temperatures)."""
        return float(self.kd_weight) * (float(self.temperature) ** 2 if self.t2_scale else 1.0)

    @property
    def has_kd(self) -> bool:
        return self.kd_weight != 0.0

    @property
    def has_ce(self) -> bool:
        """Whether the kernels need the student's statistics at T = 1: for the CE term or for the z-loss."""
        return self.ce_weight != 0.0 or self.z_loss_weight != 0.0

    @property
    def needs_labels(self) -> bool:
        """The CE term reads the labels (the z-loss does not)."""
        return self.ce_weight != 0.0

    @property
    def tail_code(self) -> int:
        """0: a dense teacher (kdfast.sparse_options.SparseOptions sets the sparse ones)."""
        return 0

    @property
    def teacher_scale(self) -> float:
        return 1.0

    @property
    def gradient_needs_row_sums(self) -> bool:
        """Whether a vocab shard's gradient waits for whole-row sums (reverse KL and the mixtures do; forward KL
        and CE need only the normalisers)."""
        return self.has_kd and self.effective_divergence != Divergence.FORWARD_KL


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A real number, not a bool, neither infinite nor NaN. Compared rather than `math.isfinite`: under
    `torch.compile(dynamic=True)` TorchDynamo treats `math.isfinite` as a torch op and breaks the graph there, where
    comparisons of a constant fold (and of a symbolic float become guards)."""
    return _is_number(value) and -math.inf < value < math.inf


def field_names(cls) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


LossOptions.FIELD_NAMES = field_names(LossOptions)


@functools.lru_cache(maxsize=256)
def _decode(cls, text: str) -> LossOptions:
    pairs = (item.split("=", 1) for item in text.split(";"))
    return cls(**{name: ast.literal_eval(value) for name, value in pairs})
