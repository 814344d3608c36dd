// The CPU kernel of a sparse teacher (docs/DESIGN.md, "A sparse teacher"; kdfast/sparse_math.py states the same
// math in PyTorch). Per row of the student's logits and the teacher's K (id, log-prob) pairs:
//   pass 0   FUSED / STATS: the row's max (the only pass that reads memory)
//   groups   the entries sorted by column: an id listed twice is two buckets of one column (sparse_math.py)
//   pass 1   tempered exps into scratch, their sum, CE's, sum_j e_j d_j for the student's entropy, and the
//            student's mass outside the ids, summed over those columns (a vector holding ids adds its other lanes),
//            never as the total minus the ids' part
//   buckets  the teacher's K + 1 buckets (its rest 1 - sum(p) in float64) against the student's: the divergence,
//            the gradient at the ids' columns (a column's entries summed) and the factor q_j is multiplied by at
//            every other column
//   last     the gradient, q * factor + CE everywhere, then the ids' columns
// A shard's SUMS and GRADIENT take the global log-sum-exps in place of pass 0 and the sums (the exps are then the
// probabilities); the shard that starts the vocabulary adds the rest bucket.
#include "sparse_kernel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "gradient_pass.h"
#include "row_math.h"

namespace kdfast_cpu {
namespace {

// Per thread: the K + 1 buckets (the ids, then the rest) of the row at hand.
struct Buckets {
  std::vector<float> logprobs, log_q, log_p, terms, scores, id_gradients, column_sums;
  std::vector<int64_t> column;  // the id's column in this call's range, or -1
  std::vector<int64_t> order;   // the held entries, by column then index
  std::vector<int64_t> sorted;  // their columns, ascending (a column once per entry)
  std::vector<int64_t> leader;  // the first held entry of each entry's column (itself when not held)
  std::vector<char> counted, first;
  int64_t held = 0, distinct = 0;  // held entries, and the distinct columns they hold
  void reserve(int64_t k) {
    for (auto* v : {&logprobs, &log_q, &log_p, &terms, &scores, &id_gradients, &column_sums}) v->resize(k + 1);
    for (auto* v : {&column, &order, &sorted, &leader}) v->resize(k + 1);
    counted.resize(k + 1);
    first.resize(k + 1);
  }
};

// The entries grouped by column (after b.column is set).
void group_entries(int64_t k_count, Buckets& b) {
  b.held = 0;
  bool ascending = true;  // held entries already by column (a vocabulary map's ids are): no sort of K per row
  for (int64_t k = 0; k < k_count; ++k) {
    b.leader[k] = k;
    b.first[k] = 0;
    if (b.column[k] < 0) continue;
    if (b.held > 0 && b.column[b.order[b.held - 1]] > b.column[k]) ascending = false;
    b.order[b.held++] = k;
  }
  if (!ascending) {
    std::sort(b.order.begin(), b.order.begin() + b.held, [&](int64_t i, int64_t j) {
      return b.column[i] < b.column[j] || (b.column[i] == b.column[j] && i < j);
    });
  }
  b.distinct = 0;
  for (int64_t i = 0; i < b.held; ++i) {
    const int64_t k = b.order[i];
    b.sorted[i] = b.column[k];
    const bool starts = i == 0 || b.sorted[i - 1] != b.column[k];
    b.first[k] = starts;
    b.leader[k] = starts ? k : b.leader[b.order[i - 1]];
    b.distinct += starts;
  }
}

// Per entry, the sum of `values` over its column's entries, the first's value plus each further one's and `extra`
// (so a column of one entry keeps its value bit for bit): written into `out`, the same float for every entry.
void column_sums(const Buckets& b, int64_t k_count, const std::vector<float>& values, float extra,
                 std::vector<float>& sums, std::vector<float>& out) {
  for (int64_t k = 0; k < k_count; ++k) sums[k] = 0.0f;
  for (int64_t k = 0; k < k_count; ++k) sums[b.leader[k]] += b.leader[k] == k ? values[k] : values[k] + extra;
  for (int64_t k = 0; k < k_count; ++k) out[k] = sums[b.leader[k]];
}

float logprob_at(const DistillArgs& a, const void* row, int64_t k) {
  switch (a.logprob_kind) {
    case ScalarKind::kBFloat16: return to_float(static_cast<const BFloat16*>(row)[k]);
    case ScalarKind::kFloat16: return to_float(static_cast<const Float16*>(row)[k]);
    default: return static_cast<const float*>(row)[k];
  }
}

// log P at the K ids and of the rest (index K); -inf for padding and for no rest.
void teacher_buckets(const DistillArgs& a, const int64_t* ids, Buckets& b) {
  const int64_t k_count = a.topk;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  if (a.tail == kTailRenormalize) {
    double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
    for (int64_t k = 0; k < k_count; ++k) {
      if (ids[k] >= 0) top = std::max(top, static_cast<double>(b.logprobs[k]) * a.teacher_scale);
    }
    for (int64_t k = 0; k < k_count; ++k) {
      if (ids[k] >= 0) sum += std::exp(static_cast<double>(b.logprobs[k]) * a.teacher_scale - top);
    }
    const double total = top + std::log(sum);
    for (int64_t k = 0; k < k_count; ++k) {
      b.log_p[k] = ids[k] >= 0 ? static_cast<float>(static_cast<double>(b.logprobs[k]) * a.teacher_scale - total)
                               : minus_inf;
    }
    b.log_p[k_count] = minus_inf;
    return;
  }
  double sum = 0.0;  // float64: in float32 a rest of 1e-5 would carry a relative error of 1e-2
  for (int64_t k = 0; k < k_count; ++k) {
    b.log_p[k] = ids[k] >= 0 ? b.logprobs[k] : minus_inf;
    if (ids[k] >= 0) sum += std::exp(static_cast<double>(b.logprobs[k]));
  }
  // As computed (below 0: rounding, none) or as given; under reverse KL's logarithm at least the floor (kernel_abi.h).
  double rest = a.tail == kTailGiven ? std::exp(static_cast<double>(b.logprobs[k_count])) : 1.0 - sum;
  if (a.divergence == kReverseKL) rest = std::max(rest, kTeacherRestFloor);
  b.log_p[k_count] = rest > 0.0 ? static_cast<float>(std::log(rest)) : minus_inf;
}

struct BucketSums {
  float kd, row_sum, rest_factor;
};

// The buckets' divergence over the counted ones, D, the gradient at the ids' columns (into b.id_gradients) and
// the rest's factor; `centre`: on the student's largest bucket (a whole row); `given_d`: the global D (GRADIENT).
__attribute__((flatten)) BucketSums bucket_math(const DistillArgs& a, Buckets& b, bool centre, const float* given_d) {
  const int64_t n = a.topk + 1;
  float kd = 0.0f, row_sum = 0.0f;
  // A teacher's rest meets no student bucket where the ids cover the row: it is rounding, and adds nothing.
  if (b.log_q[n - 1] == -INFINITY) b.log_p[n - 1] = -INFINITY;
  // The buckets' exps and terms run in vectors: a vocabulary map's K ~ 24,000 ids per row made them the row's cost.
  const float* log_q = b.log_q.data();
  const float* log_p = b.log_p.data();
  if (a.divergence == kForwardKL) {
    // d/da_j = q_j sum(P) - q_j sum(P_b / Q_b) over j's buckets: sum(P) is 1, but for a renormalised row with no ids.
    for_lanes(n, [&](int64_t i, auto zero) {
      using F = decltype(zero);
      store(b.terms.data() + i, fast_exp(load<F>(log_p + i)));  // P, summed per column below
    });
    // A floored rest (kdfast/sparse_math.py, floored_rest) is a constant: P_r leaves sum(P), its columns get no
    // target.
    const bool floored = b.log_q[n - 1] <= kStudentRestFloorLog;
    float total = 0.0f;
    for (int64_t i = 0; i + 1 < n; ++i) total += b.terms[i];
    if (!floored) total += b.terms[n - 1];
    column_sums(b, n - 1, b.terms, 0.0f, b.column_sums, b.scores);
    for (int64_t i = 0; i < n; ++i) {
      if (b.counted[i]) kd += weighted(b.terms[i], b.log_p[i] - b.log_q[i]);
    }
    for_lanes(n - 1, [&](int64_t i, auto zero) {
      using F = decltype(zero);
      store(b.id_gradients.data() + i, fast_exp(load<F>(log_q + i)) * total - load<F>(b.scores.data() + i));
    });
    const float rest_q = std::exp(b.log_q[n - 1]), rest_p = std::exp(b.log_p[n - 1]);
    return {kd, 0.0f, total - (rest_q > 0.0f && !floored ? rest_p / rest_q : 0.0f)};
  }
  const MixtureConstants mc(a.beta, a.one_minus_beta);
  float* q_of = b.id_gradients.data();  // each bucket's Q, until its gradient is formed from it below
  for_lanes(n, [&](int64_t i, auto zero) {
    using F = decltype(zero);
    const F lq = load<F>(log_q + i);
    const F q = fast_exp(lq);
    F term, score;
    bucket_term_and_score<F>(a.divergence, mc, lq, load<F>(log_p + i), q, term, score);
    store(q_of + i, q);
    store(b.terms.data() + i, term);
    store(b.scores.data() + i, score);
  });
  int64_t reference = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (b.log_q[i] > b.log_q[reference]) reference = i;
  }
  // A column's score: its entries' scores and, per further entry, the constant the score leaves out (reverse KL's
  // +1 of Q log Q; the skew reverse KL's score holds its own): sparse_math.py, SCORE_CONSTANT.
  const bool has_constant = a.divergence == kReverseKL;
  column_sums(b, n - 1, b.scores, has_constant ? 1.0f : 0.0f, b.column_sums, b.scores);
  if (centre) {
    const float score_r = b.scores[reference];
    for (int64_t i = 0; i < n; ++i) b.scores[i] = i == reference ? 0.0f : b.scores[i] - score_r;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!b.counted[i]) continue;
    kd += b.terms[i];
    if (i == n - 1 || b.first[i]) row_sum += weighted(q_of[i], b.scores[i]);  // D: once a column
  }
  const float d = given_d != nullptr ? *given_d : row_sum;
  for (int64_t i = 0; i + 1 < n; ++i) b.id_gradients[i] = weighted(q_of[i], b.scores[i] - d);
  // No column outside the ids (Q_rest = 0): nothing takes the rest's factor, whose score is then undefined.
  return {kd, row_sum, b.log_q[n - 1] == -INFINITY ? 0.0f : b.scores[n - 1] - d};
}

