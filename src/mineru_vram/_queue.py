"""``TaskQueue``: a durable queue of documents, parsed one by one on one long-lived session.

A web front end or a batch service receives documents faster than the GPU parses
them. The queue takes them (``submit`` copies each input into the queue's own
folder and returns at once), a worker loop parses them on one resident session
(``run``, ``arun``, or ``mineru-vram worker tasks.db``), and callers ask for
``status`` or wait for the ``result``.

Storage is an embedded SQLite database (WAL, ``synchronous=FULL`` and synced files
unless ``durable=False``, every change in an ``IMMEDIATE`` transaction) plus a folder beside it, ``<path>.files/``:

* ``inputs/<task>.pdf``: the submitted bytes, deleted when the task ends (completed,
  failed or cancelled); kept across retries.
* ``work/<task>-<token>.pickle``: one attempt's temporary, the result being staged;
  renamed into ``results/`` or deleted when the attempt ends.
* ``results/<task>-<token>.pickle``: a completed task's :class:`ParseResult`
  (plain data), kept until retrieved (``keep_results=False``) or forgotten.
* ``workers/<owner>.lock``: held (``flock``) by each running worker for its life.

Exactly once, and nothing lost, under kill -9:

* **Claiming** is one transaction: the first due PENDING task becomes PROCESSING
  with a fresh *lease token*, an owner and a lease expiry, and its attempt counter
  goes up. Several processes may run workers on one queue file.
* **Leases.** A heartbeat thread renews the lease of every task its worker holds.
  A task whose lease expired, or whose owner's lock file can be locked (the owner
  died: the kernel drops a dead process's locks at once, across PID namespaces too),
  is recovered at the next claim: back to PENDING after a backoff, or FAILED once
  it used all its attempts.
* **Completion** writes the result file first, then marks the task COMPLETED in a
  transaction that only succeeds while the task is still PROCESSING under the same
  token; a worker that lost its lease (the task was recovered and given to another)
  cannot complete it, and its file is deleted. An append-only ``events`` table
  records every claim, completion, retry and recovery (``events()``).
* Files written but not yet recorded (a crash between the two steps) are swept by
  :meth:`TaskQueue.recover`, which every worker runs when it starts.

Failures: an invalid document, or MinerU failing on it, is the document's fault:
the task is FAILED at once, with the reason. Anything else (out of memory after
the session's own retry, a crashed worker process, a timeout, an admission
timeout) is retried with exponential backoff until ``max_attempts``. A failed
task never stops the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

from ._budget import VramBudget, resolve_budget
from ._exceptions import (
    AdmissionTimeoutError,
    ConfigurationError,
    InvalidDocumentError,
    MineruVramError,
    ParseError,
    ParseTimeoutError,
    ResultTimeoutError,
    SessionStateError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
)

if TYPE_CHECKING:
    from ._documents import Source
    from ._result import ParseResult
    from ._session import ModelSession

__all__ = [
    "QueueSettings",
    "ResultTimeoutError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskQueue",
    "TaskStatus",
    "WorkerStats",
    "build_worker_parser",
    "run_worker",
    "run_worker_cli",
]

logger = logging.getLogger("mineru_vram")

SCHEMA_VERSION = 1
# Files older than this with no row that explains them are swept by recover(); younger ones
# may belong to a submit or a completion that is between writing its file and committing.
ORPHAN_AGE_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 300.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires REAL,
    error TEXT,
    error_type TEXT,
    result_path TEXT,
    retrieved_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (status, priority DESC, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    task_id TEXT NOT NULL,
    event TEXT NOT NULL,
    attempt INTEGER,
    owner TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_task ON events (task_id);
"""


# --- public data ----------------------------------------------------------------------------


class TaskStatus(enum.Enum):
    """Where a task is in its life."""

    PENDING = "pending"  # waiting for a worker (new, recovered, or waiting out a retry's backoff)
    PROCESSING = "processing"  # claimed: a worker holds its lease and is parsing it
    COMPLETED = "completed"  # parsed; the result is on disk until retrieved or forgotten
    FAILED = "failed"  # the document's fault, or every attempt failed; ``error`` says why
    CANCELLED = "cancelled"  # cancelled while pending; it never ran

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


