// Thin bindings: the shared packing (csrc/common/pack_args.h), rows split over torch's intra-op threads.
// Registered with TORCH_LIBRARY and slim headers (not torch/extension.h): a third of the compile time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/pack_args.h"
#include "distill_kernel.h"
#include "mapped_rows.h"
#include "softcap_map.h"
#include "sorted_l1.h"
#include "sparse_kernel.h"
#include "topk_entropy.h"
#include "uld_rows.h"

namespace {

at::Tensor distill_forward(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                           const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& row_stats,
                           const std::optional<at::Tensor>& row_totals, c10::IntArrayRef int_settings,
                           c10::ArrayRef<double> float_settings) {
  auto call = kdfast::pack_distill_args(student, teacher, labels, grad_scale, grad, row_stats, row_totals,
                                        int_settings, float_settings, c10::DeviceType::CPU);
  const int64_t rows = call.args.batch * call.args.rows_per_batch;
  // One row is tens of microseconds of work: a grain of 1 row keeps both cores busy even for few rows.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::distill_rows_cpu(call.args, begin, end); });
  return call.out;
}

at::Tensor sparse_distill_forward(const at::Tensor& student, const at::Tensor& teacher_ids,
                                  const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
                                  const at::Tensor& grad_scale, const std::optional<at::Tensor>& grad,
                                  const std::optional<at::Tensor>& row_stats,
                                  const std::optional<at::Tensor>& row_totals, c10::IntArrayRef int_settings,
                                  c10::ArrayRef<double> float_settings) {
  auto call = kdfast::pack_sparse_args(student, teacher_ids, teacher_logprobs, labels, grad_scale, grad, row_stats,
                                       row_totals, int_settings, float_settings, c10::DeviceType::CPU);
  const int64_t rows = call.args.batch * call.args.rows_per_batch;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::sparse_rows_cpu(call.args, begin, end); });
  return call.out;
}

// Several teachers' logits (each shaped like the student's) and their log-weights [rows, M], mixed per row inside the
// fused kernel (csrc/cpu/mixture_row.h).
at::Tensor mixture_distill_forward(const at::Tensor& student, at::TensorList teachers, const at::Tensor& log_weights,
                                   const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                   const std::optional<at::Tensor>& grad,
                                   const std::optional<at::Tensor>& teacher_divergences, c10::IntArrayRef int_settings,
                                   c10::ArrayRef<double> float_settings) {
  std::vector<const void*> teacher_rows;
  auto call = kdfast::pack_mixture_args(student, teachers, log_weights, labels, grad_scale, grad, teacher_divergences,
                                        int_settings, float_settings, c10::DeviceType::CPU, teacher_rows);
  const int64_t rows = call.args.batch * call.args.rows_per_batch;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::distill_rows_cpu(call.args, begin, end); });
  return call.out;
}

const int64_t* optional_ids(const std::optional<at::Tensor>& ids, const char* name) {
  if (!ids.has_value()) return nullptr;
  KDFAST_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->is_contiguous(), name,
               " must be contiguous int64 [K]");
  return ids->data_ptr<int64_t>();
}

