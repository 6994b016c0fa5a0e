"""The queue's SQL: schema, submit, claim, lease renewal, complete, fail, recover, sweep, events.

One SQLite file in WAL mode, ``synchronous=FULL`` unless ``durable=False``, every
change in an ``IMMEDIATE`` transaction (the write lock taken up front, so two
workers never both read a task as claimable). Usable without sessions or MinerU:
a claim is a row, a completion is a row update under the claim's lease token.

Exactly once:

* **Claiming** is one transaction: the first due PENDING task becomes PROCESSING
  with a fresh *lease token*, an owner and a lease expiry, and its attempt counter
  goes up. Several processes may claim from one file.
* **Leases.** The owner renews the lease of every task it holds. A task whose
  lease expired, or whose owner's lock file can be locked (the owner died), is
  recovered at the next claim: back to PENDING after a backoff, or FAILED once it
  used all its attempts.
* **Completion** succeeds only while the task is still PROCESSING under the same
  token: a worker that lost its lease (the task was recovered and given to
  another) cannot complete it. An append-only ``events`` table records every
  claim, completion, retry and recovery.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from mineru_vram._exceptions import ConfigurationError, QueueStorageError, TaskNotFoundError

from .files import LiveRow, Storage, secure_database
from .records import Claim, TaskInfo, TaskStatus

__all__ = ["MAX_BACKOFF_SECONDS", "SCHEMA_VERSION", "LeasePolicy", "QueueStore"]

logger = logging.getLogger("mineru_vram")

SCHEMA_VERSION = 1
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


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _typed(
    what: str,
) -> Callable[[Callable[Concatenate[QueueStore, _P], _R]], Callable[Concatenate[QueueStore, _P], _R]]:
    """Turn SQLite's errors in a store method into :class:`QueueStorageError` saying ``what`` failed."""

    def wrap(fn: Callable[Concatenate[QueueStore, _P], _R]) -> Callable[Concatenate[QueueStore, _P], _R]:
        @functools.wraps(fn)
        def inner(self: QueueStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise self.error(what, exc) from exc

        return inner

    return wrap


@dataclass(frozen=True)
class LeasePolicy:
    """How long leases last and how retries back off.

    Attributes:
        lease_seconds: a lease not renewed for this long is lost.
        retry_backoff: seconds before the first retry; doubles per attempt, up to
            :data:`MAX_BACKOFF_SECONDS`.
        task_timeout: how long an attempt may run; a recovered task that ran longer
            says so in its error.
    """

    lease_seconds: float = 60.0
    retry_backoff: float = 1.0
    task_timeout: float | None = None

    def backoff(self, attempt: int) -> float:
        return float(min(MAX_BACKOFF_SECONDS, self.retry_backoff * 2 ** max(0, attempt - 1)))


class QueueStore:
    """The database of one queue, with one connection per thread.

    Args:
        path: the SQLite file.
        storage: the queue's files; tasks that end lose their input file, recovery
            asks its ``workers/`` folder whether an owner lives, and :meth:`sweep`
            deletes what no row explains.
        policy: leases and backoff (replaceable later: ``store.policy = ...``).
        durable: ``synchronous=FULL`` (``True``) or ``NORMAL``.
    """

    def __init__(
        self, path: Path, storage: Storage, *, policy: LeasePolicy | None = None, durable: bool = True
    ) -> None:
        self.path = path
        self.storage = storage
        self.policy = policy or LeasePolicy()
        self._durable = durable
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()

    # -- connections -----------------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        return self._durable

    @durable.setter
    def durable(self, value: bool) -> None:
        self._durable = value
        try:
            self.conn().execute(f"PRAGMA synchronous = {'FULL' if value else 'NORMAL'}")
        except sqlite3.Error as exc:
            raise self.error("cannot open the task queue", exc) from exc

    def error(self, what: str, exc: sqlite3.Error) -> QueueStorageError:
        """The typed error for SQLite's ``exc`` while doing ``what``."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in reason:
            reason += " (not a mineru-vram task queue, or a damaged one)"
        return QueueStorageError(f"{self.path}: {what}: {reason}", path=str(self.path), sqlite_error=type(exc).__name__)

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
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
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._durable else 'NORMAL'}")
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``)."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def drop_thread_connection(self) -> None:
        """Close this thread's connection (a thread that is ending)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._conn_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        with self._conn_lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- schema and settings ---------------------------------------------------------------------

    @_typed("cannot open the task queue")
    def init(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Create the schema where missing; store ``settings`` unless some are stored already.

        Returns:
            The stored settings (the first creator's).

        Raises:
            ConfigurationError: the file is a queue of another schema version.
            InsecurePathError: the file (or its journal) is another user's, a link, or
                writable by others.
            QueueStorageError: it cannot be created or read, or it is not a queue.
        """
        secure_database(self.path)
        with self.write() as c:
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
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('settings', ?)", (json.dumps(settings),))
            row = c.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        stored = json.loads(row["value"]) if row is not None else {}
        return stored if isinstance(stored, dict) else {}

    # -- adding and reading ----------------------------------------------------------------------

    @_typed("cannot store the task")
    def add(
        self, task_id: str, name: str, options: dict[str, Any], *, priority: int, size: int, max_attempts: int
    ) -> None:
        """Insert a PENDING task (its input file is written before)."""
        with self.write() as c:
            c.execute(
                "INSERT INTO tasks (id, name, status, options, priority, size, submitted_at, max_attempts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    name,
                    TaskStatus.PENDING.value,
                    json.dumps(options),
                    int(priority),
                    size,
                    time.time(),
                    max_attempts,
                ),
            )
            _event(c, task_id, "submitted")

    @_typed("cannot read the task queue")
    def info(self, task_id: str) -> TaskInfo:
        """The task's record.

        Raises:
            TaskNotFoundError: no such task.
        """
        row = self.conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFoundError(f"no task {task_id!r} in {self.path}", task_id=task_id)
        return _info(row)

    @_typed("cannot read the task queue")
    def tasks(self, status: TaskStatus | None = None, *, limit: int | None = None) -> list[TaskInfo]:
        sql = "SELECT * FROM tasks"
        args: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            args.append(status.value)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_info(r) for r in self.conn().execute(sql, args).fetchall()]

    @_typed("cannot read the task queue")
    def counts(self) -> dict[TaskStatus, int]:
        out = dict.fromkeys(TaskStatus, 0)
        for row in self.conn().execute("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status"):
            out[TaskStatus(row["status"])] = int(row["n"])
        return out

    @_typed("cannot read the task queue")
    def pending(self) -> int:
        row = (
            self.conn()
            .execute("SELECT COUNT(*) AS n FROM tasks WHERE status = ?", (TaskStatus.PENDING.value,))
            .fetchone()
        )
        return int(row["n"])

    @_typed("cannot read the task queue")
    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT time, task_id, event, attempt, owner, detail FROM events"
        args: tuple[Any, ...] = ()
        if task_id is not None:
            sql += " WHERE task_id = ?"
            args = (task_id,)
        return [dict(r) for r in self.conn().execute(sql + " ORDER BY seq", args).fetchall()]

    @_typed("cannot read the task queue")
    def result_name(self, task_id: str) -> str | None:
        """The stored result's file name (``None``: no result, or deleted after retrieval)."""
        row = self.conn().execute("SELECT result_path FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else row["result_path"]

    # -- a worker's transitions ------------------------------------------------------------------

    @_typed("cannot claim a task")
    def claim(self, owner: str) -> Claim | None:
        """Recover what needs recovering, then claim the first due PENDING task for ``owner``."""
        now = time.time()
        with self.write() as c:
            _, ended = self._recover_locked(c, now)
            row = c.execute(
                "SELECT id, name, options, attempts, max_attempts FROM tasks WHERE status = ? AND not_before <= ? "
                "ORDER BY priority DESC, seq LIMIT 1",
                (TaskStatus.PENDING.value, now),
            ).fetchone()
            claim = None
            if row is not None:
                claim = Claim(
                    id=row["id"],
                    token=uuid.uuid4().hex,
                    attempt=int(row["attempts"]) + 1,
                    max_attempts=int(row["max_attempts"]),
                    name=row["name"],
                    options=json.loads(row["options"]),
                    started=now,
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
                        now + self.policy.lease_seconds,
                        claim.id,
                        TaskStatus.PENDING.value,
                    ),
                )
                _event(c, claim.id, "claimed", attempt=claim.attempt, owner=owner)
        self.storage.remove_inputs(ended)
        return claim

    @_typed("cannot renew a lease")
    def renew(self, claims: Sequence[Claim]) -> None:
        """Extend the leases of ``claims`` (those still held under their token)."""
        for claim in claims:
            with self.write() as c:
                c.execute(
                    "UPDATE tasks SET lease_expires = ? WHERE id = ? AND lease_token = ? AND status = ?",
                    (time.time() + self.policy.lease_seconds, claim.id, claim.token, TaskStatus.PROCESSING.value),
                )

    @_typed("cannot record a completed task")
    def complete(self, claim: Claim, result_name: str) -> bool:
        """Mark the task COMPLETED with its stored result, if ``claim`` still holds it.

        Returns:
            ``False`` when the lease was lost (the task was recovered meanwhile): the
            caller deletes its result file; the task's current owner decides.
        """
        with self.write() as c:
            cur = c.execute(
                "UPDATE tasks SET status = ?, finished_at = ?, result_path = ?, error = NULL, error_type = NULL, "
                "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                "WHERE id = ? AND status = ? AND lease_token = ?",
                (
                    TaskStatus.COMPLETED.value,
                    time.time(),
                    result_name,
                    claim.id,
                    TaskStatus.PROCESSING.value,
                    claim.token,
                ),
            )
            won = cur.rowcount == 1
            _event(c, claim.id, "completed" if won else "lease_lost", attempt=claim.attempt)
        if won:
            self.storage.remove_inputs([claim.id])
        return won

    @_typed("cannot record a failed task")
    def fail(self, claim: Claim, message: str, error_type: str, *, retryable: bool) -> str:
        """Record a failed attempt: retried after a backoff while attempts remain and ``retryable``.

        Returns:
            ``"retried"``, ``"failed"`` or ``"lost"`` (the lease was lost: nothing recorded
            but the event).
        """
        retry = retryable and claim.attempt < claim.max_attempts
        now = time.time()
        with self.write() as c:
            if retry:
                cur = c.execute(
                    "UPDATE tasks SET status = ?, not_before = ?, error = ?, error_type = ?, "
                    "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                    "WHERE id = ? AND status = ? AND lease_token = ?",
                    (
                        TaskStatus.PENDING.value,
                        now + self.policy.backoff(claim.attempt),
                        message,
                        error_type,
                        claim.id,
                        TaskStatus.PROCESSING.value,
                        claim.token,
                    ),
                )
            else:
                cur = c.execute(
                    "UPDATE tasks SET status = ?, finished_at = ?, error = ?, error_type = ?, "
                    "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                    "WHERE id = ? AND status = ? AND lease_token = ?",
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
        if retry:
            return "retried"
        self.storage.remove_inputs([claim.id])
        return "failed"

    def give_back(self, claim: Claim) -> None:
        """Return a claim untouched (its worker is stopping): pending again, the attempt not counted."""
        with contextlib.suppress(Exception), self.write() as c:
            cur = c.execute(
                "UPDATE tasks SET status = ?, attempts = attempts - 1, "
                "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                "WHERE id = ? AND status = ? AND lease_token = ?",
                (TaskStatus.PENDING.value, claim.id, TaskStatus.PROCESSING.value, claim.token),
            )
            if cur.rowcount:
                _event(c, claim.id, "released", attempt=claim.attempt, detail="the worker stopped")

    # -- managing --------------------------------------------------------------------------------

    @_typed("cannot cancel the task")
    def cancel(self, task_id: str) -> bool:
        """Cancel a PENDING task. ``False`` if it already started or ended.

        Raises:
            TaskNotFoundError: no such task.
        """
        with self.write() as c:
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
            self.storage.remove_inputs([task_id])
        return done

    @_typed("cannot delete the task")
    def forget(self, task_id: str) -> tuple[bool, str | None]:
        """Delete an ended task's row and events.

        Returns:
            Whether it was deleted (``False``: still pending or processing), and its
            stored result's name, for the caller to delete.

        Raises:
            TaskNotFoundError: no such task.
        """
        with self.write() as c:
            row = c.execute("SELECT status, result_path FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFoundError(f"no task {task_id!r} in {self.path}", task_id=task_id)
            if not TaskStatus(row["status"]).terminal:
                return False, None
            c.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            c.execute("DELETE FROM events WHERE task_id = ?", (task_id,))
        self.storage.remove_inputs([task_id])
        return True, row["result_path"]

    @_typed("cannot record a retrieved result")
    def mark_retrieved(self, task_id: str, result_name: str) -> bool:
        """Record that the result ``result_name`` was retrieved and is being deleted.

        Returns:
            ``True`` for the one caller that should delete the file.
        """
        with self.write() as c:
            cur = c.execute(
                "UPDATE tasks SET result_path = NULL, retrieved_at = ? WHERE id = ? AND result_path = ?",
                (time.time(), task_id, result_name),
            )
            if cur.rowcount:
                _event(c, task_id, "retrieved", detail="result deleted")
        return cur.rowcount == 1

    @_typed("cannot recover tasks")
    def recover(self) -> int:
        """Requeue or fail PROCESSING tasks whose worker died or lost its lease.

        Returns:
            How many tasks were recovered.
        """
        with self.write() as c:
            recovered, ended = self._recover_locked(c, time.time())
        self.storage.remove_inputs(ended)
        return recovered

    @_typed("cannot read the task queue")
    def sweep(self) -> None:
        """Delete files in the queue's folder that no task row explains, and dead workers' lock files."""
        rows = self.conn().execute("SELECT id, status, result_path, lease_token, lease_owner FROM tasks").fetchall()
        live = {r["id"]: LiveRow(TaskStatus(r["status"]), r["result_path"], r["lease_token"]) for r in rows}
        busy = {r["lease_owner"] for r in rows if r["lease_owner"] and r["status"] == TaskStatus.PROCESSING.value}
        self.storage.sweep(live, busy=busy)

    def _recover_locked(self, c: sqlite3.Connection, now: float) -> tuple[int, list[str]]:
        """Requeue or fail PROCESSING tasks whose worker died or lost its lease. In a write transaction."""
        rows = c.execute(
            "SELECT id, lease_owner, lease_expires, started_at, attempts, max_attempts FROM tasks WHERE status = ?",
            (TaskStatus.PROCESSING.value,),
        ).fetchall()
        bound = self.policy.task_timeout
        recovered = 0
        ended: list[str] = []
        for row in rows:
            owner = row["lease_owner"]
            expired = row["lease_expires"] is None or row["lease_expires"] < now
            dead = self.storage.owner_dead(owner)
            if not (expired or dead):
                continue
            why = "its worker died" if dead else "its worker stopped renewing the lease"
            if bound is not None and row["started_at"] is not None and now - row["started_at"] > bound:
                why = f"it ran past task_timeout={bound:g}s ({why})"
            recovered += 1
            attempts = int(row["attempts"])
            if attempts >= int(row["max_attempts"]):
                c.execute(
                    "UPDATE tasks SET status = ?, finished_at = ?, error = ?, error_type = ?, "
                    "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                    "WHERE id = ?",
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
                    "UPDATE tasks SET status = ?, not_before = ?, error = ?, error_type = ?, "
                    "lease_owner = NULL, lease_token = NULL, lease_expires = NULL "
                    "WHERE id = ?",
                    (
                        TaskStatus.PENDING.value,
                        now + self.policy.backoff(attempts),
                        f"{why} during attempt {attempts}",
                        "WorkerLost",
                        row["id"],
                    ),
                )
                _event(c, row["id"], "recovered", attempt=attempts, owner=owner, detail=why)
            logger.warning("task %s: %s (attempt %d); recovered", row["id"], why, attempts)
        return recovered, ended


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
