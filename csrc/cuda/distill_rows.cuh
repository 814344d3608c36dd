// The distillation row kernels, templated on the student and teacher element types and the mode; each
// distill_rows_<dtype>.cu instantiates one student type (so ninja compiles them in parallel).
//
// One block per row (distill_row_kernel) when rows fill the GPU:
//   pass 1  statistics (and forward/reverse KL from the centred sum)        read 2 x row
//   pass 2  mixtures only (JSD, skews): loss terms and U = sum u             read 2 x row
//   last    the gradient, written over a fresh buffer or the logits          read 2 x row, write 1 x row
// Forward KL in bf16 moves 2 + 2 + 2 + 2 + 2 = 10 bytes per element. The last pass runs in the opposite
// direction to the pass before it, so it starts on the part of the row that is still in L2.
// Few long rows (splits > 1): the same passes as three kernels over vocab ranges, whose blocks exchange
// their partial statistics through a small workspace [rows, splits, 10] floats.
#pragma once

#include <type_traits>

#include "distill_kernel.h"
#include "distill_math.cuh"

namespace kdfast_cuda {

constexpr int kThreads = 256;
constexpr int kWorkspaceStats = kStatsFloats + 1;  // Stats + the student's logit at the label
constexpr int kWorkspaceTerms = 2;  // mixtures: sum of loss terms, U

struct Launch {
  DistillArgs a;
  float k;             // log2(e) / T: exponents are (x - max) * k (T = 1 without KD)
  float log2_beta, log2_1m_beta;
  int ce_stats;        // CeStats
};

template <typename S, typename T>
struct RowPointers {
  const S* s;
  const T* t;
  S* g;
  bool vector_ok;  // every row pointer 16-byte aligned: 8-element vector accesses
};

template <typename S, typename T>
__device__ __forceinline__ RowPointers<S, T> row_pointers(const Launch& L, int64_t row) {
  const DistillArgs& a = L.a;
  const int64_t b = row / a.rows_per_batch, r = row % a.rows_per_batch;
  RowPointers<S, T> p;
  p.s = static_cast<const S*>(a.student) + b * a.student_stride_b + r * a.student_stride_r;
  p.t = static_cast<const T*>(a.teacher) + b * a.teacher_stride_b + r * a.teacher_stride_r;
  p.g = a.grad ? static_cast<S*>(a.grad) + b * a.grad_stride_b + r * a.grad_stride_r : nullptr;
  const auto misaligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) != 0; };
  p.vector_ok = !misaligned(p.s) && !(a.has_kd && misaligned(p.t)) && !(p.g && misaligned(p.g));
  return p;
}

// Calls fn(col, s[N], t[N]) over [begin, end) with each thread's share: 8-element vectors (two in flight
// per thread), then single elements for the ragged end (or everything, when the row is misaligned).
template <bool KD, typename S, typename T, typename Fn>
__device__ __forceinline__ void for_each_block_of_row(const RowPointers<S, T>& p, int64_t begin, int64_t end,
                                                      bool reverse, Fn&& fn) {
  const int64_t vectors = p.vector_ok ? (end - begin) / 8 : 0;
  for (int64_t i = threadIdx.x; i < vectors; i += 2 * kThreads) {
    const int64_t i1 = i + kThreads;
    const bool second = i1 < vectors;
    const int64_t c0 = begin + 8 * (reverse ? vectors - 1 - i : i);
    const int64_t c1 = begin + 8 * (reverse ? vectors - 1 - i1 : i1);
    float s0[8], t0[8] = {}, s1[8], t1[8] = {};
    load8(p.s + c0, s0);
    if (KD) load8(p.t + c0, t0);
    if (second) {
      load8(p.s + c1, s1);
      if (KD) load8(p.t + c1, t1);
    }
    fn(c0, s0, t0);
    if (second) fn(c1, s1, t1);
  }
  for (int64_t col = begin + 8 * vectors + threadIdx.x; col < end; col += kThreads) {
    float s1[1] = {load1(p.s + col)}, t1[1] = {KD ? load1(p.t + col) : 0.0f};
    fn(col, s1, t1);
  }
}

