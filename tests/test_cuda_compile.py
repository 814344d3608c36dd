"""CI compiles the CUDA kernels with nvcc (no GPU needed): to machine code for sm_90 (H100, H200) with ptxas's spill
report, and through the front end to PTX for sm_80 (the driver's ptxas is the same on an A100). It syntax-checks the
bindings against torch's headers, so a kernel or binding that does not compile cannot land."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
# ptxas for sm_80 as well took a third of the check's time and reported alike: the two architectures have the same
# register file and per-thread limit, and their worst spill was 16 bytes each (the three dtypes' files, 2026-12-05).
MACHINE_CODE_ARCHS, PTX_ARCHS = ("90",), ("80",)
# The sources have no architecture branches: for sm_80 the front end need only meet the launcher and the bf16 rows,
# whose conversions are the newest intrinsics they use (the fp16 and fp32 files' sm_80 front end took 17 and 13
# CPU-seconds, on the same templates; the whole check 130 without them, on an AMD EPYC).
PTX_SOURCES = ("distill_launch.cu", "distill_rows_bf16.cu")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def _compile(source: Path, arch: str, out_dir: Path) -> tuple[str, str, subprocess.CompletedProcess]:
    if arch in PTX_ARCHS:
        target = ["-ptx", f"-arch=compute_{arch}", "-o", str(out_dir / f"{source.stem}_compute{arch}.ptx")]
    else:
        target = ["-c", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                  "-o", str(out_dir / f"{source.stem}_sm{arch}.o")]
    command = [NVCC, "-std=c++17", "-O3", *target, str(source)]
    return source.name, arch, subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    jobs = [(source, arch) for source in sorted(CUDA_DIR.glob("*.cu")) for arch in (*MACHINE_CODE_ARCHS, *PTX_ARCHS)
            if arch in MACHINE_CODE_ARCHS or source.name in PTX_SOURCES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: _compile(*job, out_dir), jobs))


def test_every_cuda_source_compiles_for_sm80_and_sm90(compiled):
    assert len(compiled) == 4 * len(MACHINE_CODE_ARCHS) + len(PTX_SOURCES) * len(PTX_ARCHS), [
        (name, arch) for name, arch, _ in compiled]
    failures = [(name, arch, result.stderr[-3000:]) for name, arch, result in compiled if result.returncode != 0]
    assert not failures, failures


def test_kernels_do_not_spill(compiled):
    # ptxas -v prints "N bytes spill stores" per kernel; the three-pass mixture kernels may spill a word or
    # two at 256 threads, nothing more.
    machine_code = [result for _, arch, result in compiled if arch in MACHINE_CODE_ARCHS]
    worst = max((int(n) for result in machine_code for n in re.findall(r"(\d+) bytes spill stores", result.stderr)),
                default=None)
    assert worst is not None, "ptxas reported no kernels"
    assert worst <= 16, f"a kernel spills {worst} bytes"


def test_kernel_files_include_no_torch_headers():
    for source in [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h")]:
        text = source.read_text()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, source.name


def test_bindings_compile_against_torch_headers(tmp_path):
    from torch.utils import cpp_extension

    candidates = [Path(NVCC).resolve().parent.parent / "include", Path(cpp_extension.CUDA_HOME or "/") / "include",
                  Path("/usr/local/cuda/include")]
    cuda_include = next((path for path in candidates if (path / "cuda_runtime_api.h").exists()), None)
    if cuda_include is None:
        pytest.skip(f"no CUDA runtime headers found in {candidates}")
    # CPU wheels of torch ship c10/cuda's headers but not the one CMake generates: an empty stand-in.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n")
    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{tmp_path}", f"-I{cuda_include}"]
    command = ["g++", "-fsyntax-only", "-std=c++17", "-w", *includes, str(CUDA_DIR / "bindings.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
