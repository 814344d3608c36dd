// The CPU distillation row kernel: raw pointers, sizes and strides only (no torch headers), so that
// `g++ -c` alone can compile-check it. The loss contract is DESIGN.md's "The loss".
#pragma once

#include <cstdint>

namespace kdfast_cpu {

enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Divergence codes: kdfast/options.py DIVERGENCES.
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4 };

struct DistillArgs {
  // data pointers; grad may alias student (inplace_backward) and is null when no gradient is wanted
  const void* student;
  const void* teacher;
  void* grad;
  const int64_t* labels;  // [batch * rows_per_batch] or null
  float* loss_rows;       // [batch * rows_per_batch], KD already weighted, not reduced
  const float* grad_scale;  // one float: the reduction's factor (1/kept rows, 1/num_items, 1)
  ScalarKind student_kind, teacher_kind;
  // shapes: logical rows are (b, r) with b < batch, r < rows_per_batch; the vocab stride is 1
  int64_t batch, rows_per_batch, vocab;
  // strides in elements
  int64_t student_stride_b, student_stride_r, teacher_stride_b, teacher_stride_r, grad_stride_b, grad_stride_r;
  // loss settings
  int divergence;
  float beta, inv_temperature, kd_scale, ce_weight;
  int temperature_power;  // 1 or 2 when T is that integer (CE reuses the tempered exps), else 0
  int64_t ignore_index;
  bool has_kd, has_ce;
};

// Processes logical rows [row_begin, row_end): writes their loss and, when args.grad is set, their
// gradient (scaled by *grad_scale). Safe to call concurrently on disjoint row ranges.
void distill_rows_cpu(const DistillArgs& args, int64_t row_begin, int64_t row_end);

}  // namespace kdfast_cpu
