"""A JIT build killed mid-way (OOM killer, preemption, a time limit) leaves torch's `lock` file behind; the next
process must rebuild rather than wait on it forever. A live builder's lock is waited for, within a bound, and then
named in the error."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdfast.build_lock import LOCK_NAME, TORCH_BATON
from kdfast.native_build import cpu_capability

ROOT = Path(__file__).resolve().parent.parent
BUILD_AND_RUN = ("import torch, kdfast; from kdfast.native_build import load_cpu_extension; load_cpu_extension(); "
                 "print(kdfast.distill_loss(torch.randn(2, 9), torch.randn(2, 9), backend='cpu').item())")


def _env(build_dir, **extra):
    env = dict(os.environ, KDFAST_BUILD_DIR=str(build_dir), PYTHONPATH=str(ROOT), **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_a_killed_build_is_rebuilt(tmp_path):
    folder = tmp_path / f"kdfast_cpu_{cpu_capability().lower()}"
    builder = subprocess.Popen([sys.executable, "-c", BUILD_AND_RUN], env=_env(tmp_path), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (folder / TORCH_BATON).exists():
        assert builder.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    time.sleep(2.0)  # the compilers are running
    os.killpg(builder.pid, signal.SIGKILL)  # the whole job, compilers included, as a scheduler would
    builder.wait()
    assert (folder / TORCH_BATON).exists(), "the killed build left its lock (the hazard this guards against)"

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", BUILD_AND_RUN], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    float(result.stdout.strip().splitlines()[-1])  # a loss came back
    assert not (folder / TORCH_BATON).exists()
    print(f"rebuilt after the kill in {time.monotonic() - start:.1f} s")


def test_a_live_builder_is_waited_for_within_a_bound(tmp_path):
    folder = tmp_path / f"kdfast_cpu_{cpu_capability().lower()}"
    folder.mkdir()
    with open(folder / LOCK_NAME, "a+") as handle:  # this test process is the live builder
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(str(os.getpid()))
        handle.flush()
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-c", BUILD_AND_RUN], capture_output=True, text=True, timeout=120,
                                env=_env(tmp_path, KDFAST_BUILD_LOCK_TIMEOUT="1.5"))
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert str(folder / LOCK_NAME) in result.stderr and "KDFAST_BUILD_DIR" in result.stderr, result.stderr[-2000:]
    assert f"pid {os.getpid()}" in result.stderr
