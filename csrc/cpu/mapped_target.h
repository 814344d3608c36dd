// A teacher of another vocabulary as dense teacher logits over the student's vocabulary, for the forward KL of
// method "mapped" (docs/DESIGN.md, "Teachers with another tokenizer"): the dense kernel on this target gives the
// bucket algebra's loss and gradient. No torch headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

struct MappedTargetArgs {
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
  float* target;  // [rows, student_width]
};

void mapped_target_rows_cpu(const MappedTargetArgs& args, int64_t begin, int64_t end);

}  // namespace kdfast_cpu
