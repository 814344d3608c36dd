"""Triton's interpreter patches triton.language once per launch, as it should: each call of a @triton.jit helper inside
the kernel then patches it again (Triton 3.6, `InterpretedFunction.__call__`), walking every member of
triton.language, its tensor and math modules with `inspect.getmembers` to find nothing left to patch. kdfast's
kernels call their helpers per block of columns: the interpreted tests of tests/test_distill_loss.py took 31.1 s with
the repeated walks and 19.2 s with this skip (2026-12-07, one process on an AMD EPYC). `patch_once_per_launch` makes
a helper's call inside a launch skip it where a function of the same module has patched the language in this launch
(a module's globals name the modules of triton.language that its functions use: tl for kdfast's kernels,
triton.language.core for Triton's own @jit functions such as tl.zeros, whose first call still patches it). The
launch's own patch and its undoing are Triton's."""

from __future__ import annotations


def patch_once_per_launch() -> bool:
    """Installs the skip; False (nothing changed) where this Triton's interpreter is not built as 3.6's is."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope_type is None or getattr(patch_lang, "once_per_launch", False):
        return False
    launch_modules = set()  # the globals of the functions that patched the language in the running launch, if any

    def patch_lang_once(fn):
        if launch_modules:  # a helper called inside the launch
            if id(fn.__globals__) in launch_modules:
                return scope_type()
            launch_modules.add(id(fn.__globals__))
            return patch_lang(fn)  # Triton never undoes a helper's patch either
        scope = patch_lang(fn)
        restore = scope.restore

        def restore_and_end_the_launch():
            launch_modules.clear()
            restore()

        scope.restore = restore_and_end_the_launch
        launch_modules.add(id(fn.__globals__))
        return scope

    patch_lang_once.once_per_launch = True
    interpreter._patch_lang = patch_lang_once
    return True
