"""Process isolation: a session's models live in a supervised worker process.

In-process release cannot return the CUDA context nor what libraries below MinerU
keep in their own pools; the exit of a process returns all of it. With
``ModelSession(isolation="process")`` the session's runner is a
:class:`WorkerRunner`: it starts a worker (a fresh interpreter, never a fork),
which builds an :class:`~mineru_vram._session.InProcessRunner` of its own and
parses with it, so both modes share one code path for parsing.

The parent never imports torch or MinerU for the worker and never creates a
CUDA context. It supervises:

* **Death with the parent.** The worker asks the kernel for ``SIGKILL`` when its
  parent dies (``PR_SET_PDEATHSIG``) and also watches its parent's pid from a
  thread, for platforms and corner cases where the signal does not come. The
  signal follows the *thread* that started the child, so every worker is started
  from one long-lived launcher thread, never from a pool thread that may exit.
* **Process groups.** Each worker leads its own process group (``start_new_session``);
  stopping it kills the whole group, so nothing it started survives it.
* **Crashes.** A worker that dies during a parse raises :class:`WorkerCrashedError`
  naming the document, with the exit code and the tail of the worker's log; the
  next parse starts a new worker and the event is recorded.
* **Timeouts.** ``parse(..., timeout=s)`` kills a worker that does not answer in
  time and raises :class:`ParseTimeoutError`.
* **Recycling.** After each document the worker reports its host RSS and its
  device memory; the parent replaces it between documents after
  ``recycle_after`` documents or when it grew by more than ``recycle_above_mib``
  since its first document.
* **Release.** Closing asks the worker to exit, kills its group after a grace
  period, then polls NVML until the worker is gone from the device and the device
  is back at its pre-session level; the receipt says how long that took.

Large payloads (documents, results) travel through files in the runner's private
folder, written and read once (the result is unpickled straight from a memory map),
instead of being pickled into the pipe and copied on both sides.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import json
import logging
import mmap
import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._documents import Document
from ._exceptions import (
    MineruVramError,
    ParseError,
    ParseTimeoutError,
    SessionStateError,
    WorkerCrashedError,
    WorkerStartError,
)
from ._probe import DeviceMemory, VramSnapshot, poll_until, vram_snapshot
from ._release import ReleaseReport, settle

if TYPE_CHECKING:
    from ._result import ParseResult
    from ._session import ParseOptions, SessionSettings

__all__ = ["RunnerState", "WorkerRunner", "worker_main"]

logger = logging.getLogger("mineru_vram")

MIB = 1024 * 1024
# Payloads larger than this go through a file in the runner's folder instead of the pipe.
# Kept under a socket buffer, so sending a document to a hung worker cannot block past
# the parse timeout.
INLINE_LIMIT = 64 * 1024
# A worker's log is cut back to its tail once it grows past this (a long-lived worker
# parsing thousands of documents must not fill the disk with MinerU's progress lines).
LOG_LIMIT = 8 * MIB
LOG_TAIL_CHARS = 8000
# How often the worker's watchdog thread checks that its parent is still there.
PARENT_POLL_SECONDS = 0.1
# Longest wait for a worker that was asked to exit before its group is killed.
STOP_GRACE_SECONDS = 5.0
# Per-document memory samples kept on the runner (a deque: a long session stays bounded).
MAX_SAMPLES = 10_000
# Events (starts, crashes, recycles...) and per-worker histories kept likewise.
MAX_EVENTS = 1000

_PR_SET_PDEATHSIG = 1
# Runner folders carry the parent's pid in their name (for people reading /tmp) and an
# owner lock, so a later runner can remove the folder of a parent killed before it cleaned up.
_FOLDER_PREFIX = "mineru-vram-worker-"
_LOCK_NAME = ".owner.lock"
_SWEEP_MIN_AGE_SECONDS = 60.0


class RunnerState(enum.Enum):
    """Lifecycle of a :class:`WorkerRunner`."""

    UNOPENED = "unopened"  # constructed; no folder, no process
    OPENED = "opened"  # a worker is running (or will be started by the next parse)
    CLOSED = "closed"  # every worker stopped, the folder removed; the receipt is written


class _WorkerDied(Exception):
    """Internal: the worker process ended while the parent waited for it."""


class _WorkerTimedOut(Exception):
    """Internal: the worker did not answer within the deadline."""


# --- launching ------------------------------------------------------------------------------


class _Launcher:
    """Starts every worker from one long-lived thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that created the child exits, not
    the process (prctl(2)). Sessions may be opened from executor threads that end
    before the session does (an asyncio ``to_thread``, a request handler), which
    would kill a healthy worker; a daemon thread that lives as long as the process
    does not have that problem, and it dies with the process, as it should.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._pid: int | None = None

    def _serve(self) -> None:
        while True:
            fn, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: threads do not survive fork
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._serve, name="mineru-vram-launcher", daemon=True).start()
                self._pid = os.getpid()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future.result()


_launcher = _Launcher()

