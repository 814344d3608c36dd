// The CUDA kernel of a sparse teacher (docs/DESIGN.md, "A sparse teacher"; kdfast/sparse_math.py states the same
// math in PyTorch), one block per row, in any phase. Each row's K (id, log-prob) pairs and what the kernel derives
// from them live in a workspace of sparse_workspace_floats(rows, K) floats (global memory: K may be large).
//   groups   each entry's column's first entry (an id listed twice is two buckets of one column; K^2 / threads
//            comparisons, in the workspace), none where the held ids ascend (a vocabulary map's do): each column is
//            then held once
//   pass 0   FUSED / STATS: the row's max                                                   read row
//   pass 1   the tempered exps' sum in float64, and the same exps at the distinct ids, so that the student's mass
//            outside the ids is their difference to float64's precision; CE's sum; the entropy's  read row
//   sums     label smoothing's sum of s; SUMS: the entropy's share (it has no pass 1)       read row
//   buckets  the teacher's K + 1 buckets (its rest in float64) against the student's (threads over K; a column's
//            entries summed)
//   last     the gradient, q * factor + CE everywhere, then (after a barrier) the ids' columns  read row, write row
// SUMS and GRADIENT take the global log-sum-exps in place of passes 0 and 1; the shard at col_offset 0 adds the
// rest bucket. Everything runs in base 2 as in distill_rows.cuh; the teacher's log-probs are natural.
#pragma once

#include "distill_rows.cuh"

namespace kdfast_cuda {

template <typename T, typename Op>
__device__ T block_reduce(T v, T* scratch, Op op) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, mask));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from an earlier reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) total = op(total, scratch[w]);
  return total;
}

struct Add {
  template <typename T>
  __device__ T operator()(T x, T y) const { return x + y; }
};
struct Max {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
struct Min {
  __device__ int operator()(int x, int y) const { return min(x, y); }
};

constexpr int kIdArrays = 7;

// One of a row's per-id arrays in the workspace, whose K entries hold their kIdArrays values side by side: every
// array is then a constant offset from the row's one base pointer (folded into the loads), where K-strided arrays
// would each keep a register through the kernel.
struct IdArray {
  float* first_entry;
  __device__ __forceinline__ float& operator[](int64_t k) const { return first_entry[k * kIdArrays]; }
};

struct IdArrays {
  IdArray column;    // [K] the id's column in this call's range, or -1 (exact in float below 2^24 columns)
  IdArray logit;     // [K] the student's logit there, kept: the gradient may overwrite the logits
  IdArray log_q;     // [K] base 2
  IdArray log_p;     // [K] base 2
  IdArray gradient;  // [K] d/da at the ids' columns
  IdArray first;     // [K] 1 where the entry is the first held one of its column
  IdArray score;     // [K] the entry's own score (or P), before its column's entries are summed
};

__device__ __forceinline__ IdArrays id_arrays(float* row_workspace) {
  return IdArrays{{row_workspace}, {row_workspace + 1}, {row_workspace + 2}, {row_workspace + 3},
                  {row_workspace + 4}, {row_workspace + 5}, {row_workspace + 6}};
}

// Per entry k, the sum of `values` over the entries of its column: the first's value plus each further one's and
// `extra` (a lone entry keeps its value bit for bit; every entry of a column gets the same float). `distinct`: every
// column is held once, so the entry is its column's only one.
__device__ __forceinline__ float column_sum(const IdArrays& sh, int64_t k_count, int64_t k, const IdArray& values,
                                            float extra, bool distinct) {
  if (distinct) return values[k];
  float sum = 0.0f;
#pragma unroll 1
  for (int64_t j = 0; j < k_count; ++j) {
    if (sh.column[j] == sh.column[k]) sum += sh.first[j] != 0.0f ? values[j] : values[j] + extra;
  }
  return sum;
}

// JSD, the skews and reverse KL at one bucket: term and score (natural units) from base-2 log-probabilities.
__device__ __forceinline__ void bucket_scores(const Launch& L, int mode, float lq, float lp, float& term, float& h) {
  if (mode == kModeReverseKL) {
    term = kLn2 * weighted(fast_exp2(lq), lq - lp);
    h = kLn2 * (lq - lp);
    return;
  }
  mixture_terms(L, lq, lp, fast_exp2(lq), fast_exp2(lp), term, h);
}

// A rest below this share of the row's float64 sum is summed again over its own columns: total - (the exps at the
// ids) keeps ~1e-16 of the total, so a rest of 1e-16 cancelled to nothing and one of 1e-10 kept 4 digits.
constexpr float kExactRestBelow = 0x1p-24f;

// log2 of sum 2^((s_j - ref) k) over the columns no id holds (-inf: none), against their own max so that no exp
// underflows first: the rare row whose rest cancels in pass 1. Each column is looked up among the ids (a binary
// search where the held ids ascend, else a scan of the K); called by every thread of the block.
template <typename S>
__device__ float outside_log2_sum(const RowPointers<S, S>& p, const IdArrays& sh, int64_t k_count, bool ascend,
                                  int64_t vocab, float ref, float k, float* scratch) {
  const auto held = [&](int64_t j) {
    const float column = static_cast<float>(j);
    if (ascend) {  // held columns first, ascending; padding and other shards' ids (-1) after them
      int64_t lo = 0, hi = k_count;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        const float c = sh.column[mid];
        if (c >= 0.0f && c < column) lo = mid + 1; else hi = mid;
      }
      return lo < k_count && sh.column[lo] == column;
    }
    for (int64_t e = 0; e < k_count; ++e) {
      if (sh.column[e] == column) return true;
    }
    return false;
  };
  float top = kNegInf;
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    if (!held(j)) top = fmaxf(top, load1(p.s + j));
  }
  top = block_reduce(top, scratch, Max{});
  if (top == kNegInf) return kNegInf;
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    if (!held(j)) sum += fast_exp2((load1(p.s + j) - top) * k);
  }
  return (top - ref) * k + log2f(block_reduce(sum, scratch, Add{}));
}

