// The entropy of the softmax over each row's k largest logits, EAFT's factor (kdfast/token_scaling.py), without
// sorting the row: torch.topk took 57 ms of an EAFT cross-entropy's 126 at 2048 x 32000 fp32 on two AVX2 threads.
// No torch headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

// -sum_i p_i log p_i over the row's k largest values x_(1..k) (ties: equal values, so any of them), p = softmax of
// those k, in double from the float values; `top` is scratch for k floats. k <= width.
float topk_entropy_row(const float* x, int64_t width, int64_t k, float* top);

}  // namespace kdfast_cpu
