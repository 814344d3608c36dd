// Instantiates the dense, the mixed and the sparse row kernels for bf16 student logits (teacher: bf16 or float32).
#include "row_launchers.cuh"
#include "sparse_rows.cuh"

namespace kdfast_cuda {
cudaError_t launch_student_bf16(const Launch& launch, cudaStream_t stream) {
  return launch_student<__nv_bfloat16>(launch, stream);
}
cudaError_t launch_mixture_bf16(const Launch& launch, cudaStream_t stream) {
  return launch_mixture_student<__nv_bfloat16>(launch, stream);
}
cudaError_t launch_sparse_bf16(const Launch& launch, cudaStream_t stream) {
  return launch_sparse_student<__nv_bfloat16>(launch, stream);
}
}  // namespace kdfast_cuda
