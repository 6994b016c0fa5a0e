"""The exception tree of mineru_vram.

Every error the library raises on purpose derives from :class:`MineruVramError`,
so ``except MineruVramError`` catches all of them. Where the meaning matches a
standard exception, that base is mixed in, so ``except FileNotFoundError`` keeps
working in code that does not know about this library::

    MineruVramError
    ├── ConfigurationError (ValueError)         bad argument or environment value
    │   └── BackendNotAvailableError            a backend that is not built or not installed
    ├── SessionStateError (RuntimeError)        used before open, after close, or re-entered
    ├── InsecurePathError (PermissionError)     a folder or file another local user owns or can write
    ├── ModelsNotAvailableError (FileNotFoundError)  MinerU's models are missing and cannot be downloaded
    ├── InvalidDocumentError (ValueError)       input that is not a parseable PDF
    │   ├── DocumentNotFoundError (FileNotFoundError)
    │   ├── EmptyDocumentError
    │   ├── NotAPdfError
    │   ├── TruncatedDocumentError
    │   ├── EncryptedDocumentError
    │   └── DocumentTooLargeError
    ├── ParseError                              MinerU failed on a valid-looking document
    │   └── ParseTimeoutError (TimeoutError)
    ├── VramLeakError                           strict release left more than the tolerance
    ├── OutOfMemoryError                        a CUDA OOM, kept typed across process boundaries
    ├── AdmissionTimeoutError (TimeoutError)    the device never had the free memory the work needs
    ├── WorkerError                             the isolated worker process failed
    │   ├── WorkerCrashedError                  it died (signal, OOM kill, CUDA error)
    │   └── WorkerStartError                    it could not be started
    ├── EngineError                             the resident VLM engine failed
    │   ├── EngineStartError                    it did not become ready
    │   │   └── EngineAdmissionError            its memory was not free (also an AdmissionTimeoutError)
    │   ├── EngineCrashedError                  it died while serving
    │   └── EngineStateError (RuntimeError)     an operation the engine's state forbids
    ├── QueueStorageError (OSError)             a task queue's database or folder cannot be used
    ├── TaskNotFoundError (KeyError)            no such task in the queue (or its result was deleted)
    ├── TaskFailedError                         a queued task ended FAILED
    │   └── TaskCancelledError                  it was cancelled before it ran
    └── ResultTimeoutError (TimeoutError)       result(timeout=...) passed before the task ended

Each class declares its attributes (annotations on the class); an attribute that
a raise site did not set reads ``None``, so handlers can use them without
``getattr``. Each exception keeps its attributes when pickled (they cross the
worker boundary), because ``__reduce__`` rebuilds it from its keyword arguments.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = [
    "AdmissionTimeoutError",
    "BackendNotAvailableError",
    "ConfigurationError",
    "DocumentNotFoundError",
    "DocumentTooLargeError",
    "EmptyDocumentError",
    "EncryptedDocumentError",
    "EngineAdmissionError",
    "EngineCrashedError",
    "EngineError",
    "EngineStartError",
    "EngineStateError",
    "InsecurePathError",
    "InvalidDocumentError",
    "MineruVramError",
    "ModelsNotAvailableError",
    "NotAPdfError",
    "OutOfMemoryError",
    "ParseError",
    "ParseTimeoutError",
    "QueueStorageError",
    "ResultTimeoutError",
    "SessionStateError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TruncatedDocumentError",
    "VramLeakError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
]


class MineruVramError(Exception):
    """Root of every error raised by mineru_vram.

    Subclasses take a message plus keyword attributes; the attributes are stored
    on the instance and survive pickling.
    """

    message: str

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        self._attrs = attrs
        for name in _declared(type(self)):
            if name not in attrs:
                setattr(self, name, None)
        for name, value in attrs.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from (message, attrs) so keyword-only attributes survive pickling;
        # the default reduce passes only ``args`` and would drop them.
        return (_rebuild, (type(self), self.message, self._attrs))

    def __str__(self) -> str:
        return self.message


def _declared(cls: type) -> list[str]:
    """The attributes the classes of ``cls``'s MRO declare (their annotations), but ``message``."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for name in vars(klass).get("__annotations__", {}):
            if name not in names and name != "message" and not name.startswith("_"):
                names.append(name)
    return names


def _rebuild(cls: type[MineruVramError], message: str, attrs: dict[str, Any]) -> MineruVramError:
    return cls(message, **attrs)


class ConfigurationError(MineruVramError, ValueError):
    """An argument or ``MINERU_VRAM_*`` variable has a value the library cannot use."""

    variable: str | None  # the environment variable, when one was at fault


class BackendNotAvailableError(ConfigurationError):
    """The requested backend is known but not built, or its dependencies are missing."""

    backend: str | None


class SessionStateError(MineruVramError, RuntimeError):
    """A session or other resource owner was used in a state that forbids the call."""

    session: str | None


class InsecurePathError(MineruVramError, PermissionError):
    """A folder or file the library would trust is not safe: another user owns it or can write to it.

    ``path`` names it. Nothing was read from it.
    """

    path: str


class ModelsNotAvailableError(MineruVramError, FileNotFoundError):
    """MinerU's model files are not on disk and cannot be downloaded now.

    Raised before MinerU spends time retrying a network it cannot reach. ``models_dir``
    is where they were looked for, ``missing`` the model repositories not there,
    ``download_gb`` about how much a download would be, ``reason`` why it cannot
    happen (no network, downloads turned off, a local-only source).
    """

    models_dir: str | None
    missing: list[str] | None
    download_gb: float | None
    reason: str | None
    document: str | None  # set when a parse needed models the session did not load (flash OCR)


