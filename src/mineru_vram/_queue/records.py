"""The queue's public records: task status, task info, settings and worker statistics."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from mineru_vram._budget import VramBudget
from mineru_vram._exceptions import ConfigurationError
from mineru_vram._probe import MIB

__all__ = [
    "DEFAULT_MAX_DOCUMENT_BYTES",
    "DEFAULT_TASK_TIMEOUT",
    "Claim",
    "QueueSettings",
    "TaskInfo",
    "TaskStatus",
    "WorkerStats",
]

# The largest input ``submit`` copies in unless the queue says otherwise (a session's default too).
DEFAULT_MAX_DOCUMENT_BYTES = 512 * MIB

# How long one attempt at a task may run unless the queue says otherwise: a hung parse must
# end (failed or retried) rather than hold its task for ever.
DEFAULT_TASK_TIMEOUT = 3600.0


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
    This class is the one list of the fields; :meth:`check` validates them.

    ``task_timeout`` bounds each attempt (default one hour). With ``isolation="process"``
    a parse past it is killed and the worker goes on; in the worker's own process a
    parse cannot be interrupted, so the attempt is recorded as timed out and the
    worker stops (a supervisor restarts it; the task is retried).
    """

    backend: str = "pipeline"
    device: str | None = None
    models_dir: str | None = None
    isolation: str = "none"
    budget: dict[str, Any] | None = None  # VramBudget.to_json()
    max_attempts: int = 3
    task_timeout: float = DEFAULT_TASK_TIMEOUT
    lease_seconds: float = 60.0
    retry_backoff: float = 1.0
    keep_results: bool = True
    concurrency: int = 1
    durable: bool = True
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> QueueSettings:
        """Settings read back from a queue file; fields this version does not know are dropped."""
        names = cls.field_names()
        # Older queue files store ``task_timeout: null`` (no bound): they get the default one.
        return cls(**{k: v for k, v in data.items() if k in names and not (k == "task_timeout" and v is None)})

    def vram_budget(self) -> VramBudget | None:
        return None if self.budget is None else VramBudget.from_json(self.budget)

    def check(self) -> None:
        """Raises ConfigurationError for values no worker could use."""
        from mineru_vram._config import resolve_backend

        spec = resolve_backend(self.backend, engine=object())  # engines are checked by the session
        if spec.needs_engine:
            raise ConfigurationError(
                f"backend {self.backend!r} parses through a resident VLM engine; the queue runs "
                "'pipeline' or 'flash' sessions",
                backend=self.backend,
            )
        if self.isolation not in ("none", "process"):
            raise ConfigurationError(f"isolation={self.isolation!r}: expected 'none' or 'process'")
        for name in ("max_attempts", "concurrency", "max_document_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name}={value!r}: must be an integer of at least 1", **{name: value})
        for name in ("lease_seconds", "retry_backoff"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name}={getattr(self, name)!r}: must be positive")
        timeout = self.task_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigurationError(f"task_timeout={timeout!r}: must be a positive number of seconds")
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
class Claim:
    """One attempt at a task, as a worker holds it: valid while the task is PROCESSING under ``token``.

    Attributes:
        id: the task id.
        token: this attempt's lease token (a fresh one per claim).
        attempt: which attempt this is (1-based).
        max_attempts: the task's allowance.
        name: the document's name.
        options: the parse options given to ``submit``.
        started: when it was claimed (``time.time()``).
    """

    id: str
    token: str
    attempt: int
    max_attempts: int
    name: str
    options: dict[str, Any]
    started: float = 0.0
