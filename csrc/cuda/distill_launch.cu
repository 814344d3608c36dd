// Host side of the CUDA kernels: split choice, workspace size, per-launch constants, dtype dispatch.
#include <algorithm>
#include <cmath>

#include "label_check.cuh"
#include "sparse_rows.cuh"

namespace kdfast_cuda {

cudaError_t launch_student_bf16(const Launch& launch, cudaStream_t stream);
cudaError_t launch_student_fp16(const Launch& launch, cudaStream_t stream);
cudaError_t launch_student_fp32(const Launch& launch, cudaStream_t stream);
cudaError_t launch_mixture_bf16(const Launch& launch, cudaStream_t stream);
cudaError_t launch_mixture_fp16(const Launch& launch, cudaStream_t stream);
cudaError_t launch_mixture_fp32(const Launch& launch, cudaStream_t stream);
cudaError_t launch_sparse_bf16(const Launch& launch, cudaStream_t stream);
cudaError_t launch_sparse_fp16(const Launch& launch, cudaStream_t stream);
cudaError_t launch_sparse_fp32(const Launch& launch, cudaStream_t stream);

bool supported_pair(ScalarKind student, ScalarKind teacher) {
  return teacher == student || teacher == ScalarKind::kFloat32;
}

int choose_splits(int64_t rows, int64_t vocab, int multiprocessors) {
  // Enough rows: one block per row (its passes then reuse the row's tail in L2). Otherwise aim for about
  // four blocks per multiprocessor, each range long enough (>= 4096 elements, two vectors per thread)
  // that the extra kernels and the workspace round trip stay small.
  if (rows >= 2 * static_cast<int64_t>(multiprocessors)) return 1;
  const int64_t wanted = (4 * static_cast<int64_t>(multiprocessors) + rows - 1) / std::max<int64_t>(rows, 1);
  const int64_t by_length = std::max<int64_t>(1, vocab / (2 * 8 * kThreads));
  return static_cast<int>(std::min<int64_t>({wanted, by_length, 256}));
}

int64_t workspace_floats(int64_t rows, int splits) {
  return splits > 1 ? rows * splits * (kWorkspaceStats + kWorkspaceTerms) : 0;
}

int64_t mixture_workspace_floats(int64_t rows, int64_t teachers) { return rows * teachers * 2; }

int64_t sparse_workspace_floats(int64_t rows, int64_t topk) { return rows * topk * kIdArrays; }

namespace {

// The per-launch constants both kernels' launches share.
Launch make_launch(const DistillArgs& args) {
  Launch launch;
  launch.a = args;
  // Without KD the kernel runs at T = 1, where cross-entropy shares the student's statistics.
  const float inv_t = args.has_kd ? args.inv_temperature : 1.0f;
  launch.k = kLog2e * inv_t;
  // Each log from the smaller weight (csrc/cpu/row_math.h's MixtureConstants): the log of a float that rounded to
  // 1 loses it (log(1 - beta) at beta = 1e-8, log(beta) at 1 - 1e-8).
  launch.one_minus_beta = args.one_minus_beta;
  launch.log2_beta = args.beta > 0.5f ? std::log1p(-args.one_minus_beta) * kLog2e
                                      : (args.beta > 0.0f ? std::log2(args.beta) : -INFINITY);
  launch.log2_1m_beta = args.beta < 0.5f ? std::log1p(-args.beta) * kLog2e
                                         : (args.one_minus_beta > 0.0f ? std::log2(args.one_minus_beta) : -INFINITY);
  // JSD's shared log2(1 + e) carries the loss's digits where a weight is small (the log ratios are then about that
  // weight); elsewhere the path measured on an H200 (lg2.approx) stands until a GPU times the series there.
  launch.exact_log1p = std::min(args.beta, args.one_minus_beta) < 0.0625f;
  if (!args.has_ce) {
    launch.ce_stats = kCeNone;
  } else if (!args.has_kd || args.inv_temperature == 1.0f) {
    launch.ce_stats = kCeShared;
  } else if (args.inv_temperature == 0.5f) {
    launch.ce_stats = kCeSquared;
  } else {
    launch.ce_stats = kCeOwn;
  }
  return launch;
}

}  // namespace

cudaError_t launch_distill(const DistillArgs& args, cudaStream_t stream) {
  if (args.batch * args.rows_per_batch == 0) return cudaSuccess;
  if (const cudaError_t error = check_labels(args, stream); error != cudaSuccess) return error;
  const Launch launch = make_launch(args);
  if (args.mix_count > 0) {  // several teachers of the student's dtype
    switch (args.student_kind) {
      case ScalarKind::kBFloat16: return launch_mixture_bf16(launch, stream);
      case ScalarKind::kFloat16: return launch_mixture_fp16(launch, stream);
      default: return launch_mixture_fp32(launch, stream);
    }
  }
  switch (args.student_kind) {
    case ScalarKind::kBFloat16: return launch_student_bf16(launch, stream);
    case ScalarKind::kFloat16: return launch_student_fp16(launch, stream);
    default: return launch_student_fp32(launch, stream);
  }
}

cudaError_t launch_sparse(const DistillArgs& args, cudaStream_t stream) {
  if (args.batch * args.rows_per_batch == 0) return cudaSuccess;
  if (const cudaError_t error = check_labels(args, stream); error != cudaSuccess) return error;
  const Launch launch = make_launch(args);
  switch (args.student_kind) {
    case ScalarKind::kBFloat16: return launch_sparse_bf16(launch, stream);
    case ScalarKind::kFloat16: return launch_sparse_fp16(launch, stream);
    default: return launch_sparse_fp32(launch, stream);
  }
}

}  // namespace kdfast_cuda
