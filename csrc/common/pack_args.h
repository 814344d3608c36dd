// Tensors and settings lists -> DistillArgs, with readable input checks: the one packing both bindings use.
// Slim ATen headers only (no torch/extension.h), which keeps the JIT compile short.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

#include "check_message.h"
#include "kernel_abi.h"

namespace kdfast {

// The ops both extensions register (under their own namespace): a dense teacher's logits, or a sparse teacher's
// ids and log-probabilities.
constexpr const char* kDistillForwardSchema =
    "distill_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor(a!)? grad, "
    "Tensor? row_stats, Tensor? row_totals, int[] int_settings, float[] float_settings) -> Tensor";
constexpr const char* kSparseDistillForwardSchema =
    "sparse_distill_forward(Tensor student, Tensor teacher_ids, Tensor teacher_logprobs, Tensor? labels, "
    "Tensor grad_scale, Tensor(a!)? grad, Tensor? row_stats, Tensor? row_totals, int[] int_settings, "
    "float[] float_settings) -> Tensor";
constexpr const char* kMixtureDistillForwardSchema =
    "mixture_distill_forward(Tensor student, Tensor[] teachers, Tensor log_weights, Tensor? labels, "
    "Tensor grad_scale, Tensor(a!)? grad, Tensor(b!)? teacher_divergences, int[] int_settings, "
    "float[] float_settings) -> Tensor";

#define KDFAST_CHECK_DEVICE(x, device_type) \
  KDFAST_CHECK((x).device().type() == (device_type), #x " must be on ", (device_type), ", got ", (x).device())
#define KDFAST_CHECK_ROWS_VIEW(x) \
  KDFAST_CHECK((x).dim() == 3 && ((x).stride(2) == 1 || (x).size(2) == 1), \
               #x " must be a [batch, rows, vocab] view with vocab stride 1")

inline ScalarKind scalar_kind(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kFloat16;
    default: KDFAST_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

inline void check_row_table(const std::optional<at::Tensor>& table, const char* name, int64_t rows,
                            c10::DeviceType device_type) {
  KDFAST_CHECK(table.has_value(), name, " is required in this phase");
  KDFAST_CHECK_DEVICE(*table, device_type);
  KDFAST_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                  table->size(0) == rows && table->size(1) == kStatColumns,
               name, " must be a contiguous float32 [", rows, ", ", kStatColumns, "] tensor, got ", table->sizes());
}

struct PackedCall {
  DistillArgs args;
  at::Tensor out;
};

// Everything but the teacher: the student's rows, labels, gradient, the shard's row tables, the settings lists.
inline PackedCall pack_common(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                              const at::Tensor& grad_scale, const std::optional<at::Tensor>& grad,
                              const std::optional<at::Tensor>& row_stats, const std::optional<at::Tensor>& row_totals,
                              c10::IntArrayRef ints, c10::ArrayRef<double> floats, c10::DeviceType device_type) {
  KDFAST_CHECK(ints.size() == kIntSettingCount && floats.size() == kFloatSettingCount, "kdfast: expected ",
               kIntSettingCount, " int and ", kFloatSettingCount, " float settings, got ", ints.size(), " and ",
               floats.size(), " (the Python package and the compiled kernel disagree: rebuild with `kdfast build`)");
  KDFAST_CHECK_DEVICE(student, device_type);
  KDFAST_CHECK_DEVICE(grad_scale, device_type);
  KDFAST_CHECK_ROWS_VIEW(student);
  KDFAST_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1, "grad_scale must be one float32");

  DistillArgs a{};
  a.divergence = static_cast<int>(ints[kSettingDivergence]);
  a.ignore_index = ints[kSettingIgnoreIndex];
  a.has_kd = ints[kSettingHasKd] != 0;
  a.has_ce = ints[kSettingHasCe] != 0;
  a.phase = static_cast<int>(ints[kSettingPhase]);
  a.col_offset = ints[kSettingColOffset];
  a.splits = static_cast<int>(ints[kSettingSplits]);
  a.tail = static_cast<int>(ints[kSettingTail]);
  a.global_vocab = ints[kSettingGlobalVocab];
  KDFAST_CHECK(a.divergence >= kForwardKL && a.divergence <= kTVD, "unknown divergence code ",
               a.divergence);
  KDFAST_CHECK(a.phase >= kPhaseFused && a.phase <= kPhaseGradient, "unknown phase ", a.phase);
  KDFAST_CHECK(a.tail >= kTailDense && a.tail <= kTailGiven, "unknown tail code ", a.tail);
  KDFAST_CHECK(a.phase != kPhaseFused || a.col_offset == 0, "a fused call covers the whole row (col_offset 0)");
  const double temperature = floats[kSettingTemperature];
  a.beta = static_cast<float>(floats[kSettingBeta]);
  a.one_minus_beta = static_cast<float>(1.0 - floats[kSettingBeta]);
  a.temperature = static_cast<float>(temperature);
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  a.kd_scale = static_cast<float>(floats[kSettingKdScale]);
  a.ce_weight = static_cast<float>(floats[kSettingCeWeight]);
  a.teacher_scale = static_cast<float>(floats[kSettingTeacherScale]);
  a.label_smoothing = static_cast<float>(floats[kSettingLabelSmoothing]);
  a.z_loss_weight = static_cast<float>(floats[kSettingZLossWeight]);
  a.temperature_power = temperature == 1.0 ? 1 : (temperature == 2.0 ? 2 : 0);

  a.student = student.data_ptr();
  a.student_kind = scalar_kind(student, "student_logits");
  a.student_stride_b = student.stride(0);
  a.student_stride_r = student.stride(1);
  a.batch = student.size(0);
  a.rows_per_batch = student.size(1);
  a.vocab = student.size(2);
  // Unknown (0): a whole row's own columns. A shard's caller passes the whole vocabulary (label smoothing needs it).
  if (a.global_vocab <= 0) a.global_vocab = a.col_offset + a.vocab;
  KDFAST_CHECK(a.global_vocab >= a.col_offset + a.vocab, "global_vocab ", a.global_vocab, " < the shard's end ",
               a.col_offset + a.vocab);
  const int64_t rows = a.batch * a.rows_per_batch;
  if (labels.has_value()) {
    KDFAST_CHECK_DEVICE(*labels, device_type);
    KDFAST_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == rows,
                 "labels must be a contiguous int64 tensor with one entry per row");
    a.labels = labels->data_ptr<int64_t>();
  }
  if (grad.has_value()) {
    KDFAST_CHECK_DEVICE(*grad, device_type);
    KDFAST_CHECK_ROWS_VIEW(*grad);
    KDFAST_CHECK(grad->sizes() == student.sizes() && grad->scalar_type() == student.scalar_type(),
                 "grad must match the student logits' shape and dtype");
    KDFAST_CHECK(a.phase != kPhaseStats, "the STATS phase writes no gradient");
    KDFAST_CHECK(a.phase != kPhaseSums || !a.has_kd || a.divergence == kForwardKL,
                 "in the SUMS phase only forward KL and CE write their gradient (the others need GRADIENT)");
    a.grad = grad->data_ptr();
    a.grad_stride_b = grad->stride(0);
    a.grad_stride_r = grad->stride(1);
  }
  KDFAST_CHECK(a.phase != kPhaseGradient || grad.has_value(), "the GRADIENT phase needs a grad to write");
  KDFAST_CHECK(a.phase != kPhaseGradient || (a.has_kd && a.divergence != kForwardKL),
               "the GRADIENT phase is for reverse KL and the mixtures (forward KL and CE write theirs in SUMS)");
  if (a.phase == kPhaseSums || a.phase == kPhaseGradient) {
    check_row_table(row_stats, "row_stats", rows, device_type);
    a.row_stats = row_stats->data_ptr<float>();
  }
  if (a.phase == kPhaseGradient) {
    check_row_table(row_totals, "row_totals", rows, device_type);
    a.row_totals = row_totals->data_ptr<float>();
  }
  a.grad_scale = grad_scale.data_ptr<float>();
  const auto float_options = student.options().dtype(at::kFloat);
  at::Tensor out;
  if (a.phase == kPhaseFused) {
    out = at::empty({rows, kPartColumns}, float_options);
  } else if (a.phase == kPhaseGradient) {
    out = at::empty({0}, float_options);
  } else {
    out = at::empty({rows, kStatColumns}, float_options);
  }
  a.out = out.data_ptr<float>();
  return {a, out};
}

// A dense teacher: logits shaped like the student's.
inline PackedCall pack_distill_args(const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& row_stats,
                                    const std::optional<at::Tensor>& row_totals, c10::IntArrayRef ints,
                                    c10::ArrayRef<double> floats, c10::DeviceType device_type) {
  PackedCall call = pack_common(student, labels, grad_scale, grad, row_stats, row_totals, ints, floats, device_type);
  KDFAST_CHECK(call.args.tail == kTailDense, "distill_forward takes a dense teacher (sparse_distill_forward: ids)");
  KDFAST_CHECK_DEVICE(teacher, device_type);
  KDFAST_CHECK_ROWS_VIEW(teacher);
  KDFAST_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(), " != student shape ",
               student.sizes());
  KDFAST_CHECK(teacher.device() == student.device(), "teacher and student logits must be on one device");
  call.args.teacher = teacher.data_ptr();
  call.args.teacher_kind = scalar_kind(teacher, "teacher_logits");
  call.args.teacher_stride_b = teacher.stride(0);
  call.args.teacher_stride_r = teacher.stride(1);
  return call;
}

