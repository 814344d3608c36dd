// Several teachers' rows mixed into one (docs/DESIGN.md, "Several teachers"): out = T * log sum_m w_m p_m with
// p_m = softmax(t_m / T), logits whose softmax at T is the mixture, for the single-teacher kernel. No torch headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

constexpr int kMaxTeachers = 64;

struct MixArgs {
  const float* const* teachers;  // M rows of [rows, columns] float32, row stride teacher_stride (vocab stride 1)
  int64_t teacher_count;
  int64_t teacher_stride;
  int64_t rows;
  int64_t columns;
  const float* log_weights;  // [rows, M] contiguous: log w_m, -inf for a teacher that does not count
  float temperature;
  float* out;  // [rows, columns] contiguous
};

void mix_rows_cpu(const MixArgs& args, int64_t begin, int64_t end);

}  // namespace kdfast_cpu
