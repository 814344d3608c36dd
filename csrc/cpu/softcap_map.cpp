// The softcap's two passes (softcap_map.h), a vector at a time with fast_tanh, the tail lane by lane.
#include "softcap_map.h"

#include "simd_math.h"

namespace kdfast_cpu {
namespace {

template <typename F>
inline void map_one(float* x, float* out, int64_t i, float in_scale, float out_scale, SoftcapKeep keep) {
  F derivative;
  const F tanh = fast_tanh(load<F>(x + i) * in_scale, &derivative);
  if (keep == SoftcapKeep::kMapped) {
    store(x + i, tanh * out_scale);
    return;
  }
  store(out + i, tanh * out_scale);
  if (keep == SoftcapKeep::kTanh) store(x + i, tanh);
}

template <typename F>
inline void chain_one(float* grad, const float* kept, int64_t i, float in_scale, float slope, bool from_tanh) {
  F derivative;
  if (from_tanh) {
    const F tanh = load<F>(kept + i);
    derivative = 1.0f - tanh * tanh;
  } else {
    fast_tanh(load<F>(kept + i) * in_scale, &derivative);
  }
  store(grad + i, load<F>(grad + i) * (derivative * slope));
}

}  // namespace

void softcap_map(float* x, float* out, int64_t begin, int64_t end, float in_scale, float out_scale, SoftcapKeep keep) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) map_one<VFloat>(x, out, i, in_scale, out_scale, keep);
  for (; i < end; ++i) map_one<float>(x, out, i, in_scale, out_scale, keep);
}

void softcap_chain(float* grad, const float* kept, int64_t begin, int64_t end, float in_scale, float slope,
                   bool from_tanh) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) chain_one<VFloat>(grad, kept, i, in_scale, slope, from_tanh);
  for (; i < end; ++i) chain_one<float>(grad, kept, i, in_scale, slope, from_tanh);
}

}  // namespace kdfast_cpu
