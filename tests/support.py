"""Helpers shared by the test modules (importable as ``support``: tests/ is on sys.path).

One place for waiting, process liveness, GPU and root capability marks, and running
a command as a second local user.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import pytest

from mineru_vram._probe import nvml_device_count

# Capability checks: tests are skipped by what the machine can do, never by an environment flag. GPU
# tests use the plugin's own ``@pytest.mark.gpu`` (skipped where NVML sees no device); code that picks
# a device or an expectation reads HAS_GPU.
HAS_GPU = nvml_device_count() > 0
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="acting as a second local user needs root (setpriv)"
)
NOBODY = 65534


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def alive(pid: int) -> bool:
    """A process that exists and has not fully exited.

    A zombie that is not reaped yet counts as dead, but only once all its threads
    are gone: the leader of a multi-threaded process shows as a zombie while the
    others are still tearing down.
    """
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE or proc.num_threads() > 1
    except psutil.NoSuchProcess:
        return False


def all_gone(pids: Sequence[int], timeout: float = 5.0) -> bool:
    """Whether every pid has exited within ``timeout``."""
    return wait_for(lambda: not any(alive(p) for p in pids), timeout)


def as_nobody(argv: Sequence[str], *, wait: bool = True, timeout: float = 60.0) -> Any:
    """Run ``argv`` as the unprivileged user ``nobody`` (needs root; see :data:`needs_root`).

    Returns:
        The finished :class:`subprocess.CompletedProcess` (``wait=True``), or the running
        :class:`subprocess.Popen` with ``stdout`` piped as text.
    """
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def shared_tmp() -> Any:
    """A world-writable sticky folder under /tmp (like /tmp itself), that a second user can reach."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="mineru-vram-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
