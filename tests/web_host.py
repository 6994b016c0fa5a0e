"""The web apps of ``examples/`` on a real uvicorn server, as the tests and the benchmark run them.

Two halves, one module (importable as ``web_host``: tests/ is on sys.path):

* **In the server** (``uvicorn web_host:create_app --factory``): :func:`create_app` imports the
  example named by ``WEB_HOST_EXAMPLE`` (``web_app``, ``web_app_isolated``, ``web_app_engine``)
  unchanged and wraps its ASGI app in :class:`Recorder`, which changes no request and no
  response. It writes one JSON line per request start and end (with the client's
  ``x-request-id`` and the status sent) to ``WEB_HOST_EVENTS``, and, when the example's lifespan
  has ended, the session's receipt to ``WEB_HOST_RECEIPT``. ``WEB_HOST_STANDIN=1`` uses the test
  hook the engine example documents: ``ENGINE["launcher"] = StandinLauncher()``, the SGLang
  stand-in, because SGLang cannot run on these machines.
* **In the test or benchmark**: :class:`WebServer` starts that server under the library's
  process layer (:func:`mineru_vram._process.spawn`: a keeper that kills it with the test) on a
  free loopback port, polls ``/health`` with a bound, and sends ``SIGTERM`` to uvicorn itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
TESTS_DIR = Path(__file__).resolve().parent
READY_TIMEOUT = 300.0  # seconds: the pipeline backend loads MinerU's models on 2 CPU cores
STOP_TIMEOUT = 120.0  # seconds: a graceful stop lets every running request finish first

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- in the server --------------------------------------------------------------------------------


class Recorder:
    """An ASGI wrapper that records each request's start and end; it changes nothing it passes on."""

    def __init__(self, app: ASGIApp, module: Any, events: Path | None, receipt: Path | None) -> None:
        self.app = app
        self.module = module
        self.events = events
        self.receipt = receipt
        self._lock = threading.Lock()

    def _record(self, **event: Any) -> None:
        if self.events is None:
            return
        line = json.dumps({"t": time.time(), **event}) + "\n"
        with self._lock, self.events.open("a", encoding="utf-8") as fh:
            fh.write(line)

    def _write_receipt(self) -> None:
        if self.receipt is None:
            return
        state = self.module.app.state
        session = getattr(state, "session", None)
        report = None if session is None else session.release_report
        engine = getattr(state, "engine", None)
        data = {
            "session_state": None if session is None else session.state.value,
            "documents_parsed": None if session is None else session.documents_parsed,
            "ok": None if report is None else report.ok,
            "problems": None if report is None else report.problems(),
            "text": None if report is None else str(report),
            "receipt": None if report is None else report.to_dict(),
            "engine_state": None if engine is None else engine.state.value,
        }
        self.receipt.write_text(json.dumps(data, default=str), encoding="utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":

            async def lifespan_send(message: Message) -> None:
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    self._write_receipt()
                await send(message)

            await self.app(scope, receive, lifespan_send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode() or None
        self._record(event="start", id=rid, path=scope["path"])
        status: list[int] = []

        async def http_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, http_send)
        finally:
            self._record(event="end", id=rid, path=scope["path"], status=status[0] if status else None)


def create_app() -> Recorder:
    """The example named by ``WEB_HOST_EXAMPLE``, wrapped in a :class:`Recorder` (uvicorn's ``--factory``)."""
    import importlib

    sys.path.insert(0, str(EXAMPLES_DIR))
    module = importlib.import_module(os.environ["WEB_HOST_EXAMPLE"])
    if os.environ.get("WEB_HOST_STANDIN") == "1":
        from mineru_vram.testing import StandinLauncher

        module.ENGINE["launcher"] = StandinLauncher()  # the engine example's documented test hook
    events = os.environ.get("WEB_HOST_EVENTS")
    receipt = os.environ.get("WEB_HOST_RECEIPT")
    return Recorder(module.app, module, Path(events) if events else None, Path(receipt) if receipt else None)


# --- in the test or the benchmark -----------------------------------------------------------------


class ServerError(RuntimeError):
    """The server did not start, or did not stop, within its bound."""


class WebServer:
    """One example app on uvicorn, on 127.0.0.1 and a free port, started under the keeper.

    Args:
        example: ``"web_app"``, ``"web_app_isolated"`` or ``"web_app_engine"``.
        folder: where the log, the events and the receipt go (also the server's working folder).
        env: variables for the server on top of this process's environment.
        standin: run the engine example on the SGLang stand-in.
        ready_timeout: seconds to wait for ``/health`` to answer 200.
    """

    def __init__(
        self,
        example: str,
        folder: Path,
        *,
        env: Mapping[str, str] | None = None,
        standin: bool = False,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.example = example
        self.folder = folder
        self.extra_env = dict(env or {})
        self.standin = standin
        self.ready_timeout = ready_timeout
        self.log_path = folder / "server.log"
        self.events_path = folder / "events.jsonl"
        self.receipt_path = folder / "receipt.json"
        self.port = 0
        self.group: Any = None
        self.pid: int | None = None  # uvicorn's own pid (the keeper leads its group)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebServer:
        """:meth:`spawn`, then :meth:`wait_ready`."""
        return self.spawn().wait_ready()

    def spawn(self) -> WebServer:
        """Start uvicorn on a free port under the keeper; returns at once."""
        from mineru_vram._process import free_port, python_command, spawn

        self.port = free_port()
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            WEB_HOST_EXAMPLE=self.example,
            WEB_HOST_EVENTS=str(self.events_path),
            WEB_HOST_RECEIPT=str(self.receipt_path),
            WEB_HOST_STANDIN="1" if self.standin else "0",
        )
        argv = python_command(
            "uvicorn",
            "web_host:create_app",
            "--factory",
            "--app-dir",
            str(TESTS_DIR),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
        )
        self.group = spawn(argv, env=env, log_path=self.log_path, cwd=self.folder)
        self.pid = self.group.command_pid(timeout=10.0)
        return self

    def wait_ready(self) -> WebServer:
        """Poll ``/health`` until it answers 200 (at most ``ready_timeout``), then check the port is ours.

        Raises:
            ServerError: the server exited, did not answer in time, or another process serves the port.
        """
        import httpx

        from mineru_vram._process import listening_pids

        deadline = time.monotonic() + self.ready_timeout
        while True:
            if not self.group.alive():
                raise ServerError(f"{self.example} exited while starting; its log ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(
                    f"{self.example} did not answer /health within {self.ready_timeout:.0f} s; "
                    f"its log ends:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        listeners = listening_pids(self.port)
        if listeners is not None and self.pid not in listeners:
            self.kill()
            raise ServerError(f"port {self.port} is served by {sorted(listeners)}, not by our uvicorn ({self.pid})")
        return self

    def health(self) -> dict[str, Any]:
        import httpx

        answer = httpx.get(f"{self.url}/health", timeout=30.0)
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]

    def tree(self) -> list[int]:
        """The keeper, uvicorn and every live descendant (workers, engine servers)."""
        return [] if self.group is None else list(self.group.pids())

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """``SIGTERM`` uvicorn (not its group: as a service manager stops it) and wait for its exit code."""
        if self.pid is None:
            raise ServerError("the server was not started")
        os.kill(self.pid, signal.SIGTERM)
        code = self.group.wait(timeout)
        if code is None:
            raise ServerError(f"{self.example} did not exit within {timeout:.0f} s of SIGTERM:\n{self.log_tail()}")
        return int(code)

    def kill(self) -> None:
        if self.group is not None and self.group.alive():
            self.group.kill()

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.is_file():
            return []
        return [json.loads(line) for line in self.events_path.read_text(encoding="utf-8").splitlines() if line]

    def receipt(self) -> dict[str, Any] | None:
        if not self.receipt_path.is_file():
            return None
        return json.loads(self.receipt_path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