@dataclass(frozen=True)
class TaskInfo:
    """A task's record. Times are ``time.time()`` seconds.

    Attributes:
        id: the task id ``submit`` returned.
        name: the document's name (its path, or ``name=``).
        status: see :class:`TaskStatus`.
        submitted_at: when ``submit`` stored it.
        started_at: when its latest attempt started.
        finished_at: when it ended (completed, failed or cancelled).
        attempts: attempts started so far.
        max_attempts: attempts allowed.
        error: why it failed (the latest attempt's error while a retry is pending).
        error_type: the exception's class name.
        worker: the worker holding it while PROCESSING.
        has_result: whether a result is stored.
        options: the parse options given to ``submit``.
        priority: higher runs first.
        size: input bytes.
        not_before: a pending retry does not start before this time.
    """

    id: str
    name: str
    status: TaskStatus
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    max_attempts: int
    error: str | None
    error_type: str | None
    worker: str | None
    has_result: bool
    options: dict[str, Any]
    priority: int = 0
    size: int = 0
    not_before: float = 0.0

    @property
    def queued_seconds(self) -> float | None:
        """From submission to the latest start."""
        return None if self.started_at is None else self.started_at - self.submitted_at

    @property
    def run_seconds(self) -> float | None:
        """From the latest start to the end."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class QueueSettings:
    """How workers process a queue; stored in the queue file by its creator.

    ``TaskQueue(path, **overrides)`` on an existing file uses the stored settings,
    with any argument given overriding them for that object (the worker CLI's flags).
    """

    backend: str = "pipeline"
    device: str | None = None
    models_dir: str | None = None
    isolation: str = "none"
    budget: dict[str, Any] | None = None  # VramBudget.to_json()
    max_attempts: int = 3
    task_timeout: float | None = None
    lease_seconds: float = 60.0
    retry_backoff: float = 1.0
    keep_results: bool = True
    concurrency: int = 1
    durable: bool = True

    def vram_budget(self) -> VramBudget | None:
        return None if self.budget is None else VramBudget.from_json(self.budget)

    def check(self) -> None:
        """Raises ConfigurationError for values no worker could use."""
        from ._config import resolve_backend

        spec = resolve_backend(self.backend, engine=object())  # engines are checked by the session
        if spec.needs_engine:
            raise ConfigurationError(
                f"backend {self.backend!r} parses through a resident VLM engine; the queue runs "
                "'pipeline' or 'flash' sessions",
                backend=self.backend,
            )
        if self.isolation not in ("none", "process"):
            raise ConfigurationError(f"isolation={self.isolation!r}: expected 'none' or 'process'")
        for name in ("max_attempts", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name}={value!r}: must be an integer of at least 1", **{name: value})
        for name in ("lease_seconds", "retry_backoff"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name}={getattr(self, name)!r}: must be positive")
        if self.task_timeout is not None and not self.task_timeout > 0:
            raise ConfigurationError(f"task_timeout={self.task_timeout!r}: must be positive")
        if self.task_timeout is not None and self.isolation != "process":
            raise ConfigurationError(
                "task_timeout needs isolation='process': a parse running in the worker's own process "
                "cannot be interrupted safely",
                task_timeout=self.task_timeout,
            )
        if self.concurrency > 1 and self.isolation != "process":
            raise ConfigurationError(
                "concurrency > 1 needs isolation='process': MinerU's models in one process are used "
                "by one thread at a time",
                concurrency=self.concurrency,
            )


@dataclass
class WorkerStats:
    """What one ``run`` did."""

    completed: int = 0
    failed: int = 0
    retried: int = 0
    lost: int = 0  # finished after losing the lease: the result was discarded
    sessions: int = 0  # sessions (slots) opened
    seconds: float = 0.0


@dataclass(frozen=True)
class _Claim:
    id: str
    token: str
    attempt: int
    max_attempts: int
    name: str
    options: dict[str, Any]


_SETTINGS_FIELDS = {f.name for f in dataclasses.fields(QueueSettings)}


class _QueueState(enum.Enum):
    OPEN = "open"  # the database is open; submit, status, run allowed
    CLOSED = "closed"  # connections closed; every call raises SessionStateError


# --- the queue ------------------------------------------------------------------------------


class TaskQueue:
    """A durable queue of PDFs parsed by a worker loop on one long-lived session.

    Example::

        queue = TaskQueue("tasks.db", backend="pipeline", models_dir="/models")
        task_id = queue.submit("paper.pdf")
        threading.Thread(target=queue.run, daemon=True).start()   # or: mineru-vram worker tasks.db
        result = queue.result(task_id, timeout=600)

    Args:
        path: the SQLite file (created if missing); its folder gets ``<name>.files/``.
        backend: ``"pipeline"`` or ``"flash"``.
        device: as :class:`ModelSession` (default the first GPU, else CPU).
        models_dir: MinerU's model tree.
        isolation: ``"none"`` parses in the worker's process; ``"process"`` in a
            supervised child (needed for ``task_timeout`` and ``concurrency``).
        budget: a :class:`VramBudget` (or MiB / fraction) per session: each session
            waits for it to be free (admission) before loading.
        max_attempts: attempts per task before it is FAILED (default 3).
        task_timeout: seconds a parse may take before its worker process is killed.
        lease_seconds: a worker that stops renewing its lease for this long loses its
            tasks to other workers (default 60).
        retry_backoff: seconds before the first retry; doubles per attempt (max 300).
        keep_results: keep results on disk after retrieval (default) or delete them
            on the first successful :meth:`result`.
        concurrency: sessions parsing in parallel; slots after the first open only
            when their budget is admitted at once.
        durable: ``True`` (default): every commit and every stored file is synced, so
            nothing acknowledged is lost even to a power cut. ``False`` saves those
            fsyncs (about three per task) and still loses nothing to a killed process;
            an OS crash may lose the last moments' work (SQLite stays consistent).
        session_options: more :class:`ModelSession` keyword arguments for workers
            (not stored in the queue file).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "tasks.db",
        *,
        backend: str | None = None,
        device: str | int | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        isolation: Literal["none", "process"] | None = None,
        budget: VramBudget | int | float | str | None = None,
        max_attempts: int | None = None,
        task_timeout: float | None = None,
        lease_seconds: float | None = None,
        retry_backoff: float | None = None,
        keep_results: bool | None = None,
        concurrency: int | None = None,
        durable: bool | None = None,
        session_options: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.storage = self.path.with_name(self.path.name + ".files")
        resolved = resolve_budget(budget)
        given: dict[str, Any] = {
            "backend": backend,
            "device": None if device is None else str(device),
            "models_dir": None if models_dir is None else str(Path(models_dir).expanduser().resolve()),
            "isolation": isolation,
            "budget": None if resolved is None else resolved.to_json(),
            "max_attempts": max_attempts,
            "task_timeout": task_timeout,
            "lease_seconds": lease_seconds,
            "retry_backoff": retry_backoff,
            "keep_results": keep_results,
            "concurrency": concurrency,
            "durable": durable,
        }
        self._overrides = {k: v for k, v in given.items() if v is not None}
        self._budget_probe = None if resolved is None else resolved.probe
        self.session_options = dict(session_options or {})
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._state = _QueueState.OPEN
        self._stops: set[threading.Event] = set()
        self._runs = threading.Condition()  # guards _run_threads: threads inside run()
        self._run_threads: set[int] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        candidate = QueueSettings(**self._overrides)
        candidate.check()
        self.settings = candidate
        self.storage.mkdir(parents=True, exist_ok=True, mode=0o700)  # results are unpickled from here
        for sub in ("inputs", "work", "results", "workers"):
            (self.storage / sub).mkdir(exist_ok=True, mode=0o700)
        try:
            self._init_db(candidate)
            stored = self._stored_settings()
            self.settings = dataclasses.replace(stored, **self._overrides)
            self.settings.check()
            self._conn().execute(f"PRAGMA synchronous = {'FULL' if self.settings.durable else 'NORMAL'}")
        except BaseException:
            self.close()
            raise

    # -- database ------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._state is _QueueState.CLOSED:
            raise SessionStateError(f"the task queue {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) below. One
            # connection per thread; check_same_thread=False only so close() can close them all.
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed submit or completion survives a power cut. NORMAL (durable=False)
            # still survives any killed process, and saves an fsync per commit.
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.settings.durable else 'NORMAL'}")
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two workers
        never both read a task as claimable."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _init_db(self, candidate: QueueSettings) -> None:
        with self._write() as c:
            # One statement at a time: executescript() would commit the transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            version = c.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is not None and int(version["value"]) != SCHEMA_VERSION:
                raise ConfigurationError(
                    f"{self.path} is a task queue of schema {version['value']}; this mineru-vram reads "
                    f"schema {SCHEMA_VERSION}",
                    path=str(self.path),
                )
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            # The first creator's settings stay; later openers override them in memory only.
            c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('settings', ?)",
                (json.dumps(dataclasses.asdict(candidate)),),
            )

    def _stored_settings(self) -> QueueSettings:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        data = json.loads(row["value"]) if row is not None else {}
        return QueueSettings(**{k: v for k, v in data.items() if k in _SETTINGS_FIELDS})

    def close(self) -> None:
        """Stop running loops, wait for them to finish their current task, close the database. Idempotent."""
        if self._state is _QueueState.CLOSED:
            return
        self.stop()
        me = threading.get_ident()
        with self._runs:
            # A loop's own thread (a signal handler, a callback) cannot wait for itself.
            self._runs.wait_for(lambda: not (self._run_threads - {me}))
        self._state = _QueueState.CLOSED
        with self._conn_lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> TaskQueue:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TaskQueue({str(self.path)!r}, backend={self.settings.backend!r}, state={self._state.value})"

    # -- files ---------------------------------------------------------------------------------

    def _input_path(self, task_id: str) -> Path:
        return self.storage / "inputs" / f"{task_id}.pdf"

    def _staging_path(self, claim: _Claim) -> Path:
        return self.storage / "work" / f"{claim.id}-{claim.token}.pickle"

    def _result_path(self, claim: _Claim) -> Path:
        return self.storage / "results" / f"{claim.id}-{claim.token}.pickle"

    # -- submitting ----------------------------------------------------------------------------

    def submit(
        self,
        source: Source,
        *,
        name: str | None = None,
        pages: str | int | Sequence[int] | range | None = None,
        ocr_mode: Literal["auto", "txt", "ocr"] | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
    ) -> str:
        """Copy a document into the queue and return its task id. Parsing happens in a worker.

        The document is not validated here: an invalid one ends FAILED with the reason.

        Args:
            source: a path, the PDF's bytes, or a binary file object.
            name: the document's name in results and status (default its path).
            pages: 1-based pages to parse, as for :meth:`ModelSession.parse`.
            ocr_mode: ``"auto"``, ``"txt"`` or ``"ocr"``.
            priority: higher runs first; equal priorities run in submission order.
            max_attempts: overrides the queue's for this task.

        Raises:
            DocumentNotFoundError: the path does not exist (nothing to copy).
            ConfigurationError: an option with an unusable value.
        """
        from ._documents import _name_of, _read

        if ocr_mode not in (None, "auto", "txt", "ocr"):
            raise ConfigurationError(f"ocr_mode={ocr_mode!r}: expected 'auto', 'txt' or 'ocr'", ocr_mode=ocr_mode)
        attempts = self.settings.max_attempts if max_attempts is None else max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"max_attempts={attempts!r}: must be an integer of at least 1")
        doc_name = _name_of(source, name)
        data, _ = _read(source, doc_name, None)
        options = {"pages": _pages_json(pages), "ocr_mode": ocr_mode}
        task_id = uuid.uuid4().hex
        target = self._input_path(task_id)
        _write_file(target, data, sync=self.settings.durable)  # before the row: a claimed task always has its input
        now = time.time()
        try:
            with self._write() as c:
                c.execute(
                    "INSERT INTO tasks (id, name, status, options, priority, size, submitted_at, max_attempts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        task_id,
                        doc_name,
                        TaskStatus.PENDING.value,
                        json.dumps(options),
                        int(priority),
                        len(data),
                        now,
                        attempts,
                    ),
                )
                _event(c, task_id, "submitted")
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return task_id

    # -- reading -------------------------------------------------------------------------------

    def status(self, task_id: str) -> TaskInfo:
        """The task's record.

        Raises:
            TaskNotFoundError: no such task.
        """
        row = self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFoundError(f"no task {task_id!r} in {self.path}", task_id=task_id)
        return _info(row)

    def tasks(self, status: TaskStatus | str | None = None, *, limit: int | None = None) -> list[TaskInfo]:
        """Tasks in submission order, optionally only those with ``status``."""
        sql = "SELECT * FROM tasks"
        args: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            args.append(TaskStatus(status).value if isinstance(status, str) else status.value)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_info(r) for r in self._conn().execute(sql, args).fetchall()]

    def counts(self) -> dict[TaskStatus, int]:
        """How many tasks are in each status."""
        out = dict.fromkeys(TaskStatus, 0)
        for row in self._conn().execute("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status"):
            out[TaskStatus(row["status"])] = int(row["n"])
        return out

    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail: submitted, claimed, completed, retry, recovered, failed, cancelled, lease_lost."""
        sql = "SELECT time, task_id, event, attempt, owner, detail FROM events"
        args: tuple[Any, ...] = ()
        if task_id is not None:
            sql += " WHERE task_id = ?"
            args = (task_id,)
        return [dict(r) for r in self._conn().execute(sql + " ORDER BY seq", args).fetchall()]

    def result(self, task_id: str, timeout: float | None = None) -> ParseResult:
        """Wait for the task to end and return its result.

        Raises:
            TaskFailedError: the task failed (``error`` and ``error_type`` say why).
            TaskCancelledError: it was cancelled.
            ResultTimeoutError: ``timeout`` seconds passed first (the task goes on).
            TaskNotFoundError: no such task, or its result was deleted after retrieval.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            result, wait = self._result_or_wait(task_id, timeout, deadline, delay)
            if result is not None:
                return result
            time.sleep(wait)
            delay = min(0.5, delay * 1.5)

    async def aresult(self, task_id: str, timeout: float | None = None) -> ParseResult:
        """``result`` without blocking the event loop (status is polled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            result, wait = self._result_or_wait(task_id, timeout, deadline, delay)
            if result is not None:
                return result
            await asyncio.sleep(wait)
            delay = min(0.5, delay * 1.5)

    def _result_or_wait(
        self, task_id: str, timeout: float | None, deadline: float | None, delay: float
    ) -> tuple[ParseResult | None, float]:
        """One poll of ``result``/``aresult``: the result if the task ended, else how long to wait.

        Raises:
            ResultTimeoutError: the deadline passed while the task is still running.
        """
        info = self.status(task_id)
        if info.status.terminal:
            return self._finished(info), 0.0
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise ResultTimeoutError(f"task {task_id} is still {info.status.value} after {timeout:g}s", task_id=task_id)
        return None, delay if deadline is None else min(delay, max(0.0, deadline - now))

    def _finished(self, info: TaskInfo) -> ParseResult:
        if info.status is TaskStatus.CANCELLED:
            raise TaskCancelledError(f"task {info.id} ({info.name}) was cancelled", task_id=info.id)
        if info.status is TaskStatus.FAILED:
            raise TaskFailedError(
                f"task {info.id} ({info.name}) failed after {info.attempts} attempt(s): {info.error}",
                task_id=info.id,
                error=info.error,
                error_type=info.error_type,
                attempts=info.attempts,
            )
        row = self._conn().execute("SELECT result_path FROM tasks WHERE id = ?", (info.id,)).fetchone()
        stored = None if row is None else row["result_path"]
        if stored is None:
            raise TaskNotFoundError(
                f"the result of task {info.id} was deleted after it was retrieved (keep_results=False)",
                task_id=info.id,
            )
        path = self.storage / "results" / stored
        try:
            with open(path, "rb") as fh:
                # The file was written by a worker of this queue into its private (0700) folder.
                result: ParseResult = pickle.load(fh)  # noqa: S301
        except FileNotFoundError:
            raise TaskNotFoundError(
                f"the result of task {info.id} is gone from {path} (retrieved and deleted meanwhile?)",
                task_id=info.id,
            ) from None
        if not self.settings.keep_results:
            with self._write() as c:
                cur = c.execute(
                    "UPDATE tasks SET result_path = NULL, retrieved_at = ? WHERE id = ? AND result_path = ?",
                    (time.time(), info.id, stored),
                )
                if cur.rowcount:
                    _event(c, info.id, "retrieved", detail="result deleted")
            if cur.rowcount:
                path.unlink(missing_ok=True)
        return result

    # -- managing ------------------------------------------------------------------------------

    def cancel(self, task_id: str) -> bool:
        """Cancel a pending task; it will never run.

        Returns:
            ``True`` if the task was pending and is now cancelled; ``False`` if it had
            already started or ended (a running parse is not interrupted).

        Raises:
            TaskNotFoundError: no such task.
        """
        with self._write() as c:
            cur = c.execute(
                "UPDATE tasks SET status = ?, finished_at = ? WHERE id = ? AND status = ?",
                (TaskStatus.CANCELLED.value, time.time(), task_id, TaskStatus.PENDING.value),
            )
            done = cur.rowcount == 1
            if done:
                _event(c, task_id, "cancelled")
            elif c.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone() is None:
                raise TaskNotFoundError(f"no task {task_id!r} in {self.path}", task_id=task_id)
        if done:
            self._input_path(task_id).unlink(missing_ok=True)
        return done

    def forget(self, task_id: str) -> bool:
        """Delete an ended task, its result file and its events.

        Returns:
            ``False`` if the task is still pending or processing (nothing deleted).
        """
        with self._write() as c:
            row = c.execute("SELECT status, result_path FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFoundError(f"no task {task_id!r} in {self.path}", task_id=task_id)
            if not TaskStatus(row["status"]).terminal:
                return False
            c.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            c.execute("DELETE FROM events WHERE task_id = ?", (task_id,))
        if row["result_path"]:
            (self.storage / "results" / row["result_path"]).unlink(missing_ok=True)
        self._input_path(task_id).unlink(missing_ok=True)
        return True

    def recover(self) -> int:
        """Recover tasks of dead workers and sweep files no task explains. Workers run it on start.

        Returns:
            How many tasks were recovered (requeued or failed).
        """
        with self._write() as c:
            recovered, ended = self._recover_locked(c, time.time())
        self._remove_inputs(ended)
        self._sweep()
        return recovered

    # -- the worker ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask running loops to stop after their current task."""
        for event in list(self._stops):
            event.set()

    def run(
        self,
        *,
        until_idle: bool = False,
        max_tasks: int | None = None,
        poll_interval: float = 0.2,
        session: ModelSession | None = None,
    ) -> WorkerStats:
        """Process tasks until :meth:`stop` (or the conditions below).

        Opens the session(s) first (waiting for admission when a budget is set),
        then claims and parses tasks one at a time per session. A task's failure
        is recorded on the task; it never ends the loop.

        Args:
            until_idle: return once no task is pending.
            max_tasks: return after finishing this many tasks.
            poll_interval: seconds between looks for work while idle.
            session: an open session of the caller's to parse on (it is not closed,
                and the queue's backend, device, budget and concurrency do not apply).

        Raises:
            AdmissionTimeoutError, WorkerStartError...: the first session could not open.
        """
        stop = threading.Event()
        self._stops.add(stop)
        with self._runs:
            self._run_threads.add(threading.get_ident())
        t0 = time.perf_counter()
        stats = WorkerStats()
        counter = _Counter(max_tasks)
        try:
            with _WorkerIdentity(self.storage / "workers") as owner:
                self.recover()
                if session is not None and session.state.value != "opened":
                    raise SessionStateError(f"run(session=...) needs an open session; it is {session.state.value}")
                sessions = [session] if session is not None else self._open_sessions(owner)
                stats.sessions = len(sessions)
                held: dict[str, _Claim] = {}
                run = _Run(owner, held, stop, stats, counter, until_idle, poll_interval)
                heartbeat = threading.Thread(
                    target=self._heartbeat, args=(held, stop), name="mineru-vram-queue-heartbeat", daemon=True
                )
                heartbeat.start()
                try:
                    if len(sessions) == 1:
                        self._loop(sessions[0], run)
                    else:
                        threads = [
                            threading.Thread(
                                target=self._slot,
                                args=(s, run),
                                name=f"mineru-vram-queue-slot-{i}",
                                daemon=True,
                            )
                            for i, s in enumerate(sessions)
                        ]
                        for t in threads:
                            t.start()
                        for t in threads:
                            while t.is_alive():
                                t.join(0.5)
                finally:
                    stop.set()
                    heartbeat.join(5.0)
                    for own in sessions if session is None else ():
                        try:
                            own.close()
                        except Exception as exc:  # a leak report must not hide the loop's own outcome
                            logger.warning("closing a queue session: %s", exc)
        finally:
            self._stops.discard(stop)
            with self._runs:
                self._run_threads.discard(threading.get_ident())
                self._runs.notify_all()
            stats.seconds = time.perf_counter() - t0
        return stats

    async def arun(self, **kwargs: Any) -> WorkerStats:
        """``run`` on an executor owned by the queue; cancelling it stops the loop after its current task."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mineru-vram-q")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, lambda: self.run(**kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.stop()
            with contextlib.suppress(Exception):
                await future
            raise

    def _make_session(self, budget: VramBudget | None) -> ModelSession:
        from ._session import ModelSession

        s = self.settings
        options: dict[str, Any] = dict(self.session_options)
        return ModelSession(
            s.backend,
            device=s.device,
            models_dir=s.models_dir,
            isolation=s.isolation,  # type: ignore[arg-type]
            budget=budget,
            **options,
        )

    def _open_sessions(self, owner: str) -> list[ModelSession]:
        budget = self.settings.vram_budget()
        if budget is not None and self._budget_probe is not None:
            budget = dataclasses.replace(budget, probe=self._budget_probe)
        sessions = [self._make_session(budget).open()]
        try:
            for i in range(1, self.settings.concurrency):
                # More sessions only when the budget allows: admitted at once, or not at all.
                extra = None if budget is None else dataclasses.replace(budget, timeout=0.0)
                try:
                    sessions.append(self._make_session(extra).open())
                except AdmissionTimeoutError as exc:
                    logger.info(
                        "queue worker %s: %d of %d sessions fit the budget (%s)",
                        owner,
                        i,
                        self.settings.concurrency,
                        exc,
                    )
                    break
        except BaseException:
            for session in sessions:
                with contextlib.suppress(Exception):
                    session.close()
            raise
        return sessions

    def _loop(self, session: ModelSession, run: _Run) -> None:
        while not run.stop.is_set() and run.counter.more():
            claim = self._claim(run.owner)
            if claim is None:
                if run.until_idle and self._pending() == 0:
                    return
                run.stop.wait(run.poll_interval)
                continue
            run.held[claim.id] = claim
            try:
                outcome = self._process(session, claim)
            finally:
                run.held.pop(claim.id, None)
            run.counter.done(run.stats, outcome)

    def _slot(self, session: ModelSession, run: _Run) -> None:
        try:
            self._loop(session, run)
        finally:
            self._drop_thread_connection()

    def _pending(self) -> int:
        row = (
            self._conn()
            .execute("SELECT COUNT(*) AS n FROM tasks WHERE status = ?", (TaskStatus.PENDING.value,))
            .fetchone()
        )
        return int(row["n"])

    def _heartbeat(self, held: dict[str, _Claim], stop: threading.Event) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while not stop.wait(interval):
            for claim in list(held.values()):
                try:
                    with self._write() as c:
                        c.execute(
                            "UPDATE tasks SET lease_expires = ? WHERE id = ? AND lease_token = ? AND status = ?",
                            (
                                time.time() + self.settings.lease_seconds,
                                claim.id,
                                claim.token,
                                TaskStatus.PROCESSING.value,
                            ),
                        )
                except sqlite3.Error as exc:  # a busy database must not kill the heartbeat
                    logger.warning("renewing the lease of task %s: %s", claim.id, exc)
        self._drop_thread_connection()

    def _drop_thread_connection(self) -> None:
        """Close this thread's connection (a thread of a run that is ending)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._conn_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _claim(self, owner: str) -> _Claim | None:
        now = time.time()
        with self._write() as c:
            _, ended = self._recover_locked(c, now)
            row = c.execute(
                "SELECT id, name, options, attempts, max_attempts FROM tasks WHERE status = ? AND not_before <= ? "
                "ORDER BY priority DESC, seq LIMIT 1",
                (TaskStatus.PENDING.value, now),
            ).fetchone()
            claim = None
            if row is not None:
                claim = _Claim(
                    id=row["id"],
                    token=uuid.uuid4().hex,
                    attempt=int(row["attempts"]) + 1,
                    max_attempts=int(row["max_attempts"]),
                    name=row["name"],
                    options=json.loads(row["options"]),
                )
                c.execute(
                    "UPDATE tasks SET status = ?, attempts = ?, started_at = ?, lease_owner = ?, lease_token = ?, "
                    "lease_expires = ? WHERE id = ? AND status = ?",
                    (
                        TaskStatus.PROCESSING.value,
                        claim.attempt,
                        now,
                        owner,
                        claim.token,
                        now + self.settings.lease_seconds,
                        claim.id,
                        TaskStatus.PENDING.value,
                    ),
                )
                _event(c, claim.id, "claimed", attempt=claim.attempt, owner=owner)
        self._remove_inputs(ended)
        return claim

    def _recover_locked(self, c: sqlite3.Connection, now: float) -> tuple[int, list[str]]:
        """Requeue or fail PROCESSING tasks whose worker died or lost its lease. In a write transaction."""
        rows = c.execute(
            "SELECT id, lease_owner, lease_expires, attempts, max_attempts FROM tasks WHERE status = ?",
            (TaskStatus.PROCESSING.value,),
        ).fetchall()
        recovered = 0
        ended: list[str] = []
        for row in rows:
            owner = row["lease_owner"]
            expired = row["lease_expires"] is None or row["lease_expires"] < now
            dead = _owner_dead(self.storage / "workers", owner)
            if not (expired or dead):
                continue
            why = "its worker died" if dead else "its worker stopped renewing the lease"
            recovered += 1
            attempts = int(row["attempts"])
            if attempts >= int(row["max_attempts"]):
                c.execute(
                    "UPDATE tasks SET status = ?, finished_at = ?, error = ?, error_type = ?, lease_owner = NULL, "
                    "lease_token = NULL, lease_expires = NULL WHERE id = ?",
                    (
                        TaskStatus.FAILED.value,
                        now,
                        f"{why} during attempt {attempts} of {row['max_attempts']}",
                        "WorkerLost",
                        row["id"],
                    ),
                )
                _event(c, row["id"], "failed", attempt=attempts, owner=owner, detail=why)
                ended.append(row["id"])
            else:
                c.execute(
                    "UPDATE tasks SET status = ?, not_before = ?, error = ?, error_type = ?, lease_owner = NULL, "
                    "lease_token = NULL, lease_expires = NULL WHERE id = ?",
                    (
                        TaskStatus.PENDING.value,
                        now + self._backoff(attempts),
                        f"{why} during attempt {attempts}",
                        "WorkerLost",
                        row["id"],
                    ),
                )
                _event(c, row["id"], "recovered", attempt=attempts, owner=owner, detail=why)
            logger.warning("task %s: %s (attempt %d); recovered", row["id"], why, attempts)
        return recovered, ended

    def _backoff(self, attempt: int) -> float:
        return float(min(MAX_BACKOFF_SECONDS, self.settings.retry_backoff * 2 ** max(0, attempt - 1)))

    def _process(self, session: ModelSession, claim: _Claim) -> str:
        """Parse one claimed task and record the outcome. Returns completed / failed / retried / lost."""
        staged = self._staging_path(claim)
        try:
            source = self._input_path(claim.id)
            options = claim.options
            try:
                if not source.is_file():
                    raise InvalidDocumentError(
                        f"{claim.name}: the queue's copy of the input is missing", document=claim.name
                    )
                result = session.parse(
                    source,
                    name=claim.name,
                    pages=options.get("pages"),
                    ocr_mode=options.get("ocr_mode"),
                    # No task_timeout: the session's default bound, which only a hung worker reaches.
                    timeout="auto" if self.settings.task_timeout is None else self.settings.task_timeout,
                )
            except SessionStateError:
                self._give_back(claim)
                raise
            except Exception as exc:
                return self._fail(claim, exc)
            except BaseException:
                self._give_back(claim)  # Ctrl-C: not the document's fault, and not an attempt
                raise
            return self._complete(claim, result, staged)
        finally:
            staged.unlink(missing_ok=True)  # only left when completing failed half-way

    def _complete(self, claim: _Claim, result: ParseResult, staged: Path) -> str:
        # One file per attempt, named by its lease token: a late finisher never overwrites the
        # result of the attempt that won. Synced before the row says COMPLETED.
        _write_file(
            staged, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), move=False, sync=self.settings.durable
        )
        final = self._result_path(claim)
        os.replace(staged, final)
        with self._write() as c:
            cur = c.execute(
                "UPDATE tasks SET status = ?, finished_at = ?, result_path = ?, error = NULL, error_type = NULL, "
                "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                "WHERE id = ? AND status = ? AND lease_token = ?",
                (
                    TaskStatus.COMPLETED.value,
                    time.time(),
                    final.name,
                    claim.id,
                    TaskStatus.PROCESSING.value,
                    claim.token,
                ),
            )
            won = cur.rowcount == 1
            _event(c, claim.id, "completed" if won else "lease_lost", attempt=claim.attempt)
        if not won:
            # The task was recovered and given to another worker meanwhile: that one owns it now.
            final.unlink(missing_ok=True)
            logger.warning("task %s finished after its lease was lost; result discarded", claim.id)
            return "lost"
        self._input_path(claim.id).unlink(missing_ok=True)
        return "completed"

    def _fail(self, claim: _Claim, exc: BaseException) -> str:
        message = str(exc) or type(exc).__name__
        error_type = type(exc).__name__
        retry = not _document_fault(exc) and claim.attempt < claim.max_attempts
        now = time.time()
        with self._write() as c:
            if retry:
                cur = c.execute(
                    "UPDATE tasks SET status = ?, not_before = ?, error = ?, error_type = ?, lease_owner = NULL, "
                    "lease_token = NULL, lease_expires = NULL WHERE id = ? AND status = ? AND lease_token = ?",
                    (
                        TaskStatus.PENDING.value,
                        now + self._backoff(claim.attempt),
                        message,
                        error_type,
                        claim.id,
                        TaskStatus.PROCESSING.value,
                        claim.token,
                    ),
                )
            else:
                cur = c.execute(
                    "UPDATE tasks SET status = ?, finished_at = ?, error = ?, error_type = ?, lease_owner = NULL, "
                    "lease_token = NULL, lease_expires = NULL WHERE id = ? AND status = ? AND lease_token = ?",
                    (
                        TaskStatus.FAILED.value,
                        now,
                        message,
                        error_type,
                        claim.id,
                        TaskStatus.PROCESSING.value,
                        claim.token,
                    ),
                )
            won = cur.rowcount == 1
            event = ("retry" if retry else "failed") if won else "lease_lost"
            _event(c, claim.id, event, attempt=claim.attempt, detail=f"{error_type}: {message}"[:2000])
        if not won:
            return "lost"
        log = logger.info if retry else logger.warning
        log(
            "task %s (%s) attempt %d %s: %s",
            claim.id,
            claim.name,
            claim.attempt,
            "will be retried" if retry else "failed",
            message,
        )
        if retry:
            return "retried"
        self._input_path(claim.id).unlink(missing_ok=True)
        return "failed"

    def _give_back(self, claim: _Claim) -> None:
        """Return a claim untouched (the worker itself is stopping): pending again, attempt not counted."""
        with contextlib.suppress(Exception), self._write() as c:
            cur = c.execute(
                "UPDATE tasks SET status = ?, attempts = attempts - 1, lease_owner = NULL, lease_token = NULL, "
                "lease_expires = NULL WHERE id = ? AND status = ? AND lease_token = ?",
                (TaskStatus.PENDING.value, claim.id, TaskStatus.PROCESSING.value, claim.token),
            )
            if cur.rowcount:
                _event(c, claim.id, "released", attempt=claim.attempt, detail="the worker stopped")

    def _remove_inputs(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._input_path(task_id).unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Delete files no task row explains (a crash between writing a file and committing)."""
        conn = self._conn()
        rows = conn.execute("SELECT id, status, result_path, lease_token FROM tasks").fetchall()
        by_id = {r["id"]: r for r in rows}
        results = {r["result_path"] for r in rows if r["result_path"]}
        cutoff = time.time() - ORPHAN_AGE_SECONDS

        def old(path: Path) -> bool:
            try:
                return path.stat().st_mtime < cutoff
            except OSError:
                return False

        for path in (self.storage / "inputs").iterdir():
            row = by_id.get(path.name.split(".", 1)[0])
            if (row is None and old(path)) or (row is not None and TaskStatus(row["status"]).terminal):
                path.unlink(missing_ok=True)
        for path in (self.storage / "results").iterdir():
            if path.name not in results and old(path):
                path.unlink(missing_ok=True)
        for path in (self.storage / "work").iterdir():
            task_id, _, rest = path.name.partition("-")
            token = rest.split(".", 1)[0]
            row = by_id.get(task_id)
            live = row is not None and row["status"] == TaskStatus.PROCESSING.value and row["lease_token"] == token
            if not live:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


# --- helpers --------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the session loops of one ``run`` share."""

    owner: str
    held: dict[str, _Claim]  # claims in progress, whose leases the heartbeat renews
    stop: threading.Event
    stats: WorkerStats
    counter: _Counter
    until_idle: bool
    poll_interval: float


class _Counter:
    """Finished tasks across a run's sessions, for ``max_tasks``."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.started = 0
        self._lock = threading.Lock()

    def more(self) -> bool:
        with self._lock:
            return self.limit is None or self.started < self.limit

    def done(self, stats: WorkerStats, outcome: str) -> None:
        with self._lock:
            self.started += 1
            setattr(stats, outcome, getattr(stats, outcome) + 1)


class _WorkerIdentity:
    """A worker's owner id and its lock file, held (``flock``) for the worker's life.

    Others recognise a dead worker by being able to lock its file; the file is
    locked before it is renamed into place, so it is never seen unlocked while alive.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fh: IO[bytes] | None = None

    def __enter__(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{self.owner}"
        fh = open(tmp, "wb")  # held until __exit__
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: dead workers are found by lease expiry alone
            pass
        os.replace(tmp, self.folder / f"{self.owner}.lock")
        self._fh = fh
        return self.owner

    def __exit__(self, *exc: object) -> None:
        (self.folder / f"{self.owner}.lock").unlink(missing_ok=True)
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _owner_dead(folder: Path, owner: str | None) -> bool:
    """Whether ``owner``'s lock file exists and nobody holds it (its process is gone).

    A missing file says nothing (another machine, or already cleaned): the lease decides.
    """
    if not owner:
        return False
    path = folder / f"{owner}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        path.unlink(missing_ok=True)
        return True


def _document_fault(exc: BaseException) -> bool:
    """Whether retrying cannot help: the input is invalid, or MinerU fails on it (deterministically).

    A ParseError caused by an OS-level error (a pipe, a file, a subprocess) is not the
    document's fault; nor are timeouts, OOM after the session's own retry, crashed
    workers or admission timeouts.
    """
    if isinstance(exc, InvalidDocumentError):
        return True
    if isinstance(exc, ParseTimeoutError):
        return False
    if isinstance(exc, ParseError):
        cur: BaseException | None = exc.__cause__
        while cur is not None:
            if isinstance(cur, (OSError, TimeoutError)):
                return False
            cur = cur.__cause__ or cur.__context__
        return True
    return False


def _event(
    c: sqlite3.Connection,
    task_id: str,
    event: str,
    *,
    attempt: int | None = None,
    owner: str | None = None,
    detail: str | None = None,
) -> None:
    c.execute(
        "INSERT INTO events (time, task_id, event, attempt, owner, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), task_id, event, attempt, owner, detail),
    )


def _info(row: sqlite3.Row) -> TaskInfo:
    return TaskInfo(
        id=row["id"],
        name=row["name"],
        status=TaskStatus(row["status"]),
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=int(row["attempts"]),
        max_attempts=int(row["max_attempts"]),
        error=row["error"],
        error_type=row["error_type"],
        worker=row["lease_owner"],
        has_result=row["result_path"] is not None,
        options=json.loads(row["options"]),
        priority=int(row["priority"]),
        size=int(row["size"]),
        not_before=float(row["not_before"]),
    )


def _pages_json(pages: str | int | Sequence[int] | range | None) -> Any:
    if pages is None or isinstance(pages, (str, int)):
        return pages
    return [int(p) for p in pages]


def _write_file(path: Path, data: bytes, *, move: bool = True, sync: bool = True) -> None:
    """Write ``data``: to a temporary name, fsync (when ``sync``), rename (when ``move``)."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}") if move else path
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    if move:
        os.replace(tmp, path)


# --- command line ---------------------------------------------------------------------------


def build_worker_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``mineru-vram worker`` arguments (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="mineru-vram worker", description="Process a mineru-vram task queue.")
    p.add_argument("queue", help="the queue's SQLite file (created if missing)")
    p.add_argument("--backend", choices=("pipeline", "flash"), help="override the queue's backend")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--models-dir", help="MinerU's model tree")
    p.add_argument("--isolation", choices=("none", "process"))
    p.add_argument("--budget", help="VRAM budget per session: MiB (6144), GiB (6GiB) or a fraction (0.25, 25%%)")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--task-timeout", type=float, help="seconds per parse (needs --isolation process)")
    p.add_argument("--lease", type=float, dest="lease_seconds", help="seconds a silent worker keeps its tasks")
    p.add_argument("--retry-backoff", type=float, help="seconds before the first retry (doubles per attempt)")
    p.add_argument("--concurrency", type=int, help="sessions in parallel (needs --isolation process)")
    results = p.add_mutually_exclusive_group()
    results.add_argument("--keep-results", dest="keep_results", action="store_true", default=None)
    results.add_argument("--delete-results", dest="keep_results", action="store_false")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=None, help="sync every commit and file")
    p.add_argument("--until-idle", action="store_true", help="exit once no task is pending")
    p.add_argument("--max-tasks", type=int, help="exit after this many tasks")
    p.add_argument("--poll-interval", type=float, default=0.2, help="seconds between looks for work while idle")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def run_worker_cli(argv: Sequence[str] | None = None) -> int:
    """``mineru-vram worker QUEUE [flags]``: run a queue's worker loop in this process.

    Settings come from the queue file; flags override them for this worker.
    SIGTERM or Ctrl-C stops it after the current task.

    Returns:
        The exit status: 0 after a clean stop, 1 when the worker could not start.
    """
    return run_worker(build_worker_parser().parse_args(argv))


def run_worker(args: argparse.Namespace) -> int:
    """Run the worker from arguments parsed by :func:`build_worker_parser` (for a CLI's subcommand)."""
    level = logging.WARNING - 10 * min(2, args.verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        k: getattr(args, k)
        for k in (
            "backend",
            "device",
            "models_dir",
            "isolation",
            "budget",
            "max_attempts",
            "task_timeout",
            "lease_seconds",
            "retry_backoff",
            "keep_results",
            "concurrency",
            "durable",
        )
        if getattr(args, k) is not None
    }
    try:
        queue = TaskQueue(args.queue, **overrides)
    except MineruVramError as exc:
        print(f"mineru-vram worker: {exc}", file=sys.stderr)
        return 1
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: object) -> None:
            logger.warning("signal %d: stopping after the current task", signum)
            queue.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        stats = queue.run(until_idle=args.until_idle, max_tasks=args.max_tasks, poll_interval=args.poll_interval)
    except MineruVramError as exc:
        print(f"mineru-vram worker: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        queue.close()
    print(
        f"mineru-vram worker: {stats.completed} completed, {stats.failed} failed, {stats.retried} retried, "
        f"{stats.lost} lost leases in {stats.seconds:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_worker_cli())
