"""What the pytest plugin's resource fixtures do: a shared random-model tree and the SGLang stand-in.

Kept out of :mod:`mineru_vram.pytest_plugin` so loading the plugin stays cheap;
imported only when one of these fixtures runs.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["StandinServer", "StandinState", "free_port", "shared_random_models"]

_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock across processes (pytest-xdist workers), where ``fcntl`` exists."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: workers may each build a tree
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def shared_random_models(root: Path, *, seed: int = 0) -> Path:
    """Build (once per ``root``, even across xdist workers) a MinerU random-weights tree.

    :func:`mineru_vram.testing.write_random_models` reuses a complete tree with
    the same seed, so a persistent ``root`` makes later runs free.

    Returns:
        The tree's path, ``root / f"mineru-random-models-{seed}"``.
    """
    from .testing import write_random_models

    target = root / f"mineru-random-models-{seed}"
    with _exclusive(root / f".mineru-random-models-{seed}.lock"):
        return write_random_models(target, seed=seed)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux only; PR_SET_PDEATHSIG follows the creating thread, and fixtures run on
    # pytest's main thread, which lives as long as the process.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


class StandinState(enum.Enum):
    """Lifecycle of a :class:`StandinServer`."""

    UNSTARTED = "unstarted"  # constructed; no process
    RUNNING = "running"  # answered /health; url, pid valid
    STOPPED = "stopped"  # its process group was killed; cannot be restarted


class StandinServer:
    """The SGLang stand-in (``python -m mineru_vram._standin``) on a loopback port.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        api_key: the key the server requires (``Authorization: Bearer <key>``).
        pid: the server's process id (it leads its own process group).
        log_path: its combined stdout and stderr.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        api_key: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key
        self.model_path = str(model_path)
        self.extra_args = tuple(extra_args)
        self._log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="mineru-vram-standin-"))
        self.log_path = self._log_dir / f"standin-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.state = StandinState.UNSTARTED

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the stand-in server was never started")
        return self._proc.pid

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"StandinServer(url={self.url!r}, pid={pid}, state={self.state.value})"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, *, timeout: float = 60.0) -> StandinServer:
        """Start the server and wait until ``GET /health`` answers 200.

        Raises:
            RuntimeError: started twice, or it exited or did not get healthy in time
                (the message carries the end of its log).
        """
        if self.state is not StandinState.UNSTARTED:
            raise RuntimeError(f"this stand-in server is {self.state.value}; start a new one")
        argv = [
            sys.executable,
            "-m",
            "mineru_vram._standin",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--api-key",
            self.api_key,
            "--model-path",
            self.model_path,
            *self.extra_args,
        ]
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            env=env,
        )
        self.state = StandinState.RUNNING
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"the stand-in server exited with {code} before it was healthy:\n{self.log_tail()}")
            if self._healthy():
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"the stand-in server was not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        # Our own http://127.0.0.1 URL: no user-supplied scheme reaches urlopen.
        request = urllib.request.Request(self.url + "/health", headers=self.headers())  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=1.0) as response:  # noqa: S310
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, *, grace: float = 3.0) -> int | None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``grace``). Idempotent.

        Returns:
            The exit code, or ``None`` if it was never started.
        """
        proc = self._proc
        if self.state is StandinState.STOPPED or proc is None:
            self.state = StandinState.STOPPED
            return None if proc is None else proc.returncode
        self.state = StandinState.STOPPED
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            # Whatever the server started dies with it, even when the leader already exited.
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return proc.returncode

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    killpg = getattr(os, "killpg", None)
    try:
        if killpg is not None:
            killpg(pid, sig)
        else:  # pragma: no cover - platforms without process groups
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
