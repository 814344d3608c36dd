"""Triton's interpreter patches triton.language once per launch, as it should: each call of a @triton.jit helper inside
the kernel then patches it again (Triton 3.6, `InterpretedFunction.__call__`), walking every member of
triton.language, its tensor and math modules with `inspect.getmembers` to find nothing left to patch. kdfast's
kernels call their helpers per block of columns: the interpreted tests of tests/test_distill_loss.py took 31.1 s with
the repeated walks and 19.2 s with this skip (2026-12-07, one process on an AMD EPYC). `patch_once_per_launch` makes
a helper's call inside a launch skip it where a function of the same module has patched the language in this launch
(a module's globals name the modules of triton.language that its functions use: tl for kdfast's kernels,
triton.language.core for Triton's own @jit functions such as tl.zeros, whose first call still patches it). The
launch's own patch and its undoing are Triton's.

`memoize_np_dtypes` and `type_tuples_lazily` take out two more repeated constructions, in the interpreter's own terms
(same answers, later or once): an interpreted JSD loss with CE, 64 x 5000, took 1.48-1.54 s with all three against
2.25-2.57 s with the first alone (2026-12-07, AMD EPYC, medians of 5 calls, two rounds)."""

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


def memoize_np_dtypes() -> bool:
    """Triton 3.6's `_get_np_dtype` builds its table of twenty numpy dtypes at each of its calls (once per interpreted
    operation: 9% of tests/test_triton_mixture.py's time under cProfile); here each element type's answer is kept."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    table_of = getattr(interpreter, "_get_np_dtype", None)
    if table_of is None or getattr(table_of, "memoized", False):
        return False
    found = {}

    def np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # unhashable; an address either way
            return table_of(element)
        try:
            return found[element.name]
        except KeyError:
            found[element.name] = table_of(element)
            return found[element.name]

    np_dtype.memoized, np_dtype.original = True, table_of
    interpreter._get_np_dtype = np_dtype
    return True


def type_tuples_lazily() -> bool:
    """Every tensor the interpreter makes gives its shape a `tl.tuple`, which types its members at construction (a
    `tuple_type` of a `constexpr_type` each), whose name formats each member's type as text; almost none is ever
    read. Here a tuple's type is made, and a tuple type's name formatted, when first read (with
    `memoize_np_dtypes`, 29% of tests/test_triton_mixture.py's time under cProfile: 32 of 113 s)."""
    try:
        from triton.language import core
    except ImportError:
        return False
    tuple_type, tuple_value = getattr(core, "tuple_type", None), getattr(core, "tuple", None)
    if tuple_type is None or tuple_value is None or isinstance(tuple_type.__dict__.get("name"), property):
        return False
    _type_tuple_values_lazily(core, tuple_value, tuple_type)
    _name_tuple_types_lazily(tuple_type)
    return True


def _type_tuple_values_lazily(core, tuple_value, tuple_type) -> None:
    def __init__(self, args, type=None):
        self.values = [i for i in args]
        if type is not None:  # make_template in ASTFunction.deserialize may pass a list or tuple
            self.__dict__["_type"] = type if isinstance(type, tuple_type) else tuple_type(type)

    def get_type(self):
        if "_type" not in self.__dict__:
            self.__dict__["_type"] = core._type_for_tuple_values(self.values)
        return self.__dict__["_type"]

    def set_type(self, value):
        self.__dict__["_type"] = value

    tuple_value.__init__ = __init__
    tuple_value.type = property(get_type, set_type)


def _name_tuple_types_lazily(tuple_type) -> None:

    def __init__(self, types, fields=None):
        self.types = types
        self.fields = fields or [""] * len(types)

    def name(self):  # Triton 3.6's format
        return "[" + ",".join([f"{k}:{v}" for k, v in zip(self.fields, self.types)]) + "]"

    def set_name(self, value):  # a subclass or caller that sets it keeps what it set
        self.__dict__["_set_name"] = value

    tuple_type.__init__ = __init__
    tuple_type.name = property(lambda self: self.__dict__.get("_set_name") or name(self), set_name)
