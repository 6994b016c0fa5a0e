"""Parse results as plain data.

A :class:`ParseResult` holds only Python data (strings, dicts, bytes): no MinerU
object, no tensor, nothing that keeps a model alive after the session closes, and
nothing that cannot cross a process boundary by pickling.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        (out / f"{stem}.md").write_text(self.markdown, encoding="utf-8")
        (out / f"{stem}_content_list.json").write_text(
            json.dumps(self.content_list, ensure_ascii=False, indent=2), encoding="utf-8"
        )
        (out / f"{stem}_middle.json").write_text(
            json.dumps(self.middle_json, ensure_ascii=False, indent=2), encoding="utf-8"
        )
        if self.model_output is not None:
            (out / f"{stem}_model.json").write_text(
                json.dumps(self.model_output, ensure_ascii=False, indent=2), encoding="utf-8"
            )
        for rel, payload in self.images.items():
            target = (out / rel).resolve()
            # Image names come from MinerU; refuse anything that would escape ``out``.
            if out.resolve() not in target.parents:
                raise ValueError(f"image path {rel!r} escapes the output directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
        return out

    def __repr__(self) -> str:
        return (
            f"ParseResult(document={self.document!r}, pages={self.page_count}, "
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