// A sparse teacher: [batch, rows, K] global token ids and their log-probabilities, K contiguous (K + 1 with a given
// rest, kTailGiven: its log-probability last).
inline PackedCall pack_sparse_args(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                                   const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                   const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& row_stats,
                                   const std::optional<at::Tensor>& row_totals, c10::IntArrayRef ints,
                                   c10::ArrayRef<double> floats, c10::DeviceType device_type) {
  PackedCall call = pack_common(student, labels, grad_scale, grad, row_stats, row_totals, ints, floats, device_type);
  DistillArgs& a = call.args;
  KDFAST_CHECK(a.tail != kTailDense, "sparse_distill_forward needs a sparse tail setting");
  KDFAST_CHECK_DEVICE(ids, device_type);
  KDFAST_CHECK_DEVICE(logprobs, device_type);
  KDFAST_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 3 && ids.size(0) == a.batch &&
                  ids.size(1) == a.rows_per_batch && (ids.stride(2) == 1 || ids.size(2) == 1),
               "teacher_ids must be an int64 [batch, rows, K] view with K contiguous, got ", ids.sizes());
  const int64_t given = a.tail == kTailGiven ? 1 : 0;
  KDFAST_CHECK(logprobs.dim() == 3 && logprobs.size(0) == ids.size(0) && logprobs.size(1) == ids.size(1) &&
                   logprobs.size(2) == ids.size(2) + given && (logprobs.stride(2) == 1 || logprobs.size(2) == 1),
               "teacher_logprobs must be shaped like teacher_ids", given ? " plus one column (the given rest)" : "",
               " with K contiguous, got ", logprobs.sizes(), " against ", ids.sizes());
  a.teacher_ids = ids.data_ptr<int64_t>();
  a.teacher_logprobs = logprobs.data_ptr();
  a.logprob_kind = scalar_kind(logprobs, "teacher_logprobs");
  a.topk = ids.size(2);
  a.ids_stride_b = ids.stride(0);
  a.ids_stride_r = ids.stride(1);
  a.logprobs_stride_b = logprobs.stride(0);
  a.logprobs_stride_r = logprobs.stride(1);
  return call;
}

