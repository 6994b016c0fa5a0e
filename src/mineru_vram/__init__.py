"""mineru-vram: GPU memory as a managed resource for MinerU.

Importing this package touches no device, starts nothing and reads no
environment variable; MinerU and torch are imported when a session opens.
"""

from ._budget import Reservation, VramBudget
from ._documents import Document, Source
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
from ._probe import DeviceMemory, ProcessMemory, VramSnapshot, measure_context_floor, vram_snapshot
from ._queue import QueueSettings, TaskInfo, TaskQueue, TaskStatus, WorkerStats
from ._release import ReleaseReport
from ._result import BatchItem, BatchResult, ParseResult
from ._session import ModelSession, SessionState
from ._timeline import Phase, Sample, Timeline, TimelineState
from ._version import __version__

__all__ = [
    "AdmissionTimeoutError",
    "BackendNotAvailableError",
    "BatchItem",
    "BatchResult",
    "ConfigurationError",
    "DeviceMemory",
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
    "Phase",
    "ProcessMemory",
    "QueueSettings",
    "ReleaseReport",
    "Reservation",
    "ResidentEngine",
    "ResultTimeoutError",
    "Sample",
    "SessionState",
    "SessionStateError",
    "Source",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskQueue",
    "TaskStatus",
    "Timeline",
    "TimelineState",
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
