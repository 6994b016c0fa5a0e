"""What the HTTP engine servers share: readiness, health, load, memory calls, and launching ours.

:class:`HttpBackend` is any OpenAI-compatible server reached over HTTP (ours or
someone else's); :class:`ServerBackend` is one we launch: a free loopback port, the
API key in a ``0600`` file, a private working folder, the process group under the
keeper, and a log.

**Proving the port is ours.** A free port is only free when it is picked: another
local user can bind it before our server does, answer the readiness probe, and
collect the API key and then the page images of every parse. So nothing at all
is sent to the port until the kernel shows its listening socket held by one of
our server's own processes (:func:`mineru_vram._process.listening_pids`, which
never reports another user's process). A port someone else holds is given up for
another (a few times), and the key is never sent there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from mineru_vram import _files, _process
from mineru_vram._config import visible_devices
from mineru_vram._engine import http
from mineru_vram._engine.memory import processes_mib
from mineru_vram._engine.settings import EngineSettings
from mineru_vram._exceptions import ConfigurationError, EngineError, EngineStartError, EngineStateError
from mineru_vram._probe import DeviceMemory, device_index

from .base import BackendContext, EngineTraits, MemoryMove

__all__ = ["REDACTED", "HttpBackend", "ServerBackend", "gpu_flags", "new_api_key", "physical_gpu", "redact"]

logger = logging.getLogger("mineru_vram")

# Lines of the server's log that go into error messages.
LOG_TAIL_LINES = 40
# How many ports one start tries when another process holds the port picked.
PORT_ATTEMPTS = 3
# Characters of the server's log read for a tail (before it is cut to LOG_TAIL_LINES lines).
LOG_TAIL_CHARS = 8000
# What stands for an API key in log text we show.
REDACTED = "<redacted>"
# A key written as a field: SGLang logs server_args={..., 'api_key': '...', 'admin_api_key': None, ...}.
_KEY_FIELD = re.compile(
    r"""(?P<name>\b(?:admin_)?api[_-]key['"]?\s*[:=]\s*)(?P<quote>['"])(?P<value>[^'"\n]+)(?P=quote)""", re.I
)
_BEARER = re.compile(r"(?P<name>\bBearer\s+)(?P<value>[^\s'\"]+)", re.I)


class HttpBackend:
    """An OpenAI-compatible server over HTTP: readiness by ``/health`` then ``/v1/models``.

    Args:
        settings: the engine's settings.
    """

    traits: ClassVar[EngineTraits] = EngineTraits()
    name = "server"
    # The first readiness probe (no key), and how long it may take (None: health_timeout).
    ready_path: ClassVar[str] = "/health"
    ready_timeout: ClassVar[float | None] = None

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.url = ""
        self.api_key = ""
        self.model_id = settings.model_name or ""
        self.info: dict[str, Any] = {}

    # -- what every HTTP server answers ----------------------------------------------------------

    def _check_ready(self) -> bool:
        timeout = self.settings.health_timeout if self.ready_timeout is None else self.ready_timeout
        try:
            status, _ = http.request("GET", f"{self.url}{self.ready_path}", timeout=timeout)
            if status != 200:
                return False
            status, body = http.request("GET", f"{self.url}/v1/models", api_key=self.api_key, timeout=5.0)
        except OSError:
            return False
        if status == 401:
            raise EngineStartError(f"{self.url} refused the API key (401 on /v1/models)", url=self.url)
        if status != 200 or not isinstance(body, dict) or not body.get("data"):
            return False
        self.model_id = str(body["data"][0].get("id", "")) or self.model_id
        with contextlib.suppress(OSError):
            status, info = http.request("GET", f"{self.url}/server_info", api_key=self.api_key, timeout=5.0)
            if status == 200 and isinstance(info, dict):
                self.info = info
        return True

    def healthy(self, timeout: float, *, asleep: bool = False) -> bool:
        try:
            status, _ = http.request("GET", f"{self.url}/health", timeout=timeout)
        except OSError:
            return False
        return status == 200

    def busy(self, timeout: float) -> bool:
        """Running or waiting requests from SGLang's ``/v1/loads`` (our loopback server has it too)."""
        try:
            status, body = http.request(
                "GET", f"{self.url}/v1/loads?include=core", api_key=self.api_key, timeout=timeout
            )
        except OSError:
            return False
        if status != 200 or not isinstance(body, dict):
            return False  # a server without /v1/loads: the engine relies on its own in-flight count
        loads = body.get("loads") or []
        return any((load.get("num_running_reqs") or 0) + (load.get("num_waiting_reqs") or 0) for load in loads)

    def _post(self, path: str, body: Any, timeout: float) -> Any:
        try:
            status, answer = http.request("POST", f"{self.url}{path}", api_key=self.api_key, body=body, timeout=timeout)
        except OSError as exc:
            raise EngineError(
                f"POST {path} to {self.url} got no answer (bound {timeout:g} s): {exc}", url=self.url, timeout=timeout
            ) from exc
        if status != 200:
            message = http.find_key(answer, "message") or answer
            raise EngineError(f"POST {path} to {self.url} answered {status}: {message}", url=self.url, status=status)
        return answer

    def release(self, timeout: float) -> MemoryMove:
        """SGLang's ``/release_memory_occupation`` (our transformers server has it too)."""
        answer = self._post("/release_memory_occupation", {}, timeout=timeout)
        return MemoryMove(str(http.find_key(answer, "note") or ""), _moved_mib(answer))

    def resume(self, timeout: float) -> MemoryMove:
        answer = self._post("/resume_memory_occupation", {}, timeout=timeout)
        return MemoryMove("", _moved_mib(answer))

    # -- no process of ours ----------------------------------------------------------------------

    def exitcode(self) -> int | None:
        return None

    def alive(self) -> bool:
        return True

    def shutdown(self, grace: float) -> None:
        return None

    def pid(self) -> int | None:
        return None

    def pids(self) -> list[int]:
        return []

    def log_path(self) -> Path | None:
        return None

    def log_tail(self) -> str:
        return ""

    def memory_mib(self, info: DeviceMemory | None) -> float | None:
        return processes_mib(info, self.pids())


