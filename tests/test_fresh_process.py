"""kdfast.fresh_process: a measurement's (or a test rank's) process is forked from a fork server that imported torch
and kdfast's kernels' modules, and runs with the parent's environment as it is when the process starts."""

import os
import sys

from kdfast.fresh_process import run_in_fresh_process

VARIABLE = "KDFAST_FRESH_PROCESS_PROBE"


def _what_the_child_has() -> dict:
    return {"pid": os.getpid(), "probe": os.environ.get(VARIABLE),
            "preloaded": [name for name in ("torch._dynamo", "kdfast.function") if name in sys.modules]}


def test_the_child_is_another_process_with_the_kernels_modules_imported():
    seen = run_in_fresh_process(_what_the_child_has)
    assert seen["pid"] != os.getpid()
    # This module imports neither: the fork server did, before the fork.
    assert seen["preloaded"] == ["torch._dynamo", "kdfast.function"], seen


def test_the_child_has_the_environment_as_it_is_now(monkeypatch):
    run_in_fresh_process(_what_the_child_has)  # the server is running, its environment fixed
    monkeypatch.setenv(VARIABLE, "set after the server started")
    assert run_in_fresh_process(_what_the_child_has)["probe"] == "set after the server started"
    monkeypatch.delenv(VARIABLE)
    assert run_in_fresh_process(_what_the_child_has)["probe"] is None


def test_a_failure_in_the_child_is_raised_here():
    try:
        run_in_fresh_process(int, "not a number")
    except ValueError as error:
        assert "not a number" in str(error)
    else:
        raise AssertionError("the child's ValueError was not raised in the parent")
