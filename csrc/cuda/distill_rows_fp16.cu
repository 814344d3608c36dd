// Instantiates the dense, the mixed and the sparse row kernels for fp16 student logits (teacher: fp16 or float32).
#include "row_launchers.cuh"
#include "sparse_rows.cuh"

namespace kdfast_cuda {
cudaError_t launch_student_fp16(const Launch& launch, cudaStream_t stream) {
  return launch_student<__half>(launch, stream);
}
cudaError_t launch_mixture_fp16(const Launch& launch, cudaStream_t stream) {
  return launch_mixture_student<__half>(launch, stream);
}
cudaError_t launch_sparse_fp16(const Launch& launch, cudaStream_t stream) {
  return launch_sparse_student<__half>(launch, stream);
}
}  // namespace kdfast_cuda
