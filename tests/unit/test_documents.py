"""Bad input gets a typed error naming the document, before any model runs."""

import io
import random
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram._documents import Document, load_document, parse_pages
from mineru_vram._worker.protocol import document_ref
from mineru_vram.testing import make_pdf


def _build_pdf(*objects: bytes) -> bytes:
    """A PDF with the given objects (1 is the catalog), a cross-reference table and a trailer."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _pages_in_brotli_object_stream(filter_name: bytes = b"/BrotliDecode") -> bytes:
    """A PDF whose page tree sits in an object stream under ``/Filter /BrotliDecode``.

    pdfium has no Brotli decoder: it loads the file (the catalog and the cross-reference
    stream are plain) but reads no page. Real Brotli output is not needed for that; the
    stream holds zlib bytes, so the same file with ``/FlateDecode`` (same length) opens.
    """
    objects = b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>\n"
    head = b"2 0 3 %d " % (objects.index(b"\n") + 1)
    payload = zlib.compress(head + objects)
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    catalog = len(out)
    out += b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    stream = len(out)
    out += b"4 0 obj\n<< /Type /ObjStm /N 2 /First %d /Filter %s /Length %d >>\nstream\n" % (
        len(head),
        filter_name,
        len(payload),
    )
    out += payload + b"\nendstream\nendobj\n"
    xref = len(out)
    entries = [(0, 0, 65535), (1, catalog, 0), (2, 4, 0), (2, 4, 1), (1, stream, 0), (1, xref, 0)]
    table = b"".join(bytes([kind]) + a.to_bytes(4, "big") + b.to_bytes(2, "big") for kind, a, b in entries)
    out += b"5 0 obj\n<< /Type /XRef /Size 6 /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n" % len(table)
    out += table + b"\nendstream\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


_CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"


def _verdict(data: bytes) -> str:
    """The verdict on ``data`` as one comparable line: the error and its message, or what was accepted."""
    try:
        doc = load_document(data, name="doc.pdf")
    except mv.InvalidDocumentError as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"accepted: pages={doc.page_count} doubt={doc.doubt}"


# Judges one file in a process that has seen no other PDF: pdfium's error state is fresh.
_FRESH_JUDGE = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import mineru_vram as mv
from mineru_vram._documents import load_document
try:
    doc = load_document(Path(sys.argv[2]).read_bytes(), name="doc.pdf")
except mv.InvalidDocumentError as exc:
    print(f"{type(exc).__name__}: {exc}")
else:
    print(f"accepted: pages={doc.page_count} doubt={doc.doubt}")
"""


def _fresh_verdict(data: bytes, folder: Path) -> str:
    file = folder / f"input-{zlib.crc32(data):08x}.pdf"
    file.write_bytes(data)
    src = str(Path(mv.__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_JUDGE, src, str(file)], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def pdf_bytes() -> bytes:
    return make_pdf(2)


def test_valid_pdf_from_path_bytes_and_file(tmp_path: Path, pdf_bytes: bytes) -> None:
    p = tmp_path / "ok.pdf"
    p.write_bytes(pdf_bytes)
    assert load_document(p).page_count == 2
    assert load_document(str(p)).name == str(p)
    assert load_document(pdf_bytes).name == "<bytes>"
    assert load_document(pdf_bytes, name="mine.pdf").name == "mine.pdf"
    with p.open("rb") as fh:
        doc = load_document(fh)
    assert doc.name == str(p)
    assert doc.data == pdf_bytes


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pdf"
    with pytest.raises(mv.DocumentNotFoundError) as info:
        load_document(missing)
    assert info.value.document == str(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(mv.DocumentNotFoundError, match="directory"):
        load_document(tmp_path)


def test_empty(tmp_path: Path) -> None:
    p = tmp_path / "empty.pdf"
    p.write_bytes(b"")
    with pytest.raises(mv.EmptyDocumentError, match="empty"):
        load_document(p)


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"\x89PNG\r\n\x1a\n" + b"0" * 100, "PNG"), (b"hello world, not a pdf", "starts with"), (b"PK\x03\x04xx", "ZIP")],
)
def test_not_a_pdf(data: bytes, kind: str) -> None:
    with pytest.raises(mv.NotAPdfError, match=kind):
        load_document(data, name="x.bin")


def test_cut_inside_a_stream_is_cut_short(pdf_bytes: bytes) -> None:
    inside_first_stream = pdf_bytes.index(b"stream\n") + 40
    with pytest.raises(mv.TruncatedDocumentError, match="cut short: it ends inside a stream"):
        load_document(pdf_bytes[:inside_first_stream], name="cut.pdf")


def test_cut_inside_an_object_is_cut_short(pdf_bytes: bytes) -> None:
    inside_page_two = pdf_bytes.index(b"6 0 obj") + 20
    with pytest.raises(mv.TruncatedDocumentError, match="cut short: it ends inside object 6"):
        load_document(pdf_bytes[:inside_page_two], name="cut.pdf")


