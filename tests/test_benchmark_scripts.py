"""The benchmark and profiling commands run end to end on tiny shapes (results go to a temporary folder)."""

import csv
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from forked_command import run_command

import kdfast
from kdfast.kernel_abi import STAT_COLUMNS

ROOT = Path(__file__).resolve().parent.parent


# The threads conftest gives each pytest-xdist worker: a benchmark of 2 OpenMP threads beside the other worker's
# tests spins for its cores.
THREADS = {name: os.environ[name] for name in ("OMP_NUM_THREADS",) if name in os.environ}


def _run(tmp_path, *args):
    env = {"KDFAST_RESULTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
           "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), **THREADS}  # the source tree, installed or not
    result = run_command(list(args), env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_bench_linear_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_linear.py", "--tokens", "64", "--hidden", "16", "--teacher-hidden", "24",
         "--vocab", "500", "--repeats", "1", "--no-compile")
    rows = list(csv.DictReader(next(tmp_path.glob("bench_linear_*.csv")).open()))
    assert {r["method"] for r in rows} >= {"torch eager", "kdfast linear_distill_loss", "four GEMMs alone (floor)"}


def _floors_agree(row) -> bool:
    """The memory floor uses the faster of the copy's bandwidth and an in-place pass's: never above the copy floor."""
    copy_ratio = float(row.get("ratio_to_floor") or row["x_floor"])
    memory_ratio = float(row.get("ratio_to_memory_floor") or row["x_memory_floor"])
    return memory_ratio >= copy_ratio > 0


def test_bench_logits_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_distill.py", "--tokens", "64", "--vocab", "500", "--repeats", "1", "--no-compile")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_distill_*.csv")).open())}
    assert set(rows) == {"torch eager", "kdfast (fresh gradient)", "kdfast (inplace_backward)"}
    assert float(rows["torch eager"]["speedup_vs_eager"]) == 1.0
    assert all(_floors_agree(row) for row in rows.values())
    assert float(rows["kdfast (inplace_backward)"]["memory_bandwidth_gbs"]) >= float(
        rows["kdfast (inplace_backward)"]["copy_bandwidth_gbs"])


def test_bench_cross_entropy_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_cross_entropy.py", "--tokens", "256", "--vocab", "4000", "--repeats", "1",
         "--no-compile", "--memory", "--label-smoothing", "0.1", "--z-loss-weight", "1e-4", "--class-weights",
         "--token-scaling", "dft")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_cross_entropy_*.csv")).open())}
    assert set(rows) == {"torch eager", "kdfast (fresh gradient)", "kdfast (inplace_backward)"}
    assert all(row["class_weights"] == "True" and row["token_scaling"] == "dft" for row in rows.values())
    assert all(_floors_agree(row) for row in rows.values())
    # The fresh gradient is one [256, 4000] float32 tensor (4 MB); in place there is none (the class weights and
    # the token scaling are weighed over the gradient in place, their rows' factors [256] apart). Linux keeps a
    # process's resident-set count per CPU and folds it in by batches, so its high-water mark may miss some pages of
    # the last ones touched (3.58-3.75 MiB measured for the 3.91 MiB gradient, 2 CPUs): half a MiB of slack.
    gradient = 256 * 4000 * 4
    assert int(rows["kdfast (fresh gradient)"]["extra_peak_bytes"]) >= gradient - 2**19
    assert int(rows["kdfast (inplace_backward)"]["extra_peak_bytes"]) < gradient // 4


def test_bench_sparse_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_sparse.py", "--tokens", "64", "--vocab", "500", "--top-k", "8", "--repeats", "1",
         "--no-compile", "--memory")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_sparse_*.csv")).open())}
    assert float(rows["torch eager (DistillKit-style top-k)"]["speedup_vs_eager"]) == 1.0
    assert all(int(r["extra_peak_bytes"]) >= 0 for r in rows.values()), "each measured in a process of its own"
    assert all(_floors_agree(row) for row in rows.values())


def test_bench_linear_sparse_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_linear_sparse.py", "--tokens", "64", "--hidden", "16", "--wide-teacher", "32",
         "--vocab", "500", "--top-k", "8", "--repeats", "1")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_linear_sparse_*.csv")).open())}
    assert float(rows["kdfast linear_sparse_distill_loss"]["time_vs_sparse"]) == 1.0
    assert "kdfast linear_distill_loss, live teacher H_t=32" in rows
    assert float(rows["kdfast linear_student_distill_loss, teacher logits given"]["median_ms"]) > 0


