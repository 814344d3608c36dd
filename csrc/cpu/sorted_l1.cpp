// The sorted L1 without sorting most values. For sorted sequences Sum_r |a_(r) - b_(r)| is the integral over t > 0 of
// |D(t)|, D(t) = N_a(t) - N_b(t), N_x(t) the number of x's values above t (padding zeros are never above any t > 0).
// The values are cut into buckets by the top bits of their floats (32 a binade). Walking down from the largest, let A
// and B count each side's values above a bucket: inside it D lies in [A - B - n_b, A - B + n_a]. Where that range
// keeps one sign, the bucket's integral is (A - B)(hi - lo) + Sum_a (a - lo) - Sum_b (b - lo) times that sign, and
// every a in it takes the same subgradient: +1 when A - B >= n_b (each a outranks its partner b_(r)), -1 when
// B - A >= n_a. Only the buckets where D may change sign ("crossing" buckets, where the two sides' ranks meet) are
// sorted: about 5% of the values of two rows of 32000 and 40000 random logits' probabilities (a radix sort of every
// value had been 78% of the C++ pass's perf samples in a ULD call). Bucket 0 holds everything below 2^-64 and the
// zeros, and is always sorted (its lower end is 0, where the padding lies). Values from 2^64 up (never
// probabilities) make the whole row one bucket, sorted whole.
#include "sorted_l1.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace kdfast_cpu {
namespace {

constexpr int kBucketShift = 18;                       // a float's bits >> 18: its exponent and 5 mantissa bits
constexpr uint32_t kFloorBits = 63u << 23;             // 2^-64: all below it share bucket 0
constexpr uint32_t kBase = kFloorBits >> kBucketShift;
constexpr uint32_t kCeilingBits = 191u << 23;          // 2^64: from here on (inf, NaN too) one bucket, sorted whole

uint32_t magnitude_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits & 0x7FFFFFFFu;  // -0.0 as 0.0
}

float bits_value(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

int64_t bucket_of(uint32_t bits) {
  return bits < kFloorBits ? 0 : static_cast<int64_t>(bits >> kBucketShift) - kBase + 1;
}
double bucket_low(int64_t k) { return k == 0 ? 0.0 : bits_value(static_cast<uint32_t>(k - 1 + kBase) << kBucketShift); }
double bucket_high(int64_t k) { return bits_value(static_cast<uint32_t>(k + kBase) << kBucketShift); }

// Items sort ascending as (~bits << 32 | position): values decreasing, ties by position.
uint64_t descending_item(uint32_t bits, int64_t position) {
  return (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(position);
}
uint32_t item_bits(uint64_t item) { return ~static_cast<uint32_t>(item >> 32); }

constexpr int kDigitBits = 11;
constexpr int kDigits = 1 << kDigitBits;
constexpr int kPasses = (32 + kDigitBits - 1) / kDigitBits;

// LSD radix sort of keys[0, n) ascending, stable, carrying `payload`; `*_tmp` are scratch of n. Returns whether the
// result is in the scratch buffers. A pass whose digit is one for every key is skipped.
bool radix_sort(uint32_t* keys, uint32_t* keys_tmp, uint32_t* payload, uint32_t* payload_tmp, int64_t n) {
  uint32_t counts[kPasses][kDigits] = {};
  for (int64_t i = 0; i < n; ++i) {
    for (int pass = 0; pass < kPasses; ++pass) ++counts[pass][(keys[i] >> (pass * kDigitBits)) & (kDigits - 1)];
  }
  bool swapped = false;
  for (int pass = 0; pass < kPasses; ++pass) {
    uint32_t* count = counts[pass];
    const int shift = pass * kDigitBits;
    if (count[(keys[0] >> shift) & (kDigits - 1)] == static_cast<uint32_t>(n)) continue;
    uint32_t offset = 0;
    for (int digit = 0; digit < kDigits; ++digit) {
      const uint32_t c = count[digit];
      count[digit] = offset;
      offset += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t to = count[(keys[i] >> shift) & (kDigits - 1)]++;
      keys_tmp[to] = keys[i];
      payload_tmp[to] = payload[i];
    }
    std::swap(keys, keys_tmp);
    std::swap(payload, payload_tmp);
    swapped = !swapped;
  }
  return swapped;
}

// Few items (the usual crossing buckets): std::sort; many (a row sorted whole): the radix sort, stable like it.
void sort_items(SortedL1Scratch& w, std::vector<uint64_t>& items) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n < 1024) {
    std::sort(items.begin(), items.end());
    return;
  }
  for (auto* buffer : {&w.keys, &w.keys_tmp, &w.payload, &w.payload_tmp}) buffer->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    w.keys[i] = static_cast<uint32_t>(items[i] >> 32);
    w.payload[i] = static_cast<uint32_t>(items[i]);
  }
  const bool moved = radix_sort(w.keys.data(), w.keys_tmp.data(), w.payload.data(), w.payload_tmp.data(), n);
  const uint32_t* keys = moved ? w.keys_tmp.data() : w.keys.data();
  const uint32_t* payload = moved ? w.payload_tmp.data() : w.payload.data();
  for (int64_t i = 0; i < n; ++i) items[i] = (static_cast<uint64_t>(keys[i]) << 32) | payload[i];
}

