// Gemma-2's softcap on float32 rows for the CPU, in one pass each way (kdfast/logit_maps.py): the map
// out = out_scale * tanh(in_scale * x), and its chain rule grad *= slope * (1 - tanh^2). torch's own tanh took 4.6 ms
// per 49 x 32000 chunk on two AVX2 threads (its exp 1.6), and the map and its chain rule took five passes more. What
// each pass reads and leaves is what the torch ops it replaces read and leave, so the two may take turns. No torch
// headers.
#pragma once

#include <cstdint>

namespace kdfast_cpu {

// What softcap_map leaves in x: x unchanged, its tanh (for a chain rule from the tanh), or the mapped values.
enum class SoftcapKeep : int { kNothing = 0, kTanh = 1, kMapped = 2 };

// out[i] = out_scale * tanh(in_scale * x[i]) for i in [begin, end); x as `keep` says (kMapped: out is null, x takes
// the mapped values).
void softcap_map(float* x, float* out, int64_t begin, int64_t end, float in_scale, float out_scale, SoftcapKeep keep);

// grad[i] *= slope * (1 - t^2) for i in [begin, end): t = kept[i] where it holds the tanh (`from_tanh`), else
// t = tanh(in_scale * kept[i]), the derivative then computed from the argument with all its digits (fast_tanh).
void softcap_chain(float* grad, const float* kept, int64_t begin, int64_t end, float in_scale, float slope,
                   bool from_tanh);

}  // namespace kdfast_cpu
