"""Compiles the Triton kernels (a dense teacher's, a sparse one's, and that of a teacher of another vocabulary read
through a map) ahead of time for real GPUs and reports what ptxas says; run without TRITON_INTERPRET (the interpreter
replaces the kernels). Prints one JSON line per variant.

    python tests/triton_aot_check.py
"""

import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kdfast.kernel_abi import Divergence
from kdfast.kernels import distill, mapped, sparse

POINTER_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
FLOAT_ARGS = {"inv_t", "beta", "log_beta", "log_1m_beta", "kd_scale", "ce_weight", "label_smoothing",
              "inv_global_vocab", "z_loss_weight", "teacher_scale"}


def compile_kernel(dtype: str, capability: int, num_warps: int, kernel=distill.distill_fwd_kernel, **constexprs):
    """The signature the launcher produces for [batch, rows, vocab] logits with a vocab divisible by 16 (and, for the
    sparse kernel, int64 ids and float32 log-probs)."""
    signature, aligned = {}, []
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("student_ptr", "teacher_ptr", "grad_ptr"):
            signature[name] = POINTER_TYPES[dtype]
        elif name in ("labels_ptr", "ids_ptr", "mix_offsets_ptr"):
            signature[name] = "*i64"
        elif name in ("column_ptr", "unmatched_ptr"):  # a map's tables: int32 teacher columns, an int8 mask
            signature[name] = "*i32" if name == "column_ptr" else "*i8"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
        # Triton specialises pointers and integers divisible by 16 at launch: so do we here.
        if name.endswith("_ptr") or "stride" in name or name in ("vocab", "col_offset"):
            aligned.append(index)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                       attrs={(index,): [["tt.divisibility", 16]] for index in aligned})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def ptxas_log(ptx: str, capability: int) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    return subprocess.run([ptxas, "-v", f"-arch={arch}", handle.name, "-o", os.devnull], capture_output=True,
                          text=True, check=True).stderr


def ptxas_report(out: str) -> dict:
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


# NEEDS_LABELS follows HAS_CE; the label-smoothing branch (SMOOTH) is compiled in the fused CE case and in SUMS.
FUSED_FLAGS = [dict(PHASE=0, HAS_KD=True, HAS_CE=True, CE_FROM_TEMPERED=False, HAS_LABELS=True, WRITE_GRAD=True,
                    NEEDS_LABELS=True, SMOOTH=False),
               dict(PHASE=0, HAS_KD=True, HAS_CE=False, CE_FROM_TEMPERED=False, HAS_LABELS=False, WRITE_GRAD=False,
                    NEEDS_LABELS=False, SMOOTH=False),
               dict(PHASE=0, HAS_KD=False, HAS_CE=True, CE_FROM_TEMPERED=False, HAS_LABELS=True, WRITE_GRAD=True,
                    NEEDS_LABELS=True, SMOOTH=True)]
# A vocab shard's phases (bf16): statistics, sums (forward KL writes its gradient there), gradient.
SHARD_FLAGS = [dict(PHASE=1, HAS_KD=True, HAS_CE=True, CE_FROM_TEMPERED=True, HAS_LABELS=True, WRITE_GRAD=False,
                    NEEDS_LABELS=True, SMOOTH=False),
               dict(PHASE=2, HAS_KD=True, HAS_CE=True, CE_FROM_TEMPERED=False, HAS_LABELS=True, WRITE_GRAD=True,
                    NEEDS_LABELS=True, SMOOTH=True),
               dict(PHASE=3, HAS_KD=True, HAS_CE=True, CE_FROM_TEMPERED=False, HAS_LABELS=True, WRITE_GRAD=True,
                    NEEDS_LABELS=True, SMOOTH=False)]


# A teacher of another vocabulary through a map (kernels/mapped.py), fused: forward KL's branch and the scores'.
MAPPED_CHECKED = (Divergence.FORWARD_KL, Divergence.JSD)
MAPPED_FLAGS = dict(HAS_KD=True, HAS_CE=True, CE_FROM_TEMPERED=False, HAS_LABELS=True, WRITE_GRAD=True,
                    COVERED=False, MAPPED=1)

