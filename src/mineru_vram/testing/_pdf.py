"""A dependency-free writer of small, valid PDFs for demos and tests.

It writes real PDF syntax (Helvetica text, ruled tables, a cross-reference table
with correct byte offsets), so MinerU parses the result like any text PDF. It is
not a general PDF library.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["make_pdf"]

_DEFAULT_PARAGRAPHS = (
    "mineru-vram demo document",
    "This page was written by mineru_vram.testing.make_pdf. It has a text layer, a heading,",
    "a few paragraphs and a ruled table, so MinerU's layout, OCR and table models all have work.",
    "GPU memory is a managed resource: models load when a session opens and are released,",
    "with a measured receipt, when it closes.",
)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _page_stream(page_no: int, pages: int, paragraphs: Sequence[str], table: bool) -> bytes:
    ops: list[str] = []
    y = 760
    ops.append(f"BT /F1 18 Tf 72 {y} Td ({_escape(paragraphs[0])} - page {page_no} of {pages}) Tj ET")
    y -= 36
    for line in paragraphs[1:]:
        ops.append(f"BT /F1 11 Tf 72 {y} Td ({_escape(line)}) Tj ET")
        y -= 16
    if table:
        y -= 20
        rows, cols, cw, rh = 4, 3, 140, 22
        top = y
        for r in range(rows + 1):
            ops.append(f"72 {top - r * rh} m {72 + cols * cw} {top - r * rh} l S")
        for c in range(cols + 1):
            ops.append(f"{72 + c * cw} {top} m {72 + c * cw} {top - rows * rh} l S")
        header = ("Mode", "After exit (MiB)", "Seconds")
        body = (("in-process", "694", "0.08"), ("isolated", "0", "0.21"), ("raw MinerU", "1280", "-"))
        for r, cells in enumerate((header, *body)):
            for c, cell in enumerate(cells):
                ops.append(f"BT /F1 10 Tf {78 + c * cw} {top - r * rh - 15} Td ({_escape(cell)}) Tj ET")
        y = top - rows * rh - 30
    ops.append(f"BT /F1 11 Tf 72 {y} Td (E = m c^2 and the sum of x_i for i = 1 to n.) Tj ET")
    return "\n".join(ops).encode("latin-1")


def make_pdf(
    pages: int = 1,
    *,
    paragraphs: Sequence[str] = _DEFAULT_PARAGRAPHS,
    table: bool = True,
) -> bytes:
    """Return the bytes of a small text PDF.

    Args:
        pages: number of pages (at least 1).
        paragraphs: first line is the heading, the rest body lines (Latin-1 text).
        table: draw a ruled 4x3 table on each page.
    """
    if pages < 1:
        raise ValueError("pages must be at least 1")
    objects: list[bytes] = []
    # 1: catalog, 2: pages, 3: font; then a (page, content) pair per page.
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for i in range(pages):
        content_id = 5 + 2 * i
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content_id} 0 R >>".encode()
        )
        stream = _page_stream(i + 1, pages, paragraphs, table)
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