class InvalidDocumentError(MineruVramError, ValueError):
    """The input is not a document MinerU can parse. ``document`` names it."""

    document: str


class DocumentNotFoundError(InvalidDocumentError, FileNotFoundError):
    """The path does not exist, or is a directory."""


class EmptyDocumentError(InvalidDocumentError):
    """The input has zero bytes, or a PDF with zero pages."""


class NotAPdfError(InvalidDocumentError):
    """The input does not start with a PDF header."""


class TruncatedDocumentError(InvalidDocumentError):
    """The input starts like a PDF but cannot be opened: cut short or corrupt."""


class EncryptedDocumentError(InvalidDocumentError):
    """The PDF is password protected."""


class DocumentTooLargeError(InvalidDocumentError):
    """The input exceeds the session's ``max_document_bytes`` or ``max_pages``."""

    size: int | None  # bytes
    pages: int | None
    limit: int | None


class ParseError(MineruVramError):
    """MinerU raised while parsing a document that passed validation."""

    document: str


class ParseTimeoutError(ParseError, TimeoutError):
    """A parse did not finish within its ``timeout``."""

    timeout: float | None
    pid: int | None
    exitcode: int | None


class VramLeakError(MineruVramError):
    """A strict release left more device memory than the tolerance. ``report`` has the receipt."""

    report: object  # the ReleaseReport


class OutOfMemoryError(MineruVramError):
    """The device ran out of memory. The original torch error is the ``__cause__`` in-process."""

    document: str | None
    device: str | None


class AdmissionTimeoutError(MineruVramError, TimeoutError):
    """The device did not have the free memory the work needs before the timeout."""

    device: str | None
    need_mib: float | None
    free_mib: float | None
    reserved_mib: float | None
    total_mib: float | None
    waited: float | None  # seconds
    device_info: Any  # the NVML reading admission gave up on (a DeviceMemory)


class WorkerError(MineruVramError):
    """The worker process of an isolated session failed."""


class WorkerCrashedError(WorkerError):
    """The worker died, or was killed. ``exitcode``, ``document`` and ``log_tail`` say how and where.

    ``reason`` is ``"memory"`` when the worker was killed for going over ``worker_memory_mib``
    (then ``memory_mib`` and ``limit_mib`` give the figures).
    """

    document: str | None
    exitcode: int | None
    signal: str | None
    pid: int | None
    log_tail: str | None
    reason: str | None
    memory_mib: float | None
    limit_mib: float | None


class WorkerStartError(WorkerError):
    """The worker process could not be started or did not load its models."""

    exitcode: int | None
    pid: int | None
    timeout: float | None
    log_tail: str | None


class EngineError(MineruVramError):
    """The resident VLM engine failed."""

    url: str | None


class EngineStartError(EngineError):
    """The engine did not become ready. ``log_tail`` holds the end of its log."""

    exitcode: int | None
    log_tail: str | None


class EngineAdmissionError(EngineStartError, AdmissionTimeoutError):
    """The device did not have the engine's memory free (before a start, a restart or a wake).

    Both an :class:`EngineStartError` and an :class:`AdmissionTimeoutError`:
    ``need_mib``, ``free_mib`` and ``reserved_mib`` say what was missing.
    """


class EngineCrashedError(EngineError):
    """The engine process died while serving. ``exitcode`` and ``log_tail`` say more."""

    exitcode: int | None
    log_tail: str | None


class EngineStateError(EngineError, RuntimeError):
    """The engine's state forbids the operation (for example ``wake`` after ``stop``)."""


class QueueStorageError(MineruVramError, OSError):
    """A task queue's database or folder cannot be used: the disk is full, the path is read-only,
    the file is not a queue database, or a stored file is damaged or not one the queue wrote.

    ``path`` names the file or folder. Nothing read from a damaged file was used.
    """

    path: str


class TaskNotFoundError(MineruVramError, KeyError):
    """No task with this id, or its result was deleted after retrieval (``keep_results=False``)."""

    task_id: str | None

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class TaskFailedError(MineruVramError):
    """The task ended FAILED. ``task_id``, ``error``, ``error_type`` and ``attempts`` say why."""

    task_id: str | None
    error: str | None
    error_type: str | None
    attempts: int | None


class TaskCancelledError(TaskFailedError):
    """The task was cancelled before it ran."""


class ResultTimeoutError(MineruVramError, TimeoutError):
    """``result(timeout=...)`` passed before the task ended. The task goes on."""

    task_id: str | None


# BaseException.add_note exists from Python 3.11; a test turns this off to check the fallback.
_NOTES_SUPPORTED = sys.version_info >= (3, 11)


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc``, on every supported Python.

    Python 3.11+ uses ``add_note`` (printed under the traceback). Python 3.10 has no
    notes and would print none, so there the note is kept in ``__notes__`` (for code
    that reads it) and appended to the error's message, where it is seen.
    """
    add = getattr(exc, "add_note", None)
    if _NOTES_SUPPORTED and add is not None:
        add(note)
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__ and no __dict__
            pass
    notes.append(note)
    if isinstance(exc, MineruVramError):
        exc.message = f"{exc.message}\n{note}"
        exc.args = (exc.message, *exc.args[1:])
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])
    else:
        exc.args = (*exc.args, note)