// Pass 1 (exps into scratch and their sums) and, for a whole row or STATS, the mass outside the ids. The exps are at
// T with a divergence and at T = 1 for CE alone: either way the student's entropy comes from them (st.entropy; SUMS:
// sum_j q_j log q_j over these columns, the exps being the probabilities there).
// next_row: the next row's logits, prefetched into L2 while this row computes (pass 0 would otherwise wait on DRAM
// while the core idles); float32 ones 8 KiB ahead, their max taken here for the next row (Scratch::next_row), which
// then reads no row for its max alone.
void exp_pass(const float* s, int64_t row, const DistillArgs& a, const float* given, Scratch& w, Buckets& b,
              RowStats& st, float* log_z_rest, const char* next_row, int next_row_bytes) {
  const float inv_t = a.has_kd ? a.inv_temperature : 1.0f;
  // CE's softmax at T = 1 as the gradient pass reads it (gradient_pass.h): the tempered exps (T = 1), their squares
  // (T = 2), or its own exps (other temperatures, and CE alone).
  const bool ce_squared = a.has_ce && a.has_kd && a.temperature_power == 2;
  const bool ce_own = a.has_ce && !(a.has_kd && (a.temperature_power == 1 || a.temperature_power == 2));
  float* es = w.exp_student.data();
  float* ec = w.exp_ce.data();
  LaneSum z_acc{}, z_ce_acc{}, rest_acc{}, entropy_acc{};
  const float rs = st.ref_s, rc = st.ref_ce;
  // The mass outside the ids is summed here, over those columns alone: a vector holding ids adds its other lanes
  // (the ids' columns sorted, so one comparison a vector finds them).
  const bool want_rest = given == nullptr && a.has_kd;
  const int64_t held = want_rest ? b.held : 0;  // b.sorted: the held columns, ascending (group_entries)
  int64_t next = 0;  // the first sorted id column not yet passed
  const float* const ahead = given == nullptr && next_row_bytes == 4 ? reinterpret_cast<const float*>(next_row)
                                                                     : nullptr;
  RunningMax next_max;
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    if (ahead != nullptr) {
      if constexpr (std::is_same_v<F, VFloat>) __builtin_prefetch(ahead + j + kPrefetchAhead, 0, 3);
      next_max.add(load<F>(ahead + j));
    } else if (std::is_same_v<F, VFloat> && next_row != nullptr) {  // one 64-byte line per vector: into L2
      __builtin_prefetch(next_row + j * next_row_bytes, 0, 2);
    }
    const F sj = load<F>(s + j);
    const F d = (sj - rs) * inv_t;
    const F e = fast_exp_centred(d);  // d <= 0: s is centred on its max (later phases: on T times its lse)
    store(es + j, e);
    accumulate(z_acc, e);
    accumulate_weighted(entropy_acc, e, d);
    if (want_rest) {
      constexpr int64_t kWidth = std::is_same_v<F, VFloat> ? kLanes : 1;
      if (next < held && b.sorted[next] < j + kWidth) {
        F outside = e;
        for (; next < held && b.sorted[next] < j + kWidth; ++next) {
          if constexpr (std::is_same_v<F, VFloat>) {
            outside[b.sorted[next] - j] = 0.0f;
          } else {
            outside = 0.0f;
          }
        }
        accumulate(rest_acc, outside);
      } else {
        accumulate(rest_acc, e);
      }
    }
    if (ce_squared) accumulate(z_ce_acc, e * e);
    if (ce_own) {
      const F c = fast_exp_centred(sj - rc);
      store(ec + j, c);
      accumulate(z_ce_acc, c);
    }
  });
  if (ahead != nullptr) w.next_row = row + 1, w.next_student_max = next_max.value();
  const bool want_entropy = a.has_kd || a.has_ce;  // else the exps are of no statistics
  if (given != nullptr) {  // the exps are the probabilities; CE's softmax at T = 1 from them, or its own exps
    st.log_z_s = 0.0f, st.inv_z_s = 1.0f, st.log_z_ce = 0.0f, st.inv_z_ce = 1.0f;
    st.entropy = want_entropy ? horizontal_sum(entropy_acc) : 0.0f;  // sum q log q: SUMS negates it over the ranks
    if (a.has_ce && !ce_own) st.inv_z_ce = std::exp(a.temperature_power * given[0] - given[2]);
    *log_z_rest = given[1] - given[0];  // log of the student's mass outside the ids (natural units of Q)
    return;
  }
  const float z = horizontal_sum(z_acc);
  st.log_z_s = std::log(z);
  st.inv_z_s = 1.0f / z;
  st.entropy = want_entropy ? entropy_from_sums(st.log_z_s, st.inv_z_s, horizontal_sum(entropy_acc)) : 0.0f;
  const float z_ce = (ce_squared || ce_own) ? horizontal_sum(z_ce_acc) : z;
  st.log_z_ce = std::log(z_ce);
  st.inv_z_ce = 1.0f / z_ce;
  if (want_rest) {  // relative to the row's reference, like log z: none where the ids cover the row, else floored
    *log_z_rest = b.distinct == a.vocab ? -INFINITY
                                        : std::max(std::log(horizontal_sum(rest_acc)), kStudentRestFloorLog);
  }
}

