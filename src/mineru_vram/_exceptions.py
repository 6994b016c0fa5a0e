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
    ├── TaskNotFoundError (KeyError)            no such task in the queue (or its result was deleted)
    ├── TaskFailedError                         a queued task ended FAILED
    │   └── TaskCancelledError                  it was cancelled before it ran
    └── ResultTimeoutError (TimeoutError)       result(timeout=...) passed before the task ended

Each exception keeps its attributes when pickled (they cross the worker
boundary), because ``__reduce__`` rebuilds it from its keyword arguments.
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
    "NotAPdfError",
    "OutOfMemoryError",
    "ParseError",
    "ParseTimeoutError",
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

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        self._attrs = attrs
        for name, value in attrs.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from (message, attrs) so keyword-only attributes survive pickling;
        # the default reduce passes only ``args`` and would drop them.
        return (_rebuild, (type(self), self.message, self._attrs))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[MineruVramError], message: str, attrs: dict[str, Any]) -> MineruVramError:
    return cls(message, **attrs)


class ConfigurationError(MineruVramError, ValueError):
    """An argument or ``MINERU_VRAM_*`` variable has a value the library cannot use."""


class BackendNotAvailableError(ConfigurationError):
    """The requested backend is known but not built, or its dependencies are missing."""


class SessionStateError(MineruVramError, RuntimeError):
    """A session or other resource owner was used in a state that forbids the call."""


class InsecurePathError(MineruVramError, PermissionError):
    """A folder or file the library would trust is not safe: another user owns it or can write to it.

    ``path`` names it. Nothing was read from it.
    """

    path: str


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


class ParseError(MineruVramError):
    """MinerU raised while parsing a document that passed validation."""

    document: str


class ParseTimeoutError(ParseError, TimeoutError):
    """A parse did not finish within its ``timeout``."""


class VramLeakError(MineruVramError):
    """A strict release left more device memory than the tolerance. ``report`` has the receipt."""


class OutOfMemoryError(MineruVramError):
    """The device ran out of memory. The original torch error is the ``__cause__`` in-process."""


class AdmissionTimeoutError(MineruVramError, TimeoutError):
    """The device did not have the free memory the work needs before the timeout."""


class WorkerError(MineruVramError):
    """The worker process of an isolated session failed."""


class WorkerCrashedError(WorkerError):
    """The worker died. ``exitcode``, ``document`` and ``log_tail`` say how and where."""


class WorkerStartError(WorkerError):
    """The worker process could not be started or did not load its models."""


class EngineError(MineruVramError):
    """The resident VLM engine failed."""


class EngineStartError(EngineError):
    """The engine did not become ready. ``log_tail`` holds the end of its log."""


class EngineAdmissionError(EngineStartError, AdmissionTimeoutError):
    """The device did not have the engine's memory free (before a start, a restart or a wake).

    Both an :class:`EngineStartError` and an :class:`AdmissionTimeoutError`:
    ``need_mib``, ``free_mib`` and ``reserved_mib`` say what was missing.
    """


class EngineCrashedError(EngineError):
    """The engine process died while serving. ``exitcode`` and ``log_tail`` say more."""


class EngineStateError(EngineError, RuntimeError):
    """The engine's state forbids the operation (for example ``wake`` after ``stop``)."""


class TaskNotFoundError(MineruVramError, KeyError):
    """No task with this id, or its result was deleted after retrieval (``keep_results=False``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class TaskFailedError(MineruVramError):
    """The task ended FAILED. ``task_id``, ``error``, ``error_type`` and ``attempts`` say why."""


class TaskCancelledError(TaskFailedError):
    """The task was cancelled before it ran."""


class ResultTimeoutError(MineruVramError, TimeoutError):
    """``result(timeout=...)`` passed before the task ended. The task goes on."""


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