// The element count N of the float (&)[N] a traversal hands its callback.
template <typename A>
constexpr int kLanesOf = static_cast<int>(std::extent<std::remove_reference_t<A>>::value);

// ---- pass 1: each thread's running statistics over [begin, end), merged over the block ----
template <int MODE, typename S, typename T>
__device__ Stats range_stats(const Launch& L, const RowPointers<S, T>& p, int64_t begin, int64_t end,
                             Stats* scratch) {
  Stats st = empty_stats();
  const float k = L.k;
  const int ce_stats = L.ce_stats;
  for_each_block_of_row<MODE != kModeCeOnly>(p, begin, end, false, [&](int64_t, auto& s, auto& t) {
    accumulate<MODE, kLanesOf<decltype(s)>>(st, s, t, k, ce_stats);
  });
  return block_merge<MODE, kThreads>(st, scratch, k, ce_stats);
}

// Per-row constants from the merged statistics. log2 q_j = (s_j - ref_s) * k - log2_z_s, and alike for p.
struct RowConstants {
  float ref_s, ref_t;  // the maxima, in logit units
  float log2_z_s, log2_z_t, log2_z_c;
  float squared_ce;    // kCeSquared: softmax(s)_j = q_j^2 * squared_ce
  float closed_kd;     // forward / reverse KL, from the centred sum
};

template <int MODE>
__device__ __forceinline__ RowConstants row_constants(const Stats& st, int ce_stats) {
  RowConstants k;
  k.ref_s = safe_ref(st.m_s);
  k.ref_t = safe_ref(st.m_t);
  k.log2_z_s = log2f(st.z_s);
  k.log2_z_t = log2f(st.z_t);
  k.log2_z_c = ce_stats == kCeShared ? k.log2_z_s : log2f(st.z_c);
  k.squared_ce = exp2f(2.0f * k.log2_z_s - k.log2_z_c);
  k.closed_kd = 0.0f;
  if (MODE == kModeForwardKL) k.closed_kd = kLn2 * (st.acc / st.z_t - k.log2_z_t + k.log2_z_s);
  if (MODE == kModeReverseKL) k.closed_kd = kLn2 * (st.acc / st.z_s - k.log2_z_s + k.log2_z_t);
  return k;
}

// JSD and the skews: the element's loss term and u = q * dL/dq (natural units), from base-2 log-probs.
__device__ __forceinline__ void mixture_terms(int divergence, float beta, float log2_beta, float log2_1m_beta,
                                              float lq, float lp, float q, float p, float& term, float& u) {
  if (divergence == kJSD) {
    const float lm = log2_add_exp2(lp + log2_beta, lq + log2_1m_beta);
    const float q_term = kLn2 * weighted(q, lq - lm);
    term = beta * kLn2 * weighted(p, lp - lm) + (1.0f - beta) * q_term;
    u = (1.0f - beta) * q_term;
  } else if (divergence == kSkewForwardKL) {  // KL(p || b p + (1 - b) q)
    const float lm = log2_add_exp2(lp + log2_beta, lq + log2_1m_beta);
    term = kLn2 * weighted(p, lp - lm);
    // q * p / m in log space: q may underflow where p / m is huge (beta = 0: m = q).
    u = lm == kNegInf ? 0.0f : -(1.0f - beta) * fast_exp2(lq + lp - lm);
  } else {  // skew reverse KL: KL(q || (1 - b) p + b q)
    const float lm = log2_add_exp2(lq + log2_beta, lp + log2_1m_beta);
    term = kLn2 * weighted(q, lq - lm);
    u = weighted(q, kLn2 * (lq - lm) - fast_exp2(lq - lm + log2_beta));
  }
}