// Several dense teachers mixed per row (the FUSED phase): M tensors shaped like the student, of one dtype and one
// layout, and log-weights [rows, M] float32 (M contiguous; a row stride of 0 when every row has the same weights).
// `rows_out` holds the M data pointers the args point at: it must outlive the call.
inline PackedCall pack_mixture_args(const at::Tensor& student, at::TensorList teachers, const at::Tensor& log_weights,
                                    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                    const std::optional<at::Tensor>& grad,
                                    const std::optional<at::Tensor>& teacher_divergences, c10::IntArrayRef ints,
                                    c10::ArrayRef<double> floats, c10::DeviceType device_type,
                                    std::vector<const void*>& rows_out) {
  PackedCall call = pack_common(student, labels, grad_scale, grad, std::nullopt, std::nullopt, ints, floats,
                                device_type);
  DistillArgs& a = call.args;
  KDFAST_CHECK(a.phase == kPhaseFused && a.tail == kTailDense,
               "mixture_distill_forward is a fused call over whole rows of dense teachers");
  const int64_t count = static_cast<int64_t>(teachers.size());
  KDFAST_CHECK(count >= 1 && count <= kMaxMixedTeachers, "mixture_distill_forward takes 1 to ", kMaxMixedTeachers,
               " teachers, got ", count);
  const at::Tensor& first = teachers[0];
  rows_out.clear();
  for (const at::Tensor& teacher : teachers) {
    KDFAST_CHECK_DEVICE(teacher, device_type);
    KDFAST_CHECK_ROWS_VIEW(teacher);
    KDFAST_CHECK(teacher.sizes() == student.sizes(), "every teacher must be shaped like the student ",
                 student.sizes(), ", got ", teacher.sizes());
    KDFAST_CHECK(teacher.scalar_type() == first.scalar_type() && teacher.strides() == first.strides(),
                 "the teachers must share one dtype and one layout (strides)");
    rows_out.push_back(teacher.data_ptr());
  }
  const int64_t rows = a.batch * a.rows_per_batch;
  KDFAST_CHECK_DEVICE(log_weights, device_type);
  KDFAST_CHECK(log_weights.scalar_type() == at::kFloat && log_weights.dim() == 2 && log_weights.size(0) == rows &&
                  log_weights.size(1) == count && (log_weights.stride(1) == 1 || count == 1),
               "log_weights must be a float32 [", rows, ", ", count, "] tensor with M contiguous, got ",
               log_weights.sizes());
  a.teacher_kind = scalar_kind(first, "teacher_logits");
  a.teacher_stride_b = first.stride(0);
  a.teacher_stride_r = first.stride(1);
  a.mix_teachers = rows_out.data();
  a.mix_count = count;
  a.mix_log_weights = log_weights.data_ptr<float>();
  a.mix_weights_stride = log_weights.stride(0);
  a.mix_divergences = nullptr;
  if (teacher_divergences.has_value()) {
    const at::Tensor& out = *teacher_divergences;
    KDFAST_CHECK_DEVICE(out, device_type);
    KDFAST_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == rows && out.size(1) == count &&
                    out.is_contiguous(),
                 "teacher_divergences must be a contiguous float32 [", rows, ", ", count, "] tensor, got ",
                 out.sizes());
    const bool written = a.divergence == kForwardKL || device_type == c10::DeviceType::CPU;
    KDFAST_CHECK(a.has_kd && written, "teacher_divergences: each teacher's own divergence is written in the kernel of "
                 "a call with a divergence, under forward KL on a GPU, under every divergence on the CPU");
    a.mix_divergences = out.data_ptr<float>();
  }
  return call;
}

}  // namespace kdfast
