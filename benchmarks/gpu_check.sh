#!/usr/bin/env bash
# One command for a GPU machine (docs/DESIGN.md, "Tests and CI"): builds the CUDA kernels, benchmarks them against
# the Triton kernel, eager PyTorch, torch.compile (and Liger-Kernel when its wheel is carried in .whl/),
# benchmarks the fused linear loss against its four-GEMM floor and the sparse-teacher kernel against the copy bandwidth,
# then runs the GPU tests of every backend (sparse paths included). Results: benchmarks/results/ (and $OUT, when the
# device tool runs it).
# Uses the machine's own python3/torch/triton (there is no network there).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

echo "== benchmark" | tee "$LOGS/gpu_bench.txt"
timeout "${BENCH_TIMEOUT:-240}" "$PYTHON" benchmarks/bench_gpu_kernels.py 2>&1 | tee -a "$LOGS/gpu_bench.txt" || status=1
cp "$RESULTS"/gpu_kernels_* "$LOGS"/ 2>/dev/null

echo "== fused linear benchmark (8192 tokens, H_s 2048, H_t 4096, V 128256 bf16)" | tee "$LOGS/gpu_linear.txt"
timeout "${LINEAR_TIMEOUT:-180}" "$PYTHON" benchmarks/bench_linear.py --no-compile 2>&1 | tee -a "$LOGS/gpu_linear.txt" \
  || status=1
cp "$RESULTS"/bench_linear_* "$LOGS"/ 2>/dev/null

echo "== sparse teacher benchmark (8192 x 128256 bf16, K=64: GB/s vs copy bandwidth)" | tee "$LOGS/gpu_sparse.txt"
timeout "${SPARSE_TIMEOUT:-120}" "$PYTHON" benchmarks/bench_sparse.py --no-compile 2>&1 | tee -a "$LOGS/gpu_sparse.txt" \
  || status=1
cp "$RESULTS"/bench_sparse_* "$LOGS"/ 2>/dev/null

echo "== GPU tests (every backend; the ahead-of-time compile checks run in CI instead)" | tee "$LOGS/gpu_tests.txt"
timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -P -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" tests \
  --ignore=tests/test_triton_aot.py --ignore=tests/test_cuda_compile.py -rfE >"$LOGS/gpu_tests_full.txt" 2>&1 \
  || status=1
grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$LOGS/gpu_tests_full.txt" | tail -n 80 | tee -a "$LOGS/gpu_tests.txt"
[ -L kdfast/kernels ] && rm kdfast/kernels
exit $status
