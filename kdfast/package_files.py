"""Where the files that are not Python modules live: csrc/ (the native sources the JIT build compiles) and
benchmarks/ (what `kdfast bench` and `kdfast profile` run). A wheel or `pip install .` puts them inside the package
(kdfast/csrc, kdfast/benchmarks: setup.py); a source checkout or an editable install keeps them beside kdfast/."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def package_folder(name: str) -> Path:
    installed = importlib.resources.files("kdfast") / name
    if installed.is_dir():
        return Path(str(installed))
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"kdfast's {name}/ folder is missing from {installed} and {checkout}: reinstall kdfast "
                            "(pip install kdfast) or run from a complete source checkout")
