"""The worker loop: claim a task, parse it on a long-lived session, record the outcome.

One loop per session ("slot"); a heartbeat thread renews the leases of the tasks
the slots hold; the worker's lock file (``workers/<owner>.lock``, an
:class:`~mineru_vram._files.OwnerLock`) tells other workers it is alive.

Failures: an invalid document, or MinerU failing on it, is the document's fault:
the task is FAILED at once, with the reason. Anything else (out of memory after
the session's own retry, a crashed worker process, a timeout, an admission
timeout) is retried with exponential backoff until ``max_attempts``. A failed
task never stops the worker.

Every attempt is bounded by ``task_timeout``. An isolated session kills a parse
that runs past it and the loop goes on. A parse in this process cannot be
interrupted: it runs on a thread of its own, the loop records the attempt as timed
out when the bound passes and then stops with :class:`~mineru_vram.ParseTimeoutError`
(the session is closed once that parse ends). Whatever else keeps an attempt
running, the heartbeat stops renewing its lease after the bound and a grace, so
the task is recovered rather than held for ever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mineru_vram._exceptions import (
    AdmissionTimeoutError,
    InsecurePathError,
    InvalidDocumentError,
    ParseError,
    ParseTimeoutError,
    QueueStorageError,
    SessionStateError,
)
from mineru_vram._files import OwnerLock

from .files import Storage
from .records import Claim, QueueSettings, WorkerStats
from .store import QueueStore

if TYPE_CHECKING:
    from mineru_vram._budget import VramBudget
    from mineru_vram._result import ParseResult
    from mineru_vram._session import ModelSession

__all__ = ["Worker", "document_fault", "new_owner"]

logger = logging.getLogger("mineru_vram")

# How long past task_timeout the heartbeat still renews an attempt's lease: an isolated session
# may first start a replacement worker (worker_start_timeout, 300 s by default), then parse
# for up to task_timeout, then the result is stored.
RENEW_GRACE_SECONDS = 360.0


def new_owner() -> str:
    """A fresh worker id: host, pid and a random part (a file name in ``workers/``)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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


@dataclass
class _Run:
    """What the session loops of one ``run`` share."""

    owner: str
    held: dict[str, Claim]  # claims in progress, whose leases the heartbeat renews
    stop: threading.Event
    stats: WorkerStats
    counter: _Counter
    until_idle: bool
    poll_interval: float
    errors: list[BaseException] = dataclasses.field(default_factory=list)  # what ended a slot early


