"""``TaskQueue``: the facade over the queue's database, its files and its worker loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import stat
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from mineru_vram._budget import VramBudget, resolve_budget
from mineru_vram._exceptions import (
    ConfigurationError,
    DocumentTooLargeError,
    ResultTimeoutError,
    SessionStateError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
)

from .files import Storage
from .records import QueueSettings, TaskInfo, TaskStatus, WorkerStats
from .store import LeasePolicy, QueueStore
from .worker import Worker

if TYPE_CHECKING:
    from mineru_vram._documents import Source
    from mineru_vram._result import ParseResult
    from mineru_vram._session import ModelSession

__all__ = ["TaskQueue", "serve"]

logger = logging.getLogger("mineru_vram")


class _QueueState(enum.Enum):
    OPEN = "open"  # the database is open; submit, status, run allowed
    CLOSED = "closed"  # connections closed; every call raises SessionStateError


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
            supervised child (needed for ``concurrency``; a hung parse is then killed
            and the worker goes on).
        budget: a :class:`VramBudget` (or MiB / fraction) per session: each session
            waits for it to be free (admission) before loading.
        max_attempts: attempts per task before it is FAILED (default 3).
        task_timeout: seconds one attempt may run (default 3600). Past it the attempt
            fails with :class:`ParseTimeoutError` and is retried. With process isolation
            the hung worker process is killed and the loop goes on; in-process the
            parse cannot be interrupted, so the loop records the attempt and stops
            (``run`` raises the error).
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
        max_document_bytes: the largest input :meth:`submit` accepts (default 512 MiB);
            workers' sessions get the same limit.
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
        max_document_bytes: int | None = None,
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
            "max_document_bytes": max_document_bytes,
        }
        self._overrides = {k: v for k, v in given.items() if v is not None}
        self._budget_probe = None if resolved is None else resolved.probe
        self.session_options = dict(session_options or {})
        self._state = _QueueState.OPEN
        self._stops: set[threading.Event] = set()
        self._runs = threading.Condition()  # guards _run_threads: threads inside run()
        self._run_threads: set[int] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        candidate = QueueSettings(**self._overrides)
        candidate.check()
        self.settings = candidate
        self._files = Storage(self.storage)
        self._files.create()
        self._store = QueueStore(self.path, self._files, policy=self._policy(), durable=candidate.durable)
        try:
            stored = self._store.init(dataclasses.asdict(candidate))
            self.settings = dataclasses.replace(QueueSettings.from_stored(stored), **self._overrides)
            self.settings.check()
            self._store.policy = self._policy()
            self._store.durable = self.settings.durable
        except BaseException:
            self.close()
            raise

    def _policy(self) -> LeasePolicy:
        s = self.settings
        return LeasePolicy(lease_seconds=s.lease_seconds, retry_backoff=s.retry_backoff, task_timeout=s.task_timeout)

    def _db(self) -> QueueStore:
        if self._state is _QueueState.CLOSED:
            raise SessionStateError(f"the task queue {self.path} is closed")
        return self._store

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
        self._store.close()
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
            DocumentTooLargeError: over ``max_document_bytes`` (a path is refused by its
                size, before it is read).
            ConfigurationError: an option with an unusable value.
            QueueStorageError: the input or its row cannot be stored (no space, read-only).
        """
        from mineru_vram._documents import _name_of, _read

        store = self._db()
        if ocr_mode not in (None, "auto", "txt", "ocr"):
            raise ConfigurationError(f"ocr_mode={ocr_mode!r}: expected 'auto', 'txt' or 'ocr'", ocr_mode=ocr_mode)
        attempts = self.settings.max_attempts if max_attempts is None else max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"max_attempts={attempts!r}: must be an integer of at least 1")
        doc_name = _printable(_name_of(source, name))
        limit = self.settings.max_document_bytes
        size = _known_size(source)
        if size is None or size <= limit:
            # A path's size is checked before a byte is read; a stream is read to one byte past the limit.
            data, _ = _read(source, doc_name, None if size is not None else limit)
            size = len(data)
        if size > limit:
            raise DocumentTooLargeError(
                f"{doc_name}: {size} bytes exceeds the queue's max_document_bytes={limit}",
                document=doc_name,
                size=size,
                limit=limit,
            )
        options = {"pages": _pages_json(pages), "ocr_mode": ocr_mode}
        task_id = uuid.uuid4().hex
        # The input before the row: a claimed task always has its input.
        target = self._files.write_input(task_id, data, sync=self.settings.durable)
        try:
            store.add(task_id, doc_name, options, priority=priority, size=size, max_attempts=attempts)
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
        return self._db().info(task_id)

    def tasks(self, status: TaskStatus | str | None = None, *, limit: int | None = None) -> list[TaskInfo]:
        """Tasks in submission order, optionally only those with ``status``."""
        wanted = TaskStatus(status) if isinstance(status, str) else status
        return self._db().tasks(wanted, limit=limit)

    def counts(self) -> dict[TaskStatus, int]:
        """How many tasks are in each status."""
        return self._db().counts()

    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail: submitted, claimed, completed, retry, recovered, failed, cancelled, lease_lost."""
        return self._db().events(task_id)

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
        store = self._db()
        stored = store.result_name(info.id)
        if stored is None:
            raise TaskNotFoundError(
                f"the result of task {info.id} was deleted after it was retrieved (keep_results=False)",
                task_id=info.id,
            )
        try:
            result = self._files.load_result(stored)
        except FileNotFoundError:
            raise TaskNotFoundError(
                f"the result of task {info.id} is gone from {self._files.results / stored} "
                "(retrieved and deleted meanwhile?)",
                task_id=info.id,
            ) from None
        if not self.settings.keep_results and store.mark_retrieved(info.id, stored):
            self._files.remove_result(stored)
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
        return self._db().cancel(task_id)

    def forget(self, task_id: str) -> bool:
        """Delete an ended task, its result file and its events.

        Returns:
            ``False`` if the task is still pending or processing (nothing deleted).

        Raises:
            TaskNotFoundError: no such task.
        """
        done, result_name = self._db().forget(task_id)
        if result_name:
            self._files.remove_result(result_name)
        return done

    def recover(self) -> int:
        """Recover tasks of dead workers and sweep files no task explains. Workers run it on start.

        Returns:
            How many tasks were recovered (requeued or failed).
        """
        store = self._db()
        recovered = store.recover()
        store.sweep()
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
        store = self._db()
        stop = threading.Event()
        self._stops.add(stop)
        with self._runs:
            self._run_threads.add(threading.get_ident())
        t0 = time.perf_counter()
        stats = WorkerStats()
        try:
            worker = Worker(store, self._files, self.settings, make_session=self._make_session, budget=self._budget())
            stats = worker.run(
                stop, until_idle=until_idle, max_tasks=max_tasks, poll_interval=poll_interval, session=session
            )
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

    def _budget(self) -> VramBudget | None:
        budget = self.settings.vram_budget()
        if budget is not None and self._budget_probe is not None:
            budget = dataclasses.replace(budget, probe=self._budget_probe)
        return budget

    def _make_session(self, budget: VramBudget | None) -> ModelSession:
        from mineru_vram._session import ModelSession

        s = self.settings
        options: dict[str, Any] = {"max_document_bytes": s.max_document_bytes, **self.session_options}
        return ModelSession(
            s.backend,
            device=s.device,
            models_dir=s.models_dir,
            isolation=s.isolation,  # type: ignore[arg-type]
            budget=budget,
            **options,
        )


def serve(
    path: str | os.PathLike[str],
    *,
    until_idle: bool = False,
    max_tasks: int | None = None,
    poll_interval: float = 0.2,
    **overrides: Any,
) -> WorkerStats:
    """Run a queue's worker loop in this process until it stops (the ``mineru-vram worker`` command).

    SIGTERM and SIGINT (in the main thread) stop it after the current task.

    Args:
        path: the queue file.
        until_idle: return once no task is pending.
        max_tasks: return after this many tasks.
        poll_interval: seconds between looks for work while idle.
        overrides: :class:`TaskQueue` settings that override the stored ones for this worker.

    Returns:
        What the loop did.

    Raises:
        MineruVramError: the queue could not be opened or the worker could not start.
    """
    queue = TaskQueue(path, **overrides)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: object) -> None:
            logger.warning("signal %d: stopping after the current task", signum)
            queue.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        return queue.run(until_idle=until_idle, max_tasks=max_tasks, poll_interval=poll_interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        queue.close()


def _printable(name: str) -> str:
    """``name`` as text the database can store: a file name that is not UTF-8 keeps its bytes as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def _known_size(source: object) -> int | None:
    """The size of bytes, or of a path's file, without reading it (``None``: a stream, or nothing to measure)."""
    if isinstance(source, memoryview):
        return source.nbytes
    if isinstance(source, (bytes, bytearray)):
        return len(source)
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        info = os.stat(os.fspath(source))
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _pages_json(pages: str | int | Sequence[int] | range | None) -> Any:
    if pages is None or isinstance(pages, (str, int)):
        return pages
    return [int(p) for p in pages]
