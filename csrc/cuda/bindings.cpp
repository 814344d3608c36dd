// Thin bindings: the shared packing (csrc/common/pack_args.h), the workspace, the current stream.
// Slim headers (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS and cuSPARSE): g++ -fsyntax-only checks
// this file on machines with the CUDA runtime headers alone.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/pack_args.h"
#include "distill_kernel.h"

namespace {

at::Tensor distill_forward(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                           const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& row_stats,
                           const std::optional<at::Tensor>& row_totals, c10::IntArrayRef int_settings,
                           c10::ArrayRef<double> float_settings) {
  const c10::cuda::CUDAGuard device_guard(student.device());
  auto call = kdfast::pack_distill_args(student, teacher, labels, grad_scale, grad, row_stats, row_totals,
                                        int_settings, float_settings, c10::DeviceType::CUDA);
  kdfast::DistillArgs& args = call.args;
  TORCH_CHECK(!args.has_kd || kdfast_cuda::supported_pair(args.student_kind, args.teacher_kind),
              "teacher_logits must have the student's dtype or float32, got ", teacher.scalar_type(), " for ",
              student.scalar_type(), " student logits");
  const int64_t rows = args.batch * args.rows_per_batch;
  int multiprocessors = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, student.get_device()) ==
                  cudaSuccess, "could not read the device's multiprocessor count");
  // A shard's phases run one block per row; only a whole row (FUSED) is split over blocks.
  if (args.phase != kdfast::kPhaseFused) {
    args.splits = 1;
  } else if (args.splits <= 0) {
    args.splits = kdfast_cuda::choose_splits(rows, args.vocab, multiprocessors);
  }
  at::Tensor workspace;
  if (args.splits > 1) {
    workspace = at::empty({kdfast_cuda::workspace_floats(rows, args.splits)}, call.out.options());
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t error = kdfast_cuda::launch_distill(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "kdfast CUDA kernel launch failed: ", cudaGetErrorString(error));
  return call.out;
}

at::Tensor sparse_distill_forward(const at::Tensor& student, const at::Tensor& teacher_ids,
                                  const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
                                  const at::Tensor& grad_scale, const std::optional<at::Tensor>& grad,
                                  const std::optional<at::Tensor>& row_stats,
                                  const std::optional<at::Tensor>& row_totals, c10::IntArrayRef int_settings,
                                  c10::ArrayRef<double> float_settings) {
  const c10::cuda::CUDAGuard device_guard(student.device());
  TORCH_CHECK(teacher_logprobs.scalar_type() == at::kFloat, "the CUDA sparse kernel takes float32 teacher_logprobs");
  auto call = kdfast::pack_sparse_args(student, teacher_ids, teacher_logprobs, labels, grad_scale, grad, row_stats,
                                       row_totals, int_settings, float_settings, c10::DeviceType::CUDA);
  kdfast::DistillArgs& args = call.args;
  const int64_t rows = args.batch * args.rows_per_batch;
  at::Tensor workspace = at::empty({kdfast_cuda::sparse_workspace_floats(rows, args.topk)}, call.out.options());
  args.workspace = workspace.data_ptr<float>();
  const cudaError_t error = kdfast_cuda::launch_sparse(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "kdfast CUDA kernel launch failed: ", cudaGetErrorString(error));
  return call.out;
}

}  // namespace

TORCH_LIBRARY(kdfast_cuda, m) {
  m.def(kdfast::kDistillForwardSchema);
  m.def(kdfast::kSparseDistillForwardSchema);
}

TORCH_LIBRARY_IMPL(kdfast_cuda, CUDA, m) {
  m.impl("distill_forward", &distill_forward);
  m.impl("sparse_distill_forward", &sparse_distill_forward);
}
