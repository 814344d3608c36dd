// What the CPU and CUDA kernels and the Python side agree on (kdfast/kernel_abi.py is the Python twin; a test
// holds them equal): the divergence codes, the phases, the order of the settings lists, and the one argument
// struct both kernels read. No torch headers, so plain g++ / nvcc compile-check the kernels.
#pragma once

#include <cstdint>

// Functions both the host and the CUDA kernels call.
#ifdef __CUDACC__
#define KDFAST_HOST_DEVICE __host__ __device__
#else
#define KDFAST_HOST_DEVICE
#endif

namespace kdfast {

enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum Divergence : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5  // total variation distance
};

// docs/DESIGN.md, "Shards and phases".
enum Phase : int { kPhaseFused = 0, kPhaseStats = 1, kPhaseSums = 2, kPhaseGradient = 3 };
// STATS: lse of student at T, teacher at T, student at 1, and 0; SUMS: terms, D, the CE target's logit (the label's,
// or with label smoothing eps: (1 - eps) s_label + eps / V * sum_j s_j), and sum_j q_j log q_j over these columns
// (q the student's softmax at T from the global lse; at T = 1 for CE alone; 0 without either): minus the ranks' sum
// is the entropy.
constexpr int kStatColumns = 4;
// FUSED: each row's parts before any weight: the divergence, the CE (NaN for a label out of range), the z-loss
// log(Z)^2 of the student at T = 1, 1 where the student's largest logit is the label's, and the student's entropy at
// T, -sum_j q_j log q_j (at T = 1 for CE alone, 0 without either; a skipped row writes there what it writes for the
// divergence). The total is formed from them on the Python side.
constexpr int kPartColumns = 5;
enum PartColumn : int { kPartKd = 0, kPartCe = 1, kPartZ = 2, kPartCorrect = 3, kPartEntropy = 4 };

// Positions in the int and float settings lists the ops take.
enum IntSetting : int {
  kSettingDivergence = 0,
  kSettingIgnoreIndex = 1,
  kSettingHasKd = 2,
  kSettingHasCe = 3,
  kSettingPhase = 4,
  kSettingColOffset = 5,
  kSettingSplits = 6,
  kSettingTail = 7,
  kSettingGlobalVocab = 8,
  kIntSettingCount = 9
};
enum FloatSetting : int {
  kSettingBeta = 0,
  kSettingTemperature = 1,
  kSettingKdScale = 2,
  kSettingCeWeight = 3,
  kSettingTeacherScale = 4,
  kSettingLabelSmoothing = 5,
  kSettingZLossWeight = 6,
  kFloatSettingCount = 7
};

// A sparse teacher's treatment of the mass outside its K ids (0: a dense teacher). kTailGiven: the bucket algebra
// with the teacher's rest given, its log-probability in a row's log-prob K (the log-probs hold K + 1 per row), where
// 1 - sum(p) of float32 log-probs would cancel (a vocabulary map's teacher, whose rest the caller sums exactly).
enum Tail : int { kTailDense = 0, kTailBucket = 1, kTailRenormalize = 2, kTailGiven = 3 };
// A sparse teacher's rest 1 - sum(p) under reverse KL's logarithm counts at least this much; the student's mass
// outside the ids at least exp(this) of its row's largest tempered exp (kdfast/sparse_options.py says why).
constexpr double kTeacherRestFloor = 1e-7;
constexpr float kStudentRestFloorLog = -87.3365f;

// The most teachers one mixed call takes.
constexpr int kMaxMixedTeachers = 64;

