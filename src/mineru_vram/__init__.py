"""mineru-vram: GPU memory as a managed resource for MinerU.

Importing this package touches no device, starts nothing and reads no
environment variable; MinerU and torch are imported when a session opens.
"""

from ._budget import VramBudget
from ._documents import Document
from ._engine import EngineState, EngineStatus, MemoryReport, ResidentEngine
from ._exceptions import (
    AdmissionTimeoutError,
    BackendNotAvailableError,
    ConfigurationError,
    DocumentNotFoundError,
    DocumentTooLargeError,
    EmptyDocumentError,
    EncryptedDocumentError,
    EngineAdmissionError,
    EngineCrashedError,
    EngineError,
    EngineStartError,
    EngineStateError,
    InsecurePathError,
    InvalidDocumentError,
    MineruVramError,
    NotAPdfError,
    OutOfMemoryError,
    ParseError,
    ParseTimeoutError,
    QueueStorageError,
    ResultTimeoutError,
    SessionStateError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TruncatedDocumentError,
    VramLeakError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
)
from ._probe import VramSnapshot, measure_context_floor, vram_snapshot
from ._queue import QueueSettings, TaskInfo, TaskQueue, TaskStatus, WorkerStats
from ._release import ReleaseReport
from ._result import BatchItem, BatchResult, ParseResult
from ._session import ModelSession, SessionState
from ._timeline import Timeline
from ._version import __version__

__all__ = [
    "AdmissionTimeoutError",
    "BackendNotAvailableError",
    "BatchItem",
    "BatchResult",
    "ConfigurationError",
    "Document",
    "DocumentNotFoundError",
    "DocumentTooLargeError",
    "EmptyDocumentError",
    "EncryptedDocumentError",
    "EngineAdmissionError",
    "EngineCrashedError",
    "EngineError",
    "EngineStartError",
    "EngineState",
    "EngineStateError",
    "EngineStatus",
    "InsecurePathError",
    "InvalidDocumentError",
    "MemoryReport",
    "MineruVramError",
    "ModelSession",
    "NotAPdfError",
    "OutOfMemoryError",
    "ParseError",
    "ParseResult",
    "ParseTimeoutError",
    "QueueSettings",
    "QueueStorageError",
    "ReleaseReport",
    "ResidentEngine",
    "ResultTimeoutError",
    "SessionState",
    "SessionStateError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskQueue",
    "TaskStatus",
    "Timeline",
    "TruncatedDocumentError",
    "VramBudget",
    "VramLeakError",
    "VramSnapshot",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
    "WorkerStats",
    "__version__",
    "measure_context_floor",
    "vram_snapshot",
]