# Run in the worker: make the parent's import path available (as multiprocessing's
# spawn does), then hand over to worker_main. The paths are appended, never put
# before the standard library.
_BOOTSTRAP = (
    "import sys, json\n"
    "sys.path.extend(p for p in json.loads(sys.argv[1]) if p not in sys.path)\n"
    "from mineru_vram._worker import worker_main\n"
    "sys.exit(worker_main(sys.argv[2:]))\n"
)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (each worker leads its own)."""
    killpg = getattr(os, "killpg", None)
    try:
        if killpg is not None:
            killpg(pid, signal.SIGKILL)
        else:  # pragma: no cover - platforms without process groups
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- payloads -------------------------------------------------------------------------------


def _pack(obj: Any, folder: Path, stem: str, limit: int) -> tuple[str, Any]:
    """Pickle ``obj``; into a file when larger than ``limit`` bytes, else for the pipe."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) <= limit:
        return ("inline", data)
    path = folder / f"{stem}.pickle"
    with open(path, "wb") as fh:
        fh.write(data)
    return ("file", str(path))


def _unpack(ref: tuple[str, Any]) -> Any:
    kind, value = ref
    # Both sides are ours: the pipe is a private socketpair, the folder is mkdtemp's (0700).
    if kind == "inline":
        return pickle.loads(value)  # noqa: S301
    path = Path(value)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # Unpickled from the map: the file's pages are the only copy of the pickle.
            return pickle.loads(mm)  # noqa: S301
    finally:
        path.unlink(missing_ok=True)


def _document_ref(doc: Document, folder: Path, stem: str, limit: int) -> dict[str, Any]:
    ref: dict[str, Any] = {
        "name": doc.name,
        "page_count": doc.page_count,
        "path": None if doc.path is None else str(doc.path),
        "doubt": doc.doubt,
    }
    if len(doc.data) <= limit:
        ref["data"] = doc.data
    else:
        file = folder / f"{stem}.pdf"
        file.write_bytes(doc.data)
        ref["file"] = str(file)
    return ref


def _document_from_ref(ref: Mapping[str, Any]) -> Document:
    if "file" in ref:
        file = Path(ref["file"])
        data = file.read_bytes()
        file.unlink(missing_ok=True)
    else:
        data = ref["data"]
    path = None if ref["path"] is None else Path(ref["path"])
    return Document(name=ref["name"], data=data, page_count=ref["page_count"], path=path, doubt=ref.get("doubt"))


def _portable_error(exc: BaseException, document: str | None) -> MineruVramError:
    """The exception to send to the parent: itself when it pickles, else a ParseError."""
    if isinstance(exc, MineruVramError):
        with contextlib.suppress(Exception):
            pickle.loads(pickle.dumps(exc))  # noqa: S301 - a round trip of our own object
            return exc
    name = document or "<worker>"
    return ParseError(f"{name}: {type(exc).__name__}: {exc}", document=name)


def _add_note(exc: BaseException, note: str) -> None:
    add = getattr(exc, "add_note", None)  # Python 3.11+
    if add is not None:
        add(note)


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


# --- the parent's handle on one worker ------------------------------------------------------