// ULD (or GOLD's hybrid, given the matched and unmatched columns) per row of student logits [rows, V_s] and teacher
// probabilities [rows, V_t] (contiguous float32): (loss [rows], entropy [rows], split [rows, 2]: the hybrid's
// matched and unmatched parts before their weights, [rows, 0] for plain ULD); grad_scale times row_scale (0 for an
// ignored row) times the gradient with respect to the logits into `grad` (written, or added with `accumulate`) and
// to the log-mass into `mass_grad`.
// float_settings: 1 / T, beta, matched weight, rest weight, grad_scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> uld_rows(
    const at::Tensor& student_logits, const at::Tensor& teacher_probs,
    const std::optional<at::Tensor>& student_log_mass, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& matched_student, const std::optional<at::Tensor>& matched_teacher,
    const std::optional<at::Tensor>& rest_student, const std::optional<at::Tensor>& rest_teacher,
    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& mass_grad, int64_t divergence,
    c10::ArrayRef<double> float_settings, bool accumulate) {
  for (const at::Tensor* x : {&student_logits, &teacher_probs}) {
    KDFAST_CHECK_DEVICE(*x, c10::DeviceType::CPU);
    KDFAST_CHECK(x->scalar_type() == at::kFloat && x->dim() == 2 && x->is_contiguous(),
                 "uld_rows takes contiguous float32 [rows, V] tables, got ", x->sizes());
  }
  const int64_t rows = student_logits.size(0);
  KDFAST_CHECK(teacher_probs.size(0) == rows, "uld_rows: the two tables must have the same rows");
  KDFAST_CHECK(student_logits.size(1) > 0 && teacher_probs.size(1) > 0 && student_logits.size(1) < (int64_t{1} << 31),
               "uld_rows: each table needs 1 to 2^31 - 1 columns");
  KDFAST_CHECK(float_settings.size() == 5, "uld_rows: float_settings holds 1 / T, beta, two weights and grad_scale");
  KDFAST_CHECK(matched_student.has_value() == matched_teacher.has_value() &&
               matched_student.has_value() == rest_student.has_value() &&
               matched_student.has_value() == rest_teacher.has_value(),
               "uld_rows: the hybrid takes matched and rest columns of both sides, plain ULD none");
  KDFAST_CHECK(!matched_student.has_value() || matched_student->numel() == matched_teacher->numel(),
               "uld_rows: matched_student and matched_teacher must pair up");
  auto check_rows = [&](const std::optional<at::Tensor>& t, const char* name, bool table) {
    if (!t.has_value()) return static_cast<float*>(nullptr);
    KDFAST_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                 (table ? t->sizes() == student_logits.sizes() : t->numel() == rows), name,
                 " must be contiguous float32 shaped ", table ? "like the student's logits" : "[rows]");
    return t->data_ptr<float>();
  };
  at::Tensor loss = at::empty({rows}, student_logits.options());
  at::Tensor entropy = at::empty({rows}, student_logits.options());
  at::Tensor split = at::empty({rows, matched_student.has_value() ? 2 : 0}, student_logits.options());
  kdfast_cpu::UldRowsArgs args{};
  args.student_logits = student_logits.data_ptr<float>();
  args.teacher_probs = teacher_probs.data_ptr<float>();
  args.student_log_mass = student_log_mass.has_value() ? check_rows(student_log_mass, "student_log_mass", false)
                                                       : nullptr;
  args.row_scale = check_rows(row_scale, "row_scale", false);
  args.rows = rows;
  args.student_width = student_logits.size(1);
  args.teacher_width = teacher_probs.size(1);
  args.inv_temperature = static_cast<float>(float_settings[0]);
  args.matched_student = optional_ids(matched_student, "matched_student");
  args.matched_teacher = optional_ids(matched_teacher, "matched_teacher");
  args.matched = matched_student.has_value() ? matched_student->numel() : 0;
  args.rest_student = optional_ids(rest_student, "rest_student");
  args.rest_student_count = rest_student.has_value() ? rest_student->numel() : 0;
  args.rest_teacher = optional_ids(rest_teacher, "rest_teacher");
  args.rest_teacher_count = rest_teacher.has_value() ? rest_teacher->numel() : 0;
  KDFAST_CHECK(divergence >= 0 && divergence <= 2, "uld_rows: divergence is 0 (forward KL), 1 (reverse KL) or 2 (JSD)");
  args.divergence = static_cast<kdfast_cpu::MatchedDivergence>(divergence);
  args.beta = static_cast<float>(float_settings[1]);
  args.matched_weight = static_cast<float>(float_settings[2]);
  args.rest_weight = static_cast<float>(float_settings[3]);
  args.grad_scale = static_cast<float>(float_settings[4]);
  args.loss = loss.data_ptr<float>();
  args.entropy = entropy.data_ptr<float>();
  args.split = matched_student.has_value() ? split.data_ptr<float>() : nullptr;
  args.grad = check_rows(grad, "grad", true);
  args.mass_grad = check_rows(mass_grad, "mass_grad", false);
  args.accumulate = accumulate;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::uld_rows_cpu(args, begin, end); });
  return {loss, entropy, split};
}

