// The sorted L1 of ULD (docs/DESIGN.md, "Teachers with another tokenizer"): two vectors of non-negative values, each
// sorted decreasingly, the shorter zero-padded, sum over ranks r of |a_(r) - b_(r)|, and its subgradient with respect
// to each a_k. No torch headers.
#pragma once

#include <cstdint>
#include <vector>

namespace kdfast_cpu {

// Reused between rows of one thread: its buffers grow to the widest row and stay.
struct SortedL1Scratch {
  struct Bucket {
    double sum_a, sum_b;  // the values in the bucket, each side
    uint32_t count_a, count_b;
  };
  std::vector<Bucket> buckets;
  std::vector<uint16_t> bucket_a, bucket_b;  // each value's bucket
  std::vector<float> bucket_grad;      // +-weight where every a in the bucket takes that subgradient
  std::vector<uint8_t> crossing;       // 1: the bucket's a's take different subgradients (sorted apart)
  std::vector<uint64_t> crossing_a, crossing_b;  // the crossing buckets' values (with a's positions), to sort
  std::vector<uint32_t> keys, keys_tmp, payload, payload_tmp;  // the radix sort's buffers
  struct Crossing {
    int64_t bucket;
    int64_t above_a, above_b;  // how many values of each side lie above the bucket
  };
  std::vector<Crossing> crossings;
};

// Returns sum_r |a_(r) - b_(r)| over a[0, count_a) and b[0, count_b) (values >= 0, finite) and writes
// grad[k] = weight * sign(a_(r) - b_(r)) at a_k's rank r (ties among a's ranked by position, as a stable sort ranks
// them): the value TRL's ULDLoss computes with two full sorts, computed here without sorting most values.
double sorted_l1(SortedL1Scratch& w, const float* a, int64_t count_a, const float* b, int64_t count_b, float weight,
                 float* grad);

}  // namespace kdfast_cpu
