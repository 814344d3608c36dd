// The CPU kernel of a sparse teacher: raw pointers, sizes and strides only (no torch headers). docs/DESIGN.md,
// "A sparse teacher".
#pragma once

#include <cstdint>

#include "../common/kernel_abi.h"

namespace kdfast_cpu {

// Processes logical rows [row_begin, row_end) of a sparse teacher's call in args.phase. Safe to call concurrently
// on disjoint row ranges.
void sparse_rows_cpu(const kdfast::DistillArgs& args, int64_t row_begin, int64_t row_end);

}  // namespace kdfast_cpu
