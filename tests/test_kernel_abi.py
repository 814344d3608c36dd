"""The codes and settings order the kernels share have one source per language: kdfast/kernel_abi.py (Python and,
by import, Triton) and csrc/common/kernel_abi.h (C++ and CUDA). These tests hold the two equal."""

import re
from pathlib import Path

import pytest

from kdfast.kernel_abi import (
    FLOAT_SETTINGS,
    INT_SETTINGS,
    PART_CE,
    PART_COLUMNS,
    PART_CORRECT,
    PART_ENTROPY,
    PART_KD,
    PART_Z,
    STAT_COLUMNS,
    SUM_ENTROPY,
    Divergence,
    Phase,
    PhaseCall,
    native_settings,
)
from kdfast.options import LossOptions
from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG, TAILS, TEACHER_REST_FLOOR

HEADER = (Path(__file__).resolve().parent.parent / "csrc" / "common" / "kernel_abi.h").read_text()


def _enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER, re.S).group(1)
    return {key: int(value) for key, value in re.findall(r"(k\w+) = (\d+)", body)}


def _camel(text: str) -> str:
    return "".join(part.capitalize() for part in text.lower().split("_"))


def test_divergence_codes_match_the_header():
    expected = {"kForwardKL": 0, "kReverseKL": 1, "kJSD": 2, "kSkewForwardKL": 3, "kSkewReverseKL": 4, "kTVD": 5}
    assert _enum("Divergence") == expected
    assert {d.name: int(d) for d in Divergence} == {"FORWARD_KL": 0, "REVERSE_KL": 1, "JSD": 2, "SKEW_FORWARD_KL": 3,
                                                    "SKEW_REVERSE_KL": 4, "TVD": 5}


def test_tails_match_the_header():
    assert _enum("Tail") == {"kTailDense": 0, **{f"kTail{_camel(name)}": code for name, code in TAILS.items()}}
    assert float(re.search(r"kTeacherRestFloor = ([0-9.e-]+);", HEADER).group(1)) == TEACHER_REST_FLOOR
    assert float(re.search(r"kStudentRestFloorLog = ([0-9.e-]+)f;", HEADER).group(1)) == STUDENT_REST_FLOOR_LOG


def test_phases_match_the_header():
    assert _enum("Phase") == {f"kPhase{_camel(p.name)}": int(p) for p in Phase}
    assert int(re.search(r"kStatColumns = (\d+)", HEADER).group(1)) == STAT_COLUMNS
    assert int(re.search(r"kPartColumns = (\d+)", HEADER).group(1)) == PART_COLUMNS
    assert _enum("PartColumn") == {"kPartKd": PART_KD, "kPartCe": PART_CE, "kPartZ": PART_Z,
                                   "kPartCorrect": PART_CORRECT, "kPartEntropy": PART_ENTROPY}
    assert SUM_ENTROPY == STAT_COLUMNS - 1  # the SUMS column after the three the header names


@pytest.mark.parametrize("enum_name,names", [("IntSetting", INT_SETTINGS), ("FloatSetting", FLOAT_SETTINGS)])
def test_settings_order_matches_the_header(enum_name, names):
    codes = _enum(enum_name)
    count = codes.pop(f"k{enum_name}Count")
    assert count == len(names)
    assert codes == {f"kSetting{_camel(name)}": index for index, name in enumerate(names)}


def test_triton_kernels_use_the_python_codes():
    pytest.importorskip("triton")
    from kdfast.kernels import distill

    assert [distill.FORWARD_KL.value, distill.REVERSE_KL.value, distill.JSD.value, distill.SKEW_FORWARD_KL.value,
            distill.TVD.value] == \
        [Divergence.FORWARD_KL, Divergence.REVERSE_KL, Divergence.JSD, Divergence.SKEW_FORWARD_KL, Divergence.TVD]
    assert [distill.FUSED.value, distill.STATS.value, distill.SUMS.value, distill.GRADIENT.value] == list(Phase)
    assert distill.COLUMNS.value == STAT_COLUMNS


def test_native_settings_follow_the_record():
    opts = LossOptions(divergence="jsd", beta=0.25, temperature=2.0, kd_weight=0.5, ce_weight=0.1, ignore_index=-7,
                       label_smoothing=0.1, z_loss_weight=1e-4)
    ints, floats = native_settings(opts, PhaseCall(Phase.SUMS, col_offset=96, global_vocab=1000))
    assert dict(zip(INT_SETTINGS, ints)) == {"divergence": 2, "ignore_index": -7, "has_kd": 1, "has_ce": 1,
                                             "phase": 2, "col_offset": 96, "splits": 0, "tail": 0,
                                             "global_vocab": 1000}
    assert dict(zip(FLOAT_SETTINGS, floats)) == {"beta": 0.25, "temperature": 2.0, "kd_scale": 2.0, "ce_weight": 0.1,
                                                 "teacher_scale": 1.0, "label_smoothing": 0.1, "z_loss_weight": 1e-4}
    # The z-loss alone needs the student's statistics at T = 1, but not the labels.
    z_only = LossOptions(kd_weight=0.0, z_loss_weight=1e-4)
    assert z_only.has_ce and not z_only.needs_labels


def test_record_round_trips_through_its_text():
    opts = LossOptions(divergence="skew_reverse_kl", beta=0.3, temperature=0.7, reduction="none", backend="torch")
    assert LossOptions.decode(opts.encoded()) == opts


@pytest.mark.parametrize("divergence,beta,effective", [
    ("jsd", 0.0, Divergence.FORWARD_KL), ("jsd", 1.0, Divergence.REVERSE_KL), ("jsd", 0.5, Divergence.JSD),
    ("skew_forward_kl", 0.0, Divergence.FORWARD_KL), ("skew_reverse_kl", 0.0, Divergence.REVERSE_KL),
    ("skew_reverse_kl", 0.2, Divergence.SKEW_REVERSE_KL)])
def test_effective_divergence(divergence, beta, effective):
    assert LossOptions(divergence=divergence, beta=beta).effective_divergence == effective


def test_the_most_mixed_teachers_match_the_header():
    from kdfast.kernel_abi import MAX_MIXED_TEACHERS

    assert int(re.search(r"kMaxMixedTeachers = (\d+);", HEADER).group(1)) == MAX_MIXED_TEACHERS
