"""A user's install: the wheel built from this tree, installed without extras into a fresh virtual environment, run
from another folder with that environment's bin/ off PATH (its python run by full path, as job scripts do).
`kdfast --help`, `kdfast teacher-cache --help` and `kdfast build` (the C++ kernel JIT-built from the sources inside
the installed package) answer there; a benchmark says in one line which extra it needs, and runs once it is there."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent("""
    import torch, kdfast
    from kdfast.package_files import package_folder
    assert "site-packages" in kdfast.__file__, kdfast.__file__
    assert "site-packages" in str(package_folder("csrc")), package_folder("csrc")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    y = torch.randint(0, 50, (4,), generator=g)
    ours = kdfast.distill_loss(s, t, y, temperature=2.0, ce_weight=0.5, backend="cpu")
    torch.testing.assert_close(ours, kdfast.distill_loss(s, t, y, temperature=2.0, ce_weight=0.5, backend="torch"))
    print("cpu kernel ok", ours.item())
""")


def with_dependencies(names: list[str]) -> dict:
    """name -> distribution, for `names` and everything they require (markers read without extras)."""
    found, pending = {}, list(names)
    while pending:
        distribution = importlib.metadata.distribution(pending.pop())
        key = distribution.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def linked_packages(folder: Path, names: list[str], leave_out: dict | None = None) -> Path:
    """A folder holding links to the installed files of `names` and their dependencies (those of `leave_out`
    excepted): only these packages importable from it, so that the test downloads nothing and an extra this
    environment has is not on the path by accident."""
    folder.mkdir()
    for key, distribution in with_dependencies(names).items():
        if leave_out and key in leave_out:
            continue
        site = Path(distribution.locate_file(""))
        for top in {file.parts[0] for file in distribution.files or []}:
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    environment = work / "fresh"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(next(wheels.glob("kdfast-*.whl")))], check=True, capture_output=True, text=True, timeout=300)
    # kdfast's own requirements (torch, ninja) from this environment, through a .pth in the fresh one; the bench
    # extra apart, on PYTHONPATH for the runs that have it.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    requirements = ["torch", "ninja"]
    (site / "kdfast-test-deps.pth").write_text(f"{linked_packages(work / 'requirements', requirements)}\n")
    bench_extra = linked_packages(work / "bench-extra", ["rich", "matplotlib"], with_dependencies(requirements))
    return environment, work, bench_extra


def _run(installed, *command, expect=0, with_bench_extra=False):
    environment, work, bench_extra = installed
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(work)), "KDFAST_BUILD_DIR": str(work / "build"),
           "KDFAST_RESULTS_DIR": str(work / "results")}
    if with_bench_extra:
        env["PYTHONPATH"] = str(bench_extra)
    program = str(environment / "bin" / command[0])
    result = subprocess.run([program, *command[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_installed_package_builds_and_runs_the_cpu_kernel(installed):
    _, work, _ = installed
    assert "kdfast CPU kernel ready" in _run(installed, "kdfast", "build").stdout
    assert list((work / "build").glob("kdfast_cpu_*/*.so")), "the kernel was built from the installed sources"
    assert "cpu kernel ok" in _run(installed, "python", "-c", CHECK).stdout


def test_installed_cli_answers_without_extras(installed):
    assert "teacher-cache" in _run(installed, "kdfast", "--help").stdout
    assert "--windows-per-shard" in _run(installed, "kdfast", "teacher-cache", "--help").stdout
    missing = _run(installed, "kdfast", "bench", "logits", "--repeats", "1", expect=1)
    # The last line: torch without numpy (not one of its requirements) warns first.
    assert missing.stderr.strip().splitlines()[-1] == ("kdfast bench logits needs the 'bench' extra (No module named "
                                                       "'rich'): pip install 'kdfast[bench]'")


def test_installed_cli_runs_a_benchmark_with_the_bench_extra(installed):
    _, work, _ = installed
    assert "vocab-parallel" in _run(installed, "kdfast", "bench", "--help").stdout
    _run(installed, "kdfast", "bench", "logits", "--tokens", "16", "--vocab", "64", "--repeats", "1",
         "--no-compile", with_bench_extra=True)
    assert list((work / "results").glob("bench_distill_*.csv"))
