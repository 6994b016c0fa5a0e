"""``ResidentEngine``: one process-wide VLM engine, shared, sleepable, supervised.

MinerU's VLM path parses through a VLM engine. This module keeps one loaded for
the life of the process, shared by every :class:`ModelSession` and thread, with
its memory under control:

* ``sglang``: an SGLang server subprocess on 127.0.0.1, a free port, a random API
  key (passed in a private ``--config`` file, not on the command line), started
  with ``--enable-memory-saver`` so ``sleep()`` really returns its memory, and
  ``--mem-fraction-static`` computed from ``vram_budget_gib`` and the card's total.
  MinerU 4 dropped its SGLang engine, but its http-client speaks the OpenAI API,
  which SGLang serves.
* ``vllm``: a ``vllm serve`` process, started with ``--enable-sleep-mode`` and
  ``VLLM_SERVER_DEV_MODE=1`` so ``sleep()`` is vLLM's level-1 sleep (weights to host
  memory, KV cache dropped) and ``wake()`` its ``/wake_up``; the budget becomes
  ``--gpu-memory-utilization``; the key travels in ``VLLM_API_KEY``, the device in
  ``CUDA_VISIBLE_DEVICES``. (MinerU's own ``vllm-engine`` runs vLLM inside the
  parsing process, whose memory could only be returned by ending that process.)
* ``transformers``: MinerU's transformers VLM engine (what MinerU calls its
  in-process engine, ``ModelSingleton().get_model("transformers", ...)``), run in a
  child process that serves it on a loopback OpenAI-compatible endpoint
  (``_vlm_serve.py``). MinerU's ``parse()`` configuration cannot select this engine
  at all; served this way, MinerU's http-client is the one parse path for every
  engine, and the VLM's weights and CUDA context are not counted in the release
  receipts of the sessions in this process.
* ``attach``: a server someone else runs; never started or stopped here.

The supervisor runs the server under a small *keeper* process that is the
leader of its own process group and dies, taking the group with it, when this
process dies (``PR_SET_PDEATHSIG`` plus a parent-pid watch); ``stop()`` kills the
whole group and waits until NVML shows the memory returned. A monitor thread
restarts a crashed or hung server with exponential backoff (callers get
:class:`EngineCrashedError`, never a hang) and applies ``keep_alive``.

SGLang facts this relies on (sglang 0.5.23, ``sglang/srt/server_args.py`` and
``sglang/srt/entrypoints/http_server.py``): the flags ``--model-path``, ``--host``,
``--port``, ``--mem-fraction-static``, ``--enable-memory-saver``, ``--device``,
``--base-gpu-id``, ``--served-model-name`` and ``--config`` (a YAML file, whose
keys become flags; JSON is valid YAML); ``/health`` needs no key, every other
endpoint needs the key; ``/release_memory_occupation`` asserts the server is
idle and does nothing without ``--enable-memory-saver``; ``/v1/loads`` reports
``num_running_reqs`` and ``num_waiting_reqs``. SGLang sizes its static pool as
``mem_fraction_static`` times the memory it finds free before loading weights,
so on a card shared with others the pool is smaller than the budget, never larger.

vLLM facts (its ``entrypoints/cli/main.py``, ``entrypoints/serve/sleep/api_router.py``
and API server): ``vllm serve MODEL`` takes ``--host``, ``--port``,
``--served-model-name``, ``--gpu-memory-utilization`` (a fraction of the card's
total for this instance) and ``--enable-sleep-mode``; ``POST /sleep?level=1&mode=...``,
``POST /wake_up`` and ``GET /is_sleeping`` exist only with ``VLLM_SERVER_DEV_MODE=1``;
the key is taken from ``VLLM_API_KEY``; ``/metrics`` reports
``vllm:num_requests_running`` and ``vllm:num_requests_waiting``. Neither SGLang nor
vLLM can be installed on this project's machines: both paths are tested against
the stand-in (``_standin.py``), never against the real servers.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from ._budget import (
    Ledger,
    MemoryProbe,
    Reservation,
    VramBudget,
    admit,
    holders_text,
    nvml_probe,
    resolve_budget,
)
from ._exceptions import (
    AdmissionTimeoutError,
    BackendNotAvailableError,
    ConfigurationError,
    EngineAdmissionError,
    EngineCrashedError,
    EngineError,
    EngineStartError,
    EngineStateError,
    MineruVramError,
)
from ._probe import DeviceMemory, _visible_devices, resolve_device

__all__ = [
    "EngineState",
    "EngineStatus",
    "Launcher",
    "MemoryReport",
    "ResidentEngine",
    "ServerProcess",
    "build_sglang_argv",
    "launch_process",
    "parse_keep_alive",
]

logger = logging.getLogger("mineru_vram")

EngineKind = Literal["sglang", "vllm", "transformers", "attach"]
ENGINES = ("sglang", "vllm", "transformers", "attach")
# vLLM's default --gpu-memory-utilization: what a vllm engine without a budget takes of the card.
VLLM_DEFAULT_UTILIZATION = 0.9
MIB = 1024 * 1024
# Moves smaller than this are not waited for: NVML's per-process figure may not change at all
# when a few MiB come and go (the driver serves them from memory it already holds).
NVML_RESOLUTION_MIB = 4.0


class EngineState(enum.Enum):
    """Lifecycle of a :class:`ResidentEngine`."""

    NEW = "new"  # constructed; nothing started, no memory held
    STARTING = "starting"  # launching (or restarting after a crash) and waiting for readiness
    READY = "ready"  # serving; sessions parse through it
    SLEEPING = "sleeping"  # process alive, device memory released; the next request wakes it
    UNLOADED = "unloaded"  # stopped by keep_alive (action "stop"); the next request starts it again
    CRASHED = "crashed"  # died and could not be restarted (or failed to start); start() tries again
    STOPPED = "stopped"  # stop() was called; final, nothing held


# --- keep_alive ------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_keep_alive(value: str | float | timedelta | None) -> float | None:
    """Turn a keep-alive spec into seconds; ``None`` means "never expire".

    Accepts seconds as a number, a :class:`~datetime.timedelta`, or a string such
    as ``"10m"``, ``"30s"``, ``"1h30m"``, ``"250ms"``, ``"90"``. A negative value,
    ``"never"`` or ``None`` never expires (as Ollama's ``keep_alive=-1``); ``0``
    expires as soon as the engine is idle.

    Raises:
        ConfigurationError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigurationError(f"keep_alive={value!r}: expected seconds or a duration like '10m'", keep_alive=value)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return None if seconds < 0 else seconds
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ConfigurationError("keep_alive=nan is not a duration", keep_alive=value)
        return None if value < 0 or math.isinf(value) else float(value)
    text = str(value).strip().lower()
    if text in ("", "never", "inf", "none", "forever"):
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return parse_keep_alive(number)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ConfigurationError(
            f"keep_alive={value!r}: expected seconds or a duration like '30s', '10m', '1h30m', or 'never'",
            keep_alive=value,
        )
    return total


# --- processes ------------------------------------------------------------------------------------

# The keeper: leader of the server's process group. It starts the server, waits
# for it, and kills the whole group when this (its parent) process dies, even by
# SIGKILL. PR_SET_PDEATHSIG fires when the *thread* that started the keeper exits,
# so on that signal the keeper checks whether its parent process is really gone;
# a parent-pid poll covers the signal being missed.
_KEEPER = r"""
import os, signal, subprocess, sys
parent = int(sys.argv[1])
argv = sys.argv[2:]

def others():
    me, group, out = os.getpid(), os.getpgid(0), []
    try:
        names = os.listdir('/proc')
    except OSError:  # no /proc (not Linux): the engine's stop() still kills the group
        names = []
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open('/proc/%s/stat' % name, 'rb') as fh:
                stat = fh.read()
            if int(stat[stat.rindex(b')') + 2:].split()[2]) == group:
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            pass
    return out

def kill_others():
    for pid in others():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

def orphaned():
    return os.getppid() != parent

def on_term(signum, frame):
    if orphaned():
        kill_others()
        os._exit(128 + signum)
    # Otherwise: the engine's stop() signalled the group (the server exits, we follow),
    # or the thread that started us exited (the parent process lives on).

signal.signal(signal.SIGTERM, on_term)
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
if orphaned():
    sys.exit(137)
child = subprocess.Popen(argv)
while True:
    try:
        code = child.wait(timeout=0.25)
        break
    except subprocess.TimeoutExpired:
        if orphaned():
            kill_others()
            os._exit(137)
kill_others()
sys.exit(code if code >= 0 else 128 - code)
"""


class ServerProcess:
    """A server running under the keeper, in its own process group.

    Attributes:
        pid: the keeper's pid, which is also the process group id.
        log_path: where the server's stdout and stderr go.
    """

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid
        self.log_path = log_path

    def poll(self) -> int | None:
        """The exit code once the server (and so the keeper) has exited, else ``None``."""
        return self.popen.poll()

    def server_pid(self) -> int | None:
        """The server's own pid (the keeper's child), while it runs."""
        import psutil

        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return None
        return children[0].pid if children else None

    def pids(self) -> list[int]:
        """The keeper and every live descendant."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [self.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.Error:
            return []

    def terminate(self, *, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap.

        Also kills any descendant that left the group. Returns the exit code.
        """
        import psutil

        procs: list[psutil.Process] = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        _signal_group(self.pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        _signal_group(self.pgid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            logger.error("server process group %s did not exit after SIGKILL", self.pgid)
        psutil.wait_procs(procs, timeout=5)
        return self.popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path | None, lines: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def launch_process(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> ServerProcess:
    """The default launcher: start ``argv`` under the keeper, output appended to ``log_path``.

    The keeper is started with ``start_new_session`` (its own session and process
    group), stdin closed, and is exec'd at once (no fork of this process's CUDA state).
    """
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-c", _KEEPER, str(os.getpid()), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    return ServerProcess(popen, log_path)


class Launcher(Protocol):
    """Starts a server command line; the seam tests use to run a stand-in instead of SGLang."""

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> ServerProcess: ...


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- HTTP to the server ---------------------------------------------------------------------------


def _http(
    method: str, url: str, *, api_key: str | None = None, body: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One request with urllib, never through a proxy (these are loopback servers).

    Returns:
        ``(status, parsed body)``; raises ``OSError`` (``URLError``, timeouts) when no answer came.
    """
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - http:// only
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return status, parsed


def _find_key(data: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in nested dicts (SGLang may nest server args)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """What :meth:`ResidentEngine.get` compares: everything but injected collaborators."""

    engine: str
    model_path: str | None
    device: str
    vram_budget_gib: float | None
    mem_fraction: float | None
    budget: VramBudget | None
    keep_alive: float | None
    keep_alive_action: str
    url: str | None
    model_name: str | None
    extra_args: tuple[str, ...]
    start_timeout: float
    stop_timeout: float
    idle_timeout: float
    health_interval: float
    health_timeout: float
    health_failures: int
    max_restarts: int
    restart_backoff: float
    http_timeout: int
    max_concurrency: int
    headroom_gib: float
    max_new_tokens: int | None
    python: str | None
    runtime_dir: str | None


def build_sglang_argv(
    *,
    model_path: str,
    port: int,
    config_path: Path,
    device: str,
    mem_fraction: float | None,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
    python: str | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    """The ``sglang.launch_server`` command line for sglang 0.5.23's ``server_args``.

    The API key is not on it: it is in ``config_path`` (SGLang's ``--config`` YAML),
    so other users of the machine cannot read it from the process list.
    """
    argv = [
        python or sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--config",
        str(config_path),
        "--enable-memory-saver",
    ]
    if mem_fraction is not None:
        argv += ["--mem-fraction-static", f"{mem_fraction:.3f}"]
    if device == "cpu":
        argv += ["--device", "cpu"]
    else:
        argv += ["--device", "cuda", "--base-gpu-id", device.partition(":")[2] or "0"]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    argv += list(extra_args)
    return argv


def build_vllm_argv(
    *,
    model_path: str,
    port: int,
    mem_fraction: float | None,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
    python: str | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    """The ``vllm serve`` command line (``python -m vllm.entrypoints.cli.main serve``).

    ``--enable-sleep-mode`` makes ``/sleep`` and ``/wake_up`` release and resume the
    weights and KV cache (those endpoints also need ``VLLM_SERVER_DEV_MODE=1`` in the
    server's environment). The API key is not on the command line: the server reads
    it from ``VLLM_API_KEY`` in its environment, which other users cannot read. The
    device is chosen by ``CUDA_VISIBLE_DEVICES``, also in the environment.
    """
    argv = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--enable-sleep-mode",
    ]
    if mem_fraction is not None:
        argv += ["--gpu-memory-utilization", f"{mem_fraction:.3f}"]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    argv += list(extra_args)
    return argv


def physical_gpu(device: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a child process this process's ``cuda:N``."""
    index = int(device.partition(":")[2] or "0")
    visible = _visible_devices()
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ConfigurationError(f"{device} is not among CUDA_VISIBLE_DEVICES={','.join(visible)}", device=device)
    return visible[index]


def _weights_mib(model_path: str | None) -> float | None:
    if not model_path:
        return None
    root = Path(model_path)
    if not root.is_dir():
        return None
    total = sum(p.stat().st_size for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return total / MIB if total else None


# --- reports -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryReport:
    """What NVML saw around a sleep, wake, unload or stop.

    Attributes:
        action: ``"sleep"``, ``"wake"``, ``"unload"`` or ``"stop"``.
        seconds: from the call until NVML showed the change (or gave up).
        before_mib: the engine's processes on its device before (``None``: NVML cannot tell).
        after_mib: the same after.
        device_free_before_mib: the device's free memory before.
        device_free_after_mib: the same after.
        confirmed: whether NVML saw the memory move the expected way (``None`` without NVML).
        note: anything worth knowing (for instance a release that did nothing).
    """

    action: str
    seconds: float
    before_mib: float | None
    after_mib: float | None
    device_free_before_mib: float | None = None
    device_free_after_mib: float | None = None
    confirmed: bool | None = None
    note: str = ""

    @property
    def freed_mib(self) -> float | None:
        if self.before_mib is None or self.after_mib is None:
            return None
        return self.before_mib - self.after_mib

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "freed_mib": self.freed_mib}

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.0f} MiB"

        verdict = {True: "confirmed by NVML", False: "NOT confirmed by NVML", None: "NVML cannot tell"}[self.confirmed]
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.action}: {fmt(self.before_mib)} -> {fmt(self.after_mib)} in {self.seconds * 1000:.0f} ms "
            f"({verdict}){note}"
        )


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of :meth:`ResidentEngine.status`.

    Attributes:
        engine: ``sglang``, ``transformers`` or ``attach``.
        state: the :class:`EngineState`.
        url: the server's base URL.
        pid: the server process (this process for ``transformers``; ``None`` for ``attach``).
        restarts: restarts after crashes so far.
        memory_mib: the engine's processes on its device by NVML (``None``: NVML cannot tell).
        device: the engine's device.
        device_free_mib: the device's free memory by NVML.
        device_total_mib: the device's total memory by NVML.
        idle_seconds: since the last request ended (or the engine became ready).
        in_flight: parses running through the engine now.
        model: the served model name.
        mem_fraction_static: what SGLang was started with.
        keep_alive: seconds of idleness before ``keep_alive_action``; ``None`` never.
        last_error: the last crash or start failure, with the log's tail.
        log_path: the server's log file while it runs.
    """

    engine: str
    state: EngineState
    url: str
    pid: int | None
    restarts: int
    memory_mib: float | None
    device: str
    device_free_mib: float | None
    device_total_mib: float | None
    idle_seconds: float
    in_flight: int
    model: str
    mem_fraction_static: float | None
    keep_alive: float | None
    last_error: str | None
    log_path: str | None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data


# --- backends ------------------------------------------------------------------------------------


class _Backend:
    """One way to run the engine. The supervisor owns the state; a backend only acts."""

    supervised = True  # ours to start, restart and stop
    url = ""
    api_key = ""
    model_id = ""
    info: dict[str, Any]

    def launch(self) -> None:
        raise NotImplementedError

    def wait_ready(self, deadline: float, stop: threading.Event) -> None:
        raise NotImplementedError

    def exitcode(self) -> int | None:
        return None

    def alive(self) -> bool:
        """Whether the server is still there (as far as this process can tell)."""
        return self.exitcode() is None

    def healthy(self, timeout: float) -> bool:
        try:
            status, _ = _http("GET", f"{self.url}/health", timeout=timeout)
        except OSError:
            return False
        return status == 200

    def busy(self, timeout: float) -> bool:
        """Whether the server reports running or waiting requests (ours or anyone's)."""
        try:
            status, body = _http("GET", f"{self.url}/v1/loads?include=core", api_key=self.api_key, timeout=timeout)
        except OSError:
            return False
        if status != 200 or not isinstance(body, dict):
            return False  # a server without /v1/loads: rely on our own in-flight count
        loads = body.get("loads") or []
        return any((load.get("num_running_reqs") or 0) + (load.get("num_waiting_reqs") or 0) for load in loads)

    # How far the last release/resume moved the server's memory, as the server measured it
    # (our transformers server answers with it; SGLang does not: None).
    moved_mib: float | None = None

    def release(self) -> str:
        raise EngineStateError(f"the {type(self).__name__} cannot release memory")

    def resume(self) -> None:
        raise EngineStateError(f"the {type(self).__name__} cannot resume memory")

    def shutdown(self, grace: float) -> None:
        return None

    def pid(self) -> int | None:
        return None

    def pids(self) -> list[int]:
        return []

    def log_path(self) -> Path | None:
        return None

    def log_tail(self, lines: int = 40) -> str:
        return ""

    def memory_mib(self, info: DeviceMemory | None) -> float | None:
        """This engine's processes on the device, from one NVML reading of the device."""
        if info is None:
            return None
        pids = set(self.pids())
        if not pids:
            return None
        if not info.processes and info.used_mib > 0:
            return None  # NVML lists no processes here (a PID namespace hides them)
        return sum(p.used_mib for p in info.processes if p.pid in pids)


class _HttpServerBackend(_Backend):
    """Shared by servers reached over HTTP: readiness by /health, then /v1/models."""

    def _check_ready(self) -> bool:
        try:
            status, _ = _http("GET", f"{self.url}/health", timeout=2.0)
            if status != 200:
                return False
            status, body = _http("GET", f"{self.url}/v1/models", api_key=self.api_key, timeout=5.0)
        except OSError:
            return False
        if status == 401:
            raise EngineStartError(f"{self.url} refused the API key (401 on /v1/models)", url=self.url)
        if status != 200 or not isinstance(body, dict) or not body.get("data"):
            return False
        self.model_id = str(body["data"][0].get("id", "")) or self.model_id
        with contextlib.suppress(OSError):
            status, info = _http("GET", f"{self.url}/server_info", api_key=self.api_key, timeout=5.0)
            if status == 200 and isinstance(info, dict):
                self.info = info
        return True

    def _post(self, path: str, body: Any, timeout: float) -> Any:
        try:
            status, answer = _http("POST", f"{self.url}{path}", api_key=self.api_key, body=body, timeout=timeout)
        except OSError as exc:
            raise EngineError(f"POST {path} to {self.url} failed: {exc}", url=self.url) from exc
        if status != 200:
            message = _find_key(answer, "message") or answer
            raise EngineError(f"POST {path} to {self.url} answered {status}: {message}", url=self.url, status=status)
        return answer


class _ServerBackend(_HttpServerBackend):
    """A server process of ours: SGLang, or MinerU's transformers VLM (``_vlm_serve``)."""

    name = "server"

    def __init__(self, engine: ResidentEngine) -> None:
        self.engine = engine
        self.process: ServerProcess | None = None
        self._server_pid: int | None = None
        self.info = {}
        self.api_key = secrets.token_urlsafe(24)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_id = engine.settings.model_name or ""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def _launch_args(self) -> dict[str, Any]:
        """What every server command line takes from the engine's settings."""
        s = self.engine.settings
        assert s.model_path is not None  # checked by the engine
        return {
            "model_path": s.model_path,
            "port": self.port,
            "mem_fraction": self.engine.mem_fraction_static,
            "served_model_name": s.model_name,
            "extra_args": s.extra_args,
            "python": s.python,
        }

    def _config_path(self) -> Path:
        return self.engine._runtime_path() / "server-config.yaml"

    def launch(self) -> None:
        runtime = self.engine._runtime_path()
        # The key in a file only this user can read; JSON is valid YAML for SGLang's --config.
        fd = os.open(self._config_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"api-key": self.api_key}, fh)
        if not _port_free(self.port):
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        argv = self.argv()
        self._server_pid = None
        log = runtime / "server.log"
        with open(log, "ab") as fh:
            fh.write(f"\n--- mineru-vram: {' '.join(argv)}\n".encode())
        self.process = self.engine._launcher(argv, env=self.server_env(dict(os.environ)), log_path=log)

    def server_env(self, env: dict[str, str]) -> dict[str, str]:
        """The server process's environment (this process's, plus what the server needs)."""
        return env

    def wait_ready(self, deadline: float, stop: threading.Event) -> None:
        interval = 0.05
        while True:
            code = self.exitcode()
            if code is not None:
                raise EngineStartError(
                    f"the {self.name} server exited with code {code} while starting. Log tail:\n{self.log_tail()}",
                    exitcode=code,
                    log_tail=self.log_tail(),
                )
            if self._check_ready():
                assert self.process is not None
                self._server_pid = self.process.server_pid()
                return
            if stop.is_set():
                raise EngineStateError("the engine was stopped while it was starting")
            if time.monotonic() >= deadline:
                raise EngineStartError(
                    f"the {self.name} server at {self.url} did not become ready within "
                    f"{self.engine.settings.start_timeout:.0f} s. Log tail:\n{self.log_tail()}",
                    log_tail=self.log_tail(),
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

    def release(self) -> str:
        answer = self._post("/release_memory_occupation", {}, timeout=120)
        self.moved_mib = _moved_mib(answer)
        note = _find_key(answer, "note")
        if note:
            return str(note)
        if self.info and not _truthy(_find_key(self.info, "enable_memory_saver")):
            return "the server reports enable_memory_saver off: SGLang's release does nothing without it"
        return ""

    def resume(self) -> None:
        answer = self._post("/resume_memory_occupation", {}, timeout=300)
        self.moved_mib = _moved_mib(answer)
        where = _find_key(answer, "weights_device")  # our transformers server says where its weights are
        if where is not None and self.engine.settings.device != "cpu" and not str(where).startswith("cuda"):
            raise EngineError(f"the {self.name} server resumed, but its weights are on {where}", url=self.url)

    def shutdown(self, grace: float) -> None:
        if self.process is not None:
            self.process.terminate(grace=grace)

    def pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.server_pid() or self.process.pid

    def pids(self) -> list[int]:
        return [] if self.process is None else self.process.pids()

    def log_path(self) -> Path | None:
        return None if self.process is None else self.process.log_path

    def log_tail(self, lines: int = 40) -> str:
        return "" if self.process is None else self.process.log_tail(lines)


class _SGLangBackend(_ServerBackend):
    name = "sglang"

    def argv(self) -> list[str]:
        return build_sglang_argv(
            **self._launch_args(), config_path=self._config_path(), device=self.engine.settings.device
        )


class _TransformersBackend(_ServerBackend):
    """MinerU's transformers VLM engine in a child process (``python -m mineru_vram._vlm_serve``)."""

    name = "transformers"

    def __init__(self, engine: ResidentEngine) -> None:
        super().__init__(engine)
        s = engine.settings
        assert s.model_path is not None
        self.model_id = s.model_name or Path(s.model_path).name or "mineru-vlm"

    def argv(self) -> list[str]:
        s = self.engine.settings
        assert s.model_path is not None
        argv = [
            s.python or sys.executable,
            "-m",
            "mineru_vram._vlm_serve",
            "--model-path",
            s.model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--config",
            str(self._config_path()),
            "--served-model-name",
            self.model_id,
        ]
        if s.device == "cpu":
            argv += ["--device", "cpu"]
        else:
            argv += ["--device", "cuda", "--base-gpu-id", s.device.partition(":")[2] or "0"]
        if s.max_new_tokens is not None:
            argv += ["--max-new-tokens", str(s.max_new_tokens)]
        return argv + list(s.extra_args)

    def server_env(self, env: dict[str, str]) -> dict[str, str]:
        reservation = self.engine._reservation
        if reservation is not None and reservation.virtual_vram_gb is not None:
            env["MINERU_VIRTUAL_VRAM_SIZE"] = str(reservation.virtual_vram_gb)  # MinerU sizes its batches by it
        return env


class _VLLMBackend(_ServerBackend):
    """A ``vllm serve`` process with sleep mode: ``/sleep?level=1`` and ``/wake_up``."""

    name = "vllm"

    def argv(self) -> list[str]:
        return build_vllm_argv(**self._launch_args())

    def server_env(self, env: dict[str, str]) -> dict[str, str]:
        env["VLLM_API_KEY"] = self.api_key
        env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM serves /sleep, /wake_up and /is_sleeping only with it
        env["CUDA_VISIBLE_DEVICES"] = physical_gpu(self.engine.settings.device)
        return env

    def release(self) -> str:
        # Level 1: weights to host memory, KV cache dropped; the engine waited for idle already.
        self._post("/sleep?level=1&mode=wait", None, timeout=120)
        return ""

    def resume(self) -> None:
        self._post("/wake_up", None, timeout=300)

    def busy(self, timeout: float) -> bool:
        """Running or waiting requests, from vLLM's Prometheus ``/metrics``."""
        try:
            status, body = _http("GET", f"{self.url}/metrics", api_key=self.api_key, timeout=timeout)
        except OSError:
            return False
        if status != 200 or not isinstance(body, str):
            return False
        for line in body.splitlines():
            name = line.partition("{")[0].partition(" ")[0]
            if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                with contextlib.suppress(ValueError):
                    if float(line.rsplit(" ", 1)[1]) > 0:
                        return True
        return False


def _below_resolution(moved: float | None) -> str:
    if moved is None or moved >= NVML_RESOLUTION_MIB:
        return ""
    return f"the server moved {moved:.1f} MiB, below what NVML's per-process figure resolves"


def _moved_mib(answer: Any) -> float | None:
    value = _find_key(answer, "moved_mib")
    try:
        return None if value is None else abs(float(value))
    except (TypeError, ValueError):
        return None


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _AttachBackend(_HttpServerBackend):
    supervised = False

    def __init__(self, engine: ResidentEngine) -> None:
        s = engine.settings
        assert s.url is not None
        self.engine = engine
        self.info = {}
        self.url = s.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.api_key = engine._attach_key or ""
        self.model_id = s.model_name or ""

    def launch(self) -> None:
        return None

    def wait_ready(self, deadline: float, stop: threading.Event) -> None:
        while not self._check_ready():
            if stop.is_set():
                raise EngineStateError("the engine was stopped while attaching")
            if time.monotonic() >= deadline:
                raise EngineStartError(f"no OpenAI-compatible VLM server answered at {self.url}", url=self.url)
            stop.wait(0.2)

    def release(self) -> str:
        self._post("/release_memory_occupation", {}, timeout=120)
        return ""

    def resume(self) -> None:
        self._post("/resume_memory_occupation", {}, timeout=300)


# --- the engine ----------------------------------------------------------------------------------


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()

_global_lock = threading.RLock()  # re-entrant: get() stops a crashed engine, and stop() clears the slot
_global_engine: ResidentEngine | None = None
_live: weakref.WeakSet[ResidentEngine] = weakref.WeakSet()


class ResidentEngine:
    """One VLM engine that stays loaded, shared by every session and thread.

    Example::

        engine = ResidentEngine.get(engine="sglang", model_path="/models/MinerU2.5-Pro-2605-1.2B",
                                    vram_budget_gib=8, keep_alive="10m")
        with ModelSession(backend="vlm", engine=engine) as s:
            s.parse("paper.pdf")
        engine.sleep(); engine.wake(); engine.stop()

    :meth:`get` returns the process-wide instance; the class is also constructible
    directly (tests, or several engines on several devices).

    Args:
        engine: ``"sglang"``, ``"vllm"`` (a ``vllm serve`` process with sleep mode),
            ``"transformers"`` or ``"attach"``.
        model_path: the MinerU 2.5 VLM directory (``sglang``, ``vllm``, ``transformers``).
        device: ``"cuda:N"``, ``"cpu"``, ``N``; default the first GPU, else CPU.
        vram_budget_gib: the GPU memory SGLang may take for weights and KV cache;
            becomes ``--mem-fraction-static`` = budget / the card's total (SGLang applies the
            fraction to the memory it finds free, so a shared card gets less, never more).
        mem_fraction: ``--mem-fraction-static`` given directly (instead of a budget). For
            ``vllm`` both become ``--gpu-memory-utilization`` (vLLM's default, 0.9, without either).
        budget: a :class:`~mineru_vram.VramBudget` (or MiB as ``int``, a fraction as
            ``float`` <= 1, text like ``"8GiB"``): for SGLang it sizes the pool as
            ``vram_budget_gib`` does; for the transformers engine it is what admission
            waits for and sets ``MINERU_VIRTUAL_VRAM_SIZE`` in its process. Either way
            start and wake wait up to ``budget.timeout`` for the memory to be free
            (NVML, less what other mineru-vram processes reserved) and reserve it in
            the machine's ledger while the engine is awake. ``vram_budget_gib`` is the
            same with no wait.
        keep_alive: idle time before ``keep_alive_action`` (``"10m"``, ``"30s"``, seconds;
            ``None`` never). The next request wakes or restarts the engine.
        keep_alive_action: ``"sleep"`` (release memory, keep the process) or ``"stop"``.
        url: the server to use (``attach``).
        api_key: the key of an attached server.
        model_name: the served model name (``--served-model-name`` for SGLang).
        extra_args: more ``sglang.launch_server`` flags.
        start_timeout: seconds to wait for readiness.
        stop_timeout: seconds between SIGTERM and SIGKILL on stop.
        idle_timeout: seconds ``sleep``/``stop`` wait for running requests to finish.
        health_interval: seconds between health checks while ready.
        health_timeout: seconds one health check may take.
        health_failures: consecutive failed checks that count as a hang (the server is killed).
        max_restarts: restarts in a row after crashes before giving up (state ``crashed``).
        restart_backoff: first restart delay in seconds; doubles per failure (at most 30 s).
        http_timeout: MinerU's http-client read timeout, passed in :meth:`vlm_config`.
        max_concurrency: MinerU's concurrent requests to the engine.
        headroom_gib: memory beyond the budget that must be free before SGLang starts
            (CUDA context, activations, CUDA graphs).
        max_new_tokens: (transformers) cap on generated tokens per request.
        python: the interpreter that runs ``sglang.launch_server`` (default this one).
        runtime_dir: where the server's log and key file go (default a private temp dir).
        launcher: starts the server command line (default :func:`launch_process`).
        probe: reads a device's memory (default NVML through :func:`vram_snapshot`).
        ledger: the cross-process reservation ledger (default the machine's runtime folder's).
    """

    def __init__(
        self,
        engine: EngineKind = "sglang",
        *,
        model_path: str | os.PathLike[str] | None = None,
        device: str | int | None = None,
        vram_budget_gib: float | None = None,
        mem_fraction: float | None = None,
        budget: VramBudget | int | float | str | None = None,
        keep_alive: str | float | timedelta | None = None,
        keep_alive_action: Literal["sleep", "stop"] = "sleep",
        url: str | None = None,
        api_key: str | None = None,
        model_name: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 600.0,
        stop_timeout: float = 30.0,
        idle_timeout: float = 120.0,
        health_interval: float = 10.0,
        health_timeout: float = 20.0,
        health_failures: int = 3,
        max_restarts: int = 3,
        restart_backoff: float = 1.0,
        http_timeout: int = 600,
        max_concurrency: int = 100,
        headroom_gib: float = 1.0,
        max_new_tokens: int | None = None,
        python: str | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        launcher: Launcher | None = None,
        probe: MemoryProbe | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = _resolve_settings(
            engine=engine,
            model_path=model_path,
            device=device,
            vram_budget_gib=vram_budget_gib,
            mem_fraction=mem_fraction,
            budget=budget,
            keep_alive=keep_alive,
            keep_alive_action=keep_alive_action,
            url=url,
            model_name=model_name,
            extra_args=extra_args,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            idle_timeout=idle_timeout,
            health_interval=health_interval,
            health_timeout=health_timeout,
            health_failures=health_failures,
            max_restarts=max_restarts,
            restart_backoff=restart_backoff,
            http_timeout=http_timeout,
            max_concurrency=max_concurrency,
            headroom_gib=headroom_gib,
            max_new_tokens=max_new_tokens,
            python=python,
            runtime_dir=runtime_dir,
        )
        self._launcher: Launcher = launcher or launch_process
        self._probe: MemoryProbe = probe or nvml_probe
        self._ledger = ledger
        self._attach_key = api_key
        self.mem_fraction_static: float | None = self.settings.mem_fraction
        self._state = EngineState.NEW
        self._lifecycle = threading.RLock()  # start, restart, sleep, wake, unload, stop
        self._health_lock = threading.Lock()  # a health check, or a sleep/wake/stop: never both
        self._cond = threading.Condition()  # in-flight count and activity
        self._in_flight = 0
        self._last_activity = time.monotonic()
        self._generation = 0  # bumped on every crash; a lease compares it
        self._restarts = 0
        self._crash_streak = 0
        self._last_error: str | None = None
        self._failed_at = -math.inf
        self._stop_event = threading.Event()
        self._monitor: threading.Thread | None = None
        self._atexit_registered = False
        self._runtime: Path | None = None
        self._runtime_finalizer: Any = None  # weakref.finalize
        self.last_report: MemoryReport | None = None
        self._need_mib: float | None = None  # what admission waits for (set by the preflight)
        self._reservation: Reservation | None = None  # held in the ledger while the engine is awake
        self._backend: _Backend = self._make_backend()

    # -- construction helpers ------------------------------------------------------------------

    def _make_backend(self) -> _Backend:
        kind = self.settings.engine
        if kind == "sglang":
            return _SGLangBackend(self)
        if kind == "transformers":
            return _TransformersBackend(self)
        if kind == "vllm":
            return _VLLMBackend(self)
        return _AttachBackend(self)

    def _runtime_path(self) -> Path:
        if self._runtime is None:
            parent = self.settings.runtime_dir
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            # mkdtemp makes it 0700: the key file and the log are this user's only. Removed by
            # stop(), or when the engine is collected without ever having been stopped.
            self._runtime = Path(tempfile.mkdtemp(prefix="mineru-vram-engine-", dir=parent))
            self._runtime_finalizer = weakref.finalize(self, _remove_dir, str(self._runtime), os.getpid())
        return self._runtime

    # -- the process-wide instance -------------------------------------------------------------

    @classmethod
    def get(cls, engine: EngineKind | None = None, **settings: Any) -> ResidentEngine:
        """The process-wide engine for these settings, started on first use.

        32 threads asking at once start exactly one engine. Asking again with
        settings that differ from the running engine's raises; settings not
        passed are not compared, so ``ResidentEngine.get()`` returns the running one.

        Raises:
            ConfigurationError: (a ``ValueError``) the settings differ from the running
                engine's; the message names each difference.
            EngineStartError: the engine could not start.
        """
        global _global_engine
        asked = dict(settings)
        if engine is not None:
            asked["engine"] = engine
        with _global_lock:
            current = _global_engine
            if current is not None and current.state in (EngineState.STOPPED, EngineState.CRASHED):
                if current.state is EngineState.CRASHED:
                    current.stop()
                current = _global_engine = None
            if current is None:
                current = _global_engine = cls(**asked)
            else:
                differences = current._differences(asked)
                if differences:
                    raise ConfigurationError(
                        "ResidentEngine.get(): the process-wide engine is running with other settings: "
                        + "; ".join(differences)
                        + ". Use the same settings, or stop it first (ResidentEngine.get().stop()).",
                        differences=differences,
                    )
        current.start()
        return current

    @classmethod
    def current(cls) -> ResidentEngine | None:
        """The process-wide engine if one was created and not stopped, else ``None``."""
        engine = _global_engine
        return engine if engine is not None and engine.state is not EngineState.STOPPED else None

    @classmethod
    def attach(
        cls, url: str, *, api_key: str | None = None, model_name: str | None = None, **settings: Any
    ) -> ResidentEngine:
        """Use an OpenAI-compatible VLM server someone else runs (never started or stopped here).

        Raises:
            EngineStartError: nothing answered at ``url`` within ``start_timeout``.
        """
        settings.setdefault("start_timeout", 30.0)
        engine = cls("attach", url=url, api_key=api_key, model_name=model_name, **settings)
        return engine.start()

    def _differences(self, asked: Mapping[str, Any]) -> list[str]:
        ignored = {"launcher", "probe", "ledger", "api_key"}
        current = {f.name: getattr(self.settings, f.name) for f in dataclasses.fields(self.settings)}  # shallow
        norm = _resolve_settings(**{**current, **_user_keys(asked, ignored)})
        out = []
        for key in sorted(_user_keys(asked, ignored)):
            mine, theirs = getattr(self.settings, key), getattr(norm, key)
            if mine != theirs:
                out.append(f"{key}: running {mine!r}, asked {theirs!r}")
        return out

    # -- state and queries ---------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def url(self) -> str:
        return self._backend.url

    @property
    def restarts(self) -> int:
        return self._restarts

    def is_running(self) -> bool:
        """Whether the engine is up (ready or asleep)."""
        return self._state in (EngineState.READY, EngineState.SLEEPING)

    def vlm_config(self) -> dict[str, Any]:
        """The fields of MinerU's ``VlmConfig`` that point its http-client at this engine."""
        s = self.settings
        return {
            "server_url": self._backend.url + "/",
            "api_key": self._backend.api_key,
            "model": self._backend.model_id,
            "http_timeout": int(s.http_timeout),
            "max_concurrency": int(s.max_concurrency),
        }

    def status(self) -> EngineStatus:
        """State, URL, pid, restarts, memory by NVML and idle time."""
        info = self._probe(self.settings.device) if self.settings.device != "cpu" else None
        with self._cond:
            idle = time.monotonic() - self._last_activity
            in_flight = self._in_flight
        log = None if self._state is EngineState.STOPPED else self._backend.log_path()
        return EngineStatus(
            engine=self.settings.engine,
            state=self._state,
            url=self._backend.url,
            pid=self._backend.pid(),
            restarts=self._restarts,
            memory_mib=self._backend.memory_mib(info),
            device=self.settings.device,
            device_free_mib=None if info is None else info.free_mib,
            device_total_mib=None if info is None else info.total_mib,
            idle_seconds=idle,
            in_flight=in_flight,
            model=self._backend.model_id,
            mem_fraction_static=self.mem_fraction_static,
            keep_alive=self.settings.keep_alive,
            last_error=self._last_error,
            log_path=None if log is None else str(log),
        )

    def __repr__(self) -> str:
        return (
            f"ResidentEngine(engine={self.settings.engine!r}, device={self.settings.device!r}, "
            f"url={self._backend.url!r}, state={self._state.value})"
        )

    def __enter__(self) -> ResidentEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ResidentEngine:
        """Start the engine and wait until it serves. Idempotent while it runs.

        Raises:
            EngineStartError: it did not become ready (the message has the log's tail),
                or the device lacks the memory it needs (checked before starting).
            EngineStateError: the engine was stopped.
        """
        called = time.monotonic()
        with self._lifecycle:
            state = self._state
            if state in (EngineState.READY, EngineState.SLEEPING):
                return self
            if state is EngineState.STOPPED:
                raise EngineStateError("this engine was stopped; create a new one or call ResidentEngine.get()")
            if state is EngineState.CRASHED and self._failed_at >= called:
                # Another thread's start failed while this one waited: do not try again at once.
                raise EngineStartError(self._last_error or "the engine failed to start", log_tail=self._last_error)
            self._crash_streak = 0
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        self._stop_event.clear()
        self._state = EngineState.STARTING
        try:
            self._preflight()
            self._launch_and_wait()
        except BaseException as exc:
            self._release_reservation()
            self._state = EngineState.CRASHED
            self._failed_at = time.monotonic()
            self._last_error = str(exc)
            raise
        self._became_ready()

    def _became_ready(self) -> None:
        self._reservation_pids()
        with self._cond:
            self._last_activity = time.monotonic()
            self._state = EngineState.READY
            self._cond.notify_all()
        self._ensure_monitor()
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True
        _live.add(self)
        s = self.settings
        logger.info("resident %s engine ready at %s (%s)", s.engine, self._backend.url, s.device)

    def _launch_and_wait(self) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        try:
            self._backend.launch()
            self._backend.wait_ready(deadline, self._stop_event)
        except BaseException:
            with contextlib.suppress(Exception):
                self._backend.shutdown(grace=min(5.0, self.settings.stop_timeout))
            raise

    def _preflight(self) -> None:
        """Size the engine from its budget, then admit it: wait for the memory and reserve it."""
        s = self.settings
        self._need_mib = None
        if s.engine == "attach" or s.device == "cpu":
            return  # nothing to size, check or reserve on a device
        weights = _weights_mib(s.model_path)
        info = self._probe(s.device)
        budget = s.budget
        if budget is None and s.vram_budget_gib is not None:
            budget = VramBudget(mib=s.vram_budget_gib * 1024, timeout=0.0)
        need_mib: float | None = None
        if s.engine in ("sglang", "vllm"):
            if budget is not None:
                if info is None:
                    raise EngineStartError(
                        f"cannot turn a budget into --mem-fraction-static: NVML cannot read {s.device}; "
                        "pass mem_fraction= instead",
                        device=s.device,
                    )
                # Rounded down: the fraction never asks SGLang for more than the budget.
                self.mem_fraction_static = budget.engine_fraction(info.total_mib)
            fraction = self.mem_fraction_static
            if fraction is None and s.engine == "vllm":
                fraction = VLLM_DEFAULT_UTILIZATION  # what vLLM takes when not told
            if fraction is not None and info is not None:
                need_mib = fraction * info.total_mib
        elif budget is not None:
            need_mib = budget.need_mib(None if info is None else info.total_mib)
        elif weights is not None:
            need_mib = weights  # transformers: the weights, plus the headroom
        if need_mib is None:
            return
        if weights is not None and s.engine in ("sglang", "vllm") and weights >= need_mib:
            raise EngineStartError(
                f"the model's weights ({weights / 1024:.1f} GiB on disk) do not fit the "
                f"{need_mib / 1024:.1f} GiB budget on {s.device}, which must also hold the KV cache",
                needed_mib=weights,
                budget_mib=need_mib,
            )
        self._need_mib = need_mib
        self._admit()

    def _admit(self) -> None:
        """Wait until the device has the engine's memory free, and reserve it in the ledger.

        Free means NVML's figure less what other mineru-vram processes reserved and
        have not allocated; the wait lasts ``budget.timeout`` (none without ``budget=``).
        A reservation already held (a restart) is kept.

        Raises:
            EngineAdmissionError: the memory was not free in time.
        """
        s = self.settings
        need = self._need_mib
        if need is None or (self._reservation is not None and self._reservation.held):
            return
        # budget= waits for its timeout at its poll interval; vram_budget_gib, mem_fraction and no budget do not wait.
        budget = dataclasses.replace(
            s.budget or VramBudget(mib=need, timeout=0.0),
            mib=need,
            fraction=None,
            headroom_mib=s.headroom_gib * 1024,
            probe=self._probe,
        )
        try:
            self._reservation = admit(
                budget,
                s.device,
                what=f"the {s.engine} engine",
                ledger=self._ledger,
                pids=(),  # its server does not exist yet: all it will hold is spent from the reservation
            )
        except AdmissionTimeoutError as exc:
            info: DeviceMemory = exc.device_info  # the reading admission gave up on
            free, reserved = info.free_mib, float(exc.reserved_mib or 0.0)
            required = need + s.headroom_gib * 1024
            held = holders_text(info, gib=True)
            name = f" ({info.name})"
            total = f" of {info.total_mib / 1024:.1f} GiB"
            waited = f" within {budget.timeout:g} s" if budget.timeout else ""
            raise EngineAdmissionError(
                f"not enough free memory on {s.device}{name} to start the {s.engine} engine{waited}: it needs "
                f"{need / 1024:.1f} GiB plus {s.headroom_gib:g} GiB headroom = {required / 1024:.1f} GiB, and "
                f"NVML reports {free / 1024:.1f} GiB free{total}"
                + (f", of which other mineru-vram processes reserved {reserved / 1024:.1f} GiB" if reserved else "")
                + f" ({(free - reserved - required) / 1024:+.1f} GiB)."
                + (f" Holding memory: {held}." if held else "")
                + " Lower the budget, free the device, or give budget= a timeout to wait.",
                device=s.device,
                need_mib=need,
                needed_mib=required,
                free_mib=free,
                reserved_mib=reserved,
            ) from exc

    def _reservation_pids(self) -> None:
        """Count what the server's processes hold against the engine's reservation."""
        if self._reservation is not None:
            self._reservation.set_pids(self._backend.pids())

    def _release_reservation(self) -> None:
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            reservation.release()

    def _ensure_monitor(self) -> None:
        if self._monitor is not None and self._monitor.is_alive():
            return
        self._monitor = threading.Thread(
            target=_monitor_main, args=(weakref.ref(self),), name="mineru-vram-engine-monitor", daemon=True
        )
        self._monitor.start()

    # -- leases: how sessions use the engine ---------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[dict[str, Any]]:
        """Use the engine for one parse: wakes or starts it, counts the request, marks activity.

        Yields:
            The current :meth:`vlm_config`.

        Raises:
            EngineCrashedError: the engine crashed (and is down, or died during the parse).
            EngineStateError: the engine was stopped.
        """
        generation = self._acquire()
        ok = False
        try:
            yield self.vlm_config()
            ok = True
        except MineruVramError as exc:
            if self._crashed_since(generation):
                raise EngineCrashedError(
                    f"the {self.settings.engine} engine crashed during the parse: {self._last_error or exc}",
                    exitcode=self._backend.exitcode(),
                    log_tail=self._backend.log_tail(),
                ) from exc
            raise
        finally:
            self._release(ok=ok)

    def _acquire(self) -> int:
        s = self.settings
        wait = s.start_timeout + s.idle_timeout + 60 * max(1, s.max_restarts)
        if not self._lifecycle.acquire(timeout=wait):
            raise EngineStateError(f"the engine did not become available within {wait:.0f} s")
        try:
            state = self._state
            if state is EngineState.STOPPED:
                raise EngineStateError("the engine was stopped; create a new one or call ResidentEngine.get()")
            if state is EngineState.CRASHED:
                if s.engine == "attach":
                    self._start_locked()  # re-attach: the server may be back
                else:
                    raise EngineCrashedError(
                        f"the {s.engine} engine is down: {self._last_error}; call start() to try again",
                        log_tail=self._last_error,
                    )
            elif state in (EngineState.NEW, EngineState.UNLOADED):
                self._start_locked()
            elif state is EngineState.SLEEPING:
                self._wake_locked()
            with self._cond:
                self._in_flight += 1
                self._last_activity = time.monotonic()
            return self._generation
        finally:
            self._lifecycle.release()

    def _release(self, *, ok: bool) -> None:
        with self._cond:
            self._in_flight -= 1
            self._last_activity = time.monotonic()
            if ok:
                self._crash_streak = 0
            self._cond.notify_all()

    def _crashed_since(self, generation: int, *, grace: float = 0.5) -> bool:
        """Whether the engine crashed since ``generation``: asked after a parse failed.

        A client can see its connection reset a moment before the dying server is gone
        from the process table, so a live-looking server is watched for ``grace`` seconds.
        """
        deadline = time.monotonic() + grace
        while True:
            if (
                self._generation != generation
                or self._state in (EngineState.CRASHED, EngineState.STARTING)
                or not self._backend.alive()
            ):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineStateError(
                        f"{self._in_flight} request(s) still running after {timeout:.0f} s", in_flight=self._in_flight
                    )
                self._cond.wait(remaining)
        # Requests from outside this process (attach, or other clients of the port).
        while self._backend.busy(timeout=5.0):
            if time.monotonic() >= deadline:
                raise EngineStateError(f"the server still reports running requests after {timeout:.0f} s")
            time.sleep(0.05)

    # -- sleep and wake --------------------------------------------------------------------------

    def sleep(self) -> MemoryReport:
        """Release the engine's device memory; the process stays up. Waits for idle first.

        Returns:
            What NVML saw (also kept as :attr:`last_report`).

        Raises:
            EngineStateError: the engine is not running, or requests did not finish in time.
            EngineError: the server refused the release.
        """
        with self._lifecycle:
            if self._state is EngineState.SLEEPING:
                return MemoryReport("sleep", 0.0, None, None, note="already sleeping")
            if self._state is not EngineState.READY:
                raise EngineStateError(f"cannot sleep: the engine is {self._state.value}")
            return self._sleep_locked()

    def _sleep_locked(self) -> MemoryReport:
        self._wait_idle(self.settings.idle_timeout)
        with self._health_lock:  # no health generation may run into a release
            t0 = time.monotonic()
            before, free_before = self._reading()
            self._backend.moved_mib = None
            note = self._backend.release()
            after, free_after, confirmed = self._settle(before, direction=-1, expect_mib=self._backend.moved_mib)
            note = "; ".join(n for n in (note, _below_resolution(self._backend.moved_mib)) if n)
            with self._cond:
                self._state = EngineState.SLEEPING
            self._release_reservation()  # others may be admitted into what the engine gave back
        report = MemoryReport("sleep", time.monotonic() - t0, before, after, free_before, free_after, confirmed, note)
        self.last_report = report
        logger.info("resident engine %s", report)
        return report

    def wake(self) -> MemoryReport:
        """Take the released memory back; a no-op when awake.

        Raises:
            EngineStateError: the engine is not running.
        """
        with self._lifecycle:
            if self._state is EngineState.READY:
                return MemoryReport("wake", 0.0, None, None, note="already awake")
            if self._state is not EngineState.SLEEPING:
                raise EngineStateError(f"cannot wake: the engine is {self._state.value}")
            return self._wake_locked()

    def _wake_locked(self) -> MemoryReport:
        with self._health_lock:
            t0 = time.monotonic()
            self._admit()  # the memory it gave back may have been taken meanwhile: wait for it
            before, free_before = self._reading()
            self._backend.moved_mib = None
            try:
                self._backend.resume()
            except BaseException:
                self._release_reservation()
                raise
            self._reservation_pids()
            after, free_after, confirmed = self._settle(before, direction=+1, expect_mib=self._backend.moved_mib)
            note = _below_resolution(self._backend.moved_mib)
            with self._cond:
                self._state = EngineState.READY
                self._last_activity = time.monotonic()
        report = MemoryReport("wake", time.monotonic() - t0, before, after, free_before, free_after, confirmed, note)
        self.last_report = report
        logger.info("resident engine %s", report)
        return report

    def _reading(self) -> tuple[float | None, float | None]:
        if self.settings.device == "cpu":
            return None, None
        info = self._probe(self.settings.device)
        return self._backend.memory_mib(info), (None if info is None else info.free_mib)

    def _settle(
        self,
        before: float | None,
        *,
        direction: int,
        timeout: float = 10.0,
        pids: Sequence[int] | None = None,
        expect_mib: float | None = None,
    ) -> tuple[float | None, float | None, bool | None]:
        """Poll NVML until the engine's memory moved ``direction`` and two readings agree.

        SGLang's release can return before the memory is back (MINERU_FACTS); this
        is the confirmation. ``expect_mib`` is how far the server says it moved; a
        move NVML cannot resolve is not waited for (confirmed ``None``). Returns
        ``(after, device free after, confirmed)``.
        """
        if before is None or (expect_mib is not None and expect_mib < NVML_RESOLUTION_MIB):
            after, free = self._reading()
            return after, free, None
        deadline = time.monotonic() + timeout
        prev: float | None = None
        while True:
            info = self._probe(self.settings.device)
            if pids is not None:
                cur: float | None = 0.0 if info is None else sum(p.used_mib for p in info.processes if p.pid in pids)
            else:
                cur = self._backend.memory_mib(info)
            free = None if info is None else info.free_mib
            if cur is None:
                return None, free, None
            if cur is not None:
                moved = cur < before - 1.0 if direction < 0 else cur > before + 1.0
                if pids is not None:
                    moved = cur <= 0.5
                if moved and prev is not None and abs(cur - prev) < 1.0:
                    return cur, free, True
            if time.monotonic() >= deadline:
                return cur, free, False
            prev = cur
            time.sleep(0.05)

    # -- keep-alive and unload -----------------------------------------------------------------

    def _expire_if_idle(self) -> None:
        keep = self.settings.keep_alive
        if keep is None or not self._lifecycle.acquire(blocking=False):
            return
        try:
            with self._cond:
                idle = time.monotonic() - self._last_activity
                if self._state is not EngineState.READY or self._in_flight or idle < keep:
                    return
            action = self.settings.keep_alive_action
            logger.info("resident engine idle for %.1f s (keep_alive %.1f s): %s", idle, keep, action)
            if self.settings.keep_alive_action == "sleep":
                self._sleep_locked()
            else:
                self._unload_locked()
        except MineruVramError as exc:
            logger.warning("keep_alive could not %s the engine: %s", self.settings.keep_alive_action, exc)
        finally:
            self._lifecycle.release()

    def _unload_locked(self) -> MemoryReport:
        report = self._shutdown_locked("unload")
        with self._cond:
            self._state = EngineState.UNLOADED
        return report

    def _shutdown_locked(self, action: str) -> MemoryReport:
        t0 = time.monotonic()
        before, free_before = self._reading()
        pids = self._backend.pids()
        with self._health_lock:
            self._backend.shutdown(grace=self.settings.stop_timeout)
        after, free_after, confirmed = self._settle(before, direction=-1, pids=pids)
        self._release_reservation()
        report = MemoryReport(action, time.monotonic() - t0, before, after, free_before, free_after, confirmed)
        self.last_report = report
        logger.info("resident engine %s", report)
        return report

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> MemoryReport | None:
        """Stop the engine for good: kill the server's process group and wait for NVML.

        Idempotent. Waits up to ``idle_timeout`` for running requests, then stops anyway.
        An attached server is left running. Unregisters the atexit hook.

        Returns:
            What NVML saw, or ``None`` if nothing was running.
        """
        global _global_engine
        self._stop_event.set()
        report: MemoryReport | None = None
        with self._lifecycle:
            if self._state is EngineState.STOPPED:
                return self.last_report
            running = self._state in (EngineState.READY, EngineState.SLEEPING, EngineState.STARTING)
            if running:
                with contextlib.suppress(EngineStateError):
                    self._wait_idle_local(self.settings.idle_timeout)
            url = self._backend.url
            if running or self._backend.pids():
                report = self._shutdown_locked("stop")
            with self._cond:
                self._state = EngineState.STOPPED
                self._cond.notify_all()
            if self._atexit_registered:
                atexit.unregister(self._atexit)
                self._atexit_registered = False
            _live.discard(self)
            if self._runtime_finalizer is not None:
                self._runtime_finalizer()
                self._runtime_finalizer = None
                self._runtime = None
        if url:
            with contextlib.suppress(Exception):
                from ._adapter import drop_http_vlm_clients

                drop_http_vlm_clients(url)
        with _global_lock:
            if _global_engine is self:
                _global_engine = None
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=5)
        return report

    def _wait_idle_local(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight > 0 and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    def _atexit(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # at exit there is no one left to raise to
            logger.debug("stopping the resident engine at exit: %s", exc)

    # -- supervision (runs on the monitor thread) -----------------------------------------------

    def _tick(self, health: dict[str, float]) -> bool:
        """One round of supervision. Returns False when the monitor should exit."""
        state = self._state
        if state in (EngineState.STOPPED, EngineState.CRASHED) or self._stop_event.is_set():
            return False
        if state not in (EngineState.READY, EngineState.SLEEPING):
            return True
        code = self._backend.exitcode()
        if code is not None:
            self._on_crash(f"exited with code {code}")
            return True
        now = time.monotonic()
        if state is EngineState.READY and now >= health["next"]:
            # No health check while asleep: SGLang's /health runs a generation.
            health["next"] = now + self.settings.health_interval
            # Never during a sleep, wake or stop (they hold the lock); parses do not take it.
            if not self._health_lock.acquire(blocking=False):
                return True
            try:
                ok = self._state is not EngineState.READY or self._backend.healthy(self.settings.health_timeout)
            finally:
                self._health_lock.release()
            if ok:
                health["failures"] = 0
            else:
                health["failures"] += 1
                if health["failures"] >= self.settings.health_failures:
                    health["failures"] = 0
                    self._on_crash(f"did not answer {self.settings.health_failures} health checks in a row (hung)")
                    return True
        if state is EngineState.READY:
            self._expire_if_idle()
        return True

    def _on_crash(self, reason: str) -> None:
        with self._lifecycle:
            if self._state not in (EngineState.READY, EngineState.SLEEPING) or self._stop_event.is_set():
                return
            was_sleeping = self._state is EngineState.SLEEPING
            self._generation += 1
            self._crash_streak += 1
            tail = self._backend.log_tail()
            self._last_error = f"the {self.settings.engine} server {reason}" + (f". Log tail:\n{tail}" if tail else "")
            logger.error("resident engine: %s", self._last_error)
            with self._cond:
                self._state = EngineState.STARTING
            with contextlib.suppress(Exception):
                self._backend.shutdown(grace=min(5.0, self.settings.stop_timeout))
            if not self._backend.supervised:
                self._state = EngineState.CRASHED
                self._failed_at = time.monotonic()
                return
            self._restart_locked()
            if was_sleeping and self._state is EngineState.READY:
                # It was asleep when it died: a restart must not quietly take the memory back.
                with contextlib.suppress(MineruVramError):
                    self._sleep_locked()

    def _restart_locked(self) -> None:
        s = self.settings
        while True:
            if self._crash_streak > s.max_restarts:
                self._release_reservation()
                with self._cond:
                    self._state = EngineState.CRASHED
                    self._failed_at = time.monotonic()
                    self._cond.notify_all()
                logger.error("resident engine: giving up after %d restarts in a row", s.max_restarts)
                return
            delay = min(s.restart_backoff * 2 ** max(0, self._crash_streak - 1), 30.0)
            if self._stop_event.wait(delay):
                return
            self._restarts += 1
            logger.warning("resident engine: restart %d (after %.1f s)", self._restarts, delay)
            try:
                self._preflight()
                self._launch_and_wait()
            except MineruVramError as exc:
                self._crash_streak += 1
                self._last_error = f"restart {self._restarts} failed: {exc}"
                logger.error("resident engine: %s", self._last_error)
                continue
            self._became_ready()
            return


def _remove_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:  # never from a forked child
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _monitor_main(ref: weakref.ref[ResidentEngine]) -> None:
    health = {"next": 0.0, "failures": 0.0}
    first = ref()
    if first is None:
        return
    health["next"] = time.monotonic() + first.settings.health_interval
    tick = min(0.25, max(0.02, first.settings.health_interval / 4))
    stop = first._stop_event
    del first
    while not stop.wait(tick):
        engine = ref()
        if engine is None:
            return
        try:
            if not engine._tick(health):
                return
        except Exception:  # the monitor must survive anything a backend throws
            logger.exception("resident engine monitor")
        del engine


def _user_keys(asked: Mapping[str, Any], ignored: set[str]) -> dict[str, Any]:
    return {k: v for k, v in asked.items() if k not in ignored}


def _resolve_settings(
    *,
    engine: str,
    model_path: Any,
    device: Any,
    vram_budget_gib: float | None,
    mem_fraction: float | None,
    budget: Any,
    keep_alive: Any,
    keep_alive_action: str,
    url: str | None,
    model_name: str | None,
    extra_args: Sequence[str],
    start_timeout: float,
    stop_timeout: float,
    idle_timeout: float,
    health_interval: float,
    health_timeout: float,
    health_failures: int,
    max_restarts: int,
    restart_backoff: float,
    http_timeout: int,
    max_concurrency: int,
    headroom_gib: float,
    max_new_tokens: int | None,
    python: str | None,
    runtime_dir: Any,
) -> EngineSettings:
    """Validate and normalise the engine's arguments (no side effects).

    Every argument is required: the defaults live in :class:`ResidentEngine`'s signature alone.
    """
    kind = str(engine).strip().lower()
    if kind in ("vllm-engine", "vllm-async-engine"):
        raise BackendNotAvailableError(
            f"engine={engine!r} (vLLM inside this process) is not supported: its memory could only be returned by "
            "ending this process. Use engine='vllm', a supervised vLLM server with sleep mode",
            engine=engine,
        )
    if kind not in ENGINES:
        raise ConfigurationError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}", engine=engine)
    path: str | None = None
    if kind in ("sglang", "vllm", "transformers"):
        if model_path is None:
            raise ConfigurationError(f"the {kind} engine needs model_path=", engine=kind)
        candidate = Path(os.fspath(model_path)).expanduser()
        if candidate.exists():
            path = str(candidate.resolve())
        elif kind == "transformers":
            raise ConfigurationError(f"model_path={str(model_path)!r} does not exist", model_path=str(model_path))
        else:
            path = str(model_path)  # SGLang and vLLM also take a hub id
    if kind == "attach":
        if not url:
            raise ConfigurationError("the attach engine needs url=", engine=kind)
        if not re.match(r"^https?://[^/\s]+", url):
            raise ConfigurationError(f"url={url!r}: expected http(s)://host:port", url=url)
    elif url is not None:
        raise ConfigurationError(f"url= is for engine='attach', not {kind!r}", url=url)
    if vram_budget_gib is not None and mem_fraction is not None:
        raise ConfigurationError("pass vram_budget_gib= or mem_fraction=, not both")
    if vram_budget_gib is not None and (isinstance(vram_budget_gib, bool) or not vram_budget_gib > 0):
        raise ConfigurationError(
            f"vram_budget_gib={vram_budget_gib!r}: must be positive", vram_budget_gib=vram_budget_gib
        )
    if mem_fraction is not None and not 0 < mem_fraction < 1:
        raise ConfigurationError(f"mem_fraction={mem_fraction!r}: must be between 0 and 1", mem_fraction=mem_fraction)
    if (vram_budget_gib is not None or mem_fraction is not None) and kind not in ("sglang", "vllm"):
        raise ConfigurationError(
            f"vram_budget_gib / mem_fraction size SGLang's or vLLM's pool; not used by the {kind} engine"
            + (" (budget= is)" if kind == "transformers" else "")
        )
    resolved_budget = resolve_budget(budget)
    if resolved_budget is not None:
        if vram_budget_gib is not None or mem_fraction is not None:
            raise ConfigurationError("pass budget=, vram_budget_gib= or mem_fraction=, one of them")
        if kind == "attach":
            raise ConfigurationError(
                "budget= sizes an engine mineru-vram starts; an attached server is not started here"
            )
    if keep_alive_action not in ("sleep", "stop"):
        raise ConfigurationError(
            f"keep_alive_action={keep_alive_action!r}: expected 'sleep' or 'stop'", keep_alive_action=keep_alive_action
        )
    for name, value in (
        ("start_timeout", start_timeout),
        ("health_interval", health_interval),
        ("health_timeout", health_timeout),
    ):
        if not value > 0:
            raise ConfigurationError(f"{name}={value!r}: must be positive", **{name: value})
    if health_failures < 1 or max_restarts < 0:
        raise ConfigurationError("health_failures must be at least 1 and max_restarts at least 0")
    resolved_device = resolve_device(device)
    if kind == "vllm" and resolved_device == "cpu":
        raise ConfigurationError("the vllm engine needs a GPU (vLLM's CPU build is a different package)", device="cpu")
    if (vram_budget_gib is not None or resolved_budget is not None) and resolved_device == "cpu":
        raise ConfigurationError("a budget needs a GPU device; this engine runs on cpu", device=resolved_device)
    return EngineSettings(
        engine=kind,
        model_path=path,
        device="cpu" if kind == "attach" and device is None else resolved_device,
        vram_budget_gib=None if vram_budget_gib is None else float(vram_budget_gib),
        mem_fraction=None if mem_fraction is None else float(mem_fraction),
        budget=resolved_budget,
        keep_alive=parse_keep_alive(keep_alive),
        keep_alive_action=keep_alive_action,
        url=url,
        model_name=model_name,
        extra_args=tuple(str(a) for a in extra_args),
        start_timeout=float(start_timeout),
        stop_timeout=float(stop_timeout),
        idle_timeout=float(idle_timeout),
        health_interval=float(health_interval),
        health_timeout=float(health_timeout),
        health_failures=int(health_failures),
        max_restarts=int(max_restarts),
        restart_backoff=float(restart_backoff),
        http_timeout=int(http_timeout),
        max_concurrency=int(max_concurrency),
        headroom_gib=float(headroom_gib),
        max_new_tokens=max_new_tokens,
        python=python,
        runtime_dir=None if runtime_dir is None else str(runtime_dir),
    )


def _reset_for_tests() -> None:
    """Stop and forget the process-wide engine and every engine still running (``testing.reset()``)."""
    global _global_engine
    with _global_lock:
        engine, _global_engine = _global_engine, None
    engines = [e for e in list(_live) if e is not engine]
    for e in ([engine] if engine is not None else []) + engines:
        with contextlib.suppress(Exception):
            e.stop()