@pytest.mark.filterwarnings("ignore")
def test_profile_smoke(tmp_path):
    _run(tmp_path, "-m", "kdfast.cli", "profile", "--tokens", "32", "--vocab", "100", "--hidden", "8",
         "--teacher-hidden", "8", "--no-compile")
    assert list(tmp_path.glob("profile_memory_*.png")) and list(tmp_path.glob("profile_memory_*.csv"))


def test_bench_vocab_parallel_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_vocab_parallel.py", "--tokens", "32", "--vocab", "200", "--repeats", "1")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_vocab_parallel_*.csv")).open())}
    sent = int(rows["kdfast vocab-parallel"]["bytes_sent_per_rank"])
    assert sent == 7 * 8 + 2 * 32 * STAT_COLUMNS * 4, "the check exchange plus two [rows, STAT_COLUMNS] float32 ones"
    assert int(rows["gather full logits + kdfast"]["bytes_sent_per_rank"]) == 2 * 32 * 100 * 4
    assert float(rows["kdfast on the shard alone"]["x_shard_alone"]) == 1.0
    # The log-probs: the check, the forward's and the backward's exchanges (one chunk each), and d hidden's sum.
    sent = int(rows["kdfast vocab-parallel log-probs"]["bytes_sent_per_rank"])
    assert sent == 7 * 8 + 2 * (2 * 32 * STAT_COLUMNS * 4) + 32 * 256 * 4
    assert int(rows["gather the head + kdfast log-probs"]["bytes_sent_per_rank"]) == 100 * 256 * 4
    assert float(rows["kdfast log-probs on the shard alone"]["x_shard_alone"]) == 1.0


def test_bench_sharded_memory_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_sharded_memory.py", "--size", "tiny", "--steps", "1", "--length", "8")
    rows = {r["setup"]: r for r in csv.DictReader(next(tmp_path.glob("bench_sharded_memory_tiny_*.csv")).open())}
    assert [int(r["processes"]) for r in rows.values()] == [1, 2, 2]
    whole, sharded = rows["one process, nothing sharded"], rows["FSDP2, teacher sharded"]
    assert int(sharded["student_param_kib"]) < int(whole["student_param_kib"]), "each process holds a shard"
    assert float(whole["x_one_process"]) == 1.0


def test_bench_linear_precision_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_linear_precision.py", "--tokens", "64", "--hidden", "32", "--teacher-hidden",
         "48", "--vocab", "2000")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_linear_precision_*.csv")).open())}
    rounded, fp32 = rows["kdfast (bf16 logits, default)"], rows["kdfast, fp32_logits=True"]
    assert float(fp32["d_hidden_rel_error"]) < float(rounded["d_hidden_rel_error"])


def test_bench_train_step_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_train_step.py", "--length", "16", "--vocab", "300", "--student", "32,1,64",
         "--teacher", "48,1,96", "--repeats", "1")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_train_step_*.csv")).open())}
    assert float(rows["full logits (eager loss)"]["speedup_vs_full_logits"]) == 1.0
    assert float(rows["kdfast (DistillationTrainer's loss)"]["median_ms"]) > 0


def test_bench_causal_lm_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_causal_lm.py", "--batch", "2", "--length", "256", "--vocab", "8000",
         "--hidden", "32", "--repeats", "1", "--memory")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_causal_lm_*.csv")).open())}
    own, fused = rows["the model's own loss (full logits)"], rows["kdfast.patch_causal_lm"]
    assert float(own["speedup_vs_own_loss"]) == 1.0
    # The model's own loss holds [512, 8000] float32 logits (16 MB) and their log-softmax and gradient.
    assert int(own["extra_peak_bytes"]) > 2 * 512 * 8000 * 4 > int(fused["extra_peak_bytes"])


def test_bench_linear_chunks_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_linear_chunks.py", "--tokens", "64", "--hidden", "16", "--teacher-hidden", "24",
         "--vocab", "500", "--chunks", "16", "32", "--repeats", "1", "--dtype", "bf16")
    rows = list(csv.DictReader(next(tmp_path.glob("bench_linear_chunks_*.csv")).open()))
    assert {(r["chunk"], r["fp32_logits"]) for r in rows} >= {("16", "True"), ("32", "False"), ("auto (64)", "True")}