// ---- pass 2 (mixtures): sum of terms and U over [begin, end), summed over the block ----
template <typename S, typename T>
__device__ float2 range_mixture_sums(const Launch& L, const RowPointers<S, T>& p, const RowConstants& k,
                                     int64_t begin, int64_t end, bool reverse, float2* scratch) {
  float2 acc = make_float2(0.0f, 0.0f);
  const DistillArgs& a = L.a;
  for_each_block_of_row<true>(p, begin, end, reverse, [&](int64_t, auto& s, auto& t) {
    constexpr int N = kLanesOf<decltype(s)>;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float lq = (s[i] - k.ref_s) * L.k - k.log2_z_s, lp = (t[i] - k.ref_t) * L.k - k.log2_z_t;
      float term, u;
      mixture_terms(a.divergence, a.beta, L.log2_beta, L.log2_1m_beta, lq, lp, fast_exp2(lq), fast_exp2(lp), term, u);
      acc.x += term;
      acc.y += u;
    }
  });
  return block_sum2<kThreads>(acc, scratch);
}

// ---- last pass: the gradient over [begin, end) ----
// (kd_scale / T) * dL/da + ce_weight * (softmax(s) - onehot(label)), times the reduction's scale.
template <int MODE, typename S, typename T>
__device__ void range_gradient(const Launch& L, const RowPointers<S, T>& p, const RowConstants& k, float u_sum,
                               int64_t label, float row_scale, int64_t begin, int64_t end, bool reverse) {
  const DistillArgs& a = L.a;
  const float kd_coef = row_scale * a.kd_scale * a.inv_temperature;
  const float ce_coef = a.has_ce ? row_scale * a.ce_weight : 0.0f;
  const int ce_stats = L.ce_stats;
  for_each_block_of_row<MODE != kModeCeOnly>(p, begin, end, reverse, [&](int64_t col, auto& s, auto& t) {
    constexpr int N = kLanesOf<decltype(s)>;
    float g[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float lq = (s[i] - k.ref_s) * L.k - k.log2_z_s;
      const float q = fast_exp2(lq);
      const float lp = (t[i] - k.ref_t) * L.k - k.log2_z_t;
      float grad_kd = 0.0f;
      if (MODE == kModeForwardKL) grad_kd = q - fast_exp2(lp);
      if (MODE == kModeReverseKL) grad_kd = weighted(q, kLn2 * (lq - lp) - k.closed_kd);
      if (MODE == kModeMixture) {
        float term, u;
        mixture_terms(a.divergence, a.beta, L.log2_beta, L.log2_1m_beta, lq, lp, q, fast_exp2(lp), term, u);
        grad_kd = u - q * u_sum;
      }
      g[i] = kd_coef * grad_kd;
      if (ce_stats != kCeNone) {
        float ce_prob = q;
        if (ce_stats == kCeSquared) ce_prob = q * q * k.squared_ce;
        if (ce_stats == kCeOwn) ce_prob = fast_exp2((s[i] - k.ref_s) * kLog2e - k.log2_z_c);
        g[i] += ce_coef * (ce_prob - (col + i == label ? 1.0f : 0.0f));
      }
    }
    if constexpr (N == 8) {
      store8(p.g + col, g);
    } else {
      store1(p.g + col, g[0]);
    }
  });
}

template <typename S>
__device__ void range_zero(S* g, int64_t begin, int64_t end) {
  for (int64_t col = begin + threadIdx.x; col < end; col += kThreads) store1(g + col, 0.0f);
}

