// The row's k largest kept ascending in `top` (top[0] the smallest, the bar a value must pass): the first k values
// by insertion, then a vector of lanes at a time compared with the bar, a lane that passes inserted in order. On
// logits most vectors pass no lane once the bar has risen (about k ln(V / k) insertions a row of random values), so
// the pass runs near the speed of reading the row; a rising row inserts every value, O(V k) at worst.
#include "topk_entropy.h"

#include <cmath>

#include "simd_math.h"

namespace kdfast_cpu {
namespace {

// top[0, count) ascending, count < k: v placed in order.
void insert_growing(float* top, int64_t count, float v) {
  int64_t j = count;
  while (j > 0 && top[j - 1] > v) {
    top[j] = top[j - 1];
    --j;
  }
  top[j] = v;
}

// top[0, k) ascending, v > top[0]: top[0] dropped, v placed in order.
void insert_full(float* top, int64_t k, float v) {
  int64_t j = 0;
  while (j + 1 < k && top[j + 1] < v) {
    top[j] = top[j + 1];
    ++j;
  }
  top[j] = v;
}

}  // namespace

float topk_entropy_row(const float* x, int64_t width, int64_t k, float* top) {
  for (int64_t i = 0; i < k; ++i) insert_growing(top, i, x[i]);
  int64_t i = k;
  for (; i + kLanes <= width; i += kLanes) {
    if (!any_lane(load<VFloat>(x + i) > top[0])) continue;
    for (int lane = 0; lane < kLanes; ++lane) {
      if (x[i + lane] > top[0]) insert_full(top, k, x[i + lane]);
    }
  }
  for (; i < width; ++i) {
    if (x[i] > top[0]) insert_full(top, k, x[i]);
  }
  const double largest = top[k - 1];
  double total = 0.0, weighted = 0.0;  // sum e^(t - m), sum e^(t - m) (t - m)
  for (int64_t j = 0; j < k; ++j) {
    const double centred = top[j] - largest;
    const double e = std::exp(centred);
    total += e;
    weighted += centred == -INFINITY ? 0.0 : e * centred;  // a -inf logit has no mass: 0, not 0 * -inf
  }
  return static_cast<float>(std::log(total) - weighted / total);
}

}  // namespace kdfast_cpu
