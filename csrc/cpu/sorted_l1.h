// ULD's sorted L1 (docs/DESIGN.md, "Teachers with another tokenizer"): per row, sum_k |a_(k) - b_(k)| over the two
// probability vectors sorted in decreasing order, the narrower zero-padded, and its subgradient with respect to each
// a_j, sign(a_j - b_(rank of j)). No torch headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

struct SortedL1Args {
  const float* student;  // [rows, student_width] probabilities (>= 0), rows contiguous
  const float* teacher;  // [rows, teacher_width]
  int64_t rows, student_width, teacher_width;
  float* loss;  // [rows]
  float* sign;  // [rows, student_width]: the subgradient at each student column, or null
};

void sorted_l1_rows_cpu(const SortedL1Args& args, int64_t begin, int64_t end);

}  // namespace kdfast_cpu