class _Worker:
    """One worker process, its pipe and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.conn = conn
        self.log_path = log_path
        self.started = time.monotonic()
        self.documents = 0
        self.first: dict[str, Any] | None = None  # memory sample after the first document
        self.info: dict[str, Any] = {}  # from the worker's "ready" message
        self.end: str | None = None  # why it ended, once it has

    def alive(self) -> bool:
        """Whether the worker still runs, without reaping it.

        An exited but unreaped worker keeps its process group's id reserved, so the
        group kill that follows cannot reach an unrelated process that reused the id.
        """
        if self.proc.returncode is not None:
            return False
        waitid = getattr(os, "waitid", None)
        if waitid is None:  # pragma: no cover - platforms without waitid
            return self.proc.poll() is None
        try:
            return waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:  # reaped elsewhere
            return self.proc.poll() is None

    def idle_and_alive(self) -> bool:
        """Alive, with nothing unread on the pipe.

        An idle worker sends nothing, so a readable pipe means EOF: the worker is
        exiting, even if the kernel cannot report its exit status yet.
        """
        try:
            return self.alive() and not self.conn.poll(0)
        except (OSError, EOFError):
            return False

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except (OSError, EOFError, ValueError) as exc:
            raise _WorkerDied(str(exc)) from None

    def receive(self, timeout: float | None) -> tuple[Any, ...]:
        """Wait for the next message, noticing death and the deadline.

        Raises:
            _WorkerDied: the process ended (or closed its end of the pipe).
            _WorkerTimedOut: no message before ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.25 if deadline is None else min(0.25, max(0.0, deadline - time.monotonic()))
            try:
                if self.conn.poll(wait):
                    return self.conn.recv()  # type: ignore[no-any-return]
            except (OSError, EOFError) as exc:
                raise _WorkerDied(str(exc)) from None
            # A pipe held open by a grandchild would hide EOF: look at the process too.
            if not self.alive():
                raise _WorkerDied(f"exit code {self.proc.returncode}")
            if deadline is not None and time.monotonic() >= deadline:
                raise _WorkerTimedOut

    def request(self, message: tuple[Any, ...], timeout: float | None = None) -> tuple[Any, ...]:
        self.send(message)
        return self.receive(timeout)

    def kill(self) -> int | None:
        """SIGKILL the worker's whole process group and reap it."""
        _kill_group(self.pid)
        try:
            return self.proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:  # pragma: no cover - uninterruptible sleep in the kernel
            return None
        finally:
            self._close_pipe()

    def stop(self, grace: float) -> int | None:
        """Wait up to ``grace`` for an exit already requested, then kill the group."""
        deadline = time.monotonic() + max(0.0, grace)
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.alive():
            logger.warning("worker pid %d did not exit within %.1fs; killing its process group", self.pid, grace)
        # Kill the group even after a clean exit: anything the worker started goes with it.
        return self.kill()

    def _close_pipe(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return _log_tail(self.log_path, chars)

    def summary(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "documents": self.documents,
            "seconds_alive": round(time.monotonic() - self.started, 3),
            "exitcode": self.proc.returncode,
            "end": self.end,
        }


# --- the runner -----------------------------------------------------------------------------


class WorkerRunner:
    """A :class:`~mineru_vram._session.Runner` whose models live in a worker process.

    Args:
        settings: the session's resolved settings (they travel to the worker).

    Attributes:
        baseline: this process's snapshot (with the device's figures) before the
            first worker started; the device must come back to it on close.
        events: what happened to workers (starts, crashes, timeouts, recycles), in order.
        samples: memory after each document: worker pid, RSS, device MiB.
    """

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.baseline: VramSnapshot | None = None
        # Bounded, like the samples: a session recycling after every document for weeks
        # must not grow without limit. Counters below stay exact.
        self.events: collections.deque[str] = collections.deque(maxlen=MAX_EVENTS)
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_SAMPLES)
        self.restarts = 0
        self.recycles = 0
        self.timeouts = 0
        self.crashes = 0
        self.documents = 0
        self._state = RunnerState.UNOPENED
        self._lock = threading.RLock()
        self._folder: Path | None = None
        self._folder_lock: IO[bytes] | None = None
        self._worker: _Worker | None = None
        self._retired: list[_Worker] = []  # asked to exit between documents, not yet reaped
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._started = 0
        self._restart_reason: str | None = None  # set when the next start replaces a failed worker
        self._last_snapshot: VramSnapshot | None = None
        self._report: ReleaseReport | None = None
        self._seq = 0

    # -- introspection -------------------------------------------------------------------------

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def pid(self) -> int | None:
        """The current worker's pid, or ``None`` between a failure and the next parse."""
        worker = self._worker
        return None if worker is None else worker.pid

    @property
    def folder(self) -> Path | None:
        """The runner's private folder (worker logs, payload files)."""
        return self._folder

    def _event(self, text: str, *, level: int = logging.INFO) -> None:
        self.events.append(text)
        logger.log(level, "%s", text)

    def _next_stem(self, kind: str) -> str:
        self._seq += 1
        return f"{kind}-{os.getpid()}-{self._seq}"

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Take the baseline and start the first worker (it loads the models).

        Raises:
            WorkerStartError: the worker could not start or load its models.
            SessionStateError: the runner was opened before.
        """
        with self._lock:
            if self._state is not RunnerState.UNOPENED:
                raise SessionStateError(f"this worker runner is {self._state.value}; it opens once")
            self.baseline = settle(self.settings.device)
            base = self.settings.runtime_dir
            if base is not None:
                Path(base).mkdir(parents=True, exist_ok=True)
            _sweep_stale_folders(Path(base or tempfile.gettempdir()))
            self._folder = Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-", dir=base))
            self._folder_lock = _lock_folder(self._folder)
            self._state = RunnerState.OPENED
            try:
                self._start_worker()
            except BaseException:
                self._shutdown_all()
                self._remove_folder()
                self._state = RunnerState.CLOSED
                raise

    def _start_worker(self) -> _Worker:
        assert self._folder is not None
        self._reap_retired()
        self._started += 1
        number = self._started
        log_path = self._folder / f"worker-{number}.log"
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.fileno()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # so a crash's log tail is current
        # The worker's temporary files (MinerU's home, anything its libraries write) go
        # into the runner's folder, which close removes even after a crash.
        env["TMPDIR"] = str(self._folder)
        argv = [sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path), str(child_fd), str(os.getpid())]
        t0 = time.perf_counter()
        try:
            with open(log_path, "ab") as log:

                def popen() -> subprocess.Popen[bytes]:
                    return subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        pass_fds=(child_fd,),
                        start_new_session=True,
                        env=env,
                    )

                proc: subprocess.Popen[bytes] = _launcher.call(popen)
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            raise WorkerStartError(f"could not start the worker process: {exc}") from exc
        child_sock.close()
        worker = _Worker(proc, Connection(parent_sock.detach()), log_path)
        self._worker = worker
        child_settings = dataclasses.replace(
            self.settings, isolation="none", recycle_after=None, recycle_above_mib=None
        )
        timeout = self.settings.worker_start_timeout
        try:
            worker.send(("init", child_settings, str(self._folder), INLINE_LIMIT))
            reply = worker.receive(timeout=timeout)
        except _WorkerDied:
            code = worker.kill()
            self._worker = None
            worker.end = f"died while starting (exit code {code})"
            self._history.append(worker.summary())
            raise WorkerStartError(
                f"the worker (pid {worker.pid}) died while loading the models (exit code {code}, "
                f"{_signal_name(code) or 'no signal'}); last lines of its log:\n{_last_lines(worker.log_tail())}",
                exitcode=code,
                pid=worker.pid,
                log_tail=worker.log_tail(),
            ) from None
        except _WorkerTimedOut:
            worker.kill()
            self._worker = None
            worker.end = "start timed out"
            self._history.append(worker.summary())
            raise WorkerStartError(
                f"the worker (pid {worker.pid}) did not load the models within worker_start_timeout={timeout}s; "
                f"last lines of its log:\n{_last_lines(worker.log_tail())}",
                pid=worker.pid,
                timeout=timeout,
                log_tail=worker.log_tail(),
            ) from None
        except BaseException:
            worker.kill()  # Ctrl-C while loading: leave no half-started worker behind
            self._worker = None
            raise
        if reply[0] == "error":
            _, err, tb_text, _stats = reply
            worker.kill()
            self._worker = None
            worker.end = f"failed to load: {type(err).__name__}"
            self._history.append(worker.summary())
            _add_note(err, f"raised in the mineru-vram worker (pid {worker.pid}) while loading:\n{tb_text}")
            if not isinstance(err, WorkerStartError):
                raise err  # a typed error (a bad setting...) is the same error as in-process
            raise WorkerStartError(
                f"the worker (pid {worker.pid}) could not load the models: {err}",
                pid=worker.pid,
                log_tail=worker.log_tail(),
            ) from err
        worker.info = reply[1]
        self._last_snapshot = worker.info.get("snapshot")
        seconds = time.perf_counter() - t0
        if self._restart_reason is not None:
            self.restarts += 1
            self._event(f"restarted the worker: pid {worker.pid} in {seconds:.1f}s ({self._restart_reason})")
            self._restart_reason = None
        else:
            self._event(f"started worker pid {worker.pid} in {seconds:.1f}s")
        return worker

    def _ensure_worker(self) -> _Worker:
        worker = self._worker
        if worker is not None and worker.idle_and_alive():
            return worker
        if worker is not None:  # died while idle (killed from outside, OOM killer...)
            self.crashes += 1
            code = self._discard(worker, "exited while idle", f"pid {worker.pid} had exited while idle")
            self._event(
                f"worker pid {worker.pid} exited while idle (exit code {code}, {_signal_name(code) or 'no signal'})",
                level=logging.WARNING,
            )
        return self._start_worker()

    def _retire(self, worker: _Worker, reason: str) -> None:
        """Ask a worker to exit between documents; it is reaped before the next starts."""
        self.recycles += 1
        worker.end = f"recycled: {reason}"
        self._event(f"recycled worker pid {worker.pid} after {worker.documents} document(s): {reason}")
        with contextlib.suppress(_WorkerDied):
            worker.send(("exit",))
        self._retired.append(worker)
        self._worker = None

    def _reap_retired(self) -> None:
        """Wait for retired workers to be gone, from the process table and from the device.

        A new worker must not load its models while the old one still holds its own:
        two copies on the device is the OOM recycling exists to avoid.
        """
        while self._retired:
            worker = self._retired.pop(0)
            worker.stop(self._grace())
            self._history.append(worker.summary())
            self._wait_gone_from_device([worker.pid], timeout=self.settings.release_timeout)

    def _grace(self) -> float:
        return max(0.5, min(STOP_GRACE_SECONDS, float(self.settings.release_timeout)))

    def _wait_gone_from_device(self, pids: list[int], *, timeout: float) -> tuple[bool | None, float]:
        device = self.settings.device
        if not device.startswith("cuda"):
            return None, 0.0
        from ._probe import process_memory_mib

        def gone() -> bool:
            return all(not process_memory_mib(device, pid=pid) for pid in pids)

        return poll_until(gone, timeout=timeout, interval=0.02)

    # -- parsing -------------------------------------------------------------------------------

    def parse(self, doc: Document, options: ParseOptions) -> ParseResult:
        """Parse ``doc`` in the worker; start one first if none is running.

        Raises:
            ParseError, OutOfMemoryError: as in-process (raised in the worker, same type).
            ParseTimeoutError: no result within ``options.timeout``; the worker was killed.
            WorkerCrashedError: the worker died during the parse.
            WorkerStartError: a replacement worker could not start.
        """
        timeout = options.timeout
        if timeout is not None and not timeout > 0:
            from ._exceptions import ConfigurationError

            raise ConfigurationError(f"timeout={timeout!r}: must be a positive number of seconds", timeout=timeout)
        with self._lock:
            if self._state is not RunnerState.OPENED:
                raise SessionStateError(f"cannot parse: the worker runner is {self._state.value}")
            worker = self._ensure_worker()
            assert self._folder is not None
            ref = _document_ref(doc, self._folder, self._next_stem("doc"), INLINE_LIMIT)
            try:
                reply = worker.request(("parse", ref, dataclasses.replace(options, timeout=None)), timeout=timeout)
            except _WorkerDied:
                raise self._crashed(worker, doc.name) from None
            except _WorkerTimedOut:
                raise self._timed_out(worker, doc.name, float(timeout)) from None  # type: ignore[arg-type]
            except BaseException:
                # Interrupted while the worker works: its answer would arrive out of step
                # with the next request, so this worker cannot be used again.
                self._discard(
                    worker,
                    "killed: the parent was interrupted during a parse",
                    f"pid {worker.pid} was killed when a parse was interrupted",
                )
                raise
            finally:
                if "file" in ref:
                    Path(ref["file"]).unlink(missing_ok=True)
            kind = reply[0]
            if kind == "result":
                _, result_ref, stats = reply
                try:
                    result: ParseResult = _unpack(result_ref)
                finally:
                    self._after_document(worker, doc.name, stats, ok=True)
                return result
            if kind == "error":
                _, exc, tb_text, stats = reply
                self._after_document(worker, doc.name, stats, ok=False)
                _add_note(exc, f"raised in the mineru-vram worker (pid {worker.pid}):\n{tb_text}")
                raise exc
            raise WorkerCrashedError(  # pragma: no cover - a protocol bug, not a user error
                f"{doc.name}: unexpected message {kind!r} from the worker", document=doc.name, pid=worker.pid
            )

    def _discard(self, worker: _Worker, end: str, restart_reason: str) -> int | None:
        """Kill a worker that failed, wait until the device has its memory back, and say why.

        Returns:
            Its exit code.
        """
        code = worker.kill()
        worker.end = f"{end} (exit code {code})"
        self._history.append(worker.summary())
        if self._worker is worker:
            self._worker = None
        self._restart_reason = restart_reason
        # The next worker must not load beside the remains of this one.
        self._wait_gone_from_device([worker.pid], timeout=self.settings.release_timeout)
        return code

    def _crashed(self, worker: _Worker, document: str) -> WorkerCrashedError:
        self.crashes += 1
        code = self._discard(worker, f"crashed on {document}", f"pid {worker.pid} crashed on {document}")
        tail = worker.log_tail()
        sig = _signal_name(code)
        self._event(
            f"worker pid {worker.pid} crashed while parsing {document} (exit code {code}, {sig or 'no signal'}); "
            "a new worker starts on the next parse",
            level=logging.WARNING,
        )
        how = f"was killed by {sig}" if sig else f"exited with code {code}"
        return WorkerCrashedError(
            f"{document}: the worker (pid {worker.pid}) {how} while parsing it; a new worker starts on the "
            f"next parse. Last lines of its log:\n{_last_lines(tail)}",
            document=document,
            exitcode=code,
            signal=sig,
            pid=worker.pid,
            log_tail=tail,
        )

    def _timed_out(self, worker: _Worker, document: str, timeout: float) -> ParseTimeoutError:
        self.timeouts += 1
        code = self._discard(
            worker,
            f"killed: {document} exceeded timeout={timeout}s",
            f"pid {worker.pid} was killed after {document} exceeded its timeout",
        )
        self._event(
            f"worker pid {worker.pid} killed: {document} had no result after timeout={timeout}s; "
            "a new worker starts on the next parse",
            level=logging.WARNING,
        )
        return ParseTimeoutError(
            f"{document}: no result after {timeout}s; the worker (pid {worker.pid}) was killed and a new one "
            "starts on the next parse",
            document=document,
            timeout=timeout,
            pid=worker.pid,
            exitcode=code,
        )

    def _after_document(self, worker: _Worker, document: str, stats: Mapping[str, Any], *, ok: bool) -> None:
        worker.documents += 1
        self.documents += 1
        sample = {
            "document": document,
            "index": self.documents,
            "pid": worker.pid,
            "worker_document": worker.documents,
            "ok": ok,
            "rss_mib": stats.get("rss_mib"),
            "device_mib": stats.get("device_mib"),
            "torch_reserved_mib": stats.get("torch_reserved_mib"),
            "seconds": stats.get("seconds"),
        }
        self.samples.append(sample)
        snap = stats.get("snapshot")
        if snap is not None:
            self._last_snapshot = snap
        if worker.first is None:
            worker.first = sample
        _trim_log(worker.log_path)
        reason = self._recycle_reason(worker, sample)
        if reason is not None:
            self._retire(worker, reason)

    def _recycle_reason(self, worker: _Worker, sample: Mapping[str, Any]) -> str | None:
        limit = self.settings.recycle_after
        if limit is not None and worker.documents >= limit:
            return f"recycle_after={limit} documents reached"
        above = self.settings.recycle_above_mib
        first = worker.first
        if above is None or first is None or first is sample:
            return None
        for key, what in (("device_mib", "device memory"), ("rss_mib", "host RSS")):
            now, then = sample.get(key), first.get(key)
            if now is None or then is None:
                continue
            grown = float(now) - float(then)
            if grown > above:
                return (
                    f"{what} grew {grown:.0f} MiB since its first document ({then:.0f} -> {now:.0f} MiB), "
                    f"over recycle_above_mib={above:g}"
                )
        return None

    # -- release -------------------------------------------------------------------------------

    def close(self) -> ReleaseReport:
        """Stop every worker and wait until the device is back at the baseline.

        Idempotent: a second call returns the first receipt.
        """
        with self._lock:
            if self._report is not None:
                return self._report
            if self._state is RunnerState.UNOPENED:
                raise SessionStateError("cannot close a worker runner that was never opened")
            t0 = time.perf_counter()
            device = self.settings.device
            before = self._last_snapshot
            models = 0
            worker = self._worker
            exitcode: int | None = None
            pids = [w.pid for w in self._retired]
            steps: list[tuple[str, float]] = []
            if worker is not None:
                pids.append(worker.pid)
                if worker.alive():
                    try:
                        _, info = worker.request(("exit",), timeout=self._grace())
                        before = info.get("snapshot", before)
                        models = int(info.get("models", 0))
                    except (_WorkerDied, _WorkerTimedOut):
                        pass
                exitcode = worker.stop(self._grace())
                worker.end = worker.end or "session closed"
                self._history.append(worker.summary())
                self._worker = None
            self._reap_retired()
            stop_seconds = time.perf_counter() - t0
            steps.append(("stop worker", stop_seconds))
            back, left, t_back, used_after = self._wait_device_back(pids)
            steps.append(("wait for NVML", time.perf_counter() - t0 - stop_seconds))
            after = settle(device)
            seconds = time.perf_counter() - t0
            if left:
                self._event("after release: " + "; ".join(left), level=logging.WARNING)
            base_used = (
                None
                if self.baseline is None or self.baseline.device_info is None
                else (self.baseline.device_info.used_mib)
            )
            last = self._history[-1] if self._history else {}
            worker_info: dict[str, Any] = {
                # The last worker: the one closed here, or the one that failed last.
                "pid": worker.pid if worker is not None else last.get("pid"),
                "exitcode": exitcode if worker is not None else last.get("exitcode"),
                "stop_seconds": round(stop_seconds, 4),
                # From the start of close until NVML showed the device back (None: cannot tell).
                "seconds_to_baseline": None if t_back is None or back is None else round(stop_seconds + t_back, 4),
                "nvml_wait_seconds": None if t_back is None or back is None else round(t_back, 4),
                "back_at_baseline": back,
                "device_used_baseline_mib": base_used,
                "device_used_after_mib": used_after,
                "device_residual_mib": None if used_after is None or base_used is None else used_after - base_used,
                "left": left,
                "workers_started": self._started,
                "restarts": self.restarts,
                "recycles": self.recycles,
                "crashes": self.crashes,
                "timeouts": self.timeouts,
                "documents": self.documents,
                "history": list(self._history),
            }
            self._remove_folder()
            self._state = RunnerState.CLOSED
            self._report = ReleaseReport(
                device=device,
                isolation="process",
                baseline=self.baseline,
                before=before,
                after=after,
                seconds=seconds,
                models_released=models,
                models_alive=[],
                steps=steps,
                context_created=False,  # the parent never initialises CUDA for the worker
                context_floor_mib=self.settings.context_floor_mib,
                tolerance_mib=self.settings.leak_tolerance_mib,
                events=list(self.events),
                worker=worker_info,
            )
            return self._report

    def _wait_device_back(self, pids: list[int]) -> tuple[bool | None, list[str], float | None, float | None]:
        """Poll NVML until the workers are gone and device use is back at the baseline.

        Returns:
            ``(back, left, seconds, device_used_after)``: ``back`` is ``None`` where NVML
            cannot tell (CPU, no driver), ``left`` says what remains when not back.
        """
        device = self.settings.device
        base = None if self.baseline is None else self.baseline.device_info
        if not device.startswith("cuda") or base is None:
            return None, [], 0.0, None
        tolerance = float(self.settings.leak_tolerance_mib)
        state: dict[str, Any] = {}

        def back() -> bool:
            info = vram_snapshot(device).device_info
            if info is None:
                return False
            check = _device_back(base, info, pids, os.getpid(), tolerance)
            state["check"] = check
            return check.back

        t0 = time.perf_counter()
        met, _ = poll_until(back, timeout=float(self.settings.release_timeout), interval=0.02)
        seconds = time.perf_counter() - t0
        check: _DeviceCheck | None = state.get("check")
        if check is None:
            return False, ["NVML could not read the device after the worker exited"], None, None
        left: list[str] = []
        if not met:
            left += [f"worker pid {pid} still listed by NVML with {mib:.0f} MiB" for pid, mib in check.workers.items()]
            if check.excess_mib > tolerance:
                left.append(
                    f"device use {check.used_mib:.0f} MiB is {check.excess_mib:.0f} MiB above its pre-session "
                    f"{base.used_mib:.0f} MiB (after allowing {check.others_grew_mib:.0f} MiB that other known "
                    f"processes grew) after {self.settings.release_timeout}s"
                )
        return met, left, (seconds if met else None), check.used_mib

    def _shutdown_all(self) -> None:
        for worker in [*self._retired, *([self._worker] if self._worker is not None else [])]:
            with contextlib.suppress(Exception):
                worker.kill()
        self._retired.clear()
        self._worker = None

    def _remove_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._folder_lock is not None:
            self._folder_lock.close()
            self._folder_lock = None

    def abandon(self) -> None:
        """Finalizer path: kill every worker's process group and remove the folder. Never raises."""
        try:
            # No lock: a finalizer may run while another thread holds it mid-parse.
            for worker in [*self._retired, self._worker]:
                if worker is not None:
                    _kill_group(worker.pid)
                    with contextlib.suppress(Exception):
                        worker.proc.wait(timeout=1.0)
            self._state = RunnerState.CLOSED
            self._remove_folder()
        except Exception:
            pass

    # -- test hooks ----------------------------------------------------------------------------

    def _debug(self, command: str, *args: Any) -> Any:
        """Test hook: run a debug command in the current worker and return its answer."""
        with self._lock:
            if self._state is not RunnerState.OPENED:
                raise SessionStateError(f"the worker runner is {self._state.value}")
            worker = self._ensure_worker()
            try:
                reply = worker.request(("debug", command, *args), timeout=60.0)
            except (_WorkerDied, _WorkerTimedOut):
                raise self._crashed(worker, f"<debug {command}>") from None
            if reply[0] == "error":
                _, exc, tb_text, _stats = reply
                _add_note(exc, f"raised in the mineru-vram worker (pid {worker.pid}):\n{tb_text}")
                raise exc
            return reply[1]

    def _debug_allocate_mib(self, mib: float, *, on_device: bool = False) -> dict[str, Any]:
        """Test hook: make the worker hold ``mib`` more host (or device) memory, as a leak would."""
        return self._debug("allocate_mib", float(mib), on_device)  # type: ignore[no-any-return]

    def _debug_raise(self, exc: BaseException) -> None:
        """Test hook: the worker raises ``exc`` and sends it back the way a parse error travels."""
        self._debug("raise", exc)


