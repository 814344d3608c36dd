"""The repository's kernels/ folder (kdfast.kernels once installed) imported as a top-level `kernels`, as it is
wherever the checkout's root is on sys.path: it hands the import to another installed `kernels` (the Hugging Face
package transformers imports), or fails as a missing package would; it never stands in for one."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, path: str, cwd: Path) -> subprocess.CompletedProcess:
    # -S: no site-packages, so that only the folders on PYTHONPATH hold a `kernels`.
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env={"PYTHONPATH": path},
                          capture_output=True, text=True, timeout=60)


def test_another_installed_kernels_package_is_the_one_imported(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHERE = 'elsewhere'\n")
    (other / "layer.py").write_text("NAME = 'a submodule of it'\n")
    code = "import kernels, kernels.layer; print(kernels.WHERE, kernels.__file__); print(kernels.layer.NAME)"
    result = _python(code, f"{ROOT}:{tmp_path / 'site'}", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == f"elsewhere {other / '__init__.py'}"
    assert second == "a submodule of it"


def test_without_another_kernels_package_the_import_fails_naming_the_folder(tmp_path):
    result = _python("import kernels", str(ROOT), cwd=tmp_path)
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr
    assert "kdfast.kernels" in result.stderr
