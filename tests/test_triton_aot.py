"""CI compiles the Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed): code that only the
interpreter accepts cannot land, and the launcher's aligned specialisation must get vectorised loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdfast.kernel_abi import Divergence

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def reports():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot_check.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles_for_sm80_and_sm90(reports):
    # dense fused: the flag sets in bf16, the first in fp16 and fp32; dense shard phases in bf16; several teachers
    # fused in bf16, read twice and once (under forward KL, reverse KL and JSD also with each one's own divergence);
    # sparse fused and shard phases in bf16; a teacher through a map (forward KL and JSD) in bf16
    assert len(reports) == 2 * len(Divergence) * (3 + 2 + 3 + 2 + 4) + 2 * 3 + 2 * 2
    assert {r["dtype"] for r in reports} == {"bf16", "fp16", "fp32"}
    assert sum(r["kernel"] == "mapped_fwd_kernel" for r in reports) == 2 * 2
    assert sum(r.get("OWN_KL") == 1 for r in reports) == 2 * 3
    assert sum(r.get("MIX_ONCE") == 1 for r in reports) == 2 * len(Divergence)
    assert {r["capability"] for r in reports} == {80, 90}


def test_logit_loads_are_vectorised(reports):
    # Every variant reads the row (a sparse teacher's SUMS without a gradient too: the student's entropy).
    scalar_only = [r for r in reports if not r["vector_loads"]]
    assert not scalar_only, f"variants without vector loads: {scalar_only[:3]}"


def test_register_spills_stay_small(reports):
    # Measured at BLOCK_V=4096 / 8 warps: a few variants spill 4-32 bytes per thread (ptxas caps them at ~80
    # registers); a regression guard until the launch config is tuned on a GPU.
    spilled = [r for r in reports if (r["spill_store_bytes"] or 0) > 64]
    assert not spilled, f"variants that spill more than 64 bytes: {spilled[:3]}"