// The sorted L1 alone (sorted_l1.cpp), per row of a [rows, N_a] and b [rows, N_b] (contiguous float32, values >= 0):
// (sum_r |a_(r) - b_(r)| [rows] in float64, its subgradient with respect to a [rows, N_a]). ULD's core, exposed so
// that its tests hold it to a float64 sort on crafted values (ties, zeros, tiny and huge values).
std::tuple<at::Tensor, at::Tensor> sorted_l1_rows(const at::Tensor& a, const at::Tensor& b) {
  for (const at::Tensor* x : {&a, &b}) {
    KDFAST_CHECK_DEVICE(*x, c10::DeviceType::CPU);
    KDFAST_CHECK(x->scalar_type() == at::kFloat && x->dim() == 2 && x->is_contiguous() && x->size(1) > 0 &&
                 x->size(1) < (int64_t{1} << 31),
                 "sorted_l1_rows takes contiguous float32 [rows, N] tables (1 <= N < 2^31), got ", x->sizes());
  }
  KDFAST_CHECK(a.size(0) == b.size(0), "sorted_l1_rows: a and b must have the same rows");
  at::Tensor loss = at::empty({a.size(0)}, a.options().dtype(at::kDouble));
  at::Tensor grad = at::empty(a.sizes(), a.options());
  const int64_t width_a = a.size(1), width_b = b.size(1);
  at::parallel_for(0, a.size(0), 1, [&](int64_t begin, int64_t end) {
    kdfast_cpu::SortedL1Scratch scratch;
    for (int64_t row = begin; row < end; ++row) {
      loss.data_ptr<double>()[row] = kdfast_cpu::sorted_l1(scratch, a.data_ptr<float>() + row * width_a, width_a,
                                                           b.data_ptr<float>() + row * width_b, width_b, 1.0f,
                                                           grad.data_ptr<float>() + row * width_a);
    }
  });
  return {loss, grad};
}

// The two models' tables and the map's columns of a "mapped" call (its outputs are the caller's).
kdfast_cpu::MappedColumns map_args(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                                      const at::Tensor& matched_student, const at::Tensor& matched_teacher,
                                      const at::Tensor& rest_student, const at::Tensor& rest_teacher,
                                      double student_temperature, double teacher_temperature) {
  kdfast_cpu::MappedColumns args{};
  args.teacher_logits = teacher_logits.data_ptr<float>();
  args.student_logits = student_logits.data_ptr<float>();
  args.matched_student = optional_ids(matched_student, "matched_student");
  args.matched_teacher = optional_ids(matched_teacher, "matched_teacher");
  args.matched = matched_student.numel();
  args.rest_student = optional_ids(rest_student, "rest_student");
  args.rest_student_count = rest_student.numel();
  args.rest_teacher = optional_ids(rest_teacher, "rest_teacher");
  args.rest_teacher_count = rest_teacher.numel();
  args.rows = student_logits.size(0);
  args.student_width = student_logits.size(1);
  args.teacher_width = teacher_logits.size(1);
  args.student_temperature = static_cast<float>(student_temperature);
  args.teacher_temperature = static_cast<float>(teacher_temperature);
  return args;
}