// A crossing bucket's part: the integral of |D| from its top down through its sorted values, and each of its a's
// subgradient from its partner b of the same rank (above the bucket: larger; in it; below it: smaller, or a padding
// zero where the bucket reaches 0).
double crossing_part(const SortedL1Scratch::Crossing& c, bool whole, const uint64_t* a_items, int64_t count_a,
                     const uint64_t* b_items, int64_t count_b, float weight, float* grad) {
  for (int64_t i = 0; i < count_a; ++i) {
    const float value = bits_value(item_bits(a_items[i]));
    const int64_t rank = c.above_a + i;
    float g = weight;
    if (rank < c.above_b) {
      g = -weight;
    } else if (rank < c.above_b + count_b) {
      const float partner = bits_value(item_bits(b_items[rank - c.above_b]));
      g = value > partner ? weight : (value < partner ? -weight : 0.0f);
    } else if (c.bucket == 0 && !(value > 0.0f)) {
      g = 0.0f;  // a zero against a padding zero
    }
    grad[static_cast<uint32_t>(a_items[i])] = g;
  }
  double total = 0.0, t = whole ? 0.0 : bucket_high(c.bucket);
  int64_t lead = c.above_a - c.above_b;  // D(t) above the next value down (0 at the top of a whole row)
  for (int64_t i = 0, j = 0; i < count_a || j < count_b;) {
    const bool take_a = j == count_b || (i < count_a && a_items[i] >> 32 <= b_items[j] >> 32);
    const double value = bits_value(item_bits(take_a ? a_items[i++] : b_items[j++]));
    if (lead != 0) total += std::fabs(static_cast<double>(lead)) * (t - value);
    t = value;
    lead += take_a ? 1 : -1;
  }
  if (lead != 0) total += std::fabs(static_cast<double>(lead)) * (t - bucket_low(whole ? 0 : c.bucket));
  return total;
}

// Each value's bucket into `buckets` (vectorised); returns the largest of the values' bits.
uint32_t bucket_values(const float* x, int64_t n, uint16_t* buckets) {
  uint32_t top_bits = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = magnitude_bits(x[k]);
    top_bits = std::max(top_bits, bits);
    buckets[k] = static_cast<uint16_t>(bits < kFloorBits ? 0 : (bits >> kBucketShift) - kBase + 1);
  }
  return top_bits;
}

}  // namespace

