#!/usr/bin/env bash
# One command for a GPU machine (DESIGN.md, "Tests and CI"): the GPU tests of every backend, then the CUDA
# benchmark (triton.testing.do_bench, 8192 x 128256 bf16, GB/s against the bytes the kernel moves and the
# measured copy bandwidth). Results land in benchmarks/results/ (CSV tagged with the device name).
# Uses the machine's own torch/triton (no network there): PYTHON=python3 by default.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# kdfast.kernels maps to kernels/ only through the package install; without one, link it for the run.
[ -e kdfast/kernels ] || ln -s ../kernels kdfast/kernels
"$PYTHON" -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)" | tee "$OUT/gpu_device.txt"
status=0
"$PYTHON" -m pytest -q tests -x -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.txt" || status=1
for divergence in forward_kl jsd; do
  "$PYTHON" benchmarks/bench_distill.py --device cuda --divergence "$divergence" 2>&1 | tee -a "$OUT/gpu_bench.txt" \
    || status=1
done
[ -L kdfast/kernels ] && rm kdfast/kernels
exit $status