def test_bench_small_calls_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_small_calls.py", "--vocab", "1000", "--calls", "3")
    rows = list(csv.DictReader(next(tmp_path.glob("bench_small_calls_*.csv")).open()))
    assert [r["backend"] for r in rows] == ["cpu", "torch"] and all(float(r["us_per_call"]) > 0 for r in rows)


def test_bench_trl_smoke(tmp_path):
    pytest.importorskip("trl.kernels.chunked_divergence")
    _run(tmp_path, "benchmarks/bench_trl.py", "--tokens", "64", "--hidden", "16", "--teacher-hidden", "24",
         "--vocab", "500", "--repeats", "1", "--tasks", "all")
    rows = {(r["task"], r["method"]): r for r in csv.DictReader(next(tmp_path.glob("bench_trl_*.csv")).open())}
    for beta in ("0", "0.5", "1"):
        theirs, ours = rows[f"divergence beta={beta}", "TRL"], rows[f"divergence beta={beta}", "kdfast"]
        assert float(theirs["speedup_vs_trl"]) == 1.0 and float(ours["median_ms"]) > 0
        assert float(ours["loss_rel_diff"]) < 1e-5 and float(ours["grad_weight_rel_l2"]) < 1e-4
    if hasattr(kdfast, "linear_token_logprobs"):
        assert float(rows["log-probs + entropy", "kdfast"]["entropy_rel_diff"]) < 1e-5
        frozen = rows["log-probs, frozen head", "kdfast"]  # d hidden alone: no d weight to compare
        assert float(frozen["grad_hidden_rel_l2"]) < 1e-5 and frozen["grad_weight_rel_l2"] == ""
    if importlib.util.find_spec("trl.trainer.utils") and hasattr(importlib.import_module("trl.trainer.utils"),
                                                                  "add_fused_lm_head"):  # TRL's GRPO head on kdfast
        for task in ("GRPO), head learns", "GRPO), head frozen", "GRPO), head frozen, no bonus", "SFT), head learns",
                     "SFT), head frozen"):
            ours, head = rows[f"fused LM head ({task}", "kdfast"], task.partition("head ")[2]
            assert float(ours["loss_rel_diff"]) < 1e-5 and float(ours["grad_hidden_rel_l2"]) < 1e-4
            assert (ours["grad_weight_rel_l2"] == "") == head.startswith("frozen")
    if importlib.util.find_spec("trl.experimental.async_distillation"):  # the async trainer's loss, 1 and 3 teachers
        for task in ("async top-8 beta=0", "async top-8 beta=0.5, 3 teachers", "async top-8 beta=1, 3 teachers"):
            ours = rows[task, "kdfast"]
            assert float(ours["loss_rel_diff"]) < 1e-4 and float(ours["entropy_rel_diff"]) < 1e-5
            assert float(ours["grad_hidden_rel_l2"]) < 1e-4 and float(ours["grad_weight_rel_l2"]) < 1e-4
    if importlib.util.find_spec("trl.experimental.server_distillation"):  # the server trainer's loss, each beta
        for task in ("server top-8 beta=0", "server top-1 beta=0.5", "server top-1 beta=1"):
            ours = rows[task, "kdfast"]
            assert float(ours["loss_rel_diff"]) < 1e-4 and ours["entropy_rel_diff"] == ""
            assert float(ours["grad_hidden_rel_l2"]) < 1e-4 and float(ours["grad_weight_rel_l2"]) < 1e-4
    # the second timing, in a child whose allocator keeps freed memory (glibc here)
    for row in rows.values():
        assert float(row["median_ms_memory_kept"]) > 0 and float(row["os_cpu_ms"]) >= 0
        assert float(row["page_faults"]) >= 0 and float(row["page_faults_memory_kept"]) >= 0
    assert float(rows["divergence beta=0", "TRL"]["speedup_vs_trl_memory_kept"]) == 1.0


def test_bench_trl_times_only_the_tasks_asked_for(tmp_path):
    pytest.importorskip("trl.experimental.server_distillation")
    _run(tmp_path, "benchmarks/bench_trl.py", "--tasks", "server", "--betas", "0", "--tokens", "32", "--hidden", "16",
         "--teacher-hidden", "24", "--vocab", "300", "--top-k", "4", "--repeats", "1", "--no-memory-kept")
    rows = list(csv.DictReader(next(tmp_path.glob("bench_trl_*.csv")).open()))
    assert [(r["task"], r["method"]) for r in rows] == [("server top-4 beta=0", method) for method in ("TRL", "kdfast")]


