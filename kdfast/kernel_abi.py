"""What the kernels and the Python side agree on: the divergence codes, the phases a kernel runs, and the order of
the settings the native kernels take. The C++ twin is csrc/common/kernel_abi.h (tests/test_kernel_abi.py holds
the two equal); the Triton kernels import these names.

Phases (docs/DESIGN.md, "Shards and phases"): a kernel sees the columns [col_offset, col_offset + V_local) of the
global vocabulary. FUSED is a whole row on one device (col_offset 0). A vocabulary split over ranks runs
STATS (each row's log-sum-exps over the local columns), exchanges them, runs SUMS (the divergence's partial row
sums and the label's logit, given the global log-sum-exps; forward KL and CE also write their gradient here),
exchanges those, and runs GRADIENT (the gradient of the divergences whose gradient needs a whole-row sum).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Divergence(enum.IntEnum):
    FORWARD_KL = 0
    REVERSE_KL = 1
    JSD = 2
    SKEW_FORWARD_KL = 3
    SKEW_REVERSE_KL = 4
    TVD = 5

    @property
    def setting(self) -> str:
        """The name users pass as `divergence=`."""
        return self.name.lower()


class Phase(enum.IntEnum):
    FUSED = 0  # out [rows, PART_COLUMNS]: the loss's parts
    STATS = 1  # out [rows, 4]: log-sum-exp of the student at T, the teacher at T, the student at 1; 0
    SUMS = 2  # out [rows, 4]: divergence terms, D (the gradient's row sum), the CE target's logit, sum q log q
    GRADIENT = 3  # out: nothing; reverse KL and mixtures: writes the gradient from the global lse and sums


STAT_COLUMNS = 4  # the width of the STATS and SUMS outputs, and of what ranks exchange per row
# FUSED writes each row's parts, before any weight: the divergence, the cross-entropy (NaN for a label out of
# range), the z-loss, 1 where the student's largest logit is the label's (token accuracy), and the student's entropy
# at T (logged as TRL logs it; at T = 1 for CE alone, 0 without either). The total,
# kd_scale * divergence + ce_weight * CE + z_loss_weight * z, is formed from them (kdfast.reduction), so the parts
# cost no extra pass.
PART_COLUMNS = 5
PART_KD, PART_CE, PART_Z, PART_CORRECT = 0, 1, 2, 3  # PART_Z: log(Z)^2 of the student at T = 1 (the z-loss)
PART_ENTROPY = 4  # -sum_j q_j log q_j, q = softmax(student / T) over the row
SUM_ENTROPY = 3  # the SUMS column of sum_j q_j log q_j over a shard's columns


@dataclass(frozen=True)
class PhaseCall:
    """Which phase a backend's `forward_rows` runs, over which columns, with the global row tables it needs."""

    phase: Phase = Phase.FUSED
    col_offset: int = 0
    row_stats: torch.Tensor | None = None  # SUMS, GRADIENT: the global STATS [rows, STAT_COLUMNS]
    row_totals: torch.Tensor | None = None  # GRADIENT: the global SUMS [rows, STAT_COLUMNS]
    global_vocab: int = 0  # the whole vocabulary's size (label smoothing spreads eps over it); 0: these columns


@dataclass(frozen=True)
class SparseTargets:
    """A sparse teacher's rows, in the place of its logits: [batch, rows, K] global token ids (-1: padding) and their
    log-probabilities, K contiguous (K + 1 under tail="given": the rest's last)."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def rows(self, index) -> SparseTargets:
        return SparseTargets(self.ids[index], self.logprobs[index])


@dataclass(frozen=True)
class MixedTeachers:
    """Several dense teachers, in the place of one's logits: M tensors [batch, rows, V] of one dtype and layout,
    mixed per row as p_bar = sum_m w_m softmax(t_m / T), with `log_weights` [batch * rows, M] float32 (log w_m, -inf
    for a teacher that does not count in a row; M contiguous, a row stride of 0 for the same weights everywhere).
    `divergences`: [batch * rows, M] float32 where a rows kernel that can (`DeviceRows.fills_teacher_divergences`)
    writes each teacher's own divergence per row beside the mixture's loss, or None."""

    teachers: tuple
    log_weights: torch.Tensor
    divergences: torch.Tensor | None = None

    def rows(self, index) -> MixedTeachers:
        """Rows `index` (a slice) of a [1, rows, V] batch."""
        divergences = self.divergences[index] if self.divergences is not None else None
        return MixedTeachers(tuple(teacher[:, index] for teacher in self.teachers), self.log_weights[index],
                             divergences)


MAX_MIXED_TEACHERS = 64  # kernel_abi.h, kMaxMixedTeachers

FUSED = PhaseCall()

# The native kernels take their settings as two lists in this order (csrc/common/kernel_abi.h, IntSetting and
# FloatSetting).
INT_SETTINGS = ("divergence", "ignore_index", "has_kd", "has_ce", "phase", "col_offset", "splits", "tail",
                "global_vocab")
FLOAT_SETTINGS = ("beta", "temperature", "kd_scale", "ce_weight", "teacher_scale", "label_smoothing",
                  "z_loss_weight")


def native_settings(opts, call: PhaseCall = None, splits: int = 0):
    """The (ints, floats) a native kernel takes for the settings record `opts` (kdfast.options.LossOptions) in the
    phase `call`."""
    call = call or FUSED
    ints = {"divergence": int(opts.divergence_code), "ignore_index": int(opts.ignore_index),
            "has_kd": int(opts.has_kd), "has_ce": int(opts.has_ce), "phase": int(call.phase),
            "col_offset": int(call.col_offset), "splits": int(splits), "tail": int(opts.tail_code),
            "global_vocab": int(call.global_vocab)}
    floats = {"beta": float(opts.beta), "temperature": float(opts.temperature), "kd_scale": float(opts.kd_scale),
              "ce_weight": float(opts.ce_weight), "teacher_scale": float(opts.teacher_scale),
              "label_smoothing": float(opts.label_smoothing), "z_loss_weight": float(opts.z_loss_weight)}
    return [ints[name] for name in INT_SETTINGS], [floats[name] for name in FLOAT_SETTINGS]