template <int MODE>
__device__ __forceinline__ float row_loss(const Launch& L, const RowConstants& k, float mixture_kd, bool label_ok,
                                          float s_label) {
  const DistillArgs& a = L.a;
  float loss = 0.0f;
  if (MODE != kModeCeOnly) loss += a.kd_scale * (MODE == kModeMixture ? mixture_kd : k.closed_kd);
  // Out-of-range labels are refused on the host where that costs no sync; here they poison the row.
  // log sum exp(s) - s_label = (max - s_label) + ln z_c, the difference taken first (|s| may be ~1e3).
  if (a.has_ce) {
    loss += a.ce_weight * (label_ok ? (k.ref_s - s_label) + kLn2 * k.log2_z_c : __int_as_float(0x7fc00000));
  }
  return loss;
}

struct RowLabel {
  int64_t label;
  bool keep, label_ok;
};

__device__ __forceinline__ RowLabel row_label(const DistillArgs& a, int64_t row) {
  RowLabel r{-1, true, false};
  if (a.labels) {
    r.label = a.labels[row];
    r.keep = r.label != a.ignore_index;
    r.label_ok = r.label >= 0 && r.label < a.vocab;
  }
  return r;
}

// ---- one block per row ----
template <typename S, typename T, int MODE>
__global__ void __launch_bounds__(kThreads) distill_row_kernel(const Launch L) {
  __shared__ Stats stats_scratch[kThreads / 32];
  __shared__ float2 sum_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const int64_t row = blockIdx.x;
  const RowPointers<S, T> p = row_pointers<S, T>(L, row);
  const RowLabel lab = row_label(a, row);
  if (!lab.keep) {
    if (p.g) range_zero(p.g, 0, a.vocab);
    if (threadIdx.x == 0) a.loss_rows[row] = 0.0f;
    return;
  }
  // Read before any thread writes the gradient over the logits (inplace_backward); the barriers in the
  // reductions below order it before those writes.
  const float s_label = (a.has_ce && lab.label_ok && threadIdx.x == 0) ? load1(p.s + lab.label) : 0.0f;
  const Stats st = range_stats<MODE>(L, p, 0, a.vocab, stats_scratch);
  const RowConstants k = row_constants<MODE>(st, L.ce_stats);
  float2 sums = make_float2(0.0f, 0.0f);
  if (MODE == kModeMixture) sums = range_mixture_sums(L, p, k, 0, a.vocab, true, sum_scratch);
  if (p.g) {
    const float row_scale = *a.grad_scale;
    range_gradient<MODE>(L, p, k, sums.y, lab.label, row_scale, 0, a.vocab, MODE != kModeMixture);
  }
  if (threadIdx.x == 0) a.loss_rows[row] = row_loss<MODE>(L, k, sums.x, lab.label_ok, s_label);
}

// ---- several blocks per row: vocab ranges of 8-element multiples ----
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
    total = merge<MODE>(total, Stats{ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]}, L.k, L.ce_stats);
  }
  return total;
}

template <typename S, typename T, int MODE>
__global__ void __launch_bounds__(kThreads) distill_split_stats_kernel(const Launch L) {
  __shared__ Stats stats_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const Split sp = block_split(a, a.splits);
  const RowLabel lab = row_label(a, sp.row);
  if (!lab.keep) return;
  const RowPointers<S, T> p = row_pointers<S, T>(L, sp.row);
  const Stats st = range_stats<MODE>(L, p, sp.begin, sp.end, stats_scratch);
  if (threadIdx.x == 0) {
    float* ws = a.workspace + (sp.row * a.splits + sp.index) * kWorkspaceStats;
    ws[0] = st.m_s, ws[1] = st.z_s, ws[2] = st.m_t, ws[3] = st.z_t, ws[4] = st.acc, ws[5] = st.z_c;
    // The label's logit, read here: the gradient kernel may write over the logits (inplace_backward).
    if (sp.index == 0) ws[kStatsFloats] = (a.has_ce && lab.label_ok) ? load1(p.s + lab.label) : 0.0f;
  }
}

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) distill_split_mixture_kernel(const Launch L) {
  __shared__ float2 sum_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const Split sp = block_split(a, a.splits);
  if (!row_label(a, sp.row).keep) return;
  const RowPointers<S, T> p = row_pointers<S, T>(L, sp.row);
  const RowConstants k = row_constants<kModeMixture>(merged_split_stats<kModeMixture>(L, sp.row), L.ce_stats);
  const float2 sums = range_mixture_sums(L, p, k, sp.begin, sp.end, false, sum_scratch);
  if (threadIdx.x == 0) {
    float* ws = a.workspace + a.batch * a.rows_per_batch * a.splits * kWorkspaceStats +
                (sp.row * a.splits + sp.index) * kWorkspaceTerms;
    ws[0] = sums.x, ws[1] = sums.y;
  }
}

