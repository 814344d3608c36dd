// Thin bindings: tensors -> DistillArgs, readable input checks, the workspace, the current stream.
// Slim headers (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS and cuSPARSE): g++ -fsyntax-only checks
// this file on machines with the CUDA runtime headers alone.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "distill_kernel.h"

namespace {

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_3D_VOCAB_CONTIGUOUS(x) \
  TORCH_CHECK((x).dim() == 3 && ((x).stride(2) == 1 || (x).size(2) == 1), \
              #x " must be a [batch, rows, vocab] view with vocab stride 1")

kdfast_cuda::ScalarKind scalar_kind(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kdfast_cuda::ScalarKind::kFloat32;
    case at::kBFloat16: return kdfast_cuda::ScalarKind::kBFloat16;
    case at::kHalf: return kdfast_cuda::ScalarKind::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

at::Tensor distill_forward(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                           const std::optional<at::Tensor>& grad, int64_t divergence, double beta,
                           double temperature, double kd_scale, double ce_weight, int64_t ignore_index,
                           bool has_kd, bool has_ce, int64_t splits) {
  CHECK_CUDA(student);
  CHECK_CUDA(teacher);
  CHECK_CUDA(grad_scale);
  CHECK_3D_VOCAB_CONTIGUOUS(student);
  CHECK_3D_VOCAB_CONTIGUOUS(teacher);
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(), " != student shape ",
              student.sizes());
  TORCH_CHECK(teacher.device() == student.device(), "teacher and student logits must be on one device");
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1, "grad_scale must be one float32");
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t batch = student.size(0), rows_per_batch = student.size(1), vocab = student.size(2);
  const int64_t rows = batch * rows_per_batch;

  kdfast_cuda::DistillArgs args{};
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_kind = scalar_kind(student, "student_logits");
  args.teacher_kind = scalar_kind(teacher, "teacher_logits");
  TORCH_CHECK(!has_kd || kdfast_cuda::supported_pair(args.student_kind, args.teacher_kind),
              "teacher_logits must have the student's dtype or float32, got ", teacher.scalar_type(), " for ",
              student.scalar_type(), " student logits");
  args.student_stride_b = student.stride(0);
  args.student_stride_r = student.stride(1);
  args.teacher_stride_b = teacher.stride(0);
  args.teacher_stride_r = teacher.stride(1);
  if (labels.has_value()) {
    CHECK_CUDA(*labels);
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == rows,
                "labels must be a contiguous int64 tensor with one entry per row");
    args.labels = labels->data_ptr<int64_t>();
  }
  if (grad.has_value()) {
    CHECK_CUDA(*grad);
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
  args.ignore_index = ignore_index;
  args.has_kd = has_kd;
  args.has_ce = has_ce;
  int multiprocessors = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, student.get_device()) ==
                  cudaSuccess, "could not read the device's multiprocessor count");
  args.splits = splits > 0 ? static_cast<int>(splits) : kdfast_cuda::choose_splits(rows, vocab, multiprocessors);
  at::Tensor workspace;
  if (args.splits > 1) {
    workspace = at::empty({kdfast_cuda::workspace_floats(rows, args.splits)}, loss_rows.options());
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t error = kdfast_cuda::launch_distill(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "kdfast CUDA kernel launch failed: ", cudaGetErrorString(error));
  return loss_rows;
}

}  // namespace

TORCH_LIBRARY(kdfast_cuda, m) {
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor(a!)? grad, "
      "int divergence, float beta, float temperature, float kd_scale, float ce_weight, int ignore_index, "
      "bool has_kd, bool has_ce, int splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast_cuda, CUDA, m) { m.impl("distill_forward", &distill_forward); }
