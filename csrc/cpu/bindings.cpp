// Thin bindings: tensors -> DistillArgs, readable input checks, rows split over torch's intra-op threads.
// Registered with TORCH_LIBRARY and slim headers (not torch/extension.h): a third of the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "distill_kernel.h"

namespace {

#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_3D_VOCAB_CONTIGUOUS(x) \
  TORCH_CHECK((x).dim() == 3 && ((x).stride(2) == 1 || (x).size(2) == 1), \
              #x " must be a [batch, rows, vocab] view with vocab stride 1")

kdfast_cpu::ScalarKind scalar_kind(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kdfast_cpu::ScalarKind::kFloat32;
    case at::kBFloat16: return kdfast_cpu::ScalarKind::kBFloat16;
    case at::kHalf: return kdfast_cpu::ScalarKind::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

at::Tensor distill_forward(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                           const std::optional<at::Tensor>& grad, int64_t divergence, double beta,
                           double temperature, double kd_scale, double ce_weight, int64_t ignore_index,
                           bool has_kd, bool has_ce) {
  CHECK_CPU(student);
  CHECK_CPU(teacher);
  CHECK_3D_VOCAB_CONTIGUOUS(student);
  CHECK_3D_VOCAB_CONTIGUOUS(teacher);
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(), " != student shape ",
              student.sizes());
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1, "grad_scale must be one float32");
  const int64_t batch = student.size(0), rows_per_batch = student.size(1), vocab = student.size(2);
  const int64_t rows = batch * rows_per_batch;

  kdfast_cpu::DistillArgs args{};
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_kind = scalar_kind(student, "student_logits");
  args.teacher_kind = scalar_kind(teacher, "teacher_logits");
  args.student_stride_b = student.stride(0);
  args.student_stride_r = student.stride(1);
  args.teacher_stride_b = teacher.stride(0);
  args.teacher_stride_r = teacher.stride(1);
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == rows,
                "labels must be a contiguous int64 tensor with one entry per row");
    args.labels = labels->data_ptr<int64_t>();
  }
  if (grad.has_value()) {
    CHECK_3D_VOCAB_CONTIGUOUS(*grad);
    TORCH_CHECK(grad->sizes() == student.sizes() && grad->scalar_type() == student.scalar_type(),
                "grad must match the student logits' shape and dtype");
    args.grad = grad->data_ptr();
    args.grad_stride_b = grad->stride(0);
    args.grad_stride_r = grad->stride(1);
  }
  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(at::kFloat));
  args.loss_rows = loss_rows.data_ptr<float>();
  args.grad_scale = grad_scale.data_ptr<float>();
  args.batch = batch;
  args.rows_per_batch = rows_per_batch;
  args.vocab = vocab;
  args.divergence = static_cast<int>(divergence);
  args.beta = static_cast<float>(beta);
  args.inv_temperature = static_cast<float>(1.0 / temperature);
  args.kd_scale = static_cast<float>(kd_scale);
  args.ce_weight = static_cast<float>(ce_weight);
  args.temperature_power = temperature == 1.0 ? 1 : (temperature == 2.0 ? 2 : 0);
  args.ignore_index = ignore_index;
  args.has_kd = has_kd;
  args.has_ce = has_ce;
  // One row is tens of microseconds of work: a grain of 1 row keeps both cores busy even for few rows.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kdfast_cpu::distill_rows_cpu(args, begin, end); });
  return loss_rows;
}

}  // namespace

TORCH_LIBRARY(kdfast_cpu, m) {
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor(a!)? grad, "
      "int divergence, float beta, float temperature, float kd_scale, float ce_weight, int ignore_index, "
      "bool has_kd, bool has_ce) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast_cpu, CPU, m) { m.impl("distill_forward", &distill_forward); }
