"""One JIT build per build folder at a time, and no build blocked by one that died.

torch's cpp_extension marks a build in progress with a `lock` file that only the builder removes; a builder
killed mid-way (the OOM killer, a preempted job, a time limit) leaves it behind and every later process waits
on it forever. kdfast takes an flock first: the kernel releases it when its holder dies, however it dies, so
holding it proves that no live kdfast process is building here, and any `lock` left in the folder is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

LOCK_NAME = "kdfast-build.lock"
TORCH_BATON = "lock"  # torch.utils.cpp_extension's in-progress marker
DEFAULT_TIMEOUT_S = 900.0  # a cold CUDA build on a small machine takes minutes; more is a stuck build
ANNOUNCE_AFTER_S = 3.0


class BuildLockTimeout(RuntimeError):
    pass


def _timeout() -> float:
    value = os.environ.get("KDFAST_BUILD_LOCK_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError as error:
        raise ValueError(f"KDFAST_BUILD_LOCK_TIMEOUT must be a number of seconds, got {value!r}") from error


def _holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return f"pid {text}" if text else "another process"


@contextlib.contextmanager
def build_lock(folder: str | os.PathLike):
    """Held while building in `folder`. Waits for a live builder at most KDFAST_BUILD_LOCK_TIMEOUT seconds (900),
    then raises BuildLockTimeout naming the lock. On entry, removes what a dead builder left behind."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    with open(path, "a+") as handle:
        start = time.monotonic()
        deadline = start + _timeout()
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildLockTimeout(
                        f"waited {_timeout():.0f} s for {path}, held by {_holder(handle)}, which is still building "
                        f"the kdfast kernels there. Wait for it, stop it, or point KDFAST_BUILD_DIR at another folder "
                        f"(KDFAST_BUILD_LOCK_TIMEOUT sets the wait).") from None
                if not announced and time.monotonic() - start > ANNOUNCE_AFTER_S:  # not for a mere load
                    print(f"kdfast: waiting for {_holder(handle)} to finish building the kernels ({path})",
                          file=sys.stderr, flush=True)
                    announced = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            _clear_dead_build(folder)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear_dead_build(folder: Path) -> None:
    """A torch baton with no live kdfast builder: its build died mid-way. Its half-written objects go too."""
    if not (folder / TORCH_BATON).exists():
        return
    for item in folder.iterdir():
        if item.name != LOCK_NAME and item.is_file():
            item.unlink()