// softmax(s) at T = 1 at one column, read as exp_pass left it.
float ce_probability(const DistillArgs& a, const RowStats& st, const Scratch& w, int64_t column) {
  const float e = w.exp_student[column];
  if (a.has_kd && a.temperature_power == 1) return e * st.inv_z_ce;
  if (a.has_kd && a.temperature_power == 2) return e * e * st.inv_z_ce;
  return w.exp_ce[column] * st.inv_z_ce;
}

template <typename GradT>
void sparse_row(const float* s, const int64_t* ids, int64_t row, int64_t label, GradT* g, float row_scale,
                const DistillArgs& a, Scratch& w, Buckets& b, const char* next_row, int next_row_bytes) {
  const int64_t k_count = a.topk;
  for (int64_t k = 0; k < k_count; ++k) {
    const int64_t local = ids[k] - a.col_offset;
    b.column[k] = (ids[k] >= 0 && local >= 0 && local < a.vocab) ? local : -1;
  }
  if (a.has_kd) group_entries(k_count, b);
  const int64_t local_label = a.labels != nullptr ? label - a.col_offset : -1;
  const bool in_range = local_label >= 0 && local_label < a.vocab;
  const bool held = a.has_ce && in_range;  // CE's label here
  const float s_label = in_range ? s[local_label] : 0.0f;  // before the gradient may overwrite the logits
  const bool later_phase = a.phase == kPhaseSums || a.phase == kPhaseGradient;
  const float* given = later_phase ? a.row_stats + row * kStatColumns : nullptr;
  RowStats st{};
  if (given != nullptr) {
    st.ref_s = a.has_kd ? given[0] * a.temperature : given[2];
    st.ref_ce = given[2];
  } else {
    st.ref_s = st.ref_ce = w.next_row == row ? w.next_student_max : row_max(s, a.vocab);
  }
  float log_z_rest = -INFINITY;
  exp_pass(s, row, a, given, w, b, st, &log_z_rest, next_row, next_row_bytes);
  const float inv_t = a.has_kd ? a.inv_temperature : 1.0f;
  if (a.phase == kPhaseStats) {
    float* out = a.out + row * kStatColumns;
    out[0] = a.has_kd ? st.ref_s * inv_t + st.log_z_s : 0.0f;
    out[1] = a.has_kd ? st.ref_s * inv_t + log_z_rest : 0.0f;
    out[2] = a.has_ce ? st.ref_ce + st.log_z_ce : 0.0f;
    out[3] = 0.0f;
    return;
  }
  BucketSums sums{0.0f, 0.0f, 0.0f};
  if (a.has_kd) {
    teacher_buckets(a, ids, b);
    for (int64_t k = 0; k < k_count; ++k) {
      b.log_q[k] = b.column[k] >= 0 ? (s[b.column[k]] - st.ref_s) * inv_t - st.log_z_s : -INFINITY;
      b.counted[k] = b.column[k] >= 0;
    }
    // The rest as a probability, at least float32's smallest normal (sparse_math.floored_rest); -inf: none.
    const float log_q_rest = given != nullptr ? log_z_rest : log_z_rest - st.log_z_s;
    b.log_q[k_count] = log_q_rest == -INFINITY ? log_q_rest : std::max(log_q_rest, kStudentRestFloorLog);
    b.counted[k_count] = a.col_offset == 0;  // one shard adds the rest bucket
    const float* given_d = a.phase == kPhaseGradient ? a.row_totals + row * kStatColumns + 1 : nullptr;
    sums = bucket_math(a, b, a.phase == kPhaseFused, given_d);
  }
  const float lse_ce = st.ref_ce + st.log_z_ce;  // the student's log-partition at T = 1 (given[2] in later phases)
  // The CE target's logit over these columns, read before the gradient may overwrite them.
  const float shifted_sum = a.has_ce && a.label_smoothing != 0.0f && a.phase != kPhaseGradient
                                ? shifted_row_sum(s, a.vocab, a.phase == kPhaseFused ? st.ref_ce : 0.0f)
                                : 0.0f;
  if (g != nullptr) {
    GradientTerms terms{s, nullptr, nullptr, 0.0f, row_scale * a.kd_scale * a.inv_temperature,
                        ce_coefficients(a, row_scale, lse_ce), sums.rest_factor};
    // The label's entry is formed in float and rounded once, in the row's loop or at the teacher's id that holds it.
    const int64_t label_here = held ? local_label : -1;
    write_gradient(g, a.has_kd ? kKdFromRestFactor : kNoKd, terms, label_here, a, st, w);
    if (a.has_kd) {
      for (int64_t k = 0; k < k_count; ++k) {
        const int64_t column = b.column[k];
        if (column < 0) continue;
        const float ce = a.has_ce ? terms.ce.soft * ce_probability(a, st, w, column) - terms.ce.uniform : 0.0f;
        from_float(terms.kd_coef * b.id_gradients[k] + ce - (column == label_here ? terms.ce.label : 0.0f),
                   &g[column]);
      }
    }
  }
  if (a.phase == kPhaseFused) {
    write_fused_parts(a, row, sums.kd, st, s_label, in_range, shifted_sum);
  } else if (a.phase == kPhaseSums) {
    float* out = a.out + row * kStatColumns;
    out[0] = sums.kd, out[1] = sums.row_sum, out[2] = ce_target_logit(a, s_label, shifted_sum);
    out[3] = st.entropy;
  }
}