# Each mixed teacher's own divergence: its three branches in the loss pass (forward KL, reverse KL, the others').
OWN_CHECKED = (Divergence.FORWARD_KL, Divergence.REVERSE_KL, Divergence.JSD)


def variants():
    for capability, divergence in itertools.product([80, 90], range(len(Divergence))):
        # Every flag set in bf16; fp16 and fp32 (their loads and the gradient's stores) with the first.
        for dtype, flags in [*(("bf16", flags) for flags in FUSED_FLAGS), ("fp16", FUSED_FLAGS[0]),
                             ("fp32", FUSED_FLAGS[0])]:
            yield capability, divergence, dtype, flags
        for flags in SHARD_FLAGS:
            write_grad = flags["WRITE_GRAD"] and not (flags["PHASE"] == 2 and divergence != 0)
            yield capability, divergence, "bf16", dict(flags, WRITE_GRAD=write_grad)
        # Several teachers mixed in the kernel (fused only).
        yield capability, divergence, "bf16", dict(FUSED_FLAGS[0], MIX_TEACHERS=1)
        # ... each teacher's block read once per pass (KDFAST_TRITON_MIX_READS=once)
        yield capability, divergence, "bf16", dict(FUSED_FLAGS[0], MIX_TEACHERS=1, MIX_ONCE=1,
                                                   MIX_KNOWN_STATS=int(divergence != Divergence.REVERSE_KL))
        if divergence in OWN_CHECKED:  # ... with each teacher's own divergence (4 teachers' accumulators)
            yield capability, divergence, "bf16", dict(FUSED_FLAGS[0], MIX_TEACHERS=1, OWN_KL=1, OWN_BLOCK=4)
        # A sparse teacher (K = 64), bucket: fused, then the shard's phases.
        for flags in [FUSED_FLAGS[0], *SHARD_FLAGS]:
            write_grad = flags["WRITE_GRAD"] and not (flags["PHASE"] == 2 and divergence != 0)
            yield capability, divergence, "bf16", dict(flags, WRITE_GRAD=write_grad, TAIL=1, BLOCK_K=64)
        if divergence in MAPPED_CHECKED:
            yield capability, divergence, "bf16", MAPPED_FLAGS


def report(variant) -> str:
    capability, divergence, dtype, flags = variant
    block_v, num_warps = distill.launch_config(128_256)
    kernel = sparse.sparse_fwd_kernel if "TAIL" in flags else distill.distill_fwd_kernel
    if flags.get("MAPPED"):
        kernel, flags = mapped.mapped_fwd_kernel, {k: v for k, v in flags.items() if k != "MAPPED"}
    if kernel is distill.distill_fwd_kernel:
        flags = {"MIX_TEACHERS": 0, "OWN_KL": 0, "OWN_BLOCK": 1, "MIX_ONCE": 0, "MIX_KNOWN_STATS": 0, **flags}
    # Triton's own ptxas run (-v) prints its report here (TRITON_DUMP_PTXAS_LOG, set by main): one ptxas a variant,
    # not two. A kernel from Triton's cache was not assembled again: ptxas runs for it here.
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile_kernel(dtype, capability, num_warps, kernel, DIVERGENCE=divergence, BLOCK_V=block_v,
                                  **flags)
    ptx = compiled.asm["ptx"]
    log = log.getvalue() if "Used " in log.getvalue() else ptxas_log(ptx, capability)
    loads = sorted(set(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)))
    return json.dumps({"capability": capability, "divergence": divergence, "dtype": dtype, "kernel": kernel.__name__,
                       **flags,
                       "vector_loads": any(".v4" in load or ".v2" in load for load in loads), "loads": loads,
                       **ptxas_report(log)})


def main() -> int:
    # Two workers: each compile is a Python front end plus a ptxas process.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for line in pool.imap(report, list(variants())):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