// Method "mapped" fused (csrc/cpu/mapped_rows.h, MappedArgs): the parts [rows, 5] and the gradient written into
// `grad`. float_settings: T_s, T_t, kd_scale, ce_weight, grad_scale, beta.
at::Tensor mapped_rows(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                       const at::Tensor& matched_student, const at::Tensor& matched_teacher,
                       const at::Tensor& rest_student, const at::Tensor& rest_teacher,
                       const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& grad,
                       int64_t ignore_index, int64_t divergence, c10::ArrayRef<double> float_settings) {
  for (const at::Tensor* x : {&teacher_logits, &student_logits}) {
    KDFAST_CHECK_DEVICE(*x, c10::DeviceType::CPU);
    KDFAST_CHECK(x->scalar_type() == at::kFloat && x->dim() == 2 && x->is_contiguous(),
                 "mapped_rows takes contiguous float32 [rows, V] tables, got ", x->sizes());
  }
  const int64_t rows = student_logits.size(0);
  KDFAST_CHECK(teacher_logits.size(0) == rows, "mapped_rows: the two tables must have the same rows");
  KDFAST_CHECK(divergence >= kdfast::kForwardKL && divergence <= kdfast::kTVD, "mapped_rows: unknown divergence ",
               divergence);
  KDFAST_CHECK(matched_student.numel() == matched_teacher.numel(), "mapped_rows: matched columns pair up");
  KDFAST_CHECK(divergence != kdfast::kForwardKL || rest_student.numel() > 0,
               "mapped_rows: forward KL needs a student column off the map");
  KDFAST_CHECK(float_settings.size() == 6, "mapped_rows: float_settings holds T_s, T_t, kd_scale, ce_weight, "
               "grad_scale and beta");
  if (labels.has_value()) {
    KDFAST_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == rows,
                 "labels must be contiguous int64 [rows]");
  }
  if (grad.has_value()) {
    KDFAST_CHECK(grad->scalar_type() == at::kFloat && grad->is_contiguous() && grad->sizes() == student_logits.sizes(),
                 "grad must be contiguous float32 shaped like the student's logits");
  }
  at::Tensor parts = at::empty({rows, 5}, student_logits.options());
  kdfast_cpu::MappedArgs args{};
  args.map = map_args(teacher_logits, student_logits, matched_student, matched_teacher, rest_student, rest_teacher,
                      float_settings[0], float_settings[1]);
  const kdfast_cpu::MappedColumns& map = args.map;
  // The teacher's unmatched columns as byte flags: the kernel sums each side's rest in its vector pass, without
  // gathers (the student's from teacher_column < 0). Bytes, not floats: a quarter of the bytes beside a row's
  // working set in L2.
  std::vector<uint8_t> teacher_rest(map.teacher_width, 0);
  for (int64_t k = 0; k < map.rest_teacher_count; ++k) teacher_rest[map.rest_teacher[k]] = 1;
  // Each student column's teacher column (-1: unmatched), so that the gradient's pass gathers the teacher's
  // probabilities in column order. The student's matched columns are distinct (one token string each).
  std::vector<int32_t> teacher_column(map.student_width, -1);
  for (int64_t k = 0; k < map.matched; ++k) {
    const int64_t column = map.matched_student[k];
    KDFAST_CHECK(column >= 0 && column < map.student_width && map.matched_teacher[k] >= 0 &&
                 map.matched_teacher[k] < map.teacher_width, "mapped_rows: matched pair ", k, " (",
                 column, ", ", map.matched_teacher[k], ") is outside the logits");
    KDFAST_CHECK(teacher_column[column] < 0, "mapped_rows: student column ", column, " is matched twice");
    teacher_column[column] = static_cast<int32_t>(map.matched_teacher[k]);
  }
  args.teacher_column = teacher_column.data();
  args.teacher_rest = teacher_rest.data();
  args.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  args.ignore_index = ignore_index;
  args.kd_scale = static_cast<float>(float_settings[2]);
  args.ce_weight = static_cast<float>(float_settings[3]);
  args.grad_scale = static_cast<float>(float_settings[4]);
  args.divergence = static_cast<int>(divergence);
  args.beta = static_cast<float>(float_settings[5]);
  args.one_minus_beta = static_cast<float>(1.0 - float_settings[5]);
  args.parts = parts.data_ptr<float>();
  args.part_columns = 5;
  args.grad = grad.has_value() ? grad->data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::mapped_rows_cpu(args, begin, end); });
  return parts;
}

// Elements per thread's share of a softcap pass: a few microseconds of work, so that two threads split a chunk.
constexpr int64_t kSoftcapGrain = 1 << 15;

void check_float_table(const at::Tensor& x, const char* name) {
  KDFAST_CHECK_DEVICE(x, c10::DeviceType::CPU);
  KDFAST_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), name, " must be a contiguous float32 tensor, got ",
               x.scalar_type(), " of shape ", x.sizes());
}

// The softcap's map (csrc/cpu/softcap_map.h) of `x` into `out`, or over `x` itself without it; `keep` SoftcapKeep's.
void softcap_map(const at::Tensor& x, const std::optional<at::Tensor>& out, double in_scale, double out_scale,
                 int64_t keep) {
  check_float_table(x, "softcap_map's x");
  KDFAST_CHECK(keep >= 0 && keep <= 2, "softcap_map: keep is 0, 1 or 2, got ", keep);
  const auto what = static_cast<kdfast_cpu::SoftcapKeep>(keep);
  KDFAST_CHECK(out.has_value() == (what != kdfast_cpu::SoftcapKeep::kMapped),
               "softcap_map: `out` is given unless x takes the mapped values");
  float* target = nullptr;
  if (out.has_value()) {
    check_float_table(*out, "softcap_map's out");
    KDFAST_CHECK(out->sizes() == x.sizes() && out->data_ptr<float>() != x.data_ptr<float>(),
                 "softcap_map: out must be shaped like x and apart from it");
    target = out->data_ptr<float>();
  }
  float* source = x.data_ptr<float>();
  at::parallel_for(0, x.numel(), kSoftcapGrain, [&](int64_t begin, int64_t end) {
    kdfast_cpu::softcap_map(source, target, begin, end, static_cast<float>(in_scale), static_cast<float>(out_scale),
                            what);
  });
}