struct DistillArgs {
  // data pointers; grad may alias student (inplace_backward) and is null when no gradient is wanted
  const void* student;
  const void* teacher;
  void* grad;
  const int64_t* labels;     // [batch * rows_per_batch] global token ids, or null
  float* out;                // FUSED: [rows, kPartColumns]; STATS / SUMS: [rows, kStatColumns]; GRADIENT: unused
  const float* grad_scale;   // one float: the reduction's factor (1/kept rows, 1/num_items, 1)
  const float* row_stats;    // SUMS / GRADIENT: the global log-sum-exps [rows, kStatColumns]
  const float* row_totals;   // GRADIENT: the global SUMS [rows, kStatColumns]
  ScalarKind student_kind, teacher_kind;
  // shapes: logical rows are (b, r) with b < batch, r < rows_per_batch; the vocab stride is 1
  int64_t batch, rows_per_batch, vocab;
  // strides in elements
  int64_t student_stride_b, student_stride_r, teacher_stride_b, teacher_stride_r, grad_stride_b, grad_stride_r;
  // loss settings
  int divergence;
  float beta, temperature, inv_temperature, kd_scale, ce_weight;
  float one_minus_beta;  // 1 - beta taken in double (a mixture's other weight; float 1 - beta loses it near 1)
  int temperature_power;  // 1 or 2 when T is that integer (CE reuses the tempered exps), else 0
  int64_t ignore_index;
  bool has_kd, has_ce;  // has_ce: the student's statistics at T = 1 are needed (the CE term, or the z-loss alone)
  // The CE's gradient is soft_coef * softmax(s) - label_coef * onehot - uniform_coef, per row: soft_coef = scale *
  // (ce_weight + 2 z_loss_weight lse), label_coef = scale * ce_weight (1 - eps), uniform_coef = scale * ce_weight *
  // eps / global_vocab.
  float label_smoothing, z_loss_weight;
  int64_t global_vocab;  // the whole vocabulary (a shard's own columns are `vocab`)
  // the shard: this call's columns are [col_offset, col_offset + vocab) of the global vocabulary
  int phase;
  int64_t col_offset;
  // a sparse teacher (tail != kTailDense), in place of `teacher`: per row K global token ids (-1: padding) and
  // their log-probabilities, K contiguous
  int tail;
  float teacher_scale;  // renormalize: stored log-probs times this are log-probs at T (up to a constant)
  const int64_t* teacher_ids;
  const void* teacher_logprobs;
  ScalarKind logprob_kind;
  int64_t topk, ids_stride_b, ids_stride_r, logprobs_stride_b, logprobs_stride_r;
  // several dense teachers mixed (mix_count > 0, FUSED phase), in place of `teacher`: M data pointers sharing
  // teacher_kind and the teacher strides (a host array on the CPU, a device array for CUDA), and per row log w_m
  // (-inf: the teacher does not count), M contiguous, with row stride mix_weights_stride (0: every row has the same
  // weights)
  const void* const* mix_teachers;
  int64_t mix_count, mix_weights_stride;
  const float* mix_log_weights;
  // CUDA only: splits > 1 cuts each row into vocab ranges handled by separate blocks, whose partial statistics
  // meet in `workspace`
  int splits;
  float* workspace;
  // [rows, M] contiguous, or null: each mixed teacher's own forward KL per row (CPU, forward KL), written beside the
  // mixture's loss from the exps the mixture takes anyway (kept rows; 0 for an ignored row)
  float* mix_divergences;
};

// The CE family's per-row gradient coefficients (see DistillArgs), given the reduction's scale and the row's
// log-sum-exp at T = 1.
struct CeCoefficients {
  float soft, label, uniform;
};
KDFAST_HOST_DEVICE inline CeCoefficients ce_coefficients(const DistillArgs& a, float row_scale, float lse) {
  const float ce = row_scale * a.ce_weight;
  const float z = a.z_loss_weight != 0.0f ? 2.0f * a.z_loss_weight * lse : 0.0f;  // no 0 * inf for a row of -inf
  return {row_scale * (a.ce_weight + z), ce * (1.0f - a.label_smoothing),
          ce * a.label_smoothing / static_cast<float>(a.global_vocab)};
}

// A mixture (JSD, skews) needs a per-element score and its row sum before its gradient.
inline bool is_mixture(int divergence) { return divergence != kForwardKL && divergence != kReverseKL; }

}  // namespace kdfast
