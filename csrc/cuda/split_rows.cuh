// A few long rows (FUSED, splits > 1): distill_rows.cuh's passes as three kernels over vocab ranges, whose
// blocks exchange their partial statistics through a small workspace (kWorkspaceStats + kWorkspaceTerms floats
// per range).
#pragma once

#include "distill_rows.cuh"

namespace kdfast_cuda {

// ---- FUSED, several blocks per row: vocab ranges of 8-element multiples ----
struct Split {
  int64_t row, begin, end;
  int index;
};

__device__ __forceinline__ Split block_split(const DistillArgs& a, int splits) {
  Split sp;
  sp.row = blockIdx.x / splits;
  sp.index = static_cast<int>(blockIdx.x % splits);
  const int64_t span = ((a.vocab + splits - 1) / splits + 7) / 8 * 8;
  sp.begin = min(a.vocab, sp.index * span);
  sp.end = min(a.vocab, sp.begin + span);
  return sp;
}

template <int MODE>
__device__ __forceinline__ Stats merged_split_stats(const Launch& L, int64_t row) {
  const float* ws = L.a.workspace + row * L.a.splits * kWorkspaceStats;
  Stats total = empty_stats();
  for (int i = 0; i < L.a.splits; ++i, ws += kWorkspaceStats) {
    total = merge<MODE>(total, Stats{ws[0], ws[1], ws[2], ws[3], ws[4], ws[5], ws[6], ws[7], ws[8]}, L.k,
                        L.ce_stats);
  }
  return total;
}

// Label smoothing over a split row: each range's sum of s - its own max (workspace), moved to the row's max.
__device__ __forceinline__ float split_shifted_sum(const Launch& L, int64_t row, float ref) {
  const DistillArgs& a = L.a;
  const float* ws = a.workspace + row * a.splits * kWorkspaceStats;
  const int64_t span = ((a.vocab + a.splits - 1) / a.splits + 7) / 8 * 8;
  float total = 0.0f;
  for (int i = 0; i < a.splits; ++i, ws += kWorkspaceStats) {
    const int64_t begin = min(a.vocab, i * span), count = min(a.vocab, begin + span) - begin;
    if (count > 0) total += ws[kStatsFloats + 1] + static_cast<float>(count) * (safe_ref(ws[0]) - ref);
  }
  return total;
}

template <typename S, typename T, int MODE>
__global__ void __launch_bounds__(kThreads) distill_split_stats_kernel(const Launch L) {
  __shared__ Stats stats_scratch[kThreads / 32];
  __shared__ float2 sum_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const Split sp = block_split(a, a.splits);
  const RowLabel lab = row_label(a, sp.row);
  if (!lab.keep) return;
  const RowPointers<S, T> p = row_pointers<S, T>(L, sp.row);
  const Stats st = range_stats<MODE>(L, p, sp.begin, sp.end, stats_scratch);
  // Label smoothing: this range's sum of s - its own max, read before the gradient kernel may overwrite it.
  const float range_sum =
      smoothing(a) ? range_shifted_sum(p, safe_ref(st.m_s), sp.begin, sp.end, sum_scratch) : 0.0f;
  if (threadIdx.x == 0) {
    a.workspace[(sp.row * a.splits + sp.index) * kWorkspaceStats + kStatsFloats + 1] = range_sum;
    float* ws = a.workspace + (sp.row * a.splits + sp.index) * kWorkspaceStats;
    ws[0] = st.m_s, ws[1] = st.z_s, ws[2] = st.m_t, ws[3] = st.z_t, ws[4] = st.acc, ws[5] = st.z_c;
    ws[6] = st.t_ref, ws[7] = st.ref_col, ws[8] = st.e_d;
    // The label's logit, read here: the gradient kernel may write over the logits (inplace_backward).
    if (sp.index == 0) ws[kStatsFloats] = lab.column >= 0 ? load1(p.s + lab.column) : 0.0f;
  }
}

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) distill_split_mixture_kernel(const Launch L) {
  __shared__ float2 sum_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const Split sp = block_split(a, a.splits);
  if (!row_label(a, sp.row).keep) return;
  const RowPointers<S, T> p = row_pointers<S, T>(L, sp.row);
  const RowConstants k = row_constants<kModeMixture>(L, merged_split_stats<kModeMixture>(L, sp.row));
  const float2 sums = range_mixture_sums(L, p, k, sp.begin, sp.end, false, sum_scratch);
  if (threadIdx.x == 0) {
    float* ws = a.workspace + a.batch * a.rows_per_batch * a.splits * kWorkspaceStats +
                (sp.row * a.splits + sp.index) * kWorkspaceTerms;
    ws[0] = sums.x, ws[1] = sums.y;
  }
}

// Gradient of each range and, from range 0, the row's loss. Without a gradient it runs one block per row.
template <typename S, typename T, int MODE, bool EXTRAS>
__global__ void __launch_bounds__(kThreads) distill_split_gradient_kernel(const Launch L) {
  const DistillArgs& a = L.a;
  const Split sp = block_split(a, a.grad ? a.splits : 1);
  const RowLabel lab = row_label(a, sp.row);
  const RowPointers<S, T> p = row_pointers<S, T>(L, sp.row);
  if (!lab.keep) {
    if (p.g) range_zero(p.g, sp.begin, sp.end);
    if (sp.index == 0 && threadIdx.x < kPartColumns) a.out[sp.row * kPartColumns + threadIdx.x] = 0.0f;
    return;
  }
  const bool label_ok = lab.label_ok, in_range = lab.column >= 0;
  float2 sums = make_float2(0.0f, 0.0f);
  if (MODE == kModeMixture) {
    const float* ws = a.workspace + a.batch * a.rows_per_batch * a.splits * kWorkspaceStats +
                      sp.row * a.splits * kWorkspaceTerms;
    for (int i = 0; i < a.splits; ++i) sums.x += ws[2 * i], sums.y += ws[2 * i + 1];
  }
  const RowConstants k = row_constants<MODE>(L, merged_split_stats<MODE>(L, sp.row));
  if (sp.index == 0 && threadIdx.x == 0) {  // before the gradient pass: nothing of them stays live through it
    const float s_label = a.workspace[sp.row * a.splits * kWorkspaceStats + kStatsFloats];
    const float shifted_sum = smoothing(a) ? split_shifted_sum(L, sp.row, k.ref_s) : 0.0f;
    write_row_parts<MODE>(L, k, sums.x, label_ok, in_range, s_label, shifted_sum, a.out + sp.row * kPartColumns);
  }
  if (p.g) range_gradient<MODE, EXTRAS>(L, p, k, sums.y, lab.label, *a.grad_scale, sp.begin, sp.end, true);
}

}  // namespace kdfast_cuda
