#!/usr/bin/env bash
# The fused linear loss on a GPU in one run (docs/DESIGN.md, "The fused linear loss on a GPU"): against its four-GEMM
# floor, torch.compile and Liger (its wheel carried in .whl/) at N=8192 H_s=2048 H_t=4096 V=128256 bf16, with and
# without float32 logits; the chunk size by measurement; errors against float64 on bf16 inputs (kdfast both ways,
# Liger); the host's cost of a small call, eager and as a CUDA graph replay; a whole training step against full logits
# and Liger; the logits-level kernels (no regression); kdfast against TRL's own Triton kernels at the same shape (its
# DistillationTrainer's divergence at beta 0, 0.5, 1 and its chunked token log-probs; TRL 1.16 and the packages its
# trainer module imports, transformers and accelerate among them, carried as wheels in .whl/ as Liger's is: trl,
# datasets, dill and multiprocess at TRL 1.16's versions); several teachers (bench_multi_teacher.py: the mixture with
# the teachers mixed inside the Triton kernel against the CUDA kernel mixing them in its own passes, the average, a
# loop of single-teacher calls and eager torch, at M=3 N=8192 V=128256 bf16 logits, and the fused linear form with M=2
# teachers, H 2048 and 4096, N=8192 H_s=2048; about 1 to 2 minutes); a teacher of another vocabulary
# (bench_cross_vocab.py, 2048 aligned rows, V_s 32000, V_t 40000: "mapped" on its Triton kernel against the torch and
# CUDA backends, uld and hybrid against TRL's ULDLoss; under a minute); the cross-entropy alone on logits
# (bench_cross_entropy.py, step `ce`: kdfast.cross_entropy against torch and Liger's CrossEntropyLoss at 8192 x 128256
# bf16, then with softcap 30; seconds); a Hugging Face Llama's own loss against kdfast.patch_causal_lm and Liger's
# fused linear CE forward (bench_causal_lm.py, step `causal-lm`: 2 layers, hidden 2048, V=128256, 4 x 2048 tokens
# bf16; seconds); stored teachers (bench_linear_sparse.py, step `stored`: top-k, the dense logits given to
# linear_student_distill_loss against Liger's LigerFusedLinearKLDivLoss, live heads; N=8192 H_s=2048 V=128256 bf16);
# then the GPU tests of these paths. Results:
# benchmarks/results/ (and $OUT, when the device tool runs it). About 15 minutes in all with the build; where one
# command may run 10 minutes at most, split it: STEPS="linear chunks precision trl" then STEPS="small step kernels ce
# causal-lm multi cross stored tests" (the kernels' build is cached between the two on the same machine). Seen on an H200 on
# 2026-12-04: the build 43-53 s, `trl` about 60 s, `multi` about 95 s, `tests` on five of its files 64 s and on nine
# 104 s; `suite` reached 36% in 200 s, and without those nine files 77% in 320 s. Steps run in the order STEPS names them; step `suite` runs the whole test suite on the GPU but for the
# files that test only the CPU or the build (their CPU time would crowd the GPU's tests out of a short lease; CI runs
# them).
set -uo pipefail
STEPS=${STEPS:-linear chunks precision trl small step kernels ce causal-lm multi cross stored tests}
source "$(dirname "$0")/gpu_env.sh"