class ServerBackend(HttpBackend):
    """A server process of ours, on a loopback port, under the keeper."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.process: _process.ProcessGroup | None = None
        self._server_pid: int | None = None
        self._ctx: BackendContext | None = None
        self._ports_given_up: list[int] = []
        self._keys: list[str] = []  # every key a server of ours was given: its log holds them all
        self.port = _process.free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def argv(self, ctx: BackendContext) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def server_env(self, ctx: BackendContext) -> dict[str, str]:
        """What the server needs in its environment beyond ``ctx.environ``."""
        return {}

    def server_environ(self, ctx: BackendContext) -> dict[str, str]:
        """The server's whole environment: ``ctx.environ`` and :meth:`server_env`."""
        return {**ctx.environ, **self.server_env(ctx)}

    def write_key(self, ctx: BackendContext) -> None:
        """Hand the server its key in a file only this user can read (SGLang's ``--config``; JSON is YAML)."""
        with _files.private_file(ctx.config_path, "wb") as fh:
            fh.write(json.dumps({"api-key": ctx.api_key}).encode())

    def launch(self, ctx: BackendContext) -> None:
        self._ctx = ctx
        self._ports_given_up = []
        self._start(ctx)

    def _start(self, ctx: BackendContext) -> None:
        self.api_key = ctx.api_key
        if ctx.api_key not in self._keys:
            self._keys.append(ctx.api_key)
        self.write_key(ctx)
        if not _process.port_free(self.port):
            self.port = _process.free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        argv = self.argv(ctx)
        self._server_pid = None
        with _files.private_file(ctx.log_path, "ab") as fh:
            fh.write(f"\n--- mineru-vram: {' '.join(argv)}\n".encode())
        env = self.server_environ(ctx)
        self.process = ctx.launcher(argv, env=env, log_path=ctx.log_path, cwd=ctx.cwd)

    def holds_port(self) -> bool | None:
        """Whether the port's listening socket belongs to one of our server's processes.

        ``None`` where the operating system cannot tell (no ``/proc``): readiness then
        trusts the port as earlier versions did.
        """
        holders = _process.listening_pids(self.port)
        if holders is None:
            return None
        return bool(holders & set(self.pids()))

    def _move_port(self) -> None:
        """Give up a port another process holds: stop our server, and start it on another port.

        Raises:
            EngineStartError: ``PORT_ATTEMPTS`` ports were taken in turn.
        """
        taken = self.port
        self._ports_given_up.append(taken)
        if len(self._ports_given_up) >= PORT_ATTEMPTS:
            raise EngineStartError(
                f"the {self.name} server could not take a loopback port: ports "
                f"{', '.join(map(str, self._ports_given_up))} were each held by a process that is not ours "
                "(another local user?). Nothing was sent to them.",
                ports=list(self._ports_given_up),
            )
        logger.warning("port %d is held by a process that is not our %s server; trying another", taken, self.name)
        if self.process is not None:
            self.process.kill()
        self.port = _process.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        assert self._ctx is not None  # set by launch()
        self._start(self._ctx)

    def wait_ready(self, deadline: float, stop: threading.Event) -> None:
        interval = 0.05
        taken_before = False
        while True:
            ours = self.holds_port()
            taken = ours is False and not _process.port_free(self.port)
            code = self.exitcode()
            # Taken twice in a row (our own server may be between bind and listen once), or taken
            # while ours is dead: someone else listens there. Never probe it.
            if taken and (taken_before or code is not None):
                self._move_port()
                taken_before = False
                continue
            taken_before = taken
            if code is not None:
                tail = self.log_tail()
                raise EngineStartError(
                    f"the {self.name} server exited with code {code} while starting. Log tail:\n{tail}",
                    exitcode=code,
                    log_tail=tail,
                )
            if ours is not False and self._check_ready():
                assert self.process is not None
                self._server_pid = self.process.command_pid()
                return
            if stop.is_set():
                raise EngineStateError("the engine was stopped while it was starting")
            if time.monotonic() >= deadline:
                tail = self.log_tail()
                raise EngineStartError(
                    f"the {self.name} server at {self.url} did not become ready within "
                    f"{self.settings.start_timeout:.0f} s (start_timeout). Log tail:\n{tail}",
                    log_tail=tail,
                )
            stop.wait(interval)
            interval = min(interval * 1.5, 1.0)

    def exitcode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        # A client sees its connection reset only after the server process is gone (a zombie
        # at least), while the keeper may not have reaped it yet: look at the server itself.
        if self.exitcode() is not None:
            return False
        pid = self._server_pid
        if pid is None:
            return True
        import psutil

        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def release(self, timeout: float) -> MemoryMove:
        move = super().release(timeout)
        if move.note:
            return move
        if self.info and not _truthy(http.find_key(self.info, "enable_memory_saver")):
            note = "the server reports enable_memory_saver off: SGLang's release does nothing without it"
            return MemoryMove(note, move.moved_mib)
        return move

    def resume(self, timeout: float) -> MemoryMove:
        answer = self._post("/resume_memory_occupation", {}, timeout=timeout)
        where = http.find_key(answer, "weights_device")  # our transformers server says where its weights are
        if where is not None and self.settings.device != "cpu" and not str(where).startswith("cuda"):
            raise EngineError(f"the {self.name} server resumed, but its weights are on {where}", url=self.url)
        return MemoryMove("", _moved_mib(answer))

    def shutdown(self, grace: float) -> None:
        if self.process is not None:
            self.process.terminate(grace=grace)

    def pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.command_pid() or self.process.pid

    def pids(self) -> list[int]:
        return [] if self.process is None else self.process.pids()

    def log_path(self) -> Path | None:
        return None if self.process is None else self.process.log_path

    def log_tail(self) -> str:
        """The last lines of the server's log, with every API key it was given redacted.

        SGLang logs its ``server_args``, API key included, at start; this text goes into
        exceptions, ``status().last_error`` and whatever logs those, so no key may stay in it.
        """
        if self.process is None:
            return ""
        text = self.process.log_tail(LOG_TAIL_CHARS)
        if len(text) >= LOG_TAIL_CHARS:
            # Cut mid-line: the first line may start inside a key, where neither rule finds it.
            text = text.partition("\n")[2]
        return redact("\n".join(text.splitlines()[-LOG_TAIL_LINES:]), self._keys)


