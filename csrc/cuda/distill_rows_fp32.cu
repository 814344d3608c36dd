// Instantiates the dense, the mixed and the sparse row kernels for fp32 student logits (teacher: fp32 or float32).
#include "row_launchers.cuh"
#include "sparse_rows.cuh"

namespace kdfast_cuda {
cudaError_t launch_student_fp32(const Launch& launch, cudaStream_t stream) {
  return launch_student<float>(launch, stream);
}
cudaError_t launch_mixture_fp32(const Launch& launch, cudaStream_t stream) {
  return launch_mixture_student<float>(launch, stream);
}
cudaError_t launch_sparse_fp32(const Launch& launch, cudaStream_t stream) {
  return launch_sparse_student<float>(launch, stream);
}
}  // namespace kdfast_cuda