collect() {  # few files come back from a device run: this run's CSVs and logs so far, in one archive in $OUT
  [ -n "${OUT:-}" ] || return 0
  mkdir -p /tmp/gpu_collected
  cp "$RESULTS"/*_nvidia_* /tmp/gpu_collected/ 2>/dev/null
  find "$OUT" -maxdepth 1 -type f ! -name gpu_linear_results.tgz -exec cp {} /tmp/gpu_collected/ \;
  tar -czf "$OUT/gpu_linear_results.tgz" -C /tmp/gpu_collected .
  find "$OUT" -maxdepth 1 -type f ! -name gpu_linear_check.txt ! -name gpu_linear_results.tgz -delete
}
step() {  # step NAME TIMEOUT SCRIPT [ARGS...]: one benchmark, its log and CSVs beside the others
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOGS/gpu_linear_check.txt"
  timeout "$limit" "$PYTHON" "$@" 2>&1 | tee -a "$LOGS/gpu_linear_check.txt" || status=1
}
pytest_step() {  # pytest_step NAME TIMEOUT LOG [PYTEST ARGS...]: the failures and the summary in the check's log
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name" | tee -a "$LOGS/gpu_linear_check.txt"
  # -v: each outcome is logged as it comes, so a run stopped at its limit still says what failed
  timeout "$limit" "$PYTHON" -P -m pytest -v -p no:cacheprovider -p no:benchmark -n "${TEST_WORKERS:-15}" -rfE "$@" \
    >"$LOGS/$log" 2>&1 || status=1
  grep -E "FAILED|ERROR|^E  | passed| failed" "$LOGS/$log" | tail -n 60 | tee -a "$LOGS/gpu_linear_check.txt"
}
# CPU-only or build-only files (the nvcc and AOT compile checks, the benchmark and demo smoke runs, pip installs,
# multi-process CPU trainers, a kill -9 of cache writers): CI runs them.
CPU_ONLY_TESTS=(test_triton_aot test_cuda_compile test_benchmark_scripts test_distill_demo
  test_distill_demo_cross_tokenizer test_package_install test_build_lock test_teacher_cache_processes test_fsdp2
  test_deepspeed_zero3 test_trainer_sharded)
CPU_ONLY_IGNORES=()
for name in "${CPU_ONLY_TESTS[@]}"; do CPU_ONLY_IGNORES+=("--ignore=tests/$name.py"); done

for name in $STEPS; do
  case $name in
    linear) step "fused linear vs GEMM floor, torch.compile, Liger" 300 benchmarks/bench_linear.py ;;
    chunks) step "chunk sizes" 150 benchmarks/bench_linear_chunks.py ;;
    precision) step "errors against float64 on bf16 inputs" 120 benchmarks/bench_linear_precision.py ;;
    trl) step "kdfast vs TRL's Triton kernels (N=8192, H_s=2048, H_t=4096, V=128256 bf16)" "${TRL_TIMEOUT:-180}" \
      benchmarks/bench_trl.py ;;
    small) step "small calls: host cost, launches, CUDA graph" 90 benchmarks/bench_small_calls.py ;;
    step) step "whole training step" 240 benchmarks/bench_train_step.py ;;
    kernels) step "logits-level kernels" 180 benchmarks/bench_gpu_kernels.py ;;
    ce) step "cross-entropy alone vs torch, Liger (8192 x 128256 bf16)" 90 benchmarks/bench_cross_entropy.py
      step "the same with Gemma-2's softcap 30 (the cap inside kdfast's and Liger's loss)" 90 \
        benchmarks/bench_cross_entropy.py --softcap 30 ;;
    causal-lm) step "a Llama's own loss vs kdfast.patch_causal_lm, Liger (4 x 2048 tokens, V=128256 bf16)" 120 \
      benchmarks/bench_causal_lm.py ;;
    multi) step "several teachers (M=3 N=8192 V=128256 bf16; linear M=2 H 2048, 4096)" "${MULTI_TIMEOUT:-180}" \
      benchmarks/bench_multi_teacher.py --device cuda --dtype bf16 --memory --repeats 5 --tokens 8192 --vocab 128256 \
      --teachers 3 --linear-tokens 8192 --hidden 2048 --teacher-hidden 2048 4096 ;;
    cross) step "another vocabulary (2048 rows, V_s 32000, V_t 40000)" "${CROSS_TIMEOUT:-90}" benchmarks/bench_cross_vocab.py \
      --device cuda --rows 2048 --repeats 5 ;;
    stored) step "stored teachers: top-k, dense logits given (and Liger's fused linear KL), live heads" \
      "${STORED_TIMEOUT:-150}" benchmarks/bench_linear_sparse.py ;;
    tests) pytest_step "GPU tests of these paths" "${TEST_TIMEOUT:-240}" gpu_linear_tests.txt ${TEST_FILES:-\
      tests/test_cuda_step.py tests/test_fp32_logits.py tests/test_linear_loss.py tests/test_cuda_backend.py \
      tests/test_numerics.py tests/test_multi_teacher.py tests/test_triton_mixture.py tests/test_cuda_mixture.py \
      tests/test_mapped_kernels.py tests/test_ce_softcap.py tests/test_cross_vocab.py tests/test_sparse_loss.py \
      tests/test_token_logprobs.py tests/test_entropy_part.py tests/test_logit_maps.py tests/test_linear_cross_vocab.py tests/test_given_rest.py \
      tests/test_properties_sparse.py tests/test_properties_cross_vocab.py tests/test_properties_multi_teacher.py \
      tests/test_properties_shards.py tests/test_properties_dense_options.py tests/test_extreme_beta.py \
      tests/test_token_logprobs_frozen_head.py tests/test_compile_linear.py \
      tests/test_compile_token_logprobs.py tests/test_teacher_routing.py tests/test_compile_multi_teacher.py \
      tests/test_compile_multi_teacher_logits.py tests/test_compile_cross_vocab.py \
      tests/test_compile_linear_cross_vocab.py tests/test_retained_backward.py \
      tests/test_liger_axolotl_peer_cases_newer.py tests/test_liger_scaled_ce_peer_cases.py \
      tests/test_token_logprobs_fp32_logits.py tests/test_verl_peer_cases.py tests/test_nemo_rl_peer_cases.py \
      tests/test_token_logprobs_ignore_index.py tests/test_torchtune_peer_cases.py tests/test_modelopt_peer_cases.py \
      tests/test_modelopt_megatron_peer_cases.py tests/test_cross_entropy.py tests/test_flash_attn_peer_cases.py \
      tests/test_megatron_peer_cases.py tests/test_prime_rl_peer_cases.py tests/test_roll_peer_cases.py \
      tests/test_confident_label_gradient.py tests/test_transformer_engine_peer_cases.py tests/test_quack_peer_cases.py \
      tests/test_class_weights.py tests/test_liger_cross_entropy_cases.py tests/test_linear_student_loss.py \
      tests/test_liger_linear_kl_div_cases.py tests/test_linear_student_multi_teacher.py \
      tests/test_linear_student_cross_vocab.py tests/test_multi_teacher_modules.py} ;;
    suite) pytest_step "the test suite on the GPU (every backend; CPU-only files left to CI)" \
      "${TEST_TIMEOUT:-240}" gpu_suite_tests.txt tests "${CPU_ONLY_IGNORES[@]}" ;;
    *) echo "unknown step $name" >&2; status=1 ;;
  esac
  collect
done
[ -L kdfast/kernels ] && rm kdfast/kernels
exit $status