// At most 64 registers (4 blocks of 256 threads a multiprocessor): left to itself ptxas trades this kernel's
// registers for occupancy by spilling.
template <typename S, int MODE>
__global__ void __launch_bounds__(kThreads, 4) sparse_row_kernel(const Launch L) {
  __shared__ double double_scratch[kThreads / 32];
  __shared__ float float_scratch[kThreads / 32];
  __shared__ int int_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  constexpr bool kKD = MODE != kModeCeOnly;
  const int64_t row = blockIdx.x, k_count = a.topk;
  const int64_t bi = row / a.rows_per_batch, ri = row % a.rows_per_batch;
  const RowPointers<S, S> p = row_pointers<S, S>(L, row);
  const int64_t* ids = a.teacher_ids + bi * a.ids_stride_b + ri * a.ids_stride_r;
  const float* logprobs = static_cast<const float*>(a.teacher_logprobs) + bi * a.logprobs_stride_b +
                          ri * a.logprobs_stride_r;
  const IdArrays sh = id_arrays(a.workspace + row * k_count * kIdArrays);

  const RowLabel lab = row_label(a, row);
  int bad = 0;
  for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
    const int64_t local = ids[k] - a.col_offset;
    const bool held = ids[k] >= 0 && local >= 0 && local < a.vocab;
    sh.column[k] = held ? static_cast<float>(local) : -1.0f;
    sh.logit[k] = held ? load1(p.s + local) : 0.0f;
    bad |= kKD && a.phase == kPhaseFused && (ids[k] < -1 || ids[k] >= a.vocab);
  }
  // Ids outside [-1, V) (refused on the host where that costs no sync) or a label outside [0, V) poison the row.
  const bool poisoned =
      lab.keep && a.phase == kPhaseFused && (__syncthreads_or(bad) || (a.ce_weight != 0.0f && !lab.label_ok));
  if (!lab.keep || poisoned) {
    if (p.g) range_zero(p.g, 0, a.vocab);
    if (threadIdx.x < kPartColumns && a.phase == kPhaseFused) {  // all but the hit NaN when poisoned
      a.out[row * kPartColumns + threadIdx.x] =
          poisoned && threadIdx.x != kPartCorrect ? __int_as_float(0x7fc00000) : 0.0f;
    }
    if (threadIdx.x < kStatColumns && (a.phase == kPhaseStats || a.phase == kPhaseSums)) {
      a.out[row * kStatColumns + threadIdx.x] = 0.0f;
    }
    return;
  }
  const bool in_range = lab.column >= 0;  // (a flag, not the 64-bit column, stays live)
  __shared__ float s_label;
  if (threadIdx.x == 0) s_label = in_range ? load1(p.s + lab.column) : 0.0f;
  __syncthreads();  // the label's logit and the ids' are read before any thread writes the gradient over the logits
  // Held ids in strictly ascending columns, padding and other shards' ids only after them (a vocabulary map's
  // ids): each column is held once and no entry looks back over the others (K^2 / 2 / threads comparisons: about
  // a million a thread at a map's K ~ 24,000, where this check takes K / threads). Kept in shared memory for the
  // column sums below, not in a register.
  __shared__ int ids_ascend;
  int out_of_order = 0;
  for (int64_t k = threadIdx.x + 1; k < k_count; k += kThreads) {
    out_of_order |= sh.column[k] >= 0.0f && !(sh.column[k - 1] >= 0.0f && sh.column[k - 1] < sh.column[k]);
  }
  const bool ascend = !__syncthreads_or(out_of_order);
  if (threadIdx.x == 0) ids_ascend = ascend;  // read after the barriers of the block reductions below
  int distinct = 0;  // this thread's share of the distinct columns the ids hold
  for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
    bool first = sh.column[k] >= 0.0f;
    for (int64_t j = 0; j < k && first && !ascend; ++j) first = sh.column[j] != sh.column[k];
    sh.first[k] = first ? 1.0f : 0.0f;
    distinct += first;
  }
  const bool covered = block_reduce(distinct, int_scratch, Add{}) == a.vocab;  // the ids hold every column: no rest
  const int ce_stats = L.ce_stats;
  // The student's entropy at the kernel's temperature (T = 1 without KD): FUSED -sum q ln q, SUMS sum q log2 q over
  // these columns. In shared memory, not a register through the passes below; thread 0 writes and reads it.
  __shared__ float row_entropy;
  float ref = 0.0f, log2_z = 0.0f, log2_z_c = 0.0f, log2_rest = kNegInf;  // log2_rest: relative to log2_z
  const bool later_phase = a.phase == kPhaseSums || a.phase == kPhaseGradient;
  if (!later_phase) {
    float m = kNegInf;
    for_each_block_of_row<false>(p, 0, a.vocab, false, [&](int64_t, auto& s, auto&) {
      constexpr int N = kLanesOf<decltype(s)>;
#pragma unroll
      for (int i = 0; i < N; ++i) m = fmaxf(m, s[i]);
    });
    ref = safe_ref(block_reduce(m, float_scratch, Max{}));
    double z = 0.0;
    float z_c = 0.0f, e_d = 0.0f;  // e_d: sum e * d, d = (s - ref) * k <= 0, for the student's entropy
    for_each_block_of_row<false>(p, 0, a.vocab, false, [&](int64_t, auto& s, auto&) {
      constexpr int N = kLanesOf<decltype(s)>;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float d = (s[i] - ref) * L.k;
        const float e = fast_exp2(d);
        z += e;
        e_d += weighted(e, d);  // a logit of -inf adds 0
        if (ce_stats == kCeSquared) z_c += e * e;
        if (ce_stats == kCeOwn) z_c += fast_exp2((s[i] - ref) * kLog2e);
      }
    });
    const double total = block_reduce(z, double_scratch, Add{});
    log2_z = log2f(static_cast<float>(total));
    log2_z_c = ce_stats == kCeShared ? log2_z : log2f(block_reduce(z_c, float_scratch, Add{}));
    if (a.phase == kPhaseFused) {
      // -sum q ln q = ln2 (log2 z - sum e d / z): both terms >= 0, nothing cancels
      const float entropy = kLn2 * (log2_z - block_reduce(e_d, float_scratch, Add{}) / static_cast<float>(total));
      if (threadIdx.x == 0) row_entropy = entropy;
    }
    if (kKD) {
      double at_ids = 0.0;  // the same exps as pass 1's, at the distinct ids
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        if (sh.first[k] != 0.0f) at_ids += fast_exp2((sh.logit[k] - ref) * L.k);
      }
      // <= 0 only by rounding where the ids hold ~everything; none where they cover the row, else floored
      const float outside = static_cast<float>(total - block_reduce(at_ids, double_scratch, Add{}));
      float log2_outside = outside > 0.0f ? log2f(outside) : kNegInf;
      if (!covered && outside < static_cast<float>(total) * kExactRestBelow) {  // the same on every thread
        log2_outside = outside_log2_sum(p, sh, k_count, ids_ascend != 0, a.vocab, ref, L.k, float_scratch);
      }
      log2_outside = fmaxf(log2_outside, kStudentRestFloorLog * kLog2e);
      log2_rest = covered ? kNegInf : log2_outside - log2_z;
    }
  } else {
    const float* lse = a.row_stats + row * kStatColumns;
    log2_z_c = lse[2] * kLog2e;
    log2_z = kKD ? lse[0] * kLog2e : log2_z_c;
    log2_rest = (lse[1] - lse[0]) * kLog2e;
    if (ce_stats == kCeShared) log2_z_c = log2_z;
  }
  if (a.phase == kPhaseStats) {
    if (threadIdx.x == 0) {
      float* out = a.out + row * kStatColumns;
      out[0] = kKD ? kLn2 * (ref * L.k + log2_z) : 0.0f;
      out[1] = kKD ? kLn2 * (ref * L.k + log2_z + log2_rest) : 0.0f;
      out[2] = a.has_ce ? kLn2 * (ref * kLog2e + log2_z_c) : 0.0f;
      out[3] = 0.0f;
    }
    return;
  }

  // Over these columns, read before the gradient may overwrite them: label smoothing's sum_j (s_j - ref) and, in
  // SUMS, the entropy's share sum_j q_j log2 q_j (ref is 0 there, log2_z the global lse). In shared memory (thread 0
  // writes the parts) rather than registers through the passes below.
  __shared__ float shifted_sum;
  const bool smooth = a.has_ce && a.label_smoothing != 0.0f && a.phase != kPhaseGradient;
  const bool sums_entropy = a.phase == kPhaseSums;
  if (smooth || sums_entropy) {
    float acc = 0.0f, q_log2_q = 0.0f;
    for_each_block_of_row<false>(p, 0, a.vocab, false, [&](int64_t, auto& s, auto&) {
      constexpr int N = kLanesOf<decltype(s)>;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (smooth) acc += s[i] - ref;
        if (sums_entropy) {
          const float lq = (s[i] - ref) * L.k - log2_z;
          q_log2_q += weighted(fast_exp2(lq), lq);  // a logit of -inf adds 0
        }
      }
    });
    if (smooth) acc = block_reduce(acc, float_scratch, Add{});
    if (sums_entropy) q_log2_q = block_reduce(q_log2_q, float_scratch, Add{});
    if (threadIdx.x == 0) {
      shifted_sum = acc;
      if (sums_entropy) row_entropy = q_log2_q;  // (FUSED's is pass 1's)
    }
  }

  // ---- the buckets ----
  float kd = 0.0f, row_d = 0.0f, rest_factor = 1.0f;
  if (kKD) {
    // The rest as a probability, at least float32's smallest normal, a constant there (kdfast/sparse_math.py,
    // floored_rest): under forward KL its P_r then leaves sum(P) and its columns get no target.
    const bool rest_floored = log2_rest <= kStudentRestFloorLog * kLog2e;
    if (log2_rest != kNegInf) log2_rest = fmaxf(log2_rest, kStudentRestFloorLog * kLog2e);
    const bool renormalize = a.tail == kTailRenormalize;
    float top = kNegInf;
    for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
      if (ids[k] >= 0) top = fmaxf(top, logprobs[k] * a.teacher_scale);
    }
    top = renormalize ? safe_ref(block_reduce(top, float_scratch, Max{})) : 0.0f;
    double mass = 0.0;  // the K probabilities' sum, float64: their rest 1 - sum must not cancel
    for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
      if (ids[k] >= 0) mass += exp(static_cast<double>(renormalize ? logprobs[k] * a.teacher_scale - top : logprobs[k]));
    }
    mass = block_reduce(mass, double_scratch, Add{});
    const float log2_shift = renormalize ? (top + static_cast<float>(log(mass))) * kLog2e : 0.0f;
    // As computed (below 0: rounding, none) or as given (kTailGiven: log-prob K), floored under reverse KL's
    // logarithm; none where no student bucket meets it (the ids cover the row: it is rounding).
    const double raw_rest = a.tail == kTailGiven ? exp(static_cast<double>(logprobs[k_count])) : 1.0 - mass;
    const double rest = MODE == kModeReverseKL ? fmax(raw_rest, kTeacherRestFloor) : raw_rest;
    const float log2_p_rest =
        (renormalize || rest <= 0.0 || log2_rest == kNegInf) ? kNegInf : static_cast<float>(log2(rest));
    for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
      const float lp = renormalize ? logprobs[k] * a.teacher_scale * kLog2e - log2_shift : logprobs[k] * kLog2e;
      sh.log_p[k] = ids[k] >= 0 ? lp : kNegInf;
      sh.log_q[k] = sh.column[k] >= 0.0f ? (sh.logit[k] - ref) * L.k - log2_z : kNegInf;
    }
    __syncthreads();
    const bool owns_rest = a.col_offset == 0;  // one shard adds the rest bucket
    const float q_rest = fast_exp2(log2_rest), p_rest = fast_exp2(log2_p_rest);
    if (MODE == kModeForwardKL) {
      // d/da_j = q_j sum(P) - P_b q_j / Q_b (sum(P) is 1 but for a renormalised row with no ids)
      float terms = 0.0f, p_sum = 0.0f;
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        const float pk = fast_exp2(sh.log_p[k]);
        sh.score[k] = pk;
        p_sum += pk;
        if (sh.column[k] >= 0.0f) terms += kLn2 * weighted(pk, sh.log_p[k] - sh.log_q[k]);
      }
      const float p_total =  // (its barrier orders sh.score)
          block_reduce(p_sum, float_scratch, Add{}) + (rest_floored ? 0.0f : p_rest);
      kd = block_reduce(terms, float_scratch, Add{}) +
           (owns_rest ? kLn2 * weighted(p_rest, log2_p_rest - log2_rest) : 0.0f);
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {  // q_j sum(P) - the P of j's entries
        if (sh.column[k] >= 0.0f) {
          sh.gradient[k] = fast_exp2(sh.log_q[k]) * p_total - column_sum(sh, k_count, k, sh.score, 0.0f, ids_ascend);
        }
      }
      rest_factor = p_total - (q_rest > 0.0f && !rest_floored ? p_rest / q_rest : 0.0f);
    } else {
      // centred on the student's largest bucket (a whole row)
      float h_ref = 0.0f, rest_term, rest_h;
      bucket_scores(L, MODE, log2_rest, log2_p_rest, rest_term, rest_h);
      int reference = -1;
      if (a.phase == kPhaseFused) {
        float largest = kNegInf;
        for (int64_t k = threadIdx.x; k < k_count; k += kThreads) largest = fmaxf(largest, sh.log_q[k]);
        largest = block_reduce(largest, float_scratch, Max{});
        int first = static_cast<int>(k_count);
        for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
          if (sh.log_q[k] == largest) first = min(first, static_cast<int>(k));
        }
        first = block_reduce(first, int_scratch, Min{});
        if (log2_rest > largest || first >= k_count) {
          h_ref = rest_h;
        } else {
          reference = first;  // its score: its column's, once summed below
        }
      }
      float terms = 0.0f, d_sum = 0.0f;
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        float term;
        bucket_scores(L, MODE, sh.log_q[k], sh.log_p[k], term, sh.score[k]);
        if (sh.column[k] >= 0.0f) terms += term;
      }
      __syncthreads();
      // A column's score: its entries' scores and, per further entry, the +1 of Q log Q the score leaves out
      // (reverse KL; the skew reverse KL's score holds its own: kdfast/sparse_math.py, SCORE_CONSTANT).
      const float extra = MODE == kModeReverseKL ? 1.0f : 0.0f;
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        if (sh.column[k] >= 0.0f) sh.gradient[k] = column_sum(sh, k_count, k, sh.score, extra, ids_ascend);
      }
      __syncthreads();
      if (reference >= 0) h_ref = sh.gradient[reference];
      rest_h = reference < 0 && a.phase == kPhaseFused ? 0.0f : rest_h - h_ref;
      __syncthreads();  // h_ref is read before the centred scores overwrite it
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        if (sh.column[k] < 0.0f) continue;
        const float h = k == reference ? 0.0f : sh.gradient[k] - h_ref;
        sh.gradient[k] = h;  // the score, until D is known
        if (sh.first[k] != 0.0f) d_sum += weighted(fast_exp2(sh.log_q[k]), h);  // D: once a column
      }
      kd = block_reduce(terms, float_scratch, Add{}) + (owns_rest ? rest_term : 0.0f);
      row_d = block_reduce(d_sum, float_scratch, Add{}) + (owns_rest ? weighted(q_rest, rest_h) : 0.0f);
      const float d = a.phase == kPhaseGradient ? a.row_totals[row * kStatColumns + 1] : row_d;
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        sh.gradient[k] = weighted(fast_exp2(sh.log_q[k]), sh.gradient[k] - d);
      }
      rest_factor = q_rest > 0.0f ? rest_h - d : 0.0f;  // no column outside the ids: unused
    }
    __syncthreads();
  }

  // ---- the row's outputs, written before the last pass so that nothing of them stays live through it ----
  if (threadIdx.x == 0) {
    // The CE target's logit relative to ref: the label's, or (1 - eps) s_label + eps / V sum s smoothed.
    const float eps = a.label_smoothing;
    float target = in_range ? s_label - ref : 0.0f;
    if (smoothing(a)) target = (1.0f - eps) * target + eps * shifted_sum / static_cast<float>(a.global_vocab);
    const bool has_entropy = kKD || a.has_ce;  // with KD, or CE alone (at T = 1); neither: 0
    if (a.phase == kPhaseFused) {
      const float lse = ref + kLn2 * log2_z_c;
      float* parts = a.out + row * kPartColumns;
      parts[kPartKd] = kKD ? kd : 0.0f;
      parts[kPartCe] = a.has_ce ? kLn2 * log2_z_c - target : 0.0f;
      parts[kPartZ] = a.has_ce && a.z_loss_weight != 0.0f ? lse * lse : 0.0f;
      parts[kPartCorrect] = in_range && s_label >= ref ? 1.0f : 0.0f;  // ref: the row's largest logit
      parts[kPartEntropy] = has_entropy ? row_entropy : 0.0f;
    } else if (a.phase == kPhaseSums) {
      float* out = a.out + row * kStatColumns;
      out[0] = kd, out[1] = row_d, out[2] = target;  // (ref is 0 here)
      out[3] = has_entropy ? kLn2 * row_entropy : 0.0f;
    }
  }

  // ---- last pass: the gradient, then the ids' columns ----
  if (p.g) {
    const float row_scale = *a.grad_scale;
    const float kd_coef = row_scale * a.kd_scale * a.inv_temperature;
    // The CE family's coefficients (kernel_abi.h); lse: the student's at T = 1.
    const CeCoefficients ce =
        a.has_ce ? ce_coefficients(a, row_scale, ref + kLn2 * log2_z_c) : CeCoefficients{0.0f, 0.0f, 0.0f};
    const float squared_ce = exp2f(2.0f * log2_z - log2_z_c);
    for_each_block_of_row<false>(p, 0, a.vocab, true, [&](int64_t col, auto& s, auto&) {
      constexpr int N = kLanesOf<decltype(s)>;
      float g[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float q = fast_exp2((s[i] - ref) * L.k - log2_z);
        g[i] = kKD ? kd_coef * weighted(q, rest_factor) : 0.0f;
        if (ce_stats != kCeNone) {  // the label's own term is written once, below
          g[i] += ce.soft * ce_probability(ce_stats, q, s[i], ref, squared_ce, log2_z_c) - ce.uniform;
        }
      }
      store_block(p.g, col, g);
    });
    __shared__ int label_is_id;
    if (threadIdx.x == 0) label_is_id = 0;
    __syncthreads();  // the ids' columns and the label's are written after the dense pass's
    if (kKD) {
      for (int64_t k = threadIdx.x; k < k_count; k += kThreads) {
        if (sh.column[k] < 0.0f) continue;
        const int64_t col = static_cast<int64_t>(sh.column[k]);
        float g = kd_coef * sh.gradient[k];
        if (ce_stats != kCeNone) {
          const float q = fast_exp2((sh.logit[k] - ref) * L.k - log2_z);
          g += ce.soft * ce_probability(ce_stats, q, sh.logit[k], ref, squared_ce, log2_z_c) - ce.uniform;
          if (col == lab.label) g -= ce.label, label_is_id = 1;
        }
        store1(p.g + col, g);
      }
      __syncthreads();
    }
    // The label's column, when no id wrote it: as the dense pass computed it, plus its own term. (Kept out of the
    // dense loop, whose registers are at the edge of spilling.)
    if (threadIdx.x == 0 && lab.label >= 0 && !label_is_id && ce_stats != kCeNone) {
      const float q = fast_exp2((s_label - ref) * L.k - log2_z);
      float g = kKD ? kd_coef * weighted(q, rest_factor) : 0.0f;
      g += ce.soft * ce_probability(ce_stats, q, s_label, ref, squared_ce, log2_z_c) - ce.uniform - ce.label;
      store1(p.g + lab.label, g);
    }
  }
}

template <typename S>
cudaError_t launch_sparse_student(const Launch& L, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(L.a.batch * L.a.rows_per_batch);
  if (!L.a.has_kd) {
    sparse_row_kernel<S, kModeCeOnly><<<rows, kThreads, 0, stream>>>(L);
  } else if (L.a.divergence == kForwardKL) {
    sparse_row_kernel<S, kModeForwardKL><<<rows, kThreads, 0, stream>>>(L);
  } else if (L.a.divergence == kReverseKL) {
    sparse_row_kernel<S, kModeReverseKL><<<rows, kThreads, 0, stream>>>(L);
  } else {
    sparse_row_kernel<S, kModeMixture><<<rows, kThreads, 0, stream>>>(L);
  }
  return cudaGetLastError();
}

}  // namespace kdfast_cuda