double sorted_l1(SortedL1Scratch& w, const float* a, int64_t count_a, const float* b, int64_t count_b, float weight,
                 float* grad) {
  w.bucket_a.resize(count_a);
  w.bucket_b.resize(count_b);
  const uint32_t top_bits = std::max(bucket_values(a, count_a, w.bucket_a.data()),
                                     bucket_values(b, count_b, w.bucket_b.data()));
  const bool whole = top_bits >= kCeilingBits;
  if (whole) {
    std::fill(w.bucket_a.begin(), w.bucket_a.end(), 0);
    std::fill(w.bucket_b.begin(), w.bucket_b.end(), 0);
  }
  const int64_t n_buckets = whole ? 1 : bucket_of(top_bits) + 1;
  w.buckets.assign(n_buckets, SortedL1Scratch::Bucket{0.0, 0.0, 0, 0});
  for (int64_t k = 0; k < count_a; ++k) {
    auto& into = w.buckets[w.bucket_a[k]];
    into.sum_a += a[k];
    ++into.count_a;
  }
  for (int64_t k = 0; k < count_b; ++k) {
    auto& into = w.buckets[w.bucket_b[k]];
    into.sum_b += b[k];
    ++into.count_b;
  }
  w.bucket_grad.resize(n_buckets);
  w.crossing.resize(n_buckets);
  w.crossings.clear();
  double total = 0.0;
  int64_t above_a = 0, above_b = 0, crossing_a = 0, crossing_b = 0;
  for (int64_t k = n_buckets - 1; k >= 0; --k) {
    const auto& here = w.buckets[k];
    const int64_t lead = above_a - above_b;
    const bool positive = lead >= static_cast<int64_t>(here.count_b);   // D >= 0 throughout
    const bool negative = -lead >= static_cast<int64_t>(here.count_a);  // D <= 0 throughout
    w.crossing[k] = k == 0 || !(positive || negative);
    if (w.crossing[k]) {
      w.bucket_grad[k] = 0.0f;
      w.crossings.push_back({k, above_a, above_b});
      crossing_a += here.count_a;
      crossing_b += here.count_b;
    } else {
      const double low = bucket_low(k), high = bucket_high(k);
      const double integral = static_cast<double>(lead) * (high - low) + (here.sum_a - here.count_a * low) -
                              (here.sum_b - here.count_b * low);
      total += positive ? integral : -integral;
      w.bucket_grad[k] = positive ? weight : -weight;
    }
    above_a += here.count_a;
    above_b += here.count_b;
  }
  // The crossing buckets' values, gathered without a branch per value (which bucket crosses is a coin toss to the
  // predictor): each is written, and the write position moves on only for those that cross.
  w.crossing_a.resize(crossing_a + 1);
  w.crossing_b.resize(crossing_b + 1);
  uint64_t* a_out = w.crossing_a.data();
  for (int64_t k = 0; k < count_a; ++k) {
    const uint16_t at = w.bucket_a[k];
    grad[k] = w.bucket_grad[at];
    *a_out = descending_item(magnitude_bits(a[k]), k);
    a_out += w.crossing[at];
  }
  uint64_t* b_out = w.crossing_b.data();
  for (int64_t k = 0; k < count_b; ++k) {
    *b_out = descending_item(magnitude_bits(b[k]), 0);
    b_out += w.crossing[w.bucket_b[k]];
  }
  w.crossing_a.resize(crossing_a);
  w.crossing_b.resize(crossing_b);
  sort_items(w, w.crossing_a);
  sort_items(w, w.crossing_b);
  // The crossing buckets were listed from the top down, as the sorted items run.
  const uint64_t* a_items = w.crossing_a.data();
  const uint64_t* b_items = w.crossing_b.data();
  for (const auto& c : w.crossings) {
    const int64_t here_a = w.buckets[c.bucket].count_a, here_b = w.buckets[c.bucket].count_b;
    total += crossing_part(c, whole, a_items, here_a, b_items, here_b, weight, grad);
    a_items += here_a;
    b_items += here_b;
  }
  return total;
}

}  // namespace kdfast_cpu
