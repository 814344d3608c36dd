// Several teachers as the CUDA row kernels' teacher (docs/DESIGN.md, "Several teachers"): M rows of the student's
// dtype and one layout, mixed at each read into T * log p_bar, the logits whose softmax at T is
// p_bar = sum_m w_m softmax(t_m / T), so that the single teacher's passes, divergences and guards run on it unchanged.
//   pre-pass  one block per (row, teacher): ref_m (the row's max; 0 when it is not finite) and
//             log2 w_m - log2 z_m with z_m = sum_j 2^((t_mj - ref_m) k), into the workspace [rows, M, 2]; -inf for
//             a teacher that adds nothing to the row (weight 0, or no finite max: the C++ and Triton kernels drop it
//             too), whose row the reads below then never load
//   each read y_m = (t_mj - ref_m) k + log2 w_m - log2 z_m, and log2 p_bar = a running log-sum-exp2 over m (one
//             exp2 per teacher, never the log of an underflowed sum), handed over as log2 p_bar / k
// No [rows, V] mixture is written: each pass of the row kernel reads the M rows again, as the Triton kernel does.
#pragma once

#include "distill_kernel.h"
#include "distill_math.cuh"

namespace kdfast_cuda {

// The teacher template argument of the mixing instantiations: rows of `T`, mixed.
template <typename T>
struct Mixed {
  using Element = T;
};

template <typename T>
constexpr bool kIsMixed = false;
template <typename T>
constexpr bool kIsMixed<Mixed<T>> = true;

// One row of the mixed teachers, as a kernel's passes read it.
template <typename T>
struct MixedRow {
  const T* const* rows;  // the M teachers' data: a device array (DistillArgs::mix_teachers)
  int64_t offset;        // this row's element offset, the same in every teacher (they share strides)
  const float* stats;    // [M, 2] from the pre-pass
  int count;
  float k, inv_k;  // log2(e) / T and T ln 2
};

// How a row kernel holds its teacher's row: a pointer, or the mixed teachers'.
template <typename T>
struct TeacherRowOf {
  using type = const T*;
};
template <typename T>
struct TeacherRowOf<Mixed<T>> {
  using type = MixedRow<T>;
};

template <typename T>
__device__ __forceinline__ MixedRow<T> mixed_row(const DistillArgs& a, float k, int64_t row, int64_t offset) {
  return MixedRow<T>{reinterpret_cast<const T* const*>(a.mix_teachers), offset, a.workspace + row * a.mix_count * 2,
                     static_cast<int>(a.mix_count), k, 1.0f / k};
}

// Every counted teacher's row 16-byte aligned: the passes may read 8-element vectors.
template <typename T>
__device__ __forceinline__ bool aligned_rows(const MixedRow<T>& t) {
  bool aligned = true;
  for (int m = 0; m < t.count; ++m) aligned &= (reinterpret_cast<uintptr_t>(t.rows[m] + t.offset) & 15u) == 0;
  return aligned;
}

// One step of a running sum of 2^((x - hi) k) with its max hi (in x's units, so that a large logit is never scaled
// before the max is taken off): one exp2 per step, never -inf - -inf, and a NaN x sticks in the sum.
__device__ __forceinline__ void add_to_log_sum(float x, float k, float& hi, float& sum) {
  const float top = fmaxf(hi, x);
  const float e = top == kNegInf ? 0.0f : fast_exp2((fminf(hi, x) - top) * k);
  sum = x != x ? x : (x > hi ? fmaf(sum, e, 1.0f) : sum + e);
  hi = top;
}

// sum * 2^((hi - top) k): a part re-expressed under a larger max; an empty part (hi = -inf) is 0, a NaN kept.
__device__ __forceinline__ float rescaled_sum(float sum, float hi, float top, float k) {
  return hi == kNegInf && sum == sum ? 0.0f : sum * fast_exp2((hi - top) * k);
}

// The mixture's logits T * log p_bar at N consecutive columns (-inf where no teacher has mass).
template <typename T, int N>
__device__ __forceinline__ void mixed_values(const MixedRow<T>& t, int64_t col, float (&out)[N]) {
  float hi[N], sum[N];
#pragma unroll
  for (int i = 0; i < N; ++i) hi[i] = kNegInf, sum[i] = 0.0f;
  for (int m = 0; m < t.count; ++m) {
    const float log2_scale = t.stats[2 * m + 1];
    if (log2_scale == kNegInf) continue;  // the same in the whole block: no divergence, and no load
    const float ref = t.stats[2 * m];
    const T* row = t.rows[m] + t.offset + col;
    float x[N];
    if constexpr (N == 8) {
      load8(row, x);
    } else {
      x[0] = load1(row);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) add_to_log_sum((x[i] - ref) * t.k + log2_scale, 1.0f, hi[i], sum[i]);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = sum[i] == 0.0f ? kNegInf : (hi[i] + fast_log2(sum[i])) * t.inv_k;
}

// A teacher's N elements at `col`: a single teacher's row, or the mixture's.
template <typename T>
__device__ __forceinline__ void load_teacher8(const T* t, int64_t col, float (&out)[8]) {
  load8(t + col, out);
}
template <typename T>
__device__ __forceinline__ float load_teacher1(const T* t, int64_t col) {
  return load1(t + col);
}
template <typename T>
__device__ __forceinline__ void load_teacher8(const MixedRow<T>& t, int64_t col, float (&out)[8]) {
  mixed_values<T, 8>(t, col, out);
}
template <typename T>
__device__ __forceinline__ float load_teacher1(const MixedRow<T>& t, int64_t col) {
  float out[1];
  mixed_values<T, 1>(t, col, out);
  return out[0];
}

// The pre-pass: blockIdx.x the row, blockIdx.y the teacher; k = log2(e) / T.
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) mixture_prepass_kernel(const DistillArgs a, float k) {
  __shared__ float2 scratch[THREADS / 32];
  const int64_t row = blockIdx.x;
  const int m = blockIdx.y;
  float* out = a.workspace + (row * a.mix_count + m) * 2;
  const float log_weight = a.mix_log_weights[row * a.mix_weights_stride + m];
  if (log_weight == kNegInf) {  // routed away: its row is not read
    if (threadIdx.x == 0) out[0] = 0.0f, out[1] = kNegInf;
    return;
  }
  const T* t = reinterpret_cast<const T* const*>(a.mix_teachers)[m] + (row / a.rows_per_batch) * a.teacher_stride_b +
               (row % a.rows_per_batch) * a.teacher_stride_r;
  float hi = kNegInf, sum = 0.0f;
  const int64_t vectors = (reinterpret_cast<uintptr_t>(t) & 15u) == 0 ? a.vocab / 8 : 0;
  for (int64_t i = threadIdx.x; i < vectors; i += THREADS) {
    float x[8];
    load8(t + 8 * i, x);
#pragma unroll
    for (int j = 0; j < 8; ++j) add_to_log_sum(x[j], k, hi, sum);
  }
  for (int64_t col = 8 * vectors + threadIdx.x; col < a.vocab; col += THREADS) add_to_log_sum(load1(t + col), k, hi, sum);
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    const float other_hi = __shfl_xor_sync(0xffffffffu, hi, mask), other_sum = __shfl_xor_sync(0xffffffffu, sum, mask);
    const float top = fmaxf(hi, other_hi);
    sum = rescaled_sum(sum, hi, top, k) + rescaled_sum(other_sum, other_hi, top, k);
    hi = top;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = make_float2(hi, sum);
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < THREADS / 32; ++w) {
    const float top = fmaxf(hi, scratch[w].x);
    sum = rescaled_sum(sum, hi, top, k) + rescaled_sum(scratch[w].y, scratch[w].x, top, k);
    hi = top;
  }
  const bool counts = hi != kNegInf && hi != -kNegInf;  // no mass, or an infinite logit: the teacher adds nothing
  out[0] = counts ? hi : 0.0f;
  out[1] = counts ? log_weight * kLog2e - fast_log2(sum) : kNegInf;
}

}  // namespace kdfast_cuda
