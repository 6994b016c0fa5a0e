"""What the parent and the worker say to each other, and how large payloads travel.

The two sides talk over a private socketpair through
:class:`multiprocessing.connection.Connection`, one pickled message at a time. Each
message is one of the named types below; the conversation is::

    parent (runner.py)                    worker (child.py)
    Init(settings, folder, inline_limit)  ->
                                          <-  Ready(pid, stats)            or Error(...)
    Parse(document, options)              ->
                                          <-  Result(payload, stats)       or Error(...)
    Debug(command, args)                  ->
                                          <-  DebugReply(value)            or Error(...)
    Exit()                                ->
                                          <-  Bye(models, stats)

The worker loads nothing before :class:`Init` arrives, so a worker can be started
ahead of the session that will use it and be handed its settings then.

Large payloads (documents, results) travel through files in the runner's private
folder, written once and read once (a result is unpickled straight from a memory
map), instead of being pickled into the pipe and copied on both sides. Payloads
under the inline limit stay in the message: a small write to the pipe cannot block
on a hung worker past a parse's timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mineru_vram._documents import Document
from mineru_vram._exceptions import MineruVramError, ParseError
from mineru_vram._files import open_private

if TYPE_CHECKING:
    from mineru_vram._inprocess import ParseOptions, SessionSettings
    from mineru_vram._probe import VramSnapshot

__all__ = [
    "Bye",
    "Debug",
    "DebugReply",
    "DocumentRef",
    "Error",
    "Exit",
    "Init",
    "Parse",
    "Payload",
    "Ready",
    "Result",
    "Stats",
    "ToChild",
    "ToParent",
    "document_ref",
    "next_stem",
    "pack",
    "portable_error",
    "unpack",
]


# --- payloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A pickled object, either in the message (``data``) or in a file of the runner's folder (``path``)."""

    data: bytes | None = None
    path: str | None = None

    @property
    def route(self) -> str:
        """``"inline"`` or ``"file"``."""
        return "file" if self.path is not None else "inline"