def test_cut_between_objects_is_incomplete(pdf_bytes: bytes) -> None:
    # Half of make_pdf(2) ends right after object 5: the page tree names page 6, which is gone.
    half = pdf_bytes[: len(pdf_bytes) // 2]
    assert half.endswith(b"endobj\n")
    with pytest.raises(mv.TruncatedDocumentError, match=r"incomplete: its page tree names object\(s\) 6,"):
        load_document(half, name="half.pdf")


def test_corrupt_but_complete_looking() -> None:
    data = b"%PDF-1.4\n" + b"garbage " * 200 + b"\n%%EOF\n"
    with pytest.raises(mv.TruncatedDocumentError, match=r"cannot be opened.*contains no PDF object"):
        load_document(data, name="junk.pdf")


def test_bytes_after_eof_beyond_the_last_8_kib_are_accepted(pdf_bytes: bytes) -> None:
    # A scanner's PDF in pdf.js's corpus (scan-bad.pdf) has about 11 KB after %%EOF; pdfium opens it.
    data = pdf_bytes + random.Random(0).randbytes(11 * 1024)
    doc = load_document(data, name="trailing.pdf")
    assert (doc.page_count, doc.doubt) == (2, None)


def test_no_eof_marker_at_all_is_accepted_when_pdfium_opens_it(pdf_bytes: bytes) -> None:
    data = pdf_bytes[: pdf_bytes.rindex(b"%%EOF")]
    assert b"%%EOF" not in data
    assert load_document(data, name="no-eof.pdf").page_count == 2


def test_encrypted(pdf_bytes: bytes, encrypt_pdf: Callable[..., bytes]) -> None:
    with pytest.raises(mv.EncryptedDocumentError, match="password protected"):
        load_document(encrypt_pdf(pdf_bytes), name="locked.pdf")


def test_encrypted_with_an_empty_user_password_opens(pdf_bytes: bytes, encrypt_pdf: Callable[..., bytes]) -> None:
    # Only an owner password: every reader opens it without asking, and so does pdfium.
    doc = load_document(encrypt_pdf(pdf_bytes, user_password=""), name="owner-only.pdf")
    assert (doc.page_count, doc.doubt) == (2, None)


def test_a_sticky_password_error_does_not_make_a_broken_pdf_encrypted(
    pdf_bytes: bytes, encrypt_pdf: Callable[..., bytes], tmp_path: Path
) -> None:
    # pdfium keeps its last error for the whole process: after an encrypted PDF failed to open,
    # a PDF that loads but yields no page (here, pages behind a filter pdfium lacks) used to read
    # that stale "incorrect password" and was rejected as password protected.
    broken = _pages_in_brotli_object_stream()
    fresh = _fresh_verdict(broken, tmp_path)
    with pytest.raises(mv.EncryptedDocumentError):
        load_document(encrypt_pdf(pdf_bytes), name="locked.pdf")
    assert _verdict(broken) == fresh
    assert "Encrypted" not in fresh


def test_pages_behind_a_filter_pdfium_lacks_are_left_to_mineru() -> None:
    doc = load_document(_pages_in_brotli_object_stream(), name="brotli.pdf")
    assert doc.page_count is None
    assert doc.doubt is not None
    assert "pdfium opens it but finds no pages" in doc.doubt
    # The same bytes under a filter pdfium has: one page, no doubt (the filter is the whole story).
    flate = load_document(_pages_in_brotli_object_stream(b"  /FlateDecode"), name="flate.pdf")
    assert (flate.page_count, flate.doubt) == (1, None)


def test_an_empty_page_tree_has_no_pages() -> None:
    data = _build_pdf(_CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>")
    with pytest.raises(mv.EmptyDocumentError, match="no pages"):
        load_document(data, name="empty-tree.pdf")


def test_a_pdf_without_its_header_is_not_called_not_a_pdf(pdf_bytes: bytes) -> None:
    # pdf.js opens such files (bug1606566.pdf); pdfium does not. It is a PDF, so MinerU is left to fail.
    headless = pdf_bytes.replace(b"%PDF-1.4", b"%%%%%%%%", 1)
    doc = load_document(headless, name="headless.pdf")
    assert doc.page_count is None
    assert doc.doubt is not None
    assert "pdfium cannot open it" in doc.doubt


def test_verdicts_do_not_depend_on_what_the_process_judged_before(
    pdf_bytes: bytes, encrypt_pdf: Callable[..., bytes], tmp_path: Path
) -> None:
    inputs = [
        pdf_bytes,
        pdf_bytes + random.Random(1).randbytes(9000),
        encrypt_pdf(pdf_bytes),
        _pages_in_brotli_object_stream(),
        pdf_bytes[: len(pdf_bytes) // 2],
        pdf_bytes[: pdf_bytes.index(b"stream\n") + 40],
        b"%PDF-1.4\n" + b"garbage " * 200 + b"\n%%EOF\n",
        pdf_bytes.replace(b"%PDF-1.4", b"%%%%%%%%", 1),
        _build_pdf(_CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"),
        b"\x89PNG\r\n\x1a\n" + bytes(64),
    ]
    fresh = [_fresh_verdict(data, tmp_path) for data in inputs]
    # Every kind of verdict is among them, the ones that read pdfium's error code included.
    assert {v.split(":")[0] for v in fresh} == {
        "accepted",
        "EncryptedDocumentError",
        "TruncatedDocumentError",
        "EmptyDocumentError",
        "NotAPdfError",
    }
    assert sum("doubt=pdfium" in v for v in fresh) == 2
    for seed in range(3):
        order = list(range(len(inputs)))
        random.Random(seed).shuffle(order)
        judged = {i: _verdict(inputs[i]) for i in order}
        assert [judged[i] for i in range(len(inputs))] == fresh, f"order {order}"


def test_max_pages_is_not_checked_on_a_document_pdfium_cannot_count() -> None:
    doc = load_document(_pages_in_brotli_object_stream(), name="brotli.pdf", max_pages=1)
    assert doc.page_count is None


def test_a_doubt_travels_to_the_isolated_worker(tmp_path: Path) -> None:
    doc = Document(name="d.pdf", data=b"%PDF-1.7 ...", page_count=None, doubt="pdfium opens it but finds no pages")
    for limit in (0, 1 << 20):  # through a payload file, and inline
        assert document_ref(doc, tmp_path, f"doc-{limit}", limit).load() == doc


def test_too_large_by_bytes_is_checked_before_reading(tmp_path: Path, pdf_bytes: bytes) -> None:
    p = tmp_path / "big.pdf"
    p.write_bytes(pdf_bytes)
    with pytest.raises(mv.DocumentTooLargeError) as info:
        load_document(p, max_bytes=100)
    assert info.value.limit == 100
    with pytest.raises(mv.DocumentTooLargeError):
        load_document(io.BytesIO(pdf_bytes), max_bytes=100)


def test_too_many_pages() -> None:
    with pytest.raises(mv.DocumentTooLargeError, match="max_pages=2"):
        load_document(make_pdf(3), max_pages=2)


def test_text_mode_file_object_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("hello")
    with p.open() as fh, pytest.raises(mv.InvalidDocumentError, match="binary"):
        load_document(fh)  # type: ignore[arg-type]


def test_unsupported_source_type() -> None:
    with pytest.raises(mv.InvalidDocumentError, match="takes a path"):
        load_document(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pages", "expected"),
    [(None, ""), ("1-3", "1,2,3"), ("2, 1", "1,2"), (3, "3"), (range(1, 3), "1,2"), ([4, 1], "1,4")],
)
def test_parse_pages(pages: object, expected: str) -> None:
    assert parse_pages(pages, 5) == expected  # type: ignore[arg-type]


def test_parse_pages_with_an_unknown_page_count_checks_only_the_lower_bound() -> None:
    assert parse_pages("2-4,90", None) == "2,3,4,90"
    with pytest.raises(mv.ConfigurationError, match="start at 1"):
        parse_pages(0, None)


@pytest.mark.parametrize("pages", ["0", "6", "3-1", "a-b", [], True])
def test_parse_pages_rejects(pages: object) -> None:
    with pytest.raises(mv.ConfigurationError):
        parse_pages(pages, 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["https://arxiv.org/pdf/2409.18839", "http://example.com/a.pdf", "s3://bucket/a.pdf"])
def test_a_url_is_named_as_such_not_as_a_missing_file(url: str) -> None:
    with pytest.raises(mv.DocumentNotFoundError, match="a URL is not fetched") as info:
        load_document(url)
    assert info.value.document == url


def _one_page_named(times: int) -> bytes:
    """A small PDF whose page tree names one page object ``times`` times (a few KiB per thousand)."""
    kids = " ".join(["3 0 R"] * times)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {times} >>".encode(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
        b"<< /Length 0 >>\nstream\n\nendstream",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_a_small_file_naming_one_page_20000_times_is_refused_by_default() -> None:
    data = _one_page_named(20_000)
    assert len(data) < 200 * 1024
    session = mv.ModelSession("flash", device="cpu", trust_env=False)  # never opened: load() only validates
    with pytest.raises(mv.DocumentTooLargeError, match="20000 pages") as info:
        session.load(data, name="bomb.pdf")
    assert info.value.limit == 2000
    assert session.load(_one_page_named(3), name="three.pdf").page_count == 3
    unlimited = mv.ModelSession("flash", device="cpu", max_pages=None, trust_env=False)
    assert unlimited.load(data, name="bomb.pdf").page_count == 20_000
