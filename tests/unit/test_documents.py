"""Bad input gets a typed error naming the document, before any model runs."""

import io
from collections.abc import Callable
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram._documents import load_document, parse_pages
from mineru_vram.testing import make_pdf


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


def test_truncated(pdf_bytes: bytes) -> None:
    with pytest.raises(mv.TruncatedDocumentError, match="cut short"):
        load_document(pdf_bytes[: len(pdf_bytes) // 2], name="half.pdf")


def test_corrupt_but_complete_looking() -> None:
    data = b"%PDF-1.4\n" + b"garbage " * 200 + b"\n%%EOF\n"
    with pytest.raises(mv.TruncatedDocumentError, match="cannot be opened"):
        load_document(data, name="junk.pdf")


def test_encrypted(pdf_bytes: bytes, encrypt_pdf: Callable[..., bytes]) -> None:
    with pytest.raises(mv.EncryptedDocumentError, match="password"):
        load_document(encrypt_pdf(pdf_bytes), name="locked.pdf")


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


@pytest.mark.parametrize("pages", ["0", "6", "3-1", "a-b", [], True])
def test_parse_pages_rejects(pages: object) -> None:
    with pytest.raises(mv.ConfigurationError):
        parse_pages(pages, 5)  # type: ignore[arg-type]
