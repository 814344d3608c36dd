"""kdfast's Triton kernels, installed as `kdfast.kernels` (setup.py maps this folder there).

Where the repository's root is on sys.path (`python -m pytest` run from it, or PYTHONPATH=<checkout> for a source
tree without an install), this folder is also importable as a top-level `kernels`, and it would shadow the Hugging
Face `kernels` package, which transformers (5.25 on) requires and imports. Imported under that name, it hands the
import to the first `kernels` on sys.path outside the repository, or fails as a missing package would."""

if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != _root]
    _spec = PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named 'kernels' (the folder {_root}/kernels is kdfast's Triton kernels, "
                                  "importable as kdfast.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this body ends
    _spec.loader.exec_module(_module)