_FRESH_TENSOR_FAULTS = """
import resource, torch
from freed_memory import keep_freed_memory

def faults_of_fresh_tensors():  # 64 MiB a call: above glibc's mmap threshold, so each is new pages unless kept
    for _ in range(16):  # the kept heap first grows to its size (glibc took 8 such calls here)
        torch.ones(1 << 24)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(1 << 24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults_of_fresh_tensors()
print(before, faults_of_fresh_tensors() if keep_freed_memory() else None)
"""


def test_freed_memory_kept_takes_the_page_faults_out(tmp_path):
    """What the benchmarks' second timing rests on: with the allocator told to keep freed memory, a fresh 64 MiB
    tensor a call faults in (almost) no new pages, where by default each one faults in all of its own."""
    if platform.system() != "Linux":
        pytest.skip("glibc's mallopt")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"}
    result = subprocess.run([sys.executable, "-c", _FRESH_TENSOR_FAULTS], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = result.stdout.split()
    assert after != "None", "mallopt refused the settings"
    # (4 KiB pages: 16384 faults a tensor; transparent huge pages: 32)
    assert int(before) >= 3 and 10 * int(after) < int(before), (before, after)


def test_bench_teacher_cache_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_teacher_cache.py", "--windows", "4", "--seq-len", "17", "--top-k", "8",
         "--repeats", "1")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_teacher_cache_*.csv")).open())}
    assert rows["local, 2 processes"]["shard_bytes_equal"] == "True", "the same bytes as one process"
    assert all(rows[name]["ids_equal"] == "True" for name in rows)
    assert float(rows["served, 8 in flight"]["writer_tokens_per_s"]) > 0


def test_bench_multi_teacher_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_multi_teacher.py", "--tokens", "32", "--linear-tokens", "32", "--vocab", "500",
         "--repeats", "1")
    found = next(tmp_path.glob("bench_multi_teacher_*.csv"))
    rows = {(r["form"], r["method"]): r for r in csv.DictReader(found.open())}
    assert float(rows["logits", "loop of 3 kdfast calls (average)"]["x_loop"]) == 1.0
    assert float(rows["linear", "5 GEMMs alone (floor)"]["x_floor"]) == 1.0
    assert all(_floors_agree(row) for (form, _), row in rows.items() if form == "logits")
    routed = [row for (form, method), row in rows.items() if form == "linear" and "routed" in method]
    assert len(routed) == 2 and all(float(row["median_ms"]) > 0 for row in routed)


def test_bench_multi_teacher_dtype_and_heads(tmp_path):
    """--dtype and the heads' sizes: the CSV (beyond the CPU fp32 run's columns) says them, and has no failure."""
    _run(tmp_path, "benchmarks/bench_multi_teacher.py", "--tokens", "16", "--linear-tokens", "16", "--vocab", "300",
         "--repeats", "1", "--dtype", "bf16", "--hidden", "16", "--teacher-hidden", "24", "32", "48")
    rows = {(r["form"], r["method"]): r
            for r in csv.DictReader(next(tmp_path.glob("bench_multi_teacher_*.csv")).open())}
    assert float(rows["linear", "6 GEMMs alone (floor)"]["x_floor"]) == 1.0
    assert float(rows["linear", "loop of 3 kdfast linear calls (average)"]["x_loop"]) == 1.0
    assert {(r["dtype"], r["hidden"], r["teacher_hidden"], r["error"]) for r in rows.values()} == {
        ("bf16", "16", "24 32 48", "")}


def test_bench_cross_vocab_smoke(tmp_path):
    _run(tmp_path, "benchmarks/bench_cross_vocab.py", "--rows", "16", "--student-vocab", "300", "--teacher-vocab",
         "400", "--shared", "200", "--repeats", "1")
    rows = {r["method"]: r for r in csv.DictReader(next(tmp_path.glob("bench_cross_vocab_*.csv")).open())}
    assert float(rows["TRL ULDLoss (uld)"]["trl_over_this"]) == 1.0
    assert int(rows["kdfast mapped"]["matched"]) == 200 and all(_floors_agree(row) for row in rows.values())
