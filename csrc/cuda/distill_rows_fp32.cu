// Instantiates the row kernels for fp32 student logits (teacher: fp32 or float32).
#include "distill_rows.cuh"

namespace kdfast_cuda {
cudaError_t launch_student_fp32(const Launch& launch, cudaStream_t stream) {
  return launch_student<float>(launch, stream);
}
}  // namespace kdfast_cuda
