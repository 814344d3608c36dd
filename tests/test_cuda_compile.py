"""CI compiles the CUDA kernels with nvcc (no GPU needed): to machine code for sm_90 (H100, H200) with ptxas's spill
report (the fp16 rows through the front end only), and through the front end to PTX for sm_80 (the driver's ptxas is
the same on an A100). It syntax-checks the bindings against torch's headers, so a kernel or binding that does not
compile cannot land."""

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
# The sm_80 PTX checks what only the front end can get wrong (a conversion or intrinsic missing at compute_80), so
# cicc runs them without its optimiser: every source in 2.7 s or less, where -O3 took 18 s for one dtype's file
# (an AMD EPYC, 2026-12-07). The sm_90 machine code keeps -O3: its spill report is the one that matters.
PTX_CICC_FLAGS = ("-Xcicc", "-O0")
# ptxas reads the fp16 rows' kernels, the bf16 ones' templates with another 16-bit load, only through the front end:
# their machine code took 45 CPU-seconds of the check, and its worst spill was 4 bytes where bf16's was 16 (sm_90,
# 2026-12-07), so the bf16 file's report bounds both.
FRONT_END_ONLY = ("distill_rows_fp16.cu",)

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def _compile(source: Path, arch: str, out_dir: Path) -> tuple[str, str, subprocess.CompletedProcess]:
    if arch in PTX_ARCHS or source.name in FRONT_END_ONLY:
        target = ["-ptx", f"-arch=compute_{arch}", *PTX_CICC_FLAGS,
                  "-o", str(out_dir / f"{source.stem}_compute{arch}.ptx")]
    else:
        target = ["-c", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                  "-o", str(out_dir / f"{source.stem}_sm{arch}.o")]
    command = [NVCC, "-std=c++17", "-O3", *target, str(source)]
    return source.name, arch, subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    # The machine code first: its compiles are the long ones, and two threads then end together.
    jobs = [(source, arch) for arch in (*MACHINE_CODE_ARCHS, *PTX_ARCHS) for source in sorted(CUDA_DIR.glob("*.cu"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: _compile(*job, out_dir), jobs))


def test_every_cuda_source_compiles_for_sm80_and_sm90(compiled):
    assert len(compiled) == 4 * (len(MACHINE_CODE_ARCHS) + len(PTX_ARCHS)), [
        (name, arch) for name, arch, _ in compiled]
    failures = [(name, arch, result.stderr[-3000:]) for name, arch, result in compiled if result.returncode != 0]
    assert not failures, failures


def test_kernels_do_not_spill(compiled):
    # ptxas -v prints "N bytes spill stores" per kernel; the three-pass mixture kernels may spill a word or
    # two at 256 threads, nothing more.
    machine_code = [result for name, arch, result in compiled if arch in MACHINE_CODE_ARCHS
                    and name not in FRONT_END_ONLY]
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
