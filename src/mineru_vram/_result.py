"""Parse results as plain data.

A :class:`ParseResult` holds only Python data (strings, dicts, bytes): no MinerU
object, no tensor, nothing that keeps a model alive after the session closes, and
nothing that cannot cross a process boundary by pickling.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import InsecurePathError

__all__ = ["BatchItem", "BatchResult", "ParseResult"]

# How much of the Markdown a notebook shows under a result.
HTML_PREVIEW_CHARS = 600


@dataclass(frozen=True)
class ParseResult:
    """What ``ModelSession.parse`` returns.

    Attributes:
        document: the document's name (its path, or the ``name=`` given).
        markdown: the Markdown text; images are referenced as ``images/<name>``.
        content_list: MinerU's structured content (the ``structured_content.json`` it saves).
        middle_json: MinerU's middle JSON (pages, blocks, spans), as a dict.
        images: image file name (relative, ``images/...``) to its bytes.
        page_count: pages parsed.
        seconds: wall time of the parse, validation included.
        backend: the session backend that produced it.
        device: the device it ran on.
        model_output: MinerU's raw model output, kept only with ``keep_model_output=True``.
    """

    document: str
    markdown: str
    content_list: Any
    middle_json: dict[str, Any]
    images: Mapping[str, bytes] = field(default_factory=dict)
    page_count: int = 0
    seconds: float = 0.0
    backend: str = ""
    device: str = ""
    model_output: dict[str, Any] | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``<stem>.md``, ``<stem>_content_list.json``, ``<stem>_middle.json`` and ``images/``.

        Returns:
            The directory written to.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(self.document).stem or "document"
        _write(out / f"{stem}.md", self.markdown.encode("utf-8"))
        _write(out / f"{stem}_content_list.json", _json(self.content_list))
        _write(out / f"{stem}_middle.json", _json(self.middle_json))
        if self.model_output is not None:
            _write(out / f"{stem}_model.json", _json(self.model_output))
        root = out.resolve()
        for rel, payload in self.images.items():
            # Image names come from MinerU; refuse anything that would escape ``out``:
            # ``..`` or an absolute name, or a folder on the way that links elsewhere.
            name = Path(rel)
            if name.is_absolute() or ".." in name.parts:
                raise ValueError(f"image path {rel!r} escapes the output directory")
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            folder = target.parent.resolve()
            if folder != root and root not in folder.parents:
                raise ValueError(f"image path {rel!r} escapes the output directory")
            _write(target, payload)
        return out

    def __repr__(self) -> str:
        return (
            f"ParseResult(document={self.document!r}, page_count={self.page_count}, "
            f"markdown={len(self.markdown)} chars, images={len(self.images)}, seconds={self.seconds:.2f})"
        )

    def _repr_html_(self) -> str:
        # Jupyter: what was parsed and how, then the start of the Markdown as text (never rendered:
        # it comes from the document, so it is escaped like any other untrusted text).
        from html import escape

        from ._probe import _html_table

        rows = [
            ("document", self.document),
            ("pages", str(self.page_count)),
            ("backend / device", f"{self.backend or 'n/a'} / {self.device or 'n/a'}"),
            ("seconds", f"{self.seconds:.2f}"),
            ("Markdown", f"{len(self.markdown)} characters"),
            ("images", str(len(self.images))),
        ]
        head = self.markdown[:HTML_PREVIEW_CHARS]
        more = "\n…" if len(self.markdown) > HTML_PREVIEW_CHARS else ""
        preview = f"<pre style='white-space:pre-wrap'>{escape(head + more)}</pre>"
        return _html_table("Parse result", rows) + preview


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8")


def _write(path: Path, data: bytes) -> None:
    """Create or replace the file ``path``, never writing through a symbolic link planted there.

    The mode is the usual one (``0666`` less the umask): these are the user's outputs.

    Raises:
        InsecurePathError: ``path`` is a symbolic link.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InsecurePathError(
                f"{path}: refusing to write through a symbolic link; remove it or save elsewhere", path=str(path)
            ) from None
        raise
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass(frozen=True)
class BatchItem:
    """One document's outcome in ``parse_many``: a result or the error it raised."""

    document: str
    result: ParseResult | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class BatchResult:
    """The outcomes of ``parse_many``, in input order."""

    items: tuple[BatchItem, ...]
    seconds: float = 0.0

    def __iter__(self) -> Iterator[BatchItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> BatchItem:
        return self.items[index]

    @property
    def results(self) -> list[ParseResult]:
        """The successful results, in input order."""
        return [item.result for item in self.items if item.result is not None]

    @property
    def failures(self) -> list[BatchItem]:
        """The items that failed, each with its document name and error."""
        return [item for item in self.items if item.error is not None]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __repr__(self) -> str:
        failed = ", ".join(f"{i.document}: {type(i.error).__name__}" for i in self.failures)
        tail = f"; failed: {failed}" if failed else ""
        return f"BatchResult({len(self.items) - len(self.failures)}/{len(self.items)} ok in {self.seconds:.1f}s{tail})"
