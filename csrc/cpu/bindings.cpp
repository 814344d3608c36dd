// Thin bindings: the shared packing (csrc/common/pack_args.h), rows split over torch's intra-op threads.
// Registered with TORCH_LIBRARY and slim headers (not torch/extension.h): a third of the compile time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/pack_args.h"
#include "distill_kernel.h"
#include "sorted_l1.h"
#include "sparse_kernel.h"

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
                                   const std::optional<at::Tensor>& grad, c10::IntArrayRef int_settings,
                                   c10::ArrayRef<double> float_settings) {
  std::vector<const void*> teacher_rows;
  auto call = kdfast::pack_mixture_args(student, teachers, log_weights, labels, grad_scale, grad, int_settings,
                                        float_settings, c10::DeviceType::CPU, teacher_rows);
  const int64_t rows = call.args.batch * call.args.rows_per_batch;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::distill_rows_cpu(call.args, begin, end); });
  return call.out;
}

// ULD's sorted L1 per row of two probability tables [rows, V_s] and [rows, V_t] (contiguous float32), and its
// subgradient at each student column into `sign` when given.
at::Tensor sorted_l1(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& sign) {
  for (const at::Tensor* x : {&student, &teacher}) {
    KDFAST_CHECK_DEVICE(*x, c10::DeviceType::CPU);
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->dim() == 2 && x->is_contiguous(),
                "sorted_l1 takes contiguous float32 [rows, V] probabilities, got ", x->sizes());
  }
  TORCH_CHECK(student.size(0) == teacher.size(0), "sorted_l1: the two tables must have the same rows");
  TORCH_CHECK(student.size(1) > 0 && teacher.size(1) > 0 && student.size(1) < (int64_t{1} << 31),
              "sorted_l1: each table needs 1 to 2^31 - 1 columns");
  if (sign.has_value()) {
    TORCH_CHECK(sign->scalar_type() == at::kFloat && sign->is_contiguous() && sign->sizes() == student.sizes(),
                "sign must be a contiguous float32 tensor shaped like the student's table");
  }
  at::Tensor loss = at::empty({student.size(0)}, student.options());
  const kdfast_cpu::SortedL1Args args{student.data_ptr<float>(), teacher.data_ptr<float>(), student.size(0),
                                      student.size(1), teacher.size(1), loss.data_ptr<float>(),
                                      sign.has_value() ? sign->data_ptr<float>() : nullptr};
  at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::sorted_l1_rows_cpu(args, begin, end); });
  return loss;
}

}  // namespace

TORCH_LIBRARY(kdfast_cpu, m) {
  m.def(kdfast::kDistillForwardSchema);
  m.def(kdfast::kSparseDistillForwardSchema);
  m.def(kdfast::kMixtureDistillForwardSchema);
  m.def("sorted_l1(Tensor student, Tensor teacher, Tensor(a!)? sign) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast_cpu, CPU, m) {
  m.impl("distill_forward", &distill_forward);
  m.impl("sparse_distill_forward", &sparse_distill_forward);
  m.impl("mixture_distill_forward", &mixture_distill_forward);
  m.impl("sorted_l1", &sorted_l1);
}
