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
  KDFAST_CHECK(!args.has_kd || kdfast_cuda::supported_pair(args.student_kind, args.teacher_kind),
               "teacher_logits must have the student's dtype or float32, got ", teacher.scalar_type(), " for ",
               student.scalar_type(), " student logits");
  const int64_t rows = args.batch * args.rows_per_batch;
  int multiprocessors = 0;
  KDFAST_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, student.get_device()) ==
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
  KDFAST_CHECK(error == cudaSuccess, "kdfast CUDA kernel launch failed: ", cudaGetErrorString(error));
  return call.out;
}

// Several teachers of the student's dtype mixed in the kernel (mixed_teachers.cuh): the M data pointers go to the
// device as a table (a copy of M * 8 bytes that does not wait for the stream), the pre-pass's [rows, M, 2] into the
// workspace; one block per row.
at::Tensor mixture_distill_forward(const at::Tensor& student, at::TensorList teachers, const at::Tensor& log_weights,
                                   const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                   const std::optional<at::Tensor>& grad,
                                   const std::optional<at::Tensor>& teacher_divergences, c10::IntArrayRef int_settings,
                                   c10::ArrayRef<double> float_settings) {
  const c10::cuda::CUDAGuard device_guard(student.device());
  std::vector<const void*> teacher_rows;
  auto call = kdfast::pack_mixture_args(student, teachers, log_weights, labels, grad_scale, grad, teacher_divergences,
                                        int_settings, float_settings, c10::DeviceType::CUDA, teacher_rows);
  kdfast::DistillArgs& args = call.args;
  KDFAST_CHECK(args.has_kd, "mixture_distill_forward mixes teachers for a divergence (kd_weight 0 needs none)");
  KDFAST_CHECK(!teacher_divergences.has_value(), "the CUDA mixing kernel does not write each teacher's divergence");
  KDFAST_CHECK(args.teacher_kind == args.student_kind, "the CUDA mixing kernel reads teachers of the student's dtype ",
               student.scalar_type(), ", got ", teachers[0].scalar_type());
  const at::Tensor addresses = at::empty({args.mix_count}, at::TensorOptions().dtype(at::kLong));
  int64_t* address = addresses.data_ptr<int64_t>();
  for (const void* data : teacher_rows) *address++ = reinterpret_cast<int64_t>(data);
  const at::Tensor table = addresses.to(student.options().dtype(at::kLong), /*non_blocking=*/true);
  const int64_t rows = args.batch * args.rows_per_batch;
  const at::Tensor workspace =
      at::empty({kdfast_cuda::mixture_workspace_floats(rows, args.mix_count)}, call.out.options());
  args.mix_teachers = reinterpret_cast<const void* const*>(table.data_ptr<int64_t>());
  args.workspace = workspace.data_ptr<float>();
  args.splits = 1;
  const cudaError_t error = kdfast_cuda::launch_distill(args, c10::cuda::getCurrentCUDAStream());
  KDFAST_CHECK(error == cudaSuccess, "kdfast CUDA kernel launch failed: ", cudaGetErrorString(error));
  return call.out;
}

at::Tensor sparse_distill_forward(const at::Tensor& student, const at::Tensor& teacher_ids,
                                  const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
                                  const at::Tensor& grad_scale, const std::optional<at::Tensor>& grad,
                                  const std::optional<at::Tensor>& row_stats,
                                  const std::optional<at::Tensor>& row_totals, c10::IntArrayRef int_settings,
                                  c10::ArrayRef<double> float_settings) {
  const c10::cuda::CUDAGuard device_guard(student.device());
  KDFAST_CHECK(teacher_logprobs.scalar_type() == at::kFloat, "the CUDA sparse kernel takes float32 teacher_logprobs");
  auto call = kdfast::pack_sparse_args(student, teacher_ids, teacher_logprobs, labels, grad_scale, grad, row_stats,
                                       row_totals, int_settings, float_settings, c10::DeviceType::CUDA);
  kdfast::DistillArgs& args = call.args;
  const int64_t rows = args.batch * args.rows_per_batch;
  at::Tensor workspace = at::empty({kdfast_cuda::sparse_workspace_floats(rows, args.topk)}, call.out.options());
  args.workspace = workspace.data_ptr<float>();
  const cudaError_t error = kdfast_cuda::launch_sparse(args, c10::cuda::getCurrentCUDAStream());
  KDFAST_CHECK(error == cudaSuccess, "kdfast CUDA kernel launch failed: ", cudaGetErrorString(error));
  return call.out;
}

}  // namespace

TORCH_LIBRARY(kdfast_cuda, m) {
  m.def(kdfast::kDistillForwardSchema);
  m.def(kdfast::kSparseDistillForwardSchema);
  m.def(kdfast::kMixtureDistillForwardSchema);
}

TORCH_LIBRARY_IMPL(kdfast_cuda, CUDA, m) {
  m.impl("distill_forward", &distill_forward);
  m.impl("sparse_distill_forward", &sparse_distill_forward);
  m.impl("mixture_distill_forward", &mixture_distill_forward);
}
