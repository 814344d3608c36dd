// The CPU distillation row kernel: raw pointers, sizes and strides only (no torch headers), so that
// `g++ -c` alone can compile-check it. The loss contract and the phases: docs/DESIGN.md.
#pragma once

#include <cstdint>

#include "../common/kernel_abi.h"

namespace kdfast_cpu {

using kdfast::DistillArgs;

// Processes logical rows [row_begin, row_end) in args.phase: writes their outputs and, when args.grad is set,
// their gradient (scaled by *grad_scale). Safe to call concurrently on disjoint row ranges.
void distill_rows_cpu(const DistillArgs& args, int64_t row_begin, int64_t row_end);

}  // namespace kdfast_cpu
