"""Turning what the user passes to ``parse`` into checked PDF bytes.

Validation happens before any GPU work: a missing file, a directory, an empty or
non-PDF input, a truncated or password-protected PDF, or one over the session's
limits raises a typed :class:`~mineru_vram.InvalidDocumentError` naming the
document, and the session never sees it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

from ._exceptions import (
    DocumentNotFoundError,
    DocumentTooLargeError,
    EmptyDocumentError,
    EncryptedDocumentError,
    InvalidDocumentError,
    NotAPdfError,
    TruncatedDocumentError,
)

__all__ = ["Document", "Source", "load_document", "parse_pages"]

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]
"""What ``parse`` accepts: a path, the PDF's bytes, or a binary file object."""

# The PDF spec lets a header sit anywhere in the first 1024 bytes (Acrobat's rule).
_HEADER_WINDOW = 1024
# A complete PDF ends with %%EOF; writers may append a little after it (whitespace,
# signatures' padding), so look in a generous tail rather than the last bytes only.
_EOF_WINDOW = 8192


@dataclass(frozen=True)
class Document:
    """A validated PDF: its bytes, a display name and its page count."""

    name: str
    data: bytes
    page_count: int
    path: Path | None = None

    @property
    def size(self) -> int:
        return len(self.data)


def _name_of(source: object, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def _read(source: Source, doc_name: str, max_bytes: int | None) -> tuple[bytes, Path | None]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        if not path.exists():
            raise DocumentNotFoundError(f"{doc_name}: no such file", document=doc_name)
        if path.is_dir():
            raise DocumentNotFoundError(f"{doc_name}: is a directory, not a PDF file", document=doc_name)
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DocumentTooLargeError(
                f"{doc_name}: {size} bytes exceeds the session's max_document_bytes={max_bytes}",
                document=doc_name,
                size=size,
                limit=max_bytes,
            )
        try:
            return path.read_bytes(), path
        except OSError as exc:
            raise InvalidDocumentError(f"{doc_name}: cannot be read ({exc})", document=doc_name) from exc
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    read = getattr(source, "read", None)
    if read is None:
        raise InvalidDocumentError(
            f"{doc_name}: parse() takes a path, bytes or a binary file object, not {type(source).__name__}",
            document=doc_name,
        )
    limit = -1 if max_bytes is None else max_bytes + 1
    data = read(limit)
    if isinstance(data, str) or not isinstance(data, (bytes, bytearray)):
        raise InvalidDocumentError(f"{doc_name}: the file object must be opened in binary mode", document=doc_name)
    return bytes(data), None


def load_document(
    source: Source,
    *,
    name: str | None = None,
    max_bytes: int | None = None,
    max_pages: int | None = None,
) -> Document:
    """Read and validate a PDF from a path, bytes or a binary file object.

    Args:
        source: what the user passed to ``parse``.
        name: display name to use in errors and results (defaults to the path).
        max_bytes: reject larger inputs (``None``: no limit).
        max_pages: reject PDFs with more pages (``None``: no limit).

    Raises:
        DocumentNotFoundError: the path does not exist or is a directory.
        EmptyDocumentError: zero bytes, or no pages.
        NotAPdfError: no ``%PDF-`` header.
        TruncatedDocumentError: a PDF that is cut short or cannot be opened.
        EncryptedDocumentError: a PDF that needs a password.
        DocumentTooLargeError: over ``max_bytes`` or ``max_pages``.
    """
    doc_name = _name_of(source, name)
    data, path = _read(source, doc_name, max_bytes)
    if not data:
        raise EmptyDocumentError(f"{doc_name}: empty input (0 bytes)", document=doc_name)
    if max_bytes is not None and len(data) > max_bytes:
        raise DocumentTooLargeError(
            f"{doc_name}: more than max_document_bytes={max_bytes} bytes",
            document=doc_name,
            size=len(data),
            limit=max_bytes,
        )
    if b"%PDF-" not in data[:_HEADER_WINDOW]:
        kind = _sniff(data)
        raise NotAPdfError(f"{doc_name}: not a PDF ({kind})", document=doc_name)
    if b"%%EOF" not in data[-_EOF_WINDOW:]:
        raise TruncatedDocumentError(
            f"{doc_name}: the PDF is cut short (no %%EOF marker at its end; {len(data)} bytes)",
            document=doc_name,
        )
    pages = _page_count(data, doc_name)
    if pages == 0:
        raise EmptyDocumentError(f"{doc_name}: the PDF has no pages", document=doc_name)
    if max_pages is not None and pages > max_pages:
        raise DocumentTooLargeError(
            f"{doc_name}: {pages} pages exceeds the session's max_pages={max_pages}",
            document=doc_name,
            pages=pages,
            limit=max_pages,
        )
    return Document(name=doc_name, data=data, page_count=pages, path=path)


def _page_count(data: bytes, doc_name: str) -> int:
    import pypdfium2 as pdfium  # MinerU's own PDF engine; imported late (it is a native library)

    try:
        pdf = pdfium.PdfDocument(io.BytesIO(data))
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == pdfium.raw.FPDF_ERR_PASSWORD:
            raise EncryptedDocumentError(
                f"{doc_name}: the PDF is password protected; decrypt it before parsing",
                document=doc_name,
            ) from exc
        raise TruncatedDocumentError(f"{doc_name}: the PDF cannot be opened ({exc})", document=doc_name) from exc
    try:
        return len(pdf)
    finally:
        pdf.close()


def _sniff(data: bytes) -> str:
    head = data[:16]
    for magic, kind in (
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"PK\x03\x04", "a ZIP archive (Office document?)"),
        (b"GIF8", "a GIF image"),
        (b"{", "JSON or text"),
        (b"<", "HTML or XML"),
    ):
        if head.startswith(magic):
            return kind
    return f"starts with {head[:8]!r}"


def parse_pages(pages: str | int | range | Sequence[int] | None, page_count: int) -> str:
    """Turn the user's ``pages`` into MinerU's 1-based ``page_range`` string.

    Accepts ``None`` (all), ``"1-5,8"`` (1-based, as on the command line), a 1-based
    ``int``, a ``range`` or a list of 1-based page numbers.

    Raises:
        ConfigurationError: a page outside ``1..page_count`` or a malformed spec.
    """
    from ._exceptions import ConfigurationError

    if pages is None:
        return ""
    numbers: list[int]
    if isinstance(pages, bool):
        raise ConfigurationError(f"pages={pages!r}: expected page numbers", pages=pages)
    if isinstance(pages, int):
        numbers = [pages]
    elif isinstance(pages, str):
        numbers = []
        for part in pages.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                start = int(lo)
                end = int(hi) if sep else start
            except ValueError:
                raise ConfigurationError(
                    f"pages={pages!r}: expected forms like '3', '1-5' or '1-3,7'", pages=pages
                ) from None
            if end < start:
                raise ConfigurationError(f"pages={pages!r}: range {part!r} runs backwards", pages=pages)
            numbers.extend(range(start, end + 1))
    else:
        numbers = [int(p) for p in pages]
    if not numbers:
        raise ConfigurationError(f"pages={pages!r} selects no page", pages=pages)
    bad = [p for p in numbers if p < 1 or p > page_count]
    if bad:
        raise ConfigurationError(
            f"pages={pages!r}: page {bad[0]} is outside 1..{page_count}", pages=pages, page_count=page_count
        )
    return ",".join(str(p) for p in sorted(set(numbers)))
