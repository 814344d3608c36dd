// Thin bindings: the shared packing (csrc/common/pack_args.h), rows split over torch's intra-op threads.
// Registered with TORCH_LIBRARY and slim headers (not torch/extension.h): a third of the compile time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/pack_args.h"
#include "distill_kernel.h"
#include "mix_kernel.h"
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

// Several teachers' rows [rows, columns] (float32, vocab stride 1) and log-weights [rows, M] -> the mixture's logits,
// written into `out` (contiguous float32 [rows, columns]: a buffer the caller reuses for every chunk).
void mix_teachers(at::TensorList teachers, const at::Tensor& log_weights, double temperature, const at::Tensor& out) {
  TORCH_CHECK(!teachers.empty() && teachers.size() <= kdfast_cpu::kMaxTeachers, "mix_teachers takes 1 to ",
              kdfast_cpu::kMaxTeachers, " teachers, got ", teachers.size());
  const auto& first = teachers[0];
  std::vector<const float*> rows;
  for (const auto& teacher : teachers) {
    KDFAST_CHECK_DEVICE(teacher, c10::DeviceType::CPU);
    TORCH_CHECK(teacher.scalar_type() == at::kFloat && teacher.dim() == 2 && teacher.sizes() == first.sizes() &&
                    teacher.stride(1) == 1 && teacher.stride(0) == first.stride(0),
                "every teacher must be a float32 [rows, columns] view with vocab stride 1 and one shape, got ",
                teacher.sizes());
    rows.push_back(teacher.data_ptr<float>());
  }
  TORCH_CHECK(log_weights.scalar_type() == at::kFloat && log_weights.is_contiguous() && log_weights.dim() == 2 &&
                  log_weights.size(0) == first.size(0) && log_weights.size(1) == static_cast<int64_t>(teachers.size()),
              "log_weights must be a contiguous float32 [rows, M] tensor, got ", log_weights.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == first.sizes(),
              "out must be a contiguous float32 tensor of the teachers' shape ", first.sizes(), ", got ", out.sizes());
  const kdfast_cpu::MixArgs args{rows.data(), static_cast<int64_t>(rows.size()), first.stride(0), first.size(0),
                                 first.size(1), log_weights.data_ptr<float>(), static_cast<float>(temperature),
                                 out.data_ptr<float>()};
  at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::mix_rows_cpu(args, begin, end); });
}

}  // namespace

TORCH_LIBRARY(kdfast_cpu, m) {
  m.def(kdfast::kDistillForwardSchema);
  m.def(kdfast::kSparseDistillForwardSchema);
  m.def("mix_teachers(Tensor[] teachers, Tensor log_weights, float temperature, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kdfast_cpu, CPU, m) {
  m.impl("distill_forward", &distill_forward);
  m.impl("sparse_distill_forward", &sparse_distill_forward);
  m.impl("mix_teachers", &mix_teachers);
}
