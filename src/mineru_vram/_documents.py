"""Turning what the user passes to ``parse`` into checked PDF bytes.

Validation happens before any GPU work: a missing file, a directory, an empty or
non-PDF input, a truncated or password-protected PDF, or one over the session's
limits raises a typed :class:`~mineru_vram.InvalidDocumentError` naming the
document, and the session never sees it.

**Verdicts rest on evidence about the file itself.** A wrong rejection loses a
user's document, so the rules are (docs/verdicts.md says the same for users):

* pdfium (MinerU's own PDF reader) is asked first. A file it opens with at least
  one page is accepted, whatever else looks odd about it (bytes after ``%%EOF``,
  no ``%%EOF`` at all, junk before the header).
* Only when pdfium cannot open the file, or opens it and counts no pages, does the
  file get a rejecting verdict, and each one needs its own evidence in the bytes:
  *encrypted* needs an ``/Encrypt`` entry **and** pdfium's password or security
  error from this very load; *not a PDF* needs no ``%PDF-`` header and no PDF
  object anywhere; *truncated* needs a file that ends inside an object or stream,
  a page tree that names objects the file does not contain, or a file with no PDF
  object at all; *no pages* needs a file with no page object and no page-tree
  entry anywhere (and no compressed object streams that could hide them).
* Anything else pdfium fails on is accepted with :attr:`Document.doubt` set: the
  library cannot tell what is wrong, so MinerU tries, and MinerU's failure
  reaches the caller as a :class:`~mineru_vram.ParseError` naming the document
  and carrying the doubt.

**pdfium's error code is process-wide and sticky.** ``FPDF_GetLastError`` is set
when a load fails and left alone when a load succeeds, so after any failure (an
encrypted PDF, say) a later document that *opens* but has no pages would read
the old code: pypdfium2's ``PdfDocument`` raises with that stale code. This
module therefore calls pdfium's C API itself and reads the code only right after
a load that returned no document (every such path in pdfium sets it), under a
lock shared with MinerU's PDF layer, and never trusts it alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
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

# The PDF spec lets a header sit anywhere in the first 1024 bytes (Acrobat's rule; pdfium's too).
_HEADER_WINDOW = 1024

# Patterns read over whole files on the rejection path; each must run in linear time (a
# file can hold megabytes of digits: a bare ``\d+\s+\d+`` backtracks quadratically there).
_OBJECT = re.compile(rb"(?<!\d)(\d+)\s+\d+\s+obj\b")  # an indirect object's header: "12 0 obj"
_END_OBJECT = re.compile(rb"endobj")
_STREAM = re.compile(rb">>\s*stream\r?\n")  # a stream dictionary, then "stream" and its EOL
_END_STREAM = re.compile(rb"endstream")
_ENCRYPT = re.compile(rb"/Encrypt\s*(?:\d+\s+\d+\s+R|<<)")  # the trailer's /Encrypt entry
_PAGE_OBJECT = re.compile(rb"/Type\s*/Page(?![A-Za-z0-9])")  # a page leaf, not /Pages
_KIDS = re.compile(rb"/Kids\s*\[([^\]]*)\]")
_TREE_REF = re.compile(rb"/(?:Root|Pages|Parent)\s+(\d+)\s+\d+\s+R")
_REF = re.compile(rb"(?<!\d)(\d+)\s+\d+\s+R\b")
_OBJECT_STREAM = re.compile(rb"/ObjStm\b")

# pdfium's FPDF_ERR_* codes (fpdfview.h), named in messages.
_PDFIUM_ERRORS = {
    0: "no error recorded",
    1: "unknown error",
    2: "file access error",
    3: "data format error",
    4: "incorrect password",
    5: "unsupported security scheme",
    6: "page not found or content error",
}
_ERR_PASSWORD = 4
_ERR_SECURITY = 5

# pdfium is not thread-safe and its last-error code is one value for the whole process:
# a load and the read of its error code happen under this lock (and MinerU's, once its PDF
# layer is loaded), as one step.
_PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class Document:
    """A validated PDF: its bytes, a display name and its page count.

    Attributes:
        name: the name used in results and errors.
        data: the PDF's bytes.
        page_count: pages pdfium counts; ``None`` when pdfium could not count them
            (then ``doubt`` says why the document was accepted anyway).
        path: the file it was read from, if any.
        doubt: ``None`` for a PDF pdfium opens with pages. Otherwise what pdfium
            reported about a file whose bytes showed no reason to reject it: MinerU
            is left to try, and its failure's :class:`~mineru_vram.ParseError`
            repeats this text.
    """

    name: str
    data: bytes = field(repr=False)
    page_count: int | None
    path: Path | None = None
    doubt: str | None = None

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


# A scheme and "://": what a user passing a link has in hand (http, https, s3, ftp, file ...).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _read(source: Source, doc_name: str, max_bytes: int | None) -> tuple[bytes, Path | None]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        if not path.exists():
            if isinstance(source, str) and _URL.match(source):
                raise DocumentNotFoundError(
                    f"{doc_name}: a URL is not fetched; download the document and pass its path, its bytes or a "
                    "binary file object",
                    document=doc_name,
                )
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
        NotAPdfError: no ``%PDF-`` header and no PDF object, and pdfium cannot open it.
        TruncatedDocumentError: pdfium cannot open it and the file is cut short
            (ends inside an object), incomplete (its page tree names objects it
            does not contain) or holds no PDF object at all.
        EncryptedDocumentError: it has an ``/Encrypt`` entry and pdfium asked for a password.
        DocumentTooLargeError: over ``max_bytes`` or ``max_pages``.

    A PDF pdfium cannot open for reasons the bytes do not show is accepted with
    :attr:`Document.doubt` set (see the module docstring).
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
    pages, doubt = _judge(data, doc_name)
    if max_pages is not None and pages is not None and pages > max_pages:
        raise DocumentTooLargeError(
            f"{doc_name}: {pages} pages exceeds the session's max_pages={max_pages}",
            document=doc_name,
            pages=pages,
            limit=max_pages,
        )
    return Document(name=doc_name, data=data, page_count=pages, path=path, doubt=doubt)


@dataclass(frozen=True)
class _PdfiumView:
    """What one pdfium load of the bytes said."""

    opened: bool  # FPDF_LoadMemDocument64 returned a document
    pages: int  # its page count (0 when not opened)
    error: int | None  # FPDF_GetLastError() right after this load failed; None when it opened


def _pdfium_view(data: bytes) -> _PdfiumView:
    """Load ``data`` with pdfium's C API (no password) and report what it said.

    pypdfium2's ``PdfDocument`` is not used: it reads pdfium's last-error code also
    after a load that succeeded but found no pages, where the code is whatever an
    earlier, unrelated failure in this process left behind.
    """
    import pypdfium2.raw as pdfium_c  # MinerU's own PDF engine; imported late (it is a native library)

    from ._adapter import mineru_pdfium_lock

    mineru_lock = mineru_pdfium_lock()  # held by MinerU's PDF layer around its own pdfium calls
    with _PDFIUM_LOCK, mineru_lock if mineru_lock is not None else contextlib.nullcontext():
        handle = pdfium_c.FPDF_LoadMemDocument64(data, len(data), None)
        if not handle:
            # Every path on which pdfium's loaders return no document sets the code, so
            # read here it belongs to this load (the lock keeps our other loads out).
            return _PdfiumView(opened=False, pages=0, error=int(pdfium_c.FPDF_GetLastError()))
        try:
            return _PdfiumView(opened=True, pages=max(0, int(pdfium_c.FPDF_GetPageCount(handle))), error=None)
        finally:
            pdfium_c.FPDF_CloseDocument(handle)


def _judge(data: bytes, doc_name: str) -> tuple[int | None, str | None]:
    """Decide on a non-empty input: ``(page_count, doubt)``, or raise the rejection.

    The order matters only for which message a file with several faults gets; each
    rejection rests on its own evidence, and none on pdfium's error code alone.
    """
    view = _pdfium_view(data)
    if view.pages > 0:
        return view.pages, None
    what_pdfium_said = (
        "pdfium opens it but finds no pages"
        if view.opened
        else f"pdfium cannot open it ({_PDFIUM_ERRORS.get(view.error or 0, f'error {view.error}')})"
    )
    has_header = b"%PDF-" in data[:_HEADER_WINDOW]
    first_object = _OBJECT.search(data)
    if not has_header and first_object is None:
        raise NotAPdfError(f"{doc_name}: not a PDF ({_sniff(data)})", document=doc_name)
    if not view.opened and view.error in (_ERR_PASSWORD, _ERR_SECURITY) and _ENCRYPT.search(data):
        reason = (
            "is password protected; decrypt it before parsing"
            if view.error == _ERR_PASSWORD
            else "is encrypted with a security handler pdfium does not support; decrypt it before parsing"
        )
        raise EncryptedDocumentError(f"{doc_name}: the PDF {reason}", document=doc_name)
    if first_object is None:
        raise TruncatedDocumentError(
            f"{doc_name}: the PDF cannot be opened: {what_pdfium_said}, and it contains no PDF object",
            document=doc_name,
        )
    cut = _cut_short(data)
    if cut is not None:
        raise TruncatedDocumentError(f"{doc_name}: the PDF is cut short: {cut}; {what_pdfium_said}", document=doc_name)
    missing = _missing_tree_objects(data)
    if missing:
        listed = ", ".join(str(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise TruncatedDocumentError(
            f"{doc_name}: the PDF is incomplete: its page tree names object(s) {listed}, which the file "
            f"does not contain; {what_pdfium_said}",
            document=doc_name,
        )
    if view.opened and _has_no_pages(data):
        raise EmptyDocumentError(
            f"{doc_name}: the PDF has no pages (pdfium finds none, and the file holds no page object)",
            document=doc_name,
        )
    encrypted = " (it has an /Encrypt entry)" if _ENCRYPT.search(data) else ""
    return None, f"{what_pdfium_said}{encrypted}, and its bytes show no reason to reject it"


def _last_start(pattern: re.Pattern[bytes], data: bytes) -> int:
    last = -1
    for match in pattern.finditer(data):
        last = match.start()
    return last


def _cut_short(data: bytes) -> str | None:
    """Say where the file stops inside an object or a stream, or ``None``.

    A download or copy that stopped early ends part-way through something: the last
    object header (``12 0 obj``) has no ``endobj`` after it, or the last ``stream``
    no ``endstream``. A file that merely lacks ``%%EOF`` or a trailer is not taken
    as cut: readers rebuild those, and peers' test files do without them.
    """
    stream = _last_start(_STREAM, data)
    if stream > _last_start(_END_STREAM, data):
        return f"it ends inside a stream that starts at byte {stream} and has no endstream"
    header = None
    for match in _OBJECT.finditer(data):
        header = match
    if header is not None and header.start() > _last_start(_END_OBJECT, data):
        return f"it ends inside object {int(header.group(1))} (from byte {header.start()}, no endobj after it)"
    return None


def _missing_tree_objects(data: bytes) -> list[int]:
    """Object numbers the page tree names (/Root, /Pages, /Parent, /Kids) that no object defines.

    Empty when the file has compressed object streams: objects inside them have no
    ``N 0 obj`` header in the bytes, so their absence proves nothing.
    """
    if _OBJECT_STREAM.search(data):
        return []
    defined = {int(m.group(1)) for m in _OBJECT.finditer(data)}
    named = {int(m.group(1)) for m in _TREE_REF.finditer(data)}
    for kids in _KIDS.finditer(data):
        named.update(int(m.group(1)) for m in _REF.finditer(kids.group(1)))
    return sorted(named - defined)


def _has_no_pages(data: bytes) -> bool:
    """True when nothing in the file can be a page: no page object, no page-tree entry."""
    if _OBJECT_STREAM.search(data) or _PAGE_OBJECT.search(data):
        return False
    return all(not kids.group(1).strip() for kids in _KIDS.finditer(data))


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


def parse_pages(pages: str | int | range | Sequence[int] | None, page_count: int | None) -> str:
    """Turn the user's ``pages`` into MinerU's 1-based ``page_range`` string.

    Accepts ``None`` (all), ``"1-5,8"`` (1-based, as on the command line), a 1-based
    ``int``, a ``range`` or a list of 1-based page numbers. With ``page_count=None``
    (a document pdfium could not count) only the lower bound is checked.

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
    bad = [p for p in numbers if p < 1 or (page_count is not None and p > page_count)]
    if bad:
        known = f"1..{page_count}" if page_count is not None else "1.. (page numbers start at 1)"
        raise ConfigurationError(
            f"pages={pages!r}: page {bad[0]} is outside {known}", pages=pages, page_count=page_count
        )
    return ",".join(str(p) for p in sorted(set(numbers)))
