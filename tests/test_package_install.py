"""A user's install: the wheel built from this tree, installed into a fresh virtual environment, runs the C++ kernel
(JIT-built from the sources inside the installed package) and `kdfast bench` from another folder, with that
environment's bin/ off PATH (its python run by full path, as job scripts do)."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

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
    # torch, ninja and the bench extra come from this environment (a path, not a site dir: its editable kdfast
    # finder is not loaded), so the test downloads nothing.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "kdfast-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return environment, work


def _run(environment, work, *command):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(work)), "KDFAST_BUILD_DIR": str(work / "build"),
           "KDFAST_RESULTS_DIR": str(work / "results")}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_installed_package_builds_and_runs_the_cpu_kernel(installed):
    environment, work = installed
    out = _run(environment, work, str(environment / "bin" / "python"), "-c", CHECK)
    assert "cpu kernel ok" in out
    assert list((work / "build").glob("kdfast_cpu_*/*.so")), "the kernel was built from the installed sources"


def test_installed_cli_runs_a_benchmark(installed):
    environment, work = installed
    kdfast = str(environment / "bin" / "kdfast")
    assert "vocab-parallel" in _run(environment, work, kdfast, "bench", "--help")
    _run(environment, work, kdfast, "bench", "logits", "--tokens", "16", "--vocab", "64", "--repeats", "1",
         "--no-compile")
    assert list((work / "results").glob("bench_distill_*.csv"))
