#!/usr/bin/env bash
# The fused linear loss on a GPU in one run (docs/DESIGN.md, "The fused linear loss on a GPU"): against its four-GEMM
# floor, torch.compile and Liger (its wheel carried in .whl/) at N=8192 H_s=2048 H_t=4096 V=128256 bf16, with and
# without float32 logits; the chunk size by measurement; errors against float64 on bf16 inputs (kdfast both ways,
# Liger); the host's cost of a small call, eager and as a CUDA graph replay; a whole training step against full
# logits and Liger; the logits-level kernels (no regression); kdfast against TRL's own Triton kernels at the same
# shape (its DistillationTrainer's divergence at beta 0, 0.5, 1 and its chunked token log-probs; TRL 1.16 and the
# packages its trainer module imports, transformers and accelerate among them, carried as wheels in .whl/ as Liger's
# is); several teachers (bench_multi_teacher.py: the mixture with the teachers mixed inside the Triton kernel against
# the CUDA kernel mixing them in its own passes, the average, a loop of single-teacher calls and eager torch, at M=3
# N=8192 V=128256 bf16 logits, and the fused linear form with M=2 teachers, H 2048 and 4096, N=8192 H_s=2048; about
# 1 to 2 minutes); a teacher of another vocabulary (bench_cross_vocab.py, 2048 aligned rows, V_s 32000, V_t 40000:
# "mapped" on its Triton kernel against the torch and CUDA backends, uld and hybrid against TRL's ULDLoss; under a
# minute); then the GPU tests of these paths. Results: benchmarks/results/ (and $OUT, when the device tool runs it). About 15
# minutes in all with the build; where one command may run 10 minutes at most, split it:
# STEPS="linear chunks precision trl" then STEPS="small step kernels multi cross tests" (the kernels' build is cached
# between the two on the same machine).
set -uo pipefail
STEPS=${STEPS:-linear chunks precision trl small step kernels multi cross tests}
want() { [[ " $STEPS " == *" $1 "* ]]; }
source "$(dirname "$0")/gpu_env.sh"

step() {  # step NAME TIMEOUT SCRIPT [ARGS...]: one benchmark, its log and CSVs beside the others
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOGS/gpu_linear_check.txt"
  timeout "$limit" "$PYTHON" "$@" 2>&1 | tee -a "$LOGS/gpu_linear_check.txt" || status=1
}
want linear && step "fused linear vs GEMM floor, torch.compile, Liger" 300 benchmarks/bench_linear.py
want chunks && step "chunk sizes" 150 benchmarks/bench_linear_chunks.py
want precision && step "errors against float64 on bf16 inputs" 120 benchmarks/bench_linear_precision.py
want trl && step "kdfast vs TRL's Triton kernels (N=8192, H_s=2048, H_t=4096, V=128256 bf16)" 180 benchmarks/bench_trl.py
want small && step "small calls: host cost, launches, CUDA graph" 90 benchmarks/bench_small_calls.py
want step && step "whole training step" 240 benchmarks/bench_train_step.py
want kernels && step "logits-level kernels" 180 benchmarks/bench_gpu_kernels.py
want multi && step "several teachers (M=3 N=8192 V=128256 bf16; linear M=2 H 2048, 4096)" 180 \
  benchmarks/bench_multi_teacher.py --device cuda --dtype bf16 --memory --repeats 5 --tokens 8192 --vocab 128256 \
  --teachers 3 --linear-tokens 8192 --hidden 2048 --teacher-hidden 2048 4096
want cross && step "another vocabulary (2048 rows, V_s 32000, V_t 40000)" 90 benchmarks/bench_cross_vocab.py \
  --device cuda --rows 2048 --repeats 5
if want tests; then
  echo "== GPU tests of these paths" | tee -a "$LOGS/gpu_linear_check.txt"
  timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -p no:cacheprovider -p no:benchmark -n "${TEST_WORKERS:-8}" \
    tests/test_cuda_step.py tests/test_fp32_logits.py tests/test_linear_loss.py tests/test_cuda_backend.py \
    tests/test_numerics.py tests/test_multi_teacher.py tests/test_triton_mixture.py tests/test_cuda_mixture.py \
    tests/test_mapped_kernels.py tests/test_cross_vocab.py tests/test_sparse_loss.py -rfE 2>&1 | tail -n 60 \
    | tee -a "$LOGS/gpu_linear_check.txt" || status=1
fi
[ -L kdfast/kernels ] && rm kdfast/kernels
if [ -n "${OUT:-}" ]; then  # few files come back from a device run: this run's CSVs and logs in one archive
  cp "$RESULTS"/*_nvidia_* "$OUT"/ 2>/dev/null
  (cd "$OUT" && tar -czf /tmp/gpu_linear_results.tgz -- * && find . -type f ! -name gpu_linear_check.txt -delete \
    && mv /tmp/gpu_linear_results.tgz .)
fi
exit $status
