// ULD and GOLD's hybrid per row of aligned logits (docs/DESIGN.md, "Teachers with another tokenizer"), fused: the
// student's softmax at T, the sorted L1 of the two probability vectors (sorted decreasingly, the narrower
// zero-padded) or, for the hybrid, a divergence over the matched columns plus the sorted L1 over the rest, and the
// gradient with respect to the student's logits through the softmax. No torch headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

enum class MatchedDivergence : int { kForwardKl = 0, kReverseKl = 1, kJsd = 2 };

struct UldRowsArgs {
  // inputs
  const float* student_logits;    // [rows, student_width], rows contiguous
  const float* teacher_probs;     // [rows, teacher_width]: the teacher's (merged) probabilities
  const float* student_log_mass;  // [rows] log of the factor a merged group multiplies the row by, or null
  const float* row_scale;         // [rows] the gradient's factor per row (0: an ignored row, all outputs 0), or null
  int64_t rows, student_width, teacher_width;
  float inv_temperature;          // the student's 1 / T
  // the hybrid: matched columns of both sides (pairs) and the unmatched ones of each; null for plain ULD
  const int64_t* matched_student;
  const int64_t* matched_teacher;
  int64_t matched;
  const int64_t* rest_student;
  int64_t rest_student_count;
  const int64_t* rest_teacher;
  int64_t rest_teacher_count;
  MatchedDivergence divergence;
  float beta, matched_weight, rest_weight;
  // outputs
  float* loss;       // [rows]
  float* entropy;    // [rows]: the student's entropy at T (of the row before any merge)
  float* split;      // [rows, 2]: the hybrid's matched divergence and unmatched sorted L1, unweighted; or null
  float* grad;       // [rows, student_width]: grad_scale * d loss / d logits, written or added; or null
  float* mass_grad;  // [rows]: grad_scale * d loss / d student_log_mass, or null
  float grad_scale;
  bool accumulate;
};

void uld_rows_cpu(const UldRowsArgs& args, int64_t begin, int64_t end);

}  // namespace kdfast_cpu