class Worker:
    """Runs one queue's loop in this process.

    Args:
        store: the queue's database.
        storage: the queue's files.
        settings: the settings in force (the stored ones plus this worker's overrides).
        make_session: builds an unopened session with the given budget.
        budget: the budget per session, if any.
    """

    def __init__(
        self,
        store: QueueStore,
        storage: Storage,
        settings: QueueSettings,
        *,
        make_session: Callable[[VramBudget | None], ModelSession],
        budget: VramBudget | None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.make_session = make_session
        self.budget = budget
        # In-process sessions whose parse ran past task_timeout (or was interrupted) and still
        # runs: never closed under it (that would release the models it uses); the parse's own
        # thread closes them when it ends, if they are ours.
        self.hung: set[int] = set()
        self.owned: set[int] = set()  # sessions this worker opened (and so closes)

    def run(
        self,
        stop: threading.Event,
        *,
        until_idle: bool,
        max_tasks: int | None,
        poll_interval: float,
        session: ModelSession | None,
    ) -> WorkerStats:
        """Recover, open the session(s), and process tasks until ``stop`` or the conditions end it."""
        stats = WorkerStats()
        owner = new_owner()
        with OwnerLock(self.storage.lock_path(owner)):
            self.store.recover()
            self.store.sweep()
            if session is not None and session.state.value != "opened":
                raise SessionStateError(f"run(session=...) needs an open session; it is {session.state.value}")
            sessions = [session] if session is not None else self._open_sessions(owner)
            if session is None:
                self.owned.update(id(s) for s in sessions)
            stats.sessions = len(sessions)
            run = _Run(owner, {}, stop, stats, _Counter(max_tasks), until_idle, poll_interval)
            heartbeat = threading.Thread(
                target=self._heartbeat, args=(run.held, stop), name="mineru-vram-queue-heartbeat", daemon=True
            )
            heartbeat.start()
            try:
                if len(sessions) == 1:
                    self._loop(sessions[0], run)
                else:
                    threads = [
                        threading.Thread(
                            target=self._slot, args=(s, run), name=f"mineru-vram-queue-slot-{i}", daemon=True
                        )
                        for i, s in enumerate(sessions)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        while t.is_alive():
                            t.join(0.5)
                    if run.errors:
                        raise run.errors[0]
            finally:
                stop.set()
                heartbeat.join(5.0)
                for own in sessions if session is None else ():
                    if id(own) in self.hung:
                        logger.warning("a queue session stays open until its parse, past task_timeout, ends")
                        continue
                    try:
                        own.close()
                    except Exception as exc:  # a leak report must not hide the loop's own outcome
                        logger.warning("closing a queue session: %s", exc)
        return stats

    # -- sessions ------------------------------------------------------------------------------

    def _open_sessions(self, owner: str) -> list[ModelSession]:
        budget = self.budget
        sessions = [self.make_session(budget).open()]
        try:
            for i in range(1, self.settings.concurrency):
                # More sessions only when the budget allows: admitted at once, or not at all.
                extra = None if budget is None else dataclasses.replace(budget, timeout=0.0)
                try:
                    sessions.append(self.make_session(extra).open())
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

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self, session: ModelSession, run: _Run) -> None:
        while not run.stop.is_set() and run.counter.more():
            claim = self.store.claim(run.owner)
            if claim is None:
                if run.until_idle and self.store.pending() == 0:
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
        except BaseException as exc:  # handed to run(), which raises it once every slot stopped
            run.errors.append(exc)
            run.stop.set()
        finally:
            self.store.drop_thread_connection()

    def _heartbeat(self, held: dict[str, Claim], stop: threading.Event) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while not stop.wait(interval):
            now = time.time()
            for claim in list(held.values()):
                if not self.renewable(claim, now):
                    continue
                try:
                    self.store.renew([claim])
                except QueueStorageError as exc:  # a busy database must not kill the heartbeat
                    logger.warning("renewing the lease of task %s: %s", claim.id, exc)
        self.store.drop_thread_connection()

    def renewable(self, claim: Claim, now: float) -> bool:
        """Whether the heartbeat still renews ``claim``'s lease.

        Not past ``task_timeout`` plus :data:`RENEW_GRACE_SECONDS`: whatever keeps an
        attempt running that long (a parse that ignored its bound, a stuck loop), its
        lease then runs out and the task is recovered instead of held for ever.
        """
        return now - claim.started <= self.settings.task_timeout + RENEW_GRACE_SECONDS

    # -- one task ------------------------------------------------------------------------------

    def _process(self, session: ModelSession, claim: Claim) -> str:
        """Parse one claimed task and record the outcome. Returns completed / failed / retried / lost.

        Raises:
            QueueStorageError: the database cannot record the outcome (the loop cannot go on).
            ParseTimeoutError: an in-process parse ran past ``task_timeout`` (recorded first).
        """
        try:
            staged = self.storage.staging_path(claim)
            source = self.storage.input_path(claim.id)
        except QueueStorageError as exc:  # a row whose id names no file of ours: never followed
            return self._fail(claim, exc)
        try:
            try:
                if not source.is_file():
                    raise InvalidDocumentError(
                        f"{claim.name}: the queue's copy of the input is missing", document=claim.name
                    )
                result = self._parse(session, source, claim)
            except SessionStateError:
                self.store.give_back(claim)
                raise
            except Exception as exc:
                outcome = self._fail(claim, exc)
                if id(session) in self.hung:
                    raise  # the parse still runs in this process: this loop cannot go on
                return outcome
            except BaseException:
                self.store.give_back(claim)  # Ctrl-C: not the document's fault, and not an attempt
                raise
            try:
                return self._complete(claim, result)
            except (QueueStorageError, InsecurePathError) as exc:
                # The result could not be stored (disk full, a quota): the attempt failed, not the worker.
                return self._fail(claim, exc)
        finally:
            staged.unlink(missing_ok=True)  # only left when completing failed half-way

    def _parse(self, session: ModelSession, source: Path, claim: Claim) -> ParseResult:
        """Parse within ``task_timeout``.

        Raises:
            ParseTimeoutError: no result within the bound. An isolated session killed its
                worker (it starts a new one). An in-process parse cannot be interrupted:
                it goes on in its own thread, and the session is marked hung.
        """
        timeout = self.settings.task_timeout
        options = claim.options

        def parse(bound: float | None) -> ParseResult:
            pages, ocr_mode = options.get("pages"), options.get("ocr_mode")
            return session.parse(source, name=claim.name, pages=pages, ocr_mode=ocr_mode, timeout=bound)

        if getattr(getattr(session, "settings", None), "isolation", "none") == "process":
            return parse(timeout)
        # In this process: wait for the parse on a thread of its own, for at most the bound.
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()
        guard = threading.Lock()  # done and hung change together

        def target() -> None:
            try:
                outcome.append((True, parse(None)))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                with guard:
                    done.set()
                    abandoned = id(session) in self.hung
                if abandoned:
                    self._close_late(session)

        thread = threading.Thread(target=target, name="mineru-vram-queue-parse", daemon=True)
        thread.start()
        try:
            finished = done.wait(timeout)
        finally:
            with guard:
                if not done.is_set():
                    self.hung.add(id(session))  # the bound, or Ctrl-C: the parse still runs
        if not finished:
            raise ParseTimeoutError(
                f"{claim.name}: no result after task_timeout={timeout:g}s. A parse in the worker's own "
                "process cannot be interrupted, so this worker stops after recording the attempt (the task "
                "is retried); with isolation='process' a hung parse is killed and the worker goes on.",
                document=claim.name,
                timeout=timeout,
                task_id=claim.id,
            )
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _close_late(self, session: ModelSession) -> None:
        """Close a session of ours whose abandoned parse has just ended (on that parse's thread)."""
        if id(session) not in self.owned:
            return
        try:
            session.close()
        except Exception as exc:
            logger.warning("closing a queue session after its parse ran past task_timeout: %s", exc)

    def _complete(self, claim: Claim, result: ParseResult) -> str:
        # One file per attempt, named by its lease token: a late finisher never overwrites the
        # result of the attempt that won. Synced before the row says COMPLETED.
        staged = self.storage.stage_result(claim, result, sync=self.settings.durable)
        name = self.storage.publish_result(claim, staged)
        if not self.store.complete(claim, name):
            # The task was recovered and given to another worker meanwhile: that one owns it now.
            self.storage.remove_result(name)
            logger.warning("task %s finished after its lease was lost; result discarded", claim.id)
            return "lost"
        return "completed"

    def _fail(self, claim: Claim, exc: BaseException) -> str:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, ParseTimeoutError) and "task_timeout" not in message:
            message += f" (the queue's task_timeout={self.settings.task_timeout:g}s)"
        outcome = self.store.fail(claim, message, type(exc).__name__, retryable=not document_fault(exc))
        if outcome != "lost":
            log = logger.info if outcome == "retried" else logger.warning
            log(
                "task %s (%s) attempt %d %s: %s",
                claim.id,
                claim.name,
                claim.attempt,
                "will be retried" if outcome == "retried" else "failed",
                message,
            )
        return outcome


def document_fault(exc: BaseException) -> bool:
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