@dataclasses.dataclass(frozen=True)
class _DeviceCheck:
    back: bool
    used_mib: float
    excess_mib: float  # device use above the baseline not explained by other processes' growth
    others_grew_mib: float
    workers: dict[int, float]  # workers NVML still lists, with their MiB


def _device_back(
    base: DeviceMemory, now: DeviceMemory, workers: list[int], parent_pid: int, tolerance_mib: float
) -> _DeviceCheck:
    """Whether the device is back at ``base`` now that ``workers`` exited.

    Other processes may have grown meanwhile (this process, or one that already held
    memory at the baseline): their growth is allowed for, or one busy neighbour would
    make every close wait for its timeout. A process that appeared after the baseline
    is not allowed for unless it is this one: under a PID namespace NVML lists the
    worker under a pid we cannot recognise, and it must not be excused.
    """
    before = {p.pid: p.used_mib for p in base.processes}
    listed = {p.pid: p.used_mib for p in now.processes}
    still = {pid: listed[pid] for pid in workers if listed.get(pid)}
    known = (set(before) | {parent_pid}) - set(workers)
    grew = sum(max(0.0, listed.get(pid, 0.0) - before.get(pid, 0.0)) for pid in known)
    excess = now.used_mib - base.used_mib - grew
    return _DeviceCheck(
        back=not still and excess <= tolerance_mib,
        used_mib=now.used_mib,
        excess_mib=excess,
        others_grew_mib=grew,
        workers=still,
    )


