# Sourced by the GPU check scripts: the run's environment on a GPU machine, from the source tree without an install
# (there is no network there): the import path, the Triton kernels' package link, carried wheels (.whl/), the
# device's description, and the CPU and CUDA kernels built (the CPU build beside the CUDA one).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
LOGS=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$LOGS"
# The repository's root stays off sys.path (pytest runs as `python -P -m pytest`): its kernels/ folder would shadow the
# Hugging Face `kernels` package, which transformers 5.17 imports wherever it finds one (and fails on kdfast's, seen on
# an H200 on 2026-12-04); a folder holding only a link to kdfast/ puts the package on the path instead.
mkdir -p /tmp/kdfast-src && ln -sfn "$PWD/kdfast" /tmp/kdfast-src/kdfast
# No empty entry either: Python reads one as the current folder, the checkout's root.
export PYTHONPATH="/tmp/kdfast-src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# kdfast.kernels maps to kernels/ only through the package install; without one, link it for the run.
[ -e kdfast/kernels ] || ln -s ../kernels kdfast/kernels
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kdfast-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/kdfast-site"
fi
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$LOGS/gpu_device.txt"

echo "== build the CUDA kernels" | tee "$LOGS/gpu_build.txt"
timeout 240 "$PYTHON" -c "from kdfast.native_build import load_cpu_extension as l; l()" >/tmp/cpu_build.log 2>&1 &
cpu_build=$!
( time timeout 240 "$PYTHON" -c "from kdfast.native_build import load_cuda_extension as l; l(); print('built')" ) \
  2>&1 | tail -n 30 | tee -a "$LOGS/gpu_build.txt" || status=1
wait "$cpu_build" || status=1; tail -n 5 /tmp/cpu_build.log >>"$LOGS/gpu_build.txt"
