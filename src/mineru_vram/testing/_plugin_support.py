"""The SGLang stand-in server behind the pytest plugin's ``mineru_vram_standin`` fixture.

Kept out of :mod:`mineru_vram.pytest_plugin` so loading the plugin stays cheap;
imported only when the fixture runs.
"""

from __future__ import annotations

import enum
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mineru_vram import _files, _process
from mineru_vram._config import child_environ
from mineru_vram._probe import device_index

__all__ = ["StandinServer", "StandinState"]


class StandinState(enum.Enum):
    """Lifecycle of a :class:`StandinServer`."""

    UNSTARTED = "unstarted"  # constructed; no process
    RUNNING = "running"  # answered /health; url, pid valid
    STOPPED = "stopped"  # its process group was killed; cannot be restarted


class StandinServer:
    """The SGLang stand-in (``mineru_vram.testing._standin``) on a loopback port.

    It runs through :func:`mineru_vram._process.spawn`: under the keeper, in a
    process group of its own that dies with this process, with a private working
    folder and an import path that does not include the folder pytest runs from.

    Args:
        model_path: the folder passed as ``--model-path``.
        api_key: the key the server requires.
        device: ``"cpu"``, or ``"cuda:N"`` (passed as ``--base-gpu-id N``).
        host: the loopback address to listen on.
        port: the port (default: one that is free now).
        extra_args: more command-line arguments for the stand-in.
        log_dir: a folder for the log and the working folder (created private;
            default: a new temporary folder).

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        api_key: the key the server requires (``Authorization: Bearer <key>``).
        pid: the server's process id (while it runs).
        pgid: its process group, led by the keeper.
        log_path: its combined stdout and stderr.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str],
        api_key: str,
        device: str = "cpu",
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or _process.free_port(host)
        self.api_key = api_key
        self.model_path = str(model_path)
        self.device = device
        self.extra_args = tuple(extra_args)
        self._log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="mineru-vram-standin-"))
        self.log_path = self._log_dir / f"standin-{self.port}.log"
        self._group: _process.ProcessGroup | None = None
        self._pid: int | None = None
        self.state = StandinState.UNSTARTED

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise RuntimeError("the stand-in server was never started")
        return self._pid

    @property
    def pgid(self) -> int:
        if self._group is None:
            raise RuntimeError("the stand-in server was never started")
        return self._group.pgid

    def __repr__(self) -> str:
        return f"StandinServer(url={self.url!r}, pid={self._pid}, state={self.state.value})"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, chars: int = 4000) -> str:
        return _process.log_tail(self.log_path, chars)

    def _device_args(self) -> list[str]:
        if self.device == "cpu":
            return ["--device", "cpu"]
        return ["--base-gpu-id", str(device_index(self.device))]

    def start(self, *, timeout: float = 60.0) -> StandinServer:
        """Start the server and wait until ``GET /health`` answers 200.

        Raises:
            RuntimeError: started twice, or it exited or did not get healthy within
                ``timeout`` seconds (the message carries the end of its log).
            ValueError: ``device`` is neither ``cpu`` nor ``cuda[:N]``.
        """
        if self.state is not StandinState.UNSTARTED:
            raise RuntimeError(f"this stand-in server is {self.state.value}; start a new one")
        argv = _process.python_command(
            "mineru_vram.testing._standin",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--api-key",
            self.api_key,
            "--model-path",
            self.model_path,
            *self._device_args(),
            *self.extra_args,
        )
        _files.private_dir(self._log_dir)
        # A folder of its own: nothing the server imports or writes by relative path mixes with the tests'.
        cwd = _files.private_dir(self._log_dir / "cwd")
        group = _process.spawn(argv, env=child_environ({"PYTHONUNBUFFERED": "1"}), log_path=self.log_path, cwd=cwd)
        self._group = group
        self.state = StandinState.RUNNING
        deadline = time.monotonic() + timeout
        while True:
            if not group.alive():
                code = self.stop()
                raise RuntimeError(f"the stand-in server exited with {code} before it was healthy:\n{self.log_tail()}")
            if self._healthy():
                self._pid = group.command_pid(timeout=5.0)
                self._check_listener(group)
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"the stand-in server was not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _check_listener(self, group: _process.ProcessGroup) -> None:
        """Make sure the server that answered is ours: the free port may have been taken meanwhile."""
        listeners = _process.listening_pids(self.port, self.host)
        if listeners is None or listeners & set(group.pids()):
            return  # ours, or a platform where /proc cannot tell
        self.stop()
        raise RuntimeError(
            f"port {self.port} is served by another process (pids {sorted(listeners) or 'of another user'}), "
            "not by the stand-in; try again"
        )

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
        group = self._group
        if group is None:
            self.state = StandinState.STOPPED
            return None
        if self.state is StandinState.STOPPED:
            return group.popen.returncode
        self.state = StandinState.STOPPED
        return group.terminate(grace=grace)

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
