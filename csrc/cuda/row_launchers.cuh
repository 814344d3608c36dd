// The dense and mixed teachers' launchers: per phase, mode and split count, the kernels of distill_rows.cuh,
// split_rows.cuh and shard_rows.cuh; each distill_rows_<dtype>.cu instantiates them for one student type.
#pragma once

#include "shard_rows.cuh"
#include "split_rows.cuh"

namespace kdfast_cuda {

template <typename S, typename T, int MODE>
cudaError_t launch_mode(const Launch& L, cudaStream_t stream) {
  const int64_t rows = L.a.batch * L.a.rows_per_batch;
  // Label smoothing or the z-loss: their own instantiations of the fused kernels (see range_gradient).
  const bool extras = L.a.has_ce && (L.a.label_smoothing != 0.0f || L.a.z_loss_weight != 0.0f);
  const unsigned row_blocks = static_cast<unsigned>(rows);
  switch (L.a.phase) {
    case kPhaseStats:
      distill_stats_kernel<S, T, MODE == kModeCeOnly ? kModeCeOnly : kModeForwardKL>
          <<<row_blocks, kThreads, 0, stream>>>(L);
      return cudaGetLastError();
    case kPhaseSums:
      distill_shard_kernel<S, T, MODE, kPhaseSums><<<row_blocks, kThreads, 0, stream>>>(L);
      return cudaGetLastError();
    case kPhaseGradient:  // reverse KL and the mixtures only (pack_distill_args refuses the others)
      if constexpr (kCentred<MODE>) {
        distill_shard_kernel<S, T, MODE, kPhaseGradient><<<row_blocks, kThreads, 0, stream>>>(L);
        return cudaGetLastError();
      }
      return cudaErrorInvalidValue;
    default:
      break;
  }
  if (L.a.splits <= 1) {
    if (extras) {
      distill_row_kernel<S, T, MODE, true><<<row_blocks, kThreads, 0, stream>>>(L);
    } else {
      distill_row_kernel<S, T, MODE, false><<<row_blocks, kThreads, 0, stream>>>(L);
    }
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(rows * L.a.splits);
  distill_split_stats_kernel<S, T, MODE><<<blocks, kThreads, 0, stream>>>(L);
  if (MODE == kModeMixture) distill_split_mixture_kernel<S, T><<<blocks, kThreads, 0, stream>>>(L);
  const unsigned gradient_blocks = L.a.grad ? blocks : row_blocks;
  if (extras) {
    distill_split_gradient_kernel<S, T, MODE, true><<<gradient_blocks, kThreads, 0, stream>>>(L);
  } else {
    distill_split_gradient_kernel<S, T, MODE, false><<<gradient_blocks, kThreads, 0, stream>>>(L);
  }
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t launch_pair(const Launch& L, cudaStream_t stream) {
  if (!L.a.has_kd) return launch_mode<S, S, kModeCeOnly>(L, stream);
  switch (L.a.divergence) {
    case kForwardKL: return launch_mode<S, T, kModeForwardKL>(L, stream);
    case kReverseKL: return launch_mode<S, T, kModeReverseKL>(L, stream);
    default: return launch_mode<S, T, kModeMixture>(L, stream);
  }
}

// Several teachers of the student's dtype (mixed_teachers.cuh; FUSED, one block per row): the pre-pass into the
// workspace, then the row kernel reading the mixture. The vocab-parallel phases mix on the host (ShardedRows).
template <typename S, int MODE>
cudaError_t launch_mixed_rows(const Launch& L, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(L.a.batch * L.a.rows_per_batch);
  if (L.a.has_ce && (L.a.label_smoothing != 0.0f || L.a.z_loss_weight != 0.0f)) {
    distill_row_kernel<S, Mixed<S>, MODE, true><<<rows, kThreads, 0, stream>>>(L);
  } else {
    distill_row_kernel<S, Mixed<S>, MODE, false><<<rows, kThreads, 0, stream>>>(L);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_mixture_student(const Launch& L, cudaStream_t stream) {
  if (L.a.phase != kPhaseFused || L.a.splits > 1 || !L.a.has_kd) return cudaErrorInvalidValue;
  const dim3 prepass_blocks(static_cast<unsigned>(L.a.batch * L.a.rows_per_batch), static_cast<unsigned>(L.a.mix_count));
  mixture_prepass_kernel<S, kThreads><<<prepass_blocks, kThreads, 0, stream>>>(L.a, L.k);
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  switch (L.a.divergence) {
    case kForwardKL: return launch_mixed_rows<S, kModeForwardKL>(L, stream);
    case kReverseKL: return launch_mixed_rows<S, kModeReverseKL>(L, stream);
    default: return launch_mixed_rows<S, kModeMixture>(L, stream);
  }
}

// The launcher for one student type: the teacher is the same type or float32.
template <typename S>
cudaError_t launch_student(const Launch& L, cudaStream_t stream) {
  if (L.a.has_kd && L.a.teacher_kind == ScalarKind::kFloat32 && !std::is_same<S, float>::value) {
    return launch_pair<S, float>(L, stream);
  }
  return launch_pair<S, S>(L, stream);
}

}  // namespace kdfast_cuda
