// The CUDA distillation row kernels: raw pointers, sizes, strides and a stream only (no torch headers), so
// that plain `nvcc -c` compile-checks them. The loss contract is DESIGN.md's "The loss".
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kdfast_cuda {

enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Divergence codes: kdfast/options.py DIVERGENCES.
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4 };

struct DistillArgs {
  // grad may alias student (inplace_backward) and is null when no gradient is wanted
  const void* student;
  const void* teacher;
  void* grad;
  const int64_t* labels;    // [batch * rows_per_batch] or null
  float* loss_rows;         // [batch * rows_per_batch]: KD weighted, plus CE weighted; not reduced
  const float* grad_scale;  // one float on the device: the reduction's factor
  ScalarKind student_kind, teacher_kind;
  // logical rows are (b, r), b < batch, r < rows_per_batch; the vocab stride is 1
  int64_t batch, rows_per_batch, vocab;
  int64_t student_stride_b, student_stride_r, teacher_stride_b, teacher_stride_r, grad_stride_b, grad_stride_r;
  int divergence;
  float beta, inv_temperature, kd_scale, ce_weight;
  int64_t ignore_index;
  bool has_kd, has_ce;
  // splits > 1: each row is cut into `splits` vocab ranges handled by separate blocks, whose partial
  // statistics meet in `workspace` (workspace_floats(rows, splits) floats on the device).
  int splits;
  float* workspace;
};

// The teacher dtype must equal the student's, or be float32 (the caller converts other pairs).
bool supported_pair(ScalarKind student, ScalarKind teacher);

// Rows per block split: 1 when there are enough rows to fill `multiprocessors`, more for few long rows.
int choose_splits(int64_t rows, int64_t vocab, int multiprocessors);

int64_t workspace_floats(int64_t rows, int splits);

// Enqueues the kernels on `stream`; returns the launch error, if any.
cudaError_t launch_distill(const DistillArgs& args, cudaStream_t stream);

}  // namespace kdfast_cuda
