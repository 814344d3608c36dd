// Method "mapped" of a teacher of another vocabulary (docs/DESIGN.md, "Teachers with another tokenizer"), in one
// pass per row, every divergence. No torch headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

struct MappedColumns {
  const float* teacher_logits;  // [rows, teacher_width]
  const float* student_logits;  // [rows, student_width]
  const int64_t* matched_student;
  const int64_t* matched_teacher;
  int64_t matched;
  const int64_t* rest_student;  // the student's unmatched columns (at least one)
  int64_t rest_student_count;
  const int64_t* rest_teacher;  // the teacher's unmatched columns
  int64_t rest_teacher_count;
  int64_t rows, student_width, teacher_width;
  float student_temperature, teacher_temperature;
};

}  // namespace kdfast_cpu

namespace kdfast_cpu {

// Method "mapped" in one pass per row: the loss's parts (the divergence, the CE at T = 1, whether the label's logit is
// the row's largest, the entropy at T) and the gradient of grad_scale * (kd_scale * divergence + ce_weight * CE) with respect to
// the student's logits, written. Rows whose label is ignore_index get zeros. Forward KL needs a student column off
// the map (else it is infinite); the others take a student whose every column is matched.
struct MappedArgs {
  MappedColumns map;  // teacher and student logits, the columns, the temperatures
  const int32_t* teacher_column;  // [student_width]: a matched column's teacher column, else -1 (the student's rest)
  const uint8_t* teacher_rest;    // [teacher_width]: 1 at the teacher's unmatched columns, else 0
  const int64_t* labels;  // [rows] or null
  int64_t ignore_index;
  int divergence;  // kernel_abi.h's Divergence
  float beta, one_minus_beta;  // JSD's and the skews' (1 - beta from the host's double)
  float kd_scale, ce_weight, grad_scale;
  float* parts;  // [rows, part_columns]: kd, ce, z (left 0), correct, entropy
  int64_t part_columns;
  float* grad;   // [rows, student_width] or null
};

void mapped_rows_cpu(const MappedArgs& args, int64_t begin, int64_t end);

}  // namespace kdfast_cpu