def _sweep_stale_folders(base: Path) -> list[Path]:
    """Remove runner folders whose owner died without closing (a SIGKILLed parent).

    An owner holds an exclusive ``flock`` on its folder's lock file for its whole
    life and the kernel drops it when the owner dies, so a lock that can be taken
    marks a stale folder; this works across PID namespaces, where pids would not.

    Returns:
        The folders removed.
    """
    removed: list[Path] = []
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return removed
    try:
        entries = [e for e in base.glob(f"{_FOLDER_PREFIX}*") if e.is_dir()]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat().st_mtime < _SWEEP_MIN_AGE_SECONDS:
                continue  # its owner may be between mkdtemp and taking the lock
            with open(entry / _LOCK_NAME, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live owner, not ours to read, or not written yet
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _lock_folder(folder: Path) -> IO[bytes] | None:
    """Hold the folder's owner lock (see :func:`_sweep_stale_folders`) until closed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fh = open(folder / _LOCK_NAME, "wb")  # noqa: SIM115 - held for the runner's life
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without locks: the sweeper cannot lock it either
        fh.close()
        return None
    return fh


def _log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars * 4))  # up to 4 bytes a character in UTF-8
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def _trim_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Cut a worker log that grew past ``limit`` bytes back to its tail."""
    try:
        if path.stat().st_size <= limit:
            return
        tail = _log_tail(path, LOG_TAIL_CHARS * 8).encode("utf-8", errors="replace")
        # The worker is idle between documents and writes with O_APPEND, so truncating
        # under it is safe: its next line lands after the tail.
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.write(b"[... earlier log cut by mineru-vram ...]\n" + tail)
    except OSError:
        pass


def _last_lines(text: str, n: int = 15) -> str:
    lines = text.rstrip().splitlines()[-n:]
    return "\n".join("    " + line for line in lines) if lines else "    (the log is empty)"


# --- the worker side ------------------------------------------------------------------------


def _die_with_parent(parent_pid: int, *, pdeathsig: bool = True, watchdog: bool = True) -> None:
    """Make sure this process does not outlive ``parent_pid``.

    ``PR_SET_PDEATHSIG`` covers Linux; a watchdog thread covers other systems and
    the gap before ``prctl`` ran. Orphaning kills this process's whole group.
    (``pdeathsig`` and ``watchdog`` exist so tests can check each mechanism alone.)
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass

    def orphaned() -> None:
        _kill_group(os.getpid())
        os._exit(1)

    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        orphaned()
    if not watchdog:
        return

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                orphaned()

    threading.Thread(target=watch, name="mineru-vram-parent-watchdog", daemon=True).start()


def _malloc_trim() -> bool:
    """Return freed heap pages to the OS (glibc); MinerU users see RSS creep without it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = getattr(libc, "malloc_trim", None)
        if trim is None:
            return False
        return bool(trim(0))
    except Exception:
        return False


class _WorkerLoop:
    """The worker's side: one InProcessRunner, driven by messages from the parent."""

    def __init__(self, conn: Connection, settings: SessionSettings, folder: Path, inline_limit: int) -> None:
        from ._session import InProcessRunner

        self.inline_limit = inline_limit
        self.conn = conn
        self.settings = settings
        self.folder = folder
        self.runner = InProcessRunner(settings)
        self._ballast: list[Any] = []  # test hook: memory held on purpose

    def stats(self, seconds: float | None = None) -> dict[str, Any]:
        snap = vram_snapshot(self.settings.device)
        device_mib = snap.process_mib
        if not device_mib and snap.torch_reserved_mib:
            # NVML hides pids in some containers (PID namespaces): fall back to torch's view.
            device_mib = snap.torch_reserved_mib
        return {
            "rss_mib": snap.rss_mib,
            "device_mib": device_mib,
            "torch_reserved_mib": snap.torch_reserved_mib,
            "seconds": seconds,
            "snapshot": snap,
        }

    def _send_error(
        self,
        exc: BaseException,
        document: str | None,
        seconds: float | None,
        *,
        tb_source: BaseException | None = None,
    ) -> None:
        src = exc if tb_source is None else tb_source
        tb_text = "".join(traceback.format_exception(type(src), src, src.__traceback__))
        del src, tb_source
        portable = _portable_error(exc, document)
        del exc
        _malloc_trim()
        self.conn.send(("error", portable, tb_text, self.stats(seconds)))

    def serve(self) -> int:
        try:
            self.runner.open()
        except MineruVramError as exc:
            self._send_error(exc, None, None)
            return 1
        except Exception as exc:
            # MinerU's own errors while loading (a missing model file...) do not pickle
            # reliably; the parent turns this into a WorkerStartError with the log tail.
            self._send_error(WorkerStartError(f"{type(exc).__name__}: {exc}"), None, None, tb_source=exc)
            return 1
        self.conn.send(("ready", {"pid": os.getpid(), **self.stats()}))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return 0  # the parent is gone or closed the pipe
            kind = message[0]
            if kind == "parse":
                self._parse(message[1], message[2])
            elif kind == "exit":
                models = len(self.runner.runtime.owned_keys())
                self.conn.send(("bye", {"models": models, **self.stats()}))
                return 0
            elif kind == "debug":
                self._debug(message[1], *message[2:])
            else:  # pragma: no cover - protocol bug
                self._send_error(ParseError(f"unknown request {kind!r}", document="<worker>"), None, None)

    def _parse(self, ref: Mapping[str, Any], options: ParseOptions) -> None:
        t0 = time.perf_counter()
        name = ref["name"]
        try:
            doc = _document_from_ref(ref)
            result = self.runner.parse(doc, options)
            del doc
        except Exception as exc:
            self._send_error(exc, name, time.perf_counter() - t0)
            return
        out = _pack(result, self.folder, f"result-{os.getpid()}-{id(result)}", self.inline_limit)
        del result
        _malloc_trim()
        self.conn.send(("result", out, self.stats(time.perf_counter() - t0)))

    def _debug(self, command: str, *args: Any) -> None:
        try:
            if command == "allocate_mib":
                mib, on_device = args
                self._ballast.append(_allocate(mib, on_device, self.settings.device))
                self.conn.send(("debug", self.stats()))
            elif command == "raise":
                raise args[0]
            else:
                raise ParseError(f"unknown debug command {command!r}", document="<debug>")
        except Exception as exc:
            self._send_error(exc, None, None)


def _allocate(mib: float, on_device: bool, device: str) -> Any:
    size = int(mib * MIB)
    if on_device and device.startswith("cuda"):
        import torch

        return torch.ones(size // 4, dtype=torch.float32, device=device)
    block = bytearray(size)
    # Touch every page, so the allocation is resident (calloc'd pages are not, until written).
    block[:: mmap.PAGESIZE] = b"\x01" * len(range(0, size, mmap.PAGESIZE))
    return block


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: ``<pipe fd> <parent pid>``."""
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    os.set_inheritable(fd, False)  # anything MinerU starts must not hold the pipe open
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(fd)
    try:
        kind, settings, folder, inline_limit = conn.recv()
    except (EOFError, OSError):
        return 1
    if kind != "init":  # pragma: no cover - protocol bug
        return 2
    code = _WorkerLoop(conn, settings, Path(folder), inline_limit).serve()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: the process's end returns every byte it held,
    # and tearing down torch and MinerU module by module only costs time.
    os._exit(code)
