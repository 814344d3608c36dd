// Thin bindings: the shared packing (csrc/common/pack_args.h), rows split over torch's intra-op threads.
// Registered with TORCH_LIBRARY and slim headers (not torch/extension.h): a third of the compile time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/pack_args.h"
#include "distill_kernel.h"
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

}  // namespace

TORCH_LIBRARY(kdfast_cpu, m) {
  m.def(kdfast::kDistillForwardSchema);
  m.def(kdfast::kSparseDistillForwardSchema);
  m.def(kdfast::kMixtureDistillForwardSchema);
}

TORCH_LIBRARY_IMPL(kdfast_cpu, CPU, m) {
  m.impl("distill_forward", &distill_forward);
  m.impl("sparse_distill_forward", &sparse_distill_forward);
  m.impl("mixture_distill_forward", &mixture_distill_forward);
}
