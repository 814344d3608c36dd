// The labels' range, checked on the device: a kept label outside [0, vocab), with CE on, stops the step with a
// device-side assert, as PyTorch's own cross-entropy does, rather than a NaN row whose gradient would reach the
// optimizer. No host sync; the process's CUDA context is lost, as with PyTorch's. A kernel of its own (one read of
// the labels, 8 bytes per row) because the assert's call in the row kernels costs them registers and spills.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>

#include "distill_kernel.h"

namespace kdfast_cuda {

__global__ void check_labels_kernel(const int64_t* labels, int64_t rows, int64_t vocab, int64_t ignore_index) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t label = labels[row];
    if (label != ignore_index && (label < 0 || label >= vocab)) {
      __assert_fail("kdfast: labels must lie in [0, vocab) or equal ignore_index when ce_weight > 0 (labels "
                    "argument; KDFAST_CHECK_LABELS=1 checks them on the host and names the first)",
                    __FILE__, __LINE__, __func__);
    }
  }
}

// Only where a call holds the whole vocabulary (FUSED from column 0, no wider vocabulary around it): a vocab
// shard's labels mostly lie in other shards and are checked in the ranks' exchange.
inline bool labels_checked_here(const DistillArgs& a) {
  return a.labels != nullptr && a.phase == kdfast::kPhaseFused && a.ce_weight != 0.0f && a.col_offset == 0 &&
         a.global_vocab == a.vocab;
}

inline cudaError_t check_labels(const DistillArgs& a, cudaStream_t stream) {
  if (!labels_checked_here(a)) return cudaSuccess;
  const int64_t rows = a.batch * a.rows_per_batch;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((rows + threads - 1) / threads, 1024));
  check_labels_kernel<<<blocks, threads, 0, stream>>>(a.labels, rows, a.vocab, a.ignore_index);
  return cudaGetLastError();
}

}  // namespace kdfast_cuda
