// The CUDA distillation row kernels: raw pointers, sizes, strides and a stream only (no torch headers), so
// that plain `nvcc -c` compile-checks them. The loss contract and the phases: docs/DESIGN.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/kernel_abi.h"

namespace kdfast_cuda {

using kdfast::DistillArgs;
using kdfast::ScalarKind;

// The teacher dtype must equal the student's, or be float32 (the caller converts other pairs).
bool supported_pair(ScalarKind student, ScalarKind teacher);

// Rows per block split (FUSED calls): 1 when there are enough rows to fill `multiprocessors`, more for few long
// rows.
int choose_splits(int64_t rows, int64_t vocab, int multiprocessors);

int64_t workspace_floats(int64_t rows, int splits);

// Enqueues the kernels of args.phase on `stream`; returns the launch error, if any. With args.mix_count > 0 (FUSED,
// one block per row, teachers of the student's dtype) args.mix_teachers is a device array of the M teachers' data
// and args.workspace holds mixture_workspace_floats(rows, M) floats.
cudaError_t launch_distill(const DistillArgs& args, cudaStream_t stream);
int64_t mixture_workspace_floats(int64_t rows, int64_t teachers);

// A sparse teacher: its per-id workspace (args.workspace) holds sparse_workspace_floats(rows, K) floats.
int64_t sparse_workspace_floats(int64_t rows, int64_t topk);
cudaError_t launch_sparse(const DistillArgs& args, cudaStream_t stream);

}  // namespace kdfast_cuda