// Gradient of each range and, from range 0, the row's loss. Without a gradient it runs one block per row.
template <typename S, typename T, int MODE>
__global__ void __launch_bounds__(kThreads) distill_split_gradient_kernel(const Launch L) {
  const DistillArgs& a = L.a;
  const Split sp = block_split(a, a.grad ? a.splits : 1);
  const RowLabel lab = row_label(a, sp.row);
  const RowPointers<S, T> p = row_pointers<S, T>(L, sp.row);
  if (!lab.keep) {
    if (p.g) range_zero(p.g, sp.begin, sp.end);
    if (sp.index == 0 && threadIdx.x == 0) a.loss_rows[sp.row] = 0.0f;
    return;
  }
  const RowConstants k = row_constants<MODE>(merged_split_stats<MODE>(L, sp.row), L.ce_stats);
  float2 sums = make_float2(0.0f, 0.0f);
  if (MODE == kModeMixture) {
    const float* ws = a.workspace + a.batch * a.rows_per_batch * a.splits * kWorkspaceStats +
                      sp.row * a.splits * kWorkspaceTerms;
    for (int i = 0; i < a.splits; ++i) sums.x += ws[2 * i], sums.y += ws[2 * i + 1];
  }
  if (p.g) range_gradient<MODE>(L, p, k, sums.y, lab.label, *a.grad_scale, sp.begin, sp.end, true);
  if (sp.index == 0 && threadIdx.x == 0) {
    const float s_label = a.workspace[sp.row * a.splits * kWorkspaceStats + kStatsFloats];
    a.loss_rows[sp.row] = row_loss<MODE>(L, k, sums.x, lab.label_ok, s_label);
  }
}

template <typename S, typename T, int MODE>
cudaError_t launch_mode(const Launch& L, cudaStream_t stream) {
  const int64_t rows = L.a.batch * L.a.rows_per_batch;
  if (L.a.splits <= 1) {
    distill_row_kernel<S, T, MODE><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(L);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(rows * L.a.splits);
  distill_split_stats_kernel<S, T, MODE><<<blocks, kThreads, 0, stream>>>(L);
  if (MODE == kModeMixture) distill_split_mixture_kernel<S, T><<<blocks, kThreads, 0, stream>>>(L);
  distill_split_gradient_kernel<S, T, MODE><<<L.a.grad ? blocks : static_cast<unsigned>(rows), kThreads, 0, stream>>>(L);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t launch_pair(const Launch& L, cudaStream_t stream) {
  if (!L.a.has_kd) return launch_mode<S, S, kModeCeOnly>(L, stream);
  switch (L.a.divergence) {
    case kForwardKL: return launch_mode<S, T, kModeForwardKL>(L, stream);
    case kReverseKL: return launch_mode<S, T, kModeReverseKL>(L, stream);
    default: return launch_mode<S, T, kModeMixture>(L, stream);
  }
}

// The launcher for one student type: the teacher is the same type or float32.
template <typename S>
cudaError_t launch_student(const Launch& L, cudaStream_t stream) {
  if (L.a.has_kd && L.a.teacher_kind == ScalarKind::kFloat32 && !std::is_same<S, float>::value) {
    return launch_pair<S, float>(L, stream);
  }
  return launch_pair<S, S>(L, stream);
}

}  // namespace kdfast_cuda