template <typename StudentT>
void run_rows(const DistillArgs& a, int64_t row_begin, int64_t row_end) {
  thread_local Scratch scratch;
  thread_local Buckets buckets;
  scratch.reserve(a.vocab);
  scratch.next_row = -1;
  buckets.reserve(a.topk);
  const float row_scale = a.grad != nullptr ? *a.grad_scale : 0.0f;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t bi = row / a.rows_per_batch, r = row % a.rows_per_batch;
    const StudentT* s_raw = static_cast<const StudentT*>(a.student) + bi * a.student_stride_b + r * a.student_stride_r;
    StudentT* g = a.grad == nullptr ? nullptr
                                    : static_cast<StudentT*>(a.grad) + bi * a.grad_stride_b + r * a.grad_stride_r;
    const int64_t* ids = a.teacher_ids + bi * a.ids_stride_b + r * a.ids_stride_r;
    const int64_t lp_offset = bi * a.logprobs_stride_b + r * a.logprobs_stride_r;
    const int element = a.logprob_kind == ScalarKind::kFloat32 ? 4 : 2;
    const void* lp = static_cast<const char*>(a.teacher_logprobs) + lp_offset * element;
    const int64_t label = a.labels != nullptr ? a.labels[row] : 0;
    if (a.labels != nullptr && label == a.ignore_index) {
      write_skipped_row(a, row, 0.0f);
      if (g != nullptr) zero_row(g, a.vocab);
      continue;
    }
    bool poisoned = a.phase == kPhaseFused && a.ce_weight != 0.0f && (label < 0 || label >= a.vocab);
    for (int64_t k = 0; k < a.topk && a.phase == kPhaseFused && a.has_kd; ++k) {
      poisoned = poisoned || ids[k] < -1 || ids[k] >= a.vocab;  // refused on the host where that costs no sync
    }
    if (poisoned) {
      write_skipped_row(a, row, std::numeric_limits<float>::quiet_NaN());
      if (g != nullptr) zero_row(g, a.vocab);
      continue;
    }
    for (int64_t k = 0; k < a.topk + (a.tail == kTailGiven ? 1 : 0); ++k) buckets.logprobs[k] = logprob_at(a, lp, k);
    const float* s = widen_row(s_raw, a.vocab, scratch.student);
    const char* next_row = nullptr;
    if (row + 1 < row_end) {
      const int64_t nb = (row + 1) / a.rows_per_batch, nr = (row + 1) % a.rows_per_batch;
      next_row = reinterpret_cast<const char*>(static_cast<const StudentT*>(a.student) + nb * a.student_stride_b +
                                               nr * a.student_stride_r);
    }
    sparse_row(s, ids, row, label, g, row_scale, a, scratch, buckets, next_row, static_cast<int>(sizeof(StudentT)));
  }
}

}  // namespace

void sparse_rows_cpu(const DistillArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.student_kind) {
    case ScalarKind::kFloat32: return run_rows<float>(args, row_begin, row_end);
    case ScalarKind::kBFloat16: return run_rows<BFloat16>(args, row_begin, row_end);
    case ScalarKind::kFloat16: return run_rows<Float16>(args, row_begin, row_end);
  }
}

}  // namespace kdfast_cpu