def new_api_key() -> str:
    """A random API key for a server of ours: 24 random bytes as URL-safe text, never starting with ``-``.

    SGLang turns each key of its ``--config`` file into command-line arguments
    (``--api-key VALUE``), and argparse takes a value that starts with ``-`` for an
    option and exits: one URL-safe token in 64 begins with ``-``.
    """
    while True:
        key = secrets.token_urlsafe(24)
        if not key.startswith("-"):
            return key


def redact(text: str, keys: Iterable[str] = ()) -> str:
    """``text`` with each of ``keys``, and any value written as an API key field or a bearer token, redacted.

    Args:
        text: log text.
        keys: keys known to be secret (ours); each is replaced wherever it appears.
    """
    for key in keys:
        if key:
            text = text.replace(key, REDACTED)
    text = _KEY_FIELD.sub(lambda m: f"{m['name']}{m['quote']}{REDACTED}{m['quote']}", text)
    return _BEARER.sub(lambda m: f"{m['name']}{REDACTED}", text)


def physical_gpu(device: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a child process this process's ``cuda:N``.

    Raises:
        ConfigurationError: ``cuda:N`` is not among this process's visible devices.
    """
    index = device_index(device)
    visible = visible_devices()
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ConfigurationError(f"{device} is not among CUDA_VISIBLE_DEVICES={','.join(visible)}", device=device)
    return visible[index]


def gpu_flags(device: str) -> list[str]:
    """SGLang's device flags (our transformers server takes the same)."""
    if device == "cpu":
        return ["--device", "cpu"]
    return ["--device", "cuda", "--base-gpu-id", str(device_index(device))]


def _moved_mib(answer: Any) -> float | None:
    value = http.find_key(answer, "moved_mib")
    try:
        return None if value is None else abs(float(value))
    except (TypeError, ValueError):
        return None


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")
