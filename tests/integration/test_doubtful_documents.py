"""What the verdicts let through and MinerU cannot read ends as a typed ParseError naming the document.

Runs MinerU's flash tier on the CPU (no models: these files fail before any page is analysed) on
the files of tests/data/pdfjs that we accept with a doubt or that pdf.js rejects while we accept.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram.testing import make_pdf

DATA = Path(__file__).resolve().parents[1] / "data" / "pdfjs"
SPEC = json.loads((DATA / "expectations.json").read_text(encoding="utf-8"))
DOUBTFUL = sorted(name for name, info in SPEC["files"].items() if info["verdict"] == "doubtful")
# Files pdf.js rejects (or whose page it cannot read) that pdfium opens with pages: we accept them.
PEER_REJECTS_WE_ACCEPT = sorted(
    name
    for name, info in SPEC["files"].items()
    if info["peer"] in ("rejects", "page-fails") and info["verdict"] == "accepted"
)


@pytest.fixture(scope="module")
def session() -> Iterator[mv.ModelSession]:
    with mv.ModelSession("flash", device="cpu") as s:
        yield s


def test_the_subset_has_such_files() -> None:
    assert len(DOUBTFUL) >= 5
    assert PEER_REJECTS_WE_ACCEPT


@pytest.mark.parametrize("name", DOUBTFUL)
def test_a_doubtful_file_ends_as_a_parse_error_naming_it_and_the_doubt(session: mv.ModelSession, name: str) -> None:
    doc = session.load(DATA / name, name=name)
    assert doc.doubt is not None
    with pytest.raises(mv.ParseError) as info:
        session.parse(DATA / name, name=name, ocr_mode="txt")
    assert info.value.document == name
    assert str(info.value).startswith(f"{name}: MinerU failed")
    assert f"(before parsing: {doc.doubt})" in str(info.value)


def _parse(session: mv.ModelSession, name: str) -> mv.ParseResult | mv.ParseError:
    try:
        return session.parse(DATA / name, name=name, ocr_mode="txt")
    except mv.ParseError as exc:
        return exc


@pytest.mark.parametrize("name", PEER_REJECTS_WE_ACCEPT)
def test_a_file_the_peer_rejects_parses_or_ends_as_a_parse_error(session: mv.ModelSession, name: str) -> None:
    outcome = _parse(session, name)
    if isinstance(outcome, mv.ParseError):
        assert outcome.document == name
    else:
        assert outcome.page_count >= 1


def test_verdicts_wait_for_the_pdfium_lock_of_mineru(session: mv.ModelSession) -> None:
    # pdfium keeps one last-error code per process: a verdict must not read it while MinerU's
    # PDF layer (loaded by the session's first parse) runs pdfium in another thread.
    from mineru_vram import _adapter
    from mineru_vram._documents import load_document

    session.parse(make_pdf(1), name="warm.pdf", ocr_mode="txt")
    lock = _adapter.mineru_pdfium_lock()
    assert lock is not None
    judged: list[object] = []
    with lock:
        judge = threading.Thread(target=lambda: judged.append(load_document(make_pdf(1), name="x.pdf")))
        judge.start()
        judge.join(0.5)
        assert judge.is_alive()  # waiting for MinerU's lock
        assert judged == []
    judge.join(60)
    assert len(judged) == 1