def pack(obj: Any, folder: Path, stem: str, limit: int) -> Payload:
    """Pickle ``obj``; into ``<folder>/<stem>.pickle`` when larger than ``limit`` bytes."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) <= limit:
        return Payload(data=data)
    path = folder / f"{stem}.pickle"
    with open_private(path, "wb") as fh:
        fh.write(data)
    return Payload(path=str(path))


def unpack(payload: Payload) -> Any:
    """The object a :func:`pack` sent; its file is removed once read."""
    # Both sides are ours: the pipe is a private socketpair, the folder is private (0700)
    # and open_private refuses a file that is a link or not ours.
    if payload.path is None:
        assert payload.data is not None
        return pickle.loads(payload.data)  # noqa: S301
    path = Path(payload.path)
    try:
        with open_private(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # Unpickled from the map: the file's pages are the only copy of the pickle.
            return pickle.loads(mm)  # noqa: S301
    finally:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class DocumentRef:
    """A validated document on its way to the worker: its bytes inline (``data``) or in ``file``."""

    name: str
    page_count: int | None
    path: str | None
    data: bytes | None = None
    file: str | None = None
    doubt: str | None = None  # the verdict's doubt, when the input was let through without proof

    def load(self) -> Document:
        """The document again; its file is removed once read."""
        if self.file is not None:
            file = Path(self.file)
            try:
                with open_private(file, "rb") as fh:
                    data = fh.read()
            finally:
                file.unlink(missing_ok=True)
        else:
            assert self.data is not None
            data = self.data
        path = None if self.path is None else Path(self.path)
        return Document(name=self.name, data=data, page_count=self.page_count, path=path, doubt=self.doubt)

    def discard(self) -> None:
        """Remove the file, if the worker did not read it (it died or was interrupted)."""
        if self.file is not None:
            Path(self.file).unlink(missing_ok=True)


def document_ref(doc: Document, folder: Path, stem: str, limit: int) -> DocumentRef:
    """A :class:`DocumentRef` for ``doc``: inline up to ``limit`` bytes, else ``<folder>/<stem>.pdf``."""
    path = None if doc.path is None else str(doc.path)
    if len(doc.data) <= limit:
        return DocumentRef(name=doc.name, page_count=doc.page_count, path=path, data=doc.data, doubt=doc.doubt)
    file = folder / f"{stem}.pdf"
    with open_private(file, "wb") as fh:
        fh.write(doc.data)
    return DocumentRef(name=doc.name, page_count=doc.page_count, path=path, file=str(file), doubt=doc.doubt)


def portable_error(exc: BaseException, document: str | None) -> MineruVramError:
    """The exception to send to the parent: itself when it pickles, else a :class:`ParseError`."""
    if isinstance(exc, MineruVramError):
        with contextlib.suppress(Exception):
            pickle.loads(pickle.dumps(exc))  # noqa: S301 - a round trip of our own object
            return exc
    name = document or "<worker>"
    return ParseError(f"{name}: {type(exc).__name__}: {exc}", document=name)


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """The worker's memory after a step (host RSS, device use, torch's reservation)."""

    rss_mib: float | None = None
    device_mib: float | None = None
    torch_reserved_mib: float | None = None
    seconds: float | None = None
    snapshot: VramSnapshot | None = None


@dataclass(frozen=True)
class Init:
    """Parent to worker, first: load the models for these settings, then say :class:`Ready`."""

    settings: SessionSettings
    folder: str  # the runner's private folder, for payload files
    inline_limit: int  # payloads larger than this go through files


@dataclass(frozen=True)
class Prepare:
    """Parent to a spare worker, first: build these settings' models on the CPU and keep them.

    The spare imports MinerU and builds the models without touching CUDA, then says
    :class:`Prepared` and waits for the :class:`Init` of the session that takes it,
    which moves them to the session's device instead of loading them.
    """

    settings: SessionSettings


@dataclass(frozen=True)
class Parse:
    """Parent to worker: parse this document; the answer is a :class:`Result` or an :class:`Error`."""

    document: DocumentRef
    options: ParseOptions


@dataclass(frozen=True)
class Debug:
    """Parent to worker, from tests only: run a debug command (``allocate_mib``, ``raise``)."""

    command: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Exit:
    """Parent to worker: say :class:`Bye` and exit."""


@dataclass(frozen=True)
class Ready:
    """Worker to parent: the models are loaded. ``pid`` is the worker's own."""

    pid: int
    stats: Stats


@dataclass(frozen=True)
class Prepared:
    """Spare worker to parent: the models are built on the CPU (``models`` entries, ``mib`` of tensors)."""

    pid: int
    models: int
    mib: float
    stats: Stats


@dataclass(frozen=True)
class Result:
    """Worker to parent: the document's :class:`~mineru_vram.ParseResult`, packed."""

    payload: Payload
    stats: Stats


@dataclass(frozen=True)
class Error:
    """Worker to parent: a request failed; ``error`` pickles (see :func:`portable_error`)."""

    error: MineruVramError
    traceback: str
    stats: Stats


@dataclass(frozen=True)
class DebugReply:
    """Worker to parent: a debug command's answer."""

    value: Any


@dataclass(frozen=True)
class Bye:
    """Worker to parent, last: how many cache entries it held, and its memory before exiting."""

    models: int
    stats: Stats


ToChild = Prepare | Init | Parse | Debug | Exit
ToParent = Prepared | Ready | Result | Error | DebugReply | Bye

# A payload file's name never repeats within one process's life.
_counter = itertools.count(1)


def next_stem(kind: str) -> str:
    """A fresh file stem (``"result-<pid>-<n>"``) for a payload written by this process."""
    return f"{kind}-{os.getpid()}-{next(_counter)}"