// grad *= slope * (1 - tanh^2), in place, the tanh `kept` (from_tanh) or tanh(in_scale * kept)
// (csrc/cpu/softcap_map.h).
void softcap_chain(const at::Tensor& grad, const at::Tensor& kept, double in_scale, double slope, bool from_tanh) {
  check_float_table(grad, "softcap_chain's grad");
  check_float_table(kept, "softcap_chain's kept");
  KDFAST_CHECK(grad.sizes() == kept.sizes(), "softcap_chain: grad and kept must have the same shape");
  float* g = grad.data_ptr<float>();
  const float* k = kept.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kSoftcapGrain, [&](int64_t begin, int64_t end) {
    kdfast_cpu::softcap_chain(g, k, begin, end, static_cast<float>(in_scale), static_cast<float>(slope), from_tanh);
  });
}

// EAFT's factor's entropy per row (csrc/cpu/topk_entropy.h) of float32 logits [rows, V] with contiguous rows (a
// padded vocabulary's view of its first V columns too).
at::Tensor topk_entropy(const at::Tensor& logits, int64_t k) {
  KDFAST_CHECK_DEVICE(logits, c10::DeviceType::CPU);
  KDFAST_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
               "topk_entropy takes float32 [rows, V] logits with contiguous rows, got ", logits.scalar_type(),
               " of shape ", logits.sizes());
  const int64_t rows = logits.size(0), width = logits.size(1), row_stride = logits.stride(0);
  KDFAST_CHECK(k >= 1 && k <= width, "topk_entropy: k must be in [1, ", width, "], got ", k);
  at::Tensor entropy = at::empty({rows}, logits.options());
  const float* base = logits.data_ptr<float>();
  float* out = entropy.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> top(static_cast<size_t>(k));
    for (int64_t row = begin; row < end; ++row) {
      out[row] = kdfast_cpu::topk_entropy_row(base + row * row_stride, width, k, top.data());
    }
  });
  return entropy;
}

}  // namespace

TORCH_LIBRARY(kdfast_cpu, m) {
  m.def(kdfast::kDistillForwardSchema);
  m.def(kdfast::kSparseDistillForwardSchema);
  m.def(kdfast::kMixtureDistillForwardSchema);
  m.def("uld_rows(Tensor student_logits, Tensor teacher_probs, Tensor? student_log_mass, Tensor? row_scale, "
        "Tensor? matched_student, "
        "Tensor? matched_teacher, Tensor? rest_student, Tensor? rest_teacher, Tensor(a!)? grad, Tensor(b!)? mass_grad, "
        "int divergence, float[] float_settings, bool accumulate) -> (Tensor, Tensor, Tensor)");
  m.def("sorted_l1_rows(Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("mapped_rows(Tensor teacher_logits, Tensor student_logits, Tensor matched_student, Tensor matched_teacher, "
        "Tensor rest_student, Tensor rest_teacher, Tensor? labels, Tensor(a!)? grad, int ignore_index, int divergence, "
        "float[] float_settings) -> Tensor");
  m.def("softcap_map(Tensor(a!) x, Tensor(b!)? out, float in_scale, float out_scale, int keep) -> ()");
  m.def("softcap_chain(Tensor(a!) grad, Tensor kept, float in_scale, float slope, bool from_tanh) -> ()");
  m.def("topk_entropy(Tensor logits, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast_cpu, CPU, m) {
  m.impl("distill_forward", &distill_forward);
  m.impl("sparse_distill_forward", &sparse_distill_forward);
  m.impl("mixture_distill_forward", &mixture_distill_forward);
  m.impl("uld_rows", &uld_rows);
  m.impl("sorted_l1_rows", &sorted_l1_rows);
  m.impl("mapped_rows", &mapped_rows);
  m.impl("softcap_map", &softcap_map);
  m.impl("softcap_chain", &softcap_chain);
  m.impl("topk_entropy", &topk_entropy);
}
